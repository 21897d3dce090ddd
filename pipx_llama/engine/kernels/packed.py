"""Weights repacked at load time for the SIMD kernels: 16 rows interleaved per group ("rows as lanes").

A packed tensor keeps the exact bits of its ggml blocks, only reordered: for each group of 16
consecutive rows and each block of columns, one record holds the 16 rows' quants so that a single
vector load gives every row four consecutive quants (one 32-bit lane per row), followed by the 16
rows' scales. The kernels in :mod:`pipx_llama.engine.kernels.simd` then multiply four quants per
lane per instruction against four broadcast activation bytes, and need no horizontal sum at all:
each lane is one output row. Rows past the end of a tensor whose row count is not a multiple of
16 are zero padding.

Results are bit-identical to the portable kernels of :mod:`~pipx_llama.engine.kernels.legacy`
(same integer block sums, same float32 operations in the same order); the tests compare them.

Every kind also has a "plain" form (``PLAIN_OF_QTYPE``): the ggml rows as they are, read in place
from the mapped file, and ``matmul_range`` runs portable loops over them with the integer sums and
float32 operations of the per-op kernels (bit-identical for the legacy types; the K-quants, like the
per-op ones, with fastmath). Without a SIMD tier (not x86, or no AVX2) these loops are the portable
tier: no x86 intrinsic, loop shapes LLVM vectorizes for NEON as for AVX2. They keep the generation
of small models on the barrier-free fused pass; prompts go through the per-op path, whose kernels
share the decoding of a block among many tokens, and big models stay there entirely
(model._pack, model.Context.eval).

``matmul_range`` computes rows of groups ``g0..g1`` for tokens ``t0..t1`` -- the unit of work the
fused forward pass (:mod:`~pipx_llama.engine.kernels.fused`) deals to its threads.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, types
from numba.extending import NativeValue, models, overload, register_model, typeof_impl, unbox

from pipx_llama.engine.kernels import simd
from pipx_llama.engine.kernels.kquants import _q6_superblock, _q45_superblock
from pipx_llama.engine.kernels.legacy import _dot_q4, _dot_q5, _dot_q8, _qh
from pipx_llama.engine.kernels.ops import block32_sum_i8, f16_bits_to_f32

Q = GGMLQuantizationType
LANES = simd.LANES

# kinds of packed tensors (the fused forward pass dispatches on these)
KIND_Q4_0 = 1
KIND_Q4_1 = 2
KIND_Q8_0 = 3
KIND_Q4_K = 4
KIND_Q6_K = 5
KIND_Q5_0 = 6
KIND_Q5_1 = 7
KIND_Q5_K = 8
KIND_P_Q4_0 = 9  # plain kinds: ggml rows as they are, read in place (see the module docstring)
KIND_P_Q4_1 = 10
KIND_P_Q8_0 = 11
KIND_P_Q4_K = 12
KIND_P_Q6_K = 13
KIND_P_Q5_0 = 14
KIND_P_Q5_1 = 15
KIND_P_Q5_K = 16
PLAIN_KINDS = (KIND_P_Q4_0, KIND_P_Q4_1, KIND_P_Q8_0, KIND_P_Q4_K, KIND_P_Q6_K, KIND_P_Q5_0, KIND_P_Q5_1,
               KIND_P_Q5_K)

# ggml block: (elements, bytes, header bytes before the quants)
_GGML = {KIND_Q4_0: (32, 18, 2), KIND_Q4_1: (32, 20, 4), KIND_Q8_0: (32, 34, 2), KIND_Q4_K: (256, 144, 0),
         KIND_Q6_K: (256, 210, 0), KIND_Q5_0: (32, 22, 6), KIND_Q5_1: (32, 24, 8), KIND_Q5_K: (256, 176, 0)}
_GGML.update({KIND_P_Q4_0 + i: _GGML[KIND_Q4_0 + i] for i in range(8)})
KIND_OF_QTYPE = {Q.Q4_0: KIND_Q4_0, Q.Q4_1: KIND_Q4_1, Q.Q8_0: KIND_Q8_0, Q.Q4_K: KIND_Q4_K,
                 Q.Q6_K: KIND_Q6_K, Q.Q5_0: KIND_Q5_0, Q.Q5_1: KIND_Q5_1, Q.Q5_K: KIND_Q5_K}
PLAIN_OF_QTYPE = {q: k + KIND_P_Q4_0 - KIND_Q4_0 for q, k in KIND_OF_QTYPE.items()}
RECORD_BYTES = {KIND_Q4_0: 288, KIND_Q4_1: 320, KIND_Q8_0: 544, KIND_Q4_K: 2368, KIND_Q6_K: 3360,
                KIND_Q5_0: 352, KIND_Q5_1: 384, KIND_Q5_K: 2880}
BLOCK_ELEMENTS = {k: v[0] for k, v in _GGML.items()}

# activations each kind multiplies with (bit flags): Q8_0/Q8_1 blocks of 32, or Q8_K super-blocks
ACT_Q8 = 1
ACT_Q8K = 2
_ACT_OF_QTYPE = {Q.Q4_0: ACT_Q8, Q.Q4_1: ACT_Q8, Q.Q8_0: ACT_Q8, Q.Q4_K: ACT_Q8K, Q.Q6_K: ACT_Q8K,
                 Q.Q5_0: ACT_Q8, Q.Q5_1: ACT_Q8, Q.Q5_K: ACT_Q8K}
ACTIVATIONS = {k: _ACT_OF_QTYPE[q] for q, k in KIND_OF_QTYPE.items()}
ACTIVATIONS.update({k: _ACT_OF_QTYPE[q] for q, k in PLAIN_OF_QTYPE.items()})


SIMD = simd.TIER is not None  # packed kinds exist on this machine; plain kinds exist everywhere


def supported(qtype: GGMLQuantizationType, plain: bool = False) -> bool:
    """Whether tensors of ``qtype`` have a packed form on this machine (or a plain one, anywhere)."""
    return (plain or SIMD) and qtype in KIND_OF_QTYPE


def packed_bytes(kind: int, rows: int, cols: int) -> int:
    if kind in PLAIN_KINDS:
        return 0  # used in place, in the mapped file
    groups = (rows + LANES - 1) // LANES
    return groups * (cols // BLOCK_ELEMENTS[kind]) * RECORD_BYTES[kind]


# ----------------------------------------------------------------------------- repacking


@njit(inline="always")
def _u32(w, row, i):
    """The little-endian uint32 at w[row, i:i+4] (LLVM turns the four byte loads into one)."""
    return (np.uint32(w[row, i]) | (np.uint32(w[row, i + 1]) << np.uint32(8))
            | (np.uint32(w[row, i + 2]) << np.uint32(16)) | (np.uint32(w[row, i + 3]) << np.uint32(24)))


@njit(inline="always")
def _u16(w, row, i):
    return np.uint16(w[row, i]) | (np.uint16(w[row, i + 1]) << np.uint16(8))


@njit(inline="always")
def _reorder_qh(h):
    """Q5 fifth bits (bit j: element j) as the kernels read them: bit 8i+k = element 4k+i,
    8i+4+k = 16+4k+i."""
    out = np.uint32(0)
    one = np.uint32(1)
    for k in range(4):
        for i in range(4):
            out |= ((h >> np.uint32(4 * k + i)) & one) << np.uint32(8 * i + k)
            out |= ((h >> np.uint32(16 + 4 * k + i)) & one) << np.uint32(8 * i + 4 + k)
    return out


@njit(cache=True, nogil=True)
def _repack_legacy(w: np.ndarray, out: np.ndarray, block_bytes: int, header: int, has_min: bool,
                   qh_at: int) -> None:
    """ggml blocks w uint8 [rows, nb*block_bytes] -> records in out (see simd.py for the layout).

    ``qh_at``: byte offset of a Q5 block's fifth bits, -1 for the other types. Records and tensors
    start 4-byte aligned, so the quants move as uint32 and the scales as uint16. Lanes past the
    last row stay zero.
    """
    rows = w.shape[0]
    nb = w.shape[1] // block_bytes
    nq = block_bytes - header  # quant bytes per block (16 or 32)
    qh_bytes = 4 * LANES if qh_at >= 0 else 0
    rec = nq * LANES + qh_bytes + 2 * LANES * (2 if has_min else 1)
    groups = (rows + LANES - 1) // LANES
    out32 = out.view(np.uint32)
    out16 = out.view(np.uint16)
    for g in range(groups):
        base = g * nb * rec
        if rows - g * LANES < LANES:
            out[base : base + nb * rec] = 0
        for r in range(min(LANES, rows - g * LANES)):
            row = g * LANES + r
            for b in range(nb):
                o = base + b * rec
                src = b * block_bytes
                for k in range(nq // 4):
                    out32[(o + k * 4 * LANES) // 4 + r] = _u32(w, row, src + header + 4 * k)
                if qh_at >= 0:
                    out32[(o + nq * LANES) // 4 + r] = _reorder_qh(_u32(w, row, src + qh_at))
                out16[(o + nq * LANES + qh_bytes) // 2 + r] = _u16(w, row, src)
                if has_min:
                    out16[(o + nq * LANES + qh_bytes + 2 * LANES) // 2 + r] = _u16(w, row, src + 2)


@njit(inline="always")
def _copy_steps(w, row, src, n_steps, out32, o, r):
    """Bytes src..src+4*n_steps of ``row`` into steps [k][lane r][4] at byte o of the records."""
    for k in range(n_steps):
        out32[(o + k * 4 * LANES) // 4 + r] = _u32(w, row, src + 4 * k)


@njit(cache=True, nogil=True)
def _repack_q45_K(w: np.ndarray, out: np.ndarray, high_bits: bool) -> None:
    """Q4_K rows, or Q5_K ones (``high_bits``: their fifth bits go after the quants, the rest 512 bytes
    on)."""
    rows = w.shape[0]
    bb = 176 if high_bits else 144
    nb = w.shape[1] // bb
    extra = 512 if high_bits else 0
    rec = 2368 + extra
    groups = (rows + LANES - 1) // LANES
    out32 = out.view(np.uint32)
    for g in range(groups):
        if rows - g * LANES < LANES:
            out[g * nb * rec : (g + 1) * nb * rec] = 0
        for b in range(nb):
            o = (g * nb + b) * rec
            for r in range(min(LANES, rows - g * LANES)):
                row = g * LANES + r
                src = b * bb
                if high_bits:
                    for k in range(32):
                        out32[(o + _Q5_QS_AT[k]) // 4 + r] = _u32(w, row, src + 48 + 4 * k)
                    for kk in range(8):
                        out32[(o + _Q5_QH_AT[kk]) // 4 + r] = _u32(w, row, src + 16 + 4 * kk)
                else:
                    _copy_steps(w, row, src + 16, 32, out32, o, r)
                for j in range(8):
                    if j < 4:
                        sc = w[row, src + 4 + j] & 63
                        m = w[row, src + 4 + j + 4] & 63
                    else:
                        sc = (w[row, src + 4 + j + 4] & 15) | ((w[row, src + 4 + j - 4] >> 6) << 4)
                        m = (w[row, src + 4 + j + 4] >> 4) | ((w[row, src + 4 + j] >> 6) << 4)
                    out[o + extra + 2048 + j * LANES + r] = sc
                    out[o + extra + 2176 + j * LANES + r] = m
                for i in range(2):
                    out[o + extra + 2304 + 2 * r + i] = w[row, src + i]
                    out[o + extra + 2336 + 2 * r + i] = w[row, src + 2 + i]


# Where each ggml step lands in a K-quant record whose kernel reads out of ggml's order (the layouts are
# simd.py's; numba freezes these tables into the repack loops)
_Q5_QS_AT = np.array([simd.k5_qs(k // 8, k % 8) for k in range(32)], np.int64)  # qs step k = 8 * pair + kk
_Q5_QH_AT = np.array([simd.k5_qh(kk) for kk in range(8)], np.int64)
_Q6_QL_AT = np.array([simd.q6_ql(k) for k in range(32)], np.int64)
_Q6_QH_AT = np.array([simd.q6_qh(j) for j in range(16)], np.int64)
_Q6_SC_AT = np.array([simd.q6_scale(s) for s in range(16)], np.int64)


@njit(cache=True, nogil=True)
def _repack_q6_K(w: np.ndarray, out: np.ndarray) -> None:
    rows = w.shape[0]
    nb = w.shape[1] // 210
    rec = 3360
    groups = (rows + LANES - 1) // LANES
    out32 = out.view(np.uint32)
    for g in range(groups):
        if rows - g * LANES < LANES:
            out[g * nb * rec : (g + 1) * nb * rec] = 0
        for b in range(nb):
            o = (g * nb + b) * rec
            for r in range(min(LANES, rows - g * LANES)):
                row = g * LANES + r
                src = b * 210
                for k in range(32):
                    out32[(o + _Q6_QL_AT[k]) // 4 + r] = _u32(w, row, src + 4 * k)
                for j in range(16):
                    out32[(o + _Q6_QH_AT[j]) // 4 + r] = _u32(w, row, src + 128 + 4 * j)
                for s in range(16):
                    out[o + _Q6_SC_AT[s] + r] = w[row, src + 192 + s]
                for i in range(2):
                    out[o + 3328 + 2 * r + i] = w[row, src + 208 + i]


def repack(kind: int, w: np.ndarray, out: np.ndarray) -> None:
    """Repack ggml rows ``w`` (uint8 [rows, row_bytes]) of ``kind`` into ``out`` (uint8, packed_bytes).

    Serial and without the GIL: callers run several tensors on threads of their own (numba's
    parallel loops would start OpenMP threads that spin on a busy machine; see runtime.py).
    """
    if kind in PLAIN_KINDS:
        return
    if kind in (KIND_Q4_K, KIND_Q5_K):
        _repack_q45_K(w, out, kind == KIND_Q5_K)
    elif kind == KIND_Q6_K:
        _repack_q6_K(w, out)
    else:
        _, block_bytes, header = _GGML[kind]
        qh_at = {KIND_Q5_0: 2, KIND_Q5_1: 4}.get(kind, -1)
        _repack_legacy(w, out, block_bytes, header, kind in (KIND_Q4_1, KIND_Q5_1), qh_at)


# ----------------------------------------------------------------------------- activations


@njit(cache=True, nogil=True)
def block_sums(xq: np.ndarray, xsum: np.ndarray, t0: int, t1: int) -> None:
    """xsum[t, b] = sum of the 32 int8 activations of block b, for tokens t0..t1-1."""
    nb = xsum.shape[1]
    for t in range(t0, t1):
        for b in range(nb):
            xsum[t, b] = block32_sum_i8(xq, t, b * 32)


@njit(cache=True, nogil=True)
def ksums(bsums: np.ndarray, xb16: np.ndarray, xb32: np.ndarray, t0: int, t1: int) -> None:
    """Q8_K bsums (int16 sums of 16) as int32 sums of 16 and of 32, for tokens t0..t1-1."""
    for t in range(t0, t1):
        for j in range(xb32.shape[1]):
            a = np.int32(bsums[t, 2 * j])
            c = np.int32(bsums[t, 2 * j + 1])
            xb16[t, 2 * j] = a
            xb16[t, 2 * j + 1] = c
            xb32[t, j] = np.int32(a + c)


# ----------------------------------------------------------------------------- matmul over a range


if simd.TIER is not None:
    _K1 = {KIND_Q4_0: simd.q4_0_x1, KIND_Q4_1: simd.q4_1_x1, KIND_Q8_0: simd.q8_0_x1, KIND_Q4_K: simd.q4_K_x1,
           KIND_Q6_K: simd.q6_K_x1, KIND_Q5_0: simd.q5_0_x1, KIND_Q5_1: simd.q5_1_x1, KIND_Q5_K: simd.q5_K_x1}
    # several tokens per weight load; the K-quants take the number measured fastest on their tier
    # (simd.KQUANT_TOKENS, with the figures)
    _KN = {KIND_Q4_0: (simd.q4_0_x4, 4), KIND_Q4_1: (simd.q4_1_x4, 4), KIND_Q8_0: (simd.q8_0_x4, 4),
           KIND_Q4_K: simd.kquant_multi["q4_K"], KIND_Q6_K: simd.kquant_multi["q6_K"],
           KIND_Q5_0: (simd.q5_0_x4, 4), KIND_Q5_1: (simd.q5_1_x4, 4), KIND_Q5_K: simd.kquant_multi["q5_K"]}

    def _make_range(kind: int):
        k1 = _K1[kind]
        kn, nt = _KN[kind]
        rec = RECORD_BYTES[kind]

        @njit(inline="always")
        def _range(arena, off, nb, rows, g0, g1, t0, t1, xq, xd, xs, xsum, out, res):
            """Rows of groups g0..g1 for tokens t0..t1; (xq, xd, xs, xsum) are the kind's activations."""
            gstride = nb * rec
            for g in range(g0, g1):
                r0 = g * LANES
                nr = min(LANES, rows - r0)
                woff = off + g * gstride
                t = t0
                while t + nt <= t1:
                    kn(arena, woff, nb, xq, xd, xs, xsum, t, gstride, res)
                    for i in range(nt):
                        for r in range(nr):
                            out[t + i, r0 + r] = res[i, r]
                    t += nt
                while t < t1:
                    k1(arena, woff, nb, xq, xd, xs, xsum, t, gstride, res)
                    for r in range(nr):
                        out[t, r0 + r] = res[0, r]
                    t += 1

        return _range

    range_q4_0 = _make_range(KIND_Q4_0)
    range_q4_1 = _make_range(KIND_Q4_1)
    range_q8_0 = _make_range(KIND_Q8_0)
    range_q4_K = _make_range(KIND_Q4_K)
    range_q6_K = _make_range(KIND_Q6_K)
    range_q5_0 = _make_range(KIND_Q5_0)
    range_q5_1 = _make_range(KIND_Q5_1)
    range_q5_K = _make_range(KIND_Q5_K)


