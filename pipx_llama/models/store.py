"""The on-disk model store: content-addressed blobs, model folders, partial downloads, locks, provenance.

Layout under the root (``PIPX_LLAMA_HOME``, default ``platformdirs.user_data_dir("pipx-llama")``)::

    blobs/sha256/<hex>                     verified files, named by their sha256
    partial/<hex>.part (+ .part.json)      resumable downloads and their state (+ .part.json.spare, where
                                           a save goes when the disk is full: fetch/resume.py)
    partial/pip-<hex16>/                   wheels being unpacked by a pip source
    models/<name>/<variant>/<path>         what a variant needs: hard links to blobs (copies where the
                                           filesystem has no hard links) + .provenance.json
    manifests/*.toml                       manifests of models registered with ``import``
    locks/                                 cross-process locks

Every write goes to a temporary name in the destination folder and is renamed into place, so a crash
leaves the old state or the new one.

A store may be read-only to its user (a shared lab install, a read-only mount): reading it -- list,
verify, run -- needs no write (a shared lock is taken on the lock file its writers made, if any), while
a change (pull, gc, rm, import) stops with ``StoreReadOnlyError`` before touching anything. Read-only is
detected with ``os.access`` (which sees read-only mounts even for root) and, where that is wrong (root
on a chmod'ed folder passes it, network filesystems may refuse later), from the error of the write.

Each installed GGUF's record also holds the size and a sha256 of its header and tensor table (the
bytes before the tensor data), so that loading it can notice cheaply that it is not the file that
was verified, without hashing gigabytes. Locks are OS locks (``flock`` on POSIX, ``msvcrt.locking`` on
Windows) that the kernel releases when their process dies, so a killed process never leaves a stale lock.
Pulls hold the store lock shared; ``gc`` and the blob removal of ``rm`` hold it exclusively, so a
blob is never deleted between being downloaded and being linked into a model folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipx_llama.errors import DiskFullError, ModelFileError, PipxLlamaError, StoreError
from pipx_llama.files import atomic_output, atomic_write_json, temp_path
from pipx_llama.system import disk_free, nearest_existing
from pipx_llama.units import human_bytes

CHUNK = 1 << 20
PROVENANCE = ".provenance.json"
DERIVED_PROVENANCE_SUFFIX = ".provenance.json"   # <file>.provenance.json: a derived file's record
# What a refused write says: a read-only filesystem, or no permission.
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt
else:
    import fcntl


class StoreReadOnlyError(StoreError):
    """The store cannot be changed by this user (read-only mount or permissions); reading it still works."""


def is_read_only_error(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error that caused it) is a write refused by a filesystem or permissions."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _READ_ONLY_ERRNOS:
            return True
        err = err.__cause__
    return False


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of a file, streaming; ``on_bytes(done)`` is called after every chunk."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if on_bytes is not None:
                on_bytes(done)
    return digest.hexdigest()


def copy_hashing(src: Path, dest: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Copy ``src`` to ``dest`` atomically, returning (sha256, size) of what was copied."""
    digest = hashlib.sha256()
    size = 0
    with atomic_output(dest) as tmp, open(src, "rb") as fi, open(tmp, "wb") as fo:
        while chunk := fi.read(CHUNK):
            digest.update(chunk)
            fo.write(chunk)
            size += len(chunk)
            if on_bytes is not None:
                on_bytes(size)
    return digest.hexdigest(), size


def link_or_copy(src: Path, dest: Path, *, copy: bool = False) -> str:
    """Make ``dest`` a hard link to ``src`` (or a copy where links are impossible or ``copy``); atomic.

    Returns "link", "copy" or "present" (``dest`` already is that very file).
    """
    if dest.is_dir() and not dest.is_symlink():
        raise ModelFileError(f"{dest} is a folder where a file belongs",
                             "move it away or delete it (`pipx-llama rm MODEL` removes the whole model), "
                             "then retry")
    with contextlib.suppress(FileNotFoundError):
        if not copy and os.path.samefile(src, dest):
            return "present"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    try:
        mode = "copy"
        if not copy:
            try:
                os.link(src, tmp)
                mode = "link"
            except OSError:
                pass
        if mode == "copy":
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        # a rename between two links of one file is a no-op that leaves the source name behind
        tmp.unlink(missing_ok=True)
    return mode


# --- locks --------------------------------------------------------------------------------------------------


