"""Non-matmul kernels of the forward pass except attention (:mod:`.attention`), each with a numpy
reference twin (suffix ``_ref``).

Kernels write into preallocated outputs (or work in place) and follow llama.cpp's CPU backend
(ggml-cpu ``ops.cpp``/``vec.cpp``) closely enough that our logits track llama.cpp's:

- ``rmsnorm``: sum of float32 squares accumulated in float64, ``scale = 1/sqrtf(mean + eps)`` in
  float32, ``out = x*scale*weight`` -- ggml's ``rms_norm`` fused with ``mul``.
- ``rope``: GGML_ROPE_TYPE_NORMAL (consecutive pairs) from ``rope_cache`` tables that mirror
  ``ggml_rope_cache_init`` with ``ext_factor == 0``: ``theta_scale = powf(base, -2.0f/n_rot)``,
  ``theta`` starts at ``(float) pos`` and is multiplied by ``theta_scale`` pair after pair in float32,
  then ``cosf(freq_scale*theta)``/``sinf(...)``.
- ``swiglu``: ``silu(g)*u`` with ``silu(x) = x/(1+expf(-x))``.

Exponentials use ``_expf``, a port of ggml's AVX2 ``ggml_v_expf`` (error < 2 ulp) written so LLVM
vectorizes it; a libm ``expf`` call per element is about eight times slower here.

Numba cannot type float16 arrays, so the kernels take F16 data as ``uint16`` holding the F16
bits. F16->F32 uses the
CPU's conversion instruction where numba targets F16C (``HAVE_F16C``), else integer arithmetic;
F32->F16 likewise, the integer routine being :mod:`pipx_llama.formats.fp16`'s (round to nearest
even; NaN as the hardware does it, so both give the same bits). All of them are exact.

Small batches run serially: each ``prange`` region costs about a microsecond of thread wake-up,
more than the whole op for one token of a small model. Every kernel picks serial or parallel
from its work size, so one compiled function serves both decoding and prompt processing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from pipx_llama.formats.fp16 import fp32_bits_to_fp16_bits
from pipx_llama.system import target_has_f16c as _target_has_f16c

# Reductions need "reassoc" to vectorize; "nnan"/"ninf" stay off because masked logits are -inf
# and exp(-inf - max) must give 0, not poison. Every kernel uses error_model="numpy": numba's
# default checks each float division for zero to raise ZeroDivisionError, and that branch stops
# LLVM from vectorizing the loop (swiglu ran 8x slower).
_FAST = {"nsz", "contract", "reassoc"}

# Work sizes below which a kernel stays on one thread: where serial and 2-thread runs broke even
# on the 2-core dev machine (a parallel region costs ~1-1.5 us there).
_PAR_ADD = 1 << 16  # elements
_PAR_RMSNORM = 1 << 14  # elements
_PAR_SWIGLU = 1 << 14  # elements (one exp each)
_PAR_SOFTMAX = 1 << 14  # elements (two exps each)
_PAR_ROPE = 1 << 12  # rotated pairs
_PAR_ATTENTION = 1 << 15  # (token, head) pairs x positions x head_dim

_F32 = np.float32
_I32 = np.int32
_U32 = np.uint32


# ----------------------------------------------------------------------------- bit helpers


@intrinsic
def _f32_as_u32(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _u32_as_f32(typingctx, x):
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif x.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


_TWO_112 = _F32(2.0**112)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def f16_bits_to_f32(h):
    """F16 bits (uint16) -> float32, exact for every value (subnormals, inf, nan)."""
    w = _U32(h)
    em = _U32(w & _U32(0x7FFF))
    # exponent/mantissa moved into float32 position, then rebias by 2**(127-15): exact, and it
    # turns F16 subnormals into the right float32 normals.
    bits = _f32_as_u32(_u32_as_f32(_U32(em << _U32(13))) * _TWO_112)
    if em >= _U32(0x7C00):
        bits = _U32(bits | _U32(0x7F800000))
    return _u32_as_f32(_U32(bits | _U32((w & _U32(0x8000)) << _U32(16))))


@njit(cache=True, error_model="numpy")
def f32_to_f16_bits_sw(f):
    """float32 -> F16 bits without F16C, by the one rounding of :mod:`pipx_llama.formats.fp16`."""
    return np.uint16(fp32_bits_to_fp16_bits(np.int64(_f32_as_u32(f))))


HAVE_F16C = _target_has_f16c()


@intrinsic
def _f16_bits_to_f32_hw(typingctx, h):
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(cache=True, error_model="numpy")
def f16_bits_to_f32_hw(h):
    """F16 bits -> float32 with the CPU's conversion instruction; only where ``HAVE_F16C``."""
    return _f16_bits_to_f32_hw(h)


