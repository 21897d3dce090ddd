"""Our engine against llama.cpp on a 7B-shaped model (LLaMA-7B hyper-parameters, random seeded weights).

The benchmark writes the model itself -- dim 4096, 32 layers, 32 heads, FFN 11008, vocab 32000 --
as Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q5_0... GGUF files (each 3.8-5.5 GB, in ``--dir``, default /work/tmp or the
system temp folder; deleted afterwards and never committed). Tensor types follow llama.cpp's quantizer rules
(``pipx_llama.quant.rules``); the quants are random seeded bytes with small finite fp16 scales, so
every kernel runs its real code on realistic data without hours of quantization.

Then each engine runs in its own subprocess (``bench_engine.py``), alternating, medians of
``--runs``: prompt processing, generation, peak RSS. Generation at this size streams every weight
once per token, so beside tokens/s the table shows the weight bytes read per second and this
machine's read bandwidth (a numba sum over 1 GB, same thread count).

    python benchmarks/bench_7b.py                       # Q4_0 and Q4_K_M, 2 and 1 threads, 3 runs
    python benchmarks/bench_7b.py --types Q4_0 --threads 1 --runs 3 --prompt 64 --gen 32
    python benchmarks/bench_7b.py --types Q4_K_M Q5_K_M --engines ours llama-bench --llama-bench PATH --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine

DIM, LAYERS, HEADS, FFN, VOCAB, CTX = 4096, 32, 32, 11008, 32000, 4096


def _tokenizer(writer) -> None:
    """A SentencePiece-style ('llama') vocabulary of 32000 distinct pieces: <unk>, <s>, </s>, 256 bytes."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    i = 0
    while len(tokens) < VOCAB:
        tokens.append(f"\u2581t{i}")
        types.append(1)
        i += 1
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(j) for j in range(VOCAB - 259)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _random_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes of ``qtype`` with small finite fp16 scales (d ~ 1/sqrt(cols) / 8)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    block, size = GGML_QUANT_SIZES[qtype]
    nb = cols // block
    raw = np.frombuffer(rng.bytes(rows * nb * size), np.uint8).reshape(rows, nb, size).copy()
    scale = np.float16(0.125 / np.sqrt(cols))

    def put(offset: int) -> None:
        d = (rng.uniform(0.5, 1.5, (rows, nb)) * scale).astype(np.float16)
        raw[:, :, offset : offset + 2] = d.view(np.uint8).reshape(rows, nb, 2)

    if qtype in (Q.Q4_0, Q.Q8_0, Q.Q5_0):
        put(0)
    elif qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K):
        put(0)
        put(2)
    elif qtype == Q.Q6_K:
        put(208)
    else:
        raise ValueError(f"no random generator for {qtype.name}")
    return raw.reshape(rows, nb * size)


