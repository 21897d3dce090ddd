"""Oracles and inputs for the quantizer tests.

llama.cpp's own quantizers, through the libraries llama-cpp-python bundles:

``ggml_quantize`` calls ggml's ``ggml_quantize_chunk`` (the reference ``quantize_row_*_ref`` code
when no importance matrix is given) on float32 rows; ``llama_quantize`` runs ``llama_model_quantize``
on a whole GGUF file, which is what ``llama-quantize`` does. Both are unavailable (``None`` /
skip with the reason printed) when llama-cpp-python is not installed.

Inputs: ``adversarial_rows`` (blocks built to hit the corner cases of the reference code) and
``real_rows`` (SmolLM2's weights, dequantized with gguf-py).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_LIB: ctypes.CDLL | None = None


def adversarial_rows(n: int, block: int, seed: int = 0) -> np.ndarray:
    """float32 [k, n] rows whose first ``block`` values are one corner case each; the rest is random.

    Cases: all zeros, all negative zeros, zeros of both signs, one huge value among tiny ones (and its
    negative), fp32 subnormals, values near FLT_MIN (where 1/d overflows), a constant block, all
    positive / all negative blocks, ties for the largest magnitude, large values that still fit fp16
    scales, and values that are fp16 ties.
    """
    rng = np.random.default_rng(seed)
    cases = []

    def add(values: np.ndarray) -> None:
        row = (rng.standard_normal(n) * 0.02).astype(np.float32)
        row[:block] = np.resize(np.asarray(values, dtype=np.float32), block)
        cases.append(row)

    tiny = (rng.standard_normal(block) * 1e-6).astype(np.float32)
    add(np.zeros(block))
    add(-np.zeros(block))
    add(np.where(np.arange(block) % 2, 0.0, -0.0))
    huge = tiny.copy()
    huge[block // 3] = 1000.0
    add(huge)
    huge[block // 3] = -1000.0
    add(huge)
    add(rng.standard_normal(block) * 1e-40)
    add(np.full(block, 1e-45))
    add(rng.standard_normal(block) * 1e-38)
    add(rng.standard_normal(block) * 3e-37)
    add(np.full(block, 0.75))
    add(np.abs(rng.standard_normal(block)) + 1.0)
    add(-np.abs(rng.standard_normal(block)) - 1.0)
    ties = rng.standard_normal(block).astype(np.float32)
    ties[[1, 5, 9]] = [2.5, -2.5, 2.5]
    add(ties)
    add(rng.standard_normal(block) * 1000.0)
    add(np.arange(block) * np.float32(1 / 16) - 2)
    return np.stack(cases)


def real_rows(path: Path, names: list[str], row: int) -> np.ndarray:
    """The named tensors of a GGUF file, dequantized with gguf-py and cut into rows of ``row`` values."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    parts = [dequantize(by_name[n].data, by_name[n].tensor_type).reshape(-1) for n in names]
    flat = np.concatenate(parts).astype(np.float32)
    return flat[: flat.size // row * row].reshape(-1, row)


def _lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return path if path.is_dir() else None


def ggml_lib() -> ctypes.CDLL | None:
    """libggml-base from llama-cpp-python, or None when it is not installed."""
    global _LIB
    if _LIB is None:
        d = _lib_dir()
        if d is None:
            return None
        candidates = sorted(d.glob("libggml-base.*"))
        if not candidates:
            return None
        lib = ctypes.CDLL(str(candidates[0]))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def require_ggml() -> ctypes.CDLL:
    lib = ggml_lib()
    if lib is None:
        reason = "llama-cpp-python is not installed: no ggml reference quantizer to compare with"
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    return lib


def ggml_quantize(qtype: GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    """ggml's bytes for float32 rows x [k, n]: uint8 [k, row_bytes]."""
    lib = require_ggml()
    x = np.ascontiguousarray(x, dtype=np.float32)
    k, n = x.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((k, n // block * size), np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, k, n, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def require_llama_cpp() -> ModuleType:
    try:
        import llama_cpp
    except ImportError as err:
        reason = f"llama-cpp-python is not importable ({err}): cannot cross-check with llama.cpp's quantizer"
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    return llama_cpp


def llama_quantize(
    src: Path, dst: Path, ftype: int, threads: int = 2, allow_requantize: bool = False
) -> None:
    """``llama_model_quantize(src, dst)`` with llama.cpp's defaults and the given llama_ftype."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc} on {src}")
