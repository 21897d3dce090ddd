"""Perplexity as llama.cpp's ``llama-perplexity`` computes it.

The text is tokenized once (with BOS when the model adds one) and cut into chunks of ``n_ctx``
tokens; each chunk is evaluated from an empty cache (its first token replaced by BOS when the model
adds one) and only the second half of each chunk is scored, so every scored token has at least
``n_ctx/2`` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipx_llama.engine.model import Model
from pipx_llama.errors import UsageError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    n_ctx: int
    n_chunks: int
    n_scored: int
    chunk_ppl: list[float]  # running perplexity after each chunk, as llama.cpp prints it
    nll_sum: float


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row of logits [N, vocab], computed in float64."""
    rows = logits.astype(np.float64)
    mx = rows.max(axis=1, keepdims=True)
    lse = np.log(np.exp(rows - mx).sum(axis=1)) + mx[:, 0]
    return rows[np.arange(len(targets)), targets] - lse


def perplexity(
    model: Model,
    tokens: Sequence[int],
    n_ctx: int,
    *,
    add_bos: bool | None = None,
    on_chunk: Callable[[int, int, float], None] | None = None,
    cache_types: tuple[str, str] = ("f16", "f16"),
) -> PerplexityResult:
    """llama.cpp's chunked perplexity over ``tokens``; ``on_chunk(i, n_chunks, running_ppl)`` reports
    progress."""
    if n_ctx < 4:
        raise UsageError(f"context size {n_ctx} is too small for perplexity", "use -c 128 or more")
    tok = model.tokenizer
    if add_bos is None:
        add_bos = tok.add_bos
    n_chunks = len(tokens) // n_ctx
    if n_chunks == 0:
        raise UsageError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}",
                         f"use a longer text or a smaller -c (at most {len(tokens)})")
    first = n_ctx // 2
    ctx = model.new_context(n_ctx, type_k=cache_types[0], type_v=cache_types[1])
    nll, count, running = 0.0, 0, []
    for c in range(n_chunks):
        chunk = np.asarray(tokens[c * n_ctx : (c + 1) * n_ctx], dtype=np.int64)
        if add_bos:
            chunk = chunk.copy()
            chunk[0] = tok.bos_id
        ctx.reset()
        logits = ctx.eval(chunk, all_logits=True)
        logp = log_softmax_at(logits[first : n_ctx - 1], chunk[first + 1 :])
        nll -= float(logp.sum())
        count += logp.size
        running.append(math.exp(nll / count))
        if on_chunk is not None:
            on_chunk(c + 1, n_chunks, running[-1])
    return PerplexityResult(math.exp(nll / count), n_ctx, n_chunks, count, running, nll)


def window_perplexity(model: Model, tokens: Sequence[int]) -> float:
    """Perplexity of one window: every token after the first scored against all before it."""
    ctx = model.new_context(len(tokens))
    logits = ctx.eval(tokens, all_logits=True)
    ids = np.asarray(tokens, dtype=np.int64)
    logp = log_softmax_at(logits[:-1], ids[1:])
    return math.exp(-float(logp.mean()))