class Lock:
    """A cross-process lock on ``path`` (an OS lock: released by the kernel if the holder dies).

    The file also records who holds it (pid, host) so a waiting process can say whom it waits for.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, shared: bool = False) -> bool:
        """Take the lock if free. A shared lock in a folder this user cannot write is taken on the
        existing lock file opened read-only (its writers still exclude us); without one, the OSError
        of the refused creation is raised."""
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                if not shared or not is_read_only_error(err):
                    raise
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except FileNotFoundError:
                    raise err from None
            if not _os_lock(fd, shared):
                os.close(fd)
                return False
            # gc may have unlinked the lock file between our open and lock: then lock the new one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            _os_unlock(fd)
            os.close(fd)
        self._fd = fd
        if not shared:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return True

    def acquire(self, *, shared: bool = False, timeout: float | None = None, poll: float = 0.25,
                on_wait: Callable[[str, float], None] | None = None) -> None:
        """Block until the lock is ours; ``on_wait(holder, waited_seconds)`` is called while waiting."""
        start = time.monotonic()
        while not self.try_acquire(shared):
            waited = time.monotonic() - start
            if on_wait is not None:
                on_wait(self.holder(), waited)
            if timeout is not None and waited >= timeout:
                raise TimeoutError(f"lock {self.path} still held by {self.holder()} after {timeout:.0f} s")
            time.sleep(poll)

    def holder(self) -> str:
        with contextlib.suppress(OSError):
            text = self.path.read_text(errors="replace").strip()
            if text:
                return text
        return "another process"

    def release(self) -> None:
        if self._fd is not None:
            _os_unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:  # noqa: PYI034
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _SharedHold:
    """A shared store lock this process holds, and how many ``Store.shared`` blocks use it."""

    lock: Lock | None  # None: a read-only store read without a lock
    users: int = 0


_SHARED_HELD: dict[str, _SharedHold] = {}  # by lock file
_SHARED_GUARD = threading.Lock()


def _os_lock(fd: int, shared: bool) -> bool:
    if sys.platform == "win32":  # pragma: no cover - Windows has no shared byte-range locks here
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def _os_unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def gguf_header_digest(path: Path) -> dict[str, Any]:
    """``{"header_bytes": n, "header_sha256": hex}`` of a GGUF's header and tensor table (the bytes
    before its tensor data), or {} when ``path`` is not a GGUF file that can be read."""
    from pipx_llama.formats.gguf import open_gguf

    try:
        g = open_gguf(path)
    except PipxLlamaError:
        return {}
    try:
        n = g.data_offset
    finally:
        g.close()
    with open(path, "rb") as f:
        head = f.read(n)
    return {"header_bytes": n, "header_sha256": hashlib.sha256(head).hexdigest()}


def recorded_file_problem(path: Path, record: dict[str, Any]) -> str | None:
    """Why ``path`` is not the file ``record`` describes (its ``size``, ``header_bytes`` and
    ``header_sha256``, where recorded), or None. Reads the header and tensor table only: cheap enough
    for every load."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "it is missing"
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file (a folder?)"
    size = record.get("size")
    if isinstance(size, int) and st.st_size != size:
        return f"it has {st.st_size} bytes where {size} were recorded"
    n, digest = record.get("header_bytes"), record.get("header_sha256")
    if isinstance(n, int) and isinstance(digest, str):
        try:
            with open(path, "rb") as f:
                head = f.read(n)
        except OSError as err:
            return f"it cannot be read ({err.strerror or err})"
        if hashlib.sha256(head).hexdigest() != digest:
            return "its header or tensor table differs from the one recorded when it was verified"
    return None


def _downloaded(part: Path) -> int:
    from pipx_llama.fetch.http import partial_progress

    progress = partial_progress(part)
    if progress is not None:
        return progress[0]
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def _strerror(err: BaseException) -> str:
    while err is not None:
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        err = err.__cause__  # type: ignore[assignment]
    return "write refused"


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1))
    except (OSError, AttributeError):
        return False


# --- records ------------------------------------------------------------------------------------------------


@dataclass
class InstalledVariant:
    """A model variant folder with its provenance record (``record`` is {} when the record is missing)."""

    model: str
    variant: str
    path: Path
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.record.get("files"))

    @property
    def files(self) -> list[dict[str, Any]]:
        return list(self.record.get("files", []))

    @property
    def size(self) -> int:
        return sum(int(f.get("size") or 0) for f in self.files)

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(str(f.get("source", "?")) for f in self.files))


@dataclass
class PartialDownload:
    sha256: str
    path: Path
    size: int


