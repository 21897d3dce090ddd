"""Text generation: ``generate()`` yields tokens and their text as they are produced.

The prompt is evaluated in batches; a prefix already in the context's KV cache is reused (a chat
turn only evaluates what is new). Generation ends at an end-of-generation token, after
``max_tokens``, or when a stop string appears (the stop string itself is not emitted). When the
context fills, ``context_shift=True`` does what llama.cpp does -- keep the first ``n_keep`` tokens,
drop half of the rest and re-rotate the cached keys -- otherwise ``ContextFullError`` is raised.

A ``Constraint`` (engine/constrain.py) restricts each step's logits to the tokens its grammar allows
before the sampler draws, and follows the drawn token; it is per sequence, like the sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipx_llama.engine.constrain import Constraint
from pipx_llama.engine.model import Context
from pipx_llama.engine.sampler import Sampler, SamplerConfig
from pipx_llama.errors import ContextFullError, UsageError


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it completes (empty while a UTF-8 character is incomplete).

    The last piece may carry ``token == -1``: text held back until the end (a partial stop string).
    """

    token: int
    text: str


@dataclass
class GenerationStats:
    n_prompt: int = 0  # prompt tokens in the request
    n_prompt_evaluated: int = 0  # of which not already cached
    n_generated: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | "cancelled"
    n_context_shifts: int = 0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.n_prompt_evaluated / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.n_generated / self.generation_seconds if self.generation_seconds else 0.0


@dataclass
class Generation:
    """An iterator of ``Piece``; ``stats`` is complete once iteration ends."""

    context: Context
    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    stop: Sequence[str] = ()
    context_shift: bool = False
    n_keep: int = 0
    constraint: Constraint | None = None
    special: bool = False  # emit control tokens' text (a tool-call marker such as [TOOL_CALLS])
    on_prompt: Callable[[int, int], None] | None = None  # (tokens evaluated, of) after each prompt batch
    stats: GenerationStats = field(default_factory=GenerationStats)
    text: str = ""  # everything emitted so far

    # the steps between evaluations, for whoever evaluates (``_run`` here, a server's batch elsewhere)
    _decoder: Any = field(default=None, init=False, repr=False)
    _pending: str = field(default="", init=False, repr=False)  # text held back: a stop string may start
    _t_prompt: float = field(default=0.0, init=False, repr=False)
    _t_gen: float | None = field(default=None, init=False, repr=False)

    def __iter__(self) -> Iterator[Piece]:
        return self._run()

    def _run(self) -> Iterator[Piece]:
        ctx = self.context
        new = self.begin()
        if self.on_prompt is None:
            logits = ctx.eval(new)[-1]
        else:  # batch by batch, as eval itself goes, telling how far it is
            for start in range(0, len(new), ctx.n_batch):
                logits = ctx.eval(new[start : start + ctx.n_batch])[-1]
                self.on_prompt(min(start + ctx.n_batch, len(new)), len(new))
        try:
            while True:
                pieces, token = self.advance(logits)
                yield from pieces
                if token is None:
                    return
                self.make_room()
                logits = ctx.eval([token])[-1]
        except GeneratorExit:
            self.cancel()
            raise
        finally:
            self.finish()

    def begin(self) -> list[int]:
        """Check the prompt and drop what the cache holds beyond its shared prefix; returns the prompt
        tokens still to evaluate (at least the last one, whose logits the first token is drawn from)."""
        ctx, stats = self.context, self.stats
        stats.n_prompt = len(self.prompt)
        if not self.prompt:
            raise UsageError("the prompt is empty", "give a prompt, or a model whose tokenizer adds BOS")
        if len(self.prompt) >= ctx.n_ctx:
            raise ContextFullError(f"the prompt has {len(self.prompt)} tokens; the context holds {ctx.n_ctx}",
                                   "shorten the prompt or raise -c/--ctx-size")
        self._t_prompt = time.perf_counter()
        reuse = _common_prefix(ctx.tokens, self.prompt)
        reuse = min(reuse, len(self.prompt) - 1)  # the last prompt token must be evaluated for its logits
        ctx.truncate(reuse)
        new = self.prompt[reuse:]
        stats.n_prompt_evaluated = len(new)
        self._decoder = ctx.model.tokenizer.stream_decoder(special=self.special)
        return new

    def advance(self, logits: np.ndarray) -> tuple[list[Piece], int | None]:
        """Draw the next token from ``logits`` (those of the last token evaluated); returns the pieces to
        emit and the token to evaluate next, or None when the generation has ended (``stats`` then says
        why). Before that evaluation, ``make_room``."""
        ctx, stats, tok = self.context, self.stats, self.context.model.tokenizer
        if self._t_gen is None:
            self._t_gen = time.perf_counter()
            stats.prompt_seconds = self._t_gen - self._t_prompt
        if stats.n_generated >= self.max_tokens:
            stats.finish_reason = "length"
            return self._tail(), None
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        token = self.sampler.sample(logits, ctx.tokens)
        if self.constraint is not None:
            self.constraint.accept(token)
        stats.n_generated += 1
        if tok.is_eog(token):
            stats.finish_reason = "stop"
            return self._tail(), None
        pending = self._pending + self._decoder.feed(token)
        cut = _find_stop(pending, self.stop)
        if cut is not None:
            self._pending = ""
            self.text += pending[:cut]
            stats.finish_reason = "stop"
            return [Piece(token, pending[:cut])], None
        keep = _stop_prefix_len(pending, self.stop)
        out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return [Piece(token, out)], token

    def cancel(self) -> None:
        """The generation stops before its end (the reader went away)."""
        self.stats.finish_reason = "cancelled"

    def finish(self) -> None:
        """Close the generation's clock (call once, when it has ended for whatever reason)."""
        if self._t_gen is not None:
            self.stats.generation_seconds = time.perf_counter() - self._t_gen

    def _tail(self) -> list[Piece]:
        """What was held back (a partial stop string, an incomplete character) is text after all."""
        tail = self._pending + self._decoder.flush()
        self._pending = ""
        if not tail:
            return []
        self.text += tail
        return [Piece(-1, tail)]

    def make_room(self) -> None:
        """Before the next token's evaluation: a full context is shifted (``context_shift``) or refused
        (``ContextFullError``), after the text so far has been emitted."""
        ctx = self.context
        if ctx.n_past < ctx.n_ctx:
            return
        if not self.context_shift:
            raise ContextFullError(
                f"the context of {ctx.n_ctx} tokens is full after {self.stats.n_generated} generated tokens",
                "raise -c/--ctx-size, lower -n, or enable context shift",
            )
        n_keep = min(self.n_keep, ctx.n_past - 2)
        n_discard = (ctx.n_past - n_keep) // 2
        ctx.shift(n_keep, n_discard)
        self.stats.n_context_shifts += 1


