"""fetch_document() against the loopback test server: statuses, size caps, encodings, a deadline."""

from __future__ import annotations

import gzip

import pytest
from httpserver import FileServer

from pipx_llama.errors import FetchError
from pipx_llama.fetch.document import fetch_document
from pipx_llama.fetch.errors import AccessDenied, NetworkError, SourceNotFound


@pytest.fixture
def srv():
    with FileServer() as s:
        yield s


def test_a_document_is_fetched_with_identity_and_the_token(srv):
    url = srv.put("/d.json", b'{"a": 1}')
    assert fetch_document(url, max_bytes=100, token="t0k") == b'{"a": 1}'
    [(_, _, headers)] = srv.requests
    assert headers["Accept-Encoding"] == "identity" and headers["Authorization"] == "Bearer t0k"


@pytest.mark.parametrize("status, error", [(404, SourceNotFound), (410, SourceNotFound), (401, AccessDenied),
                                           (403, AccessDenied), (500, NetworkError), (418, FetchError)])
def test_statuses(srv, status, error):
    url = srv.put("/d", b"x")
    srv.faults("/d").status = status
    with pytest.raises(error, match=f"HTTP {status}"):
        fetch_document(url, max_bytes=100)


def test_an_unreachable_server_is_a_network_error():
    with pytest.raises(NetworkError, match="cannot fetch http://127.0.0.1:9/d"):
        fetch_document("http://127.0.0.1:9/d", max_bytes=100)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_cap_is_refused_while_reading(srv, chunked):
    url = srv.put("/big", b"x" * 100_000)
    srv.faults("/big").chunked = chunked
    with pytest.raises(FetchError, match="is larger than 1000 bytes"):
        fetch_document(url, max_bytes=1000)


def test_a_compressed_body_is_refused(srv):
    url = srv.put("/z", gzip.compress(b" " * 10_000_000), headers={"Content-Encoding": "gzip"})
    with pytest.raises(FetchError, match="Content-Encoding 'gzip' although identity was asked for"):
        fetch_document(url, max_bytes=1 << 20)


def test_a_trickling_server_hits_the_deadline(srv):
    url = srv.put("/slow", b"x" * 20_000)
    srv.faults("/slow").rate = 4000  # 5 s for the whole body
    with pytest.raises(FetchError, match="took more than 1 s"):
        fetch_document(url, max_bytes=1 << 20, timeout=1.0)


def test_a_redirect_to_plain_http_elsewhere_is_refused(srv):
    url = srv.redirect("/r", "http://example.invalid/d")
    with pytest.raises(FetchError, match=r"redirected to plain http \(example\.invalid\); refusing"):
        fetch_document(url, max_bytes=100)
    assert [path for _, path, _ in srv.requests] == ["/r"]
