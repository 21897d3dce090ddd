"""SIGKILL the downloading process at 10 random moments of a 200 MB download: every restart resumes.

A subprocess runs download() against the in-process test server (each connection capped at 3 MB/s,
so the kills land mid-transfer); the test kills it, checks that the next run starts from exactly the
progress the state file recorded, and finally lets a run finish. The kill schedule's seed is printed;
set PIPX_LLAMA_KILL_SEED to replay one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from httpserver import FileServer

from pipx_llama.fetch.http import FetchOptions, partial_progress

MB = 1 << 20

SCRIPT = r"""
import json, sys
from pathlib import Path
from pipx_llama.fetch.http import FetchOptions, download

def emit(ev):
    if ev.kind != "progress":
        print(json.dumps(ev.to_json()), flush=True)

url, dest, size, sha = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
download(url, dest, size=size, sha256=sha,
         options=FetchOptions(backoff_base=0.05, backoff_max=1.0, checkpoint_interval=0.25), on_event=emit,
         label="big.bin")
print(json.dumps({"kind": "returned"}), flush=True)
"""


class Run:
    """One downloading subprocess whose JSON events are collected as they arrive."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self.started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            self.events.append(ev)
            if ev["kind"] == "start":
                self.started.set()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)

    def finish(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def first(self, kind: str) -> dict | None:
        return next((e for e in self.events if e["kind"] == kind), None)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")
def test_sigkill_at_ten_random_moments_resumes_and_verifies(tmp_path):
    size = 200 * MB
    data = random.Random(2024).randbytes(size)
    digest = hashlib.sha256(data).hexdigest()
    part = -(-size // FetchOptions().parallel_parts)
    seed = int(os.environ.get("PIPX_LLAMA_KILL_SEED") or random.randrange(1 << 30))
    print(f"\nkill schedule seed {seed} (PIPX_LLAMA_KILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    dest = tmp_path / "partial" / "big.part"
    with FileServer() as srv:
        url = srv.put("/big.bin", data)
        srv.faults("/big.bin").rate = 3 * MB
        args = [url, str(dest), str(size), digest]
        recorded = 0
        resumed = []
        for i in range(10):
            run = Run(args)
            if i in (2, 6):
                # early: during start-up or the first request
                time.sleep(rng.uniform(0.05, 0.6))
            else:
                assert run.started.wait(30), f"run {i} never started: {run.proc.stderr}"
                time.sleep(rng.uniform(0.3, 1.6))
            run.kill()
            assert run.first("returned") is None, "the download finished before it could be killed"
            start = run.first("start")
            if start is not None:
                assert start["done"] == recorded, f"run {i} did not resume from the recorded progress"
                resumed.append(start["done"])
            progress = partial_progress(dest)
            recorded = progress[0] if progress else 0
            print(f"kill {i + 1}: started at {start['done'] if start else '-'}, state says {recorded}, "
                  f"server sent {srv.bytes_sent}")
        srv.faults("/big.bin").rate = None
        final = Run(args)
        err = final.finish(timeout=120)
        assert final.proc.returncode == 0, err
        assert final.first("start")["done"] == recorded
        kinds = [e["kind"] for e in final.events]
        assert kinds[-3:] == ["verified", "done", "returned"]
        sent = srv.bytes_sent
    assert sum(1 for d in resumed if d > 0) >= 3, f"too few restarts had progress to resume: {resumed}"
    h = hashlib.sha256()
    with open(dest, "rb") as f:
        while chunk := f.read(8 * MB):
            h.update(chunk)
    assert h.hexdigest() == digest
    assert not os.path.exists(str(dest) + ".json")
    print(f"server sent {sent} bytes for a {size}-byte file: {(sent - size) / MB:.1f} MB re-sent "
          f"(bound: 10 parts = {10 * part / MB:.0f} MB)")
    assert sent <= size + 10 * part
