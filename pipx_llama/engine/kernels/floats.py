"""numba kernels for F32, F16 and BF16 weights, and the fp16 helpers the quantized kernels share.

Fidelity with ggml's CPU backend: for F16 weights the activations are rounded to fp16 first, for
BF16 weights to bf16 (``vec_dot_type`` in ggml-cpu.c), then products are summed in float32.
numpy twins: :mod:`pipx_llama.formats.floats`.

fp16 values are decoded through ``FP16_TABLE`` and rounded with the integer-only routines of
:mod:`pipx_llama.formats.fp16` (written once there, for the kernels and the quantizer alike).

Kernels take ``w`` as uint8 rows of raw ggml data (often a read-only mmap view); the
``WeightKernel`` objects registered at import reinterpret them as uint16/float32 rows without a copy.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from pipx_llama.engine.kernels import register
from pipx_llama.formats.fp16 import FP16_TABLE, fp32_bits_to_bf16_bits, fp32_bits_to_fp16_bits

# Rows converted to float32 together: each converted row then serves every token of the call.
_ROW_TILE = 16


@njit(cache=True)
def round_to_fp16(x: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    """out = x rounded to the nearest fp16, as float32. x, out: float32 C-contiguous, same shape."""
    bits = x.reshape(-1).view(np.uint32)
    o = out.reshape(-1)
    for i in range(bits.shape[0]):
        o[i] = table[fp32_bits_to_fp16_bits(np.int64(bits[i]))]


@njit(cache=True)
def round_to_bf16(x: np.ndarray, out: np.ndarray) -> None:
    """out = x rounded to bf16 as ggml does it, as float32. x, out: float32 C-contiguous, same shape."""
    bits = x.reshape(-1).view(np.uint32)
    o = out.reshape(-1).view(np.uint32)
    for i in range(bits.shape[0]):
        o[i] = np.uint32(fp32_bits_to_bf16_bits(np.int64(bits[i])) << 16)


@njit(cache=True)
def dequantize_f16(h: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    """h: uint16 [k, n] fp16 bit patterns -> out: float32 [k, n]."""
    for r in range(h.shape[0]):
        for j in range(h.shape[1]):
            out[r, j] = table[h[r, j]]


@njit(cache=True)
def dequantize_bf16(h: np.ndarray, out: np.ndarray) -> None:
    """h: uint16 [k, n] bf16 bit patterns -> out: float32 [k, n] (written through a uint32 view)."""
    for r in range(h.shape[0]):
        o = out[r].view(np.uint32)
        for j in range(h.shape[1]):
            o[j] = np.uint32(h[r, j]) << np.uint32(16)


@njit(inline="always")
def _dot(a: np.ndarray, b: np.ndarray) -> np.float32:
    acc = np.float32(0.0)
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return acc


@njit(parallel=True, fastmath=True, cache=True)
def matmul_f32_rows(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, r] = dot(w[r], x[t]); w float32 [rows, n], x float32 [T, n], out float32 [T, rows]."""
    rows = w.shape[0]
    n_tiles = (rows + _ROW_TILE - 1) // _ROW_TILE
    for tile in prange(n_tiles):
        r1 = min(rows, tile * _ROW_TILE + _ROW_TILE)
        for t in range(x.shape[0]):
            for r in range(tile * _ROW_TILE, r1):
                out[t, r] = _dot(w[r], x[t])


