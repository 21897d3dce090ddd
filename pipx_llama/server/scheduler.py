"""The generation queue: one worker thread runs requests one at a time, in arrival order.

All engine compute runs on that one thread. numba's default threading layer must not run parallel
kernels from two threads at once, and on a CPU the matrix kernels already use every core, so a second
concurrent generation would only slow both. Requests wait in a bounded queue; past ``max_queue``
waiting requests ``submit`` refuses (the app answers 503 with Retry-After).

Each job hands its pieces to the event loop that submitted it (``call_soon_threadsafe``). Cancelling a
job (the client went away) stops it between two tokens, or drops it before it starts.
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

from pipx_llama.engine import Constraint, GenerationStats, SamplerConfig, generate
from pipx_llama.errors import PipxLlamaError
from pipx_llama.server.registry import LoadedModel

log = logging.getLogger("pipx_llama.server")

RECENT = 256  # finished jobs kept for /health and the Retry-After estimate


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
    constraint: Constraint | None = None  # the grammar its tokens must follow (structured output, a forced call)
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


class Scheduler:
    """A FIFO of generation jobs served by one worker thread."""

    def __init__(self, max_queue: int = 16) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
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
        return 0 if self._running is None else 1

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` when ``max_queue`` jobs already wait."""
        with self._cv:
            if self._closed:
                raise QueueFull(len(self._waiting), 5)
            busy = self._running is not None or self._waiting
            if busy and len(self._waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(len(self._waiting), self._retry_after())
            job.submitted = time.perf_counter()
            self._waiting.append(job)
            self._cv.notify()

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean run time times the queue ahead."""
        runs = [r.run_seconds for r in list(self.recent)[-20:]] or [1.0]
        return max(1, min(120, math.ceil(sum(runs) / len(runs) * (len(self._waiting) + 1))))

    def close(self) -> None:
        """Cancel everything and stop the worker (the job running stops at its next token)."""
        with self._cv:
            self._closed = True
            for job in self._waiting:
                job.cancel()
            if self._running is not None:
                self._running.cancel()
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cv:
                    self._running = None

    def _run(self, job: Job) -> None:
        job.started = time.perf_counter()
        error: BaseException | None = None
        if job.cancelled:
            job.stats = GenerationStats(n_prompt=len(job.prompt), finish_reason="cancelled")
        else:
            gen = None
            try:
                gen = generate(job.model.context, job.prompt, max_tokens=job.max_tokens, sampler=job.sampler,
                               stop=job.stop, constraint=job.constraint, special=job.special)
                it = iter(gen)
                for piece in it:
                    if piece.token >= 0:
                        job.tokens.append(piece.token)
                    if piece.text:
                        job.emit(Text(piece.text))
                    if job.cancelled:
                        it.close()  # finish_reason becomes "cancelled"
                        break
            except PipxLlamaError as err:
                error = err
            except Exception as err:  # the worker must outlive any one request
                log.exception("%s: generation failed", job.id)
                error = err
            job.stats = gen.stats if gen is not None else GenerationStats(n_prompt=len(job.prompt))
        job.finished = time.perf_counter()
        self._record(job, error)
        job.emit(Failed(error) if error is not None else Done(job.stats))

    def _record(self, job: Job, error: BaseException | None) -> None:
        s = job.stats
        rec = JobRecord(job.id, job.model.spec.name, job.endpoint, s.n_prompt, s.n_prompt - s.n_prompt_evaluated,
                        s.n_generated, job.max_tokens, s.finish_reason, job.started - job.submitted,
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
