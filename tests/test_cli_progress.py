"""Plain progress lines (a pipe, a CI log): a line at least every few seconds or each tenth of a file,
and a source's URL named once per file."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from httpserver import FileServer
from test_cli_store import DATA, manifest_file

from pipx_llama.cli.progress import PLAIN_EVERY, EventRenderer
from pipx_llama.events import ProgressEvent

URL = "https://example.invalid/a/rather/long/path/to/the/model/files/model.gguf"


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_each_tenth_and_every_few_seconds_between():
    clock, buf = Clock(), io.StringIO()
    out = EventRenderer("plain", buf, clock=clock)
    total = 1000
    out(ProgressEvent("start", "m.gguf", 0, total, source=URL))
    for done in range(0, 1001, 25):  # a tenth every 4 events, 0.1 s apart
        clock.now += 0.1
        out(ProgressEvent("progress", "m.gguf", done, total, speed=250.0, eta=(total - done) / 250))
    lines = buf.getvalue().splitlines()
    shares = [int(m.group(1)) for line in lines if (m := re.search(r": (\d+)% \(", line))]
    assert shares == list(range(10, 101, 10))
    assert "m.gguf: 50% (500 B of 1.0 KB, 250 B/s, 2 s left)" in lines

    clock2, buf2 = Clock(), io.StringIO()
    slow = EventRenderer("plain", buf2, clock=clock2)
    slow(ProgressEvent("start", "m.gguf", 0, 10**9, source=URL))
    for i in range(60):  # 30 s at 0.5 s a step, far below a tenth
        clock2.now += 0.5
        slow(ProgressEvent("progress", "m.gguf", i * 1000, 10**9))
    progress_lines = [line for line in buf2.getvalue().splitlines() if "%" in line]
    assert len(progress_lines) == int(30 // PLAIN_EVERY) - 1


def test_the_url_is_named_once_per_file():
    buf = io.StringIO()
    out = EventRenderer("plain", buf)
    out(ProgressEvent("start", "m.gguf", 0, 10, source=URL))
    out(ProgressEvent("verified", "m.gguf", 10, 10, source=URL, message="sha256 ab"))
    out(ProgressEvent("stored", "m.gguf", 10, 10, source=f"url {URL}", message="stored (download)"))
    assert buf.getvalue().count(URL) == 1


def test_a_piped_pull_reports_progress(tmp_path):
    with FileServer() as srv:
        srv.put("/r/m.gguf", DATA)
        srv.faults("/r/m.gguf").rate = len(DATA) / 2.0  # two seconds
        mf = manifest_file(tmp_path, srv.url("/r/"))
        env = {**os.environ, "PIPX_LLAMA_HOME": str(tmp_path / "home"),
               "PIPX_LLAMA_CONFIG_DIR": str(tmp_path / "config")}
        cmd = [sys.executable, "-m", "pipx_llama.cli", "pull", "clitest", "--manifest", str(mf)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    shares = [int(m.group(1)) for m in re.finditer(r"^m\.gguf: (\d+)% \(", out.stdout, re.M)]
    assert len(shares) >= 5 and shares == sorted(shares), out.stdout
    assert out.stdout.count(srv.url("/r/m.gguf")) == 1
