"""numba kernels for ggml's K-quant weights Q4_K, Q5_K, Q6_K: matmul against Q8_K activations, dequantize.

A matmul first quantizes the float32 activations to Q8_K (``quantize_q8_K``, bit-identical to
ggml's ``quantize_row_q8_K_ref``), then takes integer dot products the way ggml's CPU backend does
(``ggml_vec_dot_q{4,5,6}_K_q8_K``): per super-block an int32 sum of scale * q * q8, scaled by
``d * y.d``, minus ``dmin * y.d`` times the mins against the activations' 16-value sums (bsums).
The numpy twins live in ``pipx_llama.formats.kquants``.

Two matmul shapes:
- few tokens (generation): ``_q*_K_matvec`` streams each weight row once per token and decodes it
  on the fly, one row per ``prange`` iteration, with one int32 reduction per super-block whose
  inner loop covers all sub-blocks (so it vectorizes with broadcast scales and needs one horizontal
  sum per 256 values). Q4_K/Q5_K read the activations widened to int16 and their mins against
  precomputed 32-value sums; Q6_K keeps its quants unsigned and takes the -32 off through bsums.
- many tokens (prompt processing): ``_q*_K_matmat`` expands a block of rows once into int16 scaled
  quants (``sc * q``, which fits int16 for all three types) and reuses it for every token.
Each output is summed by one thread in a fixed order, so results do not depend on the thread count.

Integer intermediates are cast back to int32 after every operation: numba types small-int
arithmetic as int64, and only int32 lets LLVM emit pmaddwd-style code (see NUMBA-NOTES).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType
from numba import get_num_threads, njit, prange

from pipx_llama.engine.kernels import register
from pipx_llama.formats.fp16 import FP16_TABLE
from pipx_llama.formats.kquants import BLOCK_Q4_K, BLOCK_Q5_K, BLOCK_Q6_K, QK_K

_i32 = np.int32
_f32 = np.float32

_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23, see formats.kquants.nearest_int
_MAGIC_I = 12582912

Q4_K_BYTES = BLOCK_Q4_K.itemsize  # 144
Q5_K_BYTES = BLOCK_Q5_K.itemsize  # 176
Q6_K_BYTES = BLOCK_Q6_K.itemsize  # 210

ROW_BLOCK = 16  # rows expanded together in the many-token matmul
MATVEC_MAX_T = 2  # up to this many tokens decoding on the fly beats expanding rows (measured)


# ---------------------------------------------------------------- Q8_K activations


@njit(cache=True)
def quantize_q8_K(x: np.ndarray, qs: np.ndarray, d: np.ndarray, bsums: np.ndarray) -> None:
    """x float32 [T, n] -> qs int8 [T, n], d float32 [T, n/256], bsums int16 [T, n/16].

    Same arithmetic as ``quantize_row_q8_K_ref`` (finite x; a block too small for a finite iscale
    is stored as zeros, as there). No fastmath: ``iscale * x + magic`` must round twice in float32
    like ggml's ``nearest_int``; a fused multiply-add would round once and sometimes differ.
    """
    t_count, n = x.shape
    nb = n // QK_K
    for t in range(t_count):
        for b in range(nb):
            o = b * QK_K
            amax = _f32(0.0)
            vmax = _f32(0.0)
            for j in range(QK_K):
                v = x[t, o + j]
                a = abs(v)
                if a > amax:
                    amax = a
                    vmax = v
            iscale = _f32(0.0)
            if amax != _f32(0.0):
                iscale = _f32(-127.0) / vmax
            if iscale == _f32(0.0) or abs(iscale) == np.inf:
                # all zero, or too small for a finite iscale (see quantize_row_q8_K_ref)
                d[t, b] = _f32(0.0)
                for j in range(QK_K):
                    qs[t, o + j] = 0
                for g in range(16):
                    bsums[t, b * 16 + g] = 0
                continue
            for j in range(QK_K):
                q = _i32(_i32(iscale * x[t, o + j] + _MAGIC) - _i32(_MAGIC_I))
                qs[t, o + j] = min(q, _i32(127))
            for g in range(16):
                s = _i32(0)
                for j in range(16):
                    s = _i32(s + _i32(qs[t, o + g * 16 + j]))
                bsums[t, b * 16 + g] = s
            d[t, b] = _f32(1.0) / iscale


# ---------------------------------------------------------------- shared helpers


@njit(inline="always")
def _fp16(w, r, o, lut):
    return lut[np.int64(w[r, o]) | (np.int64(w[r, o + 1]) << 8)]


@njit(inline="always")
def _scale_min_k4(w, r, so, j):
    """``get_scale_min_k4``: 6-bit scale and min of sub-block j from the 12 bytes at w[r, so:]."""
    if j < 4:
        sc = _i32(_i32(w[r, so + j]) & _i32(63))
        m = _i32(_i32(w[r, so + j + 4]) & _i32(63))
    else:
        sc = _i32(
            _i32(_i32(w[r, so + j + 4]) & _i32(15)) | _i32(_i32(_i32(w[r, so + j - 4]) >> _i32(6)) << _i32(4))
        )
        m = _i32(
            _i32(_i32(w[r, so + j + 4]) >> _i32(4)) | _i32(_i32(_i32(w[r, so + j]) >> _i32(6)) << _i32(4))
        )
    return sc, m


@njit(inline="always")
def _widen_activations(qs, bsums, qs16, bs32):
    """int16 copy of the quants (the dot loads them as pmaddwd operands directly) and 32-value sums."""
    for t in range(qs.shape[0]):
        for k in range(qs.shape[1]):
            qs16[t, k] = qs[t, k]
        for k in range(bs32.shape[1]):
            bs32[t, k] = _i32(_i32(bsums[t, 2 * k]) + _i32(bsums[t, 2 * k + 1]))


@njit(inline="always")
def _q45_superblock(w, r, o, high_bits, qs16, bs32, t, b):
    """Q4_K/Q5_K super-block at w[r, o:] against token t: (sum of sc*q*q8, sum of m*bsum32).

    One loop over the 32 byte positions covers all 8 sub-blocks, so LLVM vectorizes it into a
    single int32 reduction with broadcast scales (one horizontal sum per 256 values).
    """
    c0, m0 = _scale_min_k4(w, r, o + 4, 0)
    c1, m1 = _scale_min_k4(w, r, o + 4, 1)
    c2, m2 = _scale_min_k4(w, r, o + 4, 2)
    c3, m3 = _scale_min_k4(w, r, o + 4, 3)
    c4, m4 = _scale_min_k4(w, r, o + 4, 4)
    c5, m5 = _scale_min_k4(w, r, o + 4, 5)
    c6, m6 = _scale_min_k4(w, r, o + 4, 6)
    c7, m7 = _scale_min_k4(w, r, o + 4, 7)
    k0 = b * 8
    summs = _i32(_i32(m0 * bs32[t, k0]) + _i32(m1 * bs32[t, k0 + 1]))
    summs = _i32(summs + _i32(_i32(m2 * bs32[t, k0 + 2]) + _i32(m3 * bs32[t, k0 + 3])))
    summs = _i32(summs + _i32(_i32(m4 * bs32[t, k0 + 4]) + _i32(m5 * bs32[t, k0 + 5])))
    summs = _i32(summs + _i32(_i32(m6 * bs32[t, k0 + 6]) + _i32(m7 * bs32[t, k0 + 7])))
    qo = o + (48 if high_bits else 16)
    yo = b * QK_K
    s = _i32(0)
    for l in range(32):
        a0 = _i32(w[r, qo + l])
        a1 = _i32(w[r, qo + 32 + l])
        a2 = _i32(w[r, qo + 64 + l])
        a3 = _i32(w[r, qo + 96 + l])
        v0 = _i32(a0 & _i32(15))
        v1 = _i32(a0 >> _i32(4))
        v2 = _i32(a1 & _i32(15))
        v3 = _i32(a1 >> _i32(4))
        v4 = _i32(a2 & _i32(15))
        v5 = _i32(a2 >> _i32(4))
        v6 = _i32(a3 & _i32(15))
        v7 = _i32(a3 >> _i32(4))
        if high_bits:
            # Bit j of qh[l] is the fifth bit of value l of sub-block j.
            h = _i32(w[r, o + 16 + l])
            v0 = _i32(v0 | _i32(_i32(h << _i32(4)) & _i32(16)))
            v1 = _i32(v1 | _i32(_i32(h << _i32(3)) & _i32(16)))
            v2 = _i32(v2 | _i32(_i32(h << _i32(2)) & _i32(16)))
            v3 = _i32(v3 | _i32(_i32(h << _i32(1)) & _i32(16)))
            v4 = _i32(v4 | _i32(h & _i32(16)))
            v5 = _i32(v5 | _i32(_i32(h >> _i32(1)) & _i32(16)))
            v6 = _i32(v6 | _i32(_i32(h >> _i32(2)) & _i32(16)))
            v7 = _i32(v7 | _i32(_i32(h >> _i32(3)) & _i32(16)))
        s = _i32(s + _i32(_i32(v0 * c0) * _i32(qs16[t, yo + l])))
        s = _i32(s + _i32(_i32(v1 * c1) * _i32(qs16[t, yo + 32 + l])))
        s = _i32(s + _i32(_i32(v2 * c2) * _i32(qs16[t, yo + 64 + l])))
        s = _i32(s + _i32(_i32(v3 * c3) * _i32(qs16[t, yo + 96 + l])))
        s = _i32(s + _i32(_i32(v4 * c4) * _i32(qs16[t, yo + 128 + l])))
        s = _i32(s + _i32(_i32(v5 * c5) * _i32(qs16[t, yo + 160 + l])))
        s = _i32(s + _i32(_i32(v6 * c6) * _i32(qs16[t, yo + 192 + l])))
        s = _i32(s + _i32(_i32(v7 * c7) * _i32(qs16[t, yo + 224 + l])))
    return s, summs


@njit(inline="always")
def _q45_matvec(w, lut, qs, yd, bsums, out, bytes_per_block, high_bits):
    rows = w.shape[0]
    nb = w.shape[1] // bytes_per_block
    t_count = qs.shape[0]
    qs16 = np.empty(qs.shape, np.int16)
    bs32 = np.empty((t_count, nb * 8), np.int32)
    _widen_activations(qs, bsums, qs16, bs32)
    for r in prange(rows):
        for t in range(t_count):
            sumf = _f32(0.0)
            for b in range(nb):
                o = b * bytes_per_block
                s, summs = _q45_superblock(w, r, o, high_bits, qs16, bs32, t, b)
                d = _fp16(w, r, o, lut) * yd[t, b]
                dmin = _fp16(w, r, o + 2, lut) * yd[t, b]
                sumf += d * _f32(s) - dmin * _f32(summs)
            out[t, r] = sumf


@njit(inline="always")
def _q6_terms(w, r, lo, ho, p, c0, c1, c2, c3, qs, t, yh):
    """Values p, p+32, p+64, p+96 of a Q6_K half-block times their scales and q8, unsigned (q + 32)."""
    a = _i32(w[r, lo + p])
    bb = _i32(w[r, lo + 32 + p])
    hh = _i32(w[r, ho + p])
    q1 = _i32(_i32(a & _i32(15)) | _i32(_i32(hh << _i32(4)) & _i32(48)))
    q2 = _i32(_i32(bb & _i32(15)) | _i32(_i32(hh << _i32(2)) & _i32(48)))
    q3 = _i32(_i32(a >> _i32(4)) | _i32(hh & _i32(48)))
    q4 = _i32(_i32(bb >> _i32(4)) | _i32(_i32(hh >> _i32(2)) & _i32(48)))
    s = _i32(_i32(q1 * c0) * _i32(qs[t, yh + p]))
    s = _i32(s + _i32(_i32(q2 * c1) * _i32(qs[t, yh + 32 + p])))
    s = _i32(s + _i32(_i32(q3 * c2) * _i32(qs[t, yh + 64 + p])))
    return _i32(s + _i32(_i32(q4 * c3) * _i32(qs[t, yh + 96 + p])))


@njit(inline="always")
def _q6_superblock(w, r, o, qs, bsums, t, b):
    """Q6_K super-block at w[r, o:] against token t: sum of sc*(q-32)*q8 as int32.

    The quants stay unsigned in the loop and the -32 comes off once per sub-block through the
    activation bsums (sum(sc*(q-32)*y) = sum(sc*q*y) - 32*sum(sc*bsum)), as ggml's AVX2 code does;
    one 16-step loop covers all 16 sub-blocks so there is a single horizontal sum.
    """
    so = o + 192
    c0 = _i32(np.int8(w[r, so]))
    c1 = _i32(np.int8(w[r, so + 1]))
    c2 = _i32(np.int8(w[r, so + 2]))
    c3 = _i32(np.int8(w[r, so + 3]))
    c4 = _i32(np.int8(w[r, so + 4]))
    c5 = _i32(np.int8(w[r, so + 5]))
    c6 = _i32(np.int8(w[r, so + 6]))
    c7 = _i32(np.int8(w[r, so + 7]))
    c8 = _i32(np.int8(w[r, so + 8]))
    c9 = _i32(np.int8(w[r, so + 9]))
    c10 = _i32(np.int8(w[r, so + 10]))
    c11 = _i32(np.int8(w[r, so + 11]))
    c12 = _i32(np.int8(w[r, so + 12]))
    c13 = _i32(np.int8(w[r, so + 13]))
    c14 = _i32(np.int8(w[r, so + 14]))
    c15 = _i32(np.int8(w[r, so + 15]))
    corr = _i32(0)
    for j in range(16):
        corr = _i32(corr + _i32(_i32(np.int8(w[r, so + j])) * _i32(bsums[t, b * 16 + j])))
    yo = b * QK_K
    s = _i32(0)
    for l in range(16):
        s = _i32(s + _q6_terms(w, r, o, o + 128, l, c0, c2, c4, c6, qs, t, yo))
        s = _i32(s + _q6_terms(w, r, o, o + 128, l + 16, c1, c3, c5, c7, qs, t, yo))
        s = _i32(s + _q6_terms(w, r, o + 64, o + 160, l, c8, c10, c12, c14, qs, t, yo + 128))
        s = _i32(s + _q6_terms(w, r, o + 64, o + 160, l + 16, c9, c11, c13, c15, qs, t, yo + 128))
    return _i32(s - _i32(corr * _i32(32)))


@njit(inline="always")
def _expand_q45_K(w, r, i, nb, lut, ws, dr, mr, scb, bytes_per_block, high_bits):
    """Row r of Q4_K/Q5_K into ws[i] (int16 sc*q), dr[i] (fp16 d), mr[i] (dmin*m per sub-block)."""
    for b in range(nb):
        o = b * bytes_per_block
        dr[i, b] = _fp16(w, r, o, lut)
        dmin = _fp16(w, r, o + 2, lut)
        for j in range(8):
            sc, m = _scale_min_k4(w, r, o + 4, j)
            scb[j] = sc
            mr[i, b * 8 + j] = dmin * _f32(m)
        qo = o + (48 if high_bits else 16)
        for j2 in range(4):
            c_lo = scb[2 * j2]
            c_hi = scb[2 * j2 + 1]
            src = qo + 32 * j2
            dst = b * QK_K + 64 * j2
            if high_bits:
                hs = _i32(2 * j2)
                for l in range(32):
                    a = _i32(w[r, src + l])
                    h = _i32(_i32(w[r, o + 16 + l]) >> hs)
                    lo = _i32(_i32(a & _i32(15)) | _i32(_i32(h & _i32(1)) << _i32(4)))
                    hi = _i32(_i32(a >> _i32(4)) | _i32(_i32(h & _i32(2)) << _i32(3)))
                    ws[i, dst + l] = np.int16(_i32(lo * c_lo))
                    ws[i, dst + 32 + l] = np.int16(_i32(hi * c_hi))
            else:
                for l in range(32):
                    a = _i32(w[r, src + l])
                    ws[i, dst + l] = np.int16(_i32(_i32(a & _i32(15)) * c_lo))
                    ws[i, dst + 32 + l] = np.int16(_i32(_i32(a >> _i32(4)) * c_hi))


@njit(inline="always")
def _expand_q6_K(w, r, i, nb, lut, ws, dr):
    """Row r of Q6_K into ws[i] (int16 sc*(q-32)) and dr[i] (fp16 d)."""
    for b in range(nb):
        o = b * Q6_K_BYTES
        dr[i, b] = _fp16(w, r, o + 208, lut)
        for h in range(2):
            lo = o + 64 * h
            ho = o + 128 + 32 * h
            so = o + 192 + 8 * h
            dst = b * QK_K + 128 * h
            for half in range(2):
                c0 = _i32(np.int8(w[r, so + half]))
                c1 = _i32(np.int8(w[r, so + half + 2]))
                c2 = _i32(np.int8(w[r, so + half + 4]))
                c3 = _i32(np.int8(w[r, so + half + 6]))
                for l in range(16):
                    p = l + 16 * half
                    a = _i32(w[r, lo + p])
                    bb = _i32(w[r, lo + 32 + p])
                    hh = _i32(w[r, ho + p])
                    q1 = _i32(_i32(_i32(a & _i32(15)) | _i32(_i32(hh << _i32(4)) & _i32(48))) - _i32(32))
                    q2 = _i32(_i32(_i32(bb & _i32(15)) | _i32(_i32(hh << _i32(2)) & _i32(48))) - _i32(32))
                    q3 = _i32(_i32(_i32(a >> _i32(4)) | _i32(hh & _i32(48))) - _i32(32))
                    q4 = _i32(_i32(_i32(bb >> _i32(4)) | _i32(_i32(hh >> _i32(2)) & _i32(48))) - _i32(32))
                    ws[i, dst + p] = np.int16(_i32(q1 * c0))
                    ws[i, dst + 32 + p] = np.int16(_i32(q2 * c1))
                    ws[i, dst + 64 + p] = np.int16(_i32(q3 * c2))
                    ws[i, dst + 96 + p] = np.int16(_i32(q4 * c3))


@njit(inline="always")
def _tile_dot(ws, dr, mr, nr, r0, qs, yd, bt, has_mins, out):
    """out[t, r0+i] for the nr expanded rows in ws (int16 sc*q), every token t.

    Per super-block one int32 dot of 256 values, scaled by d_w * d_y; the mins of Q4_K/Q5_K come
    off as one float dot of the row's dmin*m against the token's y.d * bsum32.
    """
    t_count = qs.shape[0]
    nb = ws.shape[1] // QK_K
    nm = nb * 8
    for t in range(t_count):
        for i in range(nr):
            acc = _f32(0.0)
            for b in range(nb):
                base = b * QK_K
                s = _i32(0)
                for k in range(QK_K):
                    s = _i32(s + _i32(_i32(ws[i, base + k]) * _i32(qs[t, base + k])))
                acc += (dr[i, b] * yd[t, b]) * _f32(s)
            if has_mins:
                mins = _f32(0.0)
                for k in range(nm):
                    mins += mr[i, k] * bt[t, k]
                acc -= mins
            out[t, r0 + i] = acc


@njit(inline="always")
def _matmat(w, lut, qs, yd, bsums, out, threads, bytes_per_block, kind):
    """Many-token matmul: rows in blocks of ROW_BLOCK expanded once, then dotted with every token.

    kind: 4, 5 or 6 for Q4_K, Q5_K, Q6_K. Each of the ``threads`` chunks owns its scratch and takes
    every ``threads``-th row block.
    """
    rows = w.shape[0]
    nb = w.shape[1] // bytes_per_block
    n = nb * QK_K
    t_count = qs.shape[0]
    bt = np.empty((t_count, nb * 8), np.float32)  # y.d * bsum32, for the mins
    for t in range(t_count):
        for k in range(nb * 8):
            bt[t, k] = yd[t, k // 8] * _f32(_i32(_i32(bsums[t, 2 * k]) + _i32(bsums[t, 2 * k + 1])))
    n_blocks = (rows + ROW_BLOCK - 1) // ROW_BLOCK
    n_chunks = max(1, min(threads, n_blocks))
    for c in prange(n_chunks):
        ws = np.empty((ROW_BLOCK, n), np.int16)
        dr = np.empty((ROW_BLOCK, nb), np.float32)
        mr = np.empty((ROW_BLOCK, nb * 8), np.float32)
        scb = np.empty(8, np.int32)
        for blk in range(c, n_blocks, n_chunks):
            r0 = blk * ROW_BLOCK
            nr = min(ROW_BLOCK, rows - r0)
            for i in range(nr):
                if kind == 6:
                    _expand_q6_K(w, r0 + i, i, nb, lut, ws, dr)
                else:
                    _expand_q45_K(w, r0 + i, i, nb, lut, ws, dr, mr, scb, bytes_per_block, kind == 5)
            _tile_dot(ws, dr, mr, nr, r0, qs, yd, bt, kind != 6, out)


# ---------------------------------------------------------------- the kernels


@njit(parallel=True, fastmath=True, cache=True)
def _q4_K_matvec(
    w: np.ndarray, lut: np.ndarray, qs: np.ndarray, yd: np.ndarray, bsums: np.ndarray, out: np.ndarray
) -> None:
    _q45_matvec(w, lut, qs, yd, bsums, out, Q4_K_BYTES, False)


@njit(parallel=True, fastmath=True, cache=True)
def _q5_K_matvec(
    w: np.ndarray, lut: np.ndarray, qs: np.ndarray, yd: np.ndarray, bsums: np.ndarray, out: np.ndarray
) -> None:
    _q45_matvec(w, lut, qs, yd, bsums, out, Q5_K_BYTES, True)


@njit(parallel=True, fastmath=True, cache=True)
def _q6_K_matvec(
    w: np.ndarray, lut: np.ndarray, qs: np.ndarray, yd: np.ndarray, bsums: np.ndarray, out: np.ndarray
) -> None:
    rows = w.shape[0]
    nb = w.shape[1] // Q6_K_BYTES
    t_count = qs.shape[0]
    for r in prange(rows):
        for t in range(t_count):
            sumf = _f32(0.0)
            for b in range(nb):
                o = b * Q6_K_BYTES
                s = _q6_superblock(w, r, o, qs, bsums, t, b)
                sumf += (_fp16(w, r, o + 208, lut) * yd[t, b]) * _f32(s)
            out[t, r] = sumf


@njit(parallel=True, fastmath=True, cache=True)
def _q4_K_matmat(
    w: np.ndarray,
    lut: np.ndarray,
    qs: np.ndarray,
    yd: np.ndarray,
    bsums: np.ndarray,
    out: np.ndarray,
    threads: int,
) -> None:
    _matmat(w, lut, qs, yd, bsums, out, threads, Q4_K_BYTES, 4)


@njit(parallel=True, fastmath=True, cache=True)
def _q5_K_matmat(
    w: np.ndarray,
    lut: np.ndarray,
    qs: np.ndarray,
    yd: np.ndarray,
    bsums: np.ndarray,
    out: np.ndarray,
    threads: int,
) -> None:
    _matmat(w, lut, qs, yd, bsums, out, threads, Q5_K_BYTES, 5)


@njit(parallel=True, fastmath=True, cache=True)
def _q6_K_matmat(
    w: np.ndarray,
    lut: np.ndarray,
    qs: np.ndarray,
    yd: np.ndarray,
    bsums: np.ndarray,
    out: np.ndarray,
    threads: int,
) -> None:
    _matmat(w, lut, qs, yd, bsums, out, threads, Q6_K_BYTES, 6)


# ---------------------------------------------------------------- dequantize (no fastmath: bit-exact)


@njit(cache=True)
def _dequantize_q45_K(
    w: np.ndarray, lut: np.ndarray, out: np.ndarray, bytes_per_block: int, high_bits: bool
) -> None:
    k = w.shape[0]
    nb = w.shape[1] // bytes_per_block
    qbase = 48 if high_bits else 16
    for r in range(k):
        for b in range(nb):
            o = b * bytes_per_block
            d = _fp16(w, r, o, lut)
            dmin = _fp16(w, r, o + 2, lut)
            for j in range(8):
                sc, m = _scale_min_k4(w, r, o + 4, j)
                d1 = d * _f32(sc)
                m1 = dmin * _f32(m)
                src = o + qbase + (j // 2) * 32
                shift = _i32(4 * (j % 2))
                dst = b * QK_K + j * 32
                for l in range(32):
                    q = _i32(_i32(_i32(w[r, src + l]) >> shift) & _i32(15))
                    if high_bits:
                        q = _i32(q + _i32(_i32(_i32(_i32(w[r, o + 16 + l]) >> _i32(j)) & _i32(1)) << _i32(4)))
                    out[r, dst + l] = d1 * _f32(q) - m1


@njit(cache=True)
def _dequantize_q6_K(w: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    k = w.shape[0]
    nb = w.shape[1] // Q6_K_BYTES
    for r in range(k):
        for b in range(nb):
            o = b * Q6_K_BYTES
            d = _fp16(w, r, o + 208, lut)
            for h in range(2):
                lo = o + 64 * h
                ho = o + 128 + 32 * h
                so = o + 192 + 8 * h
                dst = b * QK_K + 128 * h
                for l in range(32):
                    a = _i32(w[r, lo + l])
                    bb = _i32(w[r, lo + 32 + l])
                    hh = _i32(w[r, ho + l])
                    q1 = _i32(_i32(_i32(a & _i32(15)) | _i32(_i32(hh & _i32(3)) << _i32(4))) - _i32(32))
                    q2 = _i32(
                        _i32(_i32(bb & _i32(15)) | _i32(_i32(_i32(hh >> _i32(2)) & _i32(3)) << _i32(4)))
                        - _i32(32)
                    )
                    q3 = _i32(
                        _i32(_i32(a >> _i32(4)) | _i32(_i32(_i32(hh >> _i32(4)) & _i32(3)) << _i32(4)))
                        - _i32(32)
                    )
                    q4 = _i32(
                        _i32(_i32(bb >> _i32(4)) | _i32(_i32(_i32(hh >> _i32(6)) & _i32(3)) << _i32(4)))
                        - _i32(32)
                    )
                    is_ = l // 16
                    out[r, dst + l] = d * _f32(np.int8(w[r, so + is_])) * _f32(q1)
                    out[r, dst + l + 32] = d * _f32(np.int8(w[r, so + is_ + 2])) * _f32(q2)
                    out[r, dst + l + 64] = d * _f32(np.int8(w[r, so + is_ + 4])) * _f32(q3)
                    out[r, dst + l + 96] = d * _f32(np.int8(w[r, so + is_ + 6])) * _f32(q4)


# ---------------------------------------------------------------- WeightKernel objects


class _KQuantKernel:
    """WeightKernel for one K-quant type (see ``pipx_llama.engine.kernels.WeightKernel``)."""

    def __init__(
        self,
        qtype: GGMLQuantizationType,
        block_bytes: int,
        matvec: Callable,
        matmat: Callable,
        dequant: Callable,
    ) -> None:
        self.qtype = qtype
        self.block_bytes = block_bytes
        self._matvec = matvec
        self._matmat = matmat
        self._dequant = dequant

    def _n(self, w: np.ndarray) -> int:
        if w.ndim != 2 or w.dtype != np.uint8 or w.shape[1] % self.block_bytes:
            raise ValueError(
                f"{self.qtype.name} weights must be uint8 [rows, k*{self.block_bytes}], "
                f"got {w.dtype} {w.shape}"
            )
        return w.shape[1] // self.block_bytes * QK_K

    def matmul(self, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out[t, r] = dot(row r of w, x[t]), with x quantized to Q8_K as ggml does."""
        n = self._n(w)
        if x.ndim != 2 or x.shape[1] != n or out.shape != (x.shape[0], w.shape[0]):
            raise ValueError(
                f"{self.qtype.name} matmul shapes disagree: w {w.shape} ({n} values per row), "
                f"x {x.shape}, out {out.shape}"
            )
        t_count = x.shape[0]
        qs = np.empty((t_count, n), np.int8)
        d = np.empty((t_count, n // QK_K), np.float32)
        bsums = np.empty((t_count, n // 16), np.int16)
        quantize_q8_K(np.ascontiguousarray(x, dtype=np.float32), qs, d, bsums)
        # The kernels are compiled for C-contiguous outputs only (each layout is another compile).
        dst = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)
        if t_count <= MATVEC_MAX_T:
            self._matvec(w, FP16_TABLE, qs, d, bsums, dst)
        else:
            self._matmat(w, FP16_TABLE, qs, d, bsums, dst, get_num_threads())
        if dst is not out:
            out[...] = dst

    def dequantize(self, w: np.ndarray, out: np.ndarray) -> None:
        """w uint8 [k, row_bytes] -> out float32 [k, n], bit-identical to ggml's dequantize_row."""
        n = self._n(w)
        if out.shape != (w.shape[0], n):
            raise ValueError(f"{self.qtype.name} dequantize: out {out.shape} should be {(w.shape[0], n)}")
        dst = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)
        self._dequant(np.ascontiguousarray(w), FP16_TABLE, dst)
        if dst is not out:
            out[...] = dst


def _dequantize_q4_K(w: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    _dequantize_q45_K(w, lut, out, Q4_K_BYTES, False)


def _dequantize_q5_K(w: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:
    _dequantize_q45_K(w, lut, out, Q5_K_BYTES, True)


Q4_K_KERNEL = register(
    _KQuantKernel(GGMLQuantizationType.Q4_K, Q4_K_BYTES, _q4_K_matvec, _q4_K_matmat, _dequantize_q4_K)
)
Q5_K_KERNEL = register(
    _KQuantKernel(GGMLQuantizationType.Q5_K, Q5_K_BYTES, _q5_K_matvec, _q5_K_matmat, _dequantize_q5_K)
)
Q6_K_KERNEL = register(
    _KQuantKernel(GGMLQuantizationType.Q6_K, Q6_K_BYTES, _q6_K_matvec, _q6_K_matmat, _dequantize_q6_K)
)
