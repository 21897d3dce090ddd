"""Making a folder read-only for the running test process, whoever runs it.

An ordinary user gets ``chmod -R a-w`` (restored afterwards). Root is not stopped by permissions, so
root gets what a shared lab install often is: a read-only bind mount of the folder onto itself
(Linux). Where neither is possible the test is skipped with the reason printed.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def _skip(reason: str) -> None:
    print(f"\nSKIP: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """While in the block, nothing under ``folder`` can be created, written, renamed or deleted."""
    if sys.platform == "win32":
        _skip("Windows folders cannot be made read-only for their owner")
    if os.geteuid() == 0:
        with _read_only_mount(folder):
            _check(folder)
            yield
    else:
        with _read_only_modes(folder):
            _check(folder)
            yield


@contextlib.contextmanager
def _read_only_mount(folder: Path) -> Iterator[None]:
    if sys.platform != "linux":
        _skip("root is not stopped by permissions, and read-only bind mounts need Linux")
    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        _skip(f"cannot bind-mount {folder}: {done.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, text=True,
                            check=False)
        if ro.returncode != 0:
            _skip(f"cannot make the bind mount read-only: {ro.stderr.strip()}")
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextlib.contextmanager
def _read_only_modes(folder: Path) -> Iterator[None]:
    modes = {p: p.lstat().st_mode for p in [folder, *folder.rglob("*")] if not p.is_symlink()}
    try:
        for p, mode in sorted(modes.items(), key=lambda kv: -len(kv[0].parts)):
            p.chmod(stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        yield
    finally:
        for p, mode in sorted(modes.items(), key=lambda kv: len(kv[0].parts)):
            with contextlib.suppress(FileNotFoundError):
                p.chmod(stat.S_IMODE(mode))


def _check(folder: Path) -> None:
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return
    (folder / ".probe").unlink()
    _skip(f"{folder} could not be made read-only")