@njit(parallel=True, fastmath=True, cache=True)
def matmul_f16_rows(h: np.ndarray, x: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    """out[t, r] = dot(fp16 row r of h, x[t]); h uint16 [rows, n]; x already rounded to fp16."""
    rows, n = h.shape
    n_tiles = (rows + _ROW_TILE - 1) // _ROW_TILE
    for tile in prange(n_tiles):
        r0 = tile * _ROW_TILE
        r1 = min(rows, r0 + _ROW_TILE)
        wf = np.empty((r1 - r0, n), np.float32)
        for r in range(r0, r1):
            for j in range(n):
                wf[r - r0, j] = table[h[r, j]]
        for t in range(x.shape[0]):
            for r in range(r0, r1):
                out[t, r] = _dot(wf[r - r0], x[t])


@njit(parallel=True, fastmath=True, cache=True)
def matmul_bf16_rows(h: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, r] = dot(bf16 row r of h, x[t]); h uint16 [rows, n]; x already rounded to bf16."""
    rows, n = h.shape
    n_tiles = (rows + _ROW_TILE - 1) // _ROW_TILE
    for tile in prange(n_tiles):
        r0 = tile * _ROW_TILE
        r1 = min(rows, r0 + _ROW_TILE)
        wbits = np.empty((r1 - r0, n), np.uint32)
        for r in range(r0, r1):
            for j in range(n):
                wbits[r - r0, j] = np.uint32(h[r, j]) << np.uint32(16)
        wf = wbits.view(np.float32)
        for t in range(x.shape[0]):
            for r in range(r0, r1):
                out[t, r] = _dot(wf[r - r0], x[t])


def _check(name: str, w: np.ndarray, x: np.ndarray, out: np.ndarray, type_size: int) -> None:
    if w.ndim != 2 or w.dtype != np.uint8 or not w.flags.c_contiguous:
        raise ValueError(f"{name} weights must be C-contiguous uint8 [rows, row_bytes], "
                         f"got {w.dtype} {w.shape}")
    if x.ndim != 2 or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"{name} activations must be C-contiguous float32 [T, n], got {x.dtype} {x.shape}")
    if w.shape[1] != x.shape[1] * type_size:
        raise ValueError(f"{name} row of {w.shape[1]} bytes does not hold {x.shape[1]} elements")
    if out.shape != (x.shape[0], w.shape[0]) or out.dtype != np.float32:
        raise ValueError(f"{name} output must be float32 {(x.shape[0], w.shape[0])}, "
                         f"got {out.dtype} {out.shape}")


def _check_dequantize(name: str, w: np.ndarray, out: np.ndarray, type_size: int) -> None:
    if w.ndim != 2 or w.dtype != np.uint8 or w.shape[1] % type_size:
        raise ValueError(f"{name} weights must be uint8 [k, n * {type_size}], got {w.dtype} {w.shape}")
    if out.shape != (w.shape[0], w.shape[1] // type_size) or out.dtype != np.float32:
        raise ValueError(f"{name} dequantize output must be float32 {(w.shape[0], w.shape[1] // type_size)}, "
                         f"got {out.dtype} {out.shape}")


class F32Kernel:
    qtype = GGMLQuantizationType.F32

    def matmul(self, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        _check("F32", w, x, out, 4)
        matmul_f32_rows(w.view(np.float32), x, out)

    def dequantize(self, w: np.ndarray, out: np.ndarray) -> None:
        _check_dequantize("F32", w, out, 4)
        out[...] = np.ascontiguousarray(w).view(np.float32)


class F16Kernel:
    qtype = GGMLQuantizationType.F16

    def matmul(self, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        _check("F16", w, x, out, 2)
        xr = np.empty_like(x)
        round_to_fp16(x, xr, FP16_TABLE)
        matmul_f16_rows(w.view(np.uint16), xr, out, FP16_TABLE)

    def dequantize(self, w: np.ndarray, out: np.ndarray) -> None:
        _check_dequantize("F16", w, out, 2)
        dequantize_f16(np.ascontiguousarray(w).view(np.uint16), out, FP16_TABLE)


class BF16Kernel:
    qtype = GGMLQuantizationType.BF16

    def matmul(self, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        _check("BF16", w, x, out, 2)
        xr = np.empty_like(x)
        round_to_bf16(x, xr)
        matmul_bf16_rows(w.view(np.uint16), xr, out)

    def dequantize(self, w: np.ndarray, out: np.ndarray) -> None:
        _check_dequantize("BF16", w, out, 2)
        dst = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)  # written through a view
        dequantize_bf16(np.ascontiguousarray(w).view(np.uint16), dst)
        if dst is not out:
            out[...] = dst


F32_KERNEL = register(F32Kernel())
F16_KERNEL = register(F16Kernel())
BF16_KERNEL = register(BF16Kernel())
