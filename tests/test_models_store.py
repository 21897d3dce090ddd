"""The store: atomic writes, blobs and model folders, cross-process locks (also after SIGKILL), the disk
pre-check (probe override and a real small tmpfs), removal and gc, read-only stores (a real one, and
writes refused where os.access says yes), and the cheap record of a GGUF's header."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from readonly import read_only
from tinymodel import write_tiny_llama

from pipx_llama.errors import DiskFullError, ModelFileError
from pipx_llama.files import atomic_write_bytes, atomic_write_json
from pipx_llama.models.store import (
    PROVENANCE,
    Lock,
    Store,
    StoreReadOnlyError,
    gguf_header_digest,
    link_or_copy,
    recorded_file_problem,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add_blob(store: Store, data: bytes) -> str:
    h = sha(data)
    store.ensure()
    tmp = store.partial_dir / "x.tmp"
    tmp.write_bytes(data)
    store.commit_blob(tmp, h)
    return h


def install(store: Store, model: str, variant: str, files: dict[str, bytes]) -> None:
    recs = []
    for path, data in files.items():
        h = add_blob(store, data)
        store.install_file(model, variant, path, h)
        recs.append({"path": path, "sha256": h, "size": len(data), "source": "test"})
    store.write_provenance(model, variant, {"model": model, "variant": variant, "files": recs})


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


# --- atomic writes, links ---

def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("simulated crash before the rename")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_link_or_copy(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"abc")
    dest = tmp_path / "a" / "b" / "dest"
    assert link_or_copy(src, dest) == "link"
    assert os.path.samefile(src, dest)
    assert link_or_copy(src, dest) == "present"
    copy = tmp_path / "copy"
    assert link_or_copy(src, copy, copy=True) == "copy"
    assert copy.read_bytes() == b"abc" and not os.path.samefile(src, copy)
    assert leftovers(tmp_path) == []


def test_blobs_install_and_provenance(tmp_path):
    store = Store(tmp_path)
    install(store, "m", "v", {"a.gguf": b"AAA", "sub/b.json": b"{}"})
    vdir = store.variant_dir("m", "v")
    assert os.path.samefile(vdir / "a.gguf", store.blob_path(sha(b"AAA")))
    assert (vdir / "sub" / "b.json").read_bytes() == b"{}"
    assert (vdir / PROVENANCE).is_file()
    [iv] = store.installed()
    assert (iv.model, iv.variant, iv.size, iv.complete) == ("m", "v", 5, True)
    assert store.has_blob(sha(b"AAA"), 3) and not store.has_blob(sha(b"AAA"), 4)
    assert store.referenced_blobs() == {sha(b"AAA"), sha(b"{}")}


def test_adopt_blob_verifies_before_anything_enters(tmp_path):
    store = Store(tmp_path / "store")
    store.ensure()
    user = tmp_path / "user.bin"
    user.write_bytes(b"user data")
    mode, actual = store.adopt_blob(user, "0" * 64)
    assert mode == "mismatch" and actual == sha(b"user data")
    mode, _ = store.adopt_blob(user, "0" * 64, copy=True)
    assert mode == "mismatch"
    assert store.blobs() == [] and leftovers(store.root) == [] and not list(store.partial_dir.iterdir())
    assert store.adopt_blob(user, sha(b"user data")) == ("link", sha(b"user data"))
    assert os.path.samefile(user, store.blob_path(sha(b"user data")))


# --- locks ---

def test_lock_excludes_and_names_holder(tmp_path):
    a, b = Lock(tmp_path / "k.lock"), Lock(tmp_path / "k.lock")
    assert a.try_acquire()
    assert not b.try_acquire()
    assert f"pid {os.getpid()}" in b.holder()
    with pytest.raises(TimeoutError, match="still held"):
        b.acquire(timeout=0.3, poll=0.05)
    a.release()
    assert b.try_acquire()
    b.release()


def test_shared_and_exclusive(tmp_path):
    s1, s2, ex = (Lock(tmp_path / "store.lock") for _ in range(3))
    assert s1.try_acquire(shared=True) and s2.try_acquire(shared=True)
    assert not ex.try_acquire()
    s1.release()
    s2.release()
    assert ex.try_acquire()
    assert not s1.try_acquire(shared=True)
    ex.release()


def test_lock_file_removed_under_a_waiter_is_not_shared(tmp_path):
    """gc deletes idle lock files; a process that opened the old file must not think it holds the lock."""
    path = tmp_path / "k.lock"
    first = Lock(path)
    assert first.try_acquire()
    path.unlink()          # as gc would, racing with `first`
    second = Lock(path)
    assert second.try_acquire()  # a new file: the two do not exclude each other ...
    first.release()
    third = Lock(path)
    assert not third.try_acquire()  # ... but everyone from now on meets `second`
    second.release()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_lock_of_killed_process_is_recovered(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pipx_llama.models.store import Store
        lock = Store(Path({str(tmp_path)!r})).blob_lock("ab" * 32)
        lock.acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        mine = Store(tmp_path).blob_lock("ab" * 32)
        assert not mine.try_acquire()
        assert f"pid {proc.pid}" in mine.holder()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        mine.acquire(timeout=5)
        assert mine.held
        mine.release()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


# --- disk space ---

def test_precheck_message_names_folder_needed_and_free(tmp_path):
    store = Store(tmp_path / "store", free_space_probe=lambda folder: 1000)
    assert store.free_bytes() == 1000
    store.check_space(1000, "x")
    with pytest.raises(DiskFullError) as exc:
        store.check_space(5_000_000, "model m (v)")
    err = exc.value
    assert str(tmp_path / "store") in err.message
    assert "need 5.0 MB (5000000 bytes)" in err.message and "1000 bytes) free" in err.message
    assert (err.needed, err.free, err.folder) == (5_000_000, 1000, str(tmp_path / "store"))
    assert "PIPX_LLAMA_HOME" in err.hint


def test_free_bytes_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPX_LLAMA_FREE_BYTES", "1234")
    assert Store(tmp_path).free_bytes() == 1234


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted for the test (root only)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        reason = "mounting a tmpfs needs root on Linux"
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        reason = f"cannot mount a tmpfs: {proc.stderr.strip()}"
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_precheck_on_a_real_small_filesystem(tmpfs):
    store = Store(tmpfs / "store")
    free = store.free_bytes()
    assert 3 << 20 < free <= 4 << 20
    store.check_space(1 << 20, "small")
    with pytest.raises(DiskFullError, match=r"not enough disk space in .*small/store .*need 10\.5 MB"):
        store.check_space(10 << 20, "big")


# --- removal and gc ---

def test_remove_model_keeps_shared_blobs(tmp_path):
    store = Store(tmp_path)
    install(store, "a", "v", {"tok.model": b"shared", "a.bin": b"only a"})
    install(store, "b", "v", {"tok.model": b"shared", "b.bin": b"only b"})
    (store.partial_dir / f"{sha(b'a partial')}.part").write_bytes(b"half")
    record_size = (store.variant_dir("a", "v") / PROVENANCE).stat().st_size
    report = store.remove_model("a", extra_partials={sha(b"a partial")})
    assert not (store.models_dir / "a").exists()
    assert not store.has_blob(sha(b"only a"))
    assert store.has_blob(sha(b"shared")) and store.has_blob(sha(b"only b"))
    assert store.partials() == []
    assert report.freed == len(b"only a") + len(b"half") + record_size  # the shared blob stays
    assert [iv.model for iv in store.installed()] == ["b"]


def test_gc_removes_unreferenced_blobs_and_partials_but_not_locked_ones(tmp_path):
    store = Store(tmp_path)
    install(store, "a", "v", {"a.bin": b"kept"})
    orphan = add_blob(store, b"orphan blob")
    busy_hex, idle_hex = "1" * 64, "2" * 64
    (store.partial_dir / f"{busy_hex}.part").write_bytes(b"busy")
    (store.partial_dir / f"{idle_hex}.part").write_bytes(b"idle")
    (store.partial_dir / f"{idle_hex}.part.json").write_text("{}")
    (store.partial_dir / "pip-0123456789abcdef").mkdir()
    holder = store.blob_lock(busy_hex)
    assert holder.try_acquire()
    try:
        dry = store.gc(dry_run=True)
        assert store.has_blob(orphan) and (store.partial_dir / f"{idle_hex}.part").exists()
        assert dry.freed == len(b"orphan blob") + len(b"idle") + 2
        report = store.gc()
    finally:
        holder.release()
    assert not store.has_blob(orphan) and store.has_blob(sha(b"kept"))
    assert sorted(p.name for p in store.partial_dir.iterdir()) == [f"{busy_hex}.part"]
    assert any("being downloaded" in s for s in report.skipped)
    assert report.freed == dry.freed
    assert (store.variant_dir("a", "v") / "a.bin").read_bytes() == b"kept"


def test_installed_reports_incomplete_variant(tmp_path):
    store = Store(tmp_path)
    (store.variant_dir("m", "v")).mkdir(parents=True)
    [iv] = store.installed()
    assert not iv.complete and iv.size == 0


def test_hardlink_probe(tmp_path):
    assert Store(tmp_path).supports_hardlinks()


def test_a_folder_where_a_file_belongs_is_a_clean_error(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"data")
    (tmp_path / "dest").mkdir()
    with pytest.raises(ModelFileError, match="is a folder where a file belongs"):
        link_or_copy(src, tmp_path / "dest")


def test_commit_blob_replaces_a_blob_of_the_wrong_size(tmp_path):
    store = Store(tmp_path)
    h = add_blob(store, b"right bytes")
    store.blob_path(h).write_bytes(b"truncated")   # damaged in place
    add_blob(store, b"right bytes")
    assert store.blob_path(h).read_bytes() == b"right bytes"


# --- read-only stores ---

@pytest.fixture
def populated(tmp_path) -> Store:
    store = Store(tmp_path / "store")
    install(store, "m", "v", {"a.bin": b"model bytes"})
    (store.partial_dir / f"{sha(b'half')}.part").write_bytes(b"half")
    with store.shared():
        pass  # writers leave the store's lock file behind
    return store


def test_a_read_only_store_refuses_changes_before_touching_anything(populated):
    store = populated
    assert store.read_only_reason() is None
    before = sorted(str(p) for p in store.root.rglob("*"))
    with read_only(store.root):
        assert "is not writable" in store.read_only_reason()
        for action, body in (("gc the store", store.gc), ("remove m", lambda: store.remove_model("m"))):
            with pytest.raises(StoreReadOnlyError) as err, store.exclusive(action=action):
                body()
            assert f"cannot {action}: the store {store.root} is read-only" in err.value.message
            assert "list, verify, run" in err.value.hint and "PIPX_LLAMA_HOME" in err.value.hint
        assert [iv.model for iv in store.installed()] == ["m"] and len(store.partials()) == 1
    assert sorted(str(p) for p in store.root.rglob("*")) == before


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_reading_a_read_only_store_shares_its_writers_lock(populated):
    import fcntl

    store = populated
    with read_only(store.root), store.shared(read_only_ok=True):
        fd = os.open(store.locks_dir / "store.lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):   # what gc would take: it waits for the reader
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_a_read_only_store_never_locked_is_read_without_a_lock(tmp_path):
    store = Store(tmp_path / "store")
    install(store, "m", "v", {"a.bin": b"model bytes"})
    assert not store.locks_dir.exists() or not any(store.locks_dir.iterdir())
    with read_only(store.root), store.shared(read_only_ok=True):
        assert [iv.model for iv in store.installed()] == ["m"]


def test_a_write_refused_although_access_said_yes_is_a_read_only_error(populated, monkeypatch):
    # root passes os.access on a chmod'ed folder, and network filesystems can refuse at the write itself
    store = populated
    real_open = os.open
    root = str(store.root)

    def refusing(path, flags, *args, **kwargs):
        if str(path).startswith(root) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", refusing)
    assert store.read_only_reason() is None
    expected = r"cannot gc the store: .*locks/store\.lock: Read-only file"
    with pytest.raises(StoreReadOnlyError, match=expected), store.exclusive(action="gc the store"):
        store.gc()
    with store.shared(read_only_ok=True):
        pass
    # a refusal elsewhere (a user's file) is not the store's
    with pytest.raises(PermissionError), store.writing("import"):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(root).parent / "elsewhere.gguf"))
    assert [iv.model for iv in store.installed()] == ["m"]


# --- the cheap record of a GGUF ---

def test_header_digest_notices_a_changed_header_or_size_but_reads_only_the_header(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_llama(path, seed=3)
    record = {"size": path.stat().st_size, **gguf_header_digest(path)}
    assert 0 < record["header_bytes"] < record["size"]
    assert recorded_file_problem(path, record) is None
    with open(path, "r+b") as f:   # a tensor's data: not what the cheap check reads
        f.seek(record["header_bytes"] + 10)
        f.write(b"\xff")
    assert recorded_file_problem(path, record) is None
    with open(path, "r+b") as f:   # a byte of the tensor table
        f.seek(record["header_bytes"] - 40)
        f.write(b"\xee")
    assert "header or tensor table differs" in recorded_file_problem(path, record)
    with open(path, "ab") as f:
        f.write(b"x")
    assert "bytes where" in recorded_file_problem(path, record)
    path.unlink()
    path.mkdir()
    assert "not a regular file" in recorded_file_problem(path, record)
    assert gguf_header_digest(tmp_path / "m.gguf") == {}


def test_shared_store_lock_is_reentrant_in_a_process(tmp_path, monkeypatch):
    """Windows' byte-range locks are exclusive and per handle: a second shared lock of the same process
    (prepare holds one around the pull, which takes one) must not ask the OS again."""
    import threading

    from pipx_llama.models import store as store_mod

    holders: set[int] = set()

    def windows_like_lock(fd, shared):
        if holders:
            return False
        holders.add(fd)
        return True

    monkeypatch.setattr(store_mod, "_os_lock", windows_like_lock)
    monkeypatch.setattr(store_mod, "_os_unlock", lambda fd: holders.discard(fd))
    store = Store(tmp_path / "store")
    store.ensure()
    finished = threading.Event()

    def nested():
        with store.shared(), store.shared(), store.shared():
            assert len(holders) == 1
        finished.set()

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(10)
    assert finished.is_set(), "a nested shared lock waited for its own process"
    assert not holders  # released when the outermost block ended
    with store.exclusive(timeout=1):
        pass


def test_a_file_in_use_on_windows_is_not_a_read_only_store_and_keeps_its_record(tmp_path, monkeypatch):
    from pipx_llama.errors import StoreError

    store = Store(tmp_path)
    install(store, "a", "v", {"a.gguf": b"weights"})
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == "a.gguf":
            err = PermissionError(errno.EACCES, "The process cannot access the file", str(self))
            err.winerror = 32  # what Windows says of a file another process has open
            raise err
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(StoreError, match="another program has it open") as caught:
        with store.exclusive():
            store.remove_model("a")
    assert not isinstance(caught.value, StoreReadOnlyError)
    assert (store.variant_dir("a", "v") / PROVENANCE).is_file()  # what is left still says what it is
