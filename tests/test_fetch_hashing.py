"""The streaming sha256 (fetch/hashing.py): from memory when it can, read back when it must."""

from __future__ import annotations

import time

import pytest
from httpserver import FileServer
from test_fetch_http import MB, blob, opts, sha

from pipx_llama.fetch import hashing as fetch_hashing
from pipx_llama.fetch import receive as fetch_receive
from pipx_llama.fetch.errors import ChecksumError
from pipx_llama.fetch.http import download


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


# ---- hashing


def counting_read_back(monkeypatch) -> list[int]:
    """Record how many bytes the hasher reads back from the file (instead of hashing them from memory)."""
    read_back = fetch_hashing.Hasher._read_back
    counts: list[int] = []

    def counting(self, f, buf, target, *, interruptible):
        before = self.pos
        read_back(self, f, buf, target, interruptible=interruptible)
        counts.append(self.pos - before)

    monkeypatch.setattr(fetch_hashing.Hasher, "_read_back", counting)
    return counts


def test_single_stream_is_hashed_from_memory(server, tmp_path, monkeypatch):
    read_back = counting_read_back(monkeypatch)
    data = blob(8 * MB, 26)
    url = server.put("/mem", data)
    download(url, tmp_path / "mem.part", size=len(data), sha256=sha(data), options=opts())
    assert sum(read_back) == 0


@pytest.mark.parametrize("parallel", [False, True])
def test_hasher_far_behind_reads_back_what_it_skipped(server, tmp_path, monkeypatch, parallel):
    # a hasher too far behind the writer skips offered blocks and hashes those bytes from the file
    monkeypatch.setattr(fetch_hashing, "_HASH_QUEUE", 1)
    monkeypatch.setattr(fetch_hashing, "_HASH_LAG_MAX", 128 * 1024)
    monkeypatch.setattr(fetch_receive, "_WRITE_BLOCK", 64 * 1024)
    update = fetch_hashing.Hasher._update
    read_back_bytes = counting_read_back(monkeypatch)

    def slow_update(self, chunks, skip):
        time.sleep(0.002)
        update(self, chunks, skip)

    monkeypatch.setattr(fetch_hashing.Hasher, "_update", slow_update)
    data = blob(6 * MB, 24)
    url = server.put("/lag", data)
    o = opts(parallel_parts=3, part_threshold=MB) if parallel else opts()
    download(url, tmp_path / "lag.part", size=len(data), sha256=sha(data), options=o)
    assert (tmp_path / "lag.part").read_bytes() == data
    assert 0 < sum(read_back_bytes) < len(data), "hashed partly from memory, partly read back"
    server.faults("/lag").corrupt_at = 4 * MB + 3
    with pytest.raises(ChecksumError):
        download(url, tmp_path / "lag2.part", size=len(data), sha256=sha(data), options=o)
