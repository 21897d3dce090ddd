"""Helpers for the browser tests: a live ``pipx-llama serve`` subprocess, an in-process server that
replays a long answer, and Debian's Chromium driven through Playwright.

Playwright's own browser download (``playwright install``) is never used: the tests launch the
system's Chromium (``PIPX_LLAMA_CHROMIUM``, else ``chromium`` on PATH). When Playwright or Chromium is
missing the tests skip with the reason printed -- except under ``PIPX_LLAMA_REQUIRE_TEST_DATA=1``
(CI), where a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pipx_llama.server import ModelRegistry, ModelSpec, ServerSettings, create_app, schemas

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
INSTALL_HINT = ("install it with: apt-get install -y chromium (and pip install playwright; "
                "never `playwright install`)")


def _missing(what: str) -> None:
    msg = f"{what}; {INSTALL_HINT}"
    if os.environ.get("PIPX_LLAMA_REQUIRE_TEST_DATA") == "1":
        pytest.fail(msg + " (PIPX_LLAMA_REQUIRE_TEST_DATA=1: a missing browser is a failure)")
    print(f"\nSKIP: {msg}")
    pytest.skip(msg)


def chromium_path() -> str:
    """The system Chromium to drive, or skip (fail in CI) saying how to install it."""
    path = (os.environ.get("PIPX_LLAMA_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))
    if not path or not os.access(path, os.X_OK):
        _missing("Chromium is not installed (looked for $PIPX_LLAMA_CHROMIUM, chromium, chromium-browser)")
    return path


def sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        _missing("the playwright package is not installed")
    return start()


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy (which is returned)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class LiveServer:
    """A ``pipx-llama serve`` subprocess and its log lines (stderr), read as they come."""

    url: str
    proc: subprocess.Popen
    log: list[str] = field(default_factory=list)

    def record(self, request_id: str, timeout: float = 30.0) -> dict[str, str]:
        """The server's log line for a finished request, as key=value pairs."""
        def find() -> dict[str, str] | None:
            for line in list(self.log):
                if request_id in line and "finish=" in line:
                    return dict(re.findall(r"(\w+)=(\S+)", line))
            return None
        try:
            return wait_until(find, timeout, f"the log line of {request_id}")
        except AssertionError:
            tail = "\n".join(self.log[-20:])
            raise AssertionError(f"no log line for {request_id}; log tail:\n{tail}") from None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


def start_server(args: list[str], env_extra: dict[str, str] | None = None, ready_path: str = "/health",
                 timeout: float = 120) -> LiveServer:
    """Start ``python -m pipx_llama.cli serve ARGS`` (pass ``--port 0``) and wait until it answers."""
    env = {k: v for k, v in os.environ.items() if k != "PIPX_LLAMA_API_KEY"}
    env.update(env_extra or {})
    proc = subprocess.Popen([sys.executable, "-m", "pipx_llama.cli", "serve", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    log: list[str] = []
    urls: list[str] = []
    found = threading.Event()

    def pump() -> None:
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            m = re.search(r"serving .* at (http://\S+)", line)
            if m:
                urls.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    server = LiveServer("", proc, log)
    if not found.wait(timeout):
        server.stop()
        raise AssertionError("the server did not start:\n" + "\n".join(log))
    server.url = urls[0]

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError("the server exited:\n" + "\n".join(log))
        try:
            return httpx.get(server.url + ready_path, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, 60, f"{server.url}{ready_path}", interval=0.1)
    except AssertionError:
        server.stop()
        raise
    return server


def screenshot_dir() -> Path:
    """``test-artifacts/`` at the repository root (gitignored); CI keeps it."""
    path = Path(__file__).resolve().parent.parent / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


class ReplayServer:
    """The real app (page, vendored files, ``/props``, ``/v1/models``) on 127.0.0.1, in this process,
    except that ``POST /v1/chat/completions`` streams ``pieces`` at ``rate`` pieces per second in the
    server's own chunk format: a long answer without a model generating it, so the page's own work
    while it streams is what a test measures. The last piece waits for ``release`` to be set (when
    ``hold`` is true) so a test can look at the page with the whole text in and the stream still open.
    """

    def __init__(self, model_file: Path, names: list[str], pieces: list[str], rate: float,
                 hold: bool = False) -> None:
        registry = ModelRegistry([ModelSpec(n, model_file) for n in names])
        self.real = create_app(registry, ServerSettings(allowed_hosts=["127.0.0.1"]))
        self.pieces, self.rate = pieces, rate
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.requests: list[dict] = []
        self.server = uvicorn.Server(uvicorn.Config(self._app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", interface="asgi3"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
            request = Request(scope, receive)
            body = json.loads(await request.body())
            self.requests.append(body)
            response = StreamingResponse(self._stream(body["model"]), media_type="text/event-stream")
            await response(scope, receive, send)
        else:
            await self.real(scope, receive, send)

    async def _stream(self, model: str) -> AsyncIterator[str]:
        def sse(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"
        rid, created = "chatcmpl-replay", int(time.time())
        yield sse(schemas.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None, False))
        start = time.monotonic()
        for i, piece in enumerate(self.pieces):
            if i == len(self.pieces) - 1:
                while not self.release.is_set():
                    await asyncio.sleep(0.05)
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield sse(schemas.chat_chunk(rid, created, model, {"content": piece}, None, False))
        yield sse(schemas.chat_chunk(rid, created, model, {}, "stop", False))
        yield "data: [DONE]\n\n"

    def __enter__(self) -> ReplayServer:  # noqa: PYI034
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 30, "the replay server")
        if not self.server.started:
            raise AssertionError("the replay server did not start (its error is logged above)")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.should_exit = True
        self.thread.join(30)
