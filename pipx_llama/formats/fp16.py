"""float32 -> fp16 and bf16 rounding, written once for the engine's kernels and the quantizer.

Both roundings work on the float32 bit pattern with integers only (round to nearest, ties to
even), so neither fastmath, nor a "reassoc" caller, nor the FPU's rounding mode can change them:
the classic float formulation of fp16 rounding (``(|f| * 2**112) * 2**-110`` plus an addition that
rounds) broke once when numba compiled it inside a "reassoc" caller and cached that code --
overflowing values no longer became infinity.

The one NaN rule for fp16: a NaN stays a NaN, keeps its sign and the top 10 bits of its payload,
and comes out quiet (the fp16 quiet bit 0x0200 set). That is what x86's F16C ``vcvtps2ph`` and
ARM's ``fcvt`` do, so the engine gives the same bits whether numba uses the CPU's conversion
(:data:`pipx_llama.engine.kernels.ops.HAVE_F16C`) or this function. (ggml's portable C routine
drops the payload, giving 0x7E00, while ggml on an F16C CPU keeps it: no rule matches both.)

bf16 follows ``ggml_compute_fp32_to_bf16``: the top half of the float32, rounded to nearest even;
a NaN keeps its top payload bits and is made quiet (bit 0x40).

``FP16_TABLE`` decodes fp16 bits to float32 (all 65536 values, exact), as ggml's CPU backend
does; kernels take it as an argument so it is not frozen into every compiled function.

numpy references elsewhere (``*_ref`` twins in tests and in :mod:`pipx_llama.formats.floats`) use
numpy's ``astype(np.float16)`` on purpose: an independent implementation to test this one against.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from pipx_llama._numba_cache import guard_saves

guard_saves()  # numba's cache writes, safe between processes (this module is imported outside the engine too)

FP16_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)

FP16_QUIET_BIT = 0x0200


@njit(inline="always")
def fp32_bits_to_fp16_bits(a: int) -> int:
    """float32 bit pattern -> fp16 bit pattern, round to nearest even; NaN: see the module's rule."""
    sign = (a >> 16) & 0x8000
    a = a & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7C00 | FP16_QUIET_BIT | ((a & 0x7FFFFF) >> 13)
    if a >= 0x477FF000:  # rounds to 65520 or more: infinity
        return sign | 0x7C00
    if a >= 0x38800000:  # a normal fp16
        return sign | ((a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13)
    if a < 0x33000000:  # below half the smallest subnormal: zero
        return sign
    # fp16 subnormal: the result counts units of 2**-24; shift the 24-bit significand down to them.
    shift = 126 - (a >> 23)
    m = (a & 0x7FFFFF) | 0x800000
    half = m >> shift
    rem = m & ((1 << shift) - 1)
    halfway = 1 << (shift - 1)
    if rem > halfway or (rem == halfway and (half & 1) == 1):
        half += 1
    return sign | half


@njit(inline="always")
def fp32_bits_to_bf16_bits(u: int) -> int:
    """float32 bit pattern -> bf16 bit pattern as ``ggml_compute_fp32_to_bf16``."""
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 64
    return (u + (0x7FFF + ((u >> 16) & 1))) >> 16


@njit(cache=True)
def _fp16_bits_into(bits: np.ndarray, out: np.ndarray) -> None:
    for i in range(bits.shape[0]):
        out[i] = fp32_bits_to_fp16_bits(np.int64(bits[i]))


def fp16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> their fp16 bit patterns (uint16, same shape), by the one rounding above."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint16)
    _fp16_bits_into(x.reshape(-1).view(np.uint32), out.reshape(-1))
    return out
