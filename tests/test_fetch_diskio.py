"""Disk I/O of a download (fetch/diskio.py): pwritev without copies, its fallbacks."""

from __future__ import annotations

import os

import pytest
from httpserver import FileServer
from test_fetch_http import MB, blob, opts, sha

from pipx_llama.fetch import diskio as fetch_diskio
from pipx_llama.fetch.http import download


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


# ---- writes


def test_without_pwrite_the_seek_write_fallback_works(server, tmp_path, monkeypatch):
    monkeypatch.delattr(os, "pwritev", raising=False)
    monkeypatch.delattr(os, "pwrite")
    monkeypatch.delattr(os, "fdatasync", raising=False)
    data = blob(6 * MB, 21)
    url = server.put("/w", data)
    download(url, tmp_path / "w.part", size=len(data), sha256=sha(data),
             options=opts(parallel_parts=3, part_threshold=MB))
    assert (tmp_path / "w.part").read_bytes() == data


@pytest.mark.skipif(not hasattr(os, "pwritev"), reason="os.pwritev is not available on this platform")
def test_write_chunks_splits_iovecs_and_continues_short_writes(tmp_path, monkeypatch):
    chunks = [bytes([i % 251]) * (1 + i % 7) for i in range(3000)]   # more buffers than IOV_MAX
    chunks[5] = memoryview(chunks[5])
    real_pwrite = os.pwrite
    sizes = []

    def short_pwritev(fd, bufs, offset):
        sizes.append(len(bufs))
        assert len(bufs) <= fetch_diskio._IOV_MAX
        data = b"".join(bufs)
        return real_pwrite(fd, data[:len(data) // 2 + 1], offset)   # stops inside a buffer

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    path = tmp_path / "w"
    path.write_bytes(b"#" * 5)
    fd = os.open(path, os.O_WRONLY)
    try:
        fetch_diskio._write_chunks(fd, chunks, 5)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"#" * 5 + b"".join(chunks)
    assert max(sizes) == fetch_diskio._IOV_MAX and len(sizes) > 3
