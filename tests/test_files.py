"""Atomic, durable writes: the flush asks for what every OS needs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipx_llama import files


def _record_open(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    real = os.open

    def spy(path, flags, *args, **kwargs):
        seen.append(flags)
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", spy)
    return seen


def test_a_file_is_flushed_through_a_handle_that_may_write(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows' FlushFileBuffers refuses a read-only handle (os.fsync raises EBADF there)
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    seen = _record_open(monkeypatch)
    files.fsync_path(f)
    assert len(seen) == 1 and seen[0] & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR) == os.O_RDWR


def test_atomic_output_flushes_and_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "model.gguf"
    seen = _record_open(monkeypatch)
    with files.atomic_output(target) as tmp:
        tmp.write_bytes(b"weights")
        assert not target.exists()
    assert target.read_bytes() == b"weights"
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]
    assert any(flags & os.O_RDWR for flags in seen)  # the temporary file, before its rename


def test_atomic_output_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError), files.atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_finished_files_get_the_mode_the_umask_gives(tmp_path: Path, umask: int) -> None:
    """mkstemp's 0600 must not survive the rename: a store provisioned by one account is read by others."""
    old = os.umask(umask)
    try:
        assert files.current_umask() == umask or not Path("/proc/self/status").exists()
        files.atomic_write_bytes(tmp_path / "model.gguf", b"GGUF")
        fd, tmp = files.new_temp(tmp_path / "blob")
        os.close(fd)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (tmp_path / "model.gguf").stat().st_mode & 0o777 == expected
    assert tmp.stat().st_mode & 0o777 == expected
    assert tmp.name.startswith(".blob.") and tmp.name.endswith(".tmp")


def test_the_umask_is_read_without_changing_it() -> None:
    before = os.umask(0o027)
    try:
        if Path("/proc/self/status").exists():
            assert files.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what it was set to
    finally:
        os.umask(before)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_a_folder_that_refuses_chmod_still_gets_the_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """FAT/exFAT mounts answer any chmod with EPERM: the write goes on with the mount's permissions."""
    def refuse(fd: int, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    files.atomic_write_bytes(tmp_path / "model.gguf", b"GGUF")
    assert (tmp_path / "model.gguf").read_bytes() == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