# ----------------------------------------------------------------------------- plain kinds (portable loops)

# The per-op kernels' own block helpers (legacy._dot_q5, kquants._q45_superblock) on a 2-D view of the
# rows: the same integer sums and float32 operations, and the loop shapes LLVM vectorizes.

_F32 = np.float32
_CONTRACT = {"contract"}  # as legacy.py: fused multiply-adds, no reassociation


@njit(inline="always")
def _f16(a, i):
    """The fp16 stored little-endian at a[i:i+2] as float32 (ops' exact decoding)."""
    return f16_bits_to_f32(np.uint16(np.uint16(a[i]) | (np.uint16(a[i + 1]) << np.uint16(8))))


@njit(inline="always")
def _rows_view(arena, off, rows, row_bytes):
    return arena[off : off + rows * row_bytes].reshape((rows, row_bytes))


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def range_p_q5_0(arena, off, nb, rows, g0, g1, t0, t1, xq, xd, out):
    w = _rows_view(arena, off, rows, nb * 22)
    half = min(16, w.shape[1])  # a bound LLVM cannot see keeps the loop a loop (see legacy.py)
    for r in range(g0 * LANES, min(g1 * LANES, rows)):
        wr = w[r]
        for t in range(t0, t1):
            acc = _F32(0.0)
            for b in range(nb):
                o = b * 22
                sumi = _dot_q5(w, r, o + 6, _qh(w, r, o + 2), xq, t, b * 32, half)
                acc += _F32(sumi) * (_f16(wr, o) * xd[t, b])
            out[t, r] = acc


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def range_p_q5_1(arena, off, nb, rows, g0, g1, t0, t1, xq, xd, xs, xsum, out):
    w = _rows_view(arena, off, rows, nb * 24)
    half = min(16, w.shape[1])
    for r in range(g0 * LANES, min(g1 * LANES, rows)):
        wr = w[r]
        for t in range(t0, t1):
            acc = _F32(0.0)
            for b in range(nb):
                o = b * 24
                sumi = _dot_q5(w, r, o + 8, _qh(w, r, o + 4), xq, t, b * 32, half) + np.int32(16) * xsum[t, b]
                acc += _F32(sumi) * (_f16(wr, o) * xd[t, b])
                acc += _f16(wr, o + 2) * xs[t, b]
            out[t, r] = acc


