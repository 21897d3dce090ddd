"""Attention over the KV cache, and the cache's rows, each kernel with a numpy reference twin (``_ref``).

``attention`` follows llama.cpp's non-flash path (the default of llama-cpp-python, which made our
golden data): ``kq = K·q``, ``softmax(kq*scale + mask)`` with a float64 sum, ``kqv = V·p``. With an
F16 KV cache ggml converts the float32 operand of each F16 matmul to F16 first, so q and the softmax
probabilities are rounded to F16 too; ``attention`` does the same when the cache is F16.

Numba cannot type float16 arrays, so the kernels take an F16 cache as ``uint16`` holding the F16
bits; the Python wrapper ``attention`` accepts ``float16`` arrays and views them.

A q8_0 KV cache (``--cache-type-k/-v q8_0``) holds each KV head of each position as ggml's
``block_q8_0`` rows (fp16 scale + 32 int8 per 32 values) in a ``uint8`` array [R, n_kv_heads,
head_dim/32*34]; attention reads it directly as llama.cpp does with such a cache: K·q with q quantized
to q8_0 (ggml's vec_dot_type of q8_0), per-block integer sums times both scales, and V dequantized
row by row and accumulated in float32 with unrounded probabilities (llama.cpp requires flash
attention for a quantized V cache, whose V accumulation is float32 too).

Split from :mod:`.ops` (which holds the element-wise kernels and the shared exp and F16 helpers this
module uses) to keep each file about one operation.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from pipx_llama.engine.kernels import simd
from pipx_llama.engine.kernels.ops import _F32, _FAST, _PAR_ATTENTION, _expf, _f16_decode, f32_to_f16_bits
from pipx_llama.engine.kernels.simd import emit_prefetch

# ----------------------------------------------------------------------------- KV element access

# The score and V loops ask for the cache row PREFETCH_ROWS ahead of the one they read (a software prefetch
# into L1). A head's K and V rows are short pieces of longer rows (SmolLM2: 128 of every 384 bytes; a 7B:
# 256 of every 8 KiB, a page apart), which the hardware prefetchers follow poorly, and each (token, head)
# reads its rows once. SmolLM2 Q4_1, 2 threads, on a Xeon VM, attention's share of a step without -> with:
# 8 tokens at depth 100 2.45 -> 1.97-2.08 ms; one token at depth 1000 2.78 -> 2.01-2.02 ms (the step
# 6.5-7.1 -> 5.5-5.8 ms), 8 tokens there 29-30 -> 22-23 ms. Not measured on AMD.
PREFETCH_ROWS = 16


@intrinsic
def _prefetch(typingctx, arr, byte_off):
    """Ask for the cache line at byte ``byte_off`` of ``arr``'s data into L1 (a hint: never faults, past the
    array's end too)."""
    sig = types.void(arr, byte_off)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        data = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
        emit_prefetch(builder, builder.gep(data, [args[1]]), 3)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _prefetch_row(cache, r, kvh):
    """Ask for the lines of row r's KV head kvh of a [R, KVH, E] cache (any element type; r may be past the
    end)."""
    size = cache.shape[2] * cache.itemsize
    off = (r * cache.shape[1] + kvh) * size
    for c in range(0, size + 63, 64):  # one more than the row's lines: it need not start a line
        _prefetch(cache, off + c)


# ----------------------------------------------------------------------------- F16 row blocks

# Lanes of the row blocks' vectors: 16 float32 with AVX-512, 8 on the AVX2 tiers. A block of K rows'
# scores is one vector: row by row, each dot product ended in a horizontal sum of its vector, which
# cost about as much as its products; a block adds its rows' vectors together in a tree of shuffles
# (15 for 16 rows) and stores the scores at once. V is added V_ROWS rows a pass, their products summed
# in a tree onto acc (acc loaded and stored once a pass). SmolLM2's shape (D = 64, 3 KV heads), one
# (token, head) over 1000 cached rows in L2, Xeon VM (AVX-512): 12.6 -> 8.3 ns a row (scores 5.0 -> 4.4,
# V 4.3 -> 2.8).
BLOCK_LANES = simd.vector_width(simd.TIER)
SCORE_ROWS = BLOCK_LANES  # K rows a score block: one row a lane of the result
V_ROWS = 8
# F16 -> float32 vectors need F16C, which every SIMD tier has; without a tier the rows go one by one
ROW_BLOCKS = simd.TIER is not None

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_I8P = ir.IntType(8).as_pointer()


def _f16_rows_ok(cache, *arrays) -> bool:
    """The block kernels' operand types: an F16 cache (uint16 bits) and float32 vectors, all C order."""
    return (isinstance(cache, types.Array) and cache.dtype == types.uint16 and cache.layout == "C"
            and cache.ndim == 3 and all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1
                                        and a.dtype == types.float32 for a in arrays))


