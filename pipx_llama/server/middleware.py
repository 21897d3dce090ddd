"""Pure-ASGI guards in front of the endpoints: Host and Origin checks, Bearer key, JSON bodies only,
request body limits (size and time).

Pure ASGI (not ``BaseHTTPMiddleware``) so that streamed responses pass through untouched and a
client disconnect reaches the endpoint.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipx_llama.server.errors import APIError

PROTECTED_PREFIXES = ("/v1/", "/api/")  # the API; /health and the web page stay open


def error_response(scope: Scope, err: APIError) -> JSONResponse:
    """``err`` in the shape the API family of ``scope``'s path uses."""
    body = err.ollama_body() if scope.get("path", "").startswith("/api/") else err.openai_body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class HostCheckMiddleware:
    """Refuse requests whose Host is not this machine's loopback name.

    A server on 127.0.0.1 is still reachable from a web page through DNS rebinding (a hostile name
    that resolves to 127.0.0.1); such requests carry the hostile name in Host, so they stop here.
    """

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = (_header(scope, b"host") or "").lower()
            name = host.rsplit("]", 1)[0] + "]" if host.startswith("[") else host.split(":", 1)[0]
            if name not in self.allowed:
                err = APIError(403, f"Host {host!r} is not allowed; use http://127.0.0.1 or http://localhost",
                               type="invalid_request_error", code="host_not_allowed")
                await error_response(scope, err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AuthMiddleware:
    """With an API key set, the API paths need ``Authorization: Bearer <key>``."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is not None and scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            auth = _header(scope, b"authorization") or ""
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key):
                msg = ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'." if not auth
                       else "Incorrect API key provided.")
                err = APIError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error_response(scope, err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OriginCheckMiddleware:
    """Refuse a request sent by a web page of another origin, unless ``--cors-origin`` lets that origin in.

    CORS only hides the answer from such a page; the request itself still runs. A page may send a
    ``text/plain`` POST to any address without asking first, so without an API key any site the user
    visits could make the model generate. Browsers name the page's origin in ``Origin``; the server's
    own page (same origin), localhost pages and the configured origins pass. Requests without
    ``Origin`` (curl, SDKs) are not from a page and pass.
    """

    def __init__(self, app: ASGIApp, origins: list[str], origin_regex: str) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = {o.rstrip("/").lower() for o in origins}
        self.regex = re.compile(origin_regex)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":  # preflights are CORSMiddleware's
            origin = _header(scope, b"origin")
            if origin is not None and not self._allowed(origin, scope):
                shown = origin if len(origin) <= 80 else origin[:60] + "…"
                err = APIError(403, f"requests from web pages at {shown} are not allowed; start the server "
                                    f"with --cors-origin {shown} to allow them", code="origin_not_allowed")
                await error_response(scope, err)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _allowed(self, origin: str, scope: Scope) -> bool:
        origin = origin.strip().lower()
        if self.any or origin in self.origins or self.regex.fullmatch(origin):
            return True
        host = _header(scope, b"host")
        return host is not None and _same_origin(origin, scope.get("scheme", "http"), host)


def _same_origin(origin: str, scheme: str, host: str) -> bool:
    """``origin`` is this server as the client reached it (scheme, Host and port, default ports filled in)."""
    default = {"http": 80, "https": 443}
    try:
        page = urlsplit(origin)
        here = urlsplit(f"{scheme}://{host.strip()}")
        return (page.scheme == here.scheme and page.hostname is not None and page.hostname == here.hostname
                and (page.port or default.get(page.scheme)) == (here.port or default.get(here.scheme)))
    except ValueError:  # a port that is not a number, a malformed IPv6 literal
        return False


class JsonBodyMiddleware:
    """415 for a POST whose ``Content-Type`` is not ``application/json``.

    The content types a web page may send without a CORS preflight (``text/plain``, forms) are thus
    refused: a foreign page that sends JSON must ask first, and the CORS policy answers no.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            given = _header(scope, b"content-type")
            if given is None or given.split(";", 1)[0].strip().lower() != "application/json":
                what = f"Content-Type {given[:60]!r}" if given else "no Content-Type"
                err = APIError(415,
                               f"the request body must be JSON sent as Content-Type: application/json, not "
                                    f"{what} (curl: add -H 'Content-Type: application/json')",
                               code="unsupported_media_type")
                await error_response(scope, err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(APIError):
    def __init__(self, limit: int, size: int | None = None) -> None:
        what = f"of {size} bytes " if size is not None else ""
        super().__init__(413, f"The request body {what}exceeds this server's limit of {limit} bytes.",
                         code="request_too_large")


class BodyTooSlow(APIError):
    def __init__(self, timeout: float) -> None:
        # Connection: close -- the rest of the body is never read, so the connection cannot serve another
        # request
        super().__init__(408, f"The request body did not arrive within {timeout:g} s.",
                         code="request_timeout", headers={"Connection": "close"})


class BodyLimitMiddleware:
    """413 for a body over the limit: by Content-Length up front, or counted as a chunked body arrives;
    408 for a body still incomplete ``timeout`` seconds after its headers (a client sending a byte now
    and then would otherwise hold its request open for ever)."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            length = length.strip()
            if not re.fullmatch(r"[0-9]+", length):
                err = APIError(400, f"invalid Content-Length header: {length[:40]!r}")
                await error_response(scope, err)(scope, receive, send)
                return
            if len(length) > 18 or int(length) > self.limit:  # 18 digits: int() of 5000 would refuse
                size = int(length) if len(length) <= 18 else None
                await error_response(scope, BodyTooLarge(self.limit, size))(scope, receive, send)
                return
        seen = 0
        complete = False
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout

        async def limited() -> Message:
            nonlocal seen, complete
            if complete or deadline is None:  # after the body, receive() waits for the disconnect
                message: dict[str, Any] = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise BodyTooSlow(self.timeout) from None  # raised inside request.body(): answered 408
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)  # raised inside request.body(): the endpoint answers 413
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, limited, send)
