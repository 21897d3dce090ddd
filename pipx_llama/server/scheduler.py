"""Continuous batching: the requests of a model's parallel slots advance together, one pass per step.

Each loaded model has ``parallel`` slots, each a ``Context`` (its own KV cache). A request waits in a
bounded FIFO until a slot of its model is free (past ``max_queue`` waiting requests ``submit`` refuses:
the app answers 503 with Retry-After), then takes the free slot whose cached tokens share the longest
prefix with its prompt (a chat's next turn evaluates only what is new).

One engine thread does everything after that. An admitted job is the engine's own ``Generation`` on its
slot's context -- sampling, penalties, seeds, stop strings, constraints and ``finish_reason`` stay
exactly per request -- driven step by step: each step evaluates the next token of every active job plus
prompt chunks (at most ``chunk`` tokens a step, so a long prompt does not freeze the others) in one
``BatchEval`` pass that reads each weight once (a step of a single part takes the context's own
``eval``: one user keeps the single-sequence speed), then gives each job whose tokens are evaluated
its logits (``Generation.advance``: the next token and the text it completes). All engine compute stays
on that one thread: numba's threading layer must not run parallel kernels from two threads at once.
Jobs used to run in threads of their own that posted their tokens and waited; with eight slots those
threads' hand-offs under the GIL took 3.3 ms of every 17 ms step.

The pieces go to the event loop that submitted each job once a step, all of a loop's jobs' events in one
``call_soon_threadsafe`` (an ``_Outbox``). Each call writes to the loop's wake-up pipe, and beside a busy
loop it cost far more than its 6 us on an idle one: one call per piece took 9.4% of the engine thread's
time with 8 SmolLM2 jobs (py-spy), one a step 5.7%. Cancelling a job (the client went away) drops it
before it starts, or frees its slot at the next step.
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

import numpy as np

from pipx_llama.engine import (
    BatchEval,
    Constraint,
    Context,
    Generation,
    GenerationStats,
    Part,
    SamplerConfig,
    generate,
)
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

    async def events(self) -> AsyncIterator[Event]:
        """The job's pieces of text, then ``Done`` or ``Failed``."""
        while True:
            ev = await self._events.get()
            yield ev
            if not isinstance(ev, Text):
                return


class _Outbox:
    """Jobs' events held for their event loops until ``flush``, which wakes each loop once for all of them."""

    def __init__(self) -> None:
        self._held: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}

    def put(self, job: Job, event: Event) -> None:
        self._held.setdefault(job._loop, []).append((job, event))

    def flush(self) -> None:
        held, self._held = self._held, {}
        for loop, items in held.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for job, _ in items:
                    job.cancel()


def _deliver(items: list[tuple[Job, Event]]) -> None:
    """On the event loop: each event into its job's queue, in order."""
    for job, event in items:
        job._events.put_nowait(event)


