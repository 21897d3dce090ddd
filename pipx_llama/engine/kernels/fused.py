"""The forward pass as one numba function per thread: a table of stages, run by one loop.

``team_part`` evaluates a batch of T tokens through every layer and writes the logits. Each thread
of a context's :class:`Team` calls it with the same :class:`Bundle` and walks the same table of
stages (see :mod:`pipx_llama.engine.kernels.runtime` for how items are shared without barriers).
A stage is an operation applied to one layer; the table lists, for every layer,

    ATTN_IN   residual add (+ the previous layer's post-FFN norm), attention norm, quantize
    QKV       q, k, v matmuls
    ROPE      biases, q/k norms, RoPE, K and V into the cache
    ATTEND    attention, (token, KV head) groups dealt round-robin (causal rows differ in length)
    QUANT_ATT quantize the attention output
    WO        output projection
    FFN_IN    (post-attention norm), residual add, feed-forward norm, quantize
    GATE_UP   gate and up of the same rows in one item, then SwiGLU or GeGLU on them
    QUANT_HID quantize the hidden activations
    DOWN      down projection

then OUT_IN (last residual add, output norm of the rows that need logits, quantize) and LOGITS.

What a family adds (biases, q/k norms, post norms, GeGLU, soft-capping, sliding windows, NEOX RoPE)
is data: the model's layer table ``ldesc`` (offsets of its vectors in ``vecs``, -1 where absent,
its RoPE table and window) and the switches in ``hp``/``fp``. Activations are quantized once per
input and shared by every matmul that reads it (q/k/v, gate/up). The arithmetic is that of the
per-op path in ``model.py`` (the same numba helpers of :mod:`~pipx_llama.engine.kernels.ops`, the
packed kernels bit-identical to the portable ones), so both paths give the same logits bit for bit;
the tests compare them.
"""

from __future__ import annotations

import threading
import weakref
from collections import namedtuple

import numpy as np
from numba import njit

from pipx_llama.engine.kernels import attention, ops, packed, runtime
from pipx_llama.engine.kernels.kquants import quantize_q8_K
from pipx_llama.engine.kernels.legacy import quantize_q8_1
from pipx_llama.engine.kernels.runtime import done, take, wait_stage

# int64 model switches (``hp``)
(HP_DIM, HP_LAYERS, HP_HEADS, HP_KV_HEADS, HP_HEAD_DIM, HP_FFN, HP_VOCAB, HP_NEOX, HP_ACT,
 HP_OUT_NORM, HP_ITEMS) = range(11)
HP_SIZE = 11
# float32 model numbers (``fp``)
FP_EPS, FP_Q_SCALE, FP_KQ_SCALE, FP_SOFTCAP = range(4)
FP_SIZE = 4
# per-evaluation slots (int64 ``par``)
# (PAR_KV_STRIDE_*: elements between two sequences' slots in kc/vc, for a batch of several sequences)
(PAR_T, PAR_POS0, PAR_LOGIT_ROW0, PAR_LOGIT_ROWS, PAR_THREADS, PAR_STAGES, PAR_KV_STRIDE_K,
 PAR_KV_STRIDE_V) = range(8)
PAR_SIZE = 8
# weight descriptor columns (int64 ``wdesc`` [n_weights, 4])
WD_KIND, WD_ROWS, WD_COLS, WD_OFFSET = range(4)
W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN = range(7)  # weight index = 7 * layer + these; output = 7 * L
# which activation formats each matmul input needs (int64 ``need`` [4 * L + 1], packed.ACT_* bits)
IN_QKV, IN_O, IN_FFN, IN_DOWN = range(4)  # index 4 * layer + these; output = 4 * L
# layer table columns (int64 ``ldesc`` [L, LD_SIZE]): offsets into ``vecs`` (-1: the layer has none),
# the RoPE table, the sliding window (0: every earlier position), the layer's first row and rows in the caches
(LD_ATTN_NORM, LD_BQ, LD_BK, LD_BV, LD_Q_NORM, LD_K_NORM, LD_POST_ATTN, LD_FFN_NORM, LD_POST_FFN, LD_ROPE,
 LD_WINDOW, LD_KV_OFF, LD_KV_ROWS) = range(13)
LD_SIZE = 13
# stage operations (``stages`` [n, 2] = (operation, layer))
(OP_ATTN_IN, OP_QKV, OP_ROPE, OP_ATTEND, OP_QUANT_ATT, OP_WO, OP_FFN_IN, OP_GATE_UP, OP_QUANT_HID, OP_DOWN,
 OP_OUT_IN, OP_LOGITS) = range(12)