@intrinsic
def _f32_to_f16_bits_hw(typingctx, f):
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(cache=True, error_model="numpy")
def f32_to_f16_bits_hw(f):
    """float32 -> F16 bits with the CPU's conversion (round to nearest even); only where ``HAVE_F16C``."""
    return _f32_to_f16_bits_hw(f)


# what the attention kernel decodes the F16 cache with, and rounds to it with; all exact
_f16_decode = f16_bits_to_f32_hw if HAVE_F16C else f16_bits_to_f32
f32_to_f16_bits = f32_to_f16_bits_hw if HAVE_F16C else f32_to_f16_bits_sw


# ----------------------------------------------------------------------------- exp

_EXP_C = [_F32(float.fromhex(h)) for h in ("0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3",
                                           "0x1.fffdb6p-2", "0x1.ffffecp-1")]
_EXP_C5, _EXP_C4, _EXP_C3, _EXP_C2, _EXP_C1 = _EXP_C
_EXP_LOG2E = _F32(float.fromhex("0x1.715476p+0"))
_EXP_LN2_HI = _F32(float.fromhex("0x1.62e4p-1"))
_EXP_LN2_LO = _F32(float.fromhex("0x1.7f7d1cp-20"))
_EXP_SHIFT = _F32(float.fromhex("0x1.8p23"))


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _expf(x):
    """float32 exp, < 2 ulp, branch-free so loops calling it vectorize (ggml's AVX2 ggml_v_expf).

    No "reassoc": ``(x*log2e + shift) - shift`` is the rounding to an integer and must stay.
    Overflows to inf above ~88.7, flushes to 0 below ~-104, exp(-inf) = 0.
    """
    z = x * _EXP_LOG2E + _EXP_SHIFT
    n = z - _EXP_SHIFT
    b = (x - n * _EXP_LN2_HI) - n * _EXP_LN2_LO
    e = _U32(_f32_as_u32(z) << _U32(23))
    k = _u32_as_f32(_U32(e + _U32(0x3F800000)))
    u = b * b
    j = ((_EXP_C5 * b + _EXP_C4) * u + (_EXP_C3 * b + _EXP_C2)) * u + _EXP_C1 * b
    res = k * j + k
    an = abs(n)
    big = an > _F32(126.0)
    # 2**n outside float32's normal range: split it over two factors s1 * s2. A vectorized loop computes
    # this for every lane and keeps it only where ``big``; elsewhere its factors are 1, not the bit
    # patterns of the formula: those were subnormal for small n (n = 1: s2 = 2**-126, s2 * j below it),
    # and every vector then took the CPU's microcode assist for subnormal results -- SwiGLU over 8 x 1536
    # values on a Xeon cost 3.6 ns a value, 0.5 ns after (the results are the same bits)
    g = _U32(0x82000000) if n <= _F32(0.0) else _U32(0)
    s1 = _u32_as_f32(_U32(g + _U32(0x7F000000))) if big else _F32(1.0)
    s2 = _u32_as_f32(_U32(e - g)) if big else _F32(1.0)
    split = s1 * s1 if an > _F32(192.0) else (s2 * j + s2) * s1
    return split if big else res


# ----------------------------------------------------------------------------- rmsnorm


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _sum_squares(x):
    s = 0.0
    for i in range(x.shape[0]):
        v = x[i]
        s += np.float64(v * v)
    return s


