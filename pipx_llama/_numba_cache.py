"""Point numba's on-disk kernel cache at the user cache dir before numba is first imported.

Installed packages often live in read-only site-packages (pipx, system Python), where numba's
default in-tree ``__pycache__`` cannot be written; without a writable cache every run recompiles.

The folder is named after a digest of the kernel sources (the engine's kernels, the quantizer's, and
the formats' helpers they inline, e.g. the fp16 rounding) and of the settings that change
the code they compile to (``PIPX_LLAMA_SIMD``, and numba's ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``,
which choose the SIMD tier and LLVM's target): numba checks only the modification time of the file
that defines a function, not of the files whose code it inlines, so a kernel compiled against an
older ``simd.py`` or for another tier would otherwise be reused. Folders of other digests unused for
a week are removed.

A user's own ``NUMBA_CACHE_DIR`` wins (and is then theirs to keep consistent).

``guard_saves`` makes numba's cache writes safe between processes. numba (0.68,
``IndexDataCacheFile.save``) names a function's compiled code ``<function>.<n>.nbc`` with n the first
number its index does not use yet, reading the index, then writing it, then the code, with no lock. Two
processes that save two signatures of one function at once (two test workers; two ``run`` commands on
models of different weight formats, whose fused passes are two signatures) can both read the index before
either writes it and both take n = 1: the index then names file 1 for one signature while file 1 may hold
the other's code, which every later run loads and calls. Each save now holds a lock file of the cache
folder.
"""

import hashlib
import os
import shutil
import time
from pathlib import Path

import platformdirs

_PACKAGE = Path(__file__).resolve().parent
_KERNEL_DIRS = (_PACKAGE / "engine" / "kernels", _PACKAGE / "formats", _PACKAGE / "quant")
_STALE_S = 7 * 24 * 3600
_TARGET_SETTINGS = ("PIPX_LLAMA_SIMD", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")


def _digest() -> str:
    h = hashlib.sha1()
    for path in sorted(p for d in _KERNEL_DIRS for p in d.glob("*.py")):
        h.update(path.relative_to(_PACKAGE).as_posix().encode())
        try:
            h.update(path.read_bytes())
        except OSError:
            pass
    for name in _TARGET_SETTINGS:
        h.update(f"{name}={os.environ.get(name, '').strip().lower()}\n".encode())
    return h.hexdigest()[:12]


def _prune(root: Path, keep: str) -> None:
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if entry.name.startswith("k-") and entry.name != keep:
            try:
                if now - entry.stat().st_mtime > _STALE_S:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass


def _configure() -> None:
    if "NUMBA_CACHE_DIR" in os.environ:
        return
    root = Path(platformdirs.user_cache_dir("pipx-llama")) / "numba"
    name = f"k-{_digest()}"
    path = root / name
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    if path.is_dir():
        try:
            os.utime(path)  # in use: keep it from being pruned
        except OSError:
            pass
    _prune(root, name)


def guard_saves() -> None:
    """Serialise numba's cache saves across processes (see above); call before compiling cached kernels.

    Imports numba, so callers are the modules that define kernels, not this one (``--help`` stays fast).
    """
    from filelock import FileLock
    from numba.core import caching

    save = caching.IndexDataCacheFile.save
    if getattr(save, "_pipx_llama_guarded", False):
        return

    def locked_save(self, key, data):
        with FileLock(os.path.join(self._cache_path, ".save.lock")):
            save(self, key, data)

    locked_save._pipx_llama_guarded = True
    caching.IndexDataCacheFile.save = locked_save


_configure()
CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
