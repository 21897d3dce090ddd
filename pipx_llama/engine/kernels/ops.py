"""Non-matmul kernels of the LLaMA forward pass, each with a numpy reference twin (suffix ``_ref``).

Kernels write into preallocated outputs (or work in place) and follow llama.cpp's CPU backend
(ggml-cpu ``ops.cpp``/``vec.cpp``) closely enough that our logits track llama.cpp's:

- ``rmsnorm``: sum of float32 squares accumulated in float64, ``scale = 1/sqrtf(mean + eps)`` in
  float32, ``out = x*scale*weight`` -- ggml's ``rms_norm`` fused with ``mul``.
- ``rope``: GGML_ROPE_TYPE_NORMAL (consecutive pairs) from ``rope_cache`` tables that mirror
  ``ggml_rope_cache_init`` with ``ext_factor == 0``: ``theta_scale = powf(base, -2.0f/n_rot)``,
  ``theta`` starts at ``(float) pos`` and is multiplied by ``theta_scale`` pair after pair in float32,
  then ``cosf(freq_scale*theta)``/``sinf(...)``.
- ``attention``: llama.cpp's non-flash path (the default of llama-cpp-python, which made our golden
  data): ``kq = K·q``, ``softmax(kq*scale + mask)`` with a float64 sum, ``kqv = V·p``. With an F16
  KV cache ggml converts the float32 operand of each F16 matmul to F16 first, so q and the softmax
  probabilities are rounded to F16 too; ``attention`` does the same when the cache is F16.
- ``swiglu``: ``silu(g)*u`` with ``silu(x) = x/(1+expf(-x))``.

Exponentials use ``_expf``, a port of ggml's AVX2 ``ggml_v_expf`` (error < 2 ulp) written so LLVM
vectorizes it; a libm ``expf`` call per element is about eight times slower here.

Numba cannot type float16 arrays, so the kernels take an F16 cache as ``uint16`` holding the F16
bits; the Python wrapper ``attention`` accepts ``float16`` arrays and views them. F16->F32 uses the
CPU's conversion instruction where numba targets F16C (``HAVE_F16C``), else integer arithmetic;
F32->F16 likewise, the integer routine being :mod:`pipx_llama.formats.fp16`'s (round to nearest
even; NaN as the hardware does it, so both give the same bits). All of them are exact.

A q8_0 KV cache (``--cache-type-k/-v q8_0``) holds each KV head of each position as ggml's
``block_q8_0`` rows (fp16 scale + 32 int8 per 32 values) in a ``uint8`` array [R, n_kv_heads,
head_dim/32*34]; attention reads it directly as llama.cpp does with such a cache: K·q with q quantized
to q8_0 (ggml's vec_dot_type of q8_0), per-block integer sums times both scales, and V dequantized
row by row and accumulated in float32 with unrounded probabilities (llama.cpp requires flash
attention for a quantized V cache, whose V accumulation is float32 too).

Small batches run serially: each ``prange`` region costs about a microsecond of thread wake-up,
more than the whole op for one token of a small model. Every kernel picks serial or parallel
from its work size, so one compiled function serves both decoding and prompt processing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

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
    if an > _F32(126.0):
        # 2**n is outside float32's normal range: split it over two factors
        g = _U32(0)
        if n <= _F32(0.0):
            g = _U32(0x82000000)
        s1 = _u32_as_f32(_U32(g + _U32(0x7F000000)))
        s2 = _u32_as_f32(_U32(e - g))
        res = (s2 * j + s2) * s1
        if an > _F32(192.0):
            res = s1 * s1
    return res


# ----------------------------------------------------------------------------- KV element access


def _kv_to_f32(v):
    """A KV-cache element as float32 (typed per cache dtype inside njit code)."""
    raise NotImplementedError


def _kv_round(x, cache):
    """``x`` rounded to the precision of ``cache``'s dtype, as float32."""
    raise NotImplementedError


@overload(_kv_to_f32)
def _ov_kv_to_f32(v):
    if v == types.float32:
        return lambda v: v
    if v == types.uint16:
        return lambda v: _f16_decode(v)
    raise TypingError(f"KV cache elements must be float32 or uint16 (F16 bits), got {v}")


