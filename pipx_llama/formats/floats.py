"""ggml's float weight formats F32, F16 and BF16: format facts and numpy references.

A row of one of these types is ``n`` little-endian scalars, one "block" per element. Besides
expanding rows to float32, each class says how ggml's CPU backend rounds the activations before
its dot product: ``vec_dot_type`` is F32 for F32 weights, F16 for F16 weights and BF16 for BF16
weights (``type_traits_cpu`` in ggml-cpu.c), so ``x`` passes through that format first and the
products are summed in float.

The bf16 rounding is ``ggml_compute_fp32_to_bf16`` (ggml-impl.h): round to nearest even, NaNs
forced quiet. The fp16 rounding is IEEE round-to-nearest-even, as F16C's ``vcvtps2ph`` and numpy's
``astype(np.float16)`` do it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType


def round_to_fp16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest fp16 (ties to even), returned as float32."""
    with np.errstate(over="ignore"):  # beyond 65520 the result is inf, as intended
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16) exactly as ``ggml_compute_fp32_to_bf16`` computes them."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    quiet_nan = (u >> 16) | 64
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


def bf16_bits_to_fp32(h: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 (exact: bf16 is the top half of a float32)."""
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 the way ggml does it, returned as float32."""
    return bf16_bits_to_fp32(fp32_to_bf16_bits(x))


class FloatFormat:
    """Facts and numpy references of one float weight type (subclasses fill in the class variables)."""

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int] = 1
    type_size: ClassVar[int]
    # How one element is stored (little-endian); BF16 has no numpy dtype, so its bits are uint16.
    element_dtype: ClassVar[np.dtype]

    @classmethod
    def row_elements(cls, row_bytes: int) -> int:
        return row_bytes // cls.type_size

    @classmethod
    def elements(cls, raw: np.ndarray) -> np.ndarray:
        """uint8 [k, row_bytes] -> the stored scalars [k, n] (a view when ``raw`` is contiguous)."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        return raw.view(cls.element_dtype)

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        """uint8 [k, row_bytes] -> float32 [k, n]."""
        raise NotImplementedError

    @classmethod
    def round_activations(cls, x: np.ndarray) -> np.ndarray:
        """The float32 activations as ggml's vec_dot for this weight type sees them."""
        raise NotImplementedError

    @classmethod
    def matmul_ref(cls, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
        """out[t, r] = dot(row r, x[t]) with ggml's activation rounding, summed in float64.

        raw: uint8 [rows, row_bytes]; x: float32 [T, n]. Returns float32 [T, rows].
        """
        w = cls.dequantize(raw).astype(np.float64)
        xr = cls.round_activations(x).astype(np.float64)
        return (xr @ w.T).astype(np.float32)


class F32(FloatFormat):
    qtype = GGMLQuantizationType.F32
    type_size = 4
    element_dtype = np.dtype("<f4")

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        return cls.elements(raw).astype(np.float32)

    @classmethod
    def round_activations(cls, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)


class F16(FloatFormat):
    qtype = GGMLQuantizationType.F16
    type_size = 2
    element_dtype = np.dtype("<f2")

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        return cls.elements(raw).astype(np.float32)

    @classmethod
    def round_activations(cls, x: np.ndarray) -> np.ndarray:
        return round_to_fp16(x)


class BF16(FloatFormat):
    qtype = GGMLQuantizationType.BF16
    type_size = 2
    element_dtype = np.dtype("<u2")

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        return bf16_bits_to_fp32(cls.elements(raw))

    @classmethod
    def round_activations(cls, x: np.ndarray) -> np.ndarray:
        return round_to_bf16(x)


FORMATS: dict[GGMLQuantizationType, type[FloatFormat]] = {f.qtype: f for f in (F32, F16, BF16)}
