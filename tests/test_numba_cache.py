"""The kernel cache folder (``pipx_llama._numba_cache``): one per kernel source and code-generation target."""

from __future__ import annotations

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
