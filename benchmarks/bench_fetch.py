"""Throughput of the downloader (pipx_llama.fetch.http.download) against curl, and of parallel parts.

1. Loopback: a server process (tests/httpserver.py, sendfile) serves a random file. Runs alternate
   between ``curl -o /dev/null`` and download() -- which also writes the file, checks its sha256 and
   fsyncs it, as the store needs -- with the destination on disk (the store's case) and on tmpfs,
   over 1 connection and over parallel parts. Reference rows show the ceilings: a bare httpx
   streaming loop (no writing, no hashing) with httpx's default 64 KiB socket reads and with the
   1 MiB reads download() uses, and sha256 alone over the same number of bytes from memory
   (hashlib, one thread: no download with hashing can beat it); ``curl -o FILE`` followed by
   ``openssl dgst -sha256 FILE`` is the shell's way to do what download() does (without the fsync).
   The table gives median and best MiB/s, the client's CPU seconds per GiB, and the ratio of the
   medians to ``curl -o /dev/null``'s. Target: download() >= 70% of curl.
2. Capped: the server limits every connection to 10 MB/s; download() over 1 connection against
   parallel parts. Target: >= 3x.

    python benchmarks/bench_fetch.py                       # 512 MiB loopback file, 5 runs; 96 MiB capped
    python benchmarks/bench_fetch.py --size-mb 1024 --runs 5 --json results.json

The machine's load average is printed (before, after, and its range over the runs): other work on
the machine skews wall-clock figures (CPU seconds per GiB less so). On a loaded machine the client's
CPU per GiB decides the speed; on an idle one with cores to spare, sha256's single-thread speed.
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
sys.path.insert(0, str(REPO / "tests"))

from httpserver import ServerProcess as Server  # noqa: E402

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


def timed_child(cmds: list[list[str]]) -> tuple[float, float]:
    """Run the commands one after the other; wall and CPU seconds of them all."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    for cmd in cmds:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    c, t = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def fetch(url: str, dest: Path, size: int, digest: str, parts: int) -> None:
    """download() into ``dest``; the caller deletes it outside the timing (curl deletes nothing)."""
    from pipx_llama.fetch.http import FetchOptions, download

    download(url, dest, size=size, sha256=digest,
             options=FetchOptions(parallel_parts=parts, part_threshold=1 if parts > 1 else 1 << 62))


def bare_httpx(url: str, wide: bool) -> None:
    import httpx

    from pipx_llama.fetch.receive import _widen_reads

    with httpx.Client() as client, client.stream("GET", url) as resp:
        if wide:
            _widen_reads(resp)
        for _ in resp.iter_raw():
            pass


def sha256_alone(size: int) -> None:
    block = os.urandom(4 * MiB)
    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)


def loopback(args: argparse.Namespace, work: Path) -> dict:
    size = args.size_mb * MiB
    src = work / "loopback.bin"
    digest = make_file(src, size)
    disk = work / "out"
    disk.mkdir()
    shm_root = Path("/dev/shm")
    shm = Path(tempfile.mkdtemp(dir=shm_root)) if shm_root.is_dir() else None
    srv = Server(src, work)
    curl_file = disk / "curl.bin"
    cases: dict[str, Callable[[], None] | list[list[str]]] = {
        "curl -o /dev/null": [["curl", "-s", "-o", "/dev/null", srv.url]],
        "curl -o file, then openssl sha256": [
            ["curl", "-s", "-o", str(curl_file), srv.url],
            ["openssl", "dgst", "-sha256", str(curl_file)],
        ],
        "httpx bare loop, 64 KiB reads": lambda: bare_httpx(srv.url, False),
        "httpx bare loop, 1 MiB reads": lambda: bare_httpx(srv.url, True),
        "sha256 alone, from memory": lambda: sha256_alone(size),
        "download() 1 conn -> disk": lambda: fetch(srv.url, disk / "f.part", size, digest, 1),
        f"download() {args.parts} parts -> disk": lambda: fetch(
            srv.url, disk / "f.part", size, digest, args.parts
        ),
    }
    if shm is not None:
        cases["download() 1 conn -> tmpfs"] = lambda: fetch(srv.url, shm / "f.part", size, digest, 1)
        cases[f"download() {args.parts} parts -> tmpfs"] = lambda: fetch(
            srv.url, shm / "f.part", size, digest, args.parts
        )
    if shutil.which("curl") is None:
        del cases["curl -o /dev/null"], cases["curl -o file, then openssl sha256"]
    elif shutil.which("openssl") is None:
        del cases["curl -o file, then openssl sha256"]
    results: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in cases}
    loads = []
    try:
        for _ in range(args.runs):
            loads.append(os.getloadavg()[0])
            for name, fn in cases.items():
                wall, cpu = timed_child(fn) if isinstance(fn, list) else timed(fn)
                for leftover in (disk / "f.part", curl_file, shm / "f.part" if shm is not None else None):
                    if leftover is not None:
                        leftover.unlink(missing_ok=True)
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
    return {
        "size_mib": args.size_mb,
        "runs": args.runs,
        "load_range": (min(loads), max(loads)),
        "rows": table,
    }


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
        (out / "c.part").unlink()
        many, _ = timed(lambda: fetch(srv.url, out / "c.part", size, digest, args.parts))
    finally:
        srv.close()
    return {"size_mib": args.capped_size_mb, "cap_mb_s": args.cap_mb_s, "parts": args.parts,
            "one_conn_mb_s": size / 1e6 / one, "parts_mb_s": size / 1e6 / many, "speedup": one / many}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=512, help="loopback file size in MiB (default 512)")
    p.add_argument("--runs", type=int, default=5, help="alternating runs per case (default 5)")
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
            lo, hi = lp["load_range"]
            print(f"\nloopback, {lp['size_mib']} MiB file, {lp['runs']} alternating runs "
                  f"(load average before: {report['load_before'][0]:.1f}, {lo:.1f}-{hi:.1f} during)")
            print(
                f"  {'case':40s} {'median MiB/s':>12s} {'best MiB/s':>11s} {'CPU s/GiB':>10s} {'vs curl':>8s}"
            )
            for name, row in lp["rows"].items():
                vs = f"{row['vs_curl'] * 100:.0f}%" if row["vs_curl"] is not None else "-"
                print(f"  {name:40s} {row['median_mib_s']:12.0f} {row['best_mib_s']:11.0f} "
                      f"{row['cpu_s_per_gib']:10.2f} {vs:>8s}")
            sha = lp["rows"].get("sha256 alone, from memory")
            if sha is not None and sha["vs_curl"] is not None:
                print(
                    f"  sha256 alone runs at {sha['vs_curl'] * 100:.0f}% of curl's speed here: no download "
                    f"that "
                    "hashes can go faster; with other work on the machine, CPU s/GiB decides"
                )
        if not args.skip_capped:
            report["capped"] = cp = capped(args, work)
            print(
                f"\nper-connection cap {cp['cap_mb_s']:g} MB/s, {cp['size_mib']} MiB file: "
                f"1 connection {cp['one_conn_mb_s']:.1f} MB/s, {cp['parts']} parts {cp['parts_mb_s']:.1f} "
                f"MB/s "
                f"-> {cp['speedup']:.2f}x"
            )
    report["load_after"] = os.getloadavg()
    print(f"\nload average after: {report['load_after'][0]:.1f} on {report['cpus']} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
