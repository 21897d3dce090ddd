"""Writing a file so that a crash leaves the old file or the new one, and a full disk says so.

``atomic_output(path)`` yields a temporary path beside ``path`` (a hidden name ending in ``.tmp``,
so a folder's leftovers of a killed writer can be found by that pattern). When the block ends
normally the temporary file's data reaches the disk (fsync), it is renamed over ``path``, and the
rename itself is made durable (fsync of the folder, where the OS allows it). On any exception it is
removed. Every writer of model files uses it: the converter, the quantizer and the store.

A full disk (``ENOSPC``, or a full quota ``EDQUOT``) while writing is a ``DiskFullError`` naming the
folder and what it has free, the same error (and exit code) as the up-front checks give.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipx_llama.errors import DiskFullError
from pipx_llama.system import disk_free
from pipx_llama.units import human_bytes

_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is an OSError saying the disk (or the user's quota) is full."""
    return isinstance(err, OSError) and err.errno in _DISK_FULL


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk holding ``folder`` (0 when that cannot be asked; ``PIPX_LLAMA_FREE_BYTES``
    pretends, for tests: see :func:`pipx_llama.system.disk_free`)."""
    return disk_free(folder)


def disk_full_error(
    folder: Path, what: str, needed: int | None = None, err: OSError | None = None
) -> DiskFullError:
    """The one ``DiskFullError`` for "``what`` does not fit in ``folder``" (before or while writing)."""
    free = free_bytes(folder)
    need = f"it needs {human_bytes(needed)}, " if needed is not None else ""
    cause = f" ({err.strerror})" if err is not None and err.strerror else ""
    return DiskFullError(
        f"not enough disk space in {folder} for {what}{cause}: {need}{human_bytes(free)} free",
        "free some disk space (pipx-llama gc removes unused files) or write elsewhere, then "
        "run the same command again",
        folder=str(folder),
        needed=needed,
        free=free,
    )


def check_free(folder: Path, needed: int, what: str) -> None:
    """Raise ``DiskFullError`` before writing when ``needed`` bytes do not fit in ``folder``."""
    if free_bytes(folder) < needed:
        raise disk_full_error(folder, what, needed)


def current_umask() -> int:
    """The process's umask: read from /proc on Linux (no side effect); elsewhere set and restored once
    and remembered (a process does not change it)."""
    global _PROBED_UMASK
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    if _PROBED_UMASK is None:
        _PROBED_UMASK = os.umask(0o022)
        os.umask(_PROBED_UMASK)
    return _PROBED_UMASK


_PROBED_UMASK: int | None = None


def new_temp(path: Path) -> tuple[int, Path]:
    """(open descriptor, path) of a new, empty, uniquely named hidden file beside ``path``
    (``.<name>.<random>.tmp``) with the permissions any new file gets there.

    ``mkstemp`` makes it readable by its owner only (0600), and a rename keeps that; so the file gets
    0666 less the umask, as llama-quantize's, ollama's and pip's files do: a model store that an
    administrator provisions for a lab is readable by the students' accounts. (Windows: mkstemp's
    files take the folder's ACL already.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if os.name != "nt":
        # a courtesy, not a condition: FAT and exFAT drives, some network shares, refuse any chmod (EPERM)
        # and keep their mount's permissions; the file is written all the same
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666 & ~current_umask())
    return fd, Path(tmp)


def temp_path(path: Path) -> Path:
    """A new, empty, uniquely named hidden file beside ``path`` (see ``new_temp``)."""
    fd, tmp = new_temp(path)
    os.close(fd)
    return tmp


def fsync_path(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to the disk; folders only where the OS allows it.

    A file is opened for writing: Windows flushes only a handle that may write (``FlushFileBuffers``;
    ``os.fsync`` on a read-only one fails with EBADF)."""
    if path.is_dir():
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    else:
        flags = os.O_RDWR | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():
            return  # Windows cannot open a folder: its renames are durable without it
        raise
    try:
        with contextlib.suppress(OSError) if path.is_dir() else contextlib.nullcontext():
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path, what: str | None = None) -> Iterator[Path]:
    """Write ``path`` through a temporary file (see the module docstring); ``what`` names it in errors."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full_error(path.parent, what or path.name, err=err) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see ``atomic_output``)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written like ``atomic_write_bytes``."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