def _head_rows(b: ir.IRBuilder, cache, r0: ir.Value, kvh: ir.Value,
               n: int) -> tuple[list[ir.Value], ir.Value]:
    """i8* to KV head kvh of rows r0..r0+n-1 of a [R, KVH, D] cache (numba's array struct), and D."""
    s0, s1, _ = cgutils.unpack_tuple(b, cache.strides, 3)
    data = b.bitcast(cache.data, _I8P)
    head = b.mul(kvh, s1)
    rows = [b.gep(data, [b.add(b.mul(b.add(r0, _I64(r)), s0), head)]) for r in range(n)]
    return rows, cgutils.unpack_tuple(b, cache.shape, 3)[2]


def _transpose_sum(b: ir.IRBuilder, vecs: list[ir.Value]) -> ir.Value:
    """One vector whose lane r is the sum of vecs[r]'s lanes (as many vectors as lanes, a power of two).

    Each level adds two vectors' halves crosswise: every row's lanes fold in half and two vectors' rows
    share one vector, until each row is one lane, in order."""
    w = len(vecs)
    size = w  # lanes of one row in each vector at this level
    while size > 1:
        half = size // 2
        lo = [blk * size + i for blk in range(w // size) for i in range(half)]
        hi = [i + half for i in lo]
        mlo = ir.Constant(ir.VectorType(_I32, w), lo + [w + i for i in lo])
        mhi = ir.Constant(ir.VectorType(_I32, w), hi + [w + i for i in hi])
        vecs = [b.fadd(b.shuffle_vector(x, y, mlo), b.shuffle_vector(x, y, mhi))
                for x, y in zip(vecs[0::2], vecs[1::2], strict=True)]
        size = half
    return vecs[0]


@intrinsic
def _score_block(typingctx, qr, k_cache, r0, kvh, kq_scale, scores, off):
    """scores[off + r] = (K[r0 + r, kvh] · qr) * kq_scale for r < SCORE_ROWS; an F16 cache (uint16
    [R, KVH, D]), D a multiple of BLOCK_LANES, qr float32 [D]."""
    if not _f16_rows_ok(k_cache, qr, scores):
        return None
    sig = types.void(qr, k_cache, r0, kvh, kq_scale, scores, off)

    def codegen(context, builder, sig, args):
        e, b = simd._Emit(builder, simd.TIER), builder
        qa, ka, sa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 5))
        rows, d = _head_rows(b, ka, args[2], args[3], SCORE_ROWS)
        qdata = b.bitcast(qa.data, _I8P)
        accs = [cgutils.alloca_once_value(b, e.zero_f32()) for _ in rows]
        with cgutils.for_range(b, b.udiv(d, _I64(BLOCK_LANES))) as loop:
            c = loop.index
            qv = e.load(qdata, b.mul(c, _I64(4 * BLOCK_LANES)), e.vf32)
            ko = b.mul(c, _I64(2 * BLOCK_LANES))
            for row, acc in zip(rows, accs, strict=True):
                b.store(e.fma(qv, e.half_to_f32(row, ko), b.load(acc)), acc)
        sums = _transpose_sum(b, [b.load(a) for a in accs])
        dst = e.ptr(b.bitcast(sa.data, _I8P), b.mul(args[6], _I64(4)), e.vf32)
        b.store(b.fmul(sums, e.splat_f32(args[4])), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _v_block(typingctx, scores, off, v_cache, r0, kvh, acc):
    """acc += sum_r scores[off + r] * V[r0 + r, kvh] for r < V_ROWS; an F16 cache (uint16 [R, KVH, D]), D a
    multiple of BLOCK_LANES. The rows' products add up in a tree, then onto acc."""
    if not _f16_rows_ok(v_cache, scores, acc):
        return None
    sig = types.void(scores, off, v_cache, r0, kvh, acc)

    def codegen(context, builder, sig, args):
        e, b = simd._Emit(builder, simd.TIER), builder
        sa, va, aa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2, 5))
        rows, d = _head_rows(b, va, args[3], args[4], V_ROWS)
        probs = [e.splat_f32(b.load(b.gep(sa.data, [b.add(args[1], _I64(r))]))) for r in range(V_ROWS)]
        adata = b.bitcast(aa.data, _I8P)
        with cgutils.for_range(b, b.udiv(d, _I64(BLOCK_LANES))) as loop:
            c = loop.index
            vo = b.mul(c, _I64(2 * BLOCK_LANES))
            vs = [e.half_to_f32(row, vo) for row in rows]
            terms = [e.fma(probs[r + 1], vs[r + 1], b.fmul(probs[r], vs[r])) for r in range(0, V_ROWS, 2)]
            while len(terms) > 1:
                terms = [b.fadd(x, y) for x, y in zip(terms[0::2], terms[1::2], strict=True)]
            ao = b.mul(c, _I64(4 * BLOCK_LANES))
            b.store(b.fadd(e.load(adata, ao, e.vf32), terms[0]), e.ptr(adata, ao, e.vf32), align=4)
        return context.get_dummy_value()

    return sig, codegen


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


