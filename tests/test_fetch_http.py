"""download() against the real threaded test server (tests/httpserver.py) on 127.0.0.1, with injected
faults."""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import itertools
import json
import os
import random
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from httpserver import FileServer

from pipx_llama.errors import FetchError, UsageError
from pipx_llama.events import ProgressEvent
from pipx_llama.fetch import diskio as fetch_diskio
from pipx_llama.fetch import hashing as fetch_hashing
from pipx_llama.fetch import http as fetch_http
from pipx_llama.fetch import receive as fetch_receive
from pipx_llama.fetch import source as fetch_source
from pipx_llama.fetch.errors import AccessDenied, ChecksumError, NetworkError, OfflineError, SourceNotFound
from pipx_llama.fetch.http import FetchOptions, download, partial_progress, redact_url

MB = 1 << 20


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def opts(**kw: object) -> FetchOptions:
    """Options with test-sized timings: tiny backoff, quick stall detection, frequent checkpoints."""
    base: dict[str, object] = {"backoff_base": 0.01, "backoff_max": 2.0, "stall_timeout": 5.0, "timeout": 5.0,
                               "checkpoint_interval": 0.2, "max_retries": 3}
    base.update(kw)
    return FetchOptions(**base)  # type: ignore[arg-type]


class Events(list):
    def __call__(self, ev: ProgressEvent) -> None:
        self.append(ev)

    def kinds(self) -> list[str]:
        return [e.kind for e in self if e.kind != "progress"]

    def of(self, kind: str) -> list[ProgressEvent]:
        return [e for e in self if e.kind == kind]


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


def ranges_requested(srv: FileServer, path: str) -> list[str | None]:
    return [h.get("Range") for m, p, h in srv.requests if p == path]


def state_of(dest: Path) -> dict:
    return json.loads(Path(str(dest) + ".json").read_text())


# ---- plain downloads


def test_single_stream_download_verifies_and_reports(server, tmp_path):
    data = blob(3 * MB)
    url = server.put("/m.bin", data)
    dest = tmp_path / "partial" / "m.part"
    ev = Events()
    download(url, dest, size=len(data), sha256=sha(data), options=opts(), on_event=ev, label="m.bin")
    assert dest.read_bytes() == data
    assert not Path(str(dest) + ".json").exists()
    assert ev.kinds() == ["start", "verified", "done"]
    assert all(e.file == "m.bin" for e in ev)
    assert ev.of("done")[0].done == len(data)
    assert server.bytes_sent == len(data)
    assert ranges_requested(server, "/m.bin") == ["bytes=0-"]


def test_parallel_parts_cover_the_file_once(server, tmp_path):
    data = blob(12 * MB, 1)
    url = server.put("/big.bin", data)
    dest = tmp_path / "big.part"
    download(url, dest, size=len(data), sha256=sha(data),
             options=opts(parallel_parts=4, part_threshold=4 * MB, min_part=MB))
    assert dest.read_bytes() == data
    rngs = ranges_requested(server, "/big.bin")
    # the first part is asked for in spans (2 x min_part at first), so it can be split above its span
    assert rngs[0] == f"bytes=0-{2 * MB - 1}"
    assert len(rngs) >= 4
    # only a straggler taken over (silent for seconds: not here) has bytes asked for twice
    assert server.bytes_requested_twice("/big.bin") == 0
    assert server.bytes_sent == len(data)


def test_a_split_never_wastes_what_the_server_already_sent(server, tmp_path):
    """Each connection asks for spans; a part is split above the open span, so nothing is thrown away."""
    data = blob(48 * MB, 3)
    url = server.put("/split.bin", data)
    server.faults("/split.bin").stall_after = 256 * 1024  # the first response (part 0) pauses a second
    server.faults("/split.bin").stall_for = 1.0
    ev = Events()
    download(url, tmp_path / "s.part", size=len(data), sha256=sha(data), on_event=ev,
             options=opts(parallel_parts=4, part_threshold=4 * MB, min_part=MB, straggler_after=30))
    assert (tmp_path / "s.part").read_bytes() == data
    assert not ev.of("retry") and not ev.of("restart")  # a finished span is not a failed attempt
    rngs = ranges_requested(server, "/split.bin")
    assert rngs[0] == f"bytes=0-{2 * MB - 1}"
    # the three other parts end while part 0 waits: their connections split its rest above byte 2 MiB
    starts = sorted(int(r.split("=")[1].split("-")[0]) for r in rngs)
    assert len([s for s in starts if 2 * MB <= s < 12 * MB]) >= 2, rngs
    assert server.bytes_requested_twice("/split.bin") == 0
    assert server.bytes_sent == len(data)


@pytest.mark.parametrize("parallel", [False, True])
def test_server_answering_shorter_ranges_than_asked(server, tmp_path, parallel):
    data = blob(6 * MB, 4)
    url = server.put("/short.bin", data)
    server.faults("/short.bin").max_range = 700 * 1024
    ev = Events()
    o = opts(parallel_parts=4, part_threshold=MB, min_part=256 * 1024) if parallel else opts()
    download(url, tmp_path / "sh.part", size=len(data), sha256=sha(data), options=o, on_event=ev)
    assert (tmp_path / "sh.part").read_bytes() == data
    assert not ev.of("retry") and not ev.of("restart")  # each short answer is continued, not retried
    assert server.bytes_sent == len(data)
    assert len(ranges_requested(server, "/short.bin")) >= len(data) // (700 * 1024)


