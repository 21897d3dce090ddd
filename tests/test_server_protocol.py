"""The server's connection limits on real sockets: a real uvicorn on 127.0.0.1, configured as ``serve`` does.

Slow clients (slowloris headers, a trickled body, a silent connection, one that goes away mid-body)
must cost the server a bounded time and no traceback. No model is needed: every case is decided
before a model is touched, so the registry names a file that does not exist.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from pipx_llama.server import ModelRegistry, ModelSpec, ServerSettings, create_app
from pipx_llama.server.protocol import ConnectionLimits, uvicorn_config

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = 40


@dataclass
class Running:
    port: int
    server: uvicorn.Server

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    registry = ModelRegistry([ModelSpec("m", Path("/nonexistent/m.gguf"))])
    app = create_app(registry, ServerSettings(body_timeout=BODY_TIMEOUT))
    limits = ConnectionLimits(header_timeout=HEADER_TIMEOUT, max_connections=MAX_CONNECTIONS)
    server = uvicorn.Server(uvicorn_config(app, limits, log_level="info", log_config=None))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield Running(sock.getsockname()[1], server)
    server.should_exit = True
    thread.join(15)
    sock.close()


def _closed_after(s: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``s`` (reading and dropping what it sends); fails past ``limit``."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < limit:
        try:
            if s.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    raise AssertionError(f"the server kept the connection open for {limit} s")


def _read_response(s: socket.socket) -> bytes:
    """One whole response with a Content-Length (head and body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def _get(r: Running, path: str = "/health") -> bytes:
    with r.connect() as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_a_silent_connection_is_closed(running: Running) -> None:
    with running.connect() as s:
        assert _closed_after(s, 10) >= HEADER_TIMEOUT * 0.9


def test_slowloris_headers_are_cut_off(running: Running) -> None:
    """Headers sent a byte at a time: each byte arrives in time, the whole head does not."""
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    with running.connect() as s:
        t0 = time.monotonic()
        closed = False
        for byte in head:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - t0 > 10:
                break
        if not closed:
            _closed_after(s, 10 - (time.monotonic() - t0))
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 3


def test_the_deadline_starts_again_after_each_answer(running: Running) -> None:
    """On a kept-alive connection the next request's head has the same deadline; trickling does not reset
    it."""
    with running.connect() as s:
        for _ in range(2):  # answers within the deadline reset it
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _read_response(s).startswith(b"HTTP/1.1 200")
            time.sleep(HEADER_TIMEOUT * 0.6)
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\n")
        try:
            for _ in range(100):
                time.sleep(0.1)
                s.sendall(b"X-A: b\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 3


def test_a_trickled_body_gets_408_and_the_connection_closes(running: Running, caplog) -> None:
    caplog.set_level(logging.INFO)
    with running.connect() as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        t0 = time.monotonic()
        answer = b""
        s.settimeout(0.2)
        while time.monotonic() - t0 < 10:
            try:
                s.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in answer.lower() and b'"code":"request_timeout"' in answer
    assert BODY_TIMEOUT * 0.9 <= elapsed < BODY_TIMEOUT + 3
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_many_slow_connections_are_all_dropped_and_the_server_still_answers(running: Running) -> None:
    socks = [running.connect() for _ in range(30)]
    try:
        for i, s in enumerate(socks):  # half say nothing, half start a request and stall
            if i % 2:
                s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert _get(running).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT)
        for s in socks:
            _closed_after(s, 5)
    finally:
        for s in socks:
            s.close()
    assert _get(running).startswith(b"HTTP/1.1 200")


def test_connections_beyond_the_limit_get_503(running: Running) -> None:
    socks = [running.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # let the server accept them all
        assert _get(running).startswith(b"HTTP/1.1 503")
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert _get(running).startswith(b"HTTP/1.1 200")


def test_an_endless_head_is_refused_without_buffering_it(running: Running) -> None:
    """A head still incomplete after 16 KiB is answered 400 at once, not buffered until the deadline."""
    with running.connect() as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (64 << 10))
        s.settimeout(5)
        t0 = time.monotonic()
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400") and time.monotonic() - t0 < HEADER_TIMEOUT


def test_a_client_gone_mid_body_is_one_info_line(running: Running, caplog) -> None:
    caplog.set_level(logging.INFO)
    with running.connect() as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\": ")
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("before its request body" in r.getMessage()
                                                  for r in caplog.records):
        time.sleep(0.05)
    time.sleep(0.2)  # anything logged after that line
    mine = [r for r in caplog.records if r.name.startswith(("pipx_llama", "uvicorn.error"))]
    gone = [r for r in mine if "before its request body" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO, [r.getMessage() for r in mine]
    assert not [r for r in mine if r.exc_info or r.levelno >= logging.WARNING], [r.getMessage() for r in mine]
