"""Continuous batching: the requests of a model's parallel slots advance together, one pass per step.

Each loaded model has ``parallel`` slots, each a ``Context`` (its own KV cache). A request waits in a
bounded FIFO until a slot of its model is free (past ``max_queue`` waiting requests ``submit`` refuses:
the app answers 503 with Retry-After), then takes the free slot whose cached tokens share the longest
prefix with its prompt (a chat's next turn evaluates only what is new).

An admitted job runs the engine's own ``generate()`` in a thread of its own -- sampling, penalties,
seeds, stop strings, constraints and ``finish_reason`` stay exactly per request -- but on a
``_SlotContext`` whose ``eval`` only posts the tokens and waits. The one engine thread runs a step
once every active job has posted (or finished): the decode tokens of all of them plus prompt chunks
(at most ``chunk`` tokens a step, so a long prompt does not freeze the others) in one ``BatchEval``
pass that reads each weight once; a step of a single part takes the context's own ``eval`` (the fused
pass: one user keeps the single-sequence speed). All engine compute stays on that one thread: numba's
threading layer must not run parallel kernels from two threads at once.

Each job hands its pieces to the event loop that submitted it (``call_soon_threadsafe``). Cancelling a
job (the client went away) drops it before it starts, or frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipx_llama.engine import BatchEval, Constraint, Context, GenerationStats, Part, SamplerConfig, generate
from pipx_llama.errors import PipxLlamaError
from pipx_llama.server.registry import LoadedModel

log = logging.getLogger("pipx_llama.server")

RECENT = 256  # finished jobs kept for /health and the Retry-After estimate
CHUNK = 128  # prompt tokens per step, all slots together (decode tokens come on top)


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting
        self.retry_after = retry_after


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Done:
    stats: GenerationStats


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Text | Done | Failed


@dataclass
class JobRecord:
    """What the server remembers of a finished job (logged, and summed up by ``/health``)."""

    id: str
    model: str
    endpoint: str
    n_prompt: int
    n_cached: int
    n_generated: int
    max_tokens: int
    finish_reason: str | None
    wait_seconds: float
    run_seconds: float
    error: str | None = None


@dataclass(eq=False)
class Job:
    id: str
    endpoint: str
    model: LoadedModel
    prompt: list[int]
    max_tokens: int
    sampler: SamplerConfig
    stop: tuple[str, ...] = ()
    # the grammar its tokens must follow (structured output, a forced call)
    constraint: Constraint | None = None
    special: bool = False  # control tokens are part of its text (tool-call markers)
    tokens: list[int] = field(default_factory=list)  # generated ids (Ollama returns them as context)
    stats: GenerationStats | None = None
    submitted: float = 0.0
    started: float | None = None
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _events: asyncio.Queue[Event] | None = None

    def bind(self) -> None:
        """Attach the job to the running event loop; call from the coroutine that will read it."""
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancel.set()

    async def events(self) -> AsyncIterator[Event]:
        """The job's pieces of text, then ``Done`` or ``Failed``."""
        while True:
            ev = await self._events.get()
            yield ev
            if not isinstance(ev, Text):
                return


class _Cancelled(Exception):
    """Raised in a job's thread by an evaluation the scheduler dropped because the job was cancelled."""


@dataclass(eq=False)
class _Eval:
    """Tokens a slot asked to evaluate; ``done`` is set with the last token's logits (or why not)."""

    tokens: list[int]
    pos: int = 0  # how many are evaluated
    logits: np.ndarray | None = None
    error: BaseException | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Slot:
    context: Context
    job: Job | None = None
    pending: _Eval | None = None  # posted, not yet evaluated
    computing: bool = False  # the job's thread is between two evaluations
    last_used: float = 0.0


class _SlotContext:
    """The context a job's ``generate()`` sees: everything is the slot's, but ``eval`` joins the batch."""

    def __init__(self, scheduler: Scheduler, slot: _Slot, job: Job) -> None:
        self._scheduler, self._slot, self._job = scheduler, slot, job

    def __getattr__(self, name: str) -> Any:
        return getattr(self._slot.context, name)

    def eval(self, tokens: Any, all_logits: bool = False) -> np.ndarray:
        if all_logits:  # only reachable through a bug: generate() asks for the last token's logits
            raise RuntimeError("a batched slot returns the last token's logits only")
        return self._scheduler._eval(self._slot, self._job, [int(t) for t in tokens])


