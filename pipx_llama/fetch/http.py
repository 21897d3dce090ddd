"""Verified, resumable HTTP(S) downloads with httpx: ranged parallel parts, retries, resume across restarts.

``download(url, dest, size=..., sha256=..., options=...)`` leaves ``dest`` holding exactly the bytes
whose size and sha256 the caller expects, or raises one of ``pipx_llama.fetch.errors``. This module is
the supervisor of one call: it checks the request, continues what an earlier run left or starts
afresh, runs each transfer attempt (a writer, a hasher and one receiving thread per part), starts over
cleanly when the file at the source changed, saves the resume state as it goes, reports progress and
verifies the result. The threads' work lives beside it, one concern per module:

- fetch/options.py: ``FetchOptions``, the knobs of a download.
- fetch/parts.py: the file as parts and spans, and the state the threads share under one lock.
- fetch/source.py: the server behind the URL -- requests, encodings, validators, failure reasons.
- fetch/receive.py: the first request, then each receiving thread, part by part, span by span.
- fetch/diskio.py: the writer thread, copy-free writes into the sparse file, syncs, a full disk.
- fetch/hashing.py: the sha256 of the finished prefix, while the download runs.
- fetch/resume.py: the state file next to ``dest`` that a later run continues from.

Checkpoints
    The resume state is saved about once a second, always after an ``fdatasync`` of the data, so it
    never claims bytes that are not on disk, even after a power cut. Writes to the file can wait while
    it syncs, so when a sync takes long (a link faster than the disk) the saves are spaced out to keep
    syncing under a tenth of the time -- but never more than 2 s or ``checkpoint_bytes`` (32 MB) per
    busy connection apart, which bounds what a kill costs.

Never mixing two versions
    A server whose file changed answers 200 with the new file; a 206 whose ETag, Last-Modified or
    total differs from the state is treated the same way (``Restart``): the partial is discarded and
    the download starts over cleanly, at most a few times in a row. After ``give_up_after`` seconds
    (60) without a byte from the source, retries included, the download gives up.

Throughput
    Receiving, writing and hashing run on three threads: ``os.pwritev`` and ``hashlib`` release the
    GIL, so only parsing holds it, and bytes are copied as little as httpx allows (fetch/receive.py,
    fetch/diskio.py). Progress events are throttled (4 a second) and come from the calling thread.
    Size and hash are checked before returning; on mismatch the bad bytes are deleted.

Concurrency: one download per ``dest`` at a time -- the caller holds the per-blob lock.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipx_llama.errors import DiskFullError, FetchError, UsageError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.fetch.diskio import O_BINARY, Writer, disk_full_error, fdatasync, is_disk_full
from pipx_llama.fetch.errors import ChecksumError, OfflineError
from pipx_llama.fetch.hashing import Hasher, file_sha256
from pipx_llama.fetch.options import JOIN_GRACE, TICK, FetchOptions
from pipx_llama.fetch.parts import Part, Parts, human
from pipx_llama.fetch.receive import Receiver
from pipx_llama.fetch.resume import (
    SavedState,
    adopt_state,
    discard_partial,
    forget_state,
    load_state,
    partial_progress,
    reserve_spare,
    save_spare,
    save_state,
    state_path,
    state_snapshot,
)
from pipx_llama.fetch.source import Restart, Source, check_url, redact_url

if TYPE_CHECKING:
    import httpx

__all__ = ["FetchOptions", "download", "partial_progress", "redact_url"]

_PROGRESS_EVERY = 0.25
_SPEED_WINDOW = 3.0
_SYNC_SHARE = 10
_CHECKPOINT_MAX = 2.0
_MAX_RESTARTS = 3
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ---- the supervisor: one call of download()

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
    check_url(url, options.allow_http)
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


class _Job:
    """One call of download(): its parts and source, the attempts, and the loop supervising each."""

    def __init__(self, url: str, dest: Path, size: int | None, sha256: str, options: FetchOptions,
                 on_event: EventCallback | None, name: str) -> None:
        self.url = url
        self.dest = dest
        self.state_path = state_path(dest)
        self.size = size
        self.sha256 = sha256
        self.opt = options
        self.on_event = on_event
        self.name = name
        # events of the other threads, emitted by the calling thread
        self.events: queue.SimpleQueue[ProgressEvent] = queue.SimpleQueue()
        self.parts = Parts(options)
        self.source = Source(url, name, options, self.parts, self.events)
        self.shown_url = self.source.shown_url
        self.receiver = Receiver(self.parts, self.source, self.events, size, sha256)

    # ---- top level

    def run(self) -> None:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        saved = load_state(self.dest, self.sha256, self.size)
        if saved is None:
            if self._finished_file_ok():
                return
            discard_partial(self.dest)
        self.source.open()
        self.parts.last_byte = time.monotonic()  # patience counts from here, not from hashing a finished file
        try:
            restarts = retries = 0
            while True:
                try:
                    digest, length = self._transfer(saved)
                    break
                except DiskFullError:
                    # made again now the attempt has ended: its last resume-state save (or the failure
                    # to save one on the full disk) decides what the hint may say is kept
                    raise self._disk_full() from None
                except Restart as r:
                    saved = None
                    discard_partial(self.dest)
                    self.parts.items = []
                    if r.retry:
                        retries += 1
                        if retries > self.opt.max_retries:
                            raise self.source.gave_up(r.reason, retries - 1) from None
                        delay = self.source.backoff(retries, r.retry_after)
                        self.source.check_patience(r.reason, delay)
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
            self.source.close()
        self._finish(digest, length)

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

    def _snapshot(self) -> dict:
        return state_snapshot(self.source, self.parts, self.sha256, self.size)

    def _write_state(self, snap: dict) -> None:
        try:
            save_state(self.state_path, snap)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            if save_spare(self.dest, snap):  # written in place: the bytes synced before it are kept
                self._saved(snap)
            raise self._disk_full() from None
        self._saved(snap)

    def _saved(self, snap: dict) -> None:
        with self.parts.lock:
            self.parts.kept_bytes = sum(done for _, _, done in snap["parts"])

    def _checkpoint(self, fd: int) -> None:
        with self.parts.lock:
            snap = self._snapshot()
            self.parts.saved_bytes = self.parts.session_bytes
        fdatasync(fd)
        self._write_state(snap)

    def _finished_file_ok(self) -> bool:
        """A data file without state is a finished download from an earlier run: trust it only if it
        verifies."""
        try:
            if self.size is None or self.dest.stat().st_size != self.size:
                return False
        except FileNotFoundError:
            return False
        if file_sha256(self.dest) != self.sha256:
            return False
        self._emit(ProgressEvent("verified", self.name, done=self.size, total=self.size,
                                 message="already downloaded"))
        self._emit(ProgressEvent("done", self.name, done=self.size, total=self.size))
        return True

    def _disk_full(self) -> DiskFullError:
        return disk_full_error(self.dest, self.name, self.parts)

    # ---- one transfer attempt (fresh or resumed)

    def _transfer(self, saved: SavedState | None) -> tuple[str, int]:
        parts = self.parts
        # a fresh event per attempt: threads of an abandoned attempt keep seeing theirs set
        stop = parts.new_attempt()
        first: tuple[Part, httpx.Response] | None = None
        if saved is not None:
            adopt_state(saved, parts, self.source)
            if self.url not in self.source.sources:
                self.source.sources.append(self.url)
        else:
            first = self.receiver.probe(self._emit)
            try:
                self._write_state(self._snapshot())
            except BaseException:
                if first is not None:
                    first[1].close()
                raise
        reserve_spare(self.dest)
        try:
            fd = os.open(self.dest, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        except BaseException:
            if first is not None:
                first[1].close()
            raise
        hasher: Hasher | None = None
        writer: Writer | None = None
        workers: list[threading.Thread] = []
        try:
            if parts.total is not None and os.fstat(fd).st_size < parts.total:
                os.ftruncate(fd, parts.total)
            done = sum(p.done for p in parts.items)
            if parts.total is not None and shutil.disk_usage(self.dest.parent).free < parts.total - done:
                raise self._disk_full()
            self._emit(ProgressEvent(
                "start", self.name, done=done, total=parts.total, source=self.shown_url,
                message=(f"resuming at {human(done)}" if done else "starting")
                + (f" of {human(parts.total)}" if parts.total is not None else "")))
            hasher = Hasher(self.dest, parts.frontier)
            hasher.start()
            writer = Writer(parts, self.dest, self.name, hasher, stop)
            writer.start()
            workers.append(writer)
            n = self.opt.parallel_parts if parts.parallel() else 1
            for i in range(max(1, n)):
                w = threading.Thread(target=self.receiver.run, args=(first if i == 0 else None, stop, writer),
                                     daemon=True, name=f"fetch-part-{i}")
                workers.append(w)
                w.start()
            first = None
            self._supervise(workers, fd)
            if parts.error is not None:
                raise parts.error
            with parts.lock:
                length = sum(p.done for p in parts.items)
            # what is still unhashed (parts after the first) is hashed while the data is synced
            hasher.finish(length)
            self._checkpoint(fd)
            digest = hasher.result()
            hasher = None
            return digest, length
        except DiskFullError:
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise self._disk_full() from None
            raise
        finally:
            if first is not None:
                first[1].close()
            stop.set()
            if writer is not None:
                writer.close()
            deadline = time.monotonic() + JOIN_GRACE
            for w in workers:
                w.join(max(0.0, deadline - time.monotonic()))
            if hasher is not None:
                hasher.abort()
            try:
                if parts.error is not None or any(w.is_alive() for w in workers) or hasher is not None:
                    self._checkpoint(fd)
            except (OSError, FetchError):
                pass
            finally:
                os.close(fd)

    def _supervise(self, workers: list[threading.Thread], fd: int) -> None:
        parts = self.parts
        last_cp = last_ev = time.monotonic()
        cp_every = self.opt.checkpoint_interval
        samples: collections.deque[tuple[float, int]] = collections.deque()
        while True:
            # cleared before looking: a writer that finishes or fills a checkpoint after this sets it again
            parts.wake.clear()
            self._drain_events()
            if parts.error is not None or parts.all_complete() or not any(w.is_alive() for w in workers):
                break
            now = time.monotonic()
            with parts.lock:
                done = sum(p.done for p in parts.items)
                session = parts.session_bytes
                due = parts.checkpoint_due_locked()
            samples.append((now, session))
            while samples and samples[0][0] < now - _SPEED_WINDOW:
                samples.popleft()
            if now - last_ev >= _PROGRESS_EVERY:
                last_ev = now
                t0, b0 = samples[0]
                speed = (session - b0) / (now - t0) if now - t0 > 0.2 else None
                eta = ((parts.total - done) / speed if speed and parts.total is not None else None)
                self._emit(ProgressEvent("progress", self.name, done=done, total=parts.total, speed=speed,
                                         eta=eta, source=self.shown_url))
            if now - parts.last_byte >= self.opt.give_up_after:
                # every connection is stuck (in a read, a connect or a backoff): do not wait for them
                idle = now - parts.last_byte
                parts.error = self.source.stalled("no connection is receiving anything", idle)
                break
            if now - last_cp >= cp_every or due:
                self._checkpoint(fd)
                last_cp = time.monotonic()
                # while the data syncs, the writer's writes can wait for it (ext4 does): on a link faster
                # than the disk, sync less often so that syncing takes at most ~1/_SYNC_SHARE of the time
                cp_every = min(max(self.opt.checkpoint_interval, (last_cp - now) * _SYNC_SHARE),
                               max(self.opt.checkpoint_interval, _CHECKPOINT_MAX))
            parts.wake.wait(TICK)
        parts.stop.set()
        self._drain_events()
        if parts.error is None and not parts.all_complete():
            parts.error = FetchError(f"download of {self.name} stopped before it was complete",
                                     "run the same command again" + parts.kept(": "))

    def _finish(self, digest: str, length: int) -> None:
        if self.size is not None and length != self.size:
            discard_partial(self.dest)
            raise ChecksumError(
                f"size mismatch for {self.name} from {self.source.sources_text()}: expected {self.size} "
                f"bytes, got {length}; the download was deleted",
                "the source does not serve the file the manifest describes; if no source does, the manifest "
                "may be out of date",
                file=self.name, source=self.url, expected=self.sha256, actual=f"(size {length} bytes)")
        if digest != self.sha256:
            discard_partial(self.dest)
            raise ChecksumError(
                f"checksum mismatch for {self.name} from {self.source.sources_text()}: expected sha256 "
                f"{self.sha256}, got {digest}; the bad download was deleted",
                "if this keeps happening the source serves a different file than the manifest describes",
                file=self.name, source=self.url, expected=self.sha256, actual=digest)
        with open(self.dest, "rb+") as f:
            if os.fstat(f.fileno()).st_size != length:
                f.truncate(length)
            fdatasync(f.fileno())
        forget_state(self.dest)
        self._emit(ProgressEvent("verified", self.name, done=length, total=length, source=self.shown_url,
                                 message=f"sha256 {digest}"))
        self._emit(ProgressEvent("done", self.name, done=length, total=length, source=self.shown_url))