@njit(cache=True, error_model="numpy")
def _rmsnorm_row(x, weight, eps, out):
    # no fastmath here: with "reassoc" LLVM turns x*(1/sqrt(m)) into x/sqrt(m), a different rounding
    n = x.shape[0]
    mean = _F32(_sum_squares(x) / n)
    scale = _F32(1.0) / np.sqrt(mean + _F32(eps))
    for i in range(n):
        out[i] = x[i] * scale * weight[i]


@njit(cache=True, error_model="numpy", parallel=True)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] * (1/sqrt(mean(x[t]**2) + eps)) * weight; x, out f32 [T, dim], weight f32 [dim]."""
    T = x.shape[0]
    if T * x.shape[1] < _PAR_RMSNORM:
        for t in range(T):
            _rmsnorm_row(x[t], weight, eps, out[t])
    else:
        for t in prange(T):
            _rmsnorm_row(x[t], weight, eps, out[t])


def rmsnorm_ref(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    sq = (x * x).astype(np.float64)
    mean = (sq.sum(axis=1) / x.shape[1]).astype(np.float32)
    scale = _F32(1.0) / np.sqrt(mean + _F32(eps))
    return x * scale[:, None] * weight


# ----------------------------------------------------------------------------- rope


@njit(cache=True, error_model="numpy")
def _rope_cache_fill(freq_base, freq_scale, factors, mscale, cos, sin):
    half = cos.shape[1]
    theta_scale = _F32(freq_base) ** (_F32(-2.0) / _F32(2 * half))
    fs = _F32(freq_scale)
    ms = _F32(mscale)
    for p in range(cos.shape[0]):
        theta = _F32(p)
        for i in range(half):
            th = fs * (theta / factors[i])
            cos[p, i] = np.cos(th) * ms
            sin[p, i] = np.sin(th) * ms
            theta = theta * theta_scale


def _rope_factors(n_rot: int, factors: Sequence[float] | np.ndarray | None) -> np.ndarray:
    if n_rot <= 0 or n_rot % 2:
        raise ValueError(f"n_rot must be a positive even number, got {n_rot}")
    if factors is None:
        return np.ones(n_rot // 2, np.float32)  # x / 1.0f is x: the tables equal those without factors
    f = np.asarray(factors, np.float32)
    if f.shape != (n_rot // 2,):
        raise ValueError(f"expected {n_rot // 2} RoPE factors, got shape {f.shape}")
    return f


def rope_cache(n_ctx: int, n_rot: int, freq_base: float, freq_scale: float = 1.0,
               factors: Sequence[float] | np.ndarray | None = None,
               mscale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables f32 [n_ctx, n_rot//2] for ``rope``; entry [p, i] is the angle of pair i at position p.

    Mirrors ggml's ``ggml_rope_cache_init`` (ext_factor 0): theta is built by repeated float32
    multiplication, as ggml does, not as ``p * base**(-2i/n_rot)``. ``freq_scale`` is 1/(linear
    RoPE scaling factor); ``factors`` f32 [n_rot//2] are per-pair frequency factors (Llama 3.1's
    ``rope_freqs``, Phi-3's LongRoPE): pair i's angle is divided by factors[i]; ``mscale`` (ggml's
    attn_factor, Phi-3's LongRoPE scaling) multiplies cos and sin.
    """
    f = _rope_factors(n_rot, factors)
    cos = np.empty((n_ctx, n_rot // 2), np.float32)
    sin = np.empty((n_ctx, n_rot // 2), np.float32)
    _rope_cache_fill(float(freq_base), float(freq_scale), f, float(mscale), cos, sin)
    return cos, sin


def rope_cache_ref(n_ctx: int, n_rot: int, freq_base: float, freq_scale: float = 1.0,
                   factors: Sequence[float] | np.ndarray | None = None,
                   mscale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    f = _rope_factors(n_rot, factors)
    half = n_rot // 2
    theta_scale = np.float32(np.float64(_F32(freq_base)) ** np.float64(_F32(-2.0) / _F32(n_rot)))
    steps = np.full((n_ctx, half), theta_scale, np.float32)
    steps[:, 0] = np.arange(n_ctx, dtype=np.float32)
    theta = (np.multiply.accumulate(steps, axis=1, dtype=np.float32) / f) * _F32(freq_scale)
    th64 = theta.astype(np.float64)
    ms = _F32(mscale)
    return np.cos(th64).astype(np.float32) * ms, np.sin(th64).astype(np.float32) * ms


@njit(cache=True, error_model="numpy")
def _rope_head(x, cos, sin):
    for i in range(cos.shape[0]):
        x0 = x[2 * i]
        x1 = x[2 * i + 1]
        c = cos[i]
        s = sin[i]
        x[2 * i] = x0 * c - x1 * s
        x[2 * i + 1] = x0 * s + x1 * c


@njit(cache=True, error_model="numpy", parallel=True)
def rope(x, positions, cos, sin):
    """Rotary embedding in place, llama's consecutive-pair layout (GGML ROPE mode 0).

    x: f32 [T, n_heads, head_dim]; positions: i32 [T], each in 0..n_ctx-1 (not checked);
    cos, sin: f32 [n_ctx, n_rot//2] from ``rope_cache``. Pair (x[2i], x[2i+1]) of each head is
    rotated by the angle of pair i at the token's position; dims n_rot.. are left as they are.
    """
    T, H = x.shape[0], x.shape[1]
    if T * H * cos.shape[1] < _PAR_ROPE:
        for t in range(T):
            p = positions[t]
            for h in range(H):
                _rope_head(x[t, h], cos[p], sin[p])
    else:
        for th in prange(T * H):
            t = th // H
            p = positions[t]
            _rope_head(x[t, th - t * H], cos[p], sin[p])


def rope_ref(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    out = x.copy()
    n_rot = 2 * cos.shape[1]
    c = cos[positions][:, None, :]
    s = sin[positions][:, None, :]
    x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = x0 * c - x1 * s
    out[..., 1:n_rot:2] = x0 * s + x1 * c
    return out


@njit(cache=True, error_model="numpy")
def _rope_head_neox(x, cos, sin):
    half = cos.shape[0]
    for i in range(half):
        x0 = x[i]
        x1 = x[i + half]
        c = cos[i]
        s = sin[i]
        x[i] = x0 * c - x1 * s
        x[i + half] = x0 * s + x1 * c


@njit(cache=True, error_model="numpy", parallel=True)
def rope_neox(x, positions, cos, sin):
    """Rotary embedding in place, NEOX layout (GGML ROPE mode 2: Qwen, Gemma, Phi-3).

    As ``rope``, but pair i is (x[i], x[i + n_rot/2]): each head's first n_rot dims split in halves.
    """
    T, H = x.shape[0], x.shape[1]
    if T * H * cos.shape[1] < _PAR_ROPE:
        for t in range(T):
            p = positions[t]
            for h in range(H):
                _rope_head_neox(x[t, h], cos[p], sin[p])
    else:
        for th in prange(T * H):
            t = th // H
            p = positions[t]
            _rope_head_neox(x[t, th - t * H], cos[p], sin[p])


def rope_neox_ref(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    out = x.copy()
    half = cos.shape[1]
    c = cos[positions][:, None, :]
    s = sin[positions][:, None, :]
    x0, x1 = x[..., 0:half], x[..., half : 2 * half]
    out[..., 0:half] = x0 * c - x1 * s
    out[..., half : 2 * half] = x0 * s + x1 * c
    return out



# ----------------------------------------------------------------------------- swiglu, add


@njit(cache=True, error_model="numpy", fastmath={"contract", "nsz"})
def _swiglu_row(gate, up, out):
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (_F32(1.0) + _expf(-g)) * up[i]


@njit(cache=True, error_model="numpy", parallel=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, silu(x) = x/(1+exp(-x)); all f32 [T, n]."""
    T = gate.shape[0]
    if T * gate.shape[1] < _PAR_SWIGLU:
        for t in range(T):
            _swiglu_row(gate[t], up[t], out[t])
    else:
        for t in prange(T):
            _swiglu_row(gate[t], up[t], out[t])


def swiglu_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88.7 and silu(x) -> -0
        return gate / (_F32(1.0) + np.exp(-gate)) * up


_GELU_A = _F32(0.044715)
_SQRT_2_OVER_PI = _F32(0.79788456080286535587989211986876)


def _gelu_f16_table() -> np.ndarray:
    """ggml's ``ggml_table_gelu_f16``: F16 bits of gelu_tanh(x) for every F16 input x (65536 entries).

    ggml (GGML_GELU_FP16) rounds a GELU input to F16 and looks its value up here; computing the
    table the same way (float32 arithmetic, then round to F16) gives the same 16-bit results.
    """
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        inner = _SQRT_2_OVER_PI * x * (_F32(1.0) + _GELU_A * x * x)
        g = _F32(0.5) * x * (_F32(1.0) + np.tanh(inner.astype(np.float64)).astype(np.float32))
    return g.astype(np.float32).astype(np.float16).view(np.uint16)


GELU_F16_TABLE = _gelu_f16_table()


@njit(cache=True, error_model="numpy")
def _geglu_row(gate, up, table, out):
    for i in range(gate.shape[0]):
        g = gate[i]
        if g <= _F32(-10.0):
            out[i] = _F32(0.0)
        elif g >= _F32(10.0):
            out[i] = g * up[i]
        else:
            out[i] = _f16_decode(table[f32_to_f16_bits(g)]) * up[i]


@njit(cache=True, error_model="numpy", parallel=True)
def geglu(gate, up, table, out):
    """out = gelu_tanh(gate) * up as ggml's ``ggml_vec_geglu_f32``; all f32 [T, n], table GELU_F16_TABLE.

    Inputs in (-10, 10) are rounded to F16 and looked up; below, 0; above, the input itself.
    """
    T = gate.shape[0]
    if T * gate.shape[1] < _PAR_SWIGLU:
        for t in range(T):
            _geglu_row(gate[t], up[t], table, out[t])
    else:
        for t in prange(T):
            _geglu_row(gate[t], up[t], table, out[t])


def geglu_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    looked = GELU_F16_TABLE[gate.astype(np.float16).view(np.uint16)].view(np.float16).astype(np.float32)
    g = np.where(gate <= -10.0, _F32(0.0), np.where(gate >= 10.0, gate, looked))
    return (g * up).astype(np.float32)


@njit(cache=True, error_model="numpy")
def softcap(x, cap):
    """x = tanhf(x * (1/cap)) * cap in place, f32 [T, n] (Gemma 2's final logit soft-capping, as ggml)."""
    inv = _F32(1.0) / _F32(cap)
    c = _F32(cap)
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] = np.tanh(x[t, i] * inv) * c


def softcap_ref(x: np.ndarray, cap: float) -> np.ndarray:
    c = _F32(cap)
    return (np.tanh(x * (_F32(1.0) / c)) * c).astype(np.float32)


@njit(cache=True, error_model="numpy")
def _worse(x, a, b):
    """Whether id ``a`` ranks below id ``b``: a smaller value, or the same value and a higher id."""
    return x[a] < x[b] or (x[a] == x[b] and a > b)


@njit(cache=True, error_model="numpy")
def _sift_down(x, heap, n, i):
    """Restore the heap property of heap[:n] (the worst id at the root) below position ``i``."""
    while True:
        c = 2 * i + 1
        if c >= n:
            return
        if c + 1 < n and _worse(x, heap[c + 1], heap[c]):
            c += 1
        if not _worse(x, heap[c], heap[i]):
            return
        heap[i], heap[c] = heap[c], heap[i]
        i = c


# Values per block of top_k's first pass. Random logits, k = 40 / 20, a Xeon VM, us, one heap over every
# value -> blocks of 32 / 64 / 128 / 256: 49,152 values (SmolLM2) 38.9 / 35.8 -> 15.8 / 13.0, 13.4 / 9.5,
# 14.2 / 9.1, 18.1 / 10.1; 151,936 (Qwen2.5) 109.0 / 107.1 -> 36.4 / 32.8, 26.7 / 22.7, 23.3 / 18.6,
# 27.7 / 19.1. The sampler's whole draw (temperature 0.7, top-k 40, top-p 0.95) on SmolLM2's logits:
# 70.9 -> 46.7 us a token.
TOP_K_BLOCK = 64


@njit(cache=True, error_model="numpy")
def _heap_of_blocks(x, out, blocks, size):
    """out[:k] = the ids of the k = out.size largest values of x among blocks ``blocks`` (block b: ids
    b*size.. up to (b+1)*size, in increasing order), largest first, ties by lower id.

    A heap of the best k seen rejects almost every value with one comparison."""
    k = out.size
    n = x.size
    filled = 0
    worst = x[0]
    for s in range(blocks.size):
        b = blocks[s]
        for i in range(b * size, min(n, (b + 1) * size)):
            if filled < k:
                out[filled] = i
                filled += 1
                if filled == k:
                    for j in range(k // 2 - 1, -1, -1):
                        _sift_down(x, out, k, j)
                    worst = x[out[0]]  # kept in a register: the loop is one load and one compare per value
            elif x[i] > worst:  # an equal value ranks lower: its id is higher than every id held
                out[0] = i
                _sift_down(x, out, k, 0)
                worst = x[out[0]]
    for end in range(k - 1, 0, -1):  # pop the worst to the back: best first
        out[0], out[end] = out[end], out[0]
        _sift_down(x, out, end, 0)


@njit(cache=True, error_model="numpy")
def top_k(x, out):
    """out[:k] = the ids of the k = out.size <= x.size largest values of x f32 [n], largest first, ties by
    lower id.

    The sampler's top-k over a 49k-152k vocabulary, in two passes. The first takes each block of
    TOP_K_BLOCK values' max (a loop LLVM vectorizes): the k-th largest of those maxima, tau, is at most
    the k-th largest value (k blocks hold a value >= tau), so every one of the k largest values lies in
    a block whose max is >= tau. The heap then reads only those blocks, in order: the same ids as a heap
    over every value (numpy's argpartition took 550 us on 49,152 logits, Zen 4). Where k is not much
    smaller than the number of blocks, or a max is nan, the heap reads every block.
    """
    k = out.size
    if k == 0:
        return
    nb = (x.size + TOP_K_BLOCK - 1) // TOP_K_BLOCK
    if 4 * k <= nb:
        maxes = np.empty(nb, np.float32)
        for b in range(nb):
            maxes[b] = _row_max(x[b * TOP_K_BLOCK : (b + 1) * TOP_K_BLOCK])
        if not np.isnan(maxes).any():
            best = np.empty(k, np.int64)
            _heap_of_blocks(maxes, best, np.arange(nb), 1)
            tau = maxes[best[k - 1]]
            _heap_of_blocks(x, out, np.nonzero(maxes >= tau)[0], TOP_K_BLOCK)
            return
    _heap_of_blocks(x, out, np.arange(nb), TOP_K_BLOCK)


def top_k_ref(x: np.ndarray, k: int) -> np.ndarray:
    return np.lexsort((np.arange(x.size), -x.astype(np.float64)))[:k]


@njit(inline="always")
def _softmax_into(vals, n, temperature, out):
    """out[:n] = softmax(vals[:n] / temperature), in float64."""
    m = vals[0] / temperature
    for i in range(1, n):
        m = max(m, vals[i] / temperature)
    total = 0.0
    for i in range(n):
        out[i] = math.exp(vals[i] / temperature - m)
        total += out[i]
    for i in range(n):
        out[i] /= total


@njit(cache=True, error_model="numpy", nogil=True)
def candidate_probs(vals, top_p, min_p, temperature, probs):
    """probs[:keep] = the probabilities of the first ``keep`` candidates that top-p, then min-p keep, after
    the temperature; returns keep. vals: the candidates' logits f64 [n >= 1], largest first; probs f64
    [>= n], past keep scratch.

    The sampler's filters after top-k, in llama.cpp's order, in one call: as numpy calls (a softmax, a
    cumulative sum, a search, a count, a softmax again) they took ~13 us a sampled token, each a
    microsecond or two of dispatch on a few dozen values, and held the GIL that a server's event loop
    waits for.
    """
    keep = vals.size
    if top_p < 1.0:
        _softmax_into(vals, keep, 1.0, probs)
        total = 0.0
        for i in range(keep):
            total += probs[i]
            if total >= top_p:
                keep = i + 1
                break
    if min_p > 0.0:
        _softmax_into(vals, keep, 1.0, probs)
        floor = min_p * probs[0]
        count = 0
        for i in range(keep):
            if probs[i] >= floor:
                count += 1
        keep = max(1, count)
    _softmax_into(vals, keep, temperature, probs)
    return keep


def candidate_probs_ref(vals: np.ndarray, top_p: float, min_p: float, temperature: float) -> np.ndarray:
    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max())
        return e / e.sum()

    if top_p < 1.0:
        vals = vals[: int(np.searchsorted(np.cumsum(softmax(vals)), top_p) + 1)]
    if min_p > 0.0:
        p = softmax(vals)
        vals = vals[: max(1, int(np.count_nonzero(p >= min_p * p[0])))]
    return softmax(vals / temperature)


@njit(cache=True, error_model="numpy", nogil=True)
def draw(probs, u):
    """The index ``numpy.random.Generator.choice(probs.size, p=probs)`` draws when its uniform number is u:
    the first entry of the cumulative sums, each divided by the last, above u (``searchsorted``, side
    right). probs f64 [n >= 1] sum to 1; u in [0, 1)."""
    n = probs.size
    total = 0.0
    for i in range(n):
        total += probs[i]
    running = 0.0  # the same additions in the same order: the cumulative sums themselves
    for i in range(n):
        running += probs[i]
        if u < running / total:
            return i
    return n - 1


def draw_ref(probs: np.ndarray, u: float) -> int:
    cdf = probs.cumsum()
    cdf /= cdf[-1]
    return int(cdf.searchsorted(u, side="right"))


@njit(cache=True, error_model="numpy", parallel=True)
def add_inplace(x, y):
    """x += y (the residual add); x, y f32 [T, dim]."""
    T, n = x.shape
    if T * n < _PAR_ADD:
        for t in range(T):
            for i in range(n):
                x[t, i] += y[t, i]
    else:
        for t in prange(T):
            for i in range(n):
                x[t, i] += y[t, i]


def add_inplace_ref(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x + y


# ----------------------------------------------------------------------------- softmax over logits


@njit(cache=True, error_model="numpy")
def _sortable_key(x):
    # float32 bits as an int32 that orders like the float: LLVM vectorizes an integer max
    # reduction but not a float one (a float max loop ran 20x slower than this)
    b = np.int32(_f32_as_u32(x))
    return np.int32(b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@njit(cache=True, error_model="numpy")
def _row_max(x):
    """max(x) of a float32 row; -inf for an all -inf row, nan if any element is nan."""
    best = np.int32(-(2**31))
    for i in range(x.shape[0]):
        best = max(best, _sortable_key(x[i]))
    b = np.int32(best ^ ((best >> np.int32(31)) & np.int32(0x7FFFFFFF)))
    return _u32_as_f32(np.uint32(b))


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _sum_exp(x, mx):
    """sum(exp(x - mx)) in float64, from float32 partial sums of 64 (as ggml's sums of 8)."""
    n = x.shape[0]
    n_blocks = n - n % 64
    total = 0.0
    for i0 in range(0, n_blocks, 64):
        s = _F32(0.0)
        for k in range(64):
            s += _expf(x[i0 + k] - mx)
        total += np.float64(s)
    for i in range(n_blocks, n):
        total += np.float64(_expf(x[i] - mx))
    return total


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _softmax_row(x, out):
    mx = _row_max(x)
    inv = _F32(1.0 / _sum_exp(x, mx))
    for i in range(x.shape[0]):
        out[i] = _expf(x[i] - mx) * inv


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _log_softmax_row(x, out):
    mx = _row_max(x)
    lse = _F32(math.log(_sum_exp(x, mx)))
    for i in range(x.shape[0]):
        out[i] = (x[i] - mx) - lse


@njit(cache=True, error_model="numpy", parallel=True)
def softmax(x, out):
    """Row-wise softmax of logits f32 [T, vocab] (max-subtracted, float64 sum); -inf logits get 0."""
    T = x.shape[0]
    if T == 1 or T * x.shape[1] < _PAR_SOFTMAX:
        for t in range(T):
            _softmax_row(x[t], out[t])
    else:
        for t in prange(T):
            _softmax_row(x[t], out[t])


@njit(cache=True, error_model="numpy", parallel=True)
def log_softmax(x, out):
    """Row-wise log-softmax of logits f32 [T, vocab]: x - max - log(sum(exp(x - max)))."""
    T = x.shape[0]
    if T == 1 or T * x.shape[1] < _PAR_SOFTMAX:
        for t in range(T):
            _log_softmax_row(x[t], out[t])
    else:
        for t in prange(T):
            _log_softmax_row(x[t], out[t])


def softmax_ref(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def log_softmax_ref(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    z = x64 - x64.max(axis=1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)


# ----------------------------------------------------------------------------- 32-element block reductions
# numba's pipeline fully unrolls a 32-iteration reduction and LLVM then leaves it scalar (31 compares and
# moves); ``block32_absmax`` and ``block32_sum_i8`` load a block as one vector and reduce it with LLVM's
# reduction intrinsics when the row's elements are adjacent (every caller's rows are: views of whole rows
# or of their first columns), and take the plain loop otherwise.


def _block_pointer(context, builder, aryty, ary, t, j0, elem: ir.Type, n: int) -> ir.Value:
    a = context.make_array(aryty)(context, builder, ary)
    ptr = cgutils.get_item_pointer2(context, builder, a.data, cgutils.unpack_tuple(builder, a.shape, 2),
                                    cgutils.unpack_tuple(builder, a.strides, 2), aryty.layout, [t, j0])
    return builder.bitcast(ptr, ir.VectorType(elem, n).as_pointer())


def _reduce(builder, name: str, v: ir.Value) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v.type.element, [v.type]),
                                        f"llvm.vector.reduce.{name}.v{v.type.count}i{v.type.element.width}")
    return builder.call(fn, [v])


@intrinsic
def _vector_absmax_bits(typingctx, x, t, j0):
    """The largest |x[t, j0:j0+32]|'s bit pattern (uint32), the 32 floats read as one vector."""
    if not (isinstance(x, types.Array) and x.ndim == 2 and x.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        p = _block_pointer(context, builder, sig.args[0], args[0], args[1], args[2], i32, 32)
        v = builder.and_(builder.load(p, align=4), ir.Constant(ir.VectorType(i32, 32), [0x7FFFFFFF] * 32))
        return _reduce(builder, "umax", v)

    return types.uint32(x, t, j0), codegen


@intrinsic
def _vector_sum_i8(typingctx, q, t, j0):
    """sum(q[t, j0:j0+32]) of int8 values as int32, the 32 bytes read as one vector."""
    if not (isinstance(q, types.Array) and q.ndim == 2 and q.dtype == types.int8):
        return None

    def codegen(context, builder, sig, args):
        p = _block_pointer(context, builder, sig.args[0], args[0], args[1], args[2], ir.IntType(8), 32)
        v = builder.sext(builder.load(p, align=1), ir.VectorType(ir.IntType(32), 32))
        return _reduce(builder, "add", v)

    return types.int32(q, t, j0), codegen


@njit(inline="always")
def block32_absmax(x, t, j0):
    """The largest |x[t, j0:j0+32]| of float32 x [T, n], taken on the bit patterns (for floats that are
    not NaN, |x| and its bits order the same way): an integer maximum, which vectorizes."""
    if x.strides[1] == x.itemsize:
        return _u32_as_f32(_vector_absmax_bits(x, t, j0))
    bits = np.uint32(0)
    for j in range(32):
        bits = max(bits, _f32_as_u32(x[t, j0 + j]) & np.uint32(0x7FFFFFFF))
    return _u32_as_f32(bits)


@njit(inline="always")
def block32_sum_i8(q, t, j0):
    """sum(q[t, j0:j0+32]) of int8 q [T, n], as int32."""
    if q.strides[1] == 1:
        return _vector_sum_i8(q, t, j0)
    s = np.int32(0)
    for j in range(32):
        s = np.int32(s + np.int32(q[t, j0 + j]))
    return s
