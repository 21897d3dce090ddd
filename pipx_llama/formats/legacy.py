"""ggml's legacy block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (and the Q8_1 activation format).

Format facts are data: each block covers 32 weights and is laid out as the numpy structured dtype
below, field for field as ``block_q*`` in ggml-common.h (``d``/``m``/``s`` are fp16). The weight
value of element ``j`` of a block is

    Q4_0: d * (q - 8)          q = nibble of qs[j % 16], low nibble for j < 16, high for j >= 16
    Q4_1: d * q + m            same nibbles
    Q5_0: d * (q - 16)         q = that nibble | (bit j of qh) << 4
    Q5_1: d * q + m            same 5-bit q
    Q8_0: d * qs[j]            qs signed bytes

The numpy references here define what the numba kernels must reproduce:

- ``dequantize`` — bit for bit what ``gguf.quants.dequantize`` and ggml's ``dequantize_row_*``
  produce: ``d * q`` then ``+ m``, each rounded to float32 (no fused multiply-add).
- ``quantize_row_q8_0`` / ``quantize_row_q8_1`` — ggml's activation quantizers
  ``quantize_row_q8_0_ref`` / ``quantize_row_q8_1_ref`` (ggml-quants.c). Quantized activations are
  split arrays: ``qs`` int8 [T, n], ``d`` float32 [T, n/32] holding the fp16-rounded scale ggml
  stores, and for Q8_1 ``s`` float32 [T, n/32] = fp16(sum(qs) * d) computed with the *unrounded*
  float32 ``d``, as the reference does. (On x86 the CPU backend runs SIMD versions that scale by
  ``127/amax`` instead of ``1/(amax/127)`` and round ties to even; they differ from the reference
  only when a scaled value lands within an ulp of a half.)
- ``matmul_ref`` — the CPU backend's ``ggml_vec_dot_*_q8_*``: an exact integer dot product per
  block, scaled in float32 by ``d_w * d_x`` (plus ``m_w * s_x`` for the ``_1`` types).

Where the C code is undefined (a block whose largest magnitude is below about 3.7e-37, so that
``1/d`` overflows to inf), the quantizers here saturate to +-127 and send NaN to 0; the numba
twins do the same.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType

from pipx_llama.formats.floats import round_to_fp16

QK = 32

BLOCK_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
BLOCK_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
BLOCK_Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])
BLOCK_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])
BLOCK_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
BLOCK_Q8_1 = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", (32,))])


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf (half away from zero) on float32, exactly: v - trunc(v) is exact in float32."""
    t = np.trunc(v)
    frac = v - t
    return t + np.where(np.abs(frac) >= np.float32(0.5), np.sign(v), np.float32(0))


