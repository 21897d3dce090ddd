"""A real OCI registry on 127.0.0.1 for tests: Debian's ``docker-registry`` (the CNCF distribution
server), started with a temporary config and storage, optionally behind htpasswd basic auth.

``.ci/run`` installs the package, so CI always runs these tests; a machine without the binary skips
them, saying why (set PIPX_LLAMA_REQUIRE_TEST_DATA=1 to make that a failure).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

BINARY_NAMES = ("docker-registry", "registry")


def registry_binary() -> str | None:
    for name in BINARY_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """A running registry: ``host`` (``127.0.0.1:PORT``), ``root`` (its storage), ``stop()``."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None) -> None:
        binary = registry_binary()
        if binary is None:
            msg = "Debian's docker-registry is not installed (apt-get install docker-registry)"
            if os.environ.get("PIPX_LLAMA_REQUIRE_TEST_DATA") == "1":
                pytest.fail(msg)
            pytest.skip(msg)
        self.root = workdir / "storage"
        self.root.mkdir(parents=True)
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        auth = ""
        if users:
            import bcrypt

            htpasswd = workdir / "htpasswd"
            htpasswd.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
                                        for u, p in users.items()))
            auth = f"auth:\n  htpasswd:\n    realm: test-realm\n    path: {htpasswd}\n"
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: test-secret\n" + auth
        )
        self.log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "serve", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                code = httpx.get(f"http://{self.host}/v2/", timeout=1).status_code
                if code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not start: {(workdir / 'registry.log').read_text()}")
            time.sleep(0.1)

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob (to tamper with it in a test)."""
        hexd = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class TokenGate:
    """A token service and gate in front of a ``Registry``, as ghcr.io or ollama.com work: ``/v2/``
    answers 401 with a ``Bearer realm=...,service=...,scope=...`` challenge; ``/token`` hands out an
    anonymous pull token (when ``anonymous_pull``) or, with basic auth of ``users``, a pull+push one;
    requests with a valid token for their repository go on to the registry.

    ``issued`` lists (user or None, scope) per token handed out, to check which flow the client took."""

    def __init__(self, backend: Registry, *, users: dict[str, str], anonymous_pull: bool = True,
                 rate: float | None = None) -> None:
        import base64
        import http.server
        import secrets
        import threading
        from urllib.parse import parse_qs, urlsplit

        gate = self
        self.issued: list[tuple[str | None, str]] = []
        self.blob_bytes: dict[str, int] = {}   # digest -> body bytes sent (a resume fetches only the rest)
        tokens: dict[str, tuple[str, set[str]]] = {}   # token -> (repository, actions)
        port = _free_port()
        self.host = f"127.0.0.1:{port}"
        realm = f"http://{self.host}/token"

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if rate is None or "/blobs/" not in self.path:
                    self.wfile.write(body)
                    return
                digest = self.path.rsplit("/", 1)[-1]
                try:   # throttled, so a test can kill the client mid-blob
                    for i in range(0, len(body), 16384):
                        self.wfile.write(body[i:i + 16384])
                        gate.blob_bytes[digest] = gate.blob_bytes.get(digest, 0) + len(body[i:i + 16384])
                        time.sleep(16384 / rate)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _token(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                scope = q.get("scope", [""])[0]
                _, repo, actions = (scope.split(":") + ["", "", ""])[:3]
                wanted = set(actions.split(",")) - {""}
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    if users.get(name) != password:
                        return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                    user = name
                allowed = {"pull", "push"} if user else ({"pull"} if anonymous_pull else set())
                granted = wanted & allowed
                token = secrets.token_hex(16)
                tokens[token] = (repo, granted)
                gate.issued.append((user, scope))
                self._send(200, json.dumps({"token": token, "expires_in": 300}).encode(),
                           {"Content-Type": "application/json"})

            def _proxy(self) -> None:
                m = re.match(r"/v2/(.+?)/(?:blobs|manifests|tags)/", urlsplit(self.path).path)
                repo = m.group(1) if m else ""
                need = "pull" if self.command in ("GET", "HEAD") else "push"
                auth = self.headers.get("Authorization", "")
                have = tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
                if have is None or (repo and (have[0] != repo or need not in have[1])):
                    scope = f"repository:{repo}:{'pull' if need == 'pull' else 'pull,push'}" if repo else ""
                    challenge = f'Bearer realm="{realm}",service="gate"'
                    challenge += f',scope="{scope}"' if scope else ""
                    return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                                      {"WWW-Authenticate": challenge})
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("authorization", "host", "content-length", "connection")}
                resp = httpx.request(self.command, f"http://{backend.host}{self.path}", headers=headers,
                                     content=body, timeout=60)
                out = {k: v.replace(backend.host, gate.host) for k, v in resp.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                            "content-encoding")}
                self._send(resp.status_code, resp.content, out)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.startswith("/token"):
                    self._token()
                else:
                    self._proxy()

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
