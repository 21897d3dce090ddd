"""The LLaMA forward pass as one numba function per thread: no Python between the layers.

``run_eval`` evaluates a batch of T tokens through every layer and writes the logits. Each thread
of a context's :class:`Team` calls it with the same arguments and walks the same sequence of
stages (see :mod:`pipx_llama.engine.kernels.runtime` for how items are shared without barriers):

    per layer: norm+quantize | q,k,v matmuls | RoPE + KV cache | attention | quantize |
               output projection | residual+norm+quantize | gate,up matmuls + SwiGLU |
               quantize | down matmul
    then:      residual + output norm + quantize | output matmul

Activations are quantized once per input and shared by every matmul that reads it (q/k/v,
gate/up). The arithmetic is that of the per-op path in ``model.py`` (the same numba helpers of
:mod:`~pipx_llama.engine.kernels.ops`, the packed kernels bit-identical to the portable ones), so
both paths give the same logits bit for bit; the tests compare them.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
from numba import njit

from pipx_llama.engine.kernels import ops, packed, runtime
from pipx_llama.engine.kernels.kquants import quantize_q8_K
from pipx_llama.engine.kernels.legacy import quantize_q8_1
from pipx_llama.engine.kernels.runtime import done, take, wait_stage

# hyper-parameter slots (int64 array ``hp``)
HP_DIM, HP_LAYERS, HP_HEADS, HP_KV_HEADS, HP_HEAD_DIM, HP_FFN, HP_VOCAB = range(7)
# per-evaluation slots (int64 array ``par``)
PAR_T, PAR_POS0, PAR_LOGIT_ROW0, PAR_LOGIT_ROWS, PAR_THREADS = range(5)
# weight descriptor columns (int64 array ``wdesc`` [n_weights, 4])
WD_KIND, WD_ROWS, WD_COLS, WD_OFFSET = range(4)
W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN = range(7)  # weight index = 7 * layer + these; output = 7 * L
# which activation formats each matmul input needs (int64 array ``need`` [4 * L + 1], packed.ACT_* bits)
IN_QKV, IN_O, IN_FFN, IN_DOWN = range(4)  # index 4 * layer + these; output = 4 * L

STAGES_PER_LAYER = 10
MAX_TOKEN_TILE = 64  # tokens per matmul item in prompt processing (weights of an item stay in L1/L2)
ITEM_BYTES = 1 << 16  # weight bytes per matmul item for one token (measured: larger items did not help)


def n_stages(n_layers: int) -> int:
    return STAGES_PER_LAYER * n_layers + 2


# ----------------------------------------------------------------------------- work splitting


@njit(cache=True, nogil=True, _nrt=False)
def _token_items(T, threads):
    """(items, tokens per item) for per-token work."""
    per = max(1, (T + 4 * threads - 1) // (4 * threads))
    return (T + per - 1) // per, per


@njit(cache=True, nogil=True, _nrt=False)
def _mm_split(wdesc, widx, T, threads):
    """(groups per item, token tile) for a matmul of weight ``widx`` over T tokens."""
    cols = wdesc[widx, WD_COLS]
    rows = wdesc[widx, WD_ROWS]
    group_bytes = cols * 18 // 32 * 16  # about: packed 4-bit group of 16 rows
    tile = min(T, MAX_TOKEN_TILE)
    groups = (rows + 15) // 16
    gpc = max(1, ITEM_BYTES // (group_bytes * tile))
    # enough items to share: at least 4 per thread when there is work for that many
    gpc = min(gpc, max(1, groups // (4 * threads)))
    return gpc, tile


@njit(cache=True, nogil=True, _nrt=False)
def _mm_count(wdesc, widx, T, gpc, tile):
    groups = (wdesc[widx, WD_ROWS] + 15) // 16
    return ((groups + gpc - 1) // gpc) * ((T + tile - 1) // tile)


@njit(cache=True, nogil=True, _nrt=False)
def _mm_item(wdesc, widx, arena, i, T, gpc, tile, a8, ak, out, res):
    n_tt = (T + tile - 1) // tile
    gc = i // n_tt
    t0 = (i - gc * n_tt) * tile
    groups = (wdesc[widx, WD_ROWS] + 15) // 16
    g0 = gc * gpc
    g1 = min(groups, g0 + gpc)
    t1 = min(T, t0 + tile)
    packed.matmul_range(wdesc[widx, WD_KIND], arena, wdesc[widx, WD_OFFSET], wdesc[widx, WD_ROWS],
                        wdesc[widx, WD_COLS], g0, g1, t0, t1, a8, ak, out, res)
    return g0 * 16, min(wdesc[widx, WD_ROWS], g1 * 16), t0, t1


@njit(cache=True, nogil=True)
def _quantize_rows(src, t0, t1, n, a8f, akf, T, need, table):
    """Activations of src[t0:t1, :n] in the formats ``need`` asks for, into [T, n] views of the buffers."""
    if need & packed.ACT_Q8:
        a8 = _acts8(n, T, a8f)
        quantize_q8_1(src[t0:t1, :n], a8[0][t0:t1], a8[1][t0:t1], a8[2][t0:t1], table)
        packed.block_sums(a8[0], a8[3], t0, t1)
    if need & packed.ACT_Q8K:
        kq, kd, kbs, kb16, kb32 = _actsk(n, T, akf)
        quantize_q8_K(src[t0:t1, :n], kq[t0:t1], kd[t0:t1], kbs[t0:t1])
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


@njit(inline="always")
def _acts(n, T, a8f, akf):
    """(Q8_1 views, Q8_K views) of the activation buffers for a [T, n] input."""
    kq, kd, _, kb16, kb32 = _actsk(n, T, akf)
    return _acts8(n, T, a8f), (kq, kd, kb16, kb32)


# ----------------------------------------------------------------------------- one evaluation


@njit(cache=True, nogil=True)
def run_eval(tid, tag, ctl, hp, eps, scale, par, arena, wdesc, need, norms, cos, sin, kc, vc, x, xb, q, k, v, att,
             proj, gate, up, hidden, logits, a8f, akf, scratch, res_all, table):
    """Evaluate the batch described by ``par`` as thread ``tid``; False if it was superseded."""
    T = par[PAR_T]
    pos0 = par[PAR_POS0]
    lr0 = par[PAR_LOGIT_ROW0]
    nlr = par[PAR_LOGIT_ROWS]
    threads = par[PAR_THREADS]
    dim = hp[HP_DIM]
    L = hp[HP_LAYERS]
    H = hp[HP_HEADS]
    KVH = hp[HP_KV_HEADS]
    D = hp[HP_HEAD_DIM]
    ffn = hp[HP_FFN]
    group = H // KVH
    qdim = H * D
    res = res_all[tid]
    work = scratch[tid]
    q3 = q.reshape((q.shape[0], H, D))
    k3 = k.reshape((k.shape[0], KVH, D))
    v3 = v.reshape((v.shape[0], KVH, D))
    att3 = att.reshape((att.shape[0], H, D))
    n_tok, per_tok = _token_items(T, threads)
    s = 0
    for li in range(L):
        wb = 7 * li
        # -- residual add (not before layer 0), attention norm, quantize
        mine = 0
        while True:
            i = take(ctl, s, tag, n_tok)
            if i < 0:
                return False
            if i >= n_tok:
                break
            t0 = i * per_tok
            t1 = min(T, t0 + per_tok)
            for t in range(t0, t1):
                if li > 0:
                    for j in range(dim):
                        x[t, j] += proj[t, j]
                ops._rmsnorm_row(x[t], norms[2 * li], eps, xb[t])
            _quantize_rows(xb, t0, t1, dim, a8f, akf, T, need[4 * li + IN_QKV], table)
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n_tok):
            return False
        s += 1
        # -- q, k, v
        a8, ak = _acts(dim, T, a8f, akf)
        gq, tq = _mm_split(wdesc, wb + W_Q, T, threads)
        gk, tk = _mm_split(wdesc, wb + W_K, T, threads)
        nq = _mm_count(wdesc, wb + W_Q, T, gq, tq)
        nk = _mm_count(wdesc, wb + W_K, T, gk, tk)
        nv = _mm_count(wdesc, wb + W_V, T, gk, tk)
        n = nq + nk + nv
        mine = 0
        while True:
            i = take(ctl, s, tag, n)
            if i < 0:
                return False
            if i >= n:
                break
            if i < nq:
                _mm_item(wdesc, wb + W_Q, arena, i, T, gq, tq, a8, ak, q, res)
            elif i < nq + nk:
                _mm_item(wdesc, wb + W_K, arena, i - nq, T, gk, tk, a8, ak, k, res)
            else:
                _mm_item(wdesc, wb + W_V, arena, i - nq - nk, T, gk, tk, a8, ak, v, res)
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n):
            return False
        s += 1
        # -- RoPE, then keys and values into the cache
        kcl = kc[li]
        vcl = vc[li]
        mine = 0
        while True:
            i = take(ctl, s, tag, n_tok)
            if i < 0:
                return False
            if i >= n_tok:
                break
            for t in range(i * per_tok, min(T, i * per_tok + per_tok)):
                p = pos0 + t
                for h in range(H):
                    ops._rope_head(q3[t, h], cos[p], sin[p])
                for h in range(KVH):
                    ops._rope_head(k3[t, h], cos[p], sin[p])
                    for d in range(D):
                        kcl[p, h, d] = ops.f32_to_f16_bits(k3[t, h, d])
                        vcl[p, h, d] = ops.f32_to_f16_bits(v3[t, h, d])
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n_tok):
            return False
        s += 1
        # -- attention, (token, head) pairs dealt round-robin (causal rows differ in length)
        n_pairs = T * H
        n_att = min(n_pairs, 8 * threads) if T > 1 else min(n_pairs, 2 * threads)
        mine = 0
        while True:
            i = take(ctl, s, tag, n_att)
            if i < 0:
                return False
            if i >= n_att:
                break
            for pair in range(i, n_pairs, n_att):
                t = pair // H
                h = pair - t * H
                ops._attend(q3[t, h], kcl, vcl, h // group, pos0 + t + 1, scale, work, att3[t, h])
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n_att):
            return False
        s += 1
        # -- quantize the attention output
        mine = 0
        while True:
            i = take(ctl, s, tag, n_tok)
            if i < 0:
                return False
            if i >= n_tok:
                break
            _quantize_rows(att, i * per_tok, min(T, i * per_tok + per_tok), qdim, a8f, akf, T,
                           need[4 * li + IN_O], table)
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n_tok):
            return False
        s += 1
        # -- output projection
        a8, ak = _acts(qdim, T, a8f, akf)
        go, to = _mm_split(wdesc, wb + W_O, T, threads)
        n = _mm_count(wdesc, wb + W_O, T, go, to)
        mine = 0
        while True:
            i = take(ctl, s, tag, n)
            if i < 0:
                return False
            if i >= n:
                break
            _mm_item(wdesc, wb + W_O, arena, i, T, go, to, a8, ak, proj, res)
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n):
            return False
        s += 1
        # -- residual add, feed-forward norm, quantize
        mine = 0
        while True:
            i = take(ctl, s, tag, n_tok)
            if i < 0:
                return False
            if i >= n_tok:
                break
            t0 = i * per_tok
            t1 = min(T, t0 + per_tok)
            for t in range(t0, t1):
                for j in range(dim):
                    x[t, j] += proj[t, j]
                ops._rmsnorm_row(x[t], norms[2 * li + 1], eps, xb[t])
            _quantize_rows(xb, t0, t1, dim, a8f, akf, T, need[4 * li + IN_FFN], table)
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n_tok):
            return False
        s += 1
        # -- gate and up of the same rows in one item, then SwiGLU on them
        a8, ak = _acts(dim, T, a8f, akf)
        gg, tg = _mm_split(wdesc, wb + W_GATE, T, threads)
        n = _mm_count(wdesc, wb + W_GATE, T, gg, tg)
        mine = 0
        while True:
            i = take(ctl, s, tag, n)
            if i < 0:
                return False
            if i >= n:
                break
            r0, r1, t0, t1 = _mm_item(wdesc, wb + W_GATE, arena, i, T, gg, tg, a8, ak, gate, res)
            _mm_item(wdesc, wb + W_UP, arena, i, T, gg, tg, a8, ak, up, res)
            for t in range(t0, t1):
                ops._swiglu_row(gate[t, r0:r1], up[t, r0:r1], hidden[t, r0:r1])
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n):
            return False
        s += 1
        # -- quantize the hidden activations
        mine = 0
        while True:
            i = take(ctl, s, tag, n_tok)
            if i < 0:
                return False
            if i >= n_tok:
                break
            _quantize_rows(hidden, i * per_tok, min(T, i * per_tok + per_tok), ffn, a8f, akf, T,
                           need[4 * li + IN_DOWN], table)
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n_tok):
            return False
        s += 1
        # -- down projection
        a8, ak = _acts(ffn, T, a8f, akf)
        gd, td = _mm_split(wdesc, wb + W_DOWN, T, threads)
        n = _mm_count(wdesc, wb + W_DOWN, T, gd, td)
        mine = 0
        while True:
            i = take(ctl, s, tag, n)
            if i < 0:
                return False
            if i >= n:
                break
            _mm_item(wdesc, wb + W_DOWN, arena, i, T, gd, td, a8, ak, proj, res)
            mine += 1
        done(ctl, s, mine)
        if not wait_stage(ctl, s, tag, n):
            return False
        s += 1
    if nlr == 0:
        return True
    # -- last residual add, output norm of the rows that need logits, quantize
    n_lt, per_lt = _token_items(nlr, threads)
    mine = 0
    while True:
        i = take(ctl, s, tag, n_lt)
        if i < 0:
            return False
        if i >= n_lt:
            break
        t0 = i * per_lt
        t1 = min(nlr, t0 + per_lt)
        for t in range(t0, t1):
            src = lr0 + t
            for j in range(dim):
                x[src, j] += proj[src, j]
            ops._rmsnorm_row(x[src], norms[2 * L], eps, xb[t])
        _quantize_rows(xb, t0, t1, dim, a8f, akf, nlr, need[4 * L], table)
        mine += 1
    done(ctl, s, mine)
    if not wait_stage(ctl, s, tag, n_lt):
        return False
    s += 1
    # -- logits
    a8, ak = _acts(dim, nlr, a8f, akf)
    wo = 7 * L
    gl, tl = _mm_split(wdesc, wo, nlr, threads)
    n = _mm_count(wdesc, wo, nlr, gl, tl)
    mine = 0
    while True:
        i = take(ctl, s, tag, n)
        if i < 0:
            return False
        if i >= n:
            break
        _mm_item(wdesc, wo, arena, i, nlr, gl, tl, a8, ak, logits, res)
        mine += 1
    done(ctl, s, mine)
    return wait_stage(ctl, s, tag, n)


@njit(cache=True, nogil=True)
def worker_loop(tid, seen, idle_ns, ctl, hp, eps, scale, par, arena, wdesc, need, norms, cos, sin, kc, vc, x, xb, q, k,
                v, att, proj, gate, up, hidden, logits, a8f, akf, scratch, res_all, table):
    """A worker: wait for each new evaluation and take part in it; return the last evaluation seen
    after ``idle_ns`` without one (the caller then sleeps in Python), or -1 when told to stop."""
    while True:
        spins = 0
        since = runtime.monotonic_ns()
        while True:
            if runtime.atomic_load(ctl, runtime.CTL_STOP * runtime.LINE) != 0:
                return -1
            job = runtime.atomic_load(ctl, runtime.CTL_JOB * runtime.LINE)
            if job != seen:
                break
            spins = runtime.backoff(spins)
            if spins > runtime.SPIN and (spins & 15) == 0 and runtime.monotonic_ns() - since > idle_ns:
                return seen
        seen = job
        run_eval(tid, job, ctl, hp, eps, scale, par, arena, wdesc, need, norms, cos, sin, kc, vc, x, xb, q, k, v, att,
                 proj, gate, up, hidden, logits, a8f, akf, scratch, res_all, table)


# ----------------------------------------------------------------------------- the team of threads


class _Shared:
    """What the workers hold: not the Team itself, so dropping the context stops them."""

    def __init__(self, ctl: np.ndarray, args: tuple, idle_ns: int) -> None:
        self.ctl = ctl
        self.args = args
        self.idle_ns = idle_ns
        self.cond = threading.Condition()
        self.sleeping = 0


class Team:
    """The caller plus ``threads - 1`` worker threads sharing the evaluations of one context.

    ``args`` are run_eval's arguments after ``ctl`` (``hp, eps, scale, par, arena, ...``); the
    caller writes each evaluation's parameters into ``par`` and calls ``run``. Workers spin and
    yield for ``idle_s`` after an evaluation (generation calls again within microseconds), then
    sleep on a condition variable until the next one.
    """

    def __init__(self, threads: int, n_stages_: int, args: tuple, idle_s: float = 0.02) -> None:
        self.threads = threads
        self.n_stages = n_stages_
        self.tag = 0
        self._shared = _Shared(runtime.control_array(n_stages_), args, int(idle_s * 1e9))
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
        if not run_eval(0, self.tag, sh.ctl, *sh.args):
            raise RuntimeError("forward pass superseded")  # cannot happen: only the caller publishes

    def close(self) -> None:
        self._finalizer()


def _worker_main(sh: _Shared, tid: int) -> None:
    ctl = sh.ctl
    job_i, stop_i = runtime.CTL_JOB * runtime.LINE, runtime.CTL_STOP * runtime.LINE
    seen = 0
    while True:
        seen = worker_loop(tid, seen, sh.idle_ns, ctl, *sh.args)
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