@overload(_kv_round)
def _ov_kv_round(x, cache):
    if cache.dtype in (types.float32, types.uint8):  # uint8: q8_0, whose readers take float32 operands
        return lambda x, cache: x
    if cache.dtype == types.uint16:
        return lambda x, cache: _f16_decode(f32_to_f16_bits(x))
    raise TypingError(f"KV cache must be float32 or uint16 (F16 bits), got {cache.dtype}")


# ----------------------------------------------------------------------------- q8_0 KV rows

Q8_BLOCK_BYTES = 34  # ggml block_q8_0: fp16 d, 32 int8


def kv_row_bytes(head_dim: int, cache_type: str) -> int:
    """Elements (f16) or bytes (q8_0) of one KV head of one position in a cache of ``cache_type``."""
    return head_dim // 32 * Q8_BLOCK_BYTES if cache_type == "q8_0" else head_dim


@njit(inline="always")
def _q8_round(v):
    """C's roundf(v) as an int8 value (ties away from zero), saturating at +-127; NaN as 0."""
    t = np.trunc(v)
    if abs(v - t) >= _F32(0.5):
        t += _F32(1.0) if v > 0 else _F32(-1.0)
    if np.isnan(t):
        return np.int8(0)
    return np.int8(min(max(t, _F32(-127.0)), _F32(127.0)))


@njit(inline="always")
def _q8_d(row, o):
    """The fp16 scale of the block_q8_0 at row[o:] as float32."""
    return _f16_decode(np.uint16(np.uint16(row[o]) | (np.uint16(row[o + 1]) << np.uint16(8))))


