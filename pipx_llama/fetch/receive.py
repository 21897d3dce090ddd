"""The receiving side of a download: the first request of a fresh download, then each part span by span.

The first request (``Receiver.probe``, in the calling thread) learns the file's size, its validators
and whether the server honours ``Range``, and lays out the parts. Then every receiving thread claims
a part (fetch/parts.py), asks for it span by span on one connection, checks that each answer
continues this very file at this very offset, and queues what it receives for the writer
(fetch/diskio.py) in blocks of about 2 MiB: the chunks as httpx delivered them, never joined.

Retries
    A connection with no bytes for ``stall_timeout`` seconds (httpx read timeout) is retried from
    where it stopped, with the backoff of fetch/source.py. A response cut short after delivering data
    is continued at once with a new range and does not count as a retry, so a server that cuts every
    response short still completes. A server that ignores ``Range`` (200 to a ranged request) gets a
    single stream from byte 0; when that stream breaks, the rest is asked for with a ``Range`` (some
    servers answer a whole-file range with 200 yet honour others), and only a server that ignores it
    too is started over from byte 0 (``Restart``: it cannot resume).

Wide reads
    The connection reads the socket up to 1 MiB at a time instead of httpcore's 64 KiB, since h11
    parses each read in Python and each hashlib call has to win the GIL back from the receiving
    thread: fewer, bigger chunks cut the client's CPU from about 1.6 to 1.4 s/GiB on loopback
    (benchmarks/bench_fetch.py).

httpx is imported inside the functions that send requests, when a download starts: 60 ms that every
other start-up (planning, a model already in the store) need not pay.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipx_llama.errors import FetchError
from pipx_llama.events import ProgressEvent
from pipx_llama.fetch.diskio import Writer
from pipx_llama.fetch.errors import ChecksumError
from pipx_llama.fetch.options import TICK
from pipx_llama.fetch.parts import Part, Parts
from pipx_llama.fetch.source import Restart, Retry, Source, content_range, validator_matches

if TYPE_CHECKING:
    import httpx

_WRITE_BLOCK = 2 << 20
_FLUSH_AFTER = 0.25
_READ_SIZE = 1 << 20
# A failed attempt that still delivered this much is continued at once, without counting as a retry:
# a server (or proxy) that cuts every response short still completes the file, range by range.
_MIN_PROGRESS = 64 << 10


def _widen_reads(resp: httpx.Response) -> None:
    """Let the connection behind ``resp`` read the socket up to _READ_SIZE bytes at a time.

    httpcore reads 64 KiB per call (a class constant, not a client setting) and h11 parses every read
    in Python; on a fast link that parsing, not the network, limits a download. The connection's
    network stream is public (the ``network_stream`` response extension): its ``read`` is wrapped on
    this one object, so only our own client's connections change. h11 accepts reads of any size;
    TLS sockets return one record (<= 16 KiB) per read whatever the size asked for.
    """
    stream = resp.extensions.get("network_stream")
    read = getattr(stream, "read", None)
    if read is None or getattr(read, "wide", False):
        return

    def wide_read(max_bytes: int, timeout: float | None = None) -> bytes:
        return read(max(max_bytes, _READ_SIZE), timeout)

    wide_read.wide = True  # type: ignore[attr-defined]
    try:
        stream.read = wide_read  # type: ignore[union-attr]
    except AttributeError:
        pass


class Receiver:
    """What the first request of a fresh download, and then every receiving thread, does."""

    def __init__(self, parts: Parts, source: Source, events: queue.SimpleQueue[ProgressEvent],
                 size: int | None, sha256: str) -> None:
        self.parts = parts
        self.source = source
        self.events = events
        self.size = size
        self.sha256 = sha256
        self.opt = parts.opt
        self.name = source.name

    # ---- the first request of a fresh download

    def probe(self, emit: Callable[[ProgressEvent], None]) -> tuple[Part, httpx.Response] | None:
        """Open the first response, learn size, validators and Range support; plan the parts.

        Runs in the calling thread before any other starts: its events go to ``emit`` at once.
        """
        import httpx  # here, not at the top: see the module docstring

        o = self.opt
        source = self.source
        parallel = o.parallel_parts > 1 and self.size is not None and self.size >= o.part_threshold
        first_end = (min(-(-self.size // o.parallel_parts), 2 * o.min_part) - 1
                     if parallel and self.size else None)
        attempt = 0
        while True:
            try:
                if self.size == 0:
                    resp = source.request(None, None, conditional=False)
                else:
                    resp = source.request(0, first_end, conditional=False)
                try:
                    return self._plan(resp)
                except BaseException:
                    resp.close()
                    raise
            except (Retry, httpx.TransportError) as exc:
                reason, retry_after = source.reason(exc)
                attempt += 1
                if attempt > o.max_retries:
                    raise source.gave_up(reason, attempt - 1) from None
                delay = source.backoff(attempt, retry_after)
                source.check_patience(reason, delay)
                emit(
                    ProgressEvent(
                        "retry",
                        self.name,
                        source=source.shown_url,
                        message=f"{reason}; retry {attempt}/{o.max_retries} in {delay:.1f}s",
                    )
                )
                time.sleep(delay)

    def _plan(self, resp: httpx.Response) -> tuple[Part, httpx.Response] | None:
        code = resp.status_code
        parts, source = self.parts, self.source
        source.sources = []
        source.relearn_validators(resp)
        cr = None
        if code == 416:
            unsatisfied = re.fullmatch(r"\s*bytes\s+\*/0\s*", resp.headers.get("content-range", ""))
            resp.close()
            if not unsatisfied:
                raise FetchError(f"the server refused the first range of {self.name} at {source.shown_url} "
                                 "(HTTP 416)", "try another source")
            total: int | None = 0
            parts.ranges = True
        elif code == 206:
            cr = content_range(resp.headers.get("content-range"))
            if cr is None or cr[0] != 0:
                raise FetchError(f"the server sent an invalid Content-Range for {self.name}: "
                                 f"{resp.headers.get('content-range')!r}", "try another source")
            total = cr[2]
            parts.ranges = True
        else:
            parts.ranges = False
            length = resp.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
        if self.size is not None and total is not None and total != self.size:
            raise ChecksumError(
                f"size mismatch for {self.name} at {source.shown_url}: expected {self.size} bytes, "
                f"the server has {total}; nothing was downloaded",
                "the source holds another version of the file; if no source has this one, the manifest may "
                "be out of date",
                file=self.name, source=source.url, expected=self.sha256, actual=f"(size {total} bytes)")
        p0 = parts.lay_out(total if total is not None else self.size)
        if p0 is None:
            resp.close()
            return None
        p0.req_end = cr[1] if cr is not None else -1 if parts.total is None else parts.total - 1
        return p0, resp

    # ---- a receiving thread

    def run(self, first: tuple[Part, httpx.Response] | None, stop: threading.Event, writer: Writer) -> None:
        """Receive parts until none is left to claim or the attempt stops (a receiving thread's target)."""
        parts = self.parts
        try:
            while not stop.is_set():
                if first is not None:
                    part, resp = first
                    first = None
                else:
                    part, resp = parts.claim(), None
                if part is None:
                    if parts.all_complete() or stop.wait(TICK * 2):
                        return
                    continue
                try:
                    self._fetch_part(part, resp, stop, writer)
                finally:
                    with parts.lock:
                        part.active = False
        except Exception as exc:  # noqa: BLE001  (re-raised by the supervising thread)
            parts.fail(stop, exc)
        finally:
            if first is not None:
                first[1].close()

    def _fetch_part(
        self, part: Part, resp: httpx.Response | None, stop: threading.Event, writer: Writer
    ) -> None:
        import httpx  # here, not at the top: see the module docstring

        parts, source = self.parts, self.source
        attempt = 0
        while not part.all_queued and not stop.is_set():
            before = part.queued
            try:
                if resp is None:
                    resp = source.request(part.qpos, parts.open_span(part), conditional=True)
                    self._accept(resp, part)
                self._stream(resp, part, stop, writer)
                if part.end is None and not stop.is_set():
                    with parts.lock:
                        part.end = part.qpos - 1
                        parts.total = part.qpos
                    return
                if part.qpos > part.req_end >= 0:
                    continue  # the span is done; the next one goes out on the same connection
                if not part.all_queued and not stop.is_set():
                    raise Retry("the connection closed before the part was complete")
            except (Retry, httpx.TransportError) as exc:
                reason, retry_after = source.reason(exc)
                if stop.is_set() or part.all_queued:
                    return
                if not parts.ranges and (parts.total is None or parts.decode or part.qpos == 0):
                    raise Restart(reason, retry=True, retry_after=retry_after) from None
                # a server that cuts responses short but sends data is healthy: ask for the rest at once,
                # as the first retry of a new series (a whole-file 200 is asked for a Range now, see _accept)
                progressed = part.queued - before >= _MIN_PROGRESS
                attempt = 1 if progressed else attempt + 1
                if attempt > self.opt.max_retries:
                    raise source.gave_up(reason, attempt - 1) from None
                delay = 0.0 if progressed else source.backoff(attempt, retry_after)
                source.check_patience(reason, delay)
                with parts.lock:
                    done = sum(p.done for p in parts.items)
                self.events.put(ProgressEvent(
                    "retry", self.name, done=done, total=parts.total, source=source.shown_url,
                    message=f"{reason} at byte {part.qpos}; " + (
                        "continuing from there" if progressed else
                        f"retry {attempt}/{self.opt.max_retries} in {delay:.1f}s")))
                if delay and stop.wait(delay):
                    return
            finally:
                if resp is not None:
                    resp.close()
                    resp = None

    def _accept(self, resp: httpx.Response, part: Part) -> None:
        """Check a ranged response continues this very file at this very offset."""
        parts, source = self.parts, self.source
        code = resp.status_code
        if code == 416:
            raise Restart("the source can no longer serve the rest of the file (HTTP 416)")
        if code == 200:
            if part.start == 0 and part.queued == 0 and len(parts.items) == 1:
                source.relearn_validators(resp)
                return
            if not parts.ranges:
                # the stream of a whole-file 200 broke, and the Range asking for the rest was ignored too
                raise Restart("the request for the rest of the file was answered from byte 0", retry=True)
            sent = resp.request.headers.get("if-range")
            if sent is not None and not validator_matches(resp, sent):
                if source.believe_change(resp):
                    raise Restart("the file at the source has changed (new ETag/Last-Modified)")
                # the If-Range validator was this server's own whim: ask again with what is still trusted
                raise Retry("the server sent the whole file instead of the range (If-Range did not match)",
                            0.0)
            raise Restart("the server ignored the Range request and sent the whole file")
        cr = content_range(resp.headers.get("content-range"))
        if cr is None or cr[0] != part.qpos:
            raise Retry(f"the server answered with the wrong range ({resp.headers.get('content-range')!r} "
                        f"for byte {part.qpos})")
        if cr[2] is not None and parts.total is not None and cr[2] != parts.total:
            raise Restart(f"the file at the source changed size ({parts.total} -> {cr[2]} bytes)")
        if source.validators_differ(resp) and source.believe_change(resp):
            raise Restart("the file at the source has changed (new ETag/Last-Modified)")
        source.learn_validators(resp)
        if not parts.ranges:
            with parts.lock:
                parts.ranges = True  # it answered a whole-file request with 200, yet honours Range: resumable
        if 0 <= cr[1] < part.req_end:
            with parts.lock:
                part.req_end = cr[1]  # a server may answer a shorter range than asked

    def _stream(self, resp: httpx.Response, part: Part, stop: threading.Event, writer: Writer) -> None:
        """Receive the body and queue it for the writer in blocks of about _WRITE_BLOCK bytes.

        A block is the list of chunks as httpx delivered them (no copying); it is queued when it is big
        enough or _FLUSH_AFTER seconds old, so slow connections still show progress and checkpoint.
        """
        import httpx  # here, not at the top: see the module docstring

        _widen_reads(resp)
        chunks = resp.iter_raw()
        block: list[bytes | memoryview] = []
        pending = 0
        flushed = time.monotonic()
        parts = self.parts
        lock = parts.lock
        try:
            for chunk in chunks:
                size = len(chunk)
                now = time.monotonic()
                with lock:
                    if stop.is_set():
                        return
                    room = size if part.end is None else part.end + 1 - part.qpos - pending
                    n = max(0, min(size, room))
                    part.reserved = part.queued + pending + n
                    part.last_data = parts.last_byte = now
                    part.received += n
                    parts.session_received += n
                if n:
                    block.append(chunk if n == size else memoryview(chunk)[:n])
                    pending += n
                if n < size or (part.end is not None and part.qpos + pending > part.end):
                    break
                if pending >= _WRITE_BLOCK or now - flushed >= _FLUSH_AFTER:
                    self._queue_block(block, pending, part, writer)
                    block, pending, flushed = [], 0, now
        except httpx.TransportError:
            if pending:
                self._queue_block(block, pending, part, writer)
            raise
        if pending:
            self._queue_block(block, pending, part, writer)

    def _queue_block(self, chunks: list[bytes | memoryview], size: int, part: Part, writer: Writer) -> None:
        with self.parts.lock:
            part.queued += size
        writer.put(part, chunks, size)

