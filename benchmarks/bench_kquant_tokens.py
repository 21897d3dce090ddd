"""How many tokens the K-quant kernels should take per weight load, on this CPU's SIMD tier.

Prompts and a server's batches multiply each weight record by several tokens. A kernel that takes more
tokens per record loaded reads the weights fewer times, but its accumulators may outgrow the vector
registers and spill to the stack, which costs more than the loads it saves. This times the kernels of
1, 2, 3 and 4 tokens (``simd._make_kquant_intrinsic``) per token, on random Q4_K / Q5_K / Q6_K blocks
(valid fp16 scales) of a 512 x 2048 matrix, small enough to stay in L2: the figures are compute, not
memory bandwidth. ``simd.KQUANT_TOKENS`` holds the choice per tier, with the figures that made it.

    python benchmarks/bench_kquant_tokens.py                      # the tier this CPU runs
    PIPX_LLAMA_SIMD=avx2 NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx,+avx2,+fma,+f16c \\
        python benchmarks/bench_kquant_tokens.py --runs 3         # the avx2 tier's code on this CPU
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from numba import njit

from pipx_llama.engine.kernels import packed, simd
from pipx_llama.engine.kernels.kquants import quantize_q8_K

KINDS = {"q4_K": Q.Q4_K, "q5_K": Q.Q5_K, "q6_K": Q.Q6_K}
ROWS, COLS, TOKENS = 512, 2048, 12  # 12 tokens: a whole number of kernel calls for 1, 2, 3 and 4


def random_rows(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """ggml rows of random quants whose fp16 scales are a small finite 0.01."""
    block, size = GGML_QUANT_SIZES[qtype]
    w = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = np.full(w.shape[:2], 0.01, np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == Q.Q6_K:
        w[:, :, size - 2 :] = d  # d last
    else:
        w[:, :, 0:2] = d  # d, dmin first
        w[:, :, 2:4] = d
    return w.reshape(rows, -1)


def kernel_loop(kind: str, nt: int):
    """A compiled loop calling the ``nt``-token kernel over every row group for every token."""
    k = simd._make_kquant_intrinsic(kind, nt)
    rec = simd.KQUANT_RECORD[kind]

    @njit(nogil=True)
    def run(reps, arena, nb, groups, xq, xd, xb16, xb32, T, res, out):
        for _ in range(reps):
            for g in range(groups):
                t = 0
                while t + nt <= T:
                    k(arena, g * nb * rec, nb, xq, xd, xb16, xb32, t, nb * rec, res)  # pf: the next group
                    out[t, g] = res[0, 0]
                    t += nt

    return run


def per_token_us(kind: str, nt: int, runs: int, rng: np.random.Generator) -> list[float]:
    pm = packed.PackedMatrix(KINDS[kind], random_rows(KINDS[kind], ROWS, COLS, rng))
    x = rng.standard_normal((TOKENS, COLS)).astype(np.float32)
    nk = COLS // 256
    xq, xd = np.zeros((TOKENS, COLS), np.int8), np.zeros((TOKENS, nk), np.float32)
    sums16 = np.empty((TOKENS, COLS // 16), np.int16)
    xb16, xb32 = np.zeros((TOKENS, nk * 16), np.int32), np.zeros((TOKENS, nk * 8), np.int32)
    quantize_q8_K(x, xq, xd, sums16)
    packed.ksums(sums16, xb16, xb32, 0, TOKENS)
    res, out = np.empty((4, 16), np.float32), np.zeros((TOKENS, ROWS // 16), np.float32)
    run = kernel_loop(kind, nt)
    args = (pm.arena, nk, ROWS // 16, xq, xd, xb16, xb32, TOKENS, res, out)
    run(1, *args)
    reps, times = 20, []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(reps, *args)
        times.append((time.perf_counter() - t0) / reps / TOKENS * 1e6)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    ap.add_argument("--runs", type=int, default=7, help="timed runs per kernel (median and range shown)")
    args = ap.parse_args()
    if simd.TIER is None:
        sys.exit("this CPU has no packed-kernel tier (not x86-64 with AVX2): nothing to time")
    rng = np.random.default_rng(0)
    print(f"tier {simd.TIER}; us per token, {ROWS} x {COLS} matrix, median (min-max) of {args.runs} runs; "
          f"chosen: {simd.KQUANT_TOKENS[simd.TIER]}")
    for kind in args.kinds:
        cells = []
        for nt in (1, 2, 3, 4):
            t = per_token_us(kind, nt, args.runs, rng)
            cells.append(f"x{nt} {np.median(t):5.1f} ({min(t):.1f}-{max(t):.1f})")
        print(f"{kind:5s} " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