LAYER_OPS = (OP_ATTN_IN, OP_QKV, OP_ROPE, OP_ATTEND, OP_QUANT_ATT, OP_WO, OP_FFN_IN, OP_GATE_UP, OP_QUANT_HID,
             OP_DOWN)
ACT_SILU, ACT_GELU = 0, 1  # as pipx_llama.engine.arch

MAX_TOKEN_TILE = 64  # tokens per matmul item in prompt processing (weights of an item stay in L1/L2)
# weight bytes per matmul item for one token; an item costs about a microsecond to deal and call, so
# 64 KiB items cost Qwen2.5-1.5B a third of its generation time (1 thread: 60.4 -> 42.3 ms a token
# with 1 MiB, Gemma-3-270M 65 -> 80.5 tok/s, SmolLM2 125 -> 140); 4 MiB measured the same as 1 MiB
ITEM_BYTES = 1 << 20
# matmul items per thread where ITEM_BYTES allows fewer, bigger ones (``hp[HP_ITEMS]``, set per context by
# ``items_per_thread``): a small tensor is split into this many per thread, no more. Each item is a stream
# of its own (dealt, called, the prefetchers ramping up again), but items dealt as threads come free are
# what balances a CPU whose cores differ: with one item each, a stage lasts as long as an efficiency
# core's share. Milliseconds per generated token at depth 160 (SmolLM2 requantized Q6_K, Zen 4), items
# per thread 1 / 2 / 4 alternating in one process: 2 threads 5.81 / 6.24 / 6.74 (Q4_1: 4.18 / 4.38 /
# 4.61); 1 thread 8.37 / 8.80 / 9.88; 2 threads beside another process taking a third of a core in
# bursts 7.75 / 7.87 / 8.68, and a batch of 8 tokens (Q4_1) there 12.07 / 12.52 / 12.97. It was 4.
MM_ITEMS_ALIKE = 1  # cores alike, or no more threads than performance cores
MM_ITEMS_MIXED = 2  # more threads than a CPU's performance cores

# Everything team_part reads, in one argument. Shapes: hp int64 [HP_SIZE]; fp f32 [FP_SIZE]; par int64
# [PAR_SIZE]; stages int64 [n, 2]; arenas = (packed weights, mapped file) uint8; wdesc int64 [7L+1, 4];
# need int64 [4L+1]; ldesc int64 [L, LD_SIZE]; vecs f32 [*] (norms, biases); cos, sin f32 [tables, n_ctx,
# n_rot/2]; kc, vc uint16 [*] (F16 bits) or uint8 [*] (q8_0 blocks), layers at ldesc's rows; x, xb, proj f32
# [B, dim]; q, att f32 [B, H*D]; k, v f32 [B, KVH*D]; gate, up, hidden f32 [B, ffn]; logits f32 [B, vocab];
# a8f, akf: the activation buffers (Q8_1, Q8_K); scratch f32 [threads, n_ctx + 2D]; res_all f32 [threads, 4,
# LANES]; f16_table, gelu_table: ops' F16 tables; tpos, tslot int64 [B]: each token's position and KV slot (a
# batch may hold tokens of several sequences, slot s at s * PAR_KV_STRIDE_* in kc/vc; one sequence: slot 0).
Bundle = namedtuple("Bundle", [
    "hp", "fp", "par", "stages", "arenas", "wdesc", "need", "ldesc", "vecs", "cos", "sin", "kc", "vc",
    "x", "xb", "q", "k", "v", "att", "proj", "gate", "up", "hidden", "logits", "a8f", "akf", "scratch",
    "res_all", "f16_table", "gelu_table", "tpos", "tslot",
])


def stage_table(n_layers: int) -> np.ndarray:
    """(operation, layer) of every stage: the layers' stages, then the two of the logits."""
    rows = [(op, li) for li in range(n_layers) for op in LAYER_OPS] + [(OP_OUT_IN, n_layers),
                                                                       (OP_LOGITS, n_layers)]
    return np.array(rows, np.int64)


# ----------------------------------------------------------------------------- work splitting


