"""Verified, resumable HTTP(S) downloads with httpx: ranged parallel parts, retries, resume across restarts.

``download(url, dest, size=..., sha256=..., options=...)`` leaves ``dest`` holding exactly the bytes
whose size and sha256 the caller expects, or raises one of ``pipx_llama.fetch.errors``. Network
behaviour: TLS verification on, redirects followed, proxies and CA bundle from the environment
(httpx ``trust_env``: ``HTTPS_PROXY``, ``NO_PROXY``, ``SSL_CERT_FILE``...), a bearer token if given
(httpx drops it when a redirect leaves the origin, so CDN links never see it).

Resume state
    Next to ``dest`` lives ``dest + '.json'``: the URL, the expected sha256 and size, the server's
    validators (ETag / Last-Modified), the total size and the list of parts ``[start, end, done]``
    (byte offsets, ``end`` inclusive). It is rewritten atomically (temp file, fsync, rename) about
    once a second, always after an ``fdatasync`` of the data, so the state never claims bytes that
    are not on disk, even after a power cut. Writes to the file can wait while it syncs, so when a
    sync takes long (a link faster than the disk) the saves are spaced out to keep syncing under a
    tenth of the time -- but never more than 2 s or ``checkpoint_bytes`` (32 MB) per busy connection
    apart, which bounds what a kill costs. It is written before the data file is created, so a
    data file without a state file is always a finished download (re-hashed before it is trusted).

Encodings
    Requests ask for ``Accept-Encoding: identity`` and a response with any other ``Content-Encoding``
    is refused: decoding gzip or brotli would write an unbounded number of bytes for a file whose size
    the manifest may not give (a 6 MB "gzip bomb" expands to gigabytes), and the sha256 is of the file.

Never mixing two versions
    Every ranged request carries ``If-Range`` (a strong ETag, else Last-Modified). A server whose
    file changed answers 200 with the new file; a 206 whose ETag, Last-Modified or total differs
    from the state is treated the same way: the partial is discarded and the download starts over
    cleanly. Validators that change again within one download come from a server that labels the
    same bytes differently per response (a load balancer): the ETag is then dropped for
    Last-Modified if that stayed the same, else both are, and the final sha256 check decides.
    A server that ignores ``Range`` (200 to a ranged request) gets a single stream from
    byte 0; when that stream breaks, the rest is asked for with a ``Range`` (some servers answer a
    whole-file range with 200 yet honour others), and only a server that ignores it too is started
    over from byte 0 (it cannot resume).
    Resuming with a different URL keeps the bytes (the expected sha256 is the same) but keeps the
    validators only for the same scheme, host and path (a renewed presigned link); the final hash
    check is the last line of defence and the error then names every source that contributed.

Parallel parts
    Files of at least ``part_threshold`` bytes from servers that honour ``Range`` are split into
    ``parallel_parts`` ranges, each received by its own thread (a single stream is the same with one
    part). Receiving threads only parse; the writer thread writes into the (sparse, full-length) file.
    Each thread asks for its part in spans of a few seconds of transfer (``Range`` up to the span's
    end, the next span on the same connection), so that a thread that finishes its part can take
    half of the biggest remaining part (if both halves keep ``min_part``) above the span in flight:
    no byte a server has already pushed into a socket is thrown away. A thread also takes over the
    rest of a part that had no bytes for ``straggler_after`` seconds or runs far slower than the
    others (the only case where bytes are asked for twice). A connection with no bytes for
    ``stall_timeout`` seconds (httpx read timeout) is retried from where it stopped; after
    ``give_up_after`` seconds (60) without a byte from the source, retries included, the download gives
    up. Retries: exponential backoff with jitter on connection errors, timeouts, 5xx, 408 and 429
    (``Retry-After`` honoured, capped at ``backoff_max``); a response cut short after delivering data
    is continued at once with a new range and does not count as a retry, so a server that cuts every
    response short still completes.
    404/410 are not retried (``SourceNotFound``: the caller tries its next source).

Hashing
    A hasher thread hashes the contiguous prefix of the file that is on disk while the download runs:
    blocks written at the front of that prefix are handed to it from memory; anything else -- the
    prefix an earlier run left (hashlib state cannot be saved, so a resume re-hashes it once), parts
    that finished out of order, blocks offered while the hasher lagged -- is read back from the file.
    A single stream is therefore hashed as it streams; parallel parts hash the first part as it
    arrives and the others as the parts before them complete, the remainder right after the last
    byte, while the data is synced. Size and hash are checked before returning; on mismatch the bad
    bytes are deleted.

Throughput
    Receiving, writing and hashing run on three threads: ``os.pwritev`` and ``hashlib`` release the
    GIL, so only parsing holds it. Bytes are copied as little as httpx allows: the chunks of
    ``iter_raw`` are queued as they are (a list per block of about 2 MiB, never joined for writing),
    written with one ``os.pwritev`` (``pwrite`` / seek+write where there is none, i.e. Windows) and
    hashed from those same objects. The connection reads the socket up to 1 MiB at a time instead of
    httpcore's 64 KiB, since h11 parses each read in Python and each hashlib call has to win the GIL
    back from the receiving thread: fewer, bigger chunks cut the client's CPU from about 1.6 to 1.4
    s/GiB on loopback (benchmarks/bench_fetch.py). Progress events are throttled (4 a
    second) and come from the calling thread.

Concurrency: one download per ``dest`` at a time -- the caller holds the per-blob lock.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import errno
import hashlib
import io
import ipaddress
import json
import os
import queue
import random
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from pipx_llama import __version__
from pipx_llama.errors import DiskFullError, FetchError, UsageError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.fetch.errors import AccessDenied, ChecksumError, NetworkError, OfflineError, SourceNotFound

STATE_VERSION = 1
_TICK = 0.1
_PROGRESS_EVERY = 0.25
_SPEED_WINDOW = 3.0
_HASH_CHUNK = 4 << 20
_WRITE_BLOCK = 2 << 20
_WRITE_QUEUE = 8
_HASH_QUEUE = 8
_HASH_LAG_MAX = 32 << 20
_HASH_JOIN_BELOW = 128 << 10
_FLUSH_AFTER = 0.25
_READ_SIZE = 1 << 20
_SYNC_SHARE = 10
_CHECKPOINT_MAX = 2.0
_MAX_RESTARTS = 3
# A failed attempt that still delivered this much is continued at once, without counting as a retry:
# a server (or proxy) that cuts every response short still completes the file, range by range.
_MIN_PROGRESS = 64 << 10
_JOIN_GRACE = 1.0
# A host name that does not resolve is not retried like a dropped connection: "no such name" is final,
# "temporary failure" (typical of a machine with no network) gets this many retries, so an offline
# user waits seconds, not the minute of a full backoff, before the next source or the error.
_DNS_RETRIES = 1
_DNS_FINAL = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL") if hasattr(socket, n)}
# A parallel download asks for a part in spans of about this many seconds of transfer (at least
# 2 x min_part, at most _SPAN_MAX bytes): a part can then be split above its open span, so the bytes a
# server has already pushed into the socket are never wasted. Each span is one more request (through
# any redirect, e.g. Hugging Face's resolve URL to its CDN), so spans are seconds long, not fractions.
_SPAN_SECONDS = 4.0
_SPAN_MAX = 256 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class FetchOptions:
    """How to fetch. The first eight fields are the contract; the rest tune retry and part behaviour."""

    parallel_parts: int = 4            # connections per big file
    part_threshold: int = 64 << 20  # files at least this big are fetched in parallel ranged parts
    stall_timeout: float = 30.0  # no byte for this long -> the connection is retried (httpx read timeout)
    max_retries: int = 6               # per part; exponential backoff with jitter; Retry-After honoured
    token: str | None = None           # bearer token for gated hosts (HF_TOKEN style)
    allow_http: bool = False           # plain http only for loopback unless allowed
    offline: bool = False              # refuse before any network use
    timeout: float = 30.0              # connect / send / connection-pool timeout
    backoff_base: float = 1.0          # first retry waits 0.5-1x this, doubling per retry
    backoff_max: float = 60.0  # cap of one wait, Retry-After included
    min_part: int = 4 << 20  # an idle connection splits a busy part only if both halves get this much
    straggler_after: float = 3.0       # an idle connection takes over a part silent this long (or far slower)
    checkpoint_interval: float = 1.0   # seconds between resume-state saves (bytes since are lost on a kill);
                                       # longer (up to 2 s) while each save's data sync takes long
    checkpoint_bytes: int = 32 << 20   # ... and a save at least every this many bytes per busy connection
    give_up_after: float = 60.0        # no byte from the source for this long, retries included -> give up
    authorization: str | None = None   # a whole Authorization header (an OCI registry's Basic or Bearer);
                                       # sent instead of ``token``, and like it never across a redirect


class _Retry(Exception):
    """A failed attempt worth retrying (HTTP 5xx/429/408, short body, bad Content-Range)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Restart(Exception):
    """The partial download cannot be continued: discard it and start over."""

    def __init__(self, reason: str, *, retry: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.retry_after = retry_after


@dataclass
class _Part:
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


def download(url: str, dest: Path, *, size: int | None, sha256: str, options: FetchOptions,
             on_event: EventCallback | None = None, label: str = "") -> None:
    """Fetch ``url`` into ``dest``, resuming what an earlier run left there; verify size and sha256.

    ``dest`` is a '.part' file under the store's partial/ folder; its resume state is ``dest + '.json'``.
    On success ``dest`` holds the verified bytes, fsynced (the caller renames it into the store) and the
    state file is gone. ``label`` names the file in events and messages (default: ``dest.name``).
    Raises ``OfflineError`` (before any network use), ``FetchError`` (refused URL, protocol errors),
    ``SourceNotFound``, ``AccessDenied``, ``NetworkError`` (retries exhausted, or no byte for
    ``give_up_after`` seconds), ``DiskFullError``, ``ChecksumError`` (bad bytes deleted). Whether a partial
    download was kept for a resume is said in the hint, and only when it was.
    """
    dest = Path(dest)
    name = label or dest.name
    if options.offline:
        raise OfflineError(
            f"{name} is not downloaded yet and offline mode is on (it would come from {redact_url(url)})",
            "run again without --offline (and without PIPX_LLAMA_OFFLINE=1), or import the file "
            "from a folder you already have",
        )
    _check_url(url, options.allow_http)
    expected = sha256.strip().lower()
    if not _HEX64.fullmatch(expected):
        raise UsageError(f"invalid sha256 for {name}: {sha256!r} is not 64 hex digits",
                         "fix the checksum in the manifest")
    if size is not None and size < 0:
        raise UsageError(f"invalid size for {name}: {size}", "fix the size in the manifest")
    try:
        _Job(url, dest, size, expected, options, on_event, name).run()
    except OSError as exc:
        raise FetchError(f"cannot write the download of {name} at {dest}: {exc.strerror or exc}",
                         "check that the folder exists, is writable and its disk is healthy") from exc


def partial_progress(dest: Path) -> tuple[int, int | None] | None:
    """(bytes a next call resumes from, total or None) of a partial download at ``dest``, or None if
    there is none. A download from a server that cannot resume counts 0 bytes: the next call starts over.

    Reads only the state file; for listings of unfinished downloads.
    """
    try:
        state = json.loads(Path(str(dest) + ".json").read_text())
        if not state["ranges"] or state.get("decode"):
            return 0, state.get("total")
        return sum(int(p[2]) for p in state["parts"]), state.get("total")
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def redact_url(url: str) -> str:
    """The URL without its query string and credentials: presigned links carry secrets there."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return f"{p.scheme}://{host}{p.path}" + ("?…" if p.query else "")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_url(url: str, allow_http: bool) -> None:
    try:
        p = urlsplit(url)
        host = p.hostname
    except ValueError:
        host = None
        p = None
    if p is None or p.scheme not in ("http", "https") or not host:
        raise FetchError(f"cannot download {redact_url(url)}: not an http(s) URL",
                         "check the URL in the manifest or on the command line")
    if p.scheme == "http" and not allow_http and not _is_loopback(host):
        raise FetchError(
            f"refusing to download over plain http from {redact_url(url)}",
            "use an https URL; plain http is accepted only for localhost or when explicitly allowed "
            "(a trusted local mirror) -- the sha256 check still applies",
        )


_SSL_CONTEXTS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def _ssl_context() -> ssl.SSLContext:
    """httpx's verifying context (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), built once per setting."""
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    ctx = _SSL_CONTEXTS.get(key)
    if ctx is None:
        ctx = _SSL_CONTEXTS[key] = httpx.create_ssl_context(verify=True, trust_env=True)
    return ctx


def _human(n: int | None) -> str:
    if n is None:
        return "an unknown number of bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """Parse 'bytes a-b/total' (total may be '*')."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def _validator_matches(resp: httpx.Response, validator: str) -> bool:
    """Whether ``resp`` carries ``validator`` (an ETag, or else a Last-Modified date)."""
    if validator.startswith(('"', "W/")):
        return resp.headers.get("etag") == validator
    return resp.headers.get("last-modified") == validator


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _fdatasync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


_IOV_MAX = 1024


def _write_chunks(fd: int, chunks: list[bytes | memoryview], offset: int) -> None:
    """Write ``chunks`` back to back at ``offset`` without joining them (pwritev: one syscall, no copy)."""
    pwritev = getattr(os, "pwritev", None)
    if pwritev is None:
        for chunk in chunks:
            _write_all(fd, memoryview(chunk), offset)
            offset += len(chunk)
        return
    while chunks:
        group = chunks[:_IOV_MAX]
        n = pwritev(fd, group, offset)
        if not n:
            raise OSError(errno.EIO, "the file accepted no bytes")
        offset += n
        # a short write (rare: a filling disk) continues after the last byte written
        for i, chunk in enumerate(group):
            if n < len(chunk):
                chunks = [memoryview(chunk)[n:], *group[i + 1:], *chunks[len(group):]]
                break
            n -= len(chunk)
        else:
            chunks = chunks[len(group):]


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    if hasattr(os, "pwrite"):
        while data:
            n = os.pwrite(fd, data, offset)
            data = data[n:]
            offset += n
    else:
        os.lseek(fd, offset, os.SEEK_SET)
        while data:
            n = os.write(fd, data)
            data = data[n:]


def _trim(chunks: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """The first ``n`` bytes of ``chunks`` (views, no copies)."""
    out: list[bytes | memoryview] = []
    for chunk in chunks:
        if n <= 0:
            break
        out.append(chunk if len(chunk) <= n else memoryview(chunk)[:n])
        n -= len(chunk)
    return out


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


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


_O_BINARY = getattr(os, "O_BINARY", 0)


class _Hasher(threading.Thread):
    """sha256 of the file's contiguous finished prefix.

    The part at the front hands its freshly written blocks over (no re-read); everything else --
    the prefix an earlier run left, parts finished out of order -- is read back from the file.
    """

    def __init__(self, path: Path, frontier: Callable[[], int]) -> None:
        super().__init__(daemon=True, name="fetch-hasher")
        self.path = path
        self.frontier = frontier
        self.digest = hashlib.sha256()
        self.pos = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, list[bytes | memoryview], int]] = queue.Queue(maxsize=_HASH_QUEUE)
        self._finish_at: int | None = None
        self._abort = threading.Event()

    def offer(self, offset: int, chunks: list[bytes | memoryview], size: int, stop: threading.Event) -> None:
        """Hash ``chunks`` (``size`` bytes written at ``offset``, never modified) without reading them back.

        Waits while the hasher's queue is full -- the download cannot finish before the hash anyway,
        and a block dropped would cost a read from the file -- unless the hasher is far behind (it is
        re-hashing what an earlier run left): then the block is dropped and read back in its turn.
        """
        while offset - self.pos <= _HASH_LAG_MAX and self.is_alive() and not stop.is_set():
            try:
                self._queue.put((offset, chunks, size), timeout=_TICK)
                return
            except queue.Full:
                continue

    def _update(self, chunks: list[bytes | memoryview], skip: int) -> None:
        if skip:
            rest: list[bytes | memoryview] = []
            for chunk in chunks:
                if skip >= len(chunk):
                    skip -= len(chunk)
                else:
                    rest.append(memoryview(chunk)[skip:] if skip else chunk)
                    skip = 0
            chunks = rest
        if len(chunks) > 1 and sum(map(len, chunks)) < len(chunks) * _HASH_JOIN_BELOW:
            # small chunks (TLS records are 16 KiB): one copy costs less than a GIL round trip per chunk
            self.digest.update(b"".join(chunks))
        else:
            for chunk in chunks:
                self.digest.update(chunk)

    def run(self) -> None:
        buf = memoryview(bytearray(_HASH_CHUNK))
        try:
            with open(self.path, "rb", buffering=0) as f:
                while not self._abort.is_set():
                    # blocks count as on disk only after they are offered: if nothing comes, everything
                    # up to this frontier is either hashed or never offered -- read back, not repeated
                    frontier = self.frontier()
                    try:
                        off, chunks, size = self._queue.get(timeout=0.02)
                    except queue.Empty:
                        off, chunks, size = -1, [], 0
                    if off >= 0:
                        if off > self.pos:
                            # everything before a block written at the front is on disk: catch up
                            # (a dropped block, a finished earlier part) and go on from memory
                            self._read_back(f, buf, off, interruptible=False)
                        if off <= self.pos < off + size:
                            self._update(chunks, self.pos - off)
                            self.pos = off + size
                        continue
                    finish = self._finish_at
                    self._read_back(f, buf, finish if finish is not None else frontier,
                                    interruptible=finish is None)
                    if finish is not None and self.pos >= finish:
                        return
        except Exception as exc:  # noqa: BLE001  (re-raised by finish() in the calling thread)
            self.error = exc

    def _read_back(self, f: io.FileIO, buf: memoryview, target: int, *, interruptible: bool) -> None:
        """Hash the file from ``pos`` to ``target``; an interruptible read yields to offered blocks."""
        while self.pos < target and not self._abort.is_set():
            f.seek(self.pos)
            n = f.readinto(buf[:min(_HASH_CHUNK, target - self.pos)])
            if not n:
                raise FetchError(f"{self.path} is shorter than the bytes recorded as downloaded",
                                 "delete it and download again")
            self.digest.update(buf[:n])
            self.pos += n
            if interruptible and not self._queue.empty():
                return

    def finish(self, length: int) -> None:
        """Hash the rest of the first ``length`` bytes from the file, then stop; returns at once."""
        self._finish_at = length
        while self.is_alive():
            try:
                self._queue.put((-1, [], 0), timeout=_TICK)
                break
            except queue.Full:
                continue

    def result(self) -> str:
        """The hex digest, once the hasher has stopped after finish()."""
        self.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()

    def abort(self) -> None:
        self._abort.set()
        self.join(_JOIN_GRACE)


