"""One forward pass over tokens of several sequences: the batch behind a server's parallel slots.

Generation is memory-bound: a pass streams every weight once whatever the number of tokens, so
advancing N sequences in one pass costs little more than advancing one. ``BatchEval.eval`` takes
parts ``(context, tokens)`` of different ``Context`` objects of one model -- a prompt chunk of one
sequence next to single decode tokens of others -- and runs the per-op path of ``Context._forward``
over all their tokens at once: every matmul (the multi-token kernels prompts use) reads each weight
once for the whole batch, while RoPE, the KV cache writes and attention run per part, each in its
own context's cache (its own positions, length and sliding-window rings).

Contexts made by ``new_slots`` keep their KV caches in one pool (slot s at s times a slot's size):
there the batch runs on the fused pass (kernels/fused.py) with each token's position and slot in the
bundle (``tpos``/``tslot``), its multi-token packed kernels sharing each weight block among all the
batch's tokens. Tokens need not be in sequence order within a batch (every K and V of a batch is
stored before any attention reads), so the tokens whose logits are wanted go last, as the fused pass's
logit rows are the batch's tail.

A row of a multi-token matmul does not depend on the other rows (activations are quantized per
row and accumulated in the same order), so each part's logits are bit for bit those of the same path
run on that sequence alone -- and the per-op path and the fused pass agree bit for bit for the legacy
quantizations (tests/test_batch.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

from pipx_llama.engine.arch import ROPE_NEOX
from pipx_llama.engine.kernels import attention, ops
from pipx_llama.engine.kernels import fused as fused_kernels
from pipx_llama.engine.model import _FUSED_PLAIN_MAX_T, Context, Model, layer_tail
from pipx_llama.errors import ContextFullError, UsageError


@dataclass(frozen=True)
class Part:
    """Tokens to append to one sequence; ``logits``: return the logits of its last token."""

    context: Context
    tokens: Sequence[int]
    logits: bool = True


@dataclass(frozen=True)
class SlotPool:
    """``contexts`` whose KV caches are consecutive slots of the flat buffers ``k`` and ``v``."""

    contexts: list[Context]
    k: np.ndarray
    v: np.ndarray
    n_ctx: int
    n_batch: int
    type_k: str
    type_v: str


def new_slots(model: Model, n: int, n_ctx: int | None = None, n_batch: int = 256, *, type_k: str = "f16",
              type_v: str = "f16") -> SlotPool:
    """``n`` contexts (fused pass when alone) whose caches share one pool, for ``BatchEval(pool=...)``."""
    if n < 1:
        raise UsageError(f"a pool needs at least one slot, got {n}", "pass 1 or more")
    first = model.new_context(n_ctx, n_batch, fused=False, type_k=type_k, type_v=type_v)
    one = first.kv
    k = np.zeros(n * one.k.size, one.k.dtype)
    v = np.zeros(n * one.v.size, one.v.dtype)
    del first
    contexts = [model.new_context(one.n_ctx, n_batch, type_k=type_k, type_v=type_v,
                                  kv_buffers=(k[i * one.k.size : (i + 1) * one.k.size],
                                              v[i * one.v.size : (i + 1) * one.v.size]))
                for i in range(n)]
    return SlotPool(contexts, k, v, one.n_ctx, contexts[0].n_batch, type_k, type_v)


class BatchEval:
    """Scratch buffers for batches of up to ``max_tokens`` tokens of one model's contexts; with ``pool``,
    batches of that pool's contexts run on the fused pass where the model has one."""

    def __init__(self, model: Model, max_tokens: int, pool: SlotPool | None = None) -> None:
        if max_tokens < 1:
            raise UsageError(f"a batch holds at least one token, got {max_tokens}", "pass 1 or more")
        hp = model.hparams
        self.model = model
        self.max_tokens = max_tokens
        b, q_dim, kv_dim = max_tokens, hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        self._x = np.empty((b, hp.dim), np.float32)
        self._xb = np.empty((b, hp.dim), np.float32)
        self._q = np.empty((b, q_dim), np.float32)
        self._k = np.empty((b, kv_dim), np.float32)
        self._v = np.empty((b, kv_dim), np.float32)
        self._att = np.empty((b, q_dim), np.float32)
        self._proj = np.empty((b, hp.dim), np.float32)
        self._gate = np.empty((b, hp.ffn_dim), np.float32)
        self._up = np.empty((b, hp.ffn_dim), np.float32)
        self._hidden = np.empty((b, hp.ffn_dim), np.float32)
        self.pool = pool
        self._carrier: Context | None = None
        pw = model.packed
        if pool is not None and pw is not None:
            if max_tokens > pool.n_batch:
                raise UsageError(f"a fused batch of {max_tokens} tokens exceeds the pool's batch of "
                                 f"{pool.n_batch}", "make the pool's n_batch at least the batch size")
            self._slot_of = {id(c): i for i, c in enumerate(pool.contexts)}
            # a context that owns no cache of its own: its bundle points at the whole pool
            sk, sv = pool.contexts[0].kv.k.size, pool.contexts[0].kv.v.size
            carrier = model.new_context(pool.n_ctx, pool.n_batch, fused=False, type_k=pool.type_k,
                                        type_v=pool.type_v, kv_buffers=(pool.k[:sk], pool.v[:sv]))
            carrier._init_fused((pool.k, pool.v))
            carrier._par[fused_kernels.PAR_KV_STRIDE_K] = sk
            carrier._par[fused_kernels.PAR_KV_STRIDE_V] = sv
            self._carrier = carrier

    def eval(self, parts: Sequence[Part]) -> list[np.ndarray | None]:
        """Evaluate every part in one pass; per part the logits f32 [n_vocab] of its last token, or None."""
        ids, spans = self._check(parts)
        pw = self.model.packed
        if self._carrier is not None and pw is not None and (ids.size <= _FUSED_PLAIN_MAX_T or not pw.plain):
            if all(id(p.context) in self._slot_of for p in parts):
                return self._eval_fused(parts, ids, spans)
        m, hp = self.model, self.model.hparams
        numba.set_num_threads(min(m.threads, numba.config.NUMBA_NUM_THREADS))
        T = ids.size
        x, xb = self._x[:T], self._xb[:T]
        q, k, v = self._q[:T], self._k[:T], self._v[:T]
        att, proj = self._att[:T], self._proj[:T]
        gate, up, hidden = self._gate[:T], self._up[:T], self._hidden[:T]
        q_heads = q.reshape(T, hp.n_heads, hp.head_dim)
        k_heads = k.reshape(T, hp.n_kv_heads, hp.head_dim)
        v_heads = v.reshape(T, hp.n_kv_heads, hp.head_dim)
        att_heads = att.reshape(T, hp.n_heads, hp.head_dim)
        rope = ops.rope_neox if hp.rope_type == ROPE_NEOX else ops.rope
        act = m.family.activation

        m.tok_embd.kernel.dequantize(np.ascontiguousarray(m.tok_embd.data[ids]), x)
        if hp.embed_scale != 1.0:
            x *= np.float32(hp.embed_scale)
        for li, layer in enumerate(m.layers):
            ops.rmsnorm(x, layer.attn_norm, hp.norm_eps, xb)
            layer.wq.matmul(xb, q)
            layer.wk.matmul(xb, k)
            layer.wv.matmul(xb, v)
            for t, bias in ((q, layer.bq), (k, layer.bk), (v, layer.bv)):
                if bias is not None:
                    t += bias
            if layer.q_norm is not None:
                ops.rmsnorm(q.reshape(-1, hp.head_dim), layer.q_norm, hp.norm_eps, q.reshape(-1, hp.head_dim))
                ops.rmsnorm(k.reshape(-1, hp.head_dim), layer.k_norm, hp.norm_eps, k.reshape(-1, hp.head_dim))
            table = 1 if layer.window else 0
            for part, (a, b) in zip(parts, spans):
                ctx = part.context
                self._attend(ctx, li, layer.window, rope, table, q_heads[a:b], k_heads[a:b], v_heads[a:b],
                             att_heads[a:b])
            layer_tail(layer, hp, act, x, att, xb, gate, up, hidden, proj)

        for part, (a, b) in zip(parts, spans):
            part.context.n_past += b - a
            part.context.tokens.extend(int(t) for t in ids[a:b])
        last = [b - 1 for part, (_, b) in zip(parts, spans) if part.logits]
        out: list[np.ndarray | None] = [None] * len(parts)
        if not last:
            return out
        rows = np.ascontiguousarray(x[last])
        normed = np.empty_like(rows)
        ops.rmsnorm(rows, m.output_norm, hp.norm_eps, normed)
        logits = np.empty((len(last), hp.n_vocab), np.float32)
        m.output.matmul(normed, logits)
        if hp.final_softcap:
            ops.softcap(logits, hp.final_softcap)
        wanted = iter(logits)
        return [next(wanted) if part.logits else None for part in parts]

    def _eval_fused(self, parts: Sequence[Part], ids: np.ndarray,
                    spans: list[tuple[int, int]]) -> list[np.ndarray | None]:
        """The fused pass over every part's tokens, each at its position in its slot of the pool."""
        c = self._carrier
        hp = self.model.hparams
        T = ids.size
        order, tail = [], []  # batch row -> index into ids; the logit rows last
        for part, (a, b) in zip(parts, spans):
            if part.logits:
                order.extend(range(a, b - 1))
                tail.append(b - 1)
            else:
                order.extend(range(a, b))
        order.extend(tail)
        rows = np.asarray(order, np.int64)
        pos = np.empty(T, np.int64)
        slot = np.empty(T, np.int64)
        for part, (a, b) in zip(parts, spans):
            ctx = part.context
            pos[a:b] = np.arange(ctx.n_past, ctx.n_past + (b - a))
            slot[a:b] = self._slot_of[id(ctx)]
        c._tpos[:T] = pos[rows]
        c._tslot[:T] = slot[rows]
        c._embed(ids[rows])
        team, par = c._team, c._par
        n_rows = len(tail)
        par[fused_kernels.PAR_T] = T
        par[fused_kernels.PAR_POS0] = 0
        par[fused_kernels.PAR_LOGIT_ROW0] = T - n_rows
        par[fused_kernels.PAR_LOGIT_ROWS] = n_rows
        par[fused_kernels.PAR_THREADS] = team.threads
        par[fused_kernels.PAR_STAGES] = team.n_stages if n_rows else team.n_stages - 2
        team.run()
        for part, (a, b) in zip(parts, spans):
            part.context.n_past += b - a
            part.context.tokens.extend(int(t) for t in ids[a:b])
        logits = c._logits[:n_rows].copy()
        if hp.final_softcap:
            ops.softcap(logits, hp.final_softcap)
        wanted = iter(logits)
        return [next(wanted) if part.logits else None for part in parts]

    def _attend(self, ctx: Context, li: int, window: int, rope, table: int, q: np.ndarray, k: np.ndarray,
                v: np.ndarray, out: np.ndarray) -> None:
        """RoPE, the cache writes and attention of one part's tokens in its own context."""
        hp = self.model.hparams
        pos0 = ctx.n_past
        positions = np.arange(pos0, pos0 + q.shape[0], dtype=np.int32)
        cos, sin = ctx.rope_cos[table], ctx.rope_sin[table]
        rope(q, positions, cos, sin)
        rope(k, positions, cos, sin)
        kc, vc = ctx.kv.k_layer(li), ctx.kv.v_layer(li)
        slots = positions % kc.shape[0]
        for cache, heads in ((kc, k), (vc, v)):
            if cache.dtype == np.uint8:
                attention.kv_store_rows(cache, slots, heads)
            else:
                cache[slots] = heads
        attention.attention(q, kc, vc, pos0, out, window=window, q_scale=hp.q_scale, kq_scale=ctx.kq_scale,
                            softcap=hp.attn_softcap)

    def _check(self, parts: Sequence[Part]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """All tokens in one array, and each part's [start, end) in it; refuses what cannot be evaluated."""
        if not parts:
            raise UsageError("nothing to evaluate: the batch is empty", "pass at least one part")
        n_vocab = self.model.hparams.n_vocab
        chunks, spans, start, seen = [], [], 0, set()
        for part in parts:
            ctx = part.context
            if ctx.model is not self.model:
                raise UsageError("a batch mixes contexts of different models", "batch one model's contexts")
            if id(ctx) in seen:
                raise UsageError("a batch holds two parts of one sequence", "join them into one part")
            seen.add(id(ctx))
            ids = np.asarray(part.tokens, dtype=np.int64).reshape(-1)
            if ids.size == 0:
                raise UsageError("a part of the batch has no tokens", "pass at least one token per part")
            if ids.size > ctx.n_batch:
                raise UsageError(f"a part of {ids.size} tokens exceeds its context's batch of {ctx.n_batch}",
                                 "split the prompt into chunks of at most the batch size")
            if ids.min() < 0 or ids.max() >= n_vocab:
                bad = int(ids[(ids < 0) | (ids >= n_vocab)][0])
                raise UsageError(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})",
                                 "use ids produced by this model's tokenizer")
            if ctx.n_past + ids.size > ctx.n_ctx:
                raise ContextFullError(
                    f"{ctx.n_past} cached + {ids.size} new tokens exceed the context of {ctx.n_ctx}",
                    "start a new conversation, shorten the prompt, or raise -c/--ctx-size")
            chunks.append(ids)
            spans.append((start, start + ids.size))
            start += ids.size
        if start > self.max_tokens:
            raise UsageError(f"a batch of {start} tokens exceeds this evaluator's {self.max_tokens}",
                             "evaluate fewer or shorter parts per pass")
        return np.concatenate(chunks), spans
