"""The server behind a download's URL, as the download talks to it: requests, answers, validators, retries.

Network behaviour: TLS verification on, redirects followed (never to plain http unless allowed),
proxies and CA bundle from the environment (httpx ``trust_env``: ``HTTPS_PROXY``, ``NO_PROXY``,
``SSL_CERT_FILE``...), a bearer token if given (httpx drops it when a redirect leaves the origin, so
CDN links never see it). URLs are shown without their query string and credentials (``redact_url``):
presigned links carry secrets there.

Encodings
    Requests ask for ``Accept-Encoding: identity`` and a response with any other ``Content-Encoding``
    is refused: decoding gzip or brotli would write an unbounded number of bytes for a file whose size
    the manifest may not give (a 6 MB "gzip bomb" expands to gigabytes), and the sha256 is of the file.

Validators
    Every ranged request carries ``If-Range`` (a strong ETag, else Last-Modified). A change of the
    validators means the file changed, and the partial is discarded (``Restart``) -- the first time:
    validators that change again within one download come from a server that labels the same bytes
    differently per response (a load balancer), so the ETag is then dropped for Last-Modified if that
    stayed the same, else both are, and the final sha256 check decides.

Failures
    ``reason`` turns an attempt's failure into a reason worth retrying (exponential backoff with
    jitter, ``Retry-After`` honoured and capped at ``backoff_max``) or raises the error that ends the
    download: 404/410 (``SourceNotFound``: the caller tries its next source), 401/403 (``AccessDenied``
    with what to do for gated or expired links), an unverifiable certificate, a host name that does not
    resolve. ``give_up_after`` seconds without a byte from the source, retries included, end it too.

httpx is imported inside the functions that send requests, when a download starts: 60 ms that every
other start-up (planning, a model already in the store) need not pay.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import os
import queue
import random
import re
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pipx_llama import __version__
from pipx_llama.errors import FetchError
from pipx_llama.events import ProgressEvent
from pipx_llama.fetch.errors import AccessDenied, NetworkError, SourceNotFound
from pipx_llama.fetch.options import FetchOptions
from pipx_llama.fetch.parts import Parts

if TYPE_CHECKING:
    import httpx

# A host name that does not resolve is not retried like a dropped connection: "no such name" is final,
# "temporary failure" (typical of a machine with no network) gets this many retries, so an offline
# user waits seconds, not the minute of a full backoff, before the next source or the error.
_DNS_RETRIES = 1
_DNS_FINAL = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL") if hasattr(socket, n)}


class Retry(Exception):
    """A failed attempt worth retrying (HTTP 5xx/429/408, short body, bad Content-Range)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Restart(Exception):
    """The partial download cannot be continued: discard it and start over."""

    def __init__(self, reason: str, *, retry: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.retry_after = retry_after


def redact_url(url: str) -> str:
    """The URL without its query string and credentials: presigned links carry secrets there."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return f"{p.scheme}://{host}{p.path}" + ("?…" if p.query else "")


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, allow_http: bool) -> None:
    try:
        p = urlsplit(url)
        host = p.hostname
    except ValueError:
        host = None
        p = None
    if p is None or p.scheme not in ("http", "https") or not host:
        raise FetchError(f"cannot download {redact_url(url)}: not an http(s) URL",
                         "check the URL in the manifest or on the command line")
    if p.scheme == "http" and not allow_http and not is_loopback(host):
        raise FetchError(
            f"refusing to download over plain http from {redact_url(url)}",
            "use an https URL; plain http is accepted only for localhost or when explicitly allowed "
            "(a trusted local mirror) -- the sha256 check still applies",
        )


_SSL_CONTEXTS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def _ssl_context() -> ssl.SSLContext:
    """httpx's verifying context (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), built once per setting."""
    import httpx  # here, not at the top: see the module docstring

    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    ctx = _SSL_CONTEXTS.get(key)
    if ctx is None:
        ctx = _SSL_CONTEXTS[key] = httpx.create_ssl_context(verify=True, trust_env=True)
    return ctx


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """Parse 'bytes a-b/total' (total may be '*')."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def validator_matches(resp: httpx.Response, validator: str) -> bool:
    """Whether ``resp`` carries ``validator`` (an ETag, or else a Last-Modified date)."""
    if validator.startswith(('"', "W/")):
        return resp.headers.get("etag") == validator
    return resp.headers.get("last-modified") == validator


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Source:
    """The server behind one download's URL, as the download talks to it.

    ``sources`` lists every URL whose bytes the download holds (a resumed download may have begun at
    another). Validators and sources change under ``parts.lock``: receiving threads learn them.
    """

    def __init__(self, url: str, name: str, options: FetchOptions, parts: Parts,
                 events: queue.SimpleQueue[ProgressEvent]) -> None:
        self.url = url
        self.shown_url = redact_url(url)
        self.name = name
        self.opt = options
        self.parts = parts
        self.events = events
        self.client: httpx.Client | None = None
        self.dns_failures = 0
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.validators = "any"   # which validators this source keeps stable: any | last-modified | none
        self.changes = 0          # times the validators changed during this download (see believe_change)
        self._changed_in: threading.Event | None = None
        self._believed = True
        self.sources: list[str] = []

    def open(self) -> None:
        """Make the client (its connection pool) the download's requests go through."""
        import httpx  # here, not at the top: see the module docstring

        o = self.opt
        timeout = httpx.Timeout(connect=o.timeout, read=o.stall_timeout, write=o.timeout, pool=o.timeout)
        n = max(1, o.parallel_parts)
        self.client = httpx.Client(
            timeout=timeout, follow_redirects=True, trust_env=True, verify=_ssl_context(),
            limits=httpx.Limits(max_connections=2 * n + 2, max_keepalive_connections=n + 1),
            headers={"User-Agent": f"pipx-llama/{__version__} httpx/{httpx.__version__}"},
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def sources_text(self) -> str:
        shown = [redact_url(s) for s in self.sources if s != self.url]
        if not shown:
            return self.shown_url
        return f"{self.shown_url} (resumed from bytes fetched from {', '.join(shown)})"

    # ---- requests

    def request(self, start: int | None, end: int | None, conditional: bool) -> httpx.Response:
        import httpx  # here, not at the top: see the module docstring

        headers = {"Accept-Encoding": "identity"}
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
            validator = self._if_range()
            if conditional and validator:
                headers["If-Range"] = validator
        if self.opt.authorization:
            headers["Authorization"] = self.opt.authorization
        elif self.opt.token:
            headers["Authorization"] = f"Bearer {self.opt.token}"
        client: httpx.Client = self.client  # type: ignore[assignment]
        o = self.opt
        left = max(0.1, o.give_up_after - (time.monotonic() - self.parts.last_byte))
        timeout = httpx.Timeout(connect=min(o.timeout, left), read=min(o.stall_timeout, left),
                                write=min(o.timeout, left), pool=min(o.timeout, left))
        try:
            request = client.build_request("GET", self.url, headers=headers, timeout=timeout)
            resp = client.send(request, stream=True)
        except httpx.TooManyRedirects:
            raise FetchError(f"too many redirects fetching {self.name} from {self.shown_url}",
                             "the source is misconfigured; try another source") from None
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            raise FetchError(f"cannot fetch {self.name} from {self.shown_url}: {exc}",
                             "the source redirects somewhere unusable; try another source") from None
        final = resp.url
        if final.scheme == "http" and not self.opt.allow_http and not is_loopback(final.host):
            resp.close()
            raise FetchError(f"{self.shown_url} redirected to plain http ({final.host}); refusing",
                             "use a source that stays on https, or allow plain http explicitly")
        code = resp.status_code
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if code in (200, 206) and encoding not in ("", "identity"):
            resp.close()
            raise FetchError(
                f"{self.shown_url} sent {self.name} with Content-Encoding {encoding[:40]!r} although "
                f"identity "
                "was asked for; refused (decoding it could write far more than the file's size)",
                "the server compresses on the fly; have it serve the file as it is",
            )
        if code in (200, 206, 416):
            return resp
        resp.close()
        if code in (404, 410):
            raise SourceNotFound(f"{self.name} is not at {self.shown_url} (HTTP {code})",
                                 "if no source has it, the manifest may be out of date")
        if code in (401, 403):
            raise self._access_denied(code)
        if code in (408, 429) or code >= 500:
            raise Retry(f"HTTP {code}", _retry_after(resp))
        raise FetchError(f"unexpected answer HTTP {code} fetching {self.name} from {self.shown_url}",
                         "try another source, or report the problem to whoever runs it")

    def _access_denied(self, code: int) -> AccessDenied:
        p = urlsplit(self.url)
        host = (p.hostname or "").lower()
        sent = "a token was sent and refused" if self.opt.token else "no token was sent"
        msg = f"access to {self.name} at {self.shown_url} was denied (HTTP {code}; {sent})"
        if host in ("huggingface.co", "hf.co") or host.endswith(".huggingface.co"):
            segs = [s for s in p.path.split("/") if s]
            page = "https://huggingface.co/" + "/".join(segs[:2]) if len(segs) >= 2 else "the model's page"
            hint = (f"this model is gated: log in to huggingface.co, accept its licence on {page}, create a "
                    "read token at https://huggingface.co/settings/tokens and set HF_TOKEN to it, then retry")
        elif re.search(r"(?i)(x-amz-signature|signature=|expires=|policy=|key-pair-id=)", p.query or ""):
            hint = ("this looks like a presigned download link, and such links expire: request a fresh one "
                    "(e.g. from Meta's download form) and pass it again, then retry"
                    + self.parts.kept(" -- "))
        else:
            hint = ("the server wants credentials: if it accepts a bearer token set HF_TOKEN to it, "
                    "otherwise ask whoever runs the server for access")
        return AccessDenied(msg, hint)

    # ---- validators: one version of the file

    def _if_range(self) -> str | None:
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def believe_change(self, resp: httpx.Response) -> bool:
        """A response's validators differ from ours: True if that means the file changed.

        The first change is believed (the partial is discarded). Validators that change again within
        one download belong to a server that labels the same bytes differently from response to
        response (a load balancer whose servers compute ETags apart): they stop being used -- the ETag
        alone when Last-Modified stayed the same, else both -- and the sha256 checked at the end, as
        always, is what guarantees the bytes.
        """
        with self.parts.lock:
            if self._changed_in is self.parts.stop:
                return self._believed  # parallel parts seeing the same change: it counts once per attempt
            self._changed_in = self.parts.stop
            self.changes += 1
            self._believed = self.changes < 2
            if self._believed:
                return True
            lm = resp.headers.get("last-modified")
            same_date = self.last_modified is not None and self.last_modified == lm
            if self.validators == "any" and self.etag is not None and same_date:
                self.validators, self.etag = "last-modified", None
                note = "its ETag changes from response to response; using Last-Modified instead"
            else:
                self.validators, self.etag, self.last_modified = "none", None, None
                note = ("its ETag/Last-Modified change from response to response; the sha256 check at the "
                        "end decides")
        self.events.put(ProgressEvent("notice", self.name, source=self.shown_url, message=note))
        return False

    def validators_differ(self, resp: httpx.Response) -> bool:
        etag, lm = resp.headers.get("etag"), resp.headers.get("last-modified")
        if self.etag and etag:
            return etag != self.etag
        if self.last_modified and lm:
            return lm != self.last_modified
        return False

    def learn_validators(self, resp: httpx.Response) -> None:
        with self.parts.lock:
            if self.etag is None and self.last_modified is None and self.validators != "none":
                if self.validators == "any":
                    self.etag = resp.headers.get("etag")
                self.last_modified = resp.headers.get("last-modified")
            if self.url not in self.sources:
                self.sources.append(self.url)

    def relearn_validators(self, resp: httpx.Response) -> None:
        """Take the validators of ``resp``, a response with the whole file from byte 0, instead of ours."""
        with self.parts.lock:
            self.etag = self.last_modified = None
        self.learn_validators(resp)

    # ---- failures, retries and patience

    def reason(self, exc: BaseException) -> tuple[str, float | None]:
        """Why an attempt failed, and the server's Retry-After; raises for errors not worth retrying."""
        import httpx  # here, not at the top: see the module docstring

        if isinstance(exc, Retry):
            return exc.reason, exc.retry_after
        if isinstance(exc, httpx.ReadTimeout):
            waited = self.opt.stall_timeout
            with contextlib.suppress(RuntimeError, AttributeError, KeyError, TypeError):
                waited = exc.request.extensions["timeout"]["read"]
            return f"no data for {waited:g}s (stalled connection)", None
        if isinstance(exc, httpx.ConnectTimeout):
            return "connecting timed out", None
        if isinstance(exc, httpx.ConnectError):
            cause: BaseException | None = exc
            while cause is not None:
                if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
                    cause
                ):
                    raise FetchError(
                        f"the TLS certificate of {urlsplit(self.url).hostname} could not be verified: {exc}",
                        "if you are behind a proxy that inspects TLS, point SSL_CERT_FILE at its CA bundle",
                    ) from None
                if isinstance(cause, socket.gaierror):
                    self._name_not_resolved(cause)
                cause = cause.__cause__ or cause.__context__
            return f"cannot connect: {exc}", None
        if isinstance(exc, httpx.RemoteProtocolError):
            return f"connection dropped: {exc}", None
        return f"{type(exc).__name__}: {exc}", None

    def _name_not_resolved(self, err: socket.gaierror) -> None:
        """Give up on this source at once (or after _DNS_RETRIES) when its host name does not resolve."""
        with self.parts.lock:
            self.dns_failures += 1
            failures = self.dns_failures
        if err.errno in _DNS_FINAL or failures > _DNS_RETRIES:
            host = urlsplit(self.url).hostname
            raise NetworkError(
                f"cannot download {self.name} from {self.shown_url}: the host name {host} does not resolve "
                f"({err.strerror or err})",
                "check the network connection, DNS and proxy settings (HTTPS_PROXY); without a network, "
                "use a model already in the store (--offline), a lab mirror (--mirror URL) or files you "
                "have (--from-dir DIR)",
            ) from None

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.opt.backoff_max, retry_after)
        base = min(self.opt.backoff_max, self.opt.backoff_base * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)

    def gave_up(self, reason: str, retries: int) -> NetworkError:
        return NetworkError(
            f"could not download {self.name} from {self.shown_url}: {reason} (gave up after {retries} "
            f"retries)",
            "check the network connection or proxy settings (HTTPS_PROXY)" + self.parts.kept("; "),
        )

    def check_patience(self, reason: str, delay: float) -> None:
        """Give up now if waiting ``delay`` more leaves the source silent for ``give_up_after`` seconds."""
        idle = time.monotonic() - self.parts.last_byte
        if idle + delay >= self.opt.give_up_after:
            raise self.stalled(reason, idle)

    def stalled(self, reason: str, idle: float) -> NetworkError:
        return NetworkError(
            f"could not download {self.name} from {self.shown_url}: nothing received for {idle:.0f} s "
            f"({reason})",
            "check the network connection or proxy settings (HTTPS_PROXY), or try later"
            + self.parts.kept("; ")
            + f"; `give_up_after` in the config file sets this limit ({self.opt.give_up_after:g} s)",
        )