def test_empty_file_and_unknown_size(server, tmp_path):
    url = server.put("/empty", b"")
    download(url, tmp_path / "e.part", size=0, sha256=sha(b""), options=opts())
    assert (tmp_path / "e.part").read_bytes() == b""
    data = blob(MB + 123, 2)
    url = server.put("/chunked", data)
    server.faults("/chunked").chunked = True
    server.faults("/chunked").ignore_range = True
    ev = Events()
    download(url, tmp_path / "c.part", size=None, sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "c.part").read_bytes() == data
    assert ev.of("start")[0].total is None


def test_redirects_followed_and_token_kept_on_origin(tmp_path):
    data = blob(MB, 3)
    with FileServer() as a, FileServer() as b:
        b_url = b.put("/cdn/blob", data)
        a.put("/real", data)
        a.faults("/real").require_token = "s3cret"
        a.redirect("/r1", "/r2")
        a.redirect("/r2", "/real")
        download(
            a.url("/r1"), tmp_path / "x.part", size=len(data), sha256=sha(data), options=opts(token="s3cret")
        )
        assert (tmp_path / "x.part").read_bytes() == data
        assert all(h.get("Authorization") == "Bearer s3cret" for _, _, h in a.requests)
        # a redirect to another origin (a CDN) must not carry the token along
        a.redirect("/to-cdn", b_url)
        download(
            a.url("/to-cdn"),
            tmp_path / "y.part",
            size=len(data),
            sha256=sha(data),
            options=opts(token="s3cret"),
        )
        assert (tmp_path / "y.part").read_bytes() == data
        assert b.requests and all("Authorization" not in h for _, _, h in b.requests)


def test_proxy_from_environment(server, tmp_path, monkeypatch):
    data = blob(MB, 4)
    server.put("/via-proxy.bin", data)
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url(""))
    download("http://files.example.invalid/via-proxy.bin", tmp_path / "p.part", size=len(data),
             sha256=sha(data), options=opts(allow_http=True))
    assert (tmp_path / "p.part").read_bytes() == data
    assert server.proxied >= 1


# ---- refusals before any network use


def test_offline_refuses_before_network(server, tmp_path):
    data = blob(1000)
    url = server.put("/o", data)
    with pytest.raises(OfflineError) as err:
        download(
            url, tmp_path / "sub" / "o.part", size=len(data), sha256=sha(data), options=opts(offline=True)
        )
    assert "offline" in err.value.message
    assert server.requests == []
    assert not (tmp_path / "sub").exists()


def test_plain_http_refused_unless_loopback_or_allowed(tmp_path):
    with pytest.raises(FetchError) as err:
        download("http://example.com/x.gguf", tmp_path / "x.part", size=1, sha256="0" * 64, options=opts())
    assert "plain http" in err.value.message
    with pytest.raises(FetchError, match="not an http"):
        download("ftp://example.com/x", tmp_path / "x.part", size=1, sha256="0" * 64, options=opts())
    with pytest.raises(UsageError):
        download("https://example.com/x", tmp_path / "x.part", size=1, sha256="xyz", options=opts())


