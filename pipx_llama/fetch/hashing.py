"""The sha256 of a download's finished prefix, computed while the download runs.

A download is verified before it is trusted, and hashing a multi-gigabyte file after the last byte
would add most of a minute to every pull; so a hasher thread hashes the contiguous prefix of the file
that is on disk while the download runs: blocks written at the front of that prefix are handed to it
from memory; anything else -- the prefix an earlier run left (hashlib state cannot be saved, so a
resume re-hashes it once), parts that finished out of order, blocks offered while the hasher lagged --
is read back from the file. A single stream is therefore hashed as it streams; parallel parts hash
the first part as it arrives and the others as the parts before them complete, the remainder right
after the last byte, while the data is synced. ``hashlib`` releases the GIL, so hashing overlaps
receiving and writing.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from pipx_llama.errors import FetchError
from pipx_llama.fetch.options import JOIN_GRACE, TICK

_HASH_CHUNK = 4 << 20
_HASH_QUEUE = 8
_HASH_LAG_MAX = 32 << 20
_HASH_JOIN_BELOW = 128 << 10


def file_sha256(path: Path) -> str:
    """The hex sha256 of a whole file, read in big blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Hasher(threading.Thread):
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
                self._queue.put((offset, chunks, size), timeout=TICK)
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
                self._queue.put((-1, [], 0), timeout=TICK)
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
        self.join(JOIN_GRACE)

