"""Quantization speed and peak RSS, ours vs llama.cpp's quantizer, on a 7B-shaped F16 model.

The benchmark writes its own model (llama architecture, dim 4096, FFN 11008, 32 heads, vocab 32000,
seeded random weights; 32 layers make the 13.5 GB of LLaMA-7B) into a temporary folder, deletes it
afterwards, and quantizes it with pipx-llama and with ``llama_model_quantize`` from
llama-cpp-python at the same thread count. Each run is a fresh subprocess, so its peak RSS (VmHWM)
is its own; the two alternate, and both outputs are compared byte for byte.

    python benchmarks/bench_quantize.py --layers 4            # a quick 1.8 GB version
    python benchmarks/bench_quantize.py                       # the full 7B shape (needs ~25 GB free)
    python benchmarks/bench_quantize.py --types Q4_0 Q4_K_M --threads 2 --dir /work/tmp

Throughput is input (F16) bytes per second of wall time, including reading and writing.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIM, FFN, HEADS, VOCAB = 4096, 11008, 32, 32000

OURS = """
import json, sys, time
from pipx_llama.quant.file import quantize_model
src, dst, ftype, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t = time.perf_counter()
quantize_model(src, dst, ftype, threads=threads)
seconds = time.perf_counter() - t
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"seconds": seconds, "peak_rss": hwm}))
"""

LLAMA = """
import ctypes, json, sys, time
import llama_cpp
src, dst, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept referenced while in use
llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
params = llama_cpp.llama_model_quantize_default_params()
params.nthread = threads
params.ftype = ftype
t = time.perf_counter()
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
seconds = time.perf_counter() - t
assert rc == 0, rc
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"seconds": seconds, "peak_rss": hwm}))
"""


def write_model(path: Path, n_layers: int, seed: int = 0) -> int:
    """Stream a 7B-shaped F16 llama GGUF to ``path``, one tensor in memory at a time; returns its size."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    rng = np.random.default_rng(seed)
    plan: list[tuple[str, tuple[int, ...], float]] = [("token_embd.weight", (VOCAB, DIM), 1.0)]
    for i in range(n_layers):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (DIM,), 0.0), (p + "attn_q.weight", (DIM, DIM), DIM**-0.5),
                 (p + "attn_k.weight", (DIM, DIM), DIM**-0.5), (p + "attn_v.weight", (DIM, DIM), DIM**-0.5),
                 (p + "attn_output.weight", (DIM, DIM), DIM**-0.5), (p + "ffn_norm.weight", (DIM,), 0.0),
                 (p + "ffn_gate.weight", (FFN, DIM), DIM**-0.5), (p + "ffn_up.weight", (FFN, DIM), DIM**-0.5),
                 (p + "ffn_down.weight", (DIM, FFN), FFN**-0.5)]
    plan += [("output_norm.weight", (DIM,), 0.0), ("output.weight", (VOCAB, DIM), DIM**-0.5)]

    w = GGUFWriter(path, "llama")
    w.add_name("bench-7b-shape")
    w.add_block_count(n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    for name, shape, _ in plan:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, std in plan:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32) + rng.standard_normal(shape, np.float32) * 0.1)
            continue
        out = np.empty(shape, np.float16)
        for r in range(0, shape[0], 1024):  # row blocks keep the float32 temporaries small
            block = rng.standard_normal((min(1024, shape[0] - r), shape[1]), np.float32)
            block *= np.float32(std)
            out[r : r + block.shape[0]] = block
        w.write_tensor_data(out)
    w.close()
    return path.stat().st_size


def run(script: str, *args: object) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(path: Path) -> None:
    """Read the model once so both quantizers start with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="layers (32 = LLaMA-7B's 13.5 GB)")
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="runs of each quantizer per type (best is reported)")
    ap.add_argument("--dir", type=Path, default=Path("/work/tmp"), help="where to put the temporary files")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    from pipx_llama.quant.rules import FILE_TYPES

    args.dir.mkdir(parents=True, exist_ok=True)
    params = VOCAB * DIM * 2 + args.layers * (4 * DIM * DIM + 3 * DIM * FFN)
    need = params * 2 * 1.7  # the F16 model plus two outputs at once, with room to spare
    free = shutil.disk_usage(args.dir).free
    if free < need:
        sys.exit(f"{args.dir}: {free / 2**30:.1f} GiB free, the benchmark needs about {need / 2**30:.1f} GiB")
    tmp = Path(tempfile.mkdtemp(prefix="bench-quantize-", dir=args.dir))
    results = []
    try:
        src = tmp / "model-f16.gguf"
        t = time.perf_counter()
        size = write_model(src, args.layers)
        print(
            f"wrote {src.name}: {args.layers} layers, {params / 1e9:.2f} B parameters, {size / 2**30:.2f} "
            f"GiB "
            f"in {time.perf_counter() - t:.0f} s",
            file=sys.stderr,
        )
        for ftype in args.types:
            best: dict[str, dict] = {}
            for _ in range(args.runs):
                for who in ("llama.cpp", "ours"):
                    dst = tmp / f"{who}-{ftype}.gguf"
                    warm(src)
                    if who == "ours":
                        r = run(OURS, src, dst, ftype, args.threads)
                    else:
                        r = run(LLAMA, src, dst, int(FILE_TYPES[ftype].ftype), args.threads)
                    print(f"  {ftype} {who}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB",
                          file=sys.stderr)
                    if who not in best or r["seconds"] < best[who]["seconds"]:
                        best[who] = r
            same = filecmp.cmp(tmp / f"ours-{ftype}.gguf", tmp / f"llama.cpp-{ftype}.gguf", shallow=False)
            out_size = (tmp / f"ours-{ftype}.gguf").stat().st_size
            for who in ("ours", "llama.cpp"):
                (tmp / f"{who}-{ftype}.gguf").unlink()
            results.append({
                "type": ftype, "layers": args.layers, "threads": args.threads, "input_bytes": size,
                "output_bytes": out_size, "identical": same,
                "ours_s": best["ours"]["seconds"], "llama_s": best["llama.cpp"]["seconds"],
                "ours_rss": best["ours"]["peak_rss"], "llama_rss": best["llama.cpp"]["peak_rss"],
                "speed_ratio": best["llama.cpp"]["seconds"] / best["ours"]["seconds"],
            })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"\n{'type':7} {'layers':>6} {'thr':>3} | {'ours s':>7} {'GB/s':>5} {'RSS GiB':>7} | "
          f"{'llama s':>7} {'GB/s':>5} {'RSS GiB':>7} | {'speed':>6} | identical")
    for r in results:
        gb = r["input_bytes"] / 1e9
        print(
            f"{r['type']:7} {r['layers']:>6} {r['threads']:>3} | {r['ours_s']:7.1f} {gb / r['ours_s']:5.2f} "
            f"{r['ours_rss'] / 2**30:7.2f} | {r['llama_s']:7.1f} {gb / r['llama_s']:5.2f} "
            f"{r['llama_rss'] / 2**30:7.2f} | {r['speed_ratio']:5.2f}x | {r['identical']}"
        )


if __name__ == "__main__":
    main()
