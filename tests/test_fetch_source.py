"""Source (fetch/source.py) through download(), against the real test server on 127.0.0.1:
requests, refusals, HTTP errors, names that do not resolve, encodings and validators."""

from __future__ import annotations

import email.utils
import gzip
import shutil
import ssl
import subprocess
import time

import pytest
from httpserver import FileServer
from test_fetch_http import MB, Events, blob, opts, sha, state_of

from pipx_llama.errors import FetchError, UsageError
from pipx_llama.events import ProgressEvent
from pipx_llama.fetch import source as fetch_source
from pipx_llama.fetch.errors import AccessDenied, NetworkError, SourceNotFound
from pipx_llama.fetch.http import download, partial_progress, redact_url


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


# ---- network behaviour: redirects, token, proxy


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


def test_redact_url():
    assert redact_url("https://user:pw@h.example:8443/a/b?X-Amz-Signature=x") == "https://h.example:8443/a/b?…"
    assert redact_url("https://h.example/a") == "https://h.example/a"


# ---- refusals before any network use


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


# ---- host names that do not resolve


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


# ---- encodings


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


# ---- validators: one version of the file, and servers whose validators change from response to response


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