class _Writer(threading.Thread):
    """Writes the blocks the receiving threads queue, so receiving, writing and hashing overlap.

    One writer per attempt, with its own file descriptor; each write is trimmed to its part's current
    end (a part can be shortened while its blocks wait), then counted as done and offered to the hasher.
    When the attempt stops (error, interrupt) the writer still writes what is queued -- bytes received
    are kept -- unless a newer attempt has replaced this one (then its file is gone anyway).
    """

    def __init__(self, job: _Job, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="fetch-writer")
        self.job = job
        self.stop = stop
        self.hasher = job.hasher
        self.queue: queue.Queue[tuple[_Part, list[bytes | memoryview], int] | None] = queue.Queue(
            maxsize=_WRITE_QUEUE)

    def put(self, part: _Part, chunks: list[bytes | memoryview], size: int) -> None:
        """Queue ``size`` bytes in ``chunks`` for ``part`` (in order); waits while full, gives up on stop."""
        while not self.stop.is_set():
            try:
                self.queue.put((part, chunks, size), timeout=_TICK)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued (unless stopped) and end the thread."""
        while self.is_alive():
            try:
                self.queue.put(None, timeout=_TICK)
                break
            except queue.Full:
                continue

    def run(self) -> None:
        job = self.job
        fd = -1
        try:
            fd = os.open(job.dest, os.O_WRONLY | _O_BINARY)
            while True:
                item = self.queue.get()
                if item is None:
                    return
                part, chunks, size = item
                with job.lock:
                    if self.stop is not job.stop:
                        continue
                    offset = part.pos
                    n = size if part.end is None else max(0, min(size, part.end + 1 - offset))
                    at_front = job._frontier_locked() == offset
                if not n:
                    continue
                if n < size:
                    chunks = _trim(chunks, n)
                try:
                    _write_chunks(fd, chunks, offset)
                except OSError as exc:
                    if _is_disk_full(exc):
                        raise job._disk_full() from None
                    raise
                if at_front and self.hasher is not None:
                    # before the frontier moves: the hasher would otherwise read these bytes back
                    self.hasher.offer(offset, chunks, n, self.stop)
                with job.lock:
                    part.done += n
                    job.session_bytes += n
                    finished = part.complete and all(p.complete for p in job.parts)
                    due = job._checkpoint_due_locked()
                if finished or due:
                    job.wake.set()
        except Exception as exc:  # noqa: BLE001  (re-raised by the supervising thread)
            job._fail(self.stop, exc)
        finally:
            if fd >= 0:
                os.close(fd)


class _Job:
    """One call of download(): state, parts, worker threads and the supervising loop."""

    def __init__(self, url: str, dest: Path, size: int | None, sha256: str, options: FetchOptions,
                 on_event: EventCallback | None, name: str) -> None:
        self.url = url
        self.shown_url = redact_url(url)
        self.dest = dest
        self.state_path = Path(str(dest) + ".json")
        self.size = size
        self.sha256 = sha256
        self.opt = options
        self.on_event = on_event
        self.name = name
        self.lock = threading.Lock()
        self.dns_failures = 0
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.events: queue.SimpleQueue[ProgressEvent] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.parts: list[_Part] = []
        self.total: int | None = None
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.validators = "any"   # which validators this source keeps stable: any | last-modified | none
        self.changes = 0          # times the validators changed during this download (see _believe_change)
        self._changed_in: threading.Event | None = None
        self._believed = True
        self.ranges = True
        self.decode = False  # always: _request refuses a Content-Encoding (kept in the state file's format)
        self.sources: list[str] = []
        self.session_bytes = 0
        self.saved_bytes = 0   # session_bytes when the resume state was last snapshotted
        self.session_received = 0
        self.session_start = time.monotonic()
        self.last_byte = self.session_start   # when the source last sent a byte (or the call began)
        self.client: httpx.Client | None = None
        self.hasher: _Hasher | None = None

    # ---- top level

    def run(self) -> None:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        if state is None:
            if self._finished_file_ok():
                return
            self._discard()
        self.client = self._make_client()
        self.last_byte = time.monotonic()  # patience counts from here, not from hashing a finished file
        try:
            restarts = retries = 0
            while True:
                try:
                    digest, length = self._transfer(state)
                    break
                except _Restart as r:
                    state = None
                    self._discard()
                    self.parts = []
                    if r.retry:
                        retries += 1
                        if retries > self.opt.max_retries:
                            raise self._gave_up(r.reason, retries - 1) from None
                        delay = self._backoff(retries, r.retry_after)
                        self._check_patience(r.reason, delay)
                        self._emit(ProgressEvent(
                            "retry", self.name, source=self.shown_url,
                            message=f"{r.reason}; the server cannot resume, starting over in {delay:.1f}s "
                                    f"(retry {retries}/{self.opt.max_retries})"))
                        time.sleep(delay)
                    else:
                        restarts += 1
                        if restarts > _MAX_RESTARTS:
                            raise FetchError(
                                f"could not download {self.name} from {self.shown_url}: {r.reason}, "
                                f"{restarts} times in a row",
                                "the file at the source keeps changing; try again later or another source",
                            ) from None
                        self._emit(ProgressEvent("restart", self.name, source=self.shown_url,
                                                 message=f"{r.reason}; discarding the partial download "
                                                         "and starting over"))
        finally:
            self.client.close()
        self._finish(digest, length)

    def _make_client(self) -> httpx.Client:
        o = self.opt
        timeout = httpx.Timeout(connect=o.timeout, read=o.stall_timeout, write=o.timeout, pool=o.timeout)
        n = max(1, o.parallel_parts)
        return httpx.Client(
            timeout=timeout, follow_redirects=True, trust_env=True, verify=_ssl_context(),
            limits=httpx.Limits(max_connections=2 * n + 2, max_keepalive_connections=n + 1),
            headers={"User-Agent": f"pipx-llama/{__version__} httpx/{httpx.__version__}"},
        )

    def _emit(self, event: ProgressEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _drain_events(self) -> None:
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            self._emit(ev)

    # ---- state on disk

    def _load_state(self) -> dict | None:
        """The saved state if it belongs to this file and is consistent with the data on disk."""
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        try:
            if (state["version"] != STATE_VERSION or state["sha256"] != self.sha256
                    or state["size"] != self.size or not state["ranges"] or state.get("decode")):
                return None
            total = state["total"]
            parts = [_Part(int(s), None if e is None else int(e), int(d)) for s, e, d in state["parts"]]
            pos = 0
            for i, p in enumerate(parts):
                if (
                    p.start != pos
                    or p.done < 0
                    or (p.end is None and (i != len(parts) - 1 or total is not None))
                ):
                    return None
                if p.end is not None:
                    if p.done > p.end + 1 - p.start:
                        return None
                    pos = p.end + 1
            if total is not None and pos != total:
                return None
            on_disk = self.dest.stat().st_size
        except (KeyError, TypeError, ValueError, OSError):
            return None
        if on_disk < max((p.pos for p in parts), default=0):
            return None
        state["_parts"] = parts
        return state

    def _snapshot(self) -> dict:
        return {
            "version": STATE_VERSION, "url": self.url, "sources": list(self.sources), "file": self.name,
            "sha256": self.sha256, "size": self.size, "total": self.total, "etag": self.etag,
            "last_modified": self.last_modified, "validators": self.validators, "changes": self.changes,
            "ranges": self.ranges, "decode": self.decode,
            "parts": [[p.start, p.end, p.done] for p in self.parts], "updated": time.time(),
        }

    def _write_state(self, snap: dict) -> None:
        tmp = Path(str(self.state_path) + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(snap, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
        except OSError as exc:
            if _is_disk_full(exc):
                raise self._disk_full() from None
            raise

    def _checkpoint(self, fd: int) -> None:
        with self.lock:
            snap = self._snapshot()
            self.saved_bytes = self.session_bytes
        _fdatasync(fd)
        self._write_state(snap)

    def _checkpoint_due_locked(self) -> bool:
        """Whether ``checkpoint_bytes`` per busy connection were written since the last save (lock held)."""
        busy = sum(1 for p in self.parts if p.active and not p.complete) or 1
        return self.session_bytes - self.saved_bytes >= self.opt.checkpoint_bytes * busy

    def _discard(self) -> None:
        for p in (self.dest, self.state_path, Path(str(self.state_path) + ".tmp")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _finished_file_ok(self) -> bool:
        """A data file without state is a finished download from an earlier run: trust it only if it
        verifies."""
        try:
            if self.size is None or self.dest.stat().st_size != self.size:
                return False
        except FileNotFoundError:
            return False
        digest = hashlib.sha256()
        with open(self.dest, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != self.sha256:
            return False
        self._emit(ProgressEvent("verified", self.name, done=self.size, total=self.size,
                                 message="already downloaded"))
        self._emit(ProgressEvent("done", self.name, done=self.size, total=self.size))
        return True

    def _disk_full(self) -> DiskFullError:
        folder = str(self.dest.parent)
        with self.lock:
            done = sum(p.done for p in self.parts)
        needed = None if self.total is None else self.total - done
        free = shutil.disk_usage(folder).free
        return DiskFullError(
            f"not enough disk space for {self.name} in {folder}: "
            f"{_human(needed)} still needed, {_human(free)} free",
            "free some space (or point PIPX_LLAMA_HOME at a bigger disk) and run the same command again"
            + self._kept(": "),
            folder=folder, needed=needed, free=free,
        )

    # ---- one transfer attempt (fresh or resumed)

    def _adopt(self, state: dict) -> None:
        self.total = state["total"]
        self.parts = state["_parts"]
        for p in self.parts:
            p.queued = p.reserved = p.done
        self.sources = [s for s in state.get("sources", []) if isinstance(s, str)]
        old, new = urlsplit(state["url"]), urlsplit(self.url)
        if (old.scheme, old.netloc, old.path) == (new.scheme, new.netloc, new.path):
            self.etag, self.last_modified = state.get("etag"), state.get("last_modified")
            mode, changes = state.get("validators"), state.get("changes")
            self.validators = mode if mode in ("any", "last-modified", "none") else "any"
            self.changes = changes if isinstance(changes, int) and changes >= 0 else 0
        else:
            self.etag = self.last_modified = None
        self.ranges, self.decode = True, False

    def _transfer(self, state: dict | None) -> tuple[str, int]:
        # a fresh event per attempt: threads of an abandoned attempt keep seeing theirs set
        self.stop = stop = threading.Event()
        self.wake = threading.Event()
        self.error = None
        first: tuple[_Part, httpx.Response] | None = None
        if state is not None:
            self._adopt(state)
            if self.url not in self.sources:
                self.sources.append(self.url)
        else:
            first = self._probe()
            try:
                self._write_state(self._snapshot())
            except BaseException:
                if first is not None:
                    first[1].close()
                raise
        try:
            fd = os.open(self.dest, os.O_RDWR | os.O_CREAT | _O_BINARY, 0o644)
        except BaseException:
            if first is not None:
                first[1].close()
            raise
        hasher: _Hasher | None = None
        writer: _Writer | None = None
        workers: list[threading.Thread] = []
        try:
            if self.total is not None and os.fstat(fd).st_size < self.total:
                os.ftruncate(fd, self.total)
            done = sum(p.done for p in self.parts)
            if self.total is not None and shutil.disk_usage(self.dest.parent).free < self.total - done:
                raise self._disk_full()
            self._emit(ProgressEvent(
                "start", self.name, done=done, total=self.total, source=self.shown_url,
                message=(f"resuming at {_human(done)}" if done else "starting")
                + (f" of {_human(self.total)}" if self.total is not None else "")))
            hasher = self.hasher = _Hasher(self.dest, self._frontier)
            hasher.start()
            writer = _Writer(self, stop)
            writer.start()
            workers.append(writer)
            n = self.opt.parallel_parts if self._parallel() else 1
            for i in range(max(1, n)):
                w = threading.Thread(target=self._worker, args=(first if i == 0 else None, stop, writer),
                                     daemon=True, name=f"fetch-part-{i}")
                workers.append(w)
                w.start()
            first = None
            self._supervise(workers, fd)
            if self.error is not None:
                raise self.error
            with self.lock:
                length = sum(p.done for p in self.parts)
            # what is still unhashed (parts after the first) is hashed while the data is synced
            hasher.finish(length)
            self._checkpoint(fd)
            digest = hasher.result()
            hasher = None
            return digest, length
        except DiskFullError:
            raise
        except OSError as exc:
            if _is_disk_full(exc):
                raise self._disk_full() from None
            raise
        finally:
            if first is not None:
                first[1].close()
            stop.set()
            if writer is not None:
                writer.close()
            deadline = time.monotonic() + _JOIN_GRACE
            for w in workers:
                w.join(max(0.0, deadline - time.monotonic()))
            if hasher is not None:
                hasher.abort()
            try:
                if self.error is not None or any(w.is_alive() for w in workers) or hasher is not None:
                    self._checkpoint(fd)
            except (OSError, FetchError):
                pass
            finally:
                os.close(fd)

    def _supervise(self, workers: list[threading.Thread], fd: int) -> None:
        last_cp = last_ev = time.monotonic()
        cp_every = self.opt.checkpoint_interval
        samples: collections.deque[tuple[float, int]] = collections.deque()
        while True:
            # cleared before looking: a writer that finishes or fills a checkpoint after this sets it again
            self.wake.clear()
            self._drain_events()
            if self.error is not None or self._all_complete() or not any(w.is_alive() for w in workers):
                break
            now = time.monotonic()
            with self.lock:
                done = sum(p.done for p in self.parts)
                session = self.session_bytes
                due = self._checkpoint_due_locked()
            samples.append((now, session))
            while samples and samples[0][0] < now - _SPEED_WINDOW:
                samples.popleft()
            if now - last_ev >= _PROGRESS_EVERY:
                last_ev = now
                t0, b0 = samples[0]
                speed = (session - b0) / (now - t0) if now - t0 > 0.2 else None
                eta = ((self.total - done) / speed if speed and self.total is not None else None)
                self._emit(ProgressEvent("progress", self.name, done=done, total=self.total, speed=speed,
                                         eta=eta, source=self.shown_url))
            if now - self.last_byte >= self.opt.give_up_after:
                # every connection is stuck (in a read, a connect or a backoff): do not wait for them
                self.error = self._stalled("no connection is receiving anything", now - self.last_byte)
                break
            if now - last_cp >= cp_every or due:
                self._checkpoint(fd)
                last_cp = time.monotonic()
                # while the data syncs, the writer's writes can wait for it (ext4 does): on a link faster
                # than the disk, sync less often so that syncing takes at most ~1/_SYNC_SHARE of the time
                cp_every = min(max(self.opt.checkpoint_interval, (last_cp - now) * _SYNC_SHARE),
                               max(self.opt.checkpoint_interval, _CHECKPOINT_MAX))
            self.wake.wait(_TICK)
        self.stop.set()
        self._drain_events()
        if self.error is None and not self._all_complete():
            self.error = FetchError(f"download of {self.name} stopped before it was complete",
                                    "run the same command again" + self._kept(": "))

    def _finish(self, digest: str, length: int) -> None:
        if self.size is not None and length != self.size:
            self._discard()
            raise ChecksumError(
                f"size mismatch for {self.name} from {self._sources_text()}: expected {self.size} bytes, "
                f"got {length}; the download was deleted",
                "the source does not serve the file the manifest describes; if no source does, the manifest "
                "may be out of date",
                file=self.name, source=self.url, expected=self.sha256, actual=f"(size {length} bytes)")
        if digest != self.sha256:
            self._discard()
            raise ChecksumError(
                f"checksum mismatch for {self.name} from {self._sources_text()}: expected sha256 "
                f"{self.sha256}, got {digest}; the bad download was deleted",
                "if this keeps happening the source serves a different file than the manifest describes",
                file=self.name, source=self.url, expected=self.sha256, actual=digest)
        with open(self.dest, "rb+") as f:
            if os.fstat(f.fileno()).st_size != length:
                f.truncate(length)
            _fdatasync(f.fileno())
        for p in (self.state_path, Path(str(self.state_path) + ".tmp")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        self._emit(ProgressEvent("verified", self.name, done=length, total=length, source=self.shown_url,
                                 message=f"sha256 {digest}"))
        self._emit(ProgressEvent("done", self.name, done=length, total=length, source=self.shown_url))

    def _sources_text(self) -> str:
        shown = [redact_url(s) for s in self.sources if s != self.url]
        if not shown:
            return self.shown_url
        return f"{self.shown_url} (resumed from bytes fetched from {', '.join(shown)})"

    # ---- requests

    def _request(self, start: int | None, end: int | None, conditional: bool) -> httpx.Response:
        headers = {"Accept-Encoding": "identity"}
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
            validator = self._if_range()
            if conditional and validator:
                headers["If-Range"] = validator
        if self.opt.authorization:
            headers["Authorization"] = self.opt.authorization
        elif self.opt.token:
            headers["Authorization"] = f"Bearer {self.opt.token}"
        client: httpx.Client = self.client  # type: ignore[assignment]
        o = self.opt
        left = max(0.1, o.give_up_after - (time.monotonic() - self.last_byte))
        timeout = httpx.Timeout(connect=min(o.timeout, left), read=min(o.stall_timeout, left),
                                write=min(o.timeout, left), pool=min(o.timeout, left))
        try:
            request = client.build_request("GET", self.url, headers=headers, timeout=timeout)
            resp = client.send(request, stream=True)
        except httpx.TooManyRedirects:
            raise FetchError(f"too many redirects fetching {self.name} from {self.shown_url}",
                             "the source is misconfigured; try another source") from None
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            raise FetchError(f"cannot fetch {self.name} from {self.shown_url}: {exc}",
                             "the source redirects somewhere unusable; try another source") from None
        final = resp.url
        if final.scheme == "http" and not self.opt.allow_http and not _is_loopback(final.host):
            resp.close()
            raise FetchError(f"{self.shown_url} redirected to plain http ({final.host}); refusing",
                             "use a source that stays on https, or allow plain http explicitly")
        code = resp.status_code
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if code in (200, 206) and encoding not in ("", "identity"):
            resp.close()
            raise FetchError(
                f"{self.shown_url} sent {self.name} with Content-Encoding {encoding[:40]!r} although "
                f"identity "
                "was asked for; refused (decoding it could write far more than the file's size)",
                "the server compresses on the fly; have it serve the file as it is",
            )
        if code in (200, 206, 416):
            return resp
        resp.close()
        if code in (404, 410):
            raise SourceNotFound(f"{self.name} is not at {self.shown_url} (HTTP {code})",
                                 "if no source has it, the manifest may be out of date")
        if code in (401, 403):
            raise self._access_denied(code)
        if code in (408, 429) or code >= 500:
            raise _Retry(f"HTTP {code}", _retry_after(resp))
        raise FetchError(f"unexpected answer HTTP {code} fetching {self.name} from {self.shown_url}",
                         "try another source, or report the problem to whoever runs it")

    def _access_denied(self, code: int) -> AccessDenied:
        p = urlsplit(self.url)
        host = (p.hostname or "").lower()
        sent = "a token was sent and refused" if self.opt.token else "no token was sent"
        msg = f"access to {self.name} at {self.shown_url} was denied (HTTP {code}; {sent})"
        if host in ("huggingface.co", "hf.co") or host.endswith(".huggingface.co"):
            segs = [s for s in p.path.split("/") if s]
            page = "https://huggingface.co/" + "/".join(segs[:2]) if len(segs) >= 2 else "the model's page"
            hint = (f"this model is gated: log in to huggingface.co, accept its licence on {page}, create a "
                    "read token at https://huggingface.co/settings/tokens and set HF_TOKEN to it, then retry")
        elif re.search(r"(?i)(x-amz-signature|signature=|expires=|policy=|key-pair-id=)", p.query or ""):
            hint = ("this looks like a presigned download link, and such links expire: request a fresh one "
                    "(e.g. from Meta's download form) and pass it again, then retry" + self._kept(" -- "))
        else:
            hint = ("the server wants credentials: if it accepts a bearer token set HF_TOKEN to it, "
                    "otherwise ask whoever runs the server for access")
        return AccessDenied(msg, hint)

    def _if_range(self) -> str | None:
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def _believe_change(self, resp: httpx.Response) -> bool:
        """A response's validators differ from ours: True if that means the file changed.

        The first change is believed (the partial is discarded). Validators that change again within
        one download belong to a server that labels the same bytes differently from response to
        response (a load balancer whose servers compute ETags apart): they stop being used -- the ETag
        alone when Last-Modified stayed the same, else both -- and the sha256 checked at the end, as
        always, is what guarantees the bytes.
        """
        with self.lock:
            if self._changed_in is self.stop:
                return self._believed  # parallel parts seeing the same change: it counts once per attempt
            self._changed_in = self.stop
            self.changes += 1
            self._believed = self.changes < 2
            if self._believed:
                return True
            lm = resp.headers.get("last-modified")
            same_date = self.last_modified is not None and self.last_modified == lm
            if self.validators == "any" and self.etag is not None and same_date:
                self.validators, self.etag = "last-modified", None
                note = "its ETag changes from response to response; using Last-Modified instead"
            else:
                self.validators, self.etag, self.last_modified = "none", None, None
                note = ("its ETag/Last-Modified change from response to response; the sha256 check at the "
                        "end decides")
        self.events.put(ProgressEvent("notice", self.name, source=self.shown_url, message=note))
        return False

    def _validators_differ(self, resp: httpx.Response) -> bool:
        etag, lm = resp.headers.get("etag"), resp.headers.get("last-modified")
        if self.etag and etag:
            return etag != self.etag
        if self.last_modified and lm:
            return lm != self.last_modified
        return False

    def _learn_validators(self, resp: httpx.Response) -> None:
        with self.lock:
            if self.etag is None and self.last_modified is None and self.validators != "none":
                if self.validators == "any":
                    self.etag = resp.headers.get("etag")
                self.last_modified = resp.headers.get("last-modified")
            if self.url not in self.sources:
                self.sources.append(self.url)

    def _reason(self, exc: BaseException) -> tuple[str, float | None]:
        """Why an attempt failed, and the server's Retry-After; raises for errors not worth retrying."""
        if isinstance(exc, _Retry):
            return exc.reason, exc.retry_after
        if isinstance(exc, httpx.ReadTimeout):
            waited = self.opt.stall_timeout
            with contextlib.suppress(RuntimeError, AttributeError, KeyError, TypeError):
                waited = exc.request.extensions["timeout"]["read"]
            return f"no data for {waited:g}s (stalled connection)", None
        if isinstance(exc, httpx.ConnectTimeout):
            return "connecting timed out", None
        if isinstance(exc, httpx.ConnectError):
            cause: BaseException | None = exc
            while cause is not None:
                if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
                    cause
                ):
                    raise FetchError(
                        f"the TLS certificate of {urlsplit(self.url).hostname} could not be verified: {exc}",
                        "if you are behind a proxy that inspects TLS, point SSL_CERT_FILE at its CA bundle",
                    ) from None
                if isinstance(cause, socket.gaierror):
                    self._name_not_resolved(cause)
                cause = cause.__cause__ or cause.__context__
            return f"cannot connect: {exc}", None
        if isinstance(exc, httpx.RemoteProtocolError):
            return f"connection dropped: {exc}", None
        return f"{type(exc).__name__}: {exc}", None

    def _name_not_resolved(self, err: socket.gaierror) -> None:
        """Give up on this source at once (or after _DNS_RETRIES) when its host name does not resolve."""
        with self.lock:
            self.dns_failures += 1
            failures = self.dns_failures
        if err.errno in _DNS_FINAL or failures > _DNS_RETRIES:
            host = urlsplit(self.url).hostname
            raise NetworkError(
                f"cannot download {self.name} from {self.shown_url}: the host name {host} does not resolve "
                f"({err.strerror or err})",
                "check the network connection, DNS and proxy settings (HTTPS_PROXY); without a network, "
                "use a model already in the store (--offline), a lab mirror (--mirror URL) or files you "
                "have (--from-dir DIR)",
            ) from None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.opt.backoff_max, retry_after)
        base = min(self.opt.backoff_max, self.opt.backoff_base * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)

    def _gave_up(self, reason: str, retries: int) -> NetworkError:
        return NetworkError(
            f"could not download {self.name} from {self.shown_url}: {reason} (gave up after {retries} "
            f"retries)",
            "check the network connection or proxy settings (HTTPS_PROXY)" + self._kept("; "),
        )

    def _check_patience(self, reason: str, delay: float) -> None:
        """Give up now if waiting ``delay`` more leaves the source silent for ``give_up_after`` seconds."""
        idle = time.monotonic() - self.last_byte
        if idle + delay >= self.opt.give_up_after:
            raise self._stalled(reason, idle)

    def _stalled(self, reason: str, idle: float) -> NetworkError:
        return NetworkError(
            f"could not download {self.name} from {self.shown_url}: nothing received for {idle:.0f} s "
            f"({reason})",
            "check the network connection or proxy settings (HTTPS_PROXY), or try later" + self._kept("; ")
            + f"; `give_up_after` in the config file sets this limit ({self.opt.give_up_after:g} s)",
        )

    def _kept(self, lead: str) -> str:
        """What the next run can build on, for a hint (``lead`` + text), or '' when nothing is kept."""
        with self.lock:
            done = sum(p.done for p in self.parts)
            resumable = self.ranges and not self.decode
        if not done:
            return ""
        if not resumable:
            return lead + "this source cannot resume a download, so the next run starts it over"
        return lead + f"the {_human(done)} downloaded so far are kept and the next run resumes from there"

    # ---- the first request of a fresh download

    def _probe(self) -> tuple[_Part, httpx.Response] | None:
        """Open the first response, learn size, validators and Range support; plan the parts."""
        o = self.opt
        parallel = o.parallel_parts > 1 and self.size is not None and self.size >= o.part_threshold
        first_end = (min(-(-self.size // o.parallel_parts), 2 * o.min_part) - 1
                     if parallel and self.size else None)
        attempt = 0
        while True:
            try:
                if self.size == 0:
                    resp = self._request(None, None, conditional=False)
                else:
                    resp = self._request(0, first_end, conditional=False)
                try:
                    return self._plan(resp)
                except BaseException:
                    resp.close()
                    raise
            except (_Retry, httpx.TransportError) as exc:
                reason, retry_after = self._reason(exc)
                attempt += 1
                if attempt > o.max_retries:
                    raise self._gave_up(reason, attempt - 1) from None
                delay = self._backoff(attempt, retry_after)
                self._check_patience(reason, delay)
                self._emit(
                    ProgressEvent(
                        "retry",
                        self.name,
                        source=self.shown_url,
                        message=f"{reason}; retry {attempt}/{o.max_retries} in {delay:.1f}s",
                    )
                )
                time.sleep(delay)

    def _plan(self, resp: httpx.Response) -> tuple[_Part, httpx.Response] | None:
        code = resp.status_code
        self.etag = self.last_modified = None
        self.sources = []
        self._learn_validators(resp)
        cr = None
        if code == 416:
            unsatisfied = re.fullmatch(r"\s*bytes\s+\*/0\s*", resp.headers.get("content-range", ""))
            resp.close()
            if not unsatisfied:
                raise FetchError(f"the server refused the first range of {self.name} at {self.shown_url} "
                                 "(HTTP 416)", "try another source")
            total: int | None = 0
            self.ranges = True
        elif code == 206:
            cr = _content_range(resp.headers.get("content-range"))
            if cr is None or cr[0] != 0:
                raise FetchError(f"the server sent an invalid Content-Range for {self.name}: "
                                 f"{resp.headers.get('content-range')!r}", "try another source")
            total = cr[2]
            self.ranges = True
        else:
            self.ranges = False
            length = resp.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
        if self.size is not None and total is not None and total != self.size:
            raise ChecksumError(
                f"size mismatch for {self.name} at {self.shown_url}: expected {self.size} bytes, "
                f"the server has {total}; nothing was downloaded",
                "the source holds another version of the file; if no source has this one, the manifest may "
                "be out of date",
                file=self.name, source=self.url, expected=self.sha256, actual=f"(size {total} bytes)")
        self.total = total if total is not None else self.size
        o = self.opt
        if self.total == 0:
            self.parts = []
            resp.close()
            return None
        if self.total is None:
            self.parts = [_Part(0, None)]
        elif self._parallel():
            step = -(-self.total // o.parallel_parts)
            self.parts = [_Part(s, min(s + step, self.total) - 1) for s in range(0, self.total, step)]
        else:
            self.parts = [_Part(0, self.total - 1)]
        now = time.monotonic()
        p0 = self.parts[0]
        p0.active, p0.claimed_at, p0.last_data = True, now, now
        p0.req_end = cr[1] if cr is not None else -1 if self.total is None else self.total - 1
        return p0, resp

    # ---- workers

    def _frontier(self) -> int:
        with self.lock:
            return self._frontier_locked()

    def _frontier_locked(self) -> int:
        pos = 0
        for p in self.parts:
            pos = p.pos
            if not p.complete:
                break
        return pos

    def _all_complete(self) -> bool:
        with self.lock:
            return all(p.complete for p in self.parts)

    def _claim(self) -> _Part | None:
        """An unclaimed part; else half of the biggest part in progress; else the rest of a straggler."""
        now = time.monotonic()
        with self.lock:
            for p in self.parts:
                if not p.active and not p.complete:
                    p.active, p.claimed_at, p.claimed_received, p.last_data = True, now, p.received, now
                    return p
            if not self.ranges or self.total is None:
                return None
            busy = [p for p in self.parts if p.active and p.end is not None and not p.complete]
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
            new = _Part(cut, best.end, active=True, claimed_at=now, last_data=now)
            best.end = cut - 1
            self.parts.insert(self.parts.index(best) + 1, new)
            return new

    def _straggling(self, p: _Part, left: int, now: float) -> bool:
        """No bytes for straggler_after seconds, or on course to finish far later than a fresh connection."""
        if now - p.last_data >= self.opt.straggler_after:
            return True
        age = now - p.claimed_at
        if age < self.opt.straggler_after:
            return False
        rate = (p.received - p.claimed_received) / age
        return rate * 4 < self._rate_per_connection(now) and left / max(rate, 1.0) > self.opt.straggler_after

    def _parallel(self) -> bool:
        """Whether the file is fetched as ranged parts over several connections (once its size is known)."""
        o = self.opt
        return (
            self.ranges and self.total is not None and o.parallel_parts > 1 and self.total >= o.part_threshold
        )

    def _rate_per_connection(self, now: float) -> float:
        """Bytes/s this call has received, per connection now busy (called with the lock held)."""
        active = sum(1 for q in self.parts if q.active and not q.complete) or 1
        return self.session_received / max(now - self.session_start, 1e-3) / active

    def _fail(self, stop: threading.Event, exc: BaseException) -> None:
        """Record the first error of the current attempt and stop its threads."""
        with self.lock:
            if stop is self.stop and self.error is None:
                self.error = exc
        stop.set()
        self.wake.set()

    def _worker(
        self, first: tuple[_Part, httpx.Response] | None, stop: threading.Event, writer: _Writer
    ) -> None:
        try:
            while not stop.is_set():
                if first is not None:
                    part, resp = first
                    first = None
                else:
                    part, resp = self._claim(), None
                if part is None:
                    if self._all_complete() or stop.wait(_TICK * 2):
                        return
                    continue
                try:
                    self._fetch_part(part, resp, stop, writer)
                finally:
                    with self.lock:
                        part.active = False
        except Exception as exc:  # noqa: BLE001  (re-raised by the supervising thread)
            self._fail(stop, exc)
        finally:
            if first is not None:
                first[1].close()

    def _fetch_part(
        self, part: _Part, resp: httpx.Response | None, stop: threading.Event, writer: _Writer
    ) -> None:
        attempt = 0
        while not part.all_queued and not stop.is_set():
            before = part.queued
            try:
                if resp is None:
                    resp = self._request(part.qpos, self._open_span(part), conditional=True)
                    self._accept(resp, part)
                self._stream(resp, part, stop, writer)
                if part.end is None and not stop.is_set():
                    with self.lock:
                        part.end = part.qpos - 1
                        self.total = part.qpos
                    return
                if part.qpos > part.req_end >= 0:
                    continue  # the span is done; the next one goes out on the same connection
                if not part.all_queued and not stop.is_set():
                    raise _Retry("the connection closed before the part was complete")
            except (_Retry, httpx.TransportError) as exc:
                reason, retry_after = self._reason(exc)
                if stop.is_set() or part.all_queued:
                    return
                if not self.ranges and (self.total is None or self.decode or part.qpos == 0):
                    raise _Restart(reason, retry=True, retry_after=retry_after) from None
                # a server that cuts responses short but sends data is healthy: ask for the rest at once,
                # as the first retry of a new series (a whole-file 200 is asked for a Range now, see _accept)
                progressed = part.queued - before >= _MIN_PROGRESS
                attempt = 1 if progressed else attempt + 1
                if attempt > self.opt.max_retries:
                    raise self._gave_up(reason, attempt - 1) from None
                delay = 0.0 if progressed else self._backoff(attempt, retry_after)
                self._check_patience(reason, delay)
                with self.lock:
                    done = sum(p.done for p in self.parts)
                self.events.put(ProgressEvent(
                    "retry", self.name, done=done, total=self.total, source=self.shown_url,
                    message=f"{reason} at byte {part.qpos}; " + (
                        "continuing from there" if progressed else
                        f"retry {attempt}/{self.opt.max_retries} in {delay:.1f}s")))
                if delay and stop.wait(delay):
                    return
            finally:
                if resp is not None:
                    resp.close()
                    resp = None

    def _open_span(self, part: _Part) -> int | None:
        """The last byte the next request of ``part`` asks for, recorded so that no split cuts below it."""
        o = self.opt
        with self.lock:
            end = part.end
            if end is not None and self._parallel():
                per_conn = self._rate_per_connection(time.monotonic())
                span = int(min(_SPAN_MAX, max(2 * o.min_part, per_conn * _SPAN_SECONDS)))
                end = min(end, part.qpos + span - 1)
            part.req_end = -1 if end is None else end
            return end

    def _accept(self, resp: httpx.Response, part: _Part) -> None:
        """Check a ranged response continues this very file at this very offset."""
        code = resp.status_code
        if code == 416:
            raise _Restart("the source can no longer serve the rest of the file (HTTP 416)")
        if code == 200:
            if part.start == 0 and part.queued == 0 and len(self.parts) == 1:
                with self.lock:
                    self.etag = self.last_modified = None
                self._learn_validators(resp)
                return
            if not self.ranges:
                # the stream of a whole-file 200 broke, and the Range asking for the rest was ignored too
                raise _Restart("the request for the rest of the file was answered from byte 0", retry=True)
            sent = resp.request.headers.get("if-range")
            if sent is not None and not _validator_matches(resp, sent):
                if self._believe_change(resp):
                    raise _Restart("the file at the source has changed (new ETag/Last-Modified)")
                # the If-Range validator was this server's own whim: ask again with what is still trusted
                raise _Retry("the server sent the whole file instead of the range (If-Range did not match)",
                             0.0)
            raise _Restart("the server ignored the Range request and sent the whole file")
        cr = _content_range(resp.headers.get("content-range"))
        if cr is None or cr[0] != part.qpos:
            raise _Retry(f"the server answered with the wrong range ({resp.headers.get('content-range')!r} "
                         f"for byte {part.qpos})")
        if cr[2] is not None and self.total is not None and cr[2] != self.total:
            raise _Restart(f"the file at the source changed size ({self.total} -> {cr[2]} bytes)")
        if self._validators_differ(resp) and self._believe_change(resp):
            raise _Restart("the file at the source has changed (new ETag/Last-Modified)")
        self._learn_validators(resp)
        if not self.ranges:
            with self.lock:
                self.ranges = True  # it answered a whole-file request with 200, yet honours Range: resumable
        if 0 <= cr[1] < part.req_end:
            with self.lock:
                part.req_end = cr[1]  # a server may answer a shorter range than asked

    def _stream(self, resp: httpx.Response, part: _Part, stop: threading.Event, writer: _Writer) -> None:
        """Receive the body and queue it for the writer in blocks of about _WRITE_BLOCK bytes.

        A block is the list of chunks as httpx delivered them (no copying); it is queued when it is big
        enough or _FLUSH_AFTER seconds old, so slow connections still show progress and checkpoint.
        """
        _widen_reads(resp)
        chunks = resp.iter_raw()
        block: list[bytes | memoryview] = []
        pending = 0
        flushed = time.monotonic()
        lock = self.lock
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
                    part.last_data = self.last_byte = now
                    part.received += n
                    self.session_received += n
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

    def _queue_block(self, chunks: list[bytes | memoryview], size: int, part: _Part, writer: _Writer) -> None:
        with self.lock:
            part.queued += size
        writer.put(part, chunks, size)
