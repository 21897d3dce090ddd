"""``pipx-llama ps`` without a server: a clear message, not a traceback (with a server: test_server.py)."""

from __future__ import annotations

import socket
import subprocess
import sys


def test_no_server_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "pipx_llama.cli", "ps", "--port", str(port)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert lines[0].startswith(f"error: no pipx-llama server answers at http://127.0.0.1:{port}")
    assert lines[1] == "hint: start one with `pipx-llama serve MODEL`, or pass --port/--url"