@njit(cache=True, nogil=True, fastmath=True)
def range_p_q5_K(arena, off, nb, rows, g0, g1, t0, t1, xq, xd, xb32, out):
    w = _rows_view(arena, off, rows, nb * 176)
    for r in range(g0 * LANES, min(g1 * LANES, rows)):
        wr = w[r]
        for t in range(t0, t1):
            sumf = _F32(0.0)
            for b in range(nb):
                o = b * 176
                s, summs = _q45_superblock(w, r, o, True, xq, xb32, t, b)
                d = _f16(wr, o) * xd[t, b]
                dmin = _f16(wr, o + 2) * xd[t, b]
                sumf += d * _F32(s) - dmin * _F32(summs)
            out[t, r] = sumf


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def range_p_q4_0(arena, off, nb, rows, g0, g1, t0, t1, xq, xd, out):
    w = _rows_view(arena, off, rows, nb * 18)
    half = min(16, w.shape[1])
    for r in range(g0 * LANES, min(g1 * LANES, rows)):
        wr = w[r]
        for t in range(t0, t1):
            acc = _F32(0.0)
            for b in range(nb):
                o = b * 18
                acc += _F32(_dot_q4(w, r, o + 2, xq, t, b * 32, half)) * (_f16(wr, o) * xd[t, b])
            out[t, r] = acc


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def range_p_q4_1(arena, off, nb, rows, g0, g1, t0, t1, xq, xd, xs, xsum, out):
    w = _rows_view(arena, off, rows, nb * 20)
    half = min(16, w.shape[1])
    for r in range(g0 * LANES, min(g1 * LANES, rows)):
        wr = w[r]
        for t in range(t0, t1):
            acc = _F32(0.0)
            for b in range(nb):
                o = b * 20
                sumi = np.int32(_dot_q4(w, r, o + 4, xq, t, b * 32, half)) + np.int32(8) * xsum[t, b]
                acc += _F32(sumi) * (_f16(wr, o) * xd[t, b])
                acc += _f16(wr, o + 2) * xs[t, b]
            out[t, r] = acc


