"""``pipx-llama bench``: prompt-processing and generation speed of a model, like llama.cpp's llama-bench.

Two tests, each repeated ``-r`` times on a fresh context: ``pp N`` evaluates an N-token prompt in
one batch, ``tg N`` generates N tokens one at a time (greedy, after a one-token prompt). Token ids
are a fixed pseudo-random sequence, as llama-bench uses random ids: speed does not depend on them.
The table shows the mean and standard deviation of tokens/s; ``--json`` prints every run.

A model by name is prepared as ``run`` prepares it (``cli/road.py``). Kernels are compiled (or loaded
from the cache) and the model loaded before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from pipx_llama.cli import road
from pipx_llama.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prompt and generation speed of a model (like llama-bench)",
                       description="Prompt processing (pp) and generation (tg) speed, in tokens/s, like "
                                   "llama.cpp's llama-bench. Each test runs -r times on a fresh context; the "
                                   "table shows mean and standard deviation, --json every run.")
    p.add_argument("model", nargs="?", default=None,
                   help="model name or alias, prepared in the store when missing, or a GGUF file's path; or "
                        "use -m FILE")
    p.add_argument("-m", "--model-file", type=Path, default=None, metavar="PATH.gguf", help="GGUF model file")
    p.add_argument("-p", "--n-prompt", type=int, default=256, metavar="N",
                   help="prompt tokens of the pp test, 0 to skip it (default 256)")
    p.add_argument("-n", "--n-gen", type=int, default=128, metavar="N",
                   help="generated tokens of the tg test, 0 to skip it (default 128)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument(
        "-r", "--repetitions", type=int, default=3, metavar="N", help="runs of each test (default 3)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    from pipx_llama.cli.options import add_cache_type_options

    add_cache_type_options(p)
    road.add_road_options(p)


def bench_tokens(n_vocab: int, n: int) -> list[int]:
    """n fixed pseudo-random token ids, clear of the first 256 (special and byte tokens in most
    vocabularies)."""
    span = max(1, n_vocab - 256)
    return [256 % n_vocab + (i * 7919 + 13) % span for i in range(n)]


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(args: argparse.Namespace) -> int:
    ref = road.reference(args, args.model)
    for flag, value, least in (("-p", args.n_prompt, 0), ("-n", args.n_gen, 0), ("-r", args.repetitions, 1)):
        if value < least:
            raise UsageError(
                f"{flag} {value}: must be at least {least}", f"pass {flag} {max(least, 1)} or more"
            )
    if args.n_prompt == 0 and args.n_gen == 0:
        raise UsageError("nothing to measure: both -p and -n are 0", "pass -p 256 or -n 128")
    n_ctx = max(args.n_prompt, args.n_gen + 1)
    runnable = road.ready(args, ref, n_ctx=n_ctx, color=road.color_enabled(sys.stderr), compile_ahead=True)
    path = runnable.path

    from pipx_llama.engine import load_model, warm_up

    warm_up(lambda message: print(message, file=sys.stderr), path)
    t0 = time.perf_counter()
    model = load_model(path, threads=runnable.threads)
    load_s = time.perf_counter() - t0
    if n_ctx > model.hparams.n_ctx_train:
        raise UsageError(
            f"the tests need {n_ctx} positions; {path.name} was trained on {model.hparams.n_ctx_train}",
            "pass smaller -p / -n",
        )
    ctx = model.new_context(n_ctx, n_batch=max(1, args.n_prompt), type_k=args.cache_type_k,
                            type_v=args.cache_type_v)
    ctx.eval(bench_tokens(model.hparams.n_vocab, 2))  # first touch of every buffer, outside the timing
    results = []
    tests = ([("pp", args.n_prompt)] if args.n_prompt else []) + ([("tg", args.n_gen)] if args.n_gen else [])
    for test, n in tests:
        speeds = []
        for _ in range(args.repetitions):
            ctx.reset()
            tokens = bench_tokens(model.hparams.n_vocab, n)
            if test == "pp":
                t = time.perf_counter()
                ctx.eval(tokens)
                seconds = time.perf_counter() - t
            else:
                ctx.eval(tokens[:1])
                tok = tokens[0]
                t = time.perf_counter()
                for _ in range(n):
                    tok = int(ctx.eval([tok])[0].argmax())
                seconds = time.perf_counter() - t
            speeds.append(n / seconds)
        mean, sd = _stats(speeds)
        results.append({"test": f"{test}{n}", "n_tokens": n, "tokens_per_second": mean, "stddev": sd,
                        "runs": speeds})
    info = {
        "model": str(path), "size_bytes": path.stat().st_size, "params": _params(model),
        "threads": model.threads, "engine": "fused" if model.packed is not None else "per-op",
        "cpu": platform.processor() or platform.machine(), "load_seconds": load_s,
        "weight_bytes_per_token": model.weight_bytes,
        "type_k": args.cache_type_k, "type_v": args.cache_type_v,
        "kv_bytes": ctx.kv_bytes, "results": results,
    }
    model.close()
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"| {'model':<30} | {'size':>9} | {'params':>8} | {'threads':>7} | {'test':>7} | {'t/s':>18} |")
    print(f"| {'-' * 30} | {'-' * 9}:| {'-' * 8}:| {'-' * 7}:| {'-' * 7}:| {'-' * 18}:|")
    for r in results:
        speed = f"{r['tokens_per_second']:.2f} ± {r['stddev']:.2f}"
        print(
            f"| {path.name[:30]:<30} | {info['size_bytes'] / 2**30:>5.2f} GiB | {_human(info['params']):>8} "
            f"| "
            f"{model.threads:>7} | {r['test']:>7} | {speed:>18} |"
        )
    return 0


def _params(model) -> int:
    import numpy as np

    total = 0
    for info in model.gguf.tensors.values():
        total += int(np.prod(info.shape))
    return total


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)