@dataclass
class RemovalReport:
    """What a removal deleted (or, with ``dry_run``, would delete) and the bytes that left the disk."""

    dry_run: bool = False
    files: list[Path] = field(default_factory=list)
    freed: int = 0
    skipped: list[str] = field(default_factory=list)

    def add(self, path: Path) -> None:
        """Delete ``path`` (file or folder), counting the bytes that really leave the disk. Records go
        last: a file that cannot be deleted keeps the record that says what it is."""
        if path.is_dir() and not path.is_symlink():
            entries = list(path.rglob("*"))
            files = [p for p in entries if p.is_file() or p.is_symlink()]
            for p in sorted(files, key=lambda p: (p.name.endswith(PROVENANCE), str(p))):
                self._unlink(p)
            if not self.dry_run:
                for p in sorted((p for p in entries if p.is_dir() and not p.is_symlink()), reverse=True):
                    p.rmdir()
                path.rmdir()
        elif path.exists() or path.is_symlink():
            self._unlink(path)

    def _unlink(self, p: Path) -> None:
        st = p.lstat()
        # a hard-linked file frees its bytes only with its last name
        if st.st_nlink <= 1 or (self.dry_run and st.st_nlink <= 1 + self._names_seen(st.st_ino)):
            self.freed += st.st_size
        if not self.dry_run:
            try:
                p.unlink()
            except PermissionError as err:
                # Windows does not delete a file another program has open or mapped (ERROR_SHARING_VIOLATION,
                # ERROR_LOCK_VIOLATION); the store is not read-only for that
                if getattr(err, "winerror", None) not in (32, 33):
                    raise
                hint = "stop the `pipx-llama serve` or `run` using this model, then try again"
                raise StoreError(f"cannot remove {p}: another program has it open", hint) from None
        self.files.append(p)

    def _names_seen(self, ino: int) -> int:
        return sum(1 for q in self.files if q.exists() and q.lstat().st_ino == ino)


# --- the store ----------------------------------------------------------------------------------------------