@njit(cache=True, error_model="numpy")
def q8_0_store_row(src, dst):
    """src f32 [D] -> dst uint8 [D/32*34], ggml's quantize_row_q8_0_ref (d = amax/127 stored as fp16)."""
    for b in range(src.shape[0] // 32):
        amax = _F32(0.0)
        for j in range(32):
            amax = max(amax, abs(src[32 * b + j]))
        dv = amax / _F32(127.0)
        inv = _F32(1.0) / dv if dv != _F32(0.0) else _F32(0.0)
        bits = f32_to_f16_bits(dv)
        o = Q8_BLOCK_BYTES * b
        dst[o] = np.uint8(bits & 0xFF)
        dst[o + 1] = np.uint8(bits >> 8)
        for j in range(32):
            dst[o + 2 + j] = np.uint8(np.int32(_q8_round(src[32 * b + j] * inv)) & 0xFF)


@njit(cache=True)
def q8_0_load_row(src, dst):
    """src uint8 [D/32*34] -> dst f32 [D]: d * q, as ggml's dequantize_row_q8_0."""
    for b in range(dst.shape[0] // 32):
        o = Q8_BLOCK_BYTES * b
        d = _q8_d(src, o)
        for j in range(32):
            dst[32 * b + j] = _F32(np.int8(src[o + 2 + j])) * d


def q8_0_store_row_ref(src: np.ndarray) -> np.ndarray:
    """Twin of ``q8_0_store_row``."""
    x = src.astype(np.float32).reshape(-1, 32)
    d = (np.abs(x).max(axis=1) / _F32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1.0) / d, _F32(0.0)).astype(np.float32)
    v = (x * inv[:, None]).astype(np.float32)
    t = np.trunc(v)
    t = np.where(np.abs(v - t) >= _F32(0.5), t + np.sign(v), t)  # roundf: ties away from zero
    q = np.clip(np.nan_to_num(t), -127, 127).astype(np.int8)
    out = np.empty((x.shape[0], Q8_BLOCK_BYTES), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(-1)


def q8_0_load_ref(rows: np.ndarray) -> np.ndarray:
    """uint8 [..., D/32*34] q8_0 rows -> float32 [..., D]."""
    b = rows.reshape(rows.shape[:-1] + (-1, Q8_BLOCK_BYTES))
    d = b[..., :2].copy().view(np.float16).astype(np.float32)
    q = b[..., 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(rows.shape[:-1] + (-1,))


def kv_store(row, src):
    """One KV head's values ``src`` f32 [D] into a cache row (F16 bits, float32 or q8_0 blocks)."""
    raise NotImplementedError


@overload(kv_store)
def _ov_kv_store(row, src):
    if row.dtype == types.uint8:
        return lambda row, src: q8_0_store_row(src, row)
    if row.dtype == types.uint16:
        def f16(row, src):
            for d in range(src.shape[0]):
                row[d] = f32_to_f16_bits(src[d])
        return f16
    if row.dtype == types.float32:
        def f32(row, src):
            for d in range(src.shape[0]):
                row[d] = src[d]
        return f32
    raise TypingError(f"KV cache must be float32, uint16 (F16 bits) or uint8 (q8_0), got {row.dtype}")


@njit(cache=True)
def kv_store_rows(cache, slots, src):
    """cache[slots[t], h] = src[t, h] for every token t and KV head h (any cache type)."""
    for t in range(src.shape[0]):
        for h in range(src.shape[1]):
            kv_store(cache[slots[t], h], src[t, h])


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


# ----------------------------------------------------------------------------- attention


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _scores(qr, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale):
    """scores[off + j] for cache rows s0..s0+cnt-1; returns their max. ``cap`` > 0 soft-caps as ggml:
    tanhf(s * (1/cap)) * cap, before the scale."""
    D = qr.shape[0]
    mx = -np.inf
    for j in range(cnt):
        s = _F32(0.0)
        for d in range(D):
            s += qr[d] * _kv_to_f32(k_cache[s0 + j, kvh, d])
        if cap > _F32(0.0):
            s = np.tanh(s * inv_cap) * cap
        s = s * kq_scale
        scores[off + j] = s
        mx = max(mx, s)
    return mx


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _accumulate(scores, off, v_cache, kvh, s0, cnt, acc):
    """acc += sum_j scores[off + j] * V[s0 + j] (four rows per pass over acc: acc lives in memory, and
    one row per pass makes the loop wait on acc's store->load round trip)."""
    D = acc.shape[0]
    j = 0
    while j + 4 <= cnt:
        p0, p1, p2, p3 = scores[off + j], scores[off + j + 1], scores[off + j + 2], scores[off + j + 3]
        r = s0 + j
        for d in range(D):
            acc[d] += ((p0 * _kv_to_f32(v_cache[r, kvh, d]) + p1 * _kv_to_f32(v_cache[r + 1, kvh, d]))
                       + (p2 * _kv_to_f32(v_cache[r + 2, kvh, d]) + p3 * _kv_to_f32(v_cache[r + 3, kvh, d])))
        j += 4
    while j < cnt:
        p = scores[off + j]
        for d in range(D):
            acc[d] += p * _kv_to_f32(v_cache[s0 + j, kvh, d])
        j += 1


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _scores_q8(qr, qd, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale):
    """``_scores`` for a q8_0 K cache: qr holds q's q8_0 integers (as float32), qd its block scales.

    Each block's products are integers summed in float32: exact (|sum| <= 32*127*127 < 2**24) in any
    order, so the loop vectorizes; the block sum times d_k*d_q then adds up as ggml's vec_dot_q8_0_q8_0.
    """
    D = qr.shape[0]
    nb = D // 32
    mx = -np.inf
    for j in range(cnt):
        row = k_cache[s0 + j, kvh]
        s = _F32(0.0)
        for b in range(nb):
            o = Q8_BLOCK_BYTES * b
            isum = _F32(0.0)
            for e in range(32):
                isum += qr[32 * b + e] * _F32(np.int8(row[o + 2 + e]))
            s += isum * (_q8_d(row, o) * qd[b])
        if cap > _F32(0.0):
            s = np.tanh(s * inv_cap) * cap
        s = s * kq_scale
        scores[off + j] = s
        mx = max(mx, s)
    return mx


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _accumulate_q8(scores, off, v_cache, kvh, s0, cnt, acc):
    """acc += sum_j scores[off + j] * dequantize(V[s0 + j]) for a q8_0 V cache."""
    nb = acc.shape[0] // 32
    for j in range(cnt):
        p = scores[off + j]
        row = v_cache[s0 + j, kvh]
        for b in range(nb):
            o = Q8_BLOCK_BYTES * b
            d = _q8_d(row, o)
            for e in range(32):
                acc[32 * b + e] += (_F32(np.int8(row[o + 2 + e])) * d) * p


@njit(cache=True, error_model="numpy")
def _quantize_q(qr, qd):
    """q (already scaled) into q8_0 in place: qr[j] = its int8 value, qd[b] = the block's fp16 scale."""
    for b in range(qr.shape[0] // 32):
        amax = _F32(0.0)
        for j in range(32):
            amax = max(amax, abs(qr[32 * b + j]))
        dv = amax / _F32(127.0)
        inv = _F32(1.0) / dv if dv != _F32(0.0) else _F32(0.0)
        for j in range(32):
            qr[32 * b + j] = _F32(_q8_round(qr[32 * b + j] * inv))
        qd[b] = _f16_decode(f32_to_f16_bits(dv))


def _k_scores(qr, qd, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale):
    """Scores of q against K rows, whatever the cache type (qd: q's q8_0 scales, for a q8_0 cache)."""
    raise NotImplementedError


@overload(_k_scores)
def _ov_k_scores(qr, qd, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale):
    if k_cache.dtype == types.uint8:
        return lambda qr, qd, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale: _scores_q8(
            qr, qd, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale)
    return lambda qr, qd, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale: _scores(
        qr, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale)


def _k_prepare(qr, qd, k_cache):
    """q for the K rows' dot products: already rounded for F16/F32 caches, quantized for q8_0."""
    raise NotImplementedError


@overload(_k_prepare)
def _ov_k_prepare(qr, qd, k_cache):
    if k_cache.dtype == types.uint8:
        return lambda qr, qd, k_cache: _quantize_q(qr, qd)
    return lambda qr, qd, k_cache: None


def _v_accumulate(scores, off, v_cache, kvh, s0, cnt, acc):
    raise NotImplementedError


@overload(_v_accumulate)
def _ov_v_accumulate(scores, off, v_cache, kvh, s0, cnt, acc):
    if v_cache.dtype == types.uint8:
        return lambda scores, off, v_cache, kvh, s0, cnt, acc: _accumulate_q8(scores, off, v_cache, kvh, s0, cnt, acc)
    return lambda scores, off, v_cache, kvh, s0, cnt, acc: _accumulate(scores, off, v_cache, kvh, s0, cnt, acc)


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _attend(q, k_cache, v_cache, kvh, lo, n_pos, q_scale, kq_scale, cap, work, out):
    """One (token, head) over cache positions lo..n_pos-1: out = softmax(score) · V.

    score = K · f16(q * q_scale), soft-capped at ``cap`` (0: none), times ``kq_scale``. A cache of R
    rows holds position p in row p % R (a ring for sliding-window layers; R = n_ctx otherwise, where
    that is just p). work: f32 [>= n_pos - lo + 2*D].
    """
    D = q.shape[0]
    R = k_cache.shape[0]
    n = n_pos - lo
    s0 = lo % R
    c1 = min(n, R - s0)  # rows s0.. then, after the ring wraps, rows 0..
    scores = work[:n]
    qr = work[n : n + D]
    acc = work[n + D : n + 2 * D]
    inv_cap = _F32(1.0) / cap if cap > _F32(0.0) else _F32(0.0)
    for d in range(D):
        qr[d] = _kv_round(q[d] * q_scale, k_cache)
    qd = acc[: D // 32]  # q's q8_0 scales (q8_0 K cache only); acc is not in use yet
    _k_prepare(qr, qd, k_cache)
    mx = _k_scores(qr, qd, k_cache, kvh, s0, c1, scores, 0, inv_cap, cap, kq_scale)
    if n > c1:
        mx = max(mx, _k_scores(qr, qd, k_cache, kvh, 0, n - c1, scores, c1, inv_cap, cap, kq_scale))
    mx32 = _F32(mx)
    total = 0.0
    for j in range(n):
        e = _expf(scores[j] - mx32)
        scores[j] = e
        total += np.float64(e)
    inv = _F32(1.0 / total)
    for d in range(D):
        acc[d] = _F32(0.0)
    for j in range(n):
        scores[j] = _kv_round(scores[j] * inv, v_cache)
    _v_accumulate(scores, 0, v_cache, kvh, s0, c1, acc)
    if n > c1:
        _v_accumulate(scores, c1, v_cache, kvh, 0, n - c1, acc)
    for d in range(D):
        out[d] = acc[d]


@njit(inline="always")
def window_start(p, window):
    """First position that position p attends to: all before it, or the last ``window`` (itself included)."""
    return max(0, p - window + 1) if window > 0 else 0


@njit(cache=True, error_model="numpy", parallel=True)
def attention_kernel(q, k_cache, v_cache, start_pos, window, q_scale, kq_scale, cap, out, scratch):
    """Causal GQA attention; see ``attention``. K/V caches f32 or uint16 (F16 bits), [R, n_kv_heads, D].

    The scales are arguments because computed here LLVM would fold ``s * (1/r)`` into ``s / r``, a
    different rounding. scratch: f32 [n_chunks, >= positions attended + 2*head_dim]; (token, head)
    pairs are dealt to the chunks round-robin (causal rows differ in length, so this balances them)
    and the chunks run in parallel. The result does not depend on n_chunks.
    """
    T, H, D = q.shape
    group = H // k_cache.shape[1]
    n_pairs = T * H
    n_chunks = scratch.shape[0]
    if n_chunks == 1 or n_pairs * (start_pos + T) * D < _PAR_ATTENTION:
        for pair in range(n_pairs):
            t = pair // H
            h = pair - t * H
            p = start_pos + t
            _attend(q[t, h], k_cache, v_cache, h // group, window_start(p, window), p + 1, q_scale, kq_scale, cap,
                    scratch[0], out[t, h])
    else:
        for c in prange(n_chunks):
            for pair in range(c, n_pairs, n_chunks):
                t = pair // H
                h = pair - t * H
                p = start_pos + t
                _attend(q[t, h], k_cache, v_cache, h // group, window_start(p, window), p + 1, q_scale, kq_scale,
                        cap, scratch[c], out[t, h])


def attention_scratch(n_positions: int, head_dim: int, n_chunks: int | None = None) -> np.ndarray:
    """Scratch for ``attention_kernel`` covering up to ``n_positions`` cache positions."""
    if n_chunks is None:
        n_chunks = numba.get_num_threads()
    return np.empty((max(1, n_chunks), n_positions + 2 * head_dim), np.float32)


def attention_scale(head_dim: int) -> np.float32:
    """1.0f/sqrtf(head_dim), in float32 as llama.cpp computes ``kq_scale``."""
    return _F32(1.0) / np.sqrt(_F32(head_dim))


def _as_kernel_cache(cache: np.ndarray) -> np.ndarray:
    if cache.dtype == np.float16:
        return cache.view(np.uint16)
    if cache.dtype in (np.float32, np.uint16, np.uint8):
        return cache
    raise TypeError(f"KV cache dtype must be float16, float32 or uint8 (q8_0 blocks), got {cache.dtype}")


def _cache_head_dim(cache: np.ndarray) -> int:
    return cache.shape[2] // Q8_BLOCK_BYTES * 32 if cache.dtype == np.uint8 else cache.shape[2]


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start_pos: int, out: np.ndarray,
              scratch: np.ndarray | None = None, *, window: int = 0, q_scale: float = 1.0,
              kq_scale: float | None = None, softcap: float = 0.0) -> None:
    """Causal grouped-query attention for a batch of T new tokens, written into ``out``.

    q, out: f32 [T, n_heads, head_dim]; k_cache, v_cache: [R, n_kv_heads, head_dim] float32 or
    float16 (uint16 is taken as F16 bits), or uint8 [R, n_kv_heads, head_dim/32*34] q8_0 rows
    (each cache its own type), already holding the batch's own keys/values; position p
    is in row p % R (R = n_ctx for a plain cache, a ring of R rows for a sliding-window layer).
    Token t sits at position start_pos+t and attends to positions window_start..start_pos+t; head
    h reads KV head h // (n_heads // n_kv_heads). Scores are K · f16(q * q_scale), soft-capped at
    ``softcap`` (0: none), times ``kq_scale`` (default 1/sqrt(head_dim)). With an F16 cache, q
    and the softmax probabilities are rounded to F16 before their dot products, as llama.cpp's F16
    matmuls do. ``scratch`` (from ``attention_scratch``) is allocated per call when omitted.
    """
    T, H, D = q.shape
    rows, kvh = k_cache.shape[0], k_cache.shape[1]
    if (out.shape != q.shape or k_cache.shape[:2] != v_cache.shape[:2] or _cache_head_dim(k_cache) != D
            or _cache_head_dim(v_cache) != D
            or kvh == 0 or H % kvh or start_pos < 0 or window < 0):
        raise ValueError(f"attention: q {q.shape}, out {out.shape}, k {k_cache.shape}, v {v_cache.shape}, "
                         f"start_pos {start_pos}, window {window} do not fit together")
    span = start_pos + T - _window_start(start_pos, window)  # positions the batch reads, all held at once
    if span > rows:
        raise ValueError(f"attention: {rows} cache rows cannot hold the {span} positions this batch attends to")
    if scratch is None:
        scratch = attention_scratch(span, D)
    elif scratch.shape[1] < span + 2 * D:
        raise ValueError(f"attention: scratch rows of {scratch.shape[1]} < {span + 2 * D} needed")
    kq = attention_scale(D) if kq_scale is None else _F32(kq_scale)
    attention_kernel(q, _as_kernel_cache(k_cache), _as_kernel_cache(v_cache), start_pos, window, _F32(q_scale), kq,
                     _F32(softcap), out, scratch)


def _window_start(p: int, window: int) -> int:
    return max(0, p - window + 1) if window > 0 else 0


def attention_ref(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start_pos: int, *, window: int = 0,
                  q_scale: float = 1.0, kq_scale: float | None = None, softcap: float = 0.0) -> np.ndarray:
    """Twin of ``attention``: same roundings (F16 q and probabilities for an F16 cache, q8_0 q for q8_0 K)."""
    T, H, D = q.shape
    f16 = k_cache.dtype in (np.float16, np.uint16)
    f16_v = v_cache.dtype in (np.float16, np.uint16)
    q8_k = k_cache.dtype == np.uint8
    kc = k_cache.view(np.float16) if k_cache.dtype == np.uint16 else k_cache
    vc = v_cache.view(np.float16) if v_cache.dtype == np.uint16 else v_cache
    if q8_k:
        kc = q8_0_load_ref(kc)
    if v_cache.dtype == np.uint8:
        vc = q8_0_load_ref(vc)
    rows = kc.shape[0]
    group = H // kc.shape[1]
    scale = attention_scale(D) if kq_scale is None else _F32(kq_scale)
    out = np.empty((T, H, D), np.float32)
    for t in range(T):
        p = start_pos + t
        slots = np.arange(_window_start(p, window), p + 1) % rows
        for h in range(H):
            k = kc[slots, h // group].astype(np.float32)
            v = vc[slots, h // group].astype(np.float32)
            qh = (q[t, h] * _F32(q_scale)).astype(np.float32)
            if f16:
                qh = qh.astype(np.float16).astype(np.float32)
            if q8_k:  # q as q8_0 blocks, block sums times both scales
                qb = q8_0_store_row_ref(qh).reshape(-1, Q8_BLOCK_BYTES)
                qi = qb[:, 2:].view(np.int8).astype(np.float64)
                qd = qb[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
                kb = k_cache[slots, h // group].reshape(len(slots), -1, Q8_BLOCK_BYTES)
                ki = kb[..., 2:].view(np.int8).astype(np.float64)
                kd = kb[..., :2].copy().view(np.float16).astype(np.float64)[..., 0]
                s = (((ki * qi).sum(axis=2)) * (kd * qd)).sum(axis=1).astype(np.float32)
            else:
                s = (k @ qh).astype(np.float32)
            if softcap > 0:
                s = (np.tanh(s * (_F32(1.0) / _F32(softcap))) * _F32(softcap)).astype(np.float32)
            s = s * scale
            e = np.exp(s - s.max())
            pr = e * _F32(1.0 / e.astype(np.float64).sum())
            if f16_v:
                pr = pr.astype(np.float16).astype(np.float32)
            out[t, h] = pr @ v
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