@njit(cache=True, nogil=True, fastmath=_CONTRACT)
def range_p_q8_0(arena, off, nb, rows, g0, g1, t0, t1, xq, xd, out):
    w = _rows_view(arena, off, rows, nb * 34)
    qk = min(32, w.shape[1])
    for r in range(g0 * LANES, min(g1 * LANES, rows)):
        wr = w[r]
        for t in range(t0, t1):
            acc = _F32(0.0)
            for b in range(nb):
                o = b * 34
                acc += _F32(_dot_q8(w, r, o + 2, xq, t, b * 32, qk)) * (_f16(wr, o) * xd[t, b])
            out[t, r] = acc


@njit(cache=True, nogil=True, fastmath=True)
def range_p_q4_K(arena, off, nb, rows, g0, g1, t0, t1, xq, xd, xb32, out):
    w = _rows_view(arena, off, rows, nb * 144)
    for r in range(g0 * LANES, min(g1 * LANES, rows)):
        wr = w[r]
        for t in range(t0, t1):
            sumf = _F32(0.0)
            for b in range(nb):
                o = b * 144
                s, summs = _q45_superblock(w, r, o, False, xq, xb32, t, b)
                sumf += (_f16(wr, o) * xd[t, b]) * _F32(s) - (_f16(wr, o + 2) * xd[t, b]) * _F32(summs)
            out[t, r] = sumf


