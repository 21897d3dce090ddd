"""The kernel cache folder (``pipx_llama._numba_cache``): one per kernel source and code-generation target,
and numba's saves into it one at a time."""

from __future__ import annotations

import threading

from pipx_llama import _numba_cache

HASWELL = "+avx,+avx2,+fma,+f16c"

TARGETS = [
    {},
    {"PIPX_LLAMA_SIMD": "avx2"},
    {"NUMBA_CPU_NAME": "haswell"},
    {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL},
    {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL, "PIPX_LLAMA_SIMD": "avx2"},
]


def _digest_with(monkeypatch, settings: dict[str, str]) -> str:
    for name in ("PIPX_LLAMA_SIMD", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return _numba_cache._digest()


def test_each_code_generation_target_gets_its_own_folder(monkeypatch):
    digests = [_digest_with(monkeypatch, settings) for settings in TARGETS]
    # e.g. AVX-512 code must never be loaded by a process compiling for Haswell
    assert len(set(digests)) == len(TARGETS), digests
    assert digests == [_digest_with(monkeypatch, settings) for settings in TARGETS]


def test_two_saves_at_once_keep_each_signature_and_its_code(tmp_path):
    """Two processes' saves of one function's signatures, interleaved as numba's unlocked save allows: the
    first has read the index and not yet written it when the second saves. Unguarded, both take file 1
    and the index keeps one of the two; guarded, the second waits for the first."""
    from numba.core import caching

    _numba_cache.guard_saves()

    def cache_file():
        return caching.IndexDataCacheFile(str(tmp_path), "kernel.f-10.py311", (1.0, 100))

    first, second = cache_file(), cache_file()
    index_read, second_saved = threading.Event(), threading.Event()
    load_index = first._load_index

    def slow_load_index():
        index = load_index()
        index_read.set()
        second_saved.wait(1.0)  # unguarded, the second save lands here
        return index

    first._load_index = slow_load_index

    def save_second():
        second.save("signature B", "code B")
        second_saved.set()

    a = threading.Thread(target=first.save, args=("signature A", "code A"))
    a.start()
    assert index_read.wait(10)
    b = threading.Thread(target=save_second)
    b.start()
    a.join(10)
    b.join(10)
    reader = cache_file()
    assert (reader.load("signature A"), reader.load("signature B")) == ("code A", "code B")
