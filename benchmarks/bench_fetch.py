"""Throughput of the downloader (pipx_llama.fetch.http.download) against curl, and of parallel parts.

1. Loopback: a server process (tests/httpserver.py, sendfile) serves a random file. Runs alternate
   between ``curl -o /dev/null`` and download() -- which also writes the file and checks its sha256 --
   with the destination on disk (the store's case) and on tmpfs (no disk cost), over 1 connection
   and over parallel parts. A bare httpx streaming loop (no writing, no hashing) shows the ceiling
   httpx itself sets. The table gives median and best MiB/s, the client's CPU seconds per GiB, and
   the ratio of the medians to curl's. Target: download() >= 70% of curl.
2. Capped: the server limits every connection to 10 MB/s; download() over 1 connection against
   parallel parts. Target: >= 3x.

    python benchmarks/bench_fetch.py                       # 512 MiB loopback file, 3 runs; 96 MiB capped
    python benchmarks/bench_fetch.py --size-mb 1024 --runs 5 --json results.json

The machine's load average is printed before and after: other work on the machine skews wall-clock
figures (CPU seconds per GiB much less so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 16 * MiB))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


class Server:
    """tests/httpserver.py in its own process (so it does not share our GIL), serving one file at /f."""

    def __init__(self, path: Path, workdir: Path, rate: float = 0) -> None:
        portfile = workdir / f"port-{os.getpid()}-{int(rate)}"
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import httpserver; "
                "httpserver.serve_cli(sys.argv[2:])")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(REPO / "tests"), str(path), str(portfile),
                                      str(rate)])
        deadline = time.monotonic() + 30
        while not portfile.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{portfile.read_text()}/f"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def timed_child(cmd: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    c, t = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def fetch(url: str, dest: Path, size: int, digest: str, parts: int) -> None:
    from pipx_llama.fetch.http import FetchOptions, download

    download(url, dest, size=size, sha256=digest,
             options=FetchOptions(parallel_parts=parts, part_threshold=1 if parts > 1 else 1 << 62))
    dest.unlink()


def bare_httpx(url: str) -> None:
    import httpx

    with httpx.Client() as client, client.stream("GET", url) as resp:
        for _ in resp.iter_raw():
            pass


def loopback(args: argparse.Namespace, work: Path) -> dict:
    size = args.size_mb * MiB
    src = work / "loopback.bin"
    digest = make_file(src, size)
    disk = work / "out"
    disk.mkdir()
    shm_root = Path("/dev/shm")
    shm = Path(tempfile.mkdtemp(dir=shm_root)) if shm_root.is_dir() else None
    srv = Server(src, work)
    cases: dict[str, Callable[[], None] | None] = {
        "curl -o /dev/null": None,
        "httpx bare loop (no write, no hash)": lambda: bare_httpx(srv.url),
        "download() 1 conn -> disk": lambda: fetch(srv.url, disk / "f.part", size, digest, 1),
        f"download() {args.parts} parts -> disk": lambda: fetch(srv.url, disk / "f.part", size, digest, args.parts),
    }
    if shm is not None:
        cases["download() 1 conn -> tmpfs"] = lambda: fetch(srv.url, shm / "f.part", size, digest, 1)
        cases[f"download() {args.parts} parts -> tmpfs"] = lambda: fetch(srv.url, shm / "f.part", size, digest,
                                                                        args.parts)
    if shutil.which("curl") is None:
        del cases["curl -o /dev/null"]
    results: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in cases}
    try:
        for _ in range(args.runs):
            for name, fn in cases.items():
                if fn is None:
                    wall, cpu = timed_child(["curl", "-s", "-o", "/dev/null", srv.url])
                else:
                    wall, cpu = timed(fn)
                results[name]["wall"].append(wall)
                results[name]["cpu"].append(cpu)
    finally:
        srv.close()
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
    table = {}
    gib = size / (1 << 30)
    for name, r in results.items():
        speeds = [size / MiB / w for w in r["wall"]]
        table[name] = {"median_mib_s": statistics.median(speeds), "best_mib_s": max(speeds),
                       "cpu_s_per_gib": statistics.median(r["cpu"]) / gib}
    ref = table.get("curl -o /dev/null", {}).get("median_mib_s")
    for row in table.values():
        row["vs_curl"] = row["median_mib_s"] / ref if ref else None
    return {"size_mib": args.size_mb, "runs": args.runs, "rows": table}


def capped(args: argparse.Namespace, work: Path) -> dict:
    size = args.capped_size_mb * MiB
    src = work / "capped.bin"
    digest = make_file(src, size)
    rate = args.cap_mb_s * 1e6
    srv = Server(src, work, rate=rate)
    out = work / "capped-out"
    out.mkdir()
    try:
        one, _ = timed(lambda: fetch(srv.url, out / "c.part", size, digest, 1))
        many, _ = timed(lambda: fetch(srv.url, out / "c.part", size, digest, args.parts))
    finally:
        srv.close()
    return {"size_mib": args.capped_size_mb, "cap_mb_s": args.cap_mb_s, "parts": args.parts,
            "one_conn_mb_s": size / 1e6 / one, "parts_mb_s": size / 1e6 / many, "speedup": one / many}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=512, help="loopback file size in MiB (default 512)")
    p.add_argument("--runs", type=int, default=3, help="alternating runs per case (default 3)")
    p.add_argument("--parts", type=int, default=4, help="parallel parts (default 4)")
    p.add_argument("--cap-mb-s", type=float, default=10.0, help="per-connection cap in MB/s (default 10)")
    p.add_argument("--capped-size-mb", type=int, default=96, help="capped-test file size in MiB (default 96)")
    p.add_argument("--skip-loopback", action="store_true")
    p.add_argument("--skip-capped", action="store_true")
    p.add_argument("--dir", default=None, help="work folder (default: the system temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()

    report: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        if not args.skip_loopback:
            report["loopback"] = lp = loopback(args, work)
            print(f"\nloopback, {lp['size_mib']} MiB file, {lp['runs']} alternating runs "
                  f"(load average before: {report['load_before'][0]:.1f})")
            print(f"  {'case':40s} {'median MiB/s':>12s} {'best MiB/s':>11s} {'CPU s/GiB':>10s} {'vs curl':>8s}")
            for name, row in lp["rows"].items():
                vs = f"{row['vs_curl'] * 100:.0f}%" if row["vs_curl"] is not None else "-"
                print(f"  {name:40s} {row['median_mib_s']:12.0f} {row['best_mib_s']:11.0f} "
                      f"{row['cpu_s_per_gib']:10.2f} {vs:>8s}")
        if not args.skip_capped:
            report["capped"] = cp = capped(args, work)
            print(f"\nper-connection cap {cp['cap_mb_s']:g} MB/s, {cp['size_mib']} MiB file: "
                  f"1 connection {cp['one_conn_mb_s']:.1f} MB/s, {cp['parts']} parts {cp['parts_mb_s']:.1f} MB/s "
                  f"-> {cp['speedup']:.2f}x")
    report["load_after"] = os.getloadavg()
    print(f"\nload average after: {report['load_after'][0]:.1f} on {report['cpus']} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