@njit(cache=True, nogil=True, fastmath=True)
def range_p_q6_K(arena, off, nb, rows, g0, g1, t0, t1, xq, xd, xb16, out):
    w = _rows_view(arena, off, rows, nb * 210)
    for r in range(g0 * LANES, min(g1 * LANES, rows)):
        wr = w[r]
        for t in range(t0, t1):
            sumf = _F32(0.0)
            for b in range(nb):
                o = b * 210
                sumf += (_f16(wr, o + 208) * xd[t, b]) * _F32(_q6_superblock(w, r, o, xq, xb16, t, b))
            out[t, r] = sumf


# ----------------------------------------------------------------------------- the kinds a model has


class KindSet:
    """The kinds of packed tensors a caller of ``matmul_range`` has, as part of numba's type.

    ``matmul_range`` dispatches at run time on each tensor's kind, so without this its compile
    would type, optimize and emit the loops of all sixteen kinds (most of a first run's compile
    time) for a model that has two. Carried as the third item of ``arenas``, the set is a
    compile-time constant: each set compiles (and caches) its own ``matmul_range`` and callers,
    holding only its kinds' loops.
    """

    __slots__ = ("kinds",)

    def __init__(self, kinds) -> None:
        self.kinds = tuple(sorted({int(k) for k in kinds}))
        unknown = set(self.kinds) - set(_GGML)
        if unknown:
            raise ValueError(f"unknown packed kinds {sorted(unknown)}")

    def __repr__(self) -> str:
        return f"KindSet{self.kinds}"


