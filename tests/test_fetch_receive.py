"""The receiving threads (fetch/receive.py): servers that ignore Range, cut responses short or answer
shorter ranges, and the connection's wide reads."""

from __future__ import annotations

import httpx
import pytest
from httpserver import FileServer
from test_fetch_http import MB, Events, blob, opts, ranges_requested, sha

from pipx_llama.fetch import receive as fetch_receive
from pipx_llama.fetch.errors import NetworkError
from pipx_llama.fetch.http import download


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


# ---- servers and their ranges


@pytest.mark.parametrize("parallel", [False, True])
def test_server_answering_shorter_ranges_than_asked(server, tmp_path, parallel):
    data = blob(6 * MB, 4)
    url = server.put("/short.bin", data)
    server.faults("/short.bin").max_range = 700 * 1024
    ev = Events()
    o = opts(parallel_parts=4, part_threshold=MB, min_part=256 * 1024) if parallel else opts()
    download(url, tmp_path / "sh.part", size=len(data), sha256=sha(data), options=o, on_event=ev)
    assert (tmp_path / "sh.part").read_bytes() == data
    assert not ev.of("retry") and not ev.of("restart")  # each short answer is continued, not retried
    assert server.bytes_sent == len(data)
    assert len(ranges_requested(server, "/short.bin")) >= len(data) // (700 * 1024)


def test_server_ignoring_range(server, tmp_path):
    data = blob(6 * MB, 14)
    url = server.put("/nr", data)
    server.faults("/nr").ignore_range = True
    # a fresh parallel-sized download falls back to one stream
    download(url, tmp_path / "a.part", size=len(data), sha256=sha(data), options=opts(part_threshold=MB))
    assert (tmp_path / "a.part").read_bytes() == data
    assert len(server.requests) == 1
    # a broken connection to such a server starts over from byte 0 (it cannot resume)
    server.faults("/nr").drop_after = 2 * MB
    ev = Events()
    download(url, tmp_path / "b.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "b.part").read_bytes() == data
    # asked for the rest with a Range first, which it ignored too
    assert "starting over" in ev.of("retry")[1].message
    # a partial from a server that did honour Range, resumed after it stopped doing so
    server.faults("/nr").ignore_range = False
    server.faults("/nr").drop_times = 1
    with pytest.raises(NetworkError):
        download(url, tmp_path / "c.part", size=len(data), sha256=sha(data), options=opts(max_retries=0))
    server.faults("/nr").ignore_range = True
    ev = Events()
    download(url, tmp_path / "c.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "c.part").read_bytes() == data
    assert "ignored the Range" in ev.of("restart")[0].message


@pytest.mark.parametrize("parallel", [False, True])
def test_server_cutting_every_response_short_still_completes(server, tmp_path, parallel):
    data = blob(12 * MB, 28)
    url = server.put("/cut", data)
    server.faults("/cut").drop_after = 700 * 1024
    server.faults("/cut").drop_times = -1
    ev = Events()
    parts = {"parallel_parts": 3, "part_threshold": MB, "min_part": MB} if parallel else {}
    o = opts(max_retries=2, **parts)
    download(url, tmp_path / "c.part", size=len(data), sha256=sha(data), options=o, on_event=ev)
    assert (tmp_path / "c.part").read_bytes() == data
    assert len(ev.of("retry")) >= 12 and all("continuing" in e.message for e in ev.of("retry"))
    assert server.bytes_sent == len(data), "every byte sent once: each cut is continued where it stopped"


def test_whole_file_answered_200_then_cut_continues_with_a_range(server, tmp_path):
    data = blob(10 * MB, 29)
    url = server.put("/w", data)
    server.faults("/w").whole_range_as_200 = True
    server.faults("/w").drop_after = 3 * MB
    server.faults("/w").drop_times = -1
    dest = tmp_path / "w.part"
    download(url, dest, size=len(data), sha256=sha(data), options=opts(max_retries=1))
    assert dest.read_bytes() == data
    assert server.bytes_sent == len(data), "nothing fetched twice, nothing started over"
    assert ranges_requested(server, "/w")[:2] == ["bytes=0-", f"bytes={3 * MB}-{len(data) - 1}"]


# ---- blocks and reads


def test_connection_reads_are_widened_once():
    class Stream:
        def __init__(self) -> None:
            self.asked: list[int] = []

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            self.asked.append(max_bytes)
            return b""

    stream = Stream()
    resp = httpx.Response(200, extensions={"network_stream": stream})
    fetch_receive._widen_reads(resp)
    fetch_receive._widen_reads(resp)
    stream.read(64 * 1024)
    stream.read(4 * MB, 1.0)
    assert stream.asked == [fetch_receive._READ_SIZE, 4 * MB]
    fetch_receive._widen_reads(httpx.Response(200))   # no network stream: nothing to widen


def test_slow_connection_shows_progress_before_a_write_block_fills(server, tmp_path):
    data = blob(MB, 25)
    url = server.put("/trickle", data)
    server.faults("/trickle").rate = MB   # 1 MiB/s: a whole write block would take two seconds
    ev = Events()
    download(url, tmp_path / "t.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "t.part").read_bytes() == data
    assert len({e.done for e in ev.of("progress") if 0 < e.done < len(data)}) >= 2
