"""download() against the real threaded test server (tests/httpserver.py) on 127.0.0.1, with injected
faults."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import threading
import time
from pathlib import Path

import pytest
from httpserver import FileServer

from pipx_llama.errors import FetchError
from pipx_llama.events import ProgressEvent
from pipx_llama.fetch import http as fetch_http
from pipx_llama.fetch import receive as fetch_receive
from pipx_llama.fetch.errors import ChecksumError, NetworkError, OfflineError, SourceNotFound
from pipx_llama.fetch.http import FetchOptions, download, partial_progress

MB = 1 << 20


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def opts(**kw: object) -> FetchOptions:
    """Options with test-sized timings: tiny backoff, quick stall detection, frequent checkpoints."""
    base: dict[str, object] = {"backoff_base": 0.01, "backoff_max": 2.0, "stall_timeout": 5.0, "timeout": 5.0,
                               "checkpoint_interval": 0.2, "max_retries": 3}
    base.update(kw)
    return FetchOptions(**base)  # type: ignore[arg-type]


class Events(list):
    def __call__(self, ev: ProgressEvent) -> None:
        self.append(ev)

    def kinds(self) -> list[str]:
        return [e.kind for e in self if e.kind != "progress"]

    def of(self, kind: str) -> list[ProgressEvent]:
        return [e for e in self if e.kind == kind]


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


def ranges_requested(srv: FileServer, path: str) -> list[str | None]:
    return [h.get("Range") for m, p, h in srv.requests if p == path]


def state_of(dest: Path) -> dict:
    return json.loads(Path(str(dest) + ".json").read_text())


# ---- plain downloads


def test_single_stream_download_verifies_and_reports(server, tmp_path):
    data = blob(3 * MB)
    url = server.put("/m.bin", data)
    dest = tmp_path / "partial" / "m.part"
    ev = Events()
    download(url, dest, size=len(data), sha256=sha(data), options=opts(), on_event=ev, label="m.bin")
    assert dest.read_bytes() == data
    assert not Path(str(dest) + ".json").exists()
    assert ev.kinds() == ["start", "verified", "done"]
    assert all(e.file == "m.bin" for e in ev)
    assert ev.of("done")[0].done == len(data)
    assert server.bytes_sent == len(data)
    assert ranges_requested(server, "/m.bin") == ["bytes=0-"]


def test_parallel_parts_cover_the_file_once(server, tmp_path):
    data = blob(12 * MB, 1)
    url = server.put("/big.bin", data)
    dest = tmp_path / "big.part"
    download(url, dest, size=len(data), sha256=sha(data),
             options=opts(parallel_parts=4, part_threshold=4 * MB, min_part=MB))
    assert dest.read_bytes() == data
    rngs = ranges_requested(server, "/big.bin")
    # the first part is asked for in spans (2 x min_part at first), so it can be split above its span
    assert rngs[0] == f"bytes=0-{2 * MB - 1}"
    assert len(rngs) >= 4
    # only a straggler taken over (silent for seconds: not here) has bytes asked for twice
    assert server.bytes_requested_twice("/big.bin") == 0
    assert server.bytes_sent == len(data)


def test_a_split_never_wastes_what_the_server_already_sent(server, tmp_path):
    """Each connection asks for spans; a part is split above the open span, so nothing is thrown away."""
    data = blob(48 * MB, 3)
    url = server.put("/split.bin", data)
    server.faults("/split.bin").stall_after = 256 * 1024  # the first response (part 0) pauses a second
    server.faults("/split.bin").stall_for = 1.0
    ev = Events()
    download(url, tmp_path / "s.part", size=len(data), sha256=sha(data), on_event=ev,
             options=opts(parallel_parts=4, part_threshold=4 * MB, min_part=MB, straggler_after=30))
    assert (tmp_path / "s.part").read_bytes() == data
    assert not ev.of("retry") and not ev.of("restart")  # a finished span is not a failed attempt
    rngs = ranges_requested(server, "/split.bin")
    assert rngs[0] == f"bytes=0-{2 * MB - 1}"
    # the three other parts end while part 0 waits: their connections split its rest above byte 2 MiB
    starts = sorted(int(r.split("=")[1].split("-")[0]) for r in rngs)
    assert len([s for s in starts if 2 * MB <= s < 12 * MB]) >= 2, rngs
    assert server.bytes_requested_twice("/split.bin") == 0
    assert server.bytes_sent == len(data)


def test_empty_file_and_unknown_size(server, tmp_path):
    url = server.put("/empty", b"")
    download(url, tmp_path / "e.part", size=0, sha256=sha(b""), options=opts())
    assert (tmp_path / "e.part").read_bytes() == b""
    data = blob(MB + 123, 2)
    url = server.put("/chunked", data)
    server.faults("/chunked").chunked = True
    server.faults("/chunked").ignore_range = True
    ev = Events()
    download(url, tmp_path / "c.part", size=None, sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "c.part").read_bytes() == data
    assert ev.of("start")[0].total is None


# ---- refusals before any network use


def test_offline_refuses_before_network(server, tmp_path):
    data = blob(1000)
    url = server.put("/o", data)
    with pytest.raises(OfflineError) as err:
        download(
            url, tmp_path / "sub" / "o.part", size=len(data), sha256=sha(data), options=opts(offline=True)
        )
    assert "offline" in err.value.message
    assert server.requests == []
    assert not (tmp_path / "sub").exists()


# ---- broken connections, stalls, resume


def test_dropped_connections_resume_in_place(server, tmp_path):
    data = blob(6 * MB, 7)
    url = server.put("/drop", data)
    server.faults("/drop").drop_after = 1536 * 1024
    server.faults("/drop").drop_times = 3
    ev = Events()
    download(url, tmp_path / "d.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "d.part").read_bytes() == data
    assert len(ev.of("retry")) == 3
    assert server.bytes_sent == len(data), "every byte received before a drop is kept"
    assert ranges_requested(server, "/drop")[1] == f"bytes={1536 * 1024}-{len(data) - 1}"


def test_stalled_connection_is_retried(server, tmp_path):
    data = blob(2 * MB, 15)
    url = server.put("/stall", data)
    server.faults("/stall").stall_after = 256 * 1024
    server.faults("/stall").stall_for = 30
    ev = Events()
    t0 = time.monotonic()
    download(
        url,
        tmp_path / "s.part",
        size=len(data),
        sha256=sha(data),
        options=opts(stall_timeout=0.5),
        on_event=ev,
    )
    assert time.monotonic() - t0 < 5
    assert (tmp_path / "s.part").read_bytes() == data
    assert "stalled" in ev.of("retry")[0].message


def test_straggling_part_is_taken_over(server, tmp_path):
    data = blob(8 * MB, 16)
    url = server.put("/strag", data)
    server.faults("/strag").stall_after = 64 * 1024   # the first response (part 0) hangs
    server.faults("/strag").stall_for = 30
    ev = Events()
    t0 = time.monotonic()
    download(url, tmp_path / "s.part", size=len(data), sha256=sha(data), on_event=ev,
             options=opts(parallel_parts=4, part_threshold=MB, min_part=256 * 1024, stall_timeout=20,
                          straggler_after=0.5))
    assert time.monotonic() - t0 < 6, "finished long before the 20 s stall timeout"
    assert (tmp_path / "s.part").read_bytes() == data
    assert not ev.of("retry")


# ---- verification


@pytest.mark.parametrize("parallel", [False, True])
def test_flipped_byte_gives_checksum_error_and_deletes(server, tmp_path, parallel):
    data = blob(5 * MB, 17)
    url = server.put("/bad", data)
    server.faults("/bad").corrupt_at = 3 * MB + 17
    bad = bytearray(data)
    bad[3 * MB + 17] ^= 0xFF
    dest = tmp_path / "bad.part"
    o = opts(parallel_parts=4, part_threshold=MB) if parallel else opts()
    with pytest.raises(ChecksumError) as err:
        download(url, dest, size=len(data), sha256=sha(data), options=o, label="model.gguf")
    e = err.value
    assert (e.file, e.source, e.expected, e.actual) == ("model.gguf", url, sha(data), sha(bytes(bad)))
    assert "model.gguf" in e.message and url in e.message and sha(data) in e.message and e.actual in e.message
    assert not dest.exists() and not Path(str(dest) + ".json").exists()


def test_wrong_size_at_source_fails_before_downloading(server, tmp_path):
    data = blob(2 * MB, 18)
    url = server.put("/size", data)
    with pytest.raises(ChecksumError) as err:
        download(url, tmp_path / "z.part", size=len(data) + 1, sha256=sha(data), options=opts())
    assert "size mismatch" in err.value.message and "nothing was downloaded" in err.value.message
    assert not (tmp_path / "z.part").exists()


def test_progress_events_and_json():
    ev = ProgressEvent("progress", "a/b.gguf", done=10, total=100, speed=1234.5678, eta=3.14159, source="s")
    assert ev.to_json() == {"kind": "progress", "file": "a/b.gguf", "done": 10, "total": 100, "speed": 1234.6,
                            "eta": 3.1, "source": "s", "message": None}
    json.dumps(ev.to_json())


def test_progress_events_carry_speed_and_eta(server, tmp_path):
    data = blob(3 * MB, 22)
    url = server.put("/slow", data)
    server.faults("/slow").rate = 3 * MB
    ev = Events()
    download(url, tmp_path / "slow.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    prog = [e for e in ev.of("progress") if e.speed]
    assert prog and all(e.total == len(data) and 0 <= e.done <= len(data) for e in prog)
    assert 1 * MB < prog[-1].speed < 6 * MB and prog[-1].eta is not None


def test_callback_exception_stops_cleanly_and_keeps_partial(server, tmp_path):
    data = blob(4 * MB, 23)
    url = server.put("/cb", data)
    server.faults("/cb").rate = 4 * MB
    dest = tmp_path / "cb.part"

    def boom(ev: ProgressEvent) -> None:
        if ev.kind == "progress" and ev.done >= MB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(url, dest, size=len(data), sha256=sha(data), options=opts(), on_event=boom)
    done, _ = partial_progress(dest)
    assert done >= MB
    deadline = time.monotonic() + 3
    while any(t.name.startswith("fetch-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fetch-")]
    server.faults("/cb").rate = None
    download(url, dest, size=len(data), sha256=sha(data), options=opts())
    assert dest.read_bytes() == data


def test_unwritable_destination_is_a_clean_error(server, tmp_path):
    data = blob(1000)
    url = server.put("/u", data)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FetchError, match="cannot write the download"):
        download(url, blocker / "u.part", size=len(data), sha256=sha(data), options=opts())


# ---- resume-state saves: what a kill can cost


def record_saves(monkeypatch) -> list[tuple[float, int]]:
    """(time, bytes the state claims) of every resume-state save."""
    saves: list[tuple[float, int]] = []
    real = fetch_http._Job._write_state

    def spy(job, snap: dict) -> None:
        real(job, snap)
        saves.append((time.monotonic(), sum(p[2] for p in snap["parts"])))
    monkeypatch.setattr(fetch_http._Job, "_write_state", spy)
    return saves


def test_slow_syncs_space_saves_at_most_two_seconds_apart(server, tmp_path, monkeypatch):
    # a disk whose sync takes 0.4 s made saves 4+ s apart (ten times the sync): a kill then lost that much
    data = blob(8 * MB, 26)
    url = server.put("/sync", data)
    server.faults("/sync").rate = MB
    real_sync = fetch_http.fdatasync

    def slow_sync(fd: int) -> None:
        time.sleep(0.4)
        real_sync(fd)
    monkeypatch.setattr(fetch_http, "fdatasync", slow_sync)
    saves = record_saves(monkeypatch)
    download(url, tmp_path / "s.part", size=len(data), sha256=sha(data),
             options=opts(checkpoint_interval=1.0))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(saves)]
    assert len(gaps) >= 3 and max(gaps) < 3.0, gaps  # 2 s + the 0.4 s sync + slack for a busy machine


@pytest.mark.parametrize("parallel", [False, True])
def test_saves_come_at_least_every_checkpoint_bytes_per_connection(server, tmp_path, monkeypatch, parallel):
    data = blob(24 * MB, 27)
    url = server.put("/many", data)
    server.faults("/many").rate = 12 * MB   # per connection: seconds between time-based saves hold many MB
    saves = record_saves(monkeypatch)
    o = opts(checkpoint_interval=10.0, checkpoint_bytes=MB,
             **({"parallel_parts": 3, "part_threshold": MB} if parallel else {}))
    download(url, tmp_path / "m.part", size=len(data), sha256=sha(data), options=o)
    claimed = [b for _, b in saves]
    steps = [b - a for a, b in itertools.pairwise(claimed)]
    # 1 MB per busy connection, plus what the writer wrote while the save synced (a few blocks at most)
    limit = (3 if parallel else 1) * MB + 3 * fetch_receive._WRITE_BLOCK
    # the bound on each step is the property; how many saves a loaded machine makes varies (5..20 seen)
    assert len(steps) >= 4 and max(steps) <= limit, steps


# ---- a source that sends nothing: give up in bounded time, and say only what is true


def test_total_stall_gives_up_within_give_up_after(server, tmp_path):
    assert FetchOptions().give_up_after <= 60
    data = blob(2 * MB, 34)
    url = server.put("/dead", data)
    server.faults("/dead").stall_after = 0      # headers, then silence, on every response
    server.faults("/dead").stall_for = 60
    server.faults("/dead").stall_times = -1
    t0 = time.monotonic()
    with pytest.raises(NetworkError) as err:
        # per-connection timeouts and retries alone would take minutes
        download(url, tmp_path / "d.part", size=len(data), sha256=sha(data),
                 options=opts(give_up_after=2.0, stall_timeout=30.0, max_retries=6, backoff_base=1.0))
    assert time.monotonic() - t0 < 5
    assert "nothing received for 2 s" in err.value.message
    assert "kept" not in err.value.hint and "give_up_after" in err.value.hint


@pytest.mark.parametrize("ranges", [True, False])
def test_a_stall_says_whether_anything_is_kept(server, tmp_path, ranges):
    data = blob(4 * MB, 35)
    url = server.put("/half", data)
    server.faults("/half").ignore_range = not ranges
    server.faults("/half").drop_after = MB
    dest = tmp_path / "h.part"
    with pytest.raises(NetworkError):
        download(url, dest, size=len(data), sha256=sha(data), options=opts(max_retries=0))
    server.faults("/half").stall_after = 0
    server.faults("/half").stall_for = 60
    server.faults("/half").stall_times = -1
    with pytest.raises(NetworkError) as err:
        download(url, dest, size=len(data), sha256=sha(data), options=opts(give_up_after=1.5))
    if ranges:
        assert "1.0 MB downloaded so far are kept and the next run resumes" in err.value.hint
        assert partial_progress(dest)[0] == MB
    else:
        # a server that ignores Range: the next run starts over, so nothing is said to be kept
        assert "kept" not in err.value.hint and "resume" not in err.value.hint


def test_retries_exhausted_before_any_byte_do_not_claim_a_partial(server, tmp_path):
    url = server.put("/503", blob(1000))
    server.faults("/503").status = 503
    with pytest.raises(NetworkError) as err:
        download(url, tmp_path / "x.part", size=1000, sha256=sha(blob(1000)), options=opts(max_retries=1))
    assert "kept" not in err.value.hint and "resume" not in err.value.hint


def test_failure_hints_never_promise_another_source(server, tmp_path):
    # the downloader cannot know whether the caller has another source: the caller says so
    data = blob(5000, 36)
    url = server.put("/wrong", data)
    with pytest.raises(ChecksumError) as size_err:
        download(url, tmp_path / "a.part", size=4000, sha256=sha(data), options=opts())
    with pytest.raises(ChecksumError) as hash_err:
        download(url, tmp_path / "b.part", size=len(data), sha256="0" * 64, options=opts())
    with pytest.raises(SourceNotFound) as missing:
        download(server.url("/nothing"), tmp_path / "c.part", size=1, sha256="0" * 64, options=opts())
    for err in (size_err, hash_err, missing):
        assert "source will be tried" not in err.value.hint, err.value.hint
