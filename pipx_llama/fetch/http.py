"""Verified, resumable HTTP(S) downloads with httpx: ranged parallel parts, retries, resume across restarts.

``download(url, dest, size=..., sha256=..., options=...)`` leaves ``dest`` holding exactly the bytes
whose size and sha256 the caller expects, or raises one of ``pipx_llama.fetch.errors``. Network
behaviour: TLS verification on, redirects followed, proxies and CA bundle from the environment
(httpx ``trust_env``: ``HTTPS_PROXY``, ``NO_PROXY``, ``SSL_CERT_FILE``...), a bearer token if given
(httpx drops it when a redirect leaves the origin, so CDN links never see it).

Resume state
    Next to ``dest`` lives ``dest + '.json'``: the URL, the expected sha256 and size, the server's
    validators (ETag / Last-Modified), the total size and the list of parts ``[start, end, done]``
    (byte offsets, ``end`` inclusive). It is rewritten atomically (temp file, fsync, rename) about
    once a second, always after an ``fdatasync`` of the data, so the state never claims bytes that
    are not on disk, even after a power cut. Writes to the file can wait while it syncs, so when a
    sync takes long (a link faster than the disk) the saves are spaced out to keep syncing under a
    tenth of the time -- but never more than 2 s or ``checkpoint_bytes`` (32 MB) per busy connection
    apart, which bounds what a kill costs. It is written before the data file is created, so a
    data file without a state file is always a finished download (re-hashed before it is trusted).

Encodings
    Requests ask for ``Accept-Encoding: identity`` and a response with any other ``Content-Encoding``
    is refused: decoding gzip or brotli would write an unbounded number of bytes for a file whose size
    the manifest may not give (a 6 MB "gzip bomb" expands to gigabytes), and the sha256 is of the file.

Never mixing two versions
    Every ranged request carries ``If-Range`` (a strong ETag, else Last-Modified). A server whose
    file changed answers 200 with the new file; a 206 whose ETag, Last-Modified or total differs
    from the state is treated the same way: the partial is discarded and the download starts over
    cleanly. Validators that change again within one download come from a server that labels the
    same bytes differently per response (a load balancer): the ETag is then dropped for
    Last-Modified if that stayed the same, else both are, and the final sha256 check decides.
    A server that ignores ``Range`` (200 to a ranged request) gets a single stream from
    byte 0; when that stream breaks, the rest is asked for with a ``Range`` (some servers answer a
    whole-file range with 200 yet honour others), and only a server that ignores it too is started
    over from byte 0 (it cannot resume).
    Resuming with a different URL keeps the bytes (the expected sha256 is the same) but keeps the
    validators only for the same scheme, host and path (a renewed presigned link); the final hash
    check is the last line of defence and the error then names every source that contributed.

Parallel parts
    Files of at least ``part_threshold`` bytes from servers that honour ``Range`` are split into
    ``parallel_parts`` ranges, each received by its own thread (a single stream is the same with one
    part). Receiving threads only parse; the writer thread writes into the (sparse, full-length) file.
    Each thread asks for its part in spans of a few seconds of transfer (``Range`` up to the span's
    end, the next span on the same connection), so that a thread that finishes its part can take
    half of the biggest remaining part (if both halves keep ``min_part``) above the span in flight:
    no byte a server has already pushed into a socket is thrown away. A thread also takes over the
    rest of a part that had no bytes for ``straggler_after`` seconds or runs far slower than the
    others (the only case where bytes are asked for twice). A connection with no bytes for
    ``stall_timeout`` seconds (httpx read timeout) is retried from where it stopped; after
    ``give_up_after`` seconds (60) without a byte from the source, retries included, the download gives
    up. Retries: exponential backoff with jitter on connection errors, timeouts, 5xx, 408 and 429
    (``Retry-After`` honoured, capped at ``backoff_max``); a response cut short after delivering data
    is continued at once with a new range and does not count as a retry, so a server that cuts every
    response short still completes.
    404/410 are not retried (``SourceNotFound``: the caller tries its next source).

Hashing
    A hasher thread hashes the finished prefix of the file while the download runs (fetch/hashing.py);
    size and hash are checked before returning; on mismatch the bad bytes are deleted.

Throughput
    Receiving, writing and hashing run on three threads: ``os.pwritev`` and ``hashlib`` release the
    GIL, so only parsing holds it. Bytes are copied as little as httpx allows: the chunks of
    ``iter_raw`` are queued as they are (a list per block of about 2 MiB, never joined for writing),
    written with one ``os.pwritev`` (``pwrite`` / seek+write where there is none, i.e. Windows) and
    hashed from those same objects. The connection reads the socket up to 1 MiB at a time instead of
    httpcore's 64 KiB, since h11 parses each read in Python and each hashlib call has to win the GIL
    back from the receiving thread: fewer, bigger chunks cut the client's CPU from about 1.6 to 1.4
    s/GiB on loopback (benchmarks/bench_fetch.py). Progress events are throttled (4 a
    second) and come from the calling thread.

Concurrency: one download per ``dest`` at a time -- the caller holds the per-blob lock.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import ipaddress
import json
import os
import queue
import random
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from pipx_llama import __version__
from pipx_llama.errors import DiskFullError, FetchError, UsageError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.fetch.diskio import O_BINARY, Writer, disk_full_error, fdatasync, is_disk_full
from pipx_llama.fetch.errors import AccessDenied, ChecksumError, NetworkError, OfflineError, SourceNotFound
from pipx_llama.fetch.hashing import Hasher, file_sha256
from pipx_llama.fetch.options import JOIN_GRACE, TICK, FetchOptions
from pipx_llama.fetch.parts import Part, Parts, human

__all__ = ["FetchOptions", "download", "partial_progress", "redact_url"]

_PROGRESS_EVERY = 0.25
_SPEED_WINDOW = 3.0
_SYNC_SHARE = 10
_CHECKPOINT_MAX = 2.0
_MAX_RESTARTS = 3
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ---- HTTP: URLs, requests, responses, validators, failure reasons, backoff and patience


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
        headers = {"Accept-Encoding": "identity"}
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
            validator = self._if_range()
            if conditional and validator:
                headers["If-Range"] = validator
        if self.opt.token:
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


# ---- resume state: the file a later run continues from


STATE_VERSION = 1


def state_path(dest: Path) -> Path:
    """Where the resume state of the partial download ``dest`` lives."""
    return Path(str(dest) + ".json")


def partial_progress(dest: Path) -> tuple[int, int | None] | None:
    """(bytes a next call resumes from, total or None) of a partial download at ``dest``, or None if
    there is none. A download from a server that cannot resume counts 0 bytes: the next call starts over.

    Reads only the state file; for listings of unfinished downloads.
    """
    try:
        state = json.loads(state_path(dest).read_text())
        if not state["ranges"] or state.get("decode"):
            return 0, state.get("total")
        return sum(int(p[2]) for p in state["parts"]), state.get("total")
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


@dataclass
class SavedState:
    """A resume state read back: the file's record, and its parts checked against the data on disk."""

    record: dict
    parts: list[Part]


