"""The resume state (fetch/resume.py): a later call continues what an earlier one left, and only that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from httpserver import FileServer
from test_fetch_http import MB, Events, blob, opts, sha, state_of

from pipx_llama.events import ProgressEvent
from pipx_llama.fetch.errors import NetworkError
from pipx_llama.fetch.http import download, partial_progress


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


# ---- resuming across calls


def test_resume_across_calls_uses_if_range(server, tmp_path):
    data = blob(4 * MB, 8)
    url = server.put("/r", data)
    dest = tmp_path / "r.part"
    server.faults("/r").drop_after = 1536 * 1024
    with pytest.raises(NetworkError):
        download(url, dest, size=len(data), sha256=sha(data), options=opts(max_retries=0))
    assert partial_progress(dest) == (1536 * 1024, len(data))
    st = state_of(dest)
    assert st["url"] == url and st["sha256"] == sha(data) and st["etag"] == server._resources["/r"].etag
    server.reset_counters()
    ev = Events()
    download(url, dest, size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert dest.read_bytes() == data
    assert ev.of("start")[0].done == 1536 * 1024 and "resuming" in ev.of("start")[0].message
    (_, _, h), = server.requests
    assert h["Range"] == f"bytes={1536 * 1024}-{len(data) - 1}" and h["If-Range"] == st["etag"]
    assert server.bytes_sent == len(data) - 1536 * 1024
    assert partial_progress(dest) is None


def test_parallel_resume_across_calls(server, tmp_path):
    data = blob(8 * MB, 9)
    url = server.put("/pr", data)
    dest = tmp_path / "pr.part"
    o = opts(parallel_parts=4, part_threshold=MB, max_retries=0)
    server.faults("/pr").drop_after = 1200 * 1024
    server.faults("/pr").drop_times = -1
    with pytest.raises(NetworkError):
        download(url, dest, size=len(data), sha256=sha(data), options=o)
    done, total = partial_progress(dest)
    assert total == len(data) and done > 0
    server.faults("/pr").drop_after = None
    download(url, dest, size=len(data), sha256=sha(data), options=opts(parallel_parts=4, part_threshold=MB))
    assert dest.read_bytes() == data
    # both calls together: what other parts had in flight when the first call gave up, at most
    assert server.bytes_sent <= len(data) + 4 * 2 * MB


def test_a_switch_to_last_modified_is_kept_for_the_resume(server, tmp_path):
    data = blob(8 * MB, 31)
    url = server.put("/lb2", data)
    server.faults("/lb2").etag_per_response = True
    server.faults("/lb2").rate = 2 * MB
    dest = tmp_path / "lb2.part"
    o = opts(parallel_parts=4, part_threshold=MB, min_part=MB)

    def stop_midway(ev: ProgressEvent) -> None:
        if ev.kind == "progress" and ev.done >= 2 * MB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(url, dest, size=len(data), sha256=sha(data), options=o, on_event=stop_midway)
    assert state_of(dest)["validators"] == "last-modified" and state_of(dest)["etag"] is None
    done, _ = partial_progress(dest)
    server.faults("/lb2").rate = None
    ev = Events()
    download(url, dest, size=len(data), sha256=sha(data), options=o, on_event=ev)
    assert dest.read_bytes() == data
    assert "restart" not in ev.kinds() and ev.of("start")[0].done == done > 0


# ---- states that are not trusted


def test_finished_file_without_state_is_verified_not_refetched(server, tmp_path):
    data = blob(MB, 19)
    url = server.put("/done", data)
    dest = tmp_path / "done.part"
    dest.write_bytes(data)
    ev = Events()
    download(url, dest, size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert server.requests == [] and ev.kinds() == ["verified", "done"]
    dest.write_bytes(data[:-1] + b"\0")   # same size, wrong bytes: discarded and fetched again
    download(url, dest, size=len(data), sha256=sha(data), options=opts())
    assert dest.read_bytes() == data and len(server.requests) == 1


def test_state_of_another_file_is_discarded(server, tmp_path):
    data = blob(MB, 20)
    url = server.put("/f", data)
    dest = tmp_path / "f.part"
    dest.write_bytes(b"x" * 1000)
    Path(str(dest) + ".json").write_text(json.dumps({"version": 1, "sha256": "1" * 64, "size": len(data)}))
    download(url, dest, size=len(data), sha256=sha(data), options=opts())
    assert dest.read_bytes() == data


# ---- the spare state file (a save on a full disk)


def test_the_newer_of_state_and_spare_is_resumed_and_a_torn_spare_is_not(server, tmp_path):
    """A state saved into the spare (the disk was full) is newer than the state file: the next call
    resumes from it. A spare torn by a crash is not JSON: the state file's older, smaller count is used."""
    from pipx_llama.fetch.resume import SPARE_BYTES, save_spare, spare_path, state_path

    data = blob(4 * MB, 9)
    url = server.put("/r", data)
    dest = tmp_path / "r.part"
    server.faults("/r").drop_after = MB
    with pytest.raises(NetworkError):
        download(url, dest, size=len(data), sha256=sha(data), options=opts(max_retries=0))
    assert spare_path(dest).stat().st_size == SPARE_BYTES
    st = state_of(dest)
    st["parts"][0][2] = MB // 2  # what an earlier save recorded
    state_path(dest).write_text(json.dumps(st))
    newer = dict(st, parts=[[0, st["parts"][0][1], MB]], updated=st["updated"] + 1)
    assert save_spare(dest, newer) and spare_path(dest).stat().st_size == SPARE_BYTES
    assert partial_progress(dest) == (MB, len(data))
    with open(spare_path(dest), "r+b") as f:
        f.write(b'{"updated": 1e12, "parts": [[0, 9')  # a crash in the middle of the spare's next write
    assert partial_progress(dest) == (MB // 2, len(data))
    server.reset_counters()
    ev = Events()
    download(url, dest, size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert dest.read_bytes() == data and ev.of("start")[0].done == MB // 2
    assert not spare_path(dest).exists() and not state_path(dest).exists()


def test_the_spare_never_grows(tmp_path):
    from pipx_llama.fetch.resume import SPARE_BYTES, reserve_spare, save_spare, spare_path

    dest = tmp_path / "r.part"
    assert not save_spare(dest, {"updated": 1.0})  # no spare: nothing to write into
    reserve_spare(dest)
    assert not save_spare(dest, {"updated": 1.0, "pad": "x" * SPARE_BYTES})
    assert spare_path(dest).stat().st_size == SPARE_BYTES
    assert save_spare(dest, {"updated": 2.0}) and spare_path(dest).stat().st_size == SPARE_BYTES
    assert json.loads(spare_path(dest).read_bytes()) == {"updated": 2.0}
