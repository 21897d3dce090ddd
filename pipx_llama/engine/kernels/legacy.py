"""numba kernels for ggml's legacy block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.

A matmul quantizes the activations the way ggml's CPU backend does (Q8_0 for Q4_0/Q5_0/Q8_0
weights, Q8_1 for Q4_1/Q5_1; ``quantize_row_q8_*_ref``), takes an exact integer dot product per
32-element block and scales it in float32 by ``d_w * d_x`` (plus ``m_w * s_x`` for the ``_1``
types), as ``ggml_vec_dot_*_q8_*`` does. numpy twins: :mod:`pipx_llama.formats.legacy`.

Two shapes of work:

- few tokens (``T < TILE_MIN_TOKENS``, generation): each thread takes whole rows; per block one
  vectorized integer reduction. Its trip count comes from the row layout at run time, which keeps
  LLVM from unrolling it into scalar code (numba does not run LLVM's SLP vectorizer).
- many tokens (prompt processing): tiles of rows x tokens. Each weight block is decoded once into
  small integers and multiplied into a whole run of tokens, with the activations transposed so
  tokens are the SIMD lanes.

Integer sums are kept in int16 where they provably fit (the final value, not just the partial
sums, since int16 arithmetic wraps): a Q4 block sum is at most 32*8*127 = 32512 once the nibbles
are centred on zero (``q - 8``; Q4_1 adds ``8 * sum(qs_x)`` back), a Q5 half block at most
16*16*127 = 32512 (``q - 16``; Q5_1 adds ``16 * sum(qs_x)``). Q8_0 sums in int32. numba types
small-integer arithmetic as int64, so every intermediate is cast back; LLVM then narrows the
vector code (see NUMBA-NOTES).

Each output is summed by one thread, block after block in the same float32 order on both paths,
so a token's result is the same bits whatever the thread count and whether it is computed alone
(generation) or with others (prompt processing).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from pipx_llama.engine.kernels import register
from pipx_llama.engine.kernels.ops import block32_absmax, block32_sum_i8
from pipx_llama.formats import legacy as fmt
from pipx_llama.formats.fp16 import FP16_TABLE, fp32_bits_to_fp16_bits

QK = 32
# From this many tokens on, the tiled kernel wins over one reduction per block and token.
TILE_MIN_TOKENS = 16
_TILE_ROWS = 8
_TILE_TOKENS = 256
# Token runs are padded with zero activations to a multiple of this, so the vectorized loops over
# tokens run whole vector iterations instead of their scalar remainder.
_TILE_PAD = 32

# Block sizes in bytes as compile-time constants: with the block stride a run-time value LLVM's
# code for the per-block reductions was three times slower.
_BS_Q4_0 = fmt.Q4_0.type_size
_BS_Q4_1 = fmt.Q4_1.type_size
_BS_Q5_0 = fmt.Q5_0.type_size
_BS_Q5_1 = fmt.Q5_1.type_size
_BS_Q8_0 = fmt.Q8_0.type_size

i16 = np.int16
i32 = np.int32
f32 = np.float32

_BIT16 = np.array([1 << j for j in range(16)], dtype=np.uint16)

# Fused multiply-adds, but no reassociation: every float sum here is a fixed sequence (the SIMD
# lanes are rows or tokens, never a float reduction), so one token's output is the same bits
# whether it is computed alone or in a batch, and whatever the thread count.
_FASTMATH = {"contract"}


# --- block fields -------------------------------------------------------------------------------


@njit(inline="always")
def _half(w: np.ndarray, r: int, o: int, table: np.ndarray) -> np.float32:
    """The fp16 stored little-endian at w[r, o:o+2], as float32."""
    return table[np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8)]


@njit(inline="always")
def _qh(w: np.ndarray, r: int, o: int) -> int:
    """The little-endian uint32 of fifth bits at w[r, o:o+4] (bit j belongs to element j)."""
    return (np.int64(w[r, o]) | (np.int64(w[r, o + 1]) << 8) | (np.int64(w[r, o + 2]) << 16)
            | (np.int64(w[r, o + 3]) << 24))


# --- activation quantizers (bit-identical to formats.legacy.quantize_row_q8_0 / _q8_1) -------------


@njit(inline="always")
def _q8(v: np.float32) -> np.int8:
    """C's roundf(v) as int8, saturating at +-127 and sending NaN to 0 (both undefined in C).

    Selects only, no branches, so the block's loop vectorizes (8 x 1536 activations: 20 -> 14 us).
    """
    t = np.trunc(v)
    step = f32(1.0) if v > f32(0.0) else f32(-1.0)
    t = t + step if abs(v - t) >= f32(0.5) else t
    t = t if t == t else f32(0.0)
    t = f32(127.0) if t > f32(127.0) else t
    t = f32(-127.0) if t < f32(-127.0) else t
    return np.int8(t)


@njit(inline="always")
def _q8_block(x: np.ndarray, t: int, y0: int, qs: np.ndarray) -> np.float32:
    """Quantize x[t, y0:y0+32] into qs; returns the unrounded float32 scale d = amax / 127."""
    amax = block32_absmax(x, t, y0)
    dv = amax / f32(127.0)
    inv = f32(1.0) / dv if dv != f32(0.0) else f32(0.0)
    for j in range(QK):
        qs[t, y0 + j] = _q8(x[t, y0 + j] * inv)
    return dv


@njit(cache=True)
def quantize_q8_0(x: np.ndarray, qs: np.ndarray, d: np.ndarray, table: np.ndarray) -> None:
    """x float32 [T, n] -> qs int8 [T, n], d float32 [T, n/32] (fp16-rounded), as quantize_row_q8_0_ref."""
    T, n = x.shape
    nb = n // QK
    for t in range(T):
        drow = d[t]
        dbits = drow.view(np.uint32)
        for b in range(nb):
            drow[b] = _q8_block(x, t, b * QK, qs)
        for b in range(nb):
            drow[b] = table[fp32_bits_to_fp16_bits(np.int64(dbits[b]))]


@njit(cache=True)
def quantize_q8_1(x: np.ndarray, qs: np.ndarray, d: np.ndarray, s: np.ndarray, table: np.ndarray) -> None:
    """As quantize_q8_0, plus s float32 [T, n/32] = fp16(float(sum(qs)) * d) with the unrounded d."""
    T, n = x.shape
    nb = n // QK
    for t in range(T):
        drow = d[t]
        srow = s[t]
        dbits = drow.view(np.uint32)
        sbits = srow.view(np.uint32)
        for b in range(nb):
            dv = _q8_block(x, t, b * QK, qs)
            total = block32_sum_i8(qs, t, b * QK)
            drow[b] = dv
            srow[b] = f32(total) * dv
        for b in range(nb):
            drow[b] = table[fp32_bits_to_fp16_bits(np.int64(dbits[b]))]
            srow[b] = table[fp32_bits_to_fp16_bits(np.int64(sbits[b]))]


@njit(cache=True)
def _block_sums_t(qs: np.ndarray, tp: int) -> np.ndarray:
    """Sum of each 32-block of qs int8 [T, n], transposed and zero-padded: int32 [n/32, tp]."""
    T, n = qs.shape
    out = np.zeros((n // QK, tp), np.int32)
    for t in range(T):
        for b in range(n // QK):
            total = 0
            for j in range(QK):
                total += np.int64(qs[t, b * QK + j])
            out[b, t] = total
    return out


@njit(cache=True)
def _transpose_padded(a: np.ndarray, tp: int) -> np.ndarray:
    """a [T, k] -> [k, tp], zero in the columns past T."""
    out = np.zeros((a.shape[1], tp), a.dtype)
    out[:, : a.shape[0]] = a.T
    return out


# --- dequantize (bit for bit as gguf.quants.dequantize: d * q, then + m, no FMA) --------------


@njit(cache=True)
def dequantize_q4_0(w: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    nb = out.shape[1] // QK
    bs = _BS_Q4_0
    for r in range(w.shape[0]):
        for b in range(nb):
            o = b * bs
            dv = _half(w, r, o, table)
            for j in range(16):
                v = np.int32(w[r, o + 2 + j])
                out[r, b * QK + j] = dv * f32((v & 15) - 8)
                out[r, b * QK + 16 + j] = dv * f32((v >> 4) - 8)


@njit(cache=True)
def dequantize_q4_1(w: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    nb = out.shape[1] // QK
    bs = _BS_Q4_1
    for r in range(w.shape[0]):
        for b in range(nb):
            o = b * bs
            dv = _half(w, r, o, table)
            mv = _half(w, r, o + 2, table)
            for j in range(16):
                v = np.int32(w[r, o + 4 + j])
                out[r, b * QK + j] = dv * f32(v & 15) + mv
                out[r, b * QK + 16 + j] = dv * f32(v >> 4) + mv


@njit(cache=True)
def dequantize_q5_0(w: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    nb = out.shape[1] // QK
    bs = _BS_Q5_0
    for r in range(w.shape[0]):
        for b in range(nb):
            o = b * bs
            dv = _half(w, r, o, table)
            qh = _qh(w, r, o + 2)
            for j in range(16):
                v = np.int64(w[r, o + 6 + j])
                lo = (v & 15) | (((qh >> j) & 1) << 4)
                hi = (v >> 4) | (((qh >> (j + 16)) & 1) << 4)
                out[r, b * QK + j] = dv * f32(lo - 16)
                out[r, b * QK + 16 + j] = dv * f32(hi - 16)


@njit(cache=True)
def dequantize_q5_1(w: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    nb = out.shape[1] // QK
    bs = _BS_Q5_1
    for r in range(w.shape[0]):
        for b in range(nb):
            o = b * bs
            dv = _half(w, r, o, table)
            mv = _half(w, r, o + 2, table)
            qh = _qh(w, r, o + 4)
            for j in range(16):
                v = np.int64(w[r, o + 8 + j])
                lo = (v & 15) | (((qh >> j) & 1) << 4)
                hi = (v >> 4) | (((qh >> (j + 16)) & 1) << 4)
                out[r, b * QK + j] = dv * f32(lo) + mv
                out[r, b * QK + 16 + j] = dv * f32(hi) + mv


@njit(cache=True)
def dequantize_q8_0(w: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    nb = out.shape[1] // QK
    bs = _BS_Q8_0
    for r in range(w.shape[0]):
        for b in range(nb):
            o = b * bs
            dv = _half(w, r, o, table)
            for j in range(QK):
                out[r, b * QK + j] = dv * f32(np.int8(w[r, o + 2 + j]))


# --- per-block integer dot products for the few-token kernels ---------------------------------
# ``half`` is the number of qs bytes per block (16, or 32 for Q8_0). It is read from the row
# layout at run time so the loop stays a loop for LLVM's loop vectorizer instead of being unrolled
# into scalar code (numba does not run LLVM's SLP vectorizer); ``min(half, 16)`` then tells LLVM the
# most it can be, so it picks one vector iteration instead of a 64-wide loop that 16 bytes never
# enter (measured: a quarter faster).


@njit(inline="always")
def _dot_q4(w: np.ndarray, r: int, o: int, qs: np.ndarray, t: int, y0: int, half: int) -> int:
    """sum_j (q_j - 8) * y_j over one Q4 block whose nibbles start at w[r, o] (int16, exact)."""
    s = i16(0)
    for j in range(min(half, 16)):
        v = i16(w[r, o + j])
        s = i16(s + i16(i16(i16(v & i16(15)) - i16(8)) * i16(qs[t, y0 + j]))
                + i16(i16(i16(v >> i16(4)) - i16(8)) * i16(qs[t, y0 + 16 + j])))
    return s


@njit(inline="always")
def _dot_q5(w: np.ndarray, r: int, o: int, qh: int, qs: np.ndarray, t: int, y0: int, half: int) -> int:
    """sum_j (q_j - 16) * y_j over one Q5 block (two int16 half sums, each exact).

    The fifth bits are tested against a table of single-bit masks rather than shifted out by j:
    16-bit variable shifts do not exist in AVX2, and the shift made this loop twice as slow.
    """
    qlo = np.uint16(qh & 0xFFFF)
    qhi = np.uint16((qh >> 16) & 0xFFFF)
    sa = i16(0)
    sb = i16(0)
    for j in range(min(half, 16)):
        v = i16(w[r, o + j])
        bit = _BIT16[j]
        lo = i16(i16(v & i16(15)) | (i16(16) if (qlo & bit) != 0 else i16(0)))
        hi = i16(i16(v >> i16(4)) | (i16(16) if (qhi & bit) != 0 else i16(0)))
        sa = i16(sa + i16(i16(lo - i16(16)) * i16(qs[t, y0 + j])))
        sb = i16(sb + i16(i16(hi - i16(16)) * i16(qs[t, y0 + 16 + j])))
    return i32(sa) + i32(sb)


@njit(inline="always")
def _dot_q8(w: np.ndarray, r: int, o: int, qs: np.ndarray, t: int, y0: int, qk: int) -> int:
    s = i32(0)
    for j in range(min(qk, QK)):
        s = i32(s + i32(i32(np.int8(w[r, o + j])) * i32(qs[t, y0 + j])))
    return s


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _rows_q4_0(w: np.ndarray, qs: np.ndarray, d: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    T, n = qs.shape
    nb = n // QK
    half = w.shape[1] // nb - 2
    for r in prange(w.shape[0]):
        for t in range(T):
            acc = f32(0.0)
            for b in range(nb):
                o = b * _BS_Q4_0
                sumi = _dot_q4(w, r, o + 2, qs, t, b * QK, half)
                acc += f32(sumi) * (_half(w, r, o, table) * d[t, b])
            out[t, r] = acc


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _rows_q4_1(w: np.ndarray, qs: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray,
               table: np.ndarray) -> None:
    T, n = qs.shape
    nb = n // QK
    half = w.shape[1] // nb - 4
    ysum = _block_sums_t(qs, T)
    for r in prange(w.shape[0]):
        for t in range(T):
            acc = f32(0.0)
            for b in range(nb):
                o = b * _BS_Q4_1
                sumi = i32(_dot_q4(w, r, o + 4, qs, t, b * QK, half)) + i32(8) * ysum[b, t]
                acc += f32(sumi) * (_half(w, r, o, table) * d[t, b])
                acc += _half(w, r, o + 2, table) * s[t, b]
            out[t, r] = acc


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _rows_q5_0(w: np.ndarray, qs: np.ndarray, d: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    T, n = qs.shape
    nb = n // QK
    half = w.shape[1] // nb - 6
    for r in prange(w.shape[0]):
        for t in range(T):
            acc = f32(0.0)
            for b in range(nb):
                o = b * _BS_Q5_0
                sumi = _dot_q5(w, r, o + 6, _qh(w, r, o + 2), qs, t, b * QK, half)
                acc += f32(sumi) * (_half(w, r, o, table) * d[t, b])
            out[t, r] = acc


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _rows_q5_1(w: np.ndarray, qs: np.ndarray, d: np.ndarray, s: np.ndarray, out: np.ndarray,
               table: np.ndarray) -> None:
    T, n = qs.shape
    nb = n // QK
    half = w.shape[1] // nb - 8
    ysum = _block_sums_t(qs, T)
    for r in prange(w.shape[0]):
        for t in range(T):
            acc = f32(0.0)
            for b in range(nb):
                o = b * _BS_Q5_1
                sumi = _dot_q5(w, r, o + 8, _qh(w, r, o + 4), qs, t, b * QK, half) + i32(16) * ysum[b, t]
                acc += f32(sumi) * (_half(w, r, o, table) * d[t, b])
                acc += _half(w, r, o + 2, table) * s[t, b]
            out[t, r] = acc


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _rows_q8_0(w: np.ndarray, qs: np.ndarray, d: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    T, n = qs.shape
    nb = n // QK
    qk = w.shape[1] // nb - 2
    for r in prange(w.shape[0]):
        for t in range(T):
            acc = f32(0.0)
            for b in range(nb):
                o = b * _BS_Q8_0
                sumi = _dot_q8(w, r, o + 2, qs, t, b * QK, qk)
                acc += f32(sumi) * (_half(w, r, o, table) * d[t, b])
            out[t, r] = acc


# --- tiles of rows x tokens for many tokens ----------------------------------------------------
# Activations arrive transposed (yT int8 [n, T]; dT, sT float32 [n/32, T]; ysum int32 [n/32, T])
# so that, for one weight value, consecutive tokens are consecutive bytes: tokens are the SIMD
# lanes. Each block is decoded into ``wv`` (its 32 integers) once per row and run of tokens, then
# eight weights at a time are multiplied into the whole run.
# Token indices are cast to uint64: numba wraps negative signed indices around, and LLVM cannot
# prove ``t0 + t >= 0``, so with a signed index the loads become gathers (ten times slower).


@njit(inline="always")
def _mac8_i16(s: np.ndarray, wv: np.ndarray, j: int, yT: np.ndarray, k: int, t0: int, tn: int) -> None:
    """s[t] += sum_{i<8} wv[j+i] * yT[k+i, t0+t] in wrapping int16."""
    w0 = wv[j]
    w1 = wv[j + 1]
    w2 = wv[j + 2]
    w3 = wv[j + 3]
    w4 = wv[j + 4]
    w5 = wv[j + 5]
    w6 = wv[j + 6]
    w7 = wv[j + 7]
    for t in range(tn):
        u = np.uint64(t0 + t)
        s[t] = i16(s[t] + w0 * yT[k, u] + w1 * yT[k + 1, u] + w2 * yT[k + 2, u] + w3 * yT[k + 3, u]
                   + w4 * yT[k + 4, u] + w5 * yT[k + 5, u] + w6 * yT[k + 6, u] + w7 * yT[k + 7, u])


@njit(inline="always")
def _mac8_i32(s: np.ndarray, wv: np.ndarray, j: int, yT: np.ndarray, k: int, t0: int, tn: int) -> None:
    """s[t] += sum_{i<8} wv[j+i] * yT[k+i, t0+t] in int32."""
    w0 = wv[j]
    w1 = wv[j + 1]
    w2 = wv[j + 2]
    w3 = wv[j + 3]
    w4 = wv[j + 4]
    w5 = wv[j + 5]
    w6 = wv[j + 6]
    w7 = wv[j + 7]
    for t in range(tn):
        u = np.uint64(t0 + t)
        s[t] = i32(s[t] + w0 * yT[k, u] + w1 * yT[k + 1, u] + w2 * yT[k + 2, u] + w3 * yT[k + 3, u]
                   + w4 * yT[k + 4, u] + w5 * yT[k + 5, u] + w6 * yT[k + 6, u] + w7 * yT[k + 7, u])


@njit(inline="always")
def _zero(a: np.ndarray, tn: int) -> None:
    for t in range(tn):
        a[t] = 0


@njit(inline="always")
def _decode_q4(w: np.ndarray, r: int, o: int, wv: np.ndarray) -> None:
    """wv[0:32] = nibbles - 8 of the Q4 block whose qs start at w[r, o]."""
    for j in range(16):
        v = i16(w[r, o + j])
        wv[j] = i16(i16(v & i16(15)) - i16(8))
        wv[j + 16] = i16(i16(v >> i16(4)) - i16(8))


@njit(inline="always")
def _decode_q5(w: np.ndarray, r: int, o: int, qh: int, wv: np.ndarray) -> None:
    """wv[0:32] = q - 16 of the Q5 block whose qs start at w[r, o], fifth bits in qh."""
    for j in range(16):
        v = np.int64(w[r, o + j])
        wv[j] = i16(((v & 15) | (((qh >> j) & 1) << 4)) - 16)
        wv[j + 16] = i16(((v >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16)


@njit(inline="always")
def _mac_block_i16(s: np.ndarray, wv: np.ndarray, yT: np.ndarray, y0: int, t0: int, tn: int) -> None:
    _zero(s, tn)
    _mac8_i16(s, wv, 0, yT, y0, t0, tn)
    _mac8_i16(s, wv, 8, yT, y0 + 8, t0, tn)
    _mac8_i16(s, wv, 16, yT, y0 + 16, t0, tn)
    _mac8_i16(s, wv, 24, yT, y0 + 24, t0, tn)


@njit(inline="always")
def _mac_halves_i16(sa: np.ndarray, sb: np.ndarray, wv: np.ndarray, yT: np.ndarray, y0: int, t0: int,
                    tn: int) -> None:
    _zero(sa, tn)
    _zero(sb, tn)
    _mac8_i16(sa, wv, 0, yT, y0, t0, tn)
    _mac8_i16(sa, wv, 8, yT, y0 + 8, t0, tn)
    _mac8_i16(sb, wv, 16, yT, y0 + 16, t0, tn)
    _mac8_i16(sb, wv, 24, yT, y0 + 24, t0, tn)


@njit(inline="always")
def _store(out: np.ndarray, acc: np.ndarray, ri: int, r: int, t0: int, tn: int) -> None:
    for t in range(tn):
        out[np.uint64(t0 + t), r] = acc[ri, t]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _tiles_q4_0(w: np.ndarray, yT: np.ndarray, dT: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    rows = w.shape[0]
    n, tp = yT.shape
    n_tt = (tp + _TILE_TOKENS - 1) // _TILE_TOKENS
    for job in prange((rows + _TILE_ROWS - 1) // _TILE_ROWS * n_tt):
        r0 = job // n_tt * _TILE_ROWS
        t0 = job % n_tt * _TILE_TOKENS
        tn = min(_TILE_TOKENS, tp - t0)
        wv = np.empty(QK, np.int16)
        s = np.empty(_TILE_TOKENS, np.int16)
        acc = np.empty((_TILE_ROWS, _TILE_TOKENS), np.float32)
        r1 = min(rows, r0 + _TILE_ROWS)
        acc[:, :] = 0
        for b in range(n // QK):
            for ri in range(r1 - r0):
                r = r0 + ri
                o = b * _BS_Q4_0
                _decode_q4(w, r, o + 2, wv)
                _mac_block_i16(s, wv, yT, b * QK, t0, tn)
                dw = _half(w, r, o, table)
                for t in range(tn):
                    acc[ri, t] += f32(s[t]) * (dw * dT[b, np.uint64(t0 + t)])
        for ri in range(r1 - r0):
            _store(out, acc, ri, r0 + ri, t0, min(tn, out.shape[0] - t0))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _tiles_q4_1(w: np.ndarray, yT: np.ndarray, dT: np.ndarray, sT: np.ndarray, ysum: np.ndarray,
                out: np.ndarray, table: np.ndarray) -> None:
    rows = w.shape[0]
    n, tp = yT.shape
    n_tt = (tp + _TILE_TOKENS - 1) // _TILE_TOKENS
    for job in prange((rows + _TILE_ROWS - 1) // _TILE_ROWS * n_tt):
        r0 = job // n_tt * _TILE_ROWS
        t0 = job % n_tt * _TILE_TOKENS
        tn = min(_TILE_TOKENS, tp - t0)
        wv = np.empty(QK, np.int16)
        s = np.empty(_TILE_TOKENS, np.int16)
        acc = np.empty((_TILE_ROWS, _TILE_TOKENS), np.float32)
        r1 = min(rows, r0 + _TILE_ROWS)
        acc[:, :] = 0
        for b in range(n // QK):
            for ri in range(r1 - r0):
                r = r0 + ri
                o = b * _BS_Q4_1
                _decode_q4(w, r, o + 4, wv)
                _mac_block_i16(s, wv, yT, b * QK, t0, tn)
                dw = _half(w, r, o, table)
                mw = _half(w, r, o + 2, table)
                for t in range(tn):
                    sumi = i32(s[t]) + i32(8) * ysum[b, np.uint64(t0 + t)]
                    acc[ri, t] += f32(sumi) * (dw * dT[b, np.uint64(t0 + t)])
                    acc[ri, t] += mw * sT[b, np.uint64(t0 + t)]
        for ri in range(r1 - r0):
            _store(out, acc, ri, r0 + ri, t0, min(tn, out.shape[0] - t0))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _tiles_q5_0(w: np.ndarray, yT: np.ndarray, dT: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    rows = w.shape[0]
    n, tp = yT.shape
    n_tt = (tp + _TILE_TOKENS - 1) // _TILE_TOKENS
    for job in prange((rows + _TILE_ROWS - 1) // _TILE_ROWS * n_tt):
        r0 = job // n_tt * _TILE_ROWS
        t0 = job % n_tt * _TILE_TOKENS
        tn = min(_TILE_TOKENS, tp - t0)
        wv = np.empty(QK, np.int16)
        sa = np.empty(_TILE_TOKENS, np.int16)
        sb = np.empty(_TILE_TOKENS, np.int16)
        acc = np.empty((_TILE_ROWS, _TILE_TOKENS), np.float32)
        r1 = min(rows, r0 + _TILE_ROWS)
        acc[:, :] = 0
        for b in range(n // QK):
            for ri in range(r1 - r0):
                r = r0 + ri
                o = b * _BS_Q5_0
                _decode_q5(w, r, o + 6, _qh(w, r, o + 2), wv)
                _mac_halves_i16(sa, sb, wv, yT, b * QK, t0, tn)
                dw = _half(w, r, o, table)
                for t in range(tn):
                    acc[ri, t] += f32(i32(sa[t]) + i32(sb[t])) * (dw * dT[b, np.uint64(t0 + t)])
        for ri in range(r1 - r0):
            _store(out, acc, ri, r0 + ri, t0, min(tn, out.shape[0] - t0))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _tiles_q5_1(w: np.ndarray, yT: np.ndarray, dT: np.ndarray, sT: np.ndarray, ysum: np.ndarray,
                out: np.ndarray, table: np.ndarray) -> None:
    rows = w.shape[0]
    n, tp = yT.shape
    n_tt = (tp + _TILE_TOKENS - 1) // _TILE_TOKENS
    for job in prange((rows + _TILE_ROWS - 1) // _TILE_ROWS * n_tt):
        r0 = job // n_tt * _TILE_ROWS
        t0 = job % n_tt * _TILE_TOKENS
        tn = min(_TILE_TOKENS, tp - t0)
        wv = np.empty(QK, np.int16)
        sa = np.empty(_TILE_TOKENS, np.int16)
        sb = np.empty(_TILE_TOKENS, np.int16)
        acc = np.empty((_TILE_ROWS, _TILE_TOKENS), np.float32)
        r1 = min(rows, r0 + _TILE_ROWS)
        acc[:, :] = 0
        for b in range(n // QK):
            for ri in range(r1 - r0):
                r = r0 + ri
                o = b * _BS_Q5_1
                _decode_q5(w, r, o + 8, _qh(w, r, o + 4), wv)
                _mac_halves_i16(sa, sb, wv, yT, b * QK, t0, tn)
                dw = _half(w, r, o, table)
                mw = _half(w, r, o + 2, table)
                for t in range(tn):
                    sumi = i32(sa[t]) + i32(sb[t]) + i32(16) * ysum[b, np.uint64(t0 + t)]
                    acc[ri, t] += f32(sumi) * (dw * dT[b, np.uint64(t0 + t)])
                    acc[ri, t] += mw * sT[b, np.uint64(t0 + t)]
        for ri in range(r1 - r0):
            _store(out, acc, ri, r0 + ri, t0, min(tn, out.shape[0] - t0))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _tiles_q8_0(w: np.ndarray, yT: np.ndarray, dT: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    rows = w.shape[0]
    n, tp = yT.shape
    n_tt = (tp + _TILE_TOKENS - 1) // _TILE_TOKENS
    for job in prange((rows + _TILE_ROWS - 1) // _TILE_ROWS * n_tt):
        r0 = job // n_tt * _TILE_ROWS
        t0 = job % n_tt * _TILE_TOKENS
        tn = min(_TILE_TOKENS, tp - t0)
        wv = np.empty(QK, np.int32)
        s = np.empty(_TILE_TOKENS, np.int32)
        acc = np.empty((_TILE_ROWS, _TILE_TOKENS), np.float32)
        r1 = min(rows, r0 + _TILE_ROWS)
        acc[:, :] = 0
        for b in range(n // QK):
            for ri in range(r1 - r0):
                r = r0 + ri
                o = b * _BS_Q8_0
                for j in range(QK):
                    wv[j] = i32(np.int8(w[r, o + 2 + j]))
                _zero(s, tn)
                _mac8_i32(s, wv, 0, yT, b * QK, t0, tn)
                _mac8_i32(s, wv, 8, yT, b * QK + 8, t0, tn)
                _mac8_i32(s, wv, 16, yT, b * QK + 16, t0, tn)
                _mac8_i32(s, wv, 24, yT, b * QK + 24, t0, tn)
                dw = _half(w, r, o, table)
                for t in range(tn):
                    acc[ri, t] += f32(s[t]) * (dw * dT[b, np.uint64(t0 + t)])
        for ri in range(r1 - r0):
            _store(out, acc, ri, r0 + ri, t0, min(tn, out.shape[0] - t0))


# --- one numba call per matmul: quantize the activations, then rows or tiles -------------------


@njit(cache=True)
def matmul_q4_0(w: np.ndarray, x: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    T, n = x.shape
    qs = np.empty((T, n), np.int8)
    d = np.empty((T, n // QK), np.float32)
    quantize_q8_0(x, qs, d, table)
    tp = (T + _TILE_PAD - 1) // _TILE_PAD * _TILE_PAD
    if T < TILE_MIN_TOKENS:
        _rows_q4_0(w, qs, d, out, table)
    else:
        _tiles_q4_0(w, _transpose_padded(qs, tp), _transpose_padded(d, tp), out, table)


@njit(cache=True)
def matmul_q4_1(w: np.ndarray, x: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    T, n = x.shape
    qs = np.empty((T, n), np.int8)
    d = np.empty((T, n // QK), np.float32)
    s = np.empty((T, n // QK), np.float32)
    quantize_q8_1(x, qs, d, s, table)
    tp = (T + _TILE_PAD - 1) // _TILE_PAD * _TILE_PAD
    if T < TILE_MIN_TOKENS:
        _rows_q4_1(w, qs, d, s, out, table)
    else:
        _tiles_q4_1(w, _transpose_padded(qs, tp), _transpose_padded(d, tp), _transpose_padded(s, tp),
                    _block_sums_t(qs, tp), out, table)


@njit(cache=True)
def matmul_q5_0(w: np.ndarray, x: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    T, n = x.shape
    qs = np.empty((T, n), np.int8)
    d = np.empty((T, n // QK), np.float32)
    quantize_q8_0(x, qs, d, table)
    tp = (T + _TILE_PAD - 1) // _TILE_PAD * _TILE_PAD
    if T < TILE_MIN_TOKENS:
        _rows_q5_0(w, qs, d, out, table)
    else:
        _tiles_q5_0(w, _transpose_padded(qs, tp), _transpose_padded(d, tp), out, table)


@njit(cache=True)
def matmul_q5_1(w: np.ndarray, x: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    T, n = x.shape
    qs = np.empty((T, n), np.int8)
    d = np.empty((T, n // QK), np.float32)
    s = np.empty((T, n // QK), np.float32)
    quantize_q8_1(x, qs, d, s, table)
    tp = (T + _TILE_PAD - 1) // _TILE_PAD * _TILE_PAD
    if T < TILE_MIN_TOKENS:
        _rows_q5_1(w, qs, d, s, out, table)
    else:
        _tiles_q5_1(w, _transpose_padded(qs, tp), _transpose_padded(d, tp), _transpose_padded(s, tp),
                    _block_sums_t(qs, tp), out, table)


@njit(cache=True)
def matmul_q8_0(w: np.ndarray, x: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    T, n = x.shape
    qs = np.empty((T, n), np.int8)
    d = np.empty((T, n // QK), np.float32)
    quantize_q8_0(x, qs, d, table)
    tp = (T + _TILE_PAD - 1) // _TILE_PAD * _TILE_PAD
    if T < TILE_MIN_TOKENS:
        _rows_q8_0(w, qs, d, out, table)
    else:
        _tiles_q8_0(w, _transpose_padded(qs, tp), _transpose_padded(d, tp), out, table)


class LegacyKernel:
    """The WeightKernel of one legacy block type: shape checks, then one numba call."""

    def __init__(self, format_: type[fmt.LegacyFormat], matmul_fn: Callable[..., None],
                 dequantize_fn: Callable[..., None]) -> None:
        self.format = format_
        self.qtype: GGMLQuantizationType = format_.qtype
        self._matmul = matmul_fn
        self._dequantize = dequantize_fn

    def _row_elements(self, w: np.ndarray, what: str) -> int:
        name = self.qtype.name
        if w.ndim != 2 or w.dtype != np.uint8 or not w.flags.c_contiguous:
            raise ValueError(f"{name} {what}: weights must be C-contiguous uint8 [rows, row_bytes], "
                             f"got {w.dtype} {w.shape}")
        if w.shape[1] == 0 or w.shape[1] % self.format.type_size:
            raise ValueError(f"{name} {what}: a row of {w.shape[1]} bytes is not whole "
                             f"{self.format.type_size}-byte blocks")
        return w.shape[1] // self.format.type_size * QK

    def matmul(self, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out[t, r] = dot(row r of w, x[t]) with ggml's quantized activations and integer block sums."""
        n = self._row_elements(w, "matmul")
        if x.ndim != 2 or x.dtype != np.float32 or not x.flags.c_contiguous or x.shape[1] != n:
            raise ValueError(f"{self.qtype.name} matmul: activations must be C-contiguous float32 [T, {n}], "
                             f"got {x.dtype} {x.shape}")
        if out.shape != (x.shape[0], w.shape[0]) or out.dtype != np.float32:
            raise ValueError(f"{self.qtype.name} matmul: output must be float32 {(x.shape[0], w.shape[0])}, "
                             f"got {out.dtype} {out.shape}")
        self._matmul(w, x, out, FP16_TABLE)

    def dequantize(self, w: np.ndarray, out: np.ndarray) -> None:
        """Rows of w expanded to float32, bit for bit as gguf.quants.dequantize."""
        n = self._row_elements(w, "dequantize")
        if out.shape != (w.shape[0], n) or out.dtype != np.float32:
            raise ValueError(f"{self.qtype.name} dequantize: output must be float32 {(w.shape[0], n)}, "
                             f"got {out.dtype} {out.shape}")
        self._dequantize(w, out, FP16_TABLE)


Q4_0_KERNEL = register(LegacyKernel(fmt.Q4_0, matmul_q4_0, dequantize_q4_0))
Q4_1_KERNEL = register(LegacyKernel(fmt.Q4_1, matmul_q4_1, dequantize_q4_1))
Q5_0_KERNEL = register(LegacyKernel(fmt.Q5_0, matmul_q5_0, dequantize_q5_0))
Q5_1_KERNEL = register(LegacyKernel(fmt.Q5_1, matmul_q5_1, dequantize_q5_1))
Q8_0_KERNEL = register(LegacyKernel(fmt.Q8_0, matmul_q8_0, dequantize_q8_0))
