"""Disk full: download() into a small tmpfs that the test mounts (root only; skipped otherwise, reason
printed)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import threading
import time

import pytest
from httpserver import FileServer

from pipx_llama.errors import DiskFullError
from pipx_llama.fetch.http import FetchOptions, download, partial_progress

MB = 1 << 20


def _skip(reason: str) -> None:
    print(f"\nSKIP: {reason}")
    pytest.skip(reason)


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs mounted for this test and unmounted afterwards."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _skip("mounting a small tmpfs needs root")
    if shutil.which("mount") is None:
        _skip("no mount command")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       check=False, capture_output=True, text=True)
    if r.returncode != 0:
        _skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def opts(**kw: object) -> FetchOptions:
    base: dict[str, object] = {"backoff_base": 0.01, "stall_timeout": 5.0, "checkpoint_interval": 0.2}
    base.update(kw)
    return FetchOptions(**base)  # type: ignore[arg-type]


def fill(folder) -> int:
    """Write a file until the filesystem is full; returns its size."""
    n = 0
    block = b"\0" * (64 * 1024)
    with open(folder / "hog", "wb", buffering=0) as f:
        try:
            while True:
                n += f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return n


def test_not_enough_space_is_reported_before_fetching(small_fs):
    data = random.Random(1).randbytes(12 * MB)
    with FileServer() as srv:
        url = srv.put("/big", data)
        dest = small_fs / "partial" / "big.part"
        with pytest.raises(DiskFullError) as err:
            download(url, dest, size=len(data), sha256=hashlib.sha256(data).hexdigest(), options=opts())
    e = err.value
    assert e.folder == str(small_fs / "partial") and e.needed == len(data) and e.free < 8 * MB
    assert e.folder in e.message and "12.6 MB still needed" in e.message and "free" in e.message
    assert "run the same command again" in e.hint and "kept" not in e.hint   # nothing was downloaded
    assert partial_progress(dest) == (0, len(data))


def test_space_vanishing_mid_download_keeps_a_resumable_partial(small_fs):
    data = random.Random(2).randbytes(6 * MB)
    digest = hashlib.sha256(data).hexdigest()
    dest = small_fs / "partial" / "f.part"
    with FileServer() as srv:
        url = srv.put("/f", data)
        srv.faults("/f").rate = 2 * MB
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                download(url, dest, size=len(data), sha256=digest, options=opts())
            except BaseException as exc:  # noqa: BLE001  (examined by the test thread)
                outcome.append(exc)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 10
        while (partial_progress(dest) or (0, 0))[0] < MB and time.monotonic() < deadline:
            time.sleep(0.02)
        fill(small_fs)
        t.join(timeout=20)
        assert not t.is_alive()
        assert outcome and isinstance(outcome[0], DiskFullError), outcome
        e = outcome[0]
        assert e.folder == str(small_fs / "partial") and e.free < MB and 0 < e.needed < len(data)
        done, total = partial_progress(dest)
        assert done >= MB and total == len(data)
        assert "downloaded so far are kept and the next run resumes" in e.hint
        (small_fs / "hog").unlink()
        srv.faults("/f").rate = None
        download(url, dest, size=len(data), sha256=digest, options=opts())
        assert dest.read_bytes() == data
        assert srv.bytes_sent <= len(data) + 2 * MB
