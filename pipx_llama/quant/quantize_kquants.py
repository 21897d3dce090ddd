"""Quantizers for ggml's K-quant formats Q4_K, Q5_K and Q6_K (256-weight super-blocks).

The numba kernels are line-by-line ports of ``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref``
and ``quantize_row_q6_K_ref`` in llama.cpp's ``ggml/src/ggml-quants.c`` together with their
helpers ``make_qkx2_quants`` (Q4_K/Q5_K: per 32-weight sub-block a scale and a min fitted by a
weighted least-squares search over candidate scales), ``make_qx_quants`` (Q6_K: per 16-weight
sub-block a scale searched around -32/max), ``nearest_int`` (the 1.5*2**23 rounding trick,
emulated on the bit pattern so even its out-of-range results agree) and ``GGML_FP32_TO_FP16``.
Every float32 operation happens in C's order, with no reassociation or FMA contraction (ggml-base
is compiled without either), so the bytes equal ggml's.

Speed comes from doing that sequential work for many sub-blocks at once: a row's sub-blocks are
transposed into lanes (``xt[i, s]`` = value i of sub-block s, 64 lanes at a time), and every loop
runs over the lanes, which LLVM turns into 8-wide AVX2 code. Each lane still performs C's scalar
operations in C's order (its sums accumulate over i = 0, 1, 2, ...), and C's data-dependent branches
become per-lane selects, so the bytes do not change; it runs about 3-4x faster per thread than ggml.

Kernels: ``x`` float32 [k, n] (n a multiple of 256) -> ``out`` uint8 [k, n/256 * block bytes] and
``status`` uint8 [k] (``STATUS_*`` bits from :mod:`pipx_llama.quant.quantize_legacy`), rows in
parallel (``prange``). Each has a numpy twin ``<name>_ref`` that runs the same arithmetic
vectorized across all sub-blocks with numpy (loops over the 16 or 32 positions of a sub-block, in
order, so every sum is accumulated in C's sequence).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from pipx_llama.formats.fp16 import FP16_TABLE
from pipx_llama.formats.kquants import BLOCK_Q4_K, BLOCK_Q5_K, BLOCK_Q6_K, QK_K
from pipx_llama.formats.kquants import nearest_int as nearest_int_ref
from pipx_llama.quant.quantize_legacy import (
    STATUS_NONFINITE,
    STATUS_SCALE_OVERFLOW,
    RowQuantizer,
    f32_bits,
    fp16_bits,
)

f32 = np.float32
i32 = np.int32
GROUP_MAX_EPS = f32(1e-15)
_MAGIC = f32(12582912.0)

Q4_K_BYTES = BLOCK_Q4_K.itemsize
Q5_K_BYTES = BLOCK_Q5_K.itemsize
Q6_K_BYTES = BLOCK_Q6_K.itemsize


@njit(inline="always")
def nearest_int(v: np.float32) -> np.int32:
    """ggml's ``nearest_int``: round half to even for |v| <= 4194303, the same bits beyond."""
    return i32(i32(f32_bits(v + _MAGIC) & i32(0x007FFFFF)) - i32(0x00400000))


@njit(inline="always")
def _clamp(q: np.int32, lo: np.int32, hi: np.int32) -> np.int32:
    return i32(max(lo, min(hi, q)))


@njit(inline="always")
def _row_status(x: np.ndarray, r: int) -> int:
    """STATUS_NONFINITE if row r holds a NaN or an infinity (its magnitude bits reach the inf pattern)."""
    xi = x[r].view(np.int32)
    m = i32(0)
    for j in range(xi.shape[0]):
        m = max(m, i32(xi[j] & i32(0x7FFFFFFF)))
    return STATUS_NONFINITE if m >= i32(0x7F800000) else 0


@njit(inline="always")
def _store_fp16(out: np.ndarray, r: int, o: int, h: int) -> int:
    out[r, o] = np.uint8(h & 0xFF)
    out[r, o + 1] = np.uint8((h >> 8) & 0xFF)
    return STATUS_SCALE_OVERFLOW if (h & 0x7C00) == 0x7C00 else 0


@njit(inline="always")
def _transpose_in(x: np.ndarray, r: int, base: int, width: int, lanes: int, xt: np.ndarray) -> None:
    """xt[i, s] = x[r, base + s*width + i]: one sub-block per lane, element-major."""
    for i in range(width):
        for s in range(lanes):
            xt[i, s] = x[r, base + s * width + i]