class Scheduler:
    """Bounded FIFO of generation jobs, parallel slots per model, and the engine thread that batches them."""

    def __init__(self, max_queue: int = 16, chunk: int = CHUNK) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        self.max_queue = max_queue
        self.chunk = chunk
        self._waiting: deque[Job] = deque()
        self._slots: dict[int, list[_Slot]] = {}  # id(LoadedModel) -> its slots
        self._batches: dict[int, BatchEval] = {}
        self._cv = threading.Condition()
        self._closed = False
        self.recent: deque[JobRecord] = deque(maxlen=RECENT)
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._thread = threading.Thread(target=self._work, name="pipx-llama-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(1 for slots in self._slots.values() for s in slots if s.job is not None)

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` when ``max_queue`` jobs already wait."""
        with self._cv:
            if self._closed:
                raise QueueFull(len(self._waiting), 5)
            busy = self._waiting or self._free(job.model) is None
            if busy and len(self._waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(len(self._waiting), self._retry_after())
            job.submitted = time.perf_counter()
            self._waiting.append(job)
            self._cv.notify_all()

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean run time times the queue ahead, over the
        slots."""
        runs = [r.run_seconds for r in list(self.recent)[-20:]] or [1.0]
        slots = max(1, sum(len(s) for s in self._slots.values()))
        ahead = (len(self._waiting) + 1) / slots
        return max(1, min(120, math.ceil(sum(runs) / len(runs) * ahead)))

    def close(self) -> None:
        """Cancel everything and stop the engine thread (running jobs stop at their next step)."""
        with self._cv:
            self._closed = True
            for job in self._waiting:
                job.cancel()
            for slots in self._slots.values():
                for s in slots:
                    if s.job is not None:
                        s.job.cancel()
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # -- slots (called with the lock held) ------------------------------------------------------------------

    def _model_slots(self, model: LoadedModel) -> list[_Slot]:
        slots = self._slots.get(id(model))
        if slots is None:
            slots = self._slots[id(model)] = [_Slot(ctx) for ctx in model.slots]
        return slots

    def _free(self, model: LoadedModel, prompt: list[int] | None = None) -> _Slot | None:
        """A free slot of ``model``: the one whose cache shares the longest prefix with ``prompt``, else
        the least recently used."""
        free = [s for s in self._model_slots(model) if s.job is None]
        if not free:
            return None
        prompt = prompt or []
        return max(free, key=lambda s: (_common_prefix(s.context.tokens, prompt), -s.last_used))

    def _admit(self) -> None:
        """Start waiting jobs in free slots, in arrival order (a job whose model is full waits its turn,
        and so do the jobs behind it only if they need the same model)."""
        blocked: set[int] = set()
        kept: deque[Job] = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled:
                threading.Thread(target=self._drop, args=(job,), daemon=True).start()
                continue
            slot = None if id(job.model) in blocked else self._free(job.model, job.prompt)
            if slot is None:
                blocked.add(id(job.model))
                kept.append(job)
                continue
            slot.job, slot.computing, slot.pending = job, True, None
            threading.Thread(target=self._run, args=(job, slot), name=f"pipx-llama-{job.id}",
                             daemon=True).start()
        self._waiting = kept

    def _active(self) -> list[_Slot]:
        return [s for slots in self._slots.values() for s in slots if s.job is not None]

    # -- the engine thread -----------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cv:
                while True:
                    self._admit()
                    active = self._active()
                    if self._closed and not active and not self._waiting:
                        return
                    posted = [s for s in active if s.pending is not None]
                    if posted and not any(s.computing for s in active):
                        break
                    self._cv.wait()
                step = self._plan(posted)
            finished = self._step(step)
            with self._cv:  # the slot's state first: once woken, its thread may post again at once
                for slot, _ in finished:
                    slot.pending, slot.computing = None, True
                self._cv.notify_all()
            for _, ev in finished:
                ev.done.set()

    def _plan(self, posted: list[_Slot]) -> list[tuple[_Slot, _Eval]]:
        """The slots this step evaluates: cancelled jobs are dropped (their threads wake and end)."""
        step = []
        for slot in posted:
            ev = slot.pending
            if slot.job.cancelled or self._closed:
                ev.cancelled = True
                slot.pending, slot.computing = None, True
                ev.done.set()
                continue
            step.append((slot, ev))
        return step

    def _step(self, step: list[tuple[_Slot, _Eval]]) -> list[tuple[_Slot, _Eval]]:
        """One pass per model: every decode token, then prompt chunks within ``chunk`` tokens; returns the
        evaluations complete (or failed), their ``done`` not yet set."""
        finished: list[tuple[_Slot, _Eval]] = []
        by_model: dict[int, list[tuple[_Slot, _Eval]]] = {}
        for slot, ev in step:
            by_model.setdefault(id(slot.job.model), []).append((slot, ev))
        for group in by_model.values():
            group.sort(key=lambda se: len(se[1].tokens) - se[1].pos > 1)  # decode tokens first
            model = group[0][0].job.model
            batch = self._batches.get(id(model))
            if batch is None:
                size = min(self.chunk + len(model.slots), model.slots[0].n_batch)
                batch = self._batches[id(model)] = BatchEval(model.model, size, model.pool)
            n_decode = sum(1 for _, ev in group if len(ev.tokens) - ev.pos == 1)
            budget = min(self.chunk, batch.max_tokens - n_decode)
            parts: list[tuple[_Slot, _Eval, list[int]]] = []
            for slot, ev in group:
                left = len(ev.tokens) - ev.pos
                n = 1 if left == 1 else min(left, budget, slot.context.n_batch)
                if n < 1:
                    continue
                if left > 1:
                    budget -= n
                parts.append((slot, ev, ev.tokens[ev.pos : ev.pos + n]))
            try:
                if len(parts) == 1:
                    slot, ev, toks = parts[0]
                    results = [slot.context.eval(toks)[-1]]
                else:
                    results = batch.eval([Part(slot.context, toks, ev.pos + len(toks) == len(ev.tokens))
                                          for slot, ev, toks in parts])
            except Exception as err:  # the step's jobs fail; the engine thread goes on
                log.exception("a batched evaluation failed")
                for slot, ev, _ in parts:
                    ev.error = err
                    finished.append((slot, ev))
                continue
            now = time.perf_counter()
            for (slot, ev, toks), logits in zip(parts, results):
                ev.pos += len(toks)
                slot.last_used = now
                if ev.pos == len(ev.tokens):
                    ev.logits = logits
                    finished.append((slot, ev))
        return finished

    # -- a job's thread --------------------------------------------------------------------------------------

    def _eval(self, slot: _Slot, job: Job, tokens: list[int]) -> np.ndarray:
        """Post ``tokens`` for the next steps and wait for the last one's logits [1, n_vocab]."""
        if job.cancelled:
            raise _Cancelled
        ev = _Eval(tokens)
        with self._cv:
            slot.pending, slot.computing = ev, False
            # the engine steps once every job has posted: waking it for each post made it take the GIL
            # and look at every slot eight times a step with eight slots
            if not any(s.computing for s in self._active()):
                self._cv.notify_all()
        ev.done.wait()
        if ev.cancelled:
            raise _Cancelled
        if ev.error is not None:
            raise ev.error
        return ev.logits[None, :]

    def _run(self, job: Job, slot: _Slot) -> None:
        job.started = time.perf_counter()
        error: BaseException | None = None
        gen = None
        try:
            gen = generate(_SlotContext(self, slot, job), job.prompt, max_tokens=job.max_tokens,
                           sampler=job.sampler, stop=job.stop, constraint=job.constraint, special=job.special)
            it = iter(gen)
            for piece in it:
                if piece.token >= 0:
                    job.tokens.append(piece.token)
                if piece.text:
                    job.emit(Text(piece.text))
                if job.cancelled:
                    it.close()  # finish_reason becomes "cancelled"
                    break
        except _Cancelled:
            if gen is not None:
                gen.stats.finish_reason = "cancelled"
        except PipxLlamaError as err:
            error = err
        except Exception as err:  # the server must outlive any one request
            log.exception("%s: generation failed", job.id)
            error = err
        finally:
            job.stats = gen.stats if gen is not None else GenerationStats(n_prompt=len(job.prompt))
            if job.stats.finish_reason is None and job.cancelled and error is None:
                job.stats.finish_reason = "cancelled"
            job.finished = time.perf_counter()
            with self._cv:
                slot.job, slot.pending, slot.computing = None, None, False
                self._record(job, error)
                self._cv.notify_all()
        job.emit(Failed(error) if error is not None else Done(job.stats))

    def _drop(self, job: Job) -> None:
        """A job cancelled before it started."""
        job.started = job.finished = time.perf_counter()
        job.stats = GenerationStats(n_prompt=len(job.prompt), finish_reason="cancelled")
        with self._cv:
            self._record(job, None)
        job.emit(Done(job.stats))

    def _record(self, job: Job, error: BaseException | None) -> None:
        s = job.stats
        rec = JobRecord(job.id, job.model.spec.name, job.endpoint, s.n_prompt,
                        s.n_prompt - s.n_prompt_evaluated, s.n_generated, job.max_tokens, s.finish_reason,
                        job.started - job.submitted,
                        job.finished - job.started, None if error is None else str(error))
        self.recent.append(rec)
        if error is not None:
            self.counts["failed"] += 1
        elif s.finish_reason == "cancelled":
            self.counts["cancelled"] += 1
        else:
            self.counts["completed"] += 1
        log.info("%s %s model=%s prompt=%d cached=%d generated=%d/%d finish=%s wait=%.2fs run=%.2fs%s",
                 rec.id, rec.endpoint, rec.model, rec.n_prompt, rec.n_cached, rec.n_generated, rec.max_tokens,
                 rec.finish_reason, rec.wait_seconds, rec.run_seconds, f" error={rec.error}" if error else "")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