def test_tls_is_verified_and_ca_bundle_from_environment(tmp_path, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    data = blob(MB, 5)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with FileServer(tls=ctx) as srv:
        url = srv.put("/t.bin", data)
        ev = Events()
        with pytest.raises(FetchError) as err:
            download(url, tmp_path / "t.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
        assert "certificate" in err.value.message and "SSL_CERT_FILE" in err.value.hint
        assert not ev.of("retry"), "a certificate failure is not retried"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        download(url, tmp_path / "t.part", size=len(data), sha256=sha(data), options=opts())
        assert (tmp_path / "t.part").read_bytes() == data


# ---- HTTP errors


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(SourceNotFound) as err:
        download(server.url("/missing"), tmp_path / "m.part", size=10, sha256="0" * 64, options=opts())
    assert "HTTP 404" in err.value.message
    assert len(server.requests) == 1


def test_401_and_403_say_how_to_get_access(server, tmp_path):
    data = blob(1000)
    url = server.put("/gated", data)
    server.faults("/gated").require_token = "good"
    with pytest.raises(AccessDenied) as err:
        download(url, tmp_path / "g.part", size=len(data), sha256=sha(data), options=opts())
    assert "HTTP 401" in err.value.message and "no token was sent" in err.value.message
    assert "HF_TOKEN" in err.value.hint
    with pytest.raises(AccessDenied, match="token was sent and refused"):
        download(url, tmp_path / "g.part", size=len(data), sha256=sha(data), options=opts(token="bad"))
    assert len(server.requests) == 2, "401 is not retried"
    download(url, tmp_path / "g.part", size=len(data), sha256=sha(data), options=opts(token="good"))
    assert (tmp_path / "g.part").read_bytes() == data

    server.put("/signed", data)
    server.faults("/signed").status = 403
    signed = server.url("/signed?X-Amz-Signature=deadbeefcafe&Expires=1700000000")
    with pytest.raises(AccessDenied) as err:
        download(signed, tmp_path / "s.part", size=len(data), sha256=sha(data), options=opts())
    assert "HTTP 403" in err.value.message and "presigned" in err.value.hint
    assert "deadbeefcafe" not in err.value.message, "secrets in the query string stay out of messages"


def test_429_and_503_honour_retry_after(server, tmp_path):
    data = blob(MB, 6)
    url = server.put("/busy", data)
    server.faults("/busy").statuses = [(429, "1"), (503, None)]
    ev = Events()
    t0 = time.monotonic()
    download(url, tmp_path / "b.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert time.monotonic() - t0 >= 0.95
    msgs = [e.message for e in ev.of("retry")]
    assert len(msgs) == 2 and "HTTP 429" in msgs[0] and "in 1.0s" in msgs[0] and "HTTP 503" in msgs[1]
    assert (tmp_path / "b.part").read_bytes() == data
    # a Retry-After longer than backoff_max is capped
    server.faults("/busy").statuses = [(503, "30")]
    t0 = time.monotonic()
    download(url, tmp_path / "b2.part", size=len(data), sha256=sha(data), options=opts(backoff_max=0.3))
    assert time.monotonic() - t0 < 3


def test_retries_exhausted_give_network_error(server, tmp_path):
    url = server.put("/down", blob(1000))
    server.faults("/down").status = 503
    with pytest.raises(NetworkError) as err:
        download(url, tmp_path / "d.part", size=1000, sha256="0" * 64, options=opts(max_retries=2))
    assert "HTTP 503" in err.value.message and "2 retries" in err.value.message
    assert len(server.requests) == 3


# ---- broken connections, stalls, resume


@pytest.fixture()
def no_proxy(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_host_that_does_not_resolve_fails_at_once(tmp_path, no_proxy):
    """.invalid never resolves (RFC 6761), through this machine's real resolver: no backoff minute."""
    ev = Events()
    with pytest.raises(NetworkError) as err:
        download("https://pipx-llama-test.invalid/m.gguf", tmp_path / "m.part", size=10, sha256="0" * 64,
                 options=opts(backoff_base=20.0, max_retries=6), on_event=ev, label="m.gguf")
    # "no such name" is final; a resolver without a network answers "temporary failure": one retry
    assert len(ev.of("retry")) <= fetch_source._DNS_RETRIES
    msg = err.value.message
    assert "m.gguf" in msg and "pipx-llama-test.invalid" in msg and "does not resolve" in msg
    assert "--offline" in err.value.hint and "--mirror" in err.value.hint


def test_no_such_name_is_not_retried(tmp_path, monkeypatch, no_proxy):
    import socket

    def no_such_name(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    ev = Events()
    with pytest.raises(NetworkError, match="does not resolve"):
        download("https://models.example.org/m.gguf", tmp_path / "m.part", size=10, sha256="0" * 64,
                 options=opts(max_retries=6), on_event=ev)
    assert not ev.of("retry")


def test_temporary_name_resolution_failure_is_retried_once(tmp_path, monkeypatch, no_proxy):
    import socket

    def no_dns(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    ev = Events()
    with pytest.raises(NetworkError) as err:
        download("https://models.example.org/m.gguf", tmp_path / "m.part", size=10, sha256="0" * 64,
                 options=opts(max_retries=6), on_event=ev, label="m.gguf")
    assert len(ev.of("retry")) == fetch_source._DNS_RETRIES
    assert "models.example.org does not resolve (Temporary failure in name resolution)" in err.value.message




def test_dropped_connections_resume_in_place(server, tmp_path):
    data = blob(6 * MB, 7)
    url = server.put("/drop", data)
    server.faults("/drop").drop_after = 1536 * 1024
    server.faults("/drop").drop_times = 3
    ev = Events()
    download(url, tmp_path / "d.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "d.part").read_bytes() == data
    assert len(ev.of("retry")) == 3
    assert server.bytes_sent == len(data), "every byte received before a drop is kept"
    assert ranges_requested(server, "/drop")[1] == f"bytes={1536 * 1024}-{len(data) - 1}"


def test_resume_across_calls_uses_if_range(server, tmp_path):
    data = blob(4 * MB, 8)
    url = server.put("/r", data)
    dest = tmp_path / "r.part"
    server.faults("/r").drop_after = 1536 * 1024
    with pytest.raises(NetworkError):
        download(url, dest, size=len(data), sha256=sha(data), options=opts(max_retries=0))
    assert partial_progress(dest) == (1536 * 1024, len(data))
    st = state_of(dest)
    assert st["url"] == url and st["sha256"] == sha(data) and st["etag"] == server._resources["/r"].etag
    server.reset_counters()
    ev = Events()
    download(url, dest, size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert dest.read_bytes() == data
    assert ev.of("start")[0].done == 1536 * 1024 and "resuming" in ev.of("start")[0].message
    (_, _, h), = server.requests
    assert h["Range"] == f"bytes={1536 * 1024}-{len(data) - 1}" and h["If-Range"] == st["etag"]
    assert server.bytes_sent == len(data) - 1536 * 1024
    assert partial_progress(dest) is None


def test_parallel_resume_across_calls(server, tmp_path):
    data = blob(8 * MB, 9)
    url = server.put("/pr", data)
    dest = tmp_path / "pr.part"
    o = opts(parallel_parts=4, part_threshold=MB, max_retries=0)
    server.faults("/pr").drop_after = 1200 * 1024
    server.faults("/pr").drop_times = -1
    with pytest.raises(NetworkError):
        download(url, dest, size=len(data), sha256=sha(data), options=o)
    done, total = partial_progress(dest)
    assert total == len(data) and done > 0
    server.faults("/pr").drop_after = None
    download(url, dest, size=len(data), sha256=sha(data), options=opts(parallel_parts=4, part_threshold=MB))
    assert dest.read_bytes() == data
    # both calls together: what other parts had in flight when the first call gave up, at most
    assert server.bytes_sent <= len(data) + 4 * 2 * MB


@pytest.mark.parametrize("parallel", [False, True])
def test_changed_file_between_attempts_is_never_mixed(server, tmp_path, parallel):
    old, new = blob(4 * MB, 10), blob(4 * MB, 11)
    url = server.put("/v", old)
    dest = tmp_path / "v.part"
    o = {"parallel_parts": 4, "part_threshold": MB} if parallel else {}
    server.faults("/v").drop_after = MB // 2 + 4321
    server.faults("/v").drop_times = -1
    with pytest.raises(NetworkError):
        download(url, dest, size=len(old), sha256=sha(new), options=opts(max_retries=0, **o))
    assert partial_progress(dest)[0] > 0
    server.put("/v", new)  # new content, new ETag
    server.faults("/v").drop_after = None
    ev = Events()
    download(url, dest, size=len(new), sha256=sha(new), options=opts(**o), on_event=ev)
    assert dest.read_bytes() == new
    assert ev.kinds().count("restart") == 1 and "changed" in ev.of("restart")[0].message


def test_changed_file_detected_by_last_modified(server, tmp_path):
    old, new = blob(3 * MB, 12), blob(3 * MB, 13)
    url = server.put("/lm", old, last_modified=1_600_000_000)
    server.faults("/lm").no_etag = True
    server.faults("/lm").drop_after = MB
    dest = tmp_path / "lm.part"
    with pytest.raises(NetworkError):
        download(url, dest, size=len(old), sha256=sha(new), options=opts(max_retries=0))
    assert state_of(dest)["etag"] is None and state_of(dest)["last_modified"]
    server.put("/lm", new, last_modified=1_700_000_000)
    ev = Events()
    download(url, dest, size=len(new), sha256=sha(new), options=opts(), on_event=ev)
    assert dest.read_bytes() == new and "restart" in ev.kinds()
    assert server.requests[-2][2]["If-Range"] == "Sun, 13 Sep 2020 12:26:40 GMT"


def test_server_ignoring_range(server, tmp_path):
    data = blob(6 * MB, 14)
    url = server.put("/nr", data)
    server.faults("/nr").ignore_range = True
    # a fresh parallel-sized download falls back to one stream
    download(url, tmp_path / "a.part", size=len(data), sha256=sha(data), options=opts(part_threshold=MB))
    assert (tmp_path / "a.part").read_bytes() == data
    assert len(server.requests) == 1
    # a broken connection to such a server starts over from byte 0 (it cannot resume)
    server.faults("/nr").drop_after = 2 * MB
    ev = Events()
    download(url, tmp_path / "b.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "b.part").read_bytes() == data
    # asked for the rest with a Range first, which it ignored too
    assert "starting over" in ev.of("retry")[1].message
    # a partial from a server that did honour Range, resumed after it stopped doing so
    server.faults("/nr").ignore_range = False
    server.faults("/nr").drop_times = 1
    with pytest.raises(NetworkError):
        download(url, tmp_path / "c.part", size=len(data), sha256=sha(data), options=opts(max_retries=0))
    server.faults("/nr").ignore_range = True
    ev = Events()
    download(url, tmp_path / "c.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "c.part").read_bytes() == data
    assert "ignored the Range" in ev.of("restart")[0].message


@pytest.mark.parametrize("parallel", [False, True])
def test_server_cutting_every_response_short_still_completes(server, tmp_path, parallel):
    data = blob(12 * MB, 28)
    url = server.put("/cut", data)
    server.faults("/cut").drop_after = 700 * 1024
    server.faults("/cut").drop_times = -1
    ev = Events()
    parts = {"parallel_parts": 3, "part_threshold": MB, "min_part": MB} if parallel else {}
    o = opts(max_retries=2, **parts)
    download(url, tmp_path / "c.part", size=len(data), sha256=sha(data), options=o, on_event=ev)
    assert (tmp_path / "c.part").read_bytes() == data
    assert len(ev.of("retry")) >= 12 and all("continuing" in e.message for e in ev.of("retry"))
    assert server.bytes_sent == len(data), "every byte sent once: each cut is continued where it stopped"


def test_whole_file_answered_200_then_cut_continues_with_a_range(server, tmp_path):
    data = blob(10 * MB, 29)
    url = server.put("/w", data)
    server.faults("/w").whole_range_as_200 = True
    server.faults("/w").drop_after = 3 * MB
    server.faults("/w").drop_times = -1
    dest = tmp_path / "w.part"
    download(url, dest, size=len(data), sha256=sha(data), options=opts(max_retries=1))
    assert dest.read_bytes() == data
    assert server.bytes_sent == len(data), "nothing fetched twice, nothing started over"
    assert ranges_requested(server, "/w")[:2] == ["bytes=0-", f"bytes={3 * MB}-{len(data) - 1}"]


def test_stalled_connection_is_retried(server, tmp_path):
    data = blob(2 * MB, 15)
    url = server.put("/stall", data)
    server.faults("/stall").stall_after = 256 * 1024
    server.faults("/stall").stall_for = 30
    ev = Events()
    t0 = time.monotonic()
    download(
        url,
        tmp_path / "s.part",
        size=len(data),
        sha256=sha(data),
        options=opts(stall_timeout=0.5),
        on_event=ev,
    )
    assert time.monotonic() - t0 < 5
    assert (tmp_path / "s.part").read_bytes() == data
    assert "stalled" in ev.of("retry")[0].message


def test_straggling_part_is_taken_over(server, tmp_path):
    data = blob(8 * MB, 16)
    url = server.put("/strag", data)
    server.faults("/strag").stall_after = 64 * 1024   # the first response (part 0) hangs
    server.faults("/strag").stall_for = 30
    ev = Events()
    t0 = time.monotonic()
    download(url, tmp_path / "s.part", size=len(data), sha256=sha(data), on_event=ev,
             options=opts(parallel_parts=4, part_threshold=MB, min_part=256 * 1024, stall_timeout=20,
                          straggler_after=0.5))
    assert time.monotonic() - t0 < 6, "finished long before the 20 s stall timeout"
    assert (tmp_path / "s.part").read_bytes() == data
    assert not ev.of("retry")


# ---- verification


@pytest.mark.parametrize("parallel", [False, True])
def test_flipped_byte_gives_checksum_error_and_deletes(server, tmp_path, parallel):
    data = blob(5 * MB, 17)
    url = server.put("/bad", data)
    server.faults("/bad").corrupt_at = 3 * MB + 17
    bad = bytearray(data)
    bad[3 * MB + 17] ^= 0xFF
    dest = tmp_path / "bad.part"
    o = opts(parallel_parts=4, part_threshold=MB) if parallel else opts()
    with pytest.raises(ChecksumError) as err:
        download(url, dest, size=len(data), sha256=sha(data), options=o, label="model.gguf")
    e = err.value
    assert (e.file, e.source, e.expected, e.actual) == ("model.gguf", url, sha(data), sha(bytes(bad)))
    assert "model.gguf" in e.message and url in e.message and sha(data) in e.message and e.actual in e.message
    assert not dest.exists() and not Path(str(dest) + ".json").exists()


def test_wrong_size_at_source_fails_before_downloading(server, tmp_path):
    data = blob(2 * MB, 18)
    url = server.put("/size", data)
    with pytest.raises(ChecksumError) as err:
        download(url, tmp_path / "z.part", size=len(data) + 1, sha256=sha(data), options=opts())
    assert "size mismatch" in err.value.message and "nothing was downloaded" in err.value.message
    assert not (tmp_path / "z.part").exists()


@pytest.mark.parametrize("known_size", [False, True])
def test_a_content_encoding_not_asked_for_is_refused_not_inflated(server, tmp_path, known_size):
    """A gzip bomb: 64 MiB of zeros in 64 KB, sent compressed although identity was asked for."""
    plain = bytes(64 * MB)
    bomb = gzip.compress(plain, compresslevel=9)
    url = server.put("/bomb", bomb, headers={"Content-Encoding": "gzip"})
    dest = tmp_path / "b.part"
    with pytest.raises(FetchError) as err:
        download(url, dest, size=len(plain) if known_size else None, sha256=sha(plain), options=opts())
    assert "Content-Encoding 'gzip' although identity was asked for" in err.value.message
    assert all(h.get("Accept-Encoding") == "identity" for _, _, h in server.requests)
    assert not dest.exists() or dest.stat().st_size == 0


def test_finished_file_without_state_is_verified_not_refetched(server, tmp_path):
    data = blob(MB, 19)
    url = server.put("/done", data)
    dest = tmp_path / "done.part"
    dest.write_bytes(data)
    ev = Events()
    download(url, dest, size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert server.requests == [] and ev.kinds() == ["verified", "done"]
    dest.write_bytes(data[:-1] + b"\0")   # same size, wrong bytes: discarded and fetched again
    download(url, dest, size=len(data), sha256=sha(data), options=opts())
    assert dest.read_bytes() == data and len(server.requests) == 1


def test_state_of_another_file_is_discarded(server, tmp_path):
    data = blob(MB, 20)
    url = server.put("/f", data)
    dest = tmp_path / "f.part"
    dest.write_bytes(b"x" * 1000)
    Path(str(dest) + ".json").write_text(json.dumps({"version": 1, "sha256": "1" * 64, "size": len(data)}))
    download(url, dest, size=len(data), sha256=sha(data), options=opts())
    assert dest.read_bytes() == data


def test_without_pwrite_the_seek_write_fallback_works(server, tmp_path, monkeypatch):
    monkeypatch.delattr(os, "pwritev", raising=False)
    monkeypatch.delattr(os, "pwrite")
    monkeypatch.delattr(os, "fdatasync", raising=False)
    data = blob(6 * MB, 21)
    url = server.put("/w", data)
    download(url, tmp_path / "w.part", size=len(data), sha256=sha(data),
             options=opts(parallel_parts=3, part_threshold=MB))
    assert (tmp_path / "w.part").read_bytes() == data


@pytest.mark.skipif(not hasattr(os, "pwritev"), reason="os.pwritev is not available on this platform")
def test_write_chunks_splits_iovecs_and_continues_short_writes(tmp_path, monkeypatch):
    chunks = [bytes([i % 251]) * (1 + i % 7) for i in range(3000)]   # more buffers than IOV_MAX
    chunks[5] = memoryview(chunks[5])
    real_pwrite = os.pwrite
    sizes = []

    def short_pwritev(fd, bufs, offset):
        sizes.append(len(bufs))
        assert len(bufs) <= fetch_diskio._IOV_MAX
        data = b"".join(bufs)
        return real_pwrite(fd, data[:len(data) // 2 + 1], offset)   # stops inside a buffer

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    path = tmp_path / "w"
    path.write_bytes(b"#" * 5)
    fd = os.open(path, os.O_WRONLY)
    try:
        fetch_diskio._write_chunks(fd, chunks, 5)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"#" * 5 + b"".join(chunks)
    assert max(sizes) == fetch_diskio._IOV_MAX and len(sizes) > 3


def counting_read_back(monkeypatch) -> list[int]:
    """Record how many bytes the hasher reads back from the file (instead of hashing them from memory)."""
    read_back = fetch_hashing.Hasher._read_back
    counts: list[int] = []

    def counting(self, f, buf, target, *, interruptible):
        before = self.pos
        read_back(self, f, buf, target, interruptible=interruptible)
        counts.append(self.pos - before)

    monkeypatch.setattr(fetch_hashing.Hasher, "_read_back", counting)
    return counts


def test_single_stream_is_hashed_from_memory(server, tmp_path, monkeypatch):
    read_back = counting_read_back(monkeypatch)
    data = blob(8 * MB, 26)
    url = server.put("/mem", data)
    download(url, tmp_path / "mem.part", size=len(data), sha256=sha(data), options=opts())
    assert sum(read_back) == 0


@pytest.mark.parametrize("parallel", [False, True])
def test_hasher_far_behind_reads_back_what_it_skipped(server, tmp_path, monkeypatch, parallel):
    # a hasher too far behind the writer skips offered blocks and hashes those bytes from the file
    monkeypatch.setattr(fetch_hashing, "_HASH_QUEUE", 1)
    monkeypatch.setattr(fetch_hashing, "_HASH_LAG_MAX", 128 * 1024)
    monkeypatch.setattr(fetch_receive, "_WRITE_BLOCK", 64 * 1024)
    update = fetch_hashing.Hasher._update
    read_back_bytes = counting_read_back(monkeypatch)

    def slow_update(self, chunks, skip):
        time.sleep(0.002)
        update(self, chunks, skip)

    monkeypatch.setattr(fetch_hashing.Hasher, "_update", slow_update)
    data = blob(6 * MB, 24)
    url = server.put("/lag", data)
    o = opts(parallel_parts=3, part_threshold=MB) if parallel else opts()
    download(url, tmp_path / "lag.part", size=len(data), sha256=sha(data), options=o)
    assert (tmp_path / "lag.part").read_bytes() == data
    assert 0 < sum(read_back_bytes) < len(data), "hashed partly from memory, partly read back"
    server.faults("/lag").corrupt_at = 4 * MB + 3
    with pytest.raises(ChecksumError):
        download(url, tmp_path / "lag2.part", size=len(data), sha256=sha(data), options=o)


def test_connection_reads_are_widened_once():
    class Stream:
        def __init__(self) -> None:
            self.asked: list[int] = []

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            self.asked.append(max_bytes)
            return b""

    stream = Stream()
    resp = httpx.Response(200, extensions={"network_stream": stream})
    fetch_receive._widen_reads(resp)
    fetch_receive._widen_reads(resp)
    stream.read(64 * 1024)
    stream.read(4 * MB, 1.0)
    assert stream.asked == [fetch_receive._READ_SIZE, 4 * MB]
    fetch_receive._widen_reads(httpx.Response(200))   # no network stream: nothing to widen


def test_slow_connection_shows_progress_before_a_write_block_fills(server, tmp_path):
    data = blob(MB, 25)
    url = server.put("/trickle", data)
    server.faults("/trickle").rate = MB   # 1 MiB/s: a whole write block would take two seconds
    ev = Events()
    download(url, tmp_path / "t.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    assert (tmp_path / "t.part").read_bytes() == data
    assert len({e.done for e in ev.of("progress") if 0 < e.done < len(data)}) >= 2


def test_progress_events_and_json():
    ev = ProgressEvent("progress", "a/b.gguf", done=10, total=100, speed=1234.5678, eta=3.14159, source="s")
    assert ev.to_json() == {"kind": "progress", "file": "a/b.gguf", "done": 10, "total": 100, "speed": 1234.6,
                            "eta": 3.1, "source": "s", "message": None}
    json.dumps(ev.to_json())


def test_progress_events_carry_speed_and_eta(server, tmp_path):
    data = blob(3 * MB, 22)
    url = server.put("/slow", data)
    server.faults("/slow").rate = 3 * MB
    ev = Events()
    download(url, tmp_path / "slow.part", size=len(data), sha256=sha(data), options=opts(), on_event=ev)
    prog = [e for e in ev.of("progress") if e.speed]
    assert prog and all(e.total == len(data) and 0 <= e.done <= len(data) for e in prog)
    assert 1 * MB < prog[-1].speed < 6 * MB and prog[-1].eta is not None


def test_redact_url():
    assert redact_url("https://user:pw@h.example:8443/a/b?X-Amz-Signature=x") == "https://h.example:8443/a/b?…"
    assert redact_url("https://h.example/a") == "https://h.example/a"


def test_callback_exception_stops_cleanly_and_keeps_partial(server, tmp_path):
    data = blob(4 * MB, 23)
    url = server.put("/cb", data)
    server.faults("/cb").rate = 4 * MB
    dest = tmp_path / "cb.part"

    def boom(ev: ProgressEvent) -> None:
        if ev.kind == "progress" and ev.done >= MB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(url, dest, size=len(data), sha256=sha(data), options=opts(), on_event=boom)
    done, _ = partial_progress(dest)
    assert done >= MB
    deadline = time.monotonic() + 3
    while any(t.name.startswith("fetch-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fetch-")]
    server.faults("/cb").rate = None
    download(url, dest, size=len(data), sha256=sha(data), options=opts())
    assert dest.read_bytes() == data


def test_gated_hugging_face_file_names_the_licence_page(server, tmp_path, monkeypatch):
    # a real huggingface.co URL, answered by the test server acting as the HTTP proxy
    server.put("/org/model/resolve/main/model.gguf", blob(100))
    server.faults("/org/model/resolve/main/model.gguf").status = 403
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url(""))
    with pytest.raises(AccessDenied) as err:
        download("http://huggingface.co/org/model/resolve/main/model.gguf", tmp_path / "g.part", size=100,
                 sha256="0" * 64, options=opts(allow_http=True, token="hf_x"))
    assert "token was sent and refused" in err.value.message
    assert "accept its licence on https://huggingface.co/org/model" in err.value.hint
    assert "HF_TOKEN" in err.value.hint
    assert server.proxied == 1


def test_unwritable_destination_is_a_clean_error(server, tmp_path):
    data = blob(1000)
    url = server.put("/u", data)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FetchError, match="cannot write the download"):
        download(url, blocker / "u.part", size=len(data), sha256=sha(data), options=opts())


# ---- resume-state saves: what a kill can cost


def record_saves(monkeypatch) -> list[tuple[float, int]]:
    """(time, bytes the state claims) of every resume-state save."""
    saves: list[tuple[float, int]] = []
    real = fetch_http._Job._write_state

    def spy(job, snap: dict) -> None:
        real(job, snap)
        saves.append((time.monotonic(), sum(p[2] for p in snap["parts"])))
    monkeypatch.setattr(fetch_http._Job, "_write_state", spy)
    return saves


def test_slow_syncs_space_saves_at_most_two_seconds_apart(server, tmp_path, monkeypatch):
    # a disk whose sync takes 0.4 s made saves 4+ s apart (ten times the sync): a kill then lost that much
    data = blob(8 * MB, 26)
    url = server.put("/sync", data)
    server.faults("/sync").rate = MB
    real_sync = fetch_http.fdatasync

    def slow_sync(fd: int) -> None:
        time.sleep(0.4)
        real_sync(fd)
    monkeypatch.setattr(fetch_http, "fdatasync", slow_sync)
    saves = record_saves(monkeypatch)
    download(url, tmp_path / "s.part", size=len(data), sha256=sha(data),
             options=opts(checkpoint_interval=1.0))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(saves)]
    assert len(gaps) >= 3 and max(gaps) < 3.0, gaps  # 2 s + the 0.4 s sync + slack for a busy machine


@pytest.mark.parametrize("parallel", [False, True])
def test_saves_come_at_least_every_checkpoint_bytes_per_connection(server, tmp_path, monkeypatch, parallel):
    data = blob(24 * MB, 27)
    url = server.put("/many", data)
    server.faults("/many").rate = 12 * MB   # per connection: seconds between time-based saves hold many MB
    saves = record_saves(monkeypatch)
    o = opts(checkpoint_interval=10.0, checkpoint_bytes=MB,
             **({"parallel_parts": 3, "part_threshold": MB} if parallel else {}))
    download(url, tmp_path / "m.part", size=len(data), sha256=sha(data), options=o)
    claimed = [b for _, b in saves]
    steps = [b - a for a, b in itertools.pairwise(claimed)]
    # 1 MB per busy connection, plus what the writer wrote while the save synced (a few blocks at most)
    limit = (3 if parallel else 1) * MB + 3 * fetch_receive._WRITE_BLOCK
    assert len(steps) >= 6 and max(steps) <= limit, steps


# ---- servers whose validators change from response to response (load balancers)


@pytest.mark.parametrize("last_modified", [True, False])
def test_per_response_etags_of_a_load_balancer_still_complete(server, tmp_path, last_modified):
    data = blob(12 * MB, 30)
    url = server.put("/lb", data)
    server.faults("/lb").etag_per_response = True
    server.faults("/lb").no_last_modified = not last_modified
    ev = Events()
    dest = tmp_path / "lb.part"
    download(url, dest, size=len(data), sha256=sha(data), on_event=ev,
             options=opts(parallel_parts=4, part_threshold=MB, min_part=MB))
    assert dest.read_bytes() == data
    assert ev.kinds().count("restart") <= 1
    [notice] = ev.of("notice")
    assert ("using Last-Modified" if last_modified else "sha256 check at the end decides") in notice.message
    # once switched, ranged requests carry the date (or nothing) and are answered 206
    last = server.requests[-1][2]
    date = email.utils.formatdate(server._resources["/lb"].last_modified, usegmt=True)
    assert last.get("If-Range") == (date if last_modified else None)


def test_a_switch_to_last_modified_is_kept_for_the_resume(server, tmp_path):
    data = blob(8 * MB, 31)
    url = server.put("/lb2", data)
    server.faults("/lb2").etag_per_response = True
    server.faults("/lb2").rate = 2 * MB
    dest = tmp_path / "lb2.part"
    o = opts(parallel_parts=4, part_threshold=MB, min_part=MB)

    def stop_midway(ev: ProgressEvent) -> None:
        if ev.kind == "progress" and ev.done >= 2 * MB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(url, dest, size=len(data), sha256=sha(data), options=o, on_event=stop_midway)
    assert state_of(dest)["validators"] == "last-modified" and state_of(dest)["etag"] is None
    done, _ = partial_progress(dest)
    server.faults("/lb2").rate = None
    ev = Events()
    download(url, dest, size=len(data), sha256=sha(data), options=o, on_event=ev)
    assert dest.read_bytes() == data
    assert "restart" not in ev.kinds() and ev.of("start")[0].done == done > 0


@pytest.mark.parametrize("parallel", [False, True])
def test_a_file_changed_once_is_still_restarted_not_mixed(server, tmp_path, parallel):
    # a real change (new ETag, same date, same size) seen by several parts at once counts as one change
    old, new = blob(6 * MB, 32), blob(6 * MB, 33)
    url = server.put("/chg", old, last_modified=1_600_000_000)
    dest = tmp_path / "chg.part"
    o = {"parallel_parts": 4, "part_threshold": MB, "min_part": MB // 2} if parallel else {}
    server.faults("/chg").rate = 2 * MB

    def stop_midway(ev: ProgressEvent) -> None:
        if ev.kind == "progress" and ev.done >= 2 * MB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(url, dest, size=len(new), sha256=sha(new), options=opts(**o), on_event=stop_midway)
    assert partial_progress(dest)[0] >= 2 * MB
    server.put("/chg", new, last_modified=1_600_000_000)
    server.faults("/chg").rate = None
    ev = Events()
    download(url, dest, size=len(new), sha256=sha(new), options=opts(**o), on_event=ev)
    assert dest.read_bytes() == new
    assert ev.kinds().count("restart") == 1 and not ev.of("notice")


# ---- a source that sends nothing: give up in bounded time, and say only what is true


def test_total_stall_gives_up_within_give_up_after(server, tmp_path):
    assert FetchOptions().give_up_after <= 60
    data = blob(2 * MB, 34)
    url = server.put("/dead", data)
    server.faults("/dead").stall_after = 0      # headers, then silence, on every response
    server.faults("/dead").stall_for = 60
    server.faults("/dead").stall_times = -1
    t0 = time.monotonic()
    with pytest.raises(NetworkError) as err:
        # per-connection timeouts and retries alone would take minutes
        download(url, tmp_path / "d.part", size=len(data), sha256=sha(data),
                 options=opts(give_up_after=2.0, stall_timeout=30.0, max_retries=6, backoff_base=1.0))
    assert time.monotonic() - t0 < 5
    assert "nothing received for 2 s" in err.value.message
    assert "kept" not in err.value.hint and "give_up_after" in err.value.hint


@pytest.mark.parametrize("ranges", [True, False])
def test_a_stall_says_whether_anything_is_kept(server, tmp_path, ranges):
    data = blob(4 * MB, 35)
    url = server.put("/half", data)
    server.faults("/half").ignore_range = not ranges
    server.faults("/half").drop_after = MB
    dest = tmp_path / "h.part"
    with pytest.raises(NetworkError):
        download(url, dest, size=len(data), sha256=sha(data), options=opts(max_retries=0))
    server.faults("/half").stall_after = 0
    server.faults("/half").stall_for = 60
    server.faults("/half").stall_times = -1
    with pytest.raises(NetworkError) as err:
        download(url, dest, size=len(data), sha256=sha(data), options=opts(give_up_after=1.5))
    if ranges:
        assert "1.0 MB downloaded so far are kept and the next run resumes" in err.value.hint
        assert partial_progress(dest)[0] == MB
    else:
        # a server that ignores Range: the next run starts over, so nothing is said to be kept
        assert "kept" not in err.value.hint and "resume" not in err.value.hint


def test_retries_exhausted_before_any_byte_do_not_claim_a_partial(server, tmp_path):
    url = server.put("/503", blob(1000))
    server.faults("/503").status = 503
    with pytest.raises(NetworkError) as err:
        download(url, tmp_path / "x.part", size=1000, sha256=sha(blob(1000)), options=opts(max_retries=1))
    assert "kept" not in err.value.hint and "resume" not in err.value.hint


def test_failure_hints_never_promise_another_source(server, tmp_path):
    # the downloader cannot know whether the caller has another source: the caller says so
    data = blob(5000, 36)
    url = server.put("/wrong", data)
    with pytest.raises(ChecksumError) as size_err:
        download(url, tmp_path / "a.part", size=4000, sha256=sha(data), options=opts())
    with pytest.raises(ChecksumError) as hash_err:
        download(url, tmp_path / "b.part", size=len(data), sha256="0" * 64, options=opts())
    with pytest.raises(SourceNotFound) as missing:
        download(server.url("/nothing"), tmp_path / "c.part", size=1, sha256="0" * 64, options=opts())
    for err in (size_err, hash_err, missing):
        assert "source will be tried" not in err.value.hint, err.value.hint
