"""Where a first run's kernel compile time goes: per numba function, per compiler pass, in total.

Each run is a fresh subprocess with an empty ``NUMBA_CACHE_DIR``, which loads a model and evaluates
a 4-token prompt and one token -- what a first ``pipx-llama run`` compiles -- or runs ``warm_up``
for that model (``--warm-up``). Times are the compiling thread's CPU seconds (``time.thread_time``),
exclusive of the functions each one calls, from numba's event API (``numba:compile``,
``numba:run_pass``); wall seconds and the load average are printed too, because the machine may be
shared. numba finalizes every dispatcher separately, so a caller's "native_lowering" includes
optimizing and emitting machine code again for everything it links in: a deep call tree pays for
its leaves once per level.

    python benchmarks/bench_compile.py                       # SmolLM2 Q4_1 (test data), median of 3
    python benchmarks/bench_compile.py --model M.gguf --runs 1 --top 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import collections, json, os, sys, time
from numba.core import event

clock = time.thread_time
excl, count, passes = collections.defaultdict(float), collections.Counter(), collections.defaultdict(float)
stack, pstack = [], []


def name(data):
    f = getattr(data.get("dispatcher"), "py_func", None)
    return f"{f.__module__.rsplit('.', 1)[-1]}.{f.__qualname__}" if f else "?"


class Compiles(event.Listener):
    def on_start(self, ev):
        stack.append([name(ev.data), clock(), 0.0])

    def on_end(self, ev):
        n, t0, inner = stack.pop()
        dt = clock() - t0
        excl[n] += dt - inner
        count[n] += 1
        if stack:
            stack[-1][2] += dt


class Passes(event.Listener):
    def on_start(self, ev):
        pstack.append([ev.data["name"].split(" [")[0], clock(), 0.0])

    def on_end(self, ev):
        n, t0, inner = pstack.pop()
        dt = clock() - t0
        passes[n] += dt - inner
        if pstack:
            pstack[-1][2] += dt


event.register("numba:compile", Compiles())
event.register("numba:run_pass", Passes())
wall0, cpu0 = time.perf_counter(), time.process_time()
path, mode = sys.argv[1], sys.argv[2]
if mode == "warm-up":
    from pipx_llama.engine.warmup import warm_up
    warm_up(model_path=path)
else:
    from pipx_llama.engine.model import load_model
    model = load_model(path, threads=2)
    ctx = model.new_context(64)
    ctx.eval([1, 5, 9, 200], all_logits=True)
    ctx.eval([7])
    model.close()
print(json.dumps({"wall": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0,
                  "compile": sum(excl.values()), "functions": excl, "count": count, "passes": passes,
                  "load": os.getloadavg()[0]}))
"""


def default_model() -> Path:
    data = Path(os.environ.get("PIPX_LLAMA_TEST_DATA", Path.home() / ".cache" / "pipx-llama" / "test-data"))
    return data / "SmolLM2-135M-Instruct.Q4_1.gguf"


def one_run(model: Path, mode: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), mode], env=env, check=True,
                              capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=25, help="functions to list (from the median run)")
    ap.add_argument("--warm-up", action="store_true", help="time warm_up(model_path=M) instead")
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        r = one_run(args.model, "warm-up" if args.warm_up else "eval")
        runs.append(r)
        print(f"run {i + 1}: compile {r['compile']:.1f} s CPU, process {r['cpu']:.1f} s CPU, "
              f"{r['wall']:.1f} s wall, load average {r['load']:.2f}", flush=True)
    runs.sort(key=lambda r: r["compile"])
    med = runs[len(runs) // 2]
    print(f"\nmedian of {len(runs)}: compile {statistics.median(r['compile'] for r in runs):.1f} s CPU, "
          f"wall {statistics.median(r['wall'] for r in runs):.1f} s "
          f"({sum(med['count'].values())} compiles in the median run)")
    print("\nper function (exclusive CPU s, compiles):")
    for name, sec in sorted(med["functions"].items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {sec:7.2f}  x{med['count'][name]:<2} {name}")
    print("\nper pass (exclusive CPU s):")
    for name, sec in sorted(med["passes"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {sec:7.2f}  {name}")


if __name__ == "__main__":
    main()
