"""Disk I/O of a download: the writer thread, writes without copies, syncs, and a full disk.

Receiving threads only parse; one writer thread per attempt writes the blocks they queue into the
(sparse, full-length) file, so receiving, writing and hashing overlap (``os.pwritev`` releases the
GIL). A block is the list of chunks as httpx delivered them: it is written with one ``os.pwritev``
(``pwrite`` / seek+write where there is none, i.e. Windows), never joined, and offered to the hasher
as it is. A full disk (ENOSPC, EDQUOT) becomes one ``DiskFullError`` saying what is still needed, what
is free and what the next run keeps.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
from pathlib import Path

from pipx_llama.errors import DiskFullError
from pipx_llama.fetch.hashing import Hasher
from pipx_llama.fetch.options import TICK
from pipx_llama.fetch.parts import Part, Parts, human

_WRITE_QUEUE = 8
_IOV_MAX = 1024
O_BINARY = getattr(os, "O_BINARY", 0)


def fdatasync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


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


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full_error(dest: Path, name: str, parts: Parts) -> DiskFullError:
    """The error for a disk too full to hold the rest of the download of ``name`` at ``dest``.

    Its hint counts only what the resume state on disk records: the state's own save can fail on the
    full disk. The download makes it again once the attempt has tried its last save.
    """
    folder = str(dest.parent)
    with parts.lock:
        done = sum(p.done for p in parts.items)
    needed = None if parts.total is None else parts.total - done
    free = shutil.disk_usage(folder).free
    return DiskFullError(
        f"not enough disk space for {name} in {folder}: "
        f"{human(needed)} still needed, {human(free)} free",
        "free some space (or point PIPX_LLAMA_HOME at a bigger disk) and run the same command again"
        + parts.kept(": ", saved=True),
        folder=folder, needed=needed, free=free,
    )


class Writer(threading.Thread):
    """Writes the blocks the receiving threads queue, so receiving, writing and hashing overlap.

    One writer per attempt, with its own file descriptor; each write is trimmed to its part's current
    end (a part can be shortened while its blocks wait), then counted as done and offered to the hasher.
    When the attempt stops (error, interrupt) the writer still writes what is queued -- bytes received
    are kept -- unless a newer attempt has replaced this one (then its file is gone anyway).
    """

    def __init__(
        self, parts: Parts, dest: Path, name: str, hasher: Hasher | None, stop: threading.Event
    ) -> None:
        super().__init__(daemon=True, name="fetch-writer")
        self.parts = parts
        self.dest = dest
        self.name = name
        self.stop = stop
        self.hasher = hasher
        self.queue: queue.Queue[tuple[Part, list[bytes | memoryview], int] | None] = queue.Queue(
            maxsize=_WRITE_QUEUE)

    def put(self, part: Part, chunks: list[bytes | memoryview], size: int) -> None:
        """Queue ``size`` bytes in ``chunks`` for ``part`` (in order); waits while full, gives up on stop."""
        while not self.stop.is_set():
            try:
                self.queue.put((part, chunks, size), timeout=TICK)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued (unless stopped) and end the thread."""
        while self.is_alive():
            try:
                self.queue.put(None, timeout=TICK)
                break
            except queue.Full:
                continue

    def run(self) -> None:
        parts = self.parts
        fd = -1
        try:
            fd = os.open(self.dest, os.O_WRONLY | O_BINARY)
            while True:
                item = self.queue.get()
                if item is None:
                    return
                part, chunks, size = item
                with parts.lock:
                    if self.stop is not parts.stop:
                        continue
                    offset = part.pos
                    n = size if part.end is None else max(0, min(size, part.end + 1 - offset))
                    at_front = parts.frontier_locked() == offset
                if not n:
                    continue
                if n < size:
                    chunks = _trim(chunks, n)
                try:
                    _write_chunks(fd, chunks, offset)
                except OSError as exc:
                    if is_disk_full(exc):
                        raise disk_full_error(self.dest, self.name, parts) from None
                    raise
                if at_front and self.hasher is not None:
                    # before the frontier moves: the hasher would otherwise read these bytes back
                    self.hasher.offer(offset, chunks, n, self.stop)
                with parts.lock:
                    part.done += n
                    parts.session_bytes += n
                    finished = part.complete and all(p.complete for p in parts.items)
                    due = parts.checkpoint_due_locked()
                if finished or due:
                    parts.wake.set()
        except Exception as exc:  # noqa: BLE001  (re-raised by the supervising thread)
            parts.fail(self.stop, exc)
        finally:
            if fd >= 0:
                os.close(fd)