@njit(inline="always")
def make_qkx2_quants(
    xt: np.ndarray, wt: np.ndarray, lanes: int, nmax: int, rmin: np.float32, rdelta: np.float32, nstep: int,
    L: np.ndarray, laux: np.ndarray, v: np.ndarray,
) -> None:
    """``make_qkx2_quants`` (n = 32, use_mad = false) on ``lanes`` sub-blocks at once.

    Lane s is sub-block s: xt, wt [32, lanes] its values and weights, element-major, so every loop
    below runs over lanes (SIMD) while each lane does C's operations in C's order. Results: L [32,
    lanes] (int32), v[0] the scales, v[1] the_min. v [16, lanes] is scratch.
    """
    n = 32
    nm = i32(nmax)
    fn = f32(nmax)
    scale, the_min, mn, mx, sum_w, sum_x, iscale, best = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
    sl, sl2, sxl, tscale, tmin, err, det, better = v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]
    for s in range(lanes):
        mn[s] = xt[0, s]
        mx[s] = xt[0, s]
        sum_w[s] = wt[0, s]
        sum_x[s] = wt[0, s] * xt[0, s]
    for i in range(1, n):
        for s in range(lanes):
            x = xt[i, s]
            w = wt[i, s]
            # C's compare-and-assign, not min()/max(): ties keep the first value (the sign of a zero)
            mn[s] = x if x < mn[s] else mn[s]  # noqa: FURB136
            mx[s] = x if x > mx[s] else mx[s]  # noqa: FURB136
            sum_w[s] += w
            sum_x[s] += w * x
    for s in range(lanes):
        mn[s] = f32(0.0) if mn[s] > f32(0.0) else mn[s]  # noqa: FURB136
        iscale[s] = fn / (mx[s] - mn[s])
        scale[s] = f32(1.0) / iscale[s]
        best[s] = f32(0.0)
    for i in range(n):
        for s in range(lanes):
            x = xt[i, s]
            q = _clamp(nearest_int(iscale[s] * (x - mn[s])), i32(0), nm)
            L[i, s] = q
            diff = scale[s] * f32(q) + mn[s] - x
            best[s] += wt[i, s] * (diff * diff)
    for step in range(nstep + 1):
        num = rmin + rdelta * f32(step) + fn
        for s in range(lanes):
            iscale[s] = num / (mx[s] - mn[s])
            sl[s] = f32(0.0)
            sl2[s] = f32(0.0)
            sxl[s] = f32(0.0)
        for i in range(n):
            for s in range(lanes):
                x = xt[i, s]
                q = _clamp(nearest_int(iscale[s] * (x - mn[s])), i32(0), nm)
                laux[i, s] = q
                w = wt[i, s]
                fq = f32(q)
                sl[s] += w * fq
                sl2[s] += w * fq * fq
                sxl[s] += w * fq * x
        for s in range(lanes):
            d = sum_w[s] * sl2[s] - sl[s] * sl[s]
            det[s] = d
            ts = (sum_w[s] * sxl[s] - sum_x[s] * sl[s]) / d
            tm = (sl2[s] * sum_x[s] - sl[s] * sxl[s]) / d
            clip = tm > f32(0.0)
            tmin[s] = f32(0.0) if clip else tm
            tscale[s] = sxl[s] / sl2[s] if clip else ts
            err[s] = f32(0.0)
        for i in range(n):
            for s in range(lanes):
                diff = tscale[s] * f32(laux[i, s]) + tmin[s] - xt[i, s]
                err[s] += wt[i, s] * (diff * diff)
        for s in range(lanes):
            ok = det[s] > f32(0.0) and err[s] < best[s]
            better[s] = f32(1.0) if ok else f32(0.0)
            best[s] = err[s] if ok else best[s]
            scale[s] = tscale[s] if ok else scale[s]
            mn[s] = tmin[s] if ok else mn[s]
        for i in range(n):
            for s in range(lanes):
                L[i, s] = laux[i, s] if better[s] != f32(0.0) else L[i, s]
    for s in range(lanes):
        # C returns early for a flat sub-block (max == min after min is capped at 0)
        if mx[s] == mn[s]:
            scale[s] = f32(0.0)
            for i in range(n):
                L[i, s] = 0
        the_min[s] = -mn[s]


