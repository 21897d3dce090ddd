"""A threaded HTTP/1.1 test server on 127.0.0.1 with Range, ETag, If-Range, redirects and injectable faults.

Tests start it themselves (``with FileServer() as srv``) and publish resources from memory or disk::

    url = srv.put("/m.bin", data=b"...")            # ETag derived from the content
    srv.faults("/m.bin").drop_after = 1 << 20        # next response: connection dropped after 1 MiB
    srv.redirect("/r", "/m.bin")                     # 302 to another path (or an absolute URL)
    srv.bytes_sent                                   # body bytes written to sockets, all resources

Faults (a ``Faults`` per resource, changeable while serving; each ``*_times`` counter says how many
responses get the fault, ``-1`` = every one): dropped connection after N body bytes, one corrupted
byte at an absolute offset, Range ignored (200 + whole body), queued statuses with Retry-After
(429/503/...), a stall after N bytes, a fixed status (404, 403), a bearer token demanded (401),
per-connection rate cap in bytes/s, chunked responses without Content-Length, a fresh ETag per response
(a load balancer), no Last-Modified, a whole-file Range answered 200.

For benchmarks the server also runs as a separate process: ``ServerProcess`` (``serve_cli()`` in it).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.server
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 1 << 20


@dataclass
class Faults:
    """Faults injected into the responses for one resource. Times are in seconds, sizes in bytes."""

    drop_after: int | None = None
    drop_times: int = 1
    corrupt_at: int | None = None
    ignore_range: bool = False
    statuses: list[tuple[int, str | None]] = field(default_factory=list)
    stall_after: int | None = None
    stall_for: float = 0.0
    stall_times: int = 1
    status: int | None = None
    require_token: str | None = None
    rate: float | None = None
    chunked: bool = False
    no_etag: bool = False
    max_range: int | None = None    # a 206 covers at most this many bytes (RFC 9110 allows shorter answers)
    etag_per_response: bool = False  # a fresh ETag on every response (load balancers whose servers label the
                                     # same bytes differently): an If-Range ETag never matches
    no_last_modified: bool = False
    whole_range_as_200: bool = False  # a Range covering the whole file is answered 200 (as some servers do)


@dataclass
class Resource:
    data: bytes | None
    path: Path | None
    size: int
    etag: str
    last_modified: float
    faults: Faults = field(default_factory=Faults)
    redirect_to: str | None = None
    redirect_status: int = 302
    headers: dict[str, str] = field(default_factory=dict)  # sent as they are, over the defaults


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: FileServer

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)


class _Dropped(Exception):
    """The handler closed the connection on purpose (fault injection)."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        target = self.path
        if target.startswith(("http://", "https://")):
            # absolute-form request target: we are being used as a forward proxy
            owner.proxied += 1
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path = target.split("?", 1)[0]
        res = owner._resources.get(path)
        owner._log(self.command, path, dict(self.headers))
        if res is None:
            self._status(404)
            return
        if res.redirect_to is not None:
            self._status(res.redirect_status, {"Location": res.redirect_to})
            return
        faults = res.faults
        with owner._lock:
            queued = faults.statuses.pop(0) if faults.statuses else None
        if queued is not None:
            code, retry_after = queued
            self._status(code, {"Retry-After": retry_after} if retry_after is not None else {})
            return
        if faults.status is not None:
            self._status(faults.status)
            return
        if (faults.require_token is not None
                and self.headers.get("Authorization") != f"Bearer {faults.require_token}"):
            self._status(401, {"WWW-Authenticate": "Bearer"})
            return

        etag = res.etag
        if faults.etag_per_response:
            with owner._lock:
                owner._etags += 1
                etag = f'"{res.etag.strip(chr(34))}-{owner._etags}"'
        start, end, partial = 0, res.size - 1, False
        rng = self.headers.get("Range")
        if rng and not faults.ignore_range and self._if_range_ok(res, etag):
            parsed = _parse_range(rng, res.size)
            if parsed == "unsatisfiable":
                self._status(416, {"Content-Range": f"bytes */{res.size}"})
                return
            if parsed is not None and not (faults.whole_range_as_200 and parsed == (0, res.size - 1)):
                start, end = parsed
                if faults.max_range is not None:
                    end = min(end, start + faults.max_range - 1)
                partial = True
        length = end - start + 1
        headers = {
            "Accept-Ranges": "none" if faults.ignore_range else "bytes",
            "Content-Type": "application/octet-stream",
        }
        if not faults.no_last_modified:
            headers["Last-Modified"] = email.utils.formatdate(res.last_modified, usegmt=True)
        if not faults.no_etag:
            headers["ETag"] = etag
        if faults.chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(length)
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end}/{res.size}"
        headers.update(res.headers)
        self.send_response(206 if partial else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        try:
            self._send_body(res, start, length)
        except _Dropped:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _if_range_ok(self, res: Resource, etag: str) -> bool:
        cond = self.headers.get("If-Range")
        if cond is None:
            return True
        if cond.startswith(('"', "W/")):
            return cond == etag and not cond.startswith("W/")
        date = email.utils.formatdate(res.last_modified, usegmt=True)
        return cond == date and not res.faults.no_last_modified

    def _status(self, code: int, headers: dict[str, str] | None = None) -> None:
        body = f"{code}\n".encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _take(self, faults: Faults, attr: str) -> bool:
        """Consume one use of a counted fault (``attr`` is its ``*_times`` counter)."""
        with self.server.owner._lock:
            n = getattr(faults, attr)
            if n == 0:
                return False
            if n > 0:
                setattr(faults, attr, n - 1)
            return True

    def _send_body(self, res: Resource, start: int, length: int) -> None:
        owner = self.server.owner
        faults = res.faults
        drop_at = (
            faults.drop_after if faults.drop_after is not None and self._take(faults, "drop_times") else None
        )
        stall_at = (faults.stall_after if faults.stall_after is not None and self._take(faults, "stall_times")
                    else None)
        rate = faults.rate
        corrupt = faults.corrupt_at
        plain = drop_at is None and stall_at is None and rate is None and not faults.chunked and (
            corrupt is None or not (start <= corrupt < start + length))
        if plain and res.path is not None and not isinstance(self.connection, ssl.SSLSocket):
            self._sendfile(res, start, length)
            return
        step = CHUNK if rate is None else max(1024, min(64 * 1024, int(rate / 50)))
        t0 = time.monotonic()
        sent = 0
        with open(res.path, "rb") if res.path is not None else _no_file() as fh:
            while sent < length:
                n = min(step, length - sent)
                if drop_at is not None:
                    if sent >= drop_at:
                        raise _Dropped
                    n = min(n, drop_at - sent)
                if stall_at is not None and sent >= stall_at:
                    owner._closing.wait(faults.stall_for)
                    stall_at = None
                if stall_at is not None:
                    n = min(n, stall_at - sent)
                off = start + sent
                if fh is not None:
                    fh.seek(off)
                    chunk = fh.read(n)
                else:
                    chunk = memoryview(res.data)[off:off + n]  # type: ignore[arg-type]
                if corrupt is not None and off <= corrupt < off + n:
                    b = bytearray(chunk)
                    b[corrupt - off] ^= 0xFF
                    chunk = bytes(b)
                if faults.chunked:
                    self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                else:
                    self.wfile.write(chunk)
                sent += n
                owner._count(n)
                if rate is not None:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            if faults.chunked:
                self.wfile.write(b"0\r\n\r\n")

    def _sendfile(self, res: Resource, start: int, length: int) -> None:
        self.wfile.flush()
        sock = self.connection
        owner = self.server.owner
        with open(res.path, "rb") as fh:  # type: ignore[arg-type]
            off, left = start, length
            while left > 0:
                if hasattr(os, "sendfile"):
                    n = os.sendfile(sock.fileno(), fh.fileno(), off, min(left, 8 * CHUNK))
                else:
                    fh.seek(off)
                    n = sock.send(fh.read(min(left, CHUNK)))
                if n == 0:
                    raise _Dropped
                off += n
                left -= n
                owner._count(n)


@contextlib.contextmanager
def _no_file() -> Iterator[None]:
    yield None


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """One 'bytes=a-b' / 'bytes=a-' / 'bytes=-n' range; None for anything else (served as 200)."""
    if not value.startswith("bytes=") or "," in value:
        return None
    a, _, b = value[6:].strip().partition("-")
    try:
        if a == "":
            n = int(b)
            if n == 0:
                return "unsatisfiable"
            return max(0, size - n), size - 1
        first = int(a)
        last = int(b) if b else size - 1
    except ValueError:
        return None
    if first >= size:
        return "unsatisfiable"
    if last < first:
        return None
    return first, min(last, size - 1)


class FileServer:
    """The server; use as a context manager. ``host`` is 127.0.0.1; ``port`` is picked by the OS."""

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self._resources: dict[str, Resource] = {}
        self.proxied = 0
        self.scheme = "https" if tls is not None else "http"
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._sent = 0
        self._etags = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="test-http-server")
        self._thread.start()

    def __enter__(self) -> FileServer:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def put(self, path: str, data: bytes | None = None, *, file: Path | None = None, etag: str | None = None,
            last_modified: float | None = None, headers: dict[str, str] | None = None) -> str:
        """Publish ``data`` (or the file ``file``) at ``path``; a changed body gets a new ETag. Returns the
        URL.

        ``headers`` are sent with every response for it, over the defaults (e.g. a Content-Type, or a
        Content-Encoding the body does not really have).
        """
        if (data is None) == (file is None):
            raise ValueError("give exactly one of data and file")
        if data is not None:
            size = len(data)
            etag = etag or '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
        else:
            st = Path(file).stat()  # type: ignore[arg-type]
            size = st.st_size
            etag = etag or f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        old = self._resources.get(path)
        res = Resource(data=data, path=Path(file) if file is not None else None, size=size, etag=etag,
                       last_modified=last_modified if last_modified is not None else time.time(),
                       faults=old.faults if old is not None and old.redirect_to is None else Faults(),
                       headers=dict(headers or {}))
        self._resources[path] = res
        return self.url(path)

    def redirect(self, path: str, target: str, status: int = 302) -> str:
        """Answer ``path`` with a redirect to ``target`` (a path on this server or an absolute URL)."""
        self._resources[path] = Resource(data=None, path=None, size=0, etag="", last_modified=0.0,
                                         redirect_to=target, redirect_status=status)
        return self.url(path)

    def faults(self, path: str) -> Faults:
        return self._resources[path].faults

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return self._sent

    def bytes_requested_twice(self, path: str) -> int:
        """How many bytes of ``path`` the Range requests so far asked for more than once."""
        size = self._resources[path].size
        spans: list[tuple[int, int]] = []
        for _, p, h in self.requests:
            if p != path:
                continue
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.get("Range", "bytes=0-"))
            if m:
                spans.append((int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)))
        asked = sum(e + 1 - s for s, e in spans if e >= s)
        union, reach = 0, -1
        for s, e in sorted(spans):
            if e > reach:
                union += e - max(s, reach + 1) + 1
                reach = e
        return asked - union

    def reset_counters(self) -> None:
        with self._lock:
            self._sent = 0
            self.requests.clear()

    def _count(self, n: int) -> None:
        with self._lock:
            self._sent += n

    def _log(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, path, headers))


