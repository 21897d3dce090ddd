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