# ----------------------------------------------------------------------------- attention


@njit(cache=True, error_model="numpy", fastmath=_FAST)
def _scores(qr, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale):
    """scores[off + j] for cache rows s0..s0+cnt-1; returns their max. ``cap`` > 0 soft-caps as ggml:
    tanhf(s * (1/cap)) * cap, before the scale."""
    D = qr.shape[0]
    mx = -np.inf
    for j in range(cnt):
        _prefetch_row(k_cache, s0 + j + PREFETCH_ROWS, kvh)
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
def _scores_f16(qr, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale):
    """``_scores`` for an F16 cache: blocks of SCORE_ROWS rows through ``_score_block``, the rest (and soft
    capping) as ``_scores``."""
    D = qr.shape[0]
    if cap > _F32(0.0) or D % BLOCK_LANES != 0:
        return _scores(qr, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale)
    mx = -np.inf
    j = 0
    while j + SCORE_ROWS <= cnt:
        for a in range(SCORE_ROWS):
            _prefetch_row(k_cache, s0 + j + PREFETCH_ROWS + a, kvh)
        _score_block(qr, k_cache, s0 + j, kvh, kq_scale, scores, off + j)
        for a in range(SCORE_ROWS):
            mx = max(mx, scores[off + j + a])
        j += SCORE_ROWS
    if j < cnt:
        mx = max(mx, _scores(qr, k_cache, kvh, s0 + j, cnt - j, scores, off + j, inv_cap, cap, kq_scale))
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
        for a in range(4):
            _prefetch_row(v_cache, r + PREFETCH_ROWS + a, kvh)
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
def _accumulate_f16(scores, off, v_cache, kvh, s0, cnt, acc):
    """``_accumulate`` for an F16 cache: passes of V_ROWS rows through ``_v_block``, the rest as
    ``_accumulate``."""
    if acc.shape[0] % BLOCK_LANES != 0:
        _accumulate(scores, off, v_cache, kvh, s0, cnt, acc)
        return
    j = 0
    while j + V_ROWS <= cnt:
        for a in range(V_ROWS):
            _prefetch_row(v_cache, s0 + j + PREFETCH_ROWS + a, kvh)
        _v_block(scores, off + j, v_cache, s0 + j, kvh, acc)
        j += V_ROWS
    if j < cnt:
        _accumulate(scores, off + j, v_cache, kvh, s0 + j, cnt - j, acc)


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
        _prefetch_row(k_cache, s0 + j + PREFETCH_ROWS, kvh)
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
        _prefetch_row(v_cache, s0 + j + PREFETCH_ROWS, kvh)
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
    if ROW_BLOCKS and k_cache.dtype == types.uint16 and k_cache.layout == "C":
        return lambda qr, qd, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale: _scores_f16(
            qr, k_cache, kvh, s0, cnt, scores, off, inv_cap, cap, kq_scale)
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
        return lambda scores, off, v_cache, kvh, s0, cnt, acc: _accumulate_q8(scores, off, v_cache, kvh, s0,
                                                                              cnt, acc)
    if ROW_BLOCKS and v_cache.dtype == types.uint16 and v_cache.layout == "C":
        return lambda scores, off, v_cache, kvh, s0, cnt, acc: _accumulate_f16(scores, off, v_cache, kvh, s0,
                                                                               cnt, acc)
    return lambda scores, off, v_cache, kvh, s0, cnt, acc: _accumulate(scores, off, v_cache, kvh, s0, cnt,
                                                                       acc)


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
    # the loops below ask for rows PREFETCH_ROWS ahead; the first rows of both are asked for here
    for a in range(min(c1, PREFETCH_ROWS)):
        _prefetch_row(k_cache, s0 + a, kvh)
        _prefetch_row(v_cache, s0 + a, kvh)
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
            _attend(q[t, h], k_cache, v_cache, h // group, window_start(p, window), p + 1, q_scale, kq_scale,
                    cap, scratch[0], out[t, h])
    else:
        for c in prange(n_chunks):
            for pair in range(c, n_pairs, n_chunks):
                t = pair // H
                h = pair - t * H
                p = start_pos + t
                _attend(q[t, h], k_cache, v_cache, h // group, window_start(p, window), p + 1, q_scale,
                        kq_scale, cap, scratch[c], out[t, h])


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
        raise ValueError(f"attention: {rows} cache rows cannot hold the {span} positions this batch "
                         "attends to")
    if scratch is None:
        scratch = attention_scratch(span, D)
    elif scratch.shape[1] < span + 2 * D:
        raise ValueError(f"attention: scratch rows of {scratch.shape[1]} < {span + 2 * D} needed")
    kq = attention_scale(D) if kq_scale is None else _F32(kq_scale)
    attention_kernel(q, _as_kernel_cache(k_cache), _as_kernel_cache(v_cache), start_pos, window,
                     _F32(q_scale), kq, _F32(softcap), out, scratch)


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
