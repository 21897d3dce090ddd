"""The file as parts, and what the threads of a download share about them under one lock.

Parallel parts
    Files of at least ``part_threshold`` bytes from servers that honour ``Range`` are split into
    ``parallel_parts`` ranges, each received by its own thread (a single stream is the same with one
    part). Each thread asks for its part in spans of a few seconds of transfer (``Range`` up to the
    span's end, the next span on the same connection), so that a thread that finishes its part can
    take half of the biggest remaining part (if both halves keep ``min_part``) above the span in
    flight: no byte a server has already pushed into a socket is thrown away. A thread also takes over
    the rest of a part that had no bytes for ``straggler_after`` seconds or runs far slower than the
    others (the only case where bytes are asked for twice).

A part counts its bytes three times: ``done`` (on disk), ``queued`` (received and waiting for the
writer too) and ``reserved`` (what the receiving thread holds, even not yet queued): a split never
cuts below what a thread already has. ``Parts`` also holds what every thread of an attempt reads or
counts -- the attempt's stop and wake events and first error, the bytes received and written --
since they change together with the parts, under the same lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from pipx_llama.fetch.options import FetchOptions

# A parallel download asks for a part in spans of about this many seconds of transfer (at least
# 2 x min_part, at most _SPAN_MAX bytes): a part can then be split above its open span, so the bytes a
# server has already pushed into the socket are never wasted. Each span is one more request (through
# any redirect, e.g. Hugging Face's resolve URL to its CDN), so spans are seconds long, not fractions.
_SPAN_SECONDS = 4.0
_SPAN_MAX = 256 << 20


def human(n: int | None) -> str:
    if n is None:
        return "an unknown number of bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass
class Part:
    start: int
    end: int | None
    done: int = 0
    queued: int = 0
    reserved: int = 0
    active: bool = False
    claimed_at: float = 0.0
    received: int = 0
    claimed_received: int = 0
    last_data: float = 0.0
    req_end: int = -1      # last byte asked for by the request open on this part's connection

    @property
    def pos(self) -> int:
        return self.start + self.done

    @property
    def complete(self) -> bool:
        return self.end is not None and self.start + self.done > self.end

    @property
    def qpos(self) -> int:
        """Where the next received byte goes: past what is on disk and what waits in the write queue."""
        return self.start + self.queued

    @property
    def all_queued(self) -> bool:
        return self.end is not None and self.start + self.queued > self.end


class Parts:
    """The parts of one download (``items``, in file order from byte 0) and the state its threads share.

    Everything here is read and changed under ``lock``, except by the calling thread while no other
    runs. ``stop`` is the attempt in progress (a fresh event per attempt: threads of an abandoned
    attempt keep seeing theirs set), ``wake`` rouses the supervising loop, ``error`` is the attempt's
    first error. ``ranges`` says whether the server honours ``Range`` (the download can resume).
    """

    def __init__(self, options: FetchOptions) -> None:
        self.opt = options
        self.lock = threading.Lock()
        self.items: list[Part] = []
        self.total: int | None = None
        self.ranges = True
        self.decode = False  # always: requests refuse a Content-Encoding (kept in the state file's format)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.error: BaseException | None = None
        self.session_bytes = 0
        self.saved_bytes = 0   # session_bytes when the resume state was last snapshotted
        self.kept_bytes = 0    # bytes the resume state on disk records: where a next run resumes
        self.session_received = 0
        self.session_start = time.monotonic()
        self.last_byte = self.session_start   # when the source last sent a byte (or the call began)

    def new_attempt(self) -> threading.Event:
        """Fresh stop and wake events and no error, for a new transfer attempt; its stop event."""
        self.stop = stop = threading.Event()
        self.wake = threading.Event()
        self.error = None
        return stop

    def fail(self, stop: threading.Event, exc: BaseException) -> None:
        """Record the first error of the current attempt and stop its threads."""
        with self.lock:
            if stop is self.stop and self.error is None:
                self.error = exc
        stop.set()
        self.wake.set()

    def lay_out(self, total: int | None) -> Part | None:
        """Split a fresh download of ``total`` bytes into parts; the first, claimed (None: no bytes)."""
        self.total = total
        o = self.opt
        if total == 0:
            self.items = []
            return None
        if total is None:
            self.items = [Part(0, None)]
        elif self.parallel():
            step = -(-total // o.parallel_parts)
            self.items = [Part(s, min(s + step, total) - 1) for s in range(0, total, step)]
        else:
            self.items = [Part(0, total - 1)]
        now = time.monotonic()
        p0 = self.items[0]
        p0.active, p0.claimed_at, p0.last_data = True, now, now
        return p0

    def adopt(self, total: int | None, items: list[Part]) -> None:
        """Continue a download an earlier run left: ``items`` as its resume state recorded them."""
        self.total = total
        self.items = items
        for p in items:
            p.queued = p.reserved = p.done
        self.ranges, self.decode = True, False
        self.kept_bytes = sum(p.done for p in items)

    def frontier(self) -> int:
        with self.lock:
            return self.frontier_locked()

    def frontier_locked(self) -> int:
        pos = 0
        for p in self.items:
            pos = p.pos
            if not p.complete:
                break
        return pos

    def all_complete(self) -> bool:
        with self.lock:
            return all(p.complete for p in self.items)

    def claim(self) -> Part | None:
        """An unclaimed part; else half of the biggest part in progress; else the rest of a straggler."""
        now = time.monotonic()
        with self.lock:
            for p in self.items:
                if not p.active and not p.complete:
                    p.active, p.claimed_at, p.claimed_received, p.last_data = True, now, p.received, now
                    return p
            if not self.ranges or self.total is None:
                return None
            busy = [p for p in self.items if p.active and p.end is not None and not p.complete]
            best, best_cut, best_new = None, 0, 0
            for p in busy:
                held = p.start + max(p.reserved, p.done)
                left = p.end + 1 - held  # type: ignore[operator]
                # above what its worker has received and what its open request asks for: nothing
                # is fetched twice, nothing a server already sent is thrown away
                cut = max(held + left // 2, p.req_end + 1)
                new_size = p.end + 1 - cut  # type: ignore[operator]
                if left >= 2 * self.opt.min_part and new_size >= self.opt.min_part and new_size > best_new:
                    best, best_cut, best_new = p, cut, new_size
            if best is not None:
                cut = best_cut
            else:
                # take over a straggler: everything not yet on disk, including bytes its stuck worker
                # holds unwritten (the writer trims that worker's blocks to the shortened part)
                stragglers = [p for p in busy if self._straggling(p, p.end + 1 - p.pos, now)]  # type: ignore[operator]
                if not stragglers:
                    return None
                best = max(stragglers, key=lambda p: p.end - p.pos)  # type: ignore[operator]
                cut = best.pos
            new = Part(cut, best.end, active=True, claimed_at=now, last_data=now)
            best.end = cut - 1
            self.items.insert(self.items.index(best) + 1, new)
            return new

    def _straggling(self, p: Part, left: int, now: float) -> bool:
        """No bytes for straggler_after seconds, or on course to finish far later than a fresh connection."""
        if now - p.last_data >= self.opt.straggler_after:
            return True
        age = now - p.claimed_at
        if age < self.opt.straggler_after:
            return False
        rate = (p.received - p.claimed_received) / age
        return rate * 4 < self.rate_per_connection(now) and left / max(rate, 1.0) > self.opt.straggler_after

    def parallel(self) -> bool:
        """Whether the file is fetched as ranged parts over several connections (once its size is known)."""
        o = self.opt
        return (
            self.ranges and self.total is not None and o.parallel_parts > 1 and self.total >= o.part_threshold
        )

    def rate_per_connection(self, now: float) -> float:
        """Bytes/s this call has received, per connection now busy (called with the lock held)."""
        active = sum(1 for q in self.items if q.active and not q.complete) or 1
        return self.session_received / max(now - self.session_start, 1e-3) / active

    def open_span(self, part: Part) -> int | None:
        """The last byte the next request of ``part`` asks for, recorded so that no split cuts below it."""
        o = self.opt
        with self.lock:
            end = part.end
            if end is not None and self.parallel():
                per_conn = self.rate_per_connection(time.monotonic())
                span = int(min(_SPAN_MAX, max(2 * o.min_part, per_conn * _SPAN_SECONDS)))
                end = min(end, part.qpos + span - 1)
            part.req_end = -1 if end is None else end
            return end

    def checkpoint_due_locked(self) -> bool:
        """Whether ``checkpoint_bytes`` per busy connection were written since the last save (lock held)."""
        busy = sum(1 for p in self.items if p.active and not p.complete) or 1
        return self.session_bytes - self.saved_bytes >= self.opt.checkpoint_bytes * busy

    def kept(self, lead: str, *, saved: bool = False) -> str:
        """What the next run can build on, for a hint (``lead`` + text), or '' when nothing is kept.

        The bytes written so far, which the attempt's last resume-state save records as it ends; with
        ``saved`` (that save may fail: a full disk) only what the state on disk records now.
        """
        with self.lock:
            done = self.kept_bytes if saved else sum(p.done for p in self.items)
            resumable = self.ranges and not self.decode
        if not done:
            return ""
        if not resumable:
            return lead + "this source cannot resume a download, so the next run starts it over"
        return lead + f"the {human(done)} downloaded so far are kept and the next run resumes from there"
