"""verify (models/verify.py): against the manifest, blobs, folders, derived files; read-only stores."""

from __future__ import annotations

import errno
import os

import pytest
from httpserver import FileServer
from readonly import read_only
from test_models_pull import blob, events, make_manifest, sha, srv, store  # noqa: F401  (fixtures)
from tinymodel import write_tiny_llama

from pipx_llama.errors import ModelFileError
from pipx_llama.models.manifest import Manifest
from pipx_llama.models.pull import pull
from pipx_llama.models.store import InstalledVariant, Store, StoreReadOnlyError, recorded_file_problem
from pipx_llama.models.verify import verify_installed

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