# Tokens per item of per-token work (norms, quantizing, RoPE), at least: an item costs about a
# microsecond to take and start on a row the other thread wrote, more than a small model's row of work
# (SmolLM2: quantizing a 576-wide row takes 0.6 us). SmolLM2 Q4_1, a step of 8 sequences at depth 100,
# 2 threads, Xeon VM (stage timers, alternating): those five stages 1.31 -> 0.90 ms a step with items of
# 4 tokens instead of 1. Prompts are unchanged (their items hold T / (4 * threads) tokens, 8 for 64), and
# a batch of fewer than MIN_TOKENS_PER_ITEM tokens a thread is still shared by every thread.
MIN_TOKENS_PER_ITEM = 4


@njit(cache=True, nogil=True, _nrt=False)
def _token_items(T, threads):
    """(items, tokens per item) for per-token work: four items a thread, each of MIN_TOKENS_PER_ITEM tokens
    or more unless that would leave a thread without one."""
    per = max((T + 4 * threads - 1) // (4 * threads), min(MIN_TOKENS_PER_ITEM, (T + threads - 1) // threads))
    return (T + per - 1) // per, per


@njit(inline="always")
def attend_units(T, H, KVH, threads):
    """(units, heads per unit) of the attention stage: a unit is one token's query heads that share a KV
    head (one thread then reads those K/V rows from memory once and again from L1), or a single head
    where there are too few such groups to keep every thread busy (one token of a 3-KV-head model)."""
    if T * KVH >= 2 * threads:
        return T * KVH, H // KVH
    return T * H, 1


@njit(inline="always")
def attend_unit(u, per, H):
    """(token, first head) of attention unit u of ``per`` heads each."""
    t = u * per // H
    return t, u * per - t * H


@njit(inline="always")
def _attend_items(T, H, KVH, threads):
    """Items of the attention stage: its units are dealt round-robin over them."""
    units = attend_units(T, H, KVH, threads)[0]
    return min(units, 8 * threads) if T > 1 else min(units, 2 * threads)


def items_per_thread(threads: int, performance_cores: int | None) -> int:
    """``hp[HP_ITEMS]`` for a team of ``threads`` on a CPU with ``performance_cores`` (None: its cores are
    alike, or it does not say)."""
    return MM_ITEMS_MIXED if performance_cores is not None and threads > performance_cores else MM_ITEMS_ALIKE


@njit(cache=True, nogil=True, _nrt=False)
def _mm_split(wdesc, widx, T, shares):
    """(groups per item, token tile) for a matmul of weight ``widx`` over T tokens, a small one split into
    ``shares`` items (threads times items per thread)."""
    cols = wdesc[widx, WD_COLS]
    rows = wdesc[widx, WD_ROWS]
    group_bytes = cols * 18 // 32 * 16  # about: packed 4-bit group of 16 rows
    tile = min(T, MAX_TOKEN_TILE)
    groups = (rows + 15) // 16
    gpc = max(1, ITEM_BYTES // (group_bytes * tile))
    # enough items to share: ``shares`` when there is work for that many
    gpc = min(gpc, max(1, groups // shares))
    return gpc, tile


@njit(cache=True, nogil=True, _nrt=False)
def _mm_count(wdesc, widx, T, shares):
    gpc, tile = _mm_split(wdesc, widx, T, shares)
    groups = (wdesc[widx, WD_ROWS] + 15) // 16
    return ((groups + gpc - 1) // gpc) * ((T + tile - 1) // tile)


@njit(cache=True, nogil=True, _nrt=False)
def _mm_item(wdesc, widx, arenas, i, T, shares, a8, ak, out, res):
    """Item i of the matmul of weight ``widx``; returns the (rows, tokens) ranges it wrote."""
    gpc, tile = _mm_split(wdesc, widx, T, shares)
    n_tt = (T + tile - 1) // tile
    gc = i // n_tt
    t0 = (i - gc * n_tt) * tile
    groups = (wdesc[widx, WD_ROWS] + 15) // 16
    g0 = gc * gpc
    g1 = min(groups, g0 + gpc)
    t1 = min(T, t0 + tile)
    packed.matmul_range(wdesc[widx, WD_KIND], arenas, wdesc[widx, WD_OFFSET], wdesc[widx, WD_ROWS],
                        wdesc[widx, WD_COLS], g0, g1, t0, t1, a8, ak, out, res)
    return g0 * 16, min(wdesc[widx, WD_ROWS], g1 * 16), t0, t1


@njit(cache=True, nogil=True, _nrt=False)
def _quantize_rows(src, t0, t1, n, a8f, akf, T, need, table):
    """Activations of src[t0:t1] (n wide) in the formats ``need`` asks for, into [T, n] views of the buffers.

    Rows only: a slice of the columns too (``src[t0:t1, :n]``) would be typed as a non-contiguous array,
    whose loops numba does not vectorize (quantize_q8_1, 1536 columns: 4.0 us a row that way, 1.5 us so).
    """
    if need & packed.ACT_Q8:
        a8 = _acts8(n, T, a8f)
        quantize_q8_1(src[t0:t1], a8[0][t0:t1], a8[1][t0:t1], a8[2][t0:t1], table)
        packed.block_sums(a8[0], a8[3], t0, t1)
    if need & packed.ACT_Q8K:
        kq, kd, kbs, kb16, kb32 = _actsk(n, T, akf)
        quantize_q8_K(src[t0:t1], kq[t0:t1], kd[t0:t1], kbs[t0:t1])
        packed.ksums(kbs, kb16, kb32, t0, t1)


@njit(inline="always")
def _acts8(n, T, a8f):
    nb = n // 32
    return (a8f[0][: T * n].reshape((T, n)), a8f[1][: T * nb].reshape((T, nb)),
            a8f[2][: T * nb].reshape((T, nb)), a8f[3][: T * nb].reshape((T, nb)))


@njit(inline="always")
def _actsk(n, T, akf):
    return (akf[0][: T * n].reshape((T, n)), akf[1][: T * (n // 256)].reshape((T, n // 256)),
            akf[2][: T * (n // 16)].reshape((T, n // 16)), akf[3][: T * (n // 16)].reshape((T, n // 16)),
            akf[4][: T * (n // 32)].reshape((T, n // 32)))


@njit(cache=True, nogil=True, _nrt=False)
def _acts(n, T, a8f, akf):
    """(Q8_1 views, Q8_K views) of the activation buffers for a [T, n] input.

    A function of its own, not inlined into its five callers: numba lowers each of the nine reshapes
    anew at every inlined site, which took 4.6 s of SmolLM2's first compile (Zen 4); LLVM still
    inlines the compiled function where it pays.
    """
    kq, kd, _, kb16, kb32 = _actsk(n, T, akf)
    return _acts8(n, T, a8f), (kq, kd, kb16, kb32)


@njit(inline="always")
def _vec(b, off, n):
    return b.vecs[off : off + n]


@njit(inline="always")
def _kv_layer(cache, b, li, base):
    """Layer li's [rows, KVH, D] view of the slot at element ``base`` of a flat cache (D F16 bits, or D/32
    q8_0 blocks of 34 bytes)."""
    rows = b.ldesc[li, LD_KV_ROWS]
    kvh = b.hp[HP_KV_HEADS]
    d = b.hp[HP_HEAD_DIM]
    if cache.itemsize == 1:
        d = d // 32 * 34
    off = base + b.ldesc[li, LD_KV_OFF] * kvh * d
    return cache[off : off + rows * kvh * d].reshape((rows, kvh, d))


@njit(cache=True, nogil=True, _nrt=False)
def _norm_add(b, t, post, proj_t):
    """x[t] += proj[t], first normalised by the ``post`` norm where a family has one (Gemma)."""
    dim = b.hp[HP_DIM]
    x = b.x
    if post >= 0:
        ops._rmsnorm_row(proj_t, _vec(b, post, dim), b.fp[FP_EPS], proj_t)
    for j in range(dim):
        x[t, j] += proj_t[j]


# ----------------------------------------------------------------------------- the stages


@njit(cache=True, nogil=True, _nrt=False)
def n_items(op, li, T, threads, b):
    """How many items stage (op, li) has for a batch of T tokens."""
    L = b.hp[HP_LAYERS]
    wb = 7 * li
    sh = threads * b.hp[HP_ITEMS]
    if op == OP_QKV:
        return (_mm_count(b.wdesc, wb + W_Q, T, sh) + _mm_count(b.wdesc, wb + W_K, T, sh)
                + _mm_count(b.wdesc, wb + W_V, T, sh))
    if op == OP_ATTEND:
        return _attend_items(T, b.hp[HP_HEADS], b.hp[HP_KV_HEADS], threads)
    if op == OP_WO:
        return _mm_count(b.wdesc, wb + W_O, T, sh)
    if op == OP_GATE_UP:
        return _mm_count(b.wdesc, wb + W_GATE, T, sh)
    if op == OP_DOWN:
        return _mm_count(b.wdesc, wb + W_DOWN, T, sh)
    if op == OP_OUT_IN:
        return _token_items(b.par[PAR_LOGIT_ROWS], threads)[0]
    if op == OP_LOGITS:
        return _mm_count(b.wdesc, 7 * L, b.par[PAR_LOGIT_ROWS], sh)
    return _token_items(T, threads)[0]


@njit(inline="always")
def run_item(op, li, i, tid, T, threads, b):
    """Item i of stage (op, li)."""
    hp, fp, ld = b.hp, b.fp, b.ldesc
    dim, ffn = hp[HP_DIM], hp[HP_FFN]
    H, KVH, D = hp[HP_HEADS], hp[HP_KV_HEADS], hp[HP_HEAD_DIM]
    qdim = H * D
    eps = fp[FP_EPS]
    res = b.res_all[tid]
    wb = 7 * li
    sh = threads * hp[HP_ITEMS]
    _, per_tok = _token_items(T, threads)
    t0 = i * per_tok
    t1 = min(T, t0 + per_tok)
    if op == OP_ATTN_IN:
        for t in range(t0, t1):
            if li > 0:
                _norm_add(b, t, ld[li - 1, LD_POST_FFN], b.proj[t])
            ops._rmsnorm_row(b.x[t], _vec(b, ld[li, LD_ATTN_NORM], dim), eps, b.xb[t])
        _quantize_rows(b.xb, t0, t1, dim, b.a8f, b.akf, T, b.need[4 * li + IN_QKV], b.f16_table)
    elif op == OP_QKV:
        a8, ak = _acts(dim, T, b.a8f, b.akf)
        nq = _mm_count(b.wdesc, wb + W_Q, T, sh)
        nk = _mm_count(b.wdesc, wb + W_K, T, sh)
        if i < nq:
            _mm_item(b.wdesc, wb + W_Q, b.arenas, i, T, sh, a8, ak, b.q, res)
        elif i < nq + nk:
            _mm_item(b.wdesc, wb + W_K, b.arenas, i - nq, T, sh, a8, ak, b.k, res)
        else:
            _mm_item(b.wdesc, wb + W_V, b.arenas, i - nq - nk, T, sh, a8, ak, b.v, res)
    elif op == OP_ROPE:
        _rope_and_cache(b, li, t0, t1)
    elif op == OP_ATTEND:
        units, per = attend_units(T, H, KVH, threads)
        n_att = _attend_items(T, H, KVH, threads)
        q3 = b.q.reshape((b.q.shape[0], H, D))
        att3 = b.att.reshape((b.att.shape[0], H, D))
        window = ld[li, LD_WINDOW]
        for u in range(i, units, n_att):
            t, h0 = attend_unit(u, per, H)
            p = b.tpos[t]
            kcl = _kv_layer(b.kc, b, li, b.tslot[t] * b.par[PAR_KV_STRIDE_K])
            vcl = _kv_layer(b.vc, b, li, b.tslot[t] * b.par[PAR_KV_STRIDE_V])
            lo = attention.window_start(p, window)
            for h in range(h0, h0 + per):
                attention._attend(q3[t, h], kcl, vcl, h // (H // KVH), lo, p + 1, fp[FP_Q_SCALE],
                                  fp[FP_KQ_SCALE], fp[FP_SOFTCAP], b.scratch[tid], att3[t, h])
    elif op == OP_QUANT_ATT:
        _quantize_rows(b.att, t0, t1, qdim, b.a8f, b.akf, T, b.need[4 * li + IN_O], b.f16_table)
    elif op == OP_WO:
        a8, ak = _acts(qdim, T, b.a8f, b.akf)
        _mm_item(b.wdesc, wb + W_O, b.arenas, i, T, sh, a8, ak, b.proj, res)
    elif op == OP_FFN_IN:
        for t in range(t0, t1):
            _norm_add(b, t, ld[li, LD_POST_ATTN], b.proj[t])
            ops._rmsnorm_row(b.x[t], _vec(b, ld[li, LD_FFN_NORM], dim), eps, b.xb[t])
        _quantize_rows(b.xb, t0, t1, dim, b.a8f, b.akf, T, b.need[4 * li + IN_FFN], b.f16_table)
    elif op == OP_GATE_UP:
        a8, ak = _acts(dim, T, b.a8f, b.akf)
        r0, r1, g0, g1 = _mm_item(b.wdesc, wb + W_GATE, b.arenas, i, T, sh, a8, ak, b.gate, res)
        _mm_item(b.wdesc, wb + W_UP, b.arenas, i, T, sh, a8, ak, b.up, res)
        for t in range(g0, g1):
            if hp[HP_ACT] == ACT_GELU:
                ops._geglu_row(b.gate[t, r0:r1], b.up[t, r0:r1], b.gelu_table, b.hidden[t, r0:r1])
            else:
                ops._swiglu_row(b.gate[t, r0:r1], b.up[t, r0:r1], b.hidden[t, r0:r1])
    elif op == OP_QUANT_HID:
        _quantize_rows(b.hidden, t0, t1, ffn, b.a8f, b.akf, T, b.need[4 * li + IN_DOWN], b.f16_table)
    elif op == OP_DOWN:
        a8, ak = _acts(ffn, T, b.a8f, b.akf)
        _mm_item(b.wdesc, wb + W_DOWN, b.arenas, i, T, sh, a8, ak, b.proj, res)
    elif op == OP_OUT_IN:
        L = hp[HP_LAYERS]
        nlr = b.par[PAR_LOGIT_ROWS]
        lr0 = b.par[PAR_LOGIT_ROW0]
        _, per_lt = _token_items(nlr, threads)
        r0 = i * per_lt
        r1 = min(nlr, r0 + per_lt)
        for t in range(r0, r1):
            src = lr0 + t
            _norm_add(b, src, ld[L - 1, LD_POST_FFN], b.proj[src])
            ops._rmsnorm_row(b.x[src], _vec(b, hp[HP_OUT_NORM], dim), eps, b.xb[t])
        _quantize_rows(b.xb, r0, r1, dim, b.a8f, b.akf, nlr, b.need[4 * L], b.f16_table)
    else:  # OP_LOGITS
        nlr = b.par[PAR_LOGIT_ROWS]
        a8, ak = _acts(dim, nlr, b.a8f, b.akf)
        _mm_item(b.wdesc, 7 * hp[HP_LAYERS], b.arenas, i, nlr, sh, a8, ak, b.logits, res)


@njit(cache=True, nogil=True, _nrt=False)
def _rope_and_cache(b, li, t0, t1):
    """Tokens t0..t1 of layer li: biases and per-head norms of q and k, RoPE, then K and V into the cache."""
    hp, ld = b.hp, b.ldesc
    H, KVH, D = hp[HP_HEADS], hp[HP_KV_HEADS], hp[HP_HEAD_DIM]
    eps = b.fp[FP_EPS]
    neox = hp[HP_NEOX] != 0
    q3 = b.q.reshape((b.q.shape[0], H, D))
    k3 = b.k.reshape((b.k.shape[0], KVH, D))
    v3 = b.v.reshape((b.v.shape[0], KVH, D))
    rows = ld[li, LD_KV_ROWS]
    cos = b.cos[ld[li, LD_ROPE]]
    sin = b.sin[ld[li, LD_ROPE]]
    bq, bk, bv = ld[li, LD_BQ], ld[li, LD_BK], ld[li, LD_BV]
    qn, kn = ld[li, LD_Q_NORM], ld[li, LD_K_NORM]
    for t in range(t0, t1):
        p = b.tpos[t]
        slot = p % rows
        kcl = _kv_layer(b.kc, b, li, b.tslot[t] * b.par[PAR_KV_STRIDE_K])
        vcl = _kv_layer(b.vc, b, li, b.tslot[t] * b.par[PAR_KV_STRIDE_V])
        for h in range(H):
            qh = q3[t, h]
            if bq >= 0:
                for d in range(D):
                    qh[d] += b.vecs[bq + h * D + d]
            if qn >= 0:
                ops._rmsnorm_row(qh, _vec(b, qn, D), eps, qh)
            if neox:
                ops._rope_head_neox(qh, cos[p], sin[p])
            else:
                ops._rope_head(qh, cos[p], sin[p])
        for h in range(KVH):
            kh = k3[t, h]
            vh = v3[t, h]
            if bk >= 0:
                for d in range(D):
                    kh[d] += b.vecs[bk + h * D + d]
            if bv >= 0:
                for d in range(D):
                    vh[d] += b.vecs[bv + h * D + d]
            if kn >= 0:
                ops._rmsnorm_row(kh, _vec(b, kn, D), eps, kh)
            if neox:
                ops._rope_head_neox(kh, cos[p], sin[p])
            else:
                ops._rope_head(kh, cos[p], sin[p])
            attention.kv_store(kcl[slot, h], kh)
            attention.kv_store(vcl[slot, h], vh)


# ----------------------------------------------------------------------------- one evaluation


@njit(cache=True, nogil=True, _nrt=False)
def team_part(tid, job, idle_ns, ctl, b):
    """Thread ``tid``'s part in its team's evaluations: the forward pass's one compiled entry point.

    The caller (``tid`` 0) evaluates evaluation ``job`` and returns 1, or 0 if it was superseded. A
    worker waits for each evaluation after ``job`` and takes part in it; it returns the last one it
    saw once ``idle_ns`` pass without a new one (the caller then sleeps in Python), or -1 when told
    to stop. One function for both, with the stages inlined into it: numba optimizes and emits
    machine code again for everything a compiled function calls, so each entry point that reaches
    the stages cost a first run the whole pass's compile again (2.7 s of SmolLM2's 31 s, Zen 4).
    """
    while True:
        if tid != 0:
            nxt = _next_job(job, idle_ns, ctl)
            if nxt == -1:
                return -1
            if nxt == -2:
                return job
            job = nxt
        ok = _run_eval(tid, job, ctl, b)
        if tid == 0:
            return 1 if ok else 0


@njit(inline="always")
def _next_job(seen, idle_ns, ctl):
    """The next evaluation after ``seen``; -1 when told to stop, -2 after ``idle_ns`` without one."""
    spins = 0
    since = runtime.monotonic_ns()
    while True:
        if runtime.atomic_load(ctl, runtime.CTL_STOP * runtime.LINE) != 0:
            return -1
        job = runtime.atomic_load(ctl, runtime.CTL_JOB * runtime.LINE)
        if job != seen:
            return job
        spins = runtime.backoff(spins)
        if spins > runtime.SPIN and (spins & 15) == 0 and runtime.monotonic_ns() - since > idle_ns:
            return -2


@njit(inline="always")
def _run_eval(tid, tag, ctl, b):
    """Evaluate the batch described by ``b.par`` as thread ``tid``; False if it was superseded.

    The one loop: for each stage, take items until none is left, then wait until every taken
    item is done (the only wait on another thread; see runtime.py).
    """
    T = b.par[PAR_T]
    threads = b.par[PAR_THREADS]
    for s in range(b.par[PAR_STAGES]):
        op = b.stages[s, 0]
        li = b.stages[s, 1]
        n = n_items(op, li, T, threads, b)
        mine = 0
        while True:
            i = take(ctl, s, tag, n)
            if i < 0:
                return False
            if i >= n:
                break
            run_item(op, li, i, tid, T, threads, b)
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n):
            return False
    return True


# ----------------------------------------------------------------------------- compiling ahead


def compile_stages(b: Bundle, backward: bool = False) -> None:
    """Compile what ``team_part`` calls, for ``b``'s types, by calling each once from Python (row 0,
    thread 0: it writes into ``b``'s buffers, so use a throwaway context's bundle).

    Two processes can then share a first compile: one walks the list forward, then compiles
    ``team_part``, the other walks it backward; each finds what the other has finished in the on-disk
    cache, so they meet in the middle (engine.warmup). Argument types match those inside
    ``team_part``, or its compile would not find these in the cache (tests/test_warmup.py checks that
    it does).
    """
    dim, D = int(b.hp[HP_DIM]), int(b.hp[HP_HEAD_DIM])
    steps = [  # the costliest last: the helper starts with it while the main compile starts at the top
        lambda: n_items(OP_QKV, 0, 1, 1, b),
        lambda: _norm_add(b, 0, -1, b.proj[0]),
        lambda: _quantize_rows(b.xb, 0, 1, dim, b.a8f, b.akf, 1, b.need[0], b.f16_table),
        lambda: _acts(dim, 1, b.a8f, b.akf),
        lambda: _rope_and_cache(b, 0, 0, 1),
        lambda: attention._attend(b.q[0, :D], _kv_view(b.kc, b), _kv_view(b.vc, b), 0, 0, 1, b.fp[FP_Q_SCALE],
                                  b.fp[FP_KQ_SCALE], b.fp[FP_SOFTCAP], b.scratch[0], b.att[0, :D]),
        lambda: _mm_item(b.wdesc, 0, b.arenas, 0, 1, 1, *_act_views(dim, 1, b.a8f, b.akf), b.q, b.res_all[0]),
    ]
    for step in reversed(steps) if backward else steps:
        step()


def _act_views(n: int, T: int, a8f: tuple, akf: tuple) -> tuple[tuple, tuple]:
    """``_acts``' views, made by numpy: the compiled ``_acts`` cannot hand them to Python (it runs without
    reference counting, so numba boxes each view as the buffer it came from)."""
    nb = n // 32
    a8 = (a8f[0][: T * n].reshape((T, n)), a8f[1][: T * nb].reshape((T, nb)),
          a8f[2][: T * nb].reshape((T, nb)), a8f[3][: T * nb].reshape((T, nb)))
    ak = (akf[0][: T * n].reshape((T, n)), akf[1][: T * (n // 256)].reshape((T, n // 256)),
          akf[3][: T * (n // 16)].reshape((T, n // 16)), akf[4][: T * (n // 32)].reshape((T, n // 32)))
    return a8, ak


def _kv_view(cache: np.ndarray, b: Bundle) -> np.ndarray:
    """Layer 0's [rows, KVH, D] view of a cache, as ``_kv_layer`` makes it."""
    rows, kvh, d = int(b.ldesc[0, LD_KV_ROWS]), int(b.hp[HP_KV_HEADS]), int(b.hp[HP_HEAD_DIM])
    if cache.itemsize == 1:
        d = d // 32 * 34
    off = int(b.ldesc[0, LD_KV_OFF]) * kvh * d
    return cache[off : off + rows * kvh * d].reshape((rows, kvh, d))


# ----------------------------------------------------------------------------- the team of threads


class _Shared:
    """What the workers hold: not the Team itself, so dropping the context stops them."""

    def __init__(self, ctl: np.ndarray, bundle: Bundle, idle_ns: int) -> None:
        self.ctl = ctl
        self.bundle = bundle
        self.idle_ns = idle_ns
        self.cond = threading.Condition()
        self.sleeping = 0
        self.team_part = _entry_point(team_part, (0, 0, idle_ns, ctl, bundle))


class Team:
    """The caller plus ``threads - 1`` worker threads sharing the evaluations of one context.

    The caller writes each evaluation's parameters into ``bundle.par`` and calls ``run``. Workers
    spin and yield for ``idle_s`` after an evaluation (generation calls again within microseconds),
    then sleep on a condition variable until the next one.
    """

    def __init__(self, threads: int, bundle: Bundle, idle_s: float = 0.02) -> None:
        self.threads = threads
        self.n_stages = len(bundle.stages)
        self.tag = 0
        self._shared = _Shared(runtime.control_array(self.n_stages), bundle, int(idle_s * 1e9))
        self._workers = [threading.Thread(target=_worker_main, args=(self._shared, tid), daemon=True,
                                          name=f"pipx-llama-worker-{tid}") for tid in range(1, threads)]
        for th in self._workers:
            th.start()
        self._finalizer = weakref.finalize(self, _stop, self._shared, list(self._workers))

    def run(self) -> None:
        sh = self._shared
        self.tag += 1
        runtime.publish(sh.ctl, self.n_stages, self.tag)
        if sh.sleeping:
            with sh.cond:
                sh.cond.notify_all()
        if not sh.team_part(0, self.tag, sh.idle_ns, sh.ctl, sh.bundle):
            raise RuntimeError("forward pass superseded")  # cannot happen: only the caller publishes

    def close(self) -> None:
        self._finalizer()


def _entry_point(kernel, args: tuple):
    """``kernel``'s compiled function for these argument types, called without numba's dispatch.

    Dispatch types every argument on each call, and a bundle of ~40 arrays takes the slow path of
    numba's typeof: 380 us a call measured (SmolLM2's bundle, Zen 4), 7% of a generated token at
    2 threads; the entry point itself is called in 2 us. A team calls with the same array objects
    every time, so typing them once is enough.
    """
    sig = tuple(kernel.typeof_pyval(a) for a in args)
    if sig not in kernel.overloads:
        kernel.compile(sig)
    return kernel.overloads[sig].entry_point


def _worker_main(sh: _Shared, tid: int) -> None:
    ctl = sh.ctl
    job_i, stop_i = runtime.CTL_JOB * runtime.LINE, runtime.CTL_STOP * runtime.LINE
    seen = 0
    while True:
        seen = sh.team_part(tid, seen, sh.idle_ns, ctl, sh.bundle)
        if seen < 0:
            return
        with sh.cond:
            sh.sleeping += 1
            while ctl[job_i] == seen and ctl[stop_i] == 0:
                sh.cond.wait()
            sh.sleeping -= 1


def _stop(sh: _Shared, workers: list[threading.Thread]) -> None:
    runtime.store(sh.ctl, runtime.CTL_STOP * runtime.LINE, 1)
    with sh.cond:
        sh.cond.notify_all()
    for th in workers:
        if th is not threading.current_thread():
            th.join(timeout=5)