class Store:
    """The store rooted at ``root``; ``free_space_probe(folder) -> bytes`` replaces the disk probe (tests)."""

    def __init__(self, root: Path, *, free_space_probe: Callable[[Path], int] | None = None) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.partial_dir = self.root / "partial"
        self.models_dir = self.root / "models"
        self.locks_dir = self.root / "locks"
        self.manifests_dir = self.root / "manifests"
        self._probe = free_space_probe
        self._hardlinks: bool | None = None

    def ensure(self) -> None:
        for d in (self.blobs_dir, self.partial_dir, self.models_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)

    # read-only stores
    def read_only_reason(self) -> str | None:
        """Why this user cannot change the store, or None. ``os.access`` sees permissions and read-only
        mounts (root passes the permission test, rightly: root can write); errors of actual writes are
        turned into ``StoreReadOnlyError`` by ``writing()``."""
        folder = self.root
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        dirs = [folder] + [d for d in (self.blobs_dir, self.partial_dir, self.models_dir, self.locks_dir,
                                       self.manifests_dir) if d.is_dir()]
        for d in dirs:
            if not os.access(d, os.W_OK | os.X_OK):
                return f"{d} is not writable" + (" (read-only filesystem)" if _read_only_mount(d) else "")
        return None

    def read_only_error(self, action: str, why: str) -> StoreReadOnlyError:
        return StoreReadOnlyError(
            f"cannot {action}: the store {self.root} is read-only ({why})",
            "reading works (list, verify, run); to change the store, ask whoever manages it, or point "
            "PIPX_LLAMA_HOME at a store of your own",
        )

    def check_writable(self, action: str) -> None:
        """Raise ``StoreReadOnlyError`` before anything is written if this user cannot change the store."""
        why = self.read_only_reason()
        if why is not None:
            raise self.read_only_error(action, why)

    @contextlib.contextmanager
    def writing(self, action: str) -> Iterator[None]:
        """Check that the store can be changed; turn a write refused inside it into ``StoreReadOnlyError``."""
        self.check_writable(action)
        try:
            yield
        except (OSError, PipxLlamaError) as err:
            where = self.refused_write(err)
            if where is None:
                raise
            raise self.read_only_error(action, f"{where}: {_strerror(err)}") from err

    def refused_write(self, err: BaseException | None) -> str | None:
        """The store path of a write refusal in ``err`` (or its causes), or None if it is not one."""
        root = os.path.abspath(self.root)
        while err is not None:
            if isinstance(err, OSError) and err.errno in _READ_ONLY_ERRNOS:
                for name in (err.filename, err.filename2):
                    if name is not None and os.path.abspath(os.fsdecode(name)).startswith(root + os.sep):
                        return os.fsdecode(name)
            err = err.__cause__
        return None

    # blobs and partials
    def blob_path(self, sha256: str) -> Path:
        return self.blobs_dir / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(sha256).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def partial_path(self, sha256: str) -> Path:
        return self.partial_dir / f"{sha256}.part"

    def partial_size(self, sha256: str) -> int:
        """Bytes already downloaded (parallel downloads write a sparse full-length file: ask its state)."""
        return _downloaded(self.partial_path(sha256))

    def commit_blob(self, verified: Path, sha256: str) -> Path:
        """Move a verified file (on the store's filesystem) into the blob store."""
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        dest = self.blob_path(sha256)
        if dest.is_file() and dest.stat().st_size == verified.stat().st_size:
            # same hash, same bytes: keep the existing file so the model folders' hard links stay shared
            verified.unlink()
            return dest
        os.replace(verified, dest)
        return dest

    def adopt_blob(self, src: Path, sha256: str, *, copy: bool = False,
                   on_bytes: Callable[[int], None] | None = None) -> tuple[str, str]:
        """Bring an existing file (a user's, already hashed or not) into the blob store.

        Returns (mode, actual sha256): a hard link when possible (the file is hashed in place first),
        else a copy hashed while copying. A mismatching file never enters the store.
        """
        if not copy:
            actual = sha256_file(src, on_bytes)
            if actual != sha256:
                return "mismatch", actual
            tmp = self.blobs_dir / f".{sha256}.{os.getpid()}.tmp"
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, tmp)
                os.replace(tmp, self.blob_path(sha256))
                return "link", actual
            except OSError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        part = self.partial_dir / f"{sha256}.import"
        actual, _ = copy_hashing(src, part, on_bytes)
        if actual != sha256:
            part.unlink(missing_ok=True)
            return "mismatch", actual
        self.commit_blob(part, sha256)
        return "copy", actual

    def blobs(self) -> list[Path]:
        if not self.blobs_dir.is_dir():
            return []
        return sorted(p for p in self.blobs_dir.iterdir() if len(p.name) == 64 and not p.name.startswith("."))

    def partials(self) -> list[PartialDownload]:
        if not self.partial_dir.is_dir():
            return []
        out = []
        for p in sorted(self.partial_dir.glob("*.part")):
            with contextlib.suppress(FileNotFoundError):
                out.append(PartialDownload(sha256=p.name[:-5], path=p, size=_downloaded(p)))
        return out

    # locks
    def lock(self, key: str) -> Lock:
        return Lock(self.locks_dir / f"{key}.lock")

    def blob_lock(self, sha256: str) -> Lock:
        return self.lock(sha256)

    def store_lock(self) -> Lock:
        return self.lock("store")

    # disk space
    def free_bytes(self) -> int:
        """Free bytes on the store's disk (``PIPX_LLAMA_FREE_BYTES`` pretends, for tests)."""
        if self._probe is not None:
            return self._probe(nearest_existing(self.root))
        return disk_free(self.root)

    def check_space(self, needed: int, what: str) -> None:
        """Refuse, before any byte is written, work that needs more than the free space of the store's
        disk."""
        free = self.free_bytes()
        if needed > free:
            raise DiskFullError(
                f"not enough disk space in {self.root} for {what}: need {human_bytes(needed)} "
                f"({needed} bytes), {human_bytes(free)} ({free} bytes) free",
                "free some space (pipx-llama gc removes unused files), or point PIPX_LLAMA_HOME at a bigger "
                "disk",
                folder=str(self.root),
                needed=needed,
                free=free,
            )

    def supports_hardlinks(self) -> bool:
        if self._hardlinks is None:
            self.ensure()
            a = temp_path(self.partial_dir / "linkprobe")
            b = a.with_name(a.name + ".2")
            try:
                os.link(a, b)
                self._hardlinks = True
            except OSError:
                self._hardlinks = False
            finally:
                a.unlink(missing_ok=True)
                b.unlink(missing_ok=True)
        return self._hardlinks

    # model folders
    def variant_dir(self, model: str, variant: str) -> Path:
        return self.models_dir / model / variant

    def install_file(self, model: str, variant: str, path: str, sha256: str, *, copy: bool = False) -> str:
        return link_or_copy(self.blob_path(sha256), self.variant_dir(model, variant) / path, copy=copy)

    def write_provenance(self, model: str, variant: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.variant_dir(model, variant) / PROVENANCE, record)

    def read_provenance(self, model: str, variant: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.variant_dir(model, variant) / PROVENANCE).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def installed(self, model: str | None = None) -> list[InstalledVariant]:
        if not self.models_dir.is_dir():
            return []
        out = []
        for mdir in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
            if model is not None and mdir.name != model:
                continue
            for vdir in sorted(p for p in mdir.iterdir() if p.is_dir()):
                record = self.read_provenance(mdir.name, vdir.name) or {}
                out.append(InstalledVariant(mdir.name, vdir.name, vdir, record))
        return out

    def referenced_blobs(self) -> set[str]:
        return {str(f.get("sha256")) for iv in self.installed() for f in iv.files}

    # removal
    @contextlib.contextmanager
    def exclusive(self, on_wait: Callable[[str, float], None] | None = None,
                  timeout: float | None = None, *, action: str = "change the store") -> Iterator[None]:
        """Hold the store lock exclusively: no pull, import or install runs meanwhile. A store this user
        cannot change raises ``StoreReadOnlyError`` (naming ``action``) before anything is touched."""
        with self.writing(action):
            lock = self.store_lock()
            lock.acquire(on_wait=on_wait, timeout=timeout)
            try:
                yield
            finally:
                lock.release()

    @contextlib.contextmanager
    def shared(self, on_wait: Callable[[str, float], None] | None = None, *,
               read_only_ok: bool = False) -> Iterator[None]:
        """Hold the store lock shared: no gc or rm runs meanwhile. With ``read_only_ok``, a store this user
        cannot write whose writers never made a lock file is read without a lock (nobody changes it).

        Re-entrant within a process: preparing a model holds it around the pull, which takes it too, and
        on Windows (whose byte-range locks are exclusive, per handle) a second handle would wait for the
        first forever."""
        key = os.path.abspath(self.store_lock().path)
        with _SHARED_GUARD:
            held = _SHARED_HELD.get(key)
            if held is None:
                lock: Lock | None = self.store_lock()
                try:
                    lock.acquire(shared=True, on_wait=on_wait)  # type: ignore[union-attr]
                except OSError as err:
                    if not (read_only_ok and is_read_only_error(err)):
                        raise
                    lock = None
                held = _SHARED_HELD[key] = _SharedHold(lock)
            held.users += 1
        try:
            yield
        finally:
            with _SHARED_GUARD:
                held.users -= 1
                if held.users == 0:
                    del _SHARED_HELD[key]
                    if held.lock is not None:
                        held.lock.release()

    def remove_model(self, model: str, variant: str | None = None, *, keep_blobs: bool = False,
                     extra_partials: set[str] = frozenset()) -> RemovalReport:
        """Delete a model's folder(s), its partial downloads and (unless kept) blobs nothing else uses.

        The caller holds the store lock exclusively.
        """
        report = RemovalReport()
        targets = [iv for iv in self.installed(model) if variant is None or iv.variant == variant]
        hashes = {str(f.get("sha256")) for iv in targets for f in iv.files} | set(extra_partials)
        for iv in targets:
            report.add(iv.path)
        mdir = self.models_dir / model
        if mdir.is_dir() and not any(mdir.iterdir()):
            mdir.rmdir()
        self._remove_partials(hashes, report)
        if not keep_blobs:
            still = self.referenced_blobs()
            for h in sorted(hashes - still):
                report.add(self.blob_path(h))
        return report

    def _remove_partials(self, hashes: set[str] | None, report: RemovalReport) -> None:
        if not self.partial_dir.is_dir():
            return
        for p in sorted(self.partial_dir.iterdir()):
            key = p.name.split(".", 1)[0]
            if p.name.startswith("pip-"):
                key = None  # wheel workspaces belong to no single file
            if hashes is not None and key not in hashes:
                continue
            if key is not None:
                lock = self.blob_lock(key)
                if not lock.try_acquire():
                    report.skipped.append(f"{p.name} (being downloaded by {lock.holder()})")
                    continue
                lock.release()
            report.add(p)

    def gc(self, *, dry_run: bool = False) -> RemovalReport:
        """Remove blobs no model references, every partial download, and stale temporary files.

        The caller holds the store lock exclusively.
        """
        report = RemovalReport(dry_run=dry_run)
        keep = self.referenced_blobs()
        for blob in self.blobs():
            if blob.name not in keep:
                report.add(blob)
        if self.blobs_dir.is_dir():
            for tmp in self.blobs_dir.glob(".*.tmp"):
                report.add(tmp)
        self._remove_partials(None, report)
        if self.locks_dir.is_dir() and not dry_run:
            for lk in self.locks_dir.glob("*.lock"):
                if lk.name == "store.lock":
                    continue
                lock = Lock(lk)
                if lock.try_acquire():
                    with contextlib.suppress(OSError):
                        lk.unlink()
                    lock.release()
        return report