def write_model(path: Path, ftype_name: str, seed: int = 7) -> int:
    """Write the 7B-shaped GGUF; returns its size in bytes."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from pipx_llama.quant import rules

    ft = rules.file_type(ftype_name)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (DIM, VOCAB), "output_norm.weight": (DIM,),
                                          "output.weight": (DIM, VOCAB)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (DIM,), p + "ffn_norm.weight": (DIM,),
                       p + "attn_q.weight": (DIM, DIM), p + "attn_k.weight": (DIM, DIM),
                       p + "attn_v.weight": (DIM, DIM), p + "attn_output.weight": (DIM, DIM),
                       p + "ffn_gate.weight": (DIM, FFN), p + "ffn_up.weight": (DIM, FFN),
                       p + "ffn_down.weight": (FFN, DIM)})
    choices = rules.choose_types([(n, s, Q.F32) for n, s in shapes.items()], ft,
                                 rules.ModelInfo("llama", LAYERS, HEADS, HEADS))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"random 7B-shaped {ftype_name} (pipx-llama benchmark)")
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(ft.ftype))
    _tokenizer(w)
    from gguf import GGML_QUANT_SIZES

    for c in choices:
        cols, rows = c.shape[0], int(np.prod(c.shape[1:]))
        if c.target == Q.F32:
            w.add_tensor_info(c.name, c.shape[::-1], np.dtype(np.float32), rows * cols * 4)
        else:
            block, size = GGML_QUANT_SIZES[c.target]
            # numpy byte shape [rows, row bytes]; the writer turns it into ggml's element shape
            w.add_tensor_info(
                c.name,
                (rows, cols // block * size),
                np.dtype(np.uint8),
                rows * cols // block * size,
                raw_dtype=c.target,
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for c in choices:
        if c.target == Q.F32:
            w.write_tensor_data(np.ones(c.shape, np.float32))
        else:
            cols, rows = c.shape[0], int(np.prod(c.shape[1:]))
            w.write_tensor_data(_random_blocks(c.target, rows, cols, rng))
    w.close()
    return path.stat().st_size


def read_bandwidth(threads: int) -> float:
    """GB/s of a numba sum over 1 GB with ``threads`` threads (median of 5)."""
    import numba
    from numba import njit, prange

    @njit(parallel=True)
    def total(a):
        s = np.uint64(0)
        for i in prange(a.shape[0]):
            s += a[i]
        return s

    a = np.ones(1 << 27, np.uint64)
    numba.set_num_threads(threads)
    total(a)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        total(a)
        times.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(times) / 1e9


def _bandwidth_child(threads: int) -> float:
    import subprocess

    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_7b; " \
           f"print(bench_7b.read_bandwidth({threads}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M"])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--gen", type=int, default=32, help="generated tokens (default 32)")
    p.add_argument("--dir", default="/work/tmp" if Path("/work/tmp").is_dir() else tempfile.gettempdir())
    p.add_argument("--keep", action="store_true", help="keep the model files (for repeated runs)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--engines", nargs="+", choices=list(bench_engine.MEASURE), default=None)
    p.add_argument("--llama-bench", default=None, help="path of a llama-bench executable (or LLAMA_BENCH)")
    args = p.parse_args()
    if args.llama_bench:
        os.environ["LLAMA_BENCH"] = args.llama_bench

    folder = Path(args.dir)
    need = 5_600_000_000
    free = shutil.disk_usage(folder).free
    if free < need + 2_000_000_000:
        raise SystemExit(
            f"{folder}: {free / 1e9:.1f} GB free; the model needs {need / 1e9:.1f} GB plus 2 GB to spare"
        )
    engines = args.engines or bench_engine.default_engines()

    report = []
    for ftype in args.types:
        path = folder / f"pipx-llama-bench-7b-{ftype}.gguf"
        try:
            if not path.exists():
                t = time.perf_counter()
                size = write_model(path, ftype)
                print(
                    f"wrote {path} ({size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", file=sys.stderr
                )
            size = path.stat().st_size
            for threads in args.threads:
                bw = _bandwidth_child(threads)
                runs: dict[str, list[dict]] = {e: [] for e in engines}
                for _ in range(args.runs):
                    for engine in engines:
                        runs[engine].append(
                            bench_engine.run_child(engine, str(path), threads, args.prompt, args.gen)
                        )
                row = {"type": ftype, "threads": threads, "file_bytes": size, "read_GBps": bw,
                       "load": os.getloadavg()[0]}
                for engine in engines:
                    for key in ("pp_tps", "tg_tps", "peak_rss_mb", "load_s"):
                        row[f"{engine}:{key}"] = statistics.median(r[key] for r in runs[engine])
                wb = runs["ours"][0]["weight_bytes"]
                row["weight_bytes"] = wb
                row["kv_bytes"] = runs["ours"][0].get("kv_bytes", 0)
                for engine in engines:
                    row[f"{engine}:weight_GBps"] = row[f"{engine}:tg_tps"] * wb / 1e9
                report.append(row)
                _print_row(row, engines)
        finally:
            if not args.keep:
                path.unlink(missing_ok=True)
    if args.json:
        print(json.dumps({"runs": args.runs, "prompt": args.prompt, "gen": args.gen, "rows": report}))


def _print_row(row: dict, engines: list[str]) -> None:
    print(
        f"\n{row['type']}, {row['threads']} thread(s), load {row['load']:.1f}: file "
        f"{row['file_bytes'] / 1e9:.2f} GB, "
        f"machine read bandwidth {row['read_GBps']:.1f} GB/s"
    )
    print(
        f"{'engine':>10} {'pp tok/s':>9} {'tg tok/s':>9} {'weights GB/s':>12} {'peak RSS MiB':>12} "
        f"{'load s':>7}"
    )
    for e in engines:
        print(
            f"{e:>10} {row[f'{e}:pp_tps']:>9.2f} {row[f'{e}:tg_tps']:>9.2f} {row[f'{e}:weight_GBps']:>12.1f} "
            f"{row[f'{e}:peak_rss_mb']:>12.0f} {row[f'{e}:load_s']:>7.1f}"
        )
    for other in engines[1:]:
        print(f"{'/' + other:>10} {row['ours:pp_tps'] / row[f'{other}:pp_tps']:>8.2f}x "
              f"{row['ours:tg_tps'] / row[f'{other}:tg_tps']:>8.2f}x")
    budget = (row["file_bytes"] + row["kv_bytes"]) / 2**20 + 400
    print(f"memory: our peak RSS {row['ours:peak_rss_mb']:.0f} MiB vs budget file + KV cache + 400 MiB = "
          f"{budget:.0f} MiB ({'ok' if row['ours:peak_rss_mb'] <= budget else 'OVER'})")


if __name__ == "__main__":
    main()