def load_state(dest: Path, sha256: str, size: int | None) -> SavedState | None:
    """The saved state if it belongs to this file and is consistent with the data on disk."""
    try:
        state = json.loads(state_path(dest).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    try:
        if (state["version"] != STATE_VERSION or state["sha256"] != sha256
                or state["size"] != size or not state["ranges"] or state.get("decode")):
            return None
        total = state["total"]
        parts = [Part(int(s), None if e is None else int(e), int(d)) for s, e, d in state["parts"]]
        pos = 0
        for i, p in enumerate(parts):
            if (
                p.start != pos
                or p.done < 0
                or (p.end is None and (i != len(parts) - 1 or total is not None))
            ):
                return None
            if p.end is not None:
                if p.done > p.end + 1 - p.start:
                    return None
                pos = p.end + 1
        if total is not None and pos != total:
            return None
        on_disk = dest.stat().st_size
    except (KeyError, TypeError, ValueError, OSError):
        return None
    if on_disk < max((p.pos for p in parts), default=0):
        return None
    return SavedState(state, parts)


def adopt_state(saved: SavedState, parts: Parts, source: Source) -> None:
    """Continue from ``saved``: its parts, and its validators if ``source`` is the same URL path."""
    state = saved.record
    parts.adopt(state["total"], saved.parts)
    source.sources = [s for s in state.get("sources", []) if isinstance(s, str)]
    old, new = urlsplit(state["url"]), urlsplit(source.url)
    if (old.scheme, old.netloc, old.path) == (new.scheme, new.netloc, new.path):
        source.etag, source.last_modified = state.get("etag"), state.get("last_modified")
        mode, changes = state.get("validators"), state.get("changes")
        source.validators = mode if mode in ("any", "last-modified", "none") else "any"
        source.changes = changes if isinstance(changes, int) and changes >= 0 else 0
    else:
        source.etag = source.last_modified = None


def state_snapshot(source: Source, parts: Parts, sha256: str, size: int | None) -> dict:
    """The resume state as it is now (the caller holds the lock, or no other thread runs)."""
    return {
        "version": STATE_VERSION, "url": source.url, "sources": list(source.sources), "file": source.name,
        "sha256": sha256, "size": size, "total": parts.total, "etag": source.etag,
        "last_modified": source.last_modified, "validators": source.validators, "changes": source.changes,
        "ranges": parts.ranges, "decode": parts.decode,
        "parts": [[p.start, p.end, p.done] for p in parts.items], "updated": time.time(),
    }


def save_state(path: Path, snap: dict) -> None:
    """Write ``snap`` to ``path`` atomically (temp file, fsync, rename); raises OSError."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(snap, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def forget_state(dest: Path) -> None:
    """Delete the resume state of ``dest`` (a finished download keeps its data)."""
    path = state_path(dest)
    for p in (path, Path(str(path) + ".tmp")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def discard_partial(dest: Path) -> None:
    """Delete a partial download: its data and its resume state."""
    try:
        dest.unlink()
    except FileNotFoundError:
        pass
    forget_state(dest)


# ---- receiving threads: the first request, then each part span by span


_WRITE_BLOCK = 2 << 20
_FLUSH_AFTER = 0.25
_READ_SIZE = 1 << 20
# A failed attempt that still delivered this much is continued at once, without counting as a retry:
# a server (or proxy) that cuts every response short still completes the file, range by range.
_MIN_PROGRESS = 64 << 10


def _widen_reads(resp: httpx.Response) -> None:
    """Let the connection behind ``resp`` read the socket up to _READ_SIZE bytes at a time.

    httpcore reads 64 KiB per call (a class constant, not a client setting) and h11 parses every read
    in Python; on a fast link that parsing, not the network, limits a download. The connection's
    network stream is public (the ``network_stream`` response extension): its ``read`` is wrapped on
    this one object, so only our own client's connections change. h11 accepts reads of any size;
    TLS sockets return one record (<= 16 KiB) per read whatever the size asked for.
    """
    stream = resp.extensions.get("network_stream")
    read = getattr(stream, "read", None)
    if read is None or getattr(read, "wide", False):
        return

    def wide_read(max_bytes: int, timeout: float | None = None) -> bytes:
        return read(max(max_bytes, _READ_SIZE), timeout)

    wide_read.wide = True  # type: ignore[attr-defined]
    try:
        stream.read = wide_read  # type: ignore[union-attr]
    except AttributeError:
        pass


class Receiver:
    """What the first request of a fresh download, and then every receiving thread, does."""

    def __init__(self, parts: Parts, source: Source, events: queue.SimpleQueue[ProgressEvent],
                 size: int | None, sha256: str) -> None:
        self.parts = parts
        self.source = source
        self.events = events
        self.size = size
        self.sha256 = sha256
        self.opt = parts.opt
        self.name = source.name

    # ---- the first request of a fresh download

    def probe(self, emit: Callable[[ProgressEvent], None]) -> tuple[Part, httpx.Response] | None:
        """Open the first response, learn size, validators and Range support; plan the parts.

        Runs in the calling thread before any other starts: its events go to ``emit`` at once.
        """
        o = self.opt
        source = self.source
        parallel = o.parallel_parts > 1 and self.size is not None and self.size >= o.part_threshold
        first_end = (min(-(-self.size // o.parallel_parts), 2 * o.min_part) - 1
                     if parallel and self.size else None)
        attempt = 0
        while True:
            try:
                if self.size == 0:
                    resp = source.request(None, None, conditional=False)
                else:
                    resp = source.request(0, first_end, conditional=False)
                try:
                    return self._plan(resp)
                except BaseException:
                    resp.close()
                    raise
            except (Retry, httpx.TransportError) as exc:
                reason, retry_after = source.reason(exc)
                attempt += 1
                if attempt > o.max_retries:
                    raise source.gave_up(reason, attempt - 1) from None
                delay = source.backoff(attempt, retry_after)
                source.check_patience(reason, delay)
                emit(
                    ProgressEvent(
                        "retry",
                        self.name,
                        source=source.shown_url,
                        message=f"{reason}; retry {attempt}/{o.max_retries} in {delay:.1f}s",
                    )
                )
                time.sleep(delay)

    def _plan(self, resp: httpx.Response) -> tuple[Part, httpx.Response] | None:
        code = resp.status_code
        parts, source = self.parts, self.source
        source.sources = []
        source.relearn_validators(resp)
        cr = None
        if code == 416:
            unsatisfied = re.fullmatch(r"\s*bytes\s+\*/0\s*", resp.headers.get("content-range", ""))
            resp.close()
            if not unsatisfied:
                raise FetchError(f"the server refused the first range of {self.name} at {source.shown_url} "
                                 "(HTTP 416)", "try another source")
            total: int | None = 0
            parts.ranges = True
        elif code == 206:
            cr = content_range(resp.headers.get("content-range"))
            if cr is None or cr[0] != 0:
                raise FetchError(f"the server sent an invalid Content-Range for {self.name}: "
                                 f"{resp.headers.get('content-range')!r}", "try another source")
            total = cr[2]
            parts.ranges = True
        else:
            parts.ranges = False
            length = resp.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
        if self.size is not None and total is not None and total != self.size:
            raise ChecksumError(
                f"size mismatch for {self.name} at {source.shown_url}: expected {self.size} bytes, "
                f"the server has {total}; nothing was downloaded",
                "the source holds another version of the file; if no source has this one, the manifest may "
                "be out of date",
                file=self.name, source=source.url, expected=self.sha256, actual=f"(size {total} bytes)")
        p0 = parts.lay_out(total if total is not None else self.size)
        if p0 is None:
            resp.close()
            return None
        p0.req_end = cr[1] if cr is not None else -1 if parts.total is None else parts.total - 1
        return p0, resp

    # ---- a receiving thread

    def run(self, first: tuple[Part, httpx.Response] | None, stop: threading.Event, writer: Writer) -> None:
        """Receive parts until none is left to claim or the attempt stops (a receiving thread's target)."""
        parts = self.parts
        try:
            while not stop.is_set():
                if first is not None:
                    part, resp = first
                    first = None
                else:
                    part, resp = parts.claim(), None
                if part is None:
                    if parts.all_complete() or stop.wait(TICK * 2):
                        return
                    continue
                try:
                    self._fetch_part(part, resp, stop, writer)
                finally:
                    with parts.lock:
                        part.active = False
        except Exception as exc:  # noqa: BLE001  (re-raised by the supervising thread)
            parts.fail(stop, exc)
        finally:
            if first is not None:
                first[1].close()

    def _fetch_part(
        self, part: Part, resp: httpx.Response | None, stop: threading.Event, writer: Writer
    ) -> None:
        parts, source = self.parts, self.source
        attempt = 0
        while not part.all_queued and not stop.is_set():
            before = part.queued
            try:
                if resp is None:
                    resp = source.request(part.qpos, parts.open_span(part), conditional=True)
                    self._accept(resp, part)
                self._stream(resp, part, stop, writer)
                if part.end is None and not stop.is_set():
                    with parts.lock:
                        part.end = part.qpos - 1
                        parts.total = part.qpos
                    return
                if part.qpos > part.req_end >= 0:
                    continue  # the span is done; the next one goes out on the same connection
                if not part.all_queued and not stop.is_set():
                    raise Retry("the connection closed before the part was complete")
            except (Retry, httpx.TransportError) as exc:
                reason, retry_after = source.reason(exc)
                if stop.is_set() or part.all_queued:
                    return
                if not parts.ranges and (parts.total is None or parts.decode or part.qpos == 0):
                    raise Restart(reason, retry=True, retry_after=retry_after) from None
                # a server that cuts responses short but sends data is healthy: ask for the rest at once,
                # as the first retry of a new series (a whole-file 200 is asked for a Range now, see _accept)
                progressed = part.queued - before >= _MIN_PROGRESS
                attempt = 1 if progressed else attempt + 1
                if attempt > self.opt.max_retries:
                    raise source.gave_up(reason, attempt - 1) from None
                delay = 0.0 if progressed else source.backoff(attempt, retry_after)
                source.check_patience(reason, delay)
                with parts.lock:
                    done = sum(p.done for p in parts.items)
                self.events.put(ProgressEvent(
                    "retry", self.name, done=done, total=parts.total, source=source.shown_url,
                    message=f"{reason} at byte {part.qpos}; " + (
                        "continuing from there" if progressed else
                        f"retry {attempt}/{self.opt.max_retries} in {delay:.1f}s")))
                if delay and stop.wait(delay):
                    return
            finally:
                if resp is not None:
                    resp.close()
                    resp = None

    def _accept(self, resp: httpx.Response, part: Part) -> None:
        """Check a ranged response continues this very file at this very offset."""
        parts, source = self.parts, self.source
        code = resp.status_code
        if code == 416:
            raise Restart("the source can no longer serve the rest of the file (HTTP 416)")
        if code == 200:
            if part.start == 0 and part.queued == 0 and len(parts.items) == 1:
                source.relearn_validators(resp)
                return
            if not parts.ranges:
                # the stream of a whole-file 200 broke, and the Range asking for the rest was ignored too
                raise Restart("the request for the rest of the file was answered from byte 0", retry=True)
            sent = resp.request.headers.get("if-range")
            if sent is not None and not validator_matches(resp, sent):
                if source.believe_change(resp):
                    raise Restart("the file at the source has changed (new ETag/Last-Modified)")
                # the If-Range validator was this server's own whim: ask again with what is still trusted
                raise Retry("the server sent the whole file instead of the range (If-Range did not match)",
                            0.0)
            raise Restart("the server ignored the Range request and sent the whole file")
        cr = content_range(resp.headers.get("content-range"))
        if cr is None or cr[0] != part.qpos:
            raise Retry(f"the server answered with the wrong range ({resp.headers.get('content-range')!r} "
                        f"for byte {part.qpos})")
        if cr[2] is not None and parts.total is not None and cr[2] != parts.total:
            raise Restart(f"the file at the source changed size ({parts.total} -> {cr[2]} bytes)")
        if source.validators_differ(resp) and source.believe_change(resp):
            raise Restart("the file at the source has changed (new ETag/Last-Modified)")
        source.learn_validators(resp)
        if not parts.ranges:
            with parts.lock:
                parts.ranges = True  # it answered a whole-file request with 200, yet honours Range: resumable
        if 0 <= cr[1] < part.req_end:
            with parts.lock:
                part.req_end = cr[1]  # a server may answer a shorter range than asked

    def _stream(self, resp: httpx.Response, part: Part, stop: threading.Event, writer: Writer) -> None:
        """Receive the body and queue it for the writer in blocks of about _WRITE_BLOCK bytes.

        A block is the list of chunks as httpx delivered them (no copying); it is queued when it is big
        enough or _FLUSH_AFTER seconds old, so slow connections still show progress and checkpoint.
        """
        _widen_reads(resp)
        chunks = resp.iter_raw()
        block: list[bytes | memoryview] = []
        pending = 0
        flushed = time.monotonic()
        parts = self.parts
        lock = parts.lock
        try:
            for chunk in chunks:
                size = len(chunk)
                now = time.monotonic()
                with lock:
                    if stop.is_set():
                        return
                    room = size if part.end is None else part.end + 1 - part.qpos - pending
                    n = max(0, min(size, room))
                    part.reserved = part.queued + pending + n
                    part.last_data = parts.last_byte = now
                    part.received += n
                    parts.session_received += n
                if n:
                    block.append(chunk if n == size else memoryview(chunk)[:n])
                    pending += n
                if n < size or (part.end is not None and part.qpos + pending > part.end):
                    break
                if pending >= _WRITE_BLOCK or now - flushed >= _FLUSH_AFTER:
                    self._queue_block(block, pending, part, writer)
                    block, pending, flushed = [], 0, now
        except httpx.TransportError:
            if pending:
                self._queue_block(block, pending, part, writer)
            raise
        if pending:
            self._queue_block(block, pending, part, writer)

    def _queue_block(self, chunks: list[bytes | memoryview], size: int, part: Part, writer: Writer) -> None:
        with self.parts.lock:
            part.queued += size
        writer.put(part, chunks, size)


# ---- the supervisor: one call of download()

def download(url: str, dest: Path, *, size: int | None, sha256: str, options: FetchOptions,
             on_event: EventCallback | None = None, label: str = "") -> None:
    """Fetch ``url`` into ``dest``, resuming what an earlier run left there; verify size and sha256.

    ``dest`` is a '.part' file under the store's partial/ folder; its resume state is ``dest + '.json'``.
    On success ``dest`` holds the verified bytes, fsynced (the caller renames it into the store) and the
    state file is gone. ``label`` names the file in events and messages (default: ``dest.name``).
    Raises ``OfflineError`` (before any network use), ``FetchError`` (refused URL, protocol errors),
    ``SourceNotFound``, ``AccessDenied``, ``NetworkError`` (retries exhausted, or no byte for
    ``give_up_after`` seconds), ``DiskFullError``, ``ChecksumError`` (bad bytes deleted). Whether a partial
    download was kept for a resume is said in the hint, and only when it was.
    """
    dest = Path(dest)
    name = label or dest.name
    if options.offline:
        raise OfflineError(
            f"{name} is not downloaded yet and offline mode is on (it would come from {redact_url(url)})",
            "run again without --offline (and without PIPX_LLAMA_OFFLINE=1), or import the file "
            "from a folder you already have",
        )
    check_url(url, options.allow_http)
    expected = sha256.strip().lower()
    if not _HEX64.fullmatch(expected):
        raise UsageError(f"invalid sha256 for {name}: {sha256!r} is not 64 hex digits",
                         "fix the checksum in the manifest")
    if size is not None and size < 0:
        raise UsageError(f"invalid size for {name}: {size}", "fix the size in the manifest")
    try:
        _Job(url, dest, size, expected, options, on_event, name).run()
    except OSError as exc:
        raise FetchError(f"cannot write the download of {name} at {dest}: {exc.strerror or exc}",
                         "check that the folder exists, is writable and its disk is healthy") from exc


class _Job:
    """One call of download(): its parts and source, the attempts, and the loop supervising each."""

    def __init__(self, url: str, dest: Path, size: int | None, sha256: str, options: FetchOptions,
                 on_event: EventCallback | None, name: str) -> None:
        self.url = url
        self.dest = dest
        self.state_path = state_path(dest)
        self.size = size
        self.sha256 = sha256
        self.opt = options
        self.on_event = on_event
        self.name = name
        # events of the other threads, emitted by the calling thread
        self.events: queue.SimpleQueue[ProgressEvent] = queue.SimpleQueue()
        self.parts = Parts(options)
        self.source = Source(url, name, options, self.parts, self.events)
        self.shown_url = self.source.shown_url
        self.receiver = Receiver(self.parts, self.source, self.events, size, sha256)

    # ---- top level

    def run(self) -> None:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        saved = load_state(self.dest, self.sha256, self.size)
        if saved is None:
            if self._finished_file_ok():
                return
            discard_partial(self.dest)
        self.source.open()
        self.parts.last_byte = time.monotonic()  # patience counts from here, not from hashing a finished file
        try:
            restarts = retries = 0
            while True:
                try:
                    digest, length = self._transfer(saved)
                    break
                except Restart as r:
                    saved = None
                    discard_partial(self.dest)
                    self.parts.items = []
                    if r.retry:
                        retries += 1
                        if retries > self.opt.max_retries:
                            raise self.source.gave_up(r.reason, retries - 1) from None
                        delay = self.source.backoff(retries, r.retry_after)
                        self.source.check_patience(r.reason, delay)
                        self._emit(ProgressEvent(
                            "retry", self.name, source=self.shown_url,
                            message=f"{r.reason}; the server cannot resume, starting over in {delay:.1f}s "
                                    f"(retry {retries}/{self.opt.max_retries})"))
                        time.sleep(delay)
                    else:
                        restarts += 1
                        if restarts > _MAX_RESTARTS:
                            raise FetchError(
                                f"could not download {self.name} from {self.shown_url}: {r.reason}, "
                                f"{restarts} times in a row",
                                "the file at the source keeps changing; try again later or another source",
                            ) from None
                        self._emit(ProgressEvent("restart", self.name, source=self.shown_url,
                                                 message=f"{r.reason}; discarding the partial download "
                                                         "and starting over"))
        finally:
            self.source.close()
        self._finish(digest, length)

    def _emit(self, event: ProgressEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _drain_events(self) -> None:
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            self._emit(ev)

    # ---- state on disk

    def _snapshot(self) -> dict:
        return state_snapshot(self.source, self.parts, self.sha256, self.size)

    def _write_state(self, snap: dict) -> None:
        try:
            save_state(self.state_path, snap)
        except OSError as exc:
            if is_disk_full(exc):
                raise self._disk_full() from None
            raise

    def _checkpoint(self, fd: int) -> None:
        with self.parts.lock:
            snap = self._snapshot()
            self.parts.saved_bytes = self.parts.session_bytes
        fdatasync(fd)
        self._write_state(snap)

    def _finished_file_ok(self) -> bool:
        """A data file without state is a finished download from an earlier run: trust it only if it
        verifies."""
        try:
            if self.size is None or self.dest.stat().st_size != self.size:
                return False
        except FileNotFoundError:
            return False
        if file_sha256(self.dest) != self.sha256:
            return False
        self._emit(ProgressEvent("verified", self.name, done=self.size, total=self.size,
                                 message="already downloaded"))
        self._emit(ProgressEvent("done", self.name, done=self.size, total=self.size))
        return True

    def _disk_full(self) -> DiskFullError:
        return disk_full_error(self.dest, self.name, self.parts)

    # ---- one transfer attempt (fresh or resumed)

    def _transfer(self, saved: SavedState | None) -> tuple[str, int]:
        parts = self.parts
        # a fresh event per attempt: threads of an abandoned attempt keep seeing theirs set
        stop = parts.new_attempt()
        first: tuple[Part, httpx.Response] | None = None
        if saved is not None:
            adopt_state(saved, parts, self.source)
            if self.url not in self.source.sources:
                self.source.sources.append(self.url)
        else:
            first = self.receiver.probe(self._emit)
            try:
                self._write_state(self._snapshot())
            except BaseException:
                if first is not None:
                    first[1].close()
                raise
        try:
            fd = os.open(self.dest, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        except BaseException:
            if first is not None:
                first[1].close()
            raise
        hasher: Hasher | None = None
        writer: Writer | None = None
        workers: list[threading.Thread] = []
        try:
            if parts.total is not None and os.fstat(fd).st_size < parts.total:
                os.ftruncate(fd, parts.total)
            done = sum(p.done for p in parts.items)
            if parts.total is not None and shutil.disk_usage(self.dest.parent).free < parts.total - done:
                raise self._disk_full()
            self._emit(ProgressEvent(
                "start", self.name, done=done, total=parts.total, source=self.shown_url,
                message=(f"resuming at {human(done)}" if done else "starting")
                + (f" of {human(parts.total)}" if parts.total is not None else "")))
            hasher = Hasher(self.dest, parts.frontier)
            hasher.start()
            writer = Writer(parts, self.dest, self.name, hasher, stop)
            writer.start()
            workers.append(writer)
            n = self.opt.parallel_parts if parts.parallel() else 1
            for i in range(max(1, n)):
                w = threading.Thread(target=self.receiver.run, args=(first if i == 0 else None, stop, writer),
                                     daemon=True, name=f"fetch-part-{i}")
                workers.append(w)
                w.start()
            first = None
            self._supervise(workers, fd)
            if parts.error is not None:
                raise parts.error
            with parts.lock:
                length = sum(p.done for p in parts.items)
            # what is still unhashed (parts after the first) is hashed while the data is synced
            hasher.finish(length)
            self._checkpoint(fd)
            digest = hasher.result()
            hasher = None
            return digest, length
        except DiskFullError:
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise self._disk_full() from None
            raise
        finally:
            if first is not None:
                first[1].close()
            stop.set()
            if writer is not None:
                writer.close()
            deadline = time.monotonic() + JOIN_GRACE
            for w in workers:
                w.join(max(0.0, deadline - time.monotonic()))
            if hasher is not None:
                hasher.abort()
            try:
                if parts.error is not None or any(w.is_alive() for w in workers) or hasher is not None:
                    self._checkpoint(fd)
            except (OSError, FetchError):
                pass
            finally:
                os.close(fd)

    def _supervise(self, workers: list[threading.Thread], fd: int) -> None:
        parts = self.parts
        last_cp = last_ev = time.monotonic()
        cp_every = self.opt.checkpoint_interval
        samples: collections.deque[tuple[float, int]] = collections.deque()
        while True:
            # cleared before looking: a writer that finishes or fills a checkpoint after this sets it again
            parts.wake.clear()
            self._drain_events()
            if parts.error is not None or parts.all_complete() or not any(w.is_alive() for w in workers):
                break
            now = time.monotonic()
            with parts.lock:
                done = sum(p.done for p in parts.items)
                session = parts.session_bytes
                due = parts.checkpoint_due_locked()
            samples.append((now, session))
            while samples and samples[0][0] < now - _SPEED_WINDOW:
                samples.popleft()
            if now - last_ev >= _PROGRESS_EVERY:
                last_ev = now
                t0, b0 = samples[0]
                speed = (session - b0) / (now - t0) if now - t0 > 0.2 else None
                eta = ((parts.total - done) / speed if speed and parts.total is not None else None)
                self._emit(ProgressEvent("progress", self.name, done=done, total=parts.total, speed=speed,
                                         eta=eta, source=self.shown_url))
            if now - parts.last_byte >= self.opt.give_up_after:
                # every connection is stuck (in a read, a connect or a backoff): do not wait for them
                idle = now - parts.last_byte
                parts.error = self.source.stalled("no connection is receiving anything", idle)
                break
            if now - last_cp >= cp_every or due:
                self._checkpoint(fd)
                last_cp = time.monotonic()
                # while the data syncs, the writer's writes can wait for it (ext4 does): on a link faster
                # than the disk, sync less often so that syncing takes at most ~1/_SYNC_SHARE of the time
                cp_every = min(max(self.opt.checkpoint_interval, (last_cp - now) * _SYNC_SHARE),
                               max(self.opt.checkpoint_interval, _CHECKPOINT_MAX))
            parts.wake.wait(TICK)
        parts.stop.set()
        self._drain_events()
        if parts.error is None and not parts.all_complete():
            parts.error = FetchError(f"download of {self.name} stopped before it was complete",
                                     "run the same command again" + parts.kept(": "))

    def _finish(self, digest: str, length: int) -> None:
        if self.size is not None and length != self.size:
            discard_partial(self.dest)
            raise ChecksumError(
                f"size mismatch for {self.name} from {self.source.sources_text()}: expected {self.size} "
                f"bytes, got {length}; the download was deleted",
                "the source does not serve the file the manifest describes; if no source does, the manifest "
                "may be out of date",
                file=self.name, source=self.url, expected=self.sha256, actual=f"(size {length} bytes)")
        if digest != self.sha256:
            discard_partial(self.dest)
            raise ChecksumError(
                f"checksum mismatch for {self.name} from {self.source.sources_text()}: expected sha256 "
                f"{self.sha256}, got {digest}; the bad download was deleted",
                "if this keeps happening the source serves a different file than the manifest describes",
                file=self.name, source=self.url, expected=self.sha256, actual=digest)
        with open(self.dest, "rb+") as f:
            if os.fstat(f.fileno()).st_size != length:
                f.truncate(length)
            fdatasync(f.fileno())
        forget_state(self.dest)
        self._emit(ProgressEvent("verified", self.name, done=length, total=length, source=self.shown_url,
                                 message=f"sha256 {digest}"))
        self._emit(ProgressEvent("done", self.name, done=length, total=length, source=self.shown_url))