def serve_cli(argv: list[str] | None = None) -> None:
    """Serve one file from another process: ``serve_cli([FILE, PORTFILE, RATE_OR_0[, NAME]])``.

    The file is published at ``/NAME`` (``/f`` without one); the chosen port is written to PORTFILE; a
    RATE above 0 caps each connection at that many bytes/s. Runs until killed.
    """
    args = sys.argv[1:] if argv is None else argv
    path, portfile, rate = Path(args[0]), Path(args[1]), float(args[2])
    where = "/" + (args[3] if len(args) > 3 else "f")
    srv = FileServer()
    srv.put(where, file=path)
    if rate > 0:
        srv.faults(where).rate = rate
    tmp = portfile.with_suffix(".tmp")
    tmp.write_text(str(srv.port))
    os.replace(tmp, portfile)
    threading.Event().wait()


class ServerProcess:
    """``serve_cli`` in a process of its own (so it does not share the benchmark's GIL): ``url`` serves
    ``path`` at ``/NAME``, each connection capped at ``rate`` bytes/s (0: no cap)."""

    def __init__(self, path: Path, workdir: Path, rate: float = 0, name: str = "f") -> None:
        portfile = workdir / f"port-{os.getpid()}-{name}-{int(rate)}"
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import httpserver; "
                "httpserver.serve_cli(sys.argv[2:])")
        here = str(Path(__file__).resolve().parent)
        self.proc = subprocess.Popen([sys.executable, "-c", code, here, str(path), str(portfile), str(rate),
                                      name])
        deadline = time.monotonic() + 30
        while not portfile.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{portfile.read_text()}/"
        self.url = self.base + name

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