def _q8_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared part of both activation quantizers: (qs as float, unrounded d, fp16-rounded d)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"activations must be float32 [T, n] with n a multiple of {QK}, got {x.shape}")
    t, n = x.shape
    xb = x.reshape(t, n // QK, QK)
    amax = np.abs(xb).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        q = _roundf(xb * inv[..., None])
    q = np.clip(np.nan_to_num(q, nan=0.0, posinf=127.0, neginf=-127.0), -127, 127)
    return q, d, round_to_fp16(d)


def quantize_row_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [T, n] -> (qs int8 [T, n], d float32 [T, n/32]) as ``quantize_row_q8_0_ref``."""
    q, _, d16 = _q8_blocks(x)
    return q.astype(np.int8).reshape(q.shape[0], -1), d16


def quantize_row_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 [T, n] -> (qs, d, s) as ``quantize_row_q8_1_ref``: s = fp16(float(sum(qs)) * d)."""
    q, d, d16 = _q8_blocks(x)
    qs = q.astype(np.int8)
    total = qs.astype(np.int32).sum(axis=-1).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        s = round_to_fp16((total * d).astype(np.float32))
    return qs.reshape(qs.shape[0], -1), d16, s


class LegacyFormat:
    """Facts and numpy references of one 32-weight block format (subclasses fill in the class variables)."""

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int] = QK
    block_dtype: ClassVar[np.dtype]
    type_size: ClassVar[int]
    # The activation format ggml's CPU backend pairs with these weights (vec_dot_type).
    activation: ClassVar[str]
    has_min: ClassVar[bool] = False

    @classmethod
    def row_elements(cls, row_bytes: int) -> int:
        return row_bytes // cls.type_size * QK

    @classmethod
    def blocks(cls, raw: np.ndarray) -> np.ndarray:
        """uint8 [k, row_bytes] -> structured blocks [k, n/32]."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        if raw.ndim != 2 or raw.shape[1] % cls.type_size:
            raise ValueError(
                f"{cls.__name__} rows must be uint8 [k, a multiple of {cls.type_size}], got {raw.shape}"
            )
        return raw.view(cls.block_dtype)

    @classmethod
    def _nibbles(cls, qs: np.ndarray) -> np.ndarray:
        """qs uint8 [..., 16] -> q [..., 32]: low nibbles are elements 0..15, high nibbles 16..31."""
        return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)

    @classmethod
    def _high_bits(cls, qh: np.ndarray) -> np.ndarray:
        """qh uint32 [...] -> bit j of qh as element j's fifth bit, [..., 32] uint8."""
        return ((qh[..., None] >> np.arange(QK, dtype=np.uint32)) & 1).astype(np.uint8)

    @classmethod
    def weight_ints(cls, raw: np.ndarray) -> np.ndarray:
        """The integers ggml's vec_dot multiplies: int16 [k, n/32, 32]."""
        raise NotImplementedError

    @classmethod
    def scales(cls, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(d, m) as float32 [k, n/32]; m is None for the types without a minimum."""
        b = cls.blocks(raw)
        d = b["d"].astype(np.float32)
        m = b["m"].astype(np.float32) if cls.has_min else None
        return d, m

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        """uint8 [k, row_bytes] -> float32 [k, n], bit for bit as ``gguf.quants.dequantize``."""
        q = cls.weight_ints(raw).astype(np.float32)
        d, m = cls.scales(raw)
        out = d[..., None] * q
        if m is not None:
            out = out + m[..., None]
        return out.reshape(q.shape[0], -1)

    @classmethod
    def quantize_activations(cls, x: np.ndarray) -> tuple[np.ndarray, ...]:
        return quantize_row_q8_1(x) if cls.activation == "q8_1" else quantize_row_q8_0(x)

    @classmethod
    def matmul_ref(cls, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
        """out[t, r] as ``ggml_vec_dot_<type>_<activation>`` computes it. Returns float32 [T, rows].

        Per block: an exact integer dot product ``sumi``, then ``sumi * (d_w * d_x)`` in float32
        (``+ m_w * s_x`` for Q4_1/Q5_1). The blocks are summed in float64: the numba kernels and
        ggml each sum them in their own float32 order, and tests compare with a tolerance.
        """
        acts = cls.quantize_activations(x)
        qs, dx = acts[0], acts[1]
        t, n = qs.shape
        wq = cls.weight_ints(raw).astype(np.int32)
        dw, mw = cls.scales(raw)
        yq = qs.reshape(t, n // QK, QK).astype(np.int32)
        sumi = np.einsum("rbj,tbj->trb", wq, yq)
        terms = sumi.astype(np.float32) * (dw[None, :, :] * dx[:, None, :])
        if mw is not None:
            terms = terms + mw[None, :, :] * acts[2][:, None, :]
        return terms.astype(np.float64).sum(axis=-1).astype(np.float32)


class Q4_0(LegacyFormat):
    qtype = GGMLQuantizationType.Q4_0
    block_dtype = BLOCK_Q4_0
    type_size = BLOCK_Q4_0.itemsize
    activation = "q8_0"

    @classmethod
    def weight_ints(cls, raw: np.ndarray) -> np.ndarray:
        return cls._nibbles(cls.blocks(raw)["qs"]).astype(np.int16) - 8


class Q4_1(LegacyFormat):
    qtype = GGMLQuantizationType.Q4_1
    block_dtype = BLOCK_Q4_1
    type_size = BLOCK_Q4_1.itemsize
    activation = "q8_1"
    has_min = True

    @classmethod
    def weight_ints(cls, raw: np.ndarray) -> np.ndarray:
        return cls._nibbles(cls.blocks(raw)["qs"]).astype(np.int16)


class Q5_0(LegacyFormat):
    qtype = GGMLQuantizationType.Q5_0
    block_dtype = BLOCK_Q5_0
    type_size = BLOCK_Q5_0.itemsize
    activation = "q8_0"

    @classmethod
    def weight_ints(cls, raw: np.ndarray) -> np.ndarray:
        b = cls.blocks(raw)
        q = cls._nibbles(b["qs"]) | (cls._high_bits(b["qh"]) << 4)
        return q.astype(np.int16) - 16


class Q5_1(LegacyFormat):
    qtype = GGMLQuantizationType.Q5_1
    block_dtype = BLOCK_Q5_1
    type_size = BLOCK_Q5_1.itemsize
    activation = "q8_1"
    has_min = True

    @classmethod
    def weight_ints(cls, raw: np.ndarray) -> np.ndarray:
        b = cls.blocks(raw)
        q = cls._nibbles(b["qs"]) | (cls._high_bits(b["qh"]) << 4)
        return q.astype(np.int16)


class Q8_0(LegacyFormat):
    qtype = GGMLQuantizationType.Q8_0
    block_dtype = BLOCK_Q8_0
    type_size = BLOCK_Q8_0.itemsize
    activation = "q8_0"

    @classmethod
    def weight_ints(cls, raw: np.ndarray) -> np.ndarray:
        return cls.blocks(raw)["qs"].astype(np.int16)


FORMATS: dict[GGMLQuantizationType, type[LegacyFormat]] = {
    f.qtype: f for f in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
}
