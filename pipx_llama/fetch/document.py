"""Small documents from a server (a mirror's manifest index, a manifest): bounded in size and time.

A mirror is not trusted blindly, and these documents come without a checksum known in advance, so
the bytes read are capped (``max_bytes``, checked against Content-Length first and then while
reading), the whole transfer has a deadline, and only the identity encoding is accepted: a body
that is gzip- or brotli-compressed would be decoded without bound (a few megabytes of a "gzip bomb"
expand to gigabytes), so one the server compresses although it was asked not to is refused.

httpx is imported inside the functions that send requests, when a download starts: 60 ms that every
other start-up (planning, a model already in the store) need not pay.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pipx_llama import __version__
from pipx_llama.errors import FetchError
from pipx_llama.fetch.errors import AccessDenied, NetworkError, SourceNotFound
from pipx_llama.fetch.source import is_loopback, redact_url

if TYPE_CHECKING:
    import httpx

DEFAULT_TIMEOUT = 30.0


def fetch_document(url: str, *, max_bytes: int, token: str | None = None, allow_http: bool = False,
                   timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The body of ``url`` (at most ``max_bytes``), fetched in at most about ``timeout`` seconds.

    As for downloads, a redirect to plain http is refused unless to loopback or ``allow_http``.

    Raises ``SourceNotFound`` (404/410), ``AccessDenied`` (401/403), ``NetworkError`` (no connection,
    a timeout, a 5xx) or ``FetchError`` (what the server sent is not acceptable: another status, a body
    too large, too slow or content-encoded), each naming the URL without its query string.
    """
    import httpx  # here, not at the top: see the module docstring

    shown = redact_url(url)
    headers = {
        "Accept-Encoding": "identity",
        "User-Agent": f"pipx-llama/{__version__} httpx/{httpx.__version__}",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    deadline = time.monotonic() + timeout

    def stay_on_https(request: httpx.Request) -> None:  # every request, redirects included, before it is sent
        if request.url.scheme == "http" and not allow_http and not is_loopback(request.url.host):
            raise FetchError(f"{shown} redirected to plain http ({request.url.host}); refusing",
                             "use a server that stays on https, or allow plain http explicitly")

    try:
        with httpx.Client(follow_redirects=True, timeout=timeout, trust_env=True,
                          event_hooks={"request": [stay_on_https]}) as client, \
                client.stream("GET", url, headers=headers) as resp:
            _check_status(resp, shown)
            encoding = resp.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise FetchError(f"{shown} was sent with Content-Encoding {encoding[:40]!r} although "
                                 "identity was asked for; refused (it could expand without bound)",
                                 "serve the file uncompressed (static files need no Content-Encoding)")
            length = resp.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise _too_big(shown, max_bytes)
            body = bytearray()
            for chunk in resp.iter_raw():
                body += chunk
                if len(body) > max_bytes:
                    raise _too_big(shown, max_bytes)
                if time.monotonic() > deadline:
                    raise FetchError(f"{shown} took more than {timeout:.0f} s to send {len(body)} bytes",
                                     "check the server; a document this small should arrive at once")
            return bytes(body)
    except httpx.TransportError as err:
        raise NetworkError(f"cannot fetch {shown}: {type(err).__name__}: {err}",
                           "check the URL and the network") from None
    except httpx.HTTPError as err:
        raise FetchError(f"cannot fetch {shown}: {type(err).__name__}: {err}", "check the URL") from None


def _check_status(resp: httpx.Response, shown: str) -> None:
    code = resp.status_code
    if code in (404, 410):
        raise SourceNotFound(f"{shown}: HTTP {code}", "")
    if code in (401, 403):
        raise AccessDenied(f"{shown}: HTTP {code} (access denied)",
                           "set PIPX_LLAMA_TOKEN if the server needs a token")
    if code >= 500:
        raise NetworkError(f"{shown}: HTTP {code}", "retry later: the server has a problem")
    if code != 200:
        raise FetchError(f"{shown}: HTTP {code}", "check the URL")


def _too_big(shown: str, max_bytes: int) -> FetchError:
    return FetchError(f"{shown} is larger than {max_bytes} bytes; refused",
                      "this is not a document pipx-llama expects at that address")