@njit(inline="always")
def _scale_min_k4(j: int, s: np.ndarray) -> tuple[int, int]:
    """``get_scale_min_k4`` on the 12 packed scale bytes s."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


@njit(inline="always")
def _q45_K_superblock(
    x: np.ndarray,
    r: int,
    xb: int,
    lane0: int,
    nmax: int,
    scale: np.ndarray,
    the_min: np.ndarray,
    L: np.ndarray,
    s12: np.ndarray,
    lf: np.ndarray,
    table: np.ndarray,
) -> tuple[int, int]:
    """The rest of ``quantize_row_q{4,5}_K_ref`` for one super-block whose sub-blocks are lanes
    lane0..lane0+7: 6-bit scales and mins into s12, final quants into lf. Returns fp16 bits of d, dmin."""
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(8):
        sc = scale[lane0 + j]
        mn = the_min[lane0 + j]
        # C's compare-and-assign: NaN never compares above
        if sc > max_scale:  # noqa: PLR1730
            max_scale = sc
        if mn > max_min:  # noqa: PLR1730
            max_min = mn
    inv_scale = f32(63.0) / max_scale if max_scale > f32(0.0) else f32(0.0)
    inv_min = f32(63.0) / max_min if max_min > f32(0.0) else f32(0.0)
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scale[lane0 + j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * the_min[lane0 + j]) & 0xFF)
        if j < 4:
            s12[j] = ls
            s12[j + 4] = lm
        else:
            s12[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            s12[j - 4] |= (ls >> 4) << 6
            s12[j] |= (lm >> 4) << 6
    hd = fp16_bits(max_scale / f32(63.0))
    hm = fp16_bits(max_min / f32(63.0))
    dd = table[hd]
    dmin = table[hm]
    nm = i32(nmax)
    for j in range(8):
        sc, m = _scale_min_k4(j, s12)
        d = dd * f32(sc)
        if d == f32(0.0):
            for k in range(32):
                lf[32 * j + k] = L[k, lane0 + j]
            continue
        dm = dmin * f32(m)
        for k in range(32):
            lf[32 * j + k] = _clamp(nearest_int((x[r, xb + 32 * j + k] + dm) / d), i32(0), nm)
    return hd, hm


@njit(inline="always")
def _q45_K_row(x: np.ndarray, out: np.ndarray, r: int, q5: bool, table: np.ndarray) -> int:
    """``quantize_row_q4_K_ref`` (or q5_K with ``q5``) of row r, 8 super-blocks (64 lanes) at a time."""
    nmax = 31 if q5 else 15
    rmin = f32(-0.5) if q5 else f32(-1.0)
    nstep = 15 if q5 else 20
    bs = Q5_K_BYTES if q5 else Q4_K_BYTES
    lanes_max = 64
    xt = np.empty((32, lanes_max), np.float32)
    wt = np.empty((32, lanes_max), np.float32)
    L = np.empty((32, lanes_max), np.int32)
    laux = np.empty((32, lanes_max), np.int32)
    v = np.empty((16, lanes_max), np.float32)
    av = np.empty(lanes_max, np.float32)
    s12 = np.empty(12, np.int64)
    lf = np.empty(QK_K, np.int32)
    qh = np.empty(32, np.int64)
    st = _row_status(x, r)
    nsb = x.shape[1] // QK_K
    for sb0 in range(0, nsb, 8):
        nb = min(8, nsb - sb0)
        lanes = nb * 8
        base = sb0 * QK_K
        _transpose_in(x, r, base, 32, lanes, xt)
        # weights av_x + |x|, av_x = sqrtf(sum x^2 / 32) summed in element order
        for s in range(lanes):
            av[s] = f32(0.0)
        for i in range(32):
            for s in range(lanes):
                av[s] += xt[i, s] * xt[i, s]
        for s in range(lanes):
            av[s] = f32(math.sqrt(av[s] / f32(32.0)))
        for i in range(32):
            for s in range(lanes):
                wt[i, s] = av[s] + abs(xt[i, s])
        make_qkx2_quants(xt, wt, lanes, nmax, rmin, f32(0.1), nstep, L, laux, v)
        for b in range(nb):
            o = (sb0 + b) * bs
            hd, hm = _q45_K_superblock(x, r, base + b * QK_K, b * 8, nmax, v[0], v[1], L, s12, lf, table)
            st |= _store_fp16(out, r, o, hd) | _store_fp16(out, r, o + 2, hm)
            for k in range(12):
                out[r, o + 4 + k] = np.uint8(s12[k])
            if not q5:
                for j in range(4):
                    for k in range(32):
                        out[r, o + 16 + 32 * j + k] = np.uint8(lf[64 * j + k] | (lf[64 * j + 32 + k] << 4))
                continue
            qh[:] = 0
            for j in range(4):
                for k in range(32):
                    l1 = lf[64 * j + k]
                    l2 = lf[64 * j + 32 + k]
                    qh[k] |= ((l1 >> 4) & 1) << (2 * j) | ((l2 >> 4) & 1) << (2 * j + 1)
                    out[r, o + 48 + 32 * j + k] = np.uint8((l1 & 0xF) | ((l2 & 0xF) << 4))
            for k in range(32):
                out[r, o + 16 + k] = np.uint8(qh[k])
    return st


@njit(cache=True, parallel=True, nogil=True)
def quantize_q4_K(x: np.ndarray, out: np.ndarray, status: np.ndarray, table: np.ndarray) -> None:
    """``quantize_row_q4_K_ref`` on each row (make_qkx2_quants with nmax 15, -1 + 0.1*i, 21 steps)."""
    for r in prange(x.shape[0]):
        status[r] = _q45_K_row(x, out, r, False, table)


@njit(cache=True, parallel=True, nogil=True)
def quantize_q5_K(x: np.ndarray, out: np.ndarray, status: np.ndarray, table: np.ndarray) -> None:
    """``quantize_row_q5_K_ref`` on each row (make_qkx2_quants with nmax 31, -0.5 + 0.1*i, 16 steps)."""
    for r in prange(x.shape[0]):
        status[r] = _q45_K_row(x, out, r, True, table)


@njit(inline="always")
def _qx_fit(xt: np.ndarray, lanes: int, iscale: np.ndarray, laux: np.ndarray, sumlx: np.ndarray,
            suml2: np.ndarray) -> None:
    """One candidate scale of make_qx_quants(rmse_type 1) on every lane: quants and weighted sums."""
    for s in range(lanes):
        sumlx[s] = f32(0.0)
        suml2[s] = f32(0.0)
    for i in range(16):
        for s in range(lanes):
            x = xt[i, s]
            q = _clamp(nearest_int(iscale[s] * x), i32(-32), i32(31))
            laux[i, s] = q
            w = x * x
            fq = f32(q)
            sumlx[s] += w * x * fq
            suml2[s] += w * fq * fq


@njit(inline="always")
def make_qx_quants_q6(xt: np.ndarray, lanes: int, L: np.ndarray, laux: np.ndarray, v: np.ndarray) -> None:
    """``make_qx_quants(16, 32, x, L, 1, NULL)`` on ``lanes`` 16-value sub-blocks (xt [16, lanes]).

    Weights x*x; the scale -32/max and 18 neighbours (nmax + 0.1*is, is = -9..9) are tried. Results:
    L [16, lanes] (quants + 32), v[0] the scales; v [8, lanes] is scratch.
    """
    scale, amax, mx, iscale, sumlx, suml2, best = v[0], v[1], v[2], v[3], v[4], v[5], v[6]
    for s in range(lanes):
        amax[s] = f32(0.0)
        mx[s] = f32(0.0)
    for i in range(16):
        for s in range(lanes):
            x = xt[i, s]
            ax = abs(x)
            bigger = ax > amax[s]
            amax[s] = ax if bigger else amax[s]
            mx[s] = x if bigger else mx[s]
    for s in range(lanes):
        iscale[s] = f32(-32.0) / mx[s]
    _qx_fit(xt, lanes, iscale, laux, sumlx, suml2)
    for i in range(16):
        for s in range(lanes):
            L[i, s] = laux[i, s] + i32(32)
    for s in range(lanes):
        scale[s] = sumlx[s] / suml2[s] if suml2[s] != f32(0.0) else f32(0.0)
        best[s] = scale[s] * sumlx[s]
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(f32(32.0) + f32(0.1) * f32(step))
        for s in range(lanes):
            iscale[s] = num / mx[s]
        _qx_fit(xt, lanes, iscale, laux, sumlx, suml2)
        for s in range(lanes):
            ok = suml2[s] > f32(0.0) and sumlx[s] * sumlx[s] > best[s] * suml2[s]
            iscale[s] = f32(1.0) if ok else f32(0.0)
            scale[s] = sumlx[s] / suml2[s] if ok else scale[s]
            best[s] = scale[s] * sumlx[s] if ok else best[s]
        for i in range(16):
            for s in range(lanes):
                L[i, s] = laux[i, s] + i32(32) if iscale[s] != f32(0.0) else L[i, s]
    for s in range(lanes):
        if amax[s] < GROUP_MAX_EPS:
            scale[s] = f32(0.0)
            for i in range(16):
                L[i, s] = 0


@njit(inline="always")
def _q6_K_row(x: np.ndarray, out: np.ndarray, r: int, table: np.ndarray) -> int:
    """``quantize_row_q6_K_ref`` of row r, 4 super-blocks (64 sub-block lanes) at a time."""
    lanes_max = 64
    xt = np.empty((16, lanes_max), np.float32)
    L = np.empty((16, lanes_max), np.int32)
    laux = np.empty((16, lanes_max), np.int32)
    v = np.empty((8, lanes_max), np.float32)
    lf = np.empty(QK_K, np.int32)
    sc8 = np.empty(16, np.int64)
    st = _row_status(x, r)
    nsb = x.shape[1] // QK_K
    for sb0 in range(0, nsb, 4):
        nb = min(4, nsb - sb0)
        lanes = nb * 16
        base = sb0 * QK_K
        _transpose_in(x, r, base, 16, lanes, xt)
        make_qx_quants_q6(xt, lanes, L, laux, v)
        scales = v[0]
        for b in range(nb):
            o = (sb0 + b) * Q6_K_BYTES
            xb = base + b * QK_K
            max_scale = f32(0.0)
            max_abs_scale = f32(0.0)
            for ib in range(16):
                sc = scales[b * 16 + ib]
                if abs(sc) > max_abs_scale:
                    max_abs_scale = abs(sc)
                    max_scale = sc
            if max_abs_scale < GROUP_MAX_EPS:
                for k in range(Q6_K_BYTES):
                    out[r, o + k] = 0
                continue
            iscale = f32(-128.0) / max_scale
            h = fp16_bits(f32(1.0) / iscale)
            st |= _store_fp16(out, r, o + 208, h)
            for ib in range(16):
                sc8[ib] = ((min(127, nearest_int(iscale * scales[b * 16 + ib])) & 0xFF) ^ 0x80) - 0x80
                out[r, o + 192 + ib] = np.uint8(sc8[ib] & 0xFF)
            dd = table[h]
            for j in range(16):
                d = dd * f32(sc8[j])
                if d == f32(0.0):
                    for k in range(16):
                        lf[16 * j + k] = L[k, b * 16 + j]
                    continue
                for k in range(16):
                    lf[16 * j + k] = _clamp(nearest_int(x[r, xb + 16 * j + k] / d), i32(-32), i32(31)) + i32(
                        32
                    )
            for half in range(2):
                lb = 128 * half
                for k in range(32):
                    q1 = lf[lb + k]
                    q2 = lf[lb + k + 32]
                    q3 = lf[lb + k + 64]
                    q4 = lf[lb + k + 96]
                    out[r, o + 64 * half + k] = np.uint8((q1 & 0xF) | ((q3 & 0xF) << 4))
                    out[r, o + 64 * half + 32 + k] = np.uint8((q2 & 0xF) | ((q4 & 0xF) << 4))
                    out[r, o + 128 + 32 * half + k] = np.uint8(
                        ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)) & 0xFF
                    )
    return st


@njit(cache=True, parallel=True, nogil=True)
def quantize_q6_K(x: np.ndarray, out: np.ndarray, status: np.ndarray, table: np.ndarray) -> None:
    """``quantize_row_q6_K_ref`` on each row: 16 sub-block scales as int8 of one fp16 d."""
    for r in prange(x.shape[0]):
        status[r] = _q6_K_row(x, out, r, table)


# --- numpy twins --------------------------------------------------------------------------------


def _fp16_ref(v: np.ndarray) -> np.ndarray:
    """float32 -> (fp16 bits as uint16, the fp16 value as float32), round to nearest even."""
    with np.errstate(over="ignore"):
        h = np.asarray(v, dtype=np.float32).astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


def _superblocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"K-quants need float32 rows [k, a multiple of {QK_K}], got {x.shape}")
    return x.reshape(-1, QK_K)


def make_qkx2_quants_ref(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy twin of ``make_qkx2_quants`` for many sub-blocks x [m, n]: (L int64 [m, n], scale, the_min)."""
    m, n = x.shape
    f = np.float32
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    sum_w = weights[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        sum_w = sum_w + weights[:, i]
        sum_x = sum_x + weights[:, i] * x[:, i]
    mn = np.where(mn > 0, f(0), mn)
    flat = mx == mn
    span = np.where(flat, f(1), mx - mn)
    iscale = f(nmax) / span
    scale = f(1) / iscale
    L = np.clip(nearest_int_ref(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(np.int64)
    best = np.zeros(m, f)
    for i in range(n):
        diff = scale * L[:, i].astype(f) + mn - x[:, i]
        best = best + weights[:, i] * (diff * diff)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            # C divides by (max - min) with the min of the best fit so far
            span = np.where(flat, f(1), mx - mn)
            iscale = (f(rmin) + f(rdelta) * f(step) + f(nmax)) / span
            laux = np.clip(nearest_int_ref(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(np.int64)
            lf = laux.astype(f)
            sum_l = np.zeros(m, f)
            sum_l2 = np.zeros(m, f)
            sum_xl = np.zeros(m, f)
            for i in range(n):
                w = weights[:, i]
                sum_l = sum_l + w * lf[:, i]
                sum_l2 = sum_l2 + w * lf[:, i] * lf[:, i]
                sum_xl = sum_xl + w * lf[:, i] * x[:, i]
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clip = this_min > 0
            this_min = np.where(clip, f(0), this_min)
            this_scale = np.where(clip, sum_xl / sum_l2, this_scale)
            err = np.zeros(m, f)
            for i in range(n):
                diff = this_scale * lf[:, i] + this_min - x[:, i]
                err = err + weights[:, i] * (diff * diff)
            better = (det > 0) & (err < best) & ~flat
            L = np.where(better[:, None], laux, L)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, f(0), scale)
    return L, scale.astype(f), (-mn).astype(f)


def _q45_K_ref(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Shared part of the Q4_K/Q5_K twins: (L [B, 256], scale bytes [B, 12], d bits, dmin bits)."""
    f = np.float32
    xb = _superblocks(x)
    nb = xb.shape[0]
    sub = xb.reshape(nb * 8, 32)
    sum_x2 = np.zeros(nb * 8, f)
    for k in range(32):
        sum_x2 = sum_x2 + sub[:, k] * sub[:, k]
    av_x = np.sqrt(sum_x2 / f(32))
    weights = av_x[:, None] + np.abs(sub)
    L, scales, mins = make_qkx2_quants_ref(sub, weights, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    # C keeps the largest value above 0 it meets; NaN never compares above
    max_scale = np.where(scales > 0, scales, f(0)).max(axis=1)
    max_min = np.where(mins > 0, mins, f(0)).max(axis=1)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f(63) / max_scale, f(0)).astype(f)
        inv_min = np.where(max_min > 0, f(63) / max_min, f(0)).astype(f)
    ls = np.minimum(63, nearest_int_ref(inv_scale[:, None] * scales) & 0xFF).astype(np.int64)
    lm = np.minimum(63, nearest_int_ref(inv_min[:, None] * mins) & 0xFF).astype(np.int64)
    s = np.zeros((nb, 12), np.int64)
    s[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    s[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    hd, dd = _fp16_ref(max_scale / f(63))
    hm, dmin = _fp16_ref(max_min / f(63))
    d = dd[:, None] * ls.astype(f)
    dm = dmin[:, None] * lm.astype(f)
    L = L.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        fresh = np.clip(nearest_int_ref((xb.reshape(nb, 8, 32) + dm[..., None]) / d[..., None]), 0, nmax)
    L = np.where((d != 0)[..., None], fresh, L).reshape(nb, QK_K)
    return L, s, hd, hm


def _fp16_bytes(h: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(h.astype("<u2")).view(np.uint8).reshape(-1, 2)


def quantize_q4_K_ref(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``quantize_q4_K``: float32 [k, n] -> uint8 [k, n/256*144]."""
    L, s, hd, hm = _q45_K_ref(x, 15, -1.0, 0.1, 20)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate(
        [_fp16_bytes(hd), _fp16_bytes(hm), s.astype(np.uint8), qs.astype(np.uint8)], axis=1
    )
    return blocks.reshape(x.shape[0], -1)


def quantize_q5_K_ref(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``quantize_q5_K``: float32 [k, n] -> uint8 [k, n/256*176]."""
    L, s, hd, hm = _q45_K_ref(x, 31, -0.5, 0.1, 15)
    q = L.reshape(-1, 4, 2, 32)
    low = q & 0xF
    high = (q >> 4) & 1
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    shifts = np.arange(8).reshape(1, 4, 2, 1)
    qh = (high << shifts).sum(axis=(1, 2))
    blocks = np.concatenate(
        [_fp16_bytes(hd), _fp16_bytes(hm), s.astype(np.uint8), qh.astype(np.uint8), qs.astype(np.uint8)],
        axis=1,
    )
    return blocks.reshape(x.shape[0], -1)


def make_qx_quants_q6_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of ``make_qx_quants(16, 32, x, L, 1, NULL)`` for sub-blocks x [m, 16]: (L, scale)."""
    f = np.float32
    nmax = 32
    m, n = x.shape
    ax = np.abs(x)
    amax = ax.max(axis=1)
    mx = np.take_along_axis(x, ax.argmax(axis=1)[:, None], axis=1)[:, 0]
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, f(1), mx)
    w = x * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = np.clip(nearest_int_ref(iscale[:, None] * x), -32, 31).astype(np.int64)
        fq = q.astype(f)
        sumlx = np.zeros(m, f)
        suml2 = np.zeros(m, f)
        for i in range(n):
            sumlx = sumlx + w[:, i] * x[:, i] * fq[:, i]
            suml2 = suml2 + w[:, i] * fq[:, i] * fq[:, i]
        return q, sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q, sumlx, suml2 = fit(f(-nmax) / mx)
        L = q + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, f(0)).astype(f)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            q, sumlx, suml2 = fit(-(f(nmax) + f(0.1) * f(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], q + nmax, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero[:, None], 0, L), np.where(zero, f(0), scale).astype(f)


def quantize_q6_K_ref(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``quantize_q6_K``: float32 [k, n] -> uint8 [k, n/256*210]."""
    f = np.float32
    xb = _superblocks(x)
    nb = xb.shape[0]
    L, scales = make_qx_quants_q6_ref(xb.reshape(nb * 16, 16))
    L = L.reshape(nb, 16, 16)
    scales = scales.reshape(nb, 16)
    first = np.where(np.isnan(scales), f(0), np.abs(scales)).argmax(axis=1)
    max_scale = np.take_along_axis(scales, first[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.where(zero, f(0), f(-128) / np.where(zero, f(1), max_scale)).astype(f)
        hd, dd = _fp16_ref(f(1) / iscale)
        sc = np.minimum(127, nearest_int_ref(iscale[:, None] * scales)).astype(np.int64)
        sc = ((sc & 0xFF) ^ 0x80) - 0x80
        d = dd[:, None] * sc.astype(f)
        fresh = np.clip(nearest_int_ref(xb.reshape(nb, 16, 16) / d[..., None]), -32, 31) + 32
    L = np.where((d != 0)[..., None], fresh, L).reshape(nb, 2, 4, 32)
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    blocks = np.concatenate([ql.astype(np.uint8), qh.reshape(nb, 64).astype(np.uint8),
                             (sc & 0xFF).astype(np.uint8), _fp16_bytes(hd)], axis=1)
    blocks[zero] = 0
    return blocks.reshape(x.shape[0], -1)


def _with_table(kernel: Callable) -> Callable:
    def run(x: np.ndarray, out: np.ndarray, status: np.ndarray) -> None:
        kernel(x, out, status, FP16_TABLE)

    run.__name__ = kernel.__name__
    run.__doc__ = kernel.__doc__
    return run


KQUANT_QUANTIZERS: dict[GGMLQuantizationType, RowQuantizer] = {
    q.qtype: q
    for q in (
        RowQuantizer(GGMLQuantizationType.Q4_K, _with_table(quantize_q4_K), quantize_q4_K_ref),
        RowQuantizer(GGMLQuantizationType.Q5_K, _with_table(quantize_q5_K), quantize_q5_K_ref),
        RowQuantizer(GGMLQuantizationType.Q6_K, _with_table(quantize_q6_K), quantize_q6_K_ref),
    )
}