# PIPX_LLAMA_KERNELS=all: one KindSet of every kind, so the fused pass compiles once for any model rather
# than once per set of weight formats (~30 s CPU each against ~74 s once for all): for a server that
# loads models of several formats, and for the test suite, whose tiny models have a dozen sets.
_ALL_KINDS = "PIPX_LLAMA_KERNELS"


def kind_set(kinds) -> KindSet:
    """The KindSet the fused pass is compiled for: ``kinds`` (a model's), or every kind (see above)."""
    if os.environ.get(_ALL_KINDS, "").strip().lower() == "all":
        return KindSet(_GGML)
    return KindSet(kinds)


class KindSetType(types.Type):
    def __init__(self, kinds: tuple[int, ...]) -> None:
        self.kinds = kinds
        super().__init__(name=f"KindSet{kinds}")


@typeof_impl.register(KindSet)
def _typeof_kind_set(val, c):
    return KindSetType(val.kinds)


register_model(KindSetType)(models.OpaqueModel)


@unbox(KindSetType)
def _unbox_kind_set(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


@njit(cache=True, nogil=True, _nrt=False)
def matmul_range(kind, arenas, off, rows, cols, g0, g1, t0, t1, a8, ak, out, res):
    """out[t0:t1, rows of groups g0..g1] for the tensor of ``kind`` at byte ``off`` of its buffer.

    arenas = (packed weights, mapped file, KindSet): plain kinds are read from the file, the others
    from the packed buffer; only the kinds of the KindSet are compiled (a kind outside it computes
    nothing).

    a8 = (xq, xd, xs, xsum): Q8_1 activations and their block sums (legacy kinds);
    ak = (xq, xd, xb16, xb32): Q8_K activations and their sums of 16 and 32 (K-quant kinds).
    """
    _dispatch(arenas[2], kind, arenas, off, rows, cols, g0, g1, t0, t1, a8, ak, out, res)


_A8 = "a8[0], a8[1], a8[2], a8[3]"
_AK = "ak[0], ak[1], ak[2], ak[3]"
_CALLS = {  # kind -> (loop, blocks per row, activations)
    KIND_Q4_0: ("range_q4_0", 32, _A8), KIND_Q4_1: ("range_q4_1", 32, _A8),
    KIND_Q8_0: ("range_q8_0", 32, _A8),
    KIND_Q4_K: ("range_q4_K", 256, _AK), KIND_Q6_K: ("range_q6_K", 256, _AK),
    KIND_Q5_0: ("range_q5_0", 32, _A8), KIND_Q5_1: ("range_q5_1", 32, _A8),
    KIND_Q5_K: ("range_q5_K", 256, _AK),
    KIND_P_Q5_0: ("range_p_q5_0", 32, "a8[0], a8[1]"), KIND_P_Q5_1: ("range_p_q5_1", 32, _A8),
    KIND_P_Q5_K: ("range_p_q5_K", 256, "ak[0], ak[1], ak[3]"),
    KIND_P_Q4_0: ("range_p_q4_0", 32, "a8[0], a8[1]"),
    KIND_P_Q4_1: ("range_p_q4_1", 32, _A8), KIND_P_Q8_0: ("range_p_q8_0", 32, "a8[0], a8[1]"),
    KIND_P_Q4_K: ("range_p_q4_K", 256, "ak[0], ak[1], ak[3]"),
    KIND_P_Q6_K: ("range_p_q6_K", 256, "ak[0], ak[1], ak[2]"),
}
_ARGS = "kset, kind, arenas, off, rows, cols, g0, g1, t0, t1, a8, ak, out, res"


def _dispatch(kset, kind, arenas, off, rows, cols, g0, g1, t0, t1, a8, ak, out, res):
    """Run the loop of ``kind``; typed by its overload for the kinds of ``kset``."""
    raise NotImplementedError("only callable from numba")


@overload(_dispatch, inline="always")
def _dispatch_for(kset, kind, arenas, off, rows, cols, g0, g1, t0, t1, a8, ak, out, res):
    if not isinstance(kset, KindSetType):
        return None
    lines = [f"def impl({_ARGS}):"]
    for k in kset.kinds:
        # no packed kinds without a SIMD tier (supported() refuses them). simd.TIER, not SIMD: tests
        # monkeypatch SIMD to load models as the portable tier would, and code compiled here is cached on
        # disk under a key that does not see it -- a dispatch compiled then computed nothing for the packed
        # kinds, and every later process that loaded it got all-zero logits
        if k < KIND_P_Q4_0 and simd.TIER is None:
            continue
        loop, block, acts = _CALLS[k]
        arena = 0 if k < KIND_P_Q4_0 else 1
        tail = ", res" if k < KIND_P_Q4_0 else ""
        lines += [f"    if kind == {k}:",
                  f"        {loop}(arenas[{arena}], off, cols // {block}, rows, g0, g1, t0, t1, {acts}, "
                  f"out{tail})",
                  "        return"]
    lines.append("    return")
    scope = dict(globals())
    exec("\n".join(lines), scope)  # safe: source built from this module's constant table
    return scope["impl"]


# ----------------------------------------------------------------------------- standalone use


class PackedMatrix:
    """One weight matrix in packed form, with a ``matmul`` like the portable WeightKernel's (tests, tools)."""

    def __init__(self, qtype: GGMLQuantizationType, w: np.ndarray, *, plain: bool = False) -> None:
        if not supported(qtype, plain):
            raise ValueError(f"{qtype.name} has no packed kernel on this machine (SIMD tier {simd.TIER})")
        self.kind = (PLAIN_OF_QTYPE if plain else KIND_OF_QTYPE)[qtype]
        elements, block_bytes, _ = _GGML[self.kind]
        if w.ndim != 2 or w.dtype != np.uint8 or w.shape[1] % block_bytes:
            raise ValueError(f"{qtype.name} weights must be uint8 [rows, k*{block_bytes}], "
                             f"got {w.dtype} {w.shape}")
        self.rows = w.shape[0]
        self.cols = w.shape[1] // block_bytes * elements
        arena = np.empty(packed_bytes(self.kind, self.rows, self.cols), np.uint8)
        repack(self.kind, np.ascontiguousarray(w), arena)
        arena.flags.writeable = False
        self.arena = arena
        # plain kinds are read in place: here from a copy of the rows standing for the mapped file
        self.mapped = (np.ascontiguousarray(w).reshape(-1).copy() if self.kind in PLAIN_KINDS
                       else np.empty(0, np.uint8))
        self.mapped.flags.writeable = False

    def matmul(self, x: np.ndarray, out: np.ndarray) -> None:
        """out[t, r] = dot(row r, x[t]) with the activations quantized as the portable kernels do."""
        from pipx_llama.engine.kernels.kquants import quantize_q8_K
        from pipx_llama.engine.kernels.legacy import quantize_q8_1
        from pipx_llama.formats.fp16 import FP16_TABLE

        T, n = x.shape
        if n != self.cols or out.shape != (T, self.rows):
            raise ValueError(f"shapes disagree: weights {self.rows}x{self.cols}, x {x.shape}, "
                             f"out {out.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        nb = n // 32
        a8 = (np.zeros((T, n), np.int8), np.zeros((T, nb), np.float32), np.zeros((T, nb), np.float32),
              np.zeros((T, nb), np.int32))
        nk = max(1, n // 256)
        ak = (np.zeros((T, n), np.int8), np.zeros((T, nk), np.float32), np.zeros((T, nk * 16), np.int32),
              np.zeros((T, nk * 8), np.int32))
        if ACTIVATIONS[self.kind] == ACT_Q8:
            quantize_q8_1(x, a8[0], a8[1], a8[2], FP16_TABLE)
            block_sums(a8[0], a8[3], 0, T)
        else:
            bsums = np.empty((T, n // 16), np.int16)
            quantize_q8_K(x, ak[0], ak[1], bsums)
            ksums(bsums, ak[2], ak[3], 0, T)
        dst = np.empty((T, self.rows), np.float32)
        res = np.empty((4, LANES), np.float32)
        matmul_range(self.kind, (self.arena, self.mapped, KindSet((self.kind,))), 0, self.rows, self.cols, 0,
                     (self.rows + LANES - 1) // LANES, 0, T, a8, ak, dst, res)
        out[...] = dst