def generate(
    context: Context,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 128,
    sampler: SamplerConfig | None = None,
    stop: Sequence[str] = (),
    add_special: bool = True,
    parse_special: bool = True,
    context_shift: bool = False,
    n_keep: int | None = None,
    constraint: Constraint | None = None,
    special: bool = False,
    on_prompt: Callable[[int, int], None] | None = None,
) -> Generation:
    """Start generating from ``prompt`` (text, tokenized with the model's tokenizer, or token ids).

    ``max_tokens`` < 0 means until the context is full (with ``context_shift``, until EOS).
    ``n_keep`` is how many leading tokens a context shift keeps (default: the whole prompt,
    capped at half the context, as llama.cpp's ``--keep -1``). ``constraint`` limits every token to
    what its grammar allows (single use: it follows this generation's tokens). ``special`` makes control
    tokens part of the text (end-of-generation tokens never are). ``on_prompt(done, total)`` is called
    after each batch of the prompt's evaluation (a progress display for a long prompt).
    """
    if isinstance(prompt, str):
        ids = context.model.tokenizer.encode(prompt, add_special=add_special, parse_special=parse_special)
    else:
        ids = [int(t) for t in prompt]
    if max_tokens < 0:
        max_tokens = 1 << 62 if context_shift else context.n_ctx - len(ids)
    if any(not s for s in stop):
        raise UsageError("stop strings must not be empty", "remove the empty stop string")
    if n_keep is None:
        n_keep = min(len(ids), context.n_ctx // 2)
    return Generation(context, ids, max_tokens, Sampler(sampler or SamplerConfig()), tuple(stop),
                      context_shift, n_keep, constraint, special, on_prompt)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best