@dataclass(eq=False)
class _Slot:
    context: Context
    job: Job | None = None
    gen: Generation | None = None  # the job's generation, once started
    todo: list[int] = field(default_factory=list)  # tokens to evaluate before the next draw
    pos: int = 0  # how many of them are evaluated
    last_used: float = 0.0


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
        self._outbox = _Outbox()
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
        """Give waiting jobs free slots, in arrival order (a job whose model is full waits its turn, and
        so do the jobs behind it only if they need the same model); their generations start at the
        next step."""
        blocked: set[int] = set()
        kept: deque[Job] = deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled:
                self._drop(job)
                continue
            slot = None if id(job.model) in blocked else self._free(job.model, job.prompt)
            if slot is None:
                blocked.add(id(job.model))
                kept.append(job)
                continue
            slot.job, slot.gen, slot.todo, slot.pos = job, None, [], 0
            job.started = time.perf_counter()
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
                    self._outbox.flush()
                    if self._closed and not active and not self._waiting:
                        return
                    if active:
                        break
                    self._cv.wait()
            for slot in active:
                if slot.job.cancelled or self._closed:
                    if slot.gen is not None:
                        slot.gen.cancel()
                    self._end(slot, None)
                elif slot.gen is None:
                    self._start(slot)
            self._step([s for s in active if s.job is not None])
            self._outbox.flush()

    def _start(self, slot: _Slot) -> None:
        """The job's generation on its slot's context: the prompt tokens the cache does not hold yet."""
        job = slot.job
        try:
            slot.gen = generate(slot.context, job.prompt, max_tokens=job.max_tokens, sampler=job.sampler,
                                stop=job.stop, constraint=job.constraint, special=job.special)
            slot.todo, slot.pos = slot.gen.begin(), 0
        except Exception as err:  # the request's own problem (an empty or too long prompt): it fails alone
            self._fail(slot, err)

    def _step(self, active: list[_Slot]) -> None:
        """One pass per model: every next token, then prompt chunks within ``chunk`` tokens; then each job
        whose tokens are all evaluated draws its next one."""
        by_model: dict[int, list[_Slot]] = {}
        for slot in active:
            by_model.setdefault(id(slot.job.model), []).append(slot)
        for group in by_model.values():
            group.sort(key=lambda s: len(s.todo) - s.pos > 1)  # decode tokens first
            model = group[0].job.model
            batch = self._batches.get(id(model))
            if batch is None:
                size = min(self.chunk + len(model.slots), model.slots[0].n_batch)
                batch = self._batches[id(model)] = BatchEval(model.model, size, model.pool)
            n_decode = sum(1 for s in group if len(s.todo) - s.pos == 1)
            budget = min(self.chunk, batch.max_tokens - n_decode)
            parts: list[tuple[_Slot, list[int]]] = []
            for slot in group:
                left = len(slot.todo) - slot.pos
                n = 1 if left == 1 else min(left, budget, slot.context.n_batch)
                if n < 1:
                    continue
                if left > 1:
                    budget -= n
                parts.append((slot, slot.todo[slot.pos : slot.pos + n]))
            try:
                if len(parts) == 1:
                    slot, toks = parts[0]
                    results = [slot.context.eval(toks)[-1]]
                else:
                    results = batch.eval([Part(slot.context, toks, slot.pos + len(toks) == len(slot.todo))
                                          for slot, toks in parts])
            except Exception as err:  # the step's jobs fail; the engine thread goes on
                log.exception("a batched evaluation failed")
                for slot, _ in parts:
                    self._fail(slot, err)
                continue
            now = time.perf_counter()
            for (slot, toks), logits in zip(parts, results):
                slot.pos += len(toks)
                slot.last_used = now
                if slot.pos == len(slot.todo):
                    self._advance(slot, logits)

    def _advance(self, slot: _Slot, logits: np.ndarray) -> None:
        """The job draws its next token from ``logits``: its text goes to the client, and the token is
        what the slot evaluates next (or the job ends)."""
        job, gen = slot.job, slot.gen
        try:
            pieces, token = gen.advance(logits)
            for piece in pieces:
                if piece.token >= 0:
                    job.tokens.append(piece.token)
                if piece.text:
                    self._outbox.put(job, Text(piece.text))
            if token is None:
                self._end(slot, None)
                return
            gen.make_room()
            slot.todo, slot.pos = [token], 0
        except Exception as err:  # the server must outlive any one request
            self._fail(slot, err)

    def _fail(self, slot: _Slot, err: BaseException) -> None:
        if not isinstance(err, PipxLlamaError):
            log.exception("%s: generation failed", slot.job.id, exc_info=err)
        self._end(slot, err)

    def _end(self, slot: _Slot, error: BaseException | None) -> None:
        """The job is over: its stats, its record, its slot free, and its last event to the client."""
        job, gen = slot.job, slot.gen
        if gen is not None:
            gen.finish()
            job.stats = gen.stats
        else:
            job.stats = GenerationStats(n_prompt=len(job.prompt))
        if job.stats.finish_reason is None and job.cancelled and error is None:
            job.stats.finish_reason = "cancelled"
        job.finished = time.perf_counter()
        with self._cv:
            slot.job, slot.gen, slot.todo, slot.pos = None, None, [], 0
            self._record(job, error)
            self._cv.notify_all()
        self._outbox.put(job, Failed(error) if error is not None else Done(job.stats))

    def _drop(self, job: Job) -> None:
        """A job cancelled before it started (called with the lock held)."""
        job.started = job.finished = time.perf_counter()
        job.stats = GenerationStats(n_prompt=len(job.prompt), finish_reason="cancelled")
        self._record(job, None)
        self._outbox.put(job, Done(job.stats))

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
