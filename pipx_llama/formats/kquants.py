"""ggml's K-quant weight formats Q4_K, Q5_K, Q6_K and the Q8_K activation format, as numpy references.

Truth is llama.cpp: block layouts from ``ggml/src/ggml-common.h``, ``dequantize_row_q{4,5,6}_K`` and
``quantize_row_q8_K_ref`` from ``ggml/src/ggml-quants.c``, and the integer dot products
``ggml_vec_dot_q{4,5,6}_K_q8_K_generic`` from ``ggml/src/ggml-cpu/quants.c``. These functions favour
clarity over speed; the engine's numba kernels (``pipx_llama.engine.kernels.kquants``) are tested
against them.

A K-quant row is a sequence of 256-value super-blocks. Q4_K and Q5_K split a super-block into 8
sub-blocks of 32 values, each with a 6-bit scale and a 6-bit min (``x = d*sc*q - dmin*m``); Q6_K
splits it into 16 sub-blocks of 16 values with signed 8-bit scales (``x = d*sc*(q - 32)``).

Q8_K activations are kept as three split arrays rather than 292-byte blocks, because the kernels
read each part in its own loop: ``qs`` int8 [T, n], ``d`` float32 [T, n/256] and ``bsums`` int16
[T, n/16] (sums of 16 consecutive ``qs``, which turn the min terms into a handful of products).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256
K_SCALE_SIZE = 12

BLOCK_Q4_K = np.dtype(
    [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (K_SCALE_SIZE,)), ("qs", "u1", (QK_K // 2,))]
)
BLOCK_Q5_K = np.dtype(
    [
        ("d", "<f2"),
        ("dmin", "<f2"),
        ("scales", "u1", (K_SCALE_SIZE,)),
        ("qh", "u1", (QK_K // 8,)),
        ("qs", "u1", (QK_K // 2,)),
    ]
)
BLOCK_Q6_K = np.dtype(
    [("ql", "u1", (QK_K // 2,)), ("qh", "u1", (QK_K // 4,)), ("scales", "i1", (QK_K // 16,)), ("d", "<f2")]
)
BLOCK_Q8_K = np.dtype([("d", "<f4"), ("qs", "i1", (QK_K,)), ("bsums", "<i2", (QK_K // 16,))])

# Adding 1.5 * 2**23 pushes a float32 of magnitude < 2**22 into the range where its ulp is 1, so the
# addition itself rounds to the nearest integer (ties to even), readable from the low mantissa bits.
_NEAREST_INT_MAGIC = np.float32(12582912.0)


class Q8K(NamedTuple):
    """Q8_K activations for T rows of n values, as split arrays."""

    qs: np.ndarray  # int8 [T, n]
    d: np.ndarray  # float32 [T, n/256]
    bsums: np.ndarray  # int16 [T, n/16]


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` on float32 values of magnitude <= 4194303: round half to even."""
    val = np.asarray(x, dtype=np.float32) + _NEAREST_INT_MAGIC
    return (val.view(np.int32) & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def quantize_row_q8_K_ref(x: np.ndarray) -> Q8K:
    """``quantize_row_q8_K_ref`` applied to each row of finite float32 ``x`` [T, n] (n % 256 == 0).

    Per super-block: the value of largest magnitude (first one on ties) maps to -127, so
    ``iscale = -127/max`` and ``d = 1/iscale`` (the sign trick keeps q in [-127, 127]). An all-zero
    block stores d = 0 and zero quants; its bsums, which ggml leaves unwritten, are zero here.
    A block whose largest magnitude is so small (< 127/FLT_MAX, about 3.7e-37) that ``iscale``
    overflows is stored the same way: ggml asserts on it, and in release builds stores
    meaningless quants with d = -0, which contribute nothing either.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"Q8_K needs a 2-D array with rows a multiple of {QK_K} long, got shape {x.shape}")
    t, n = x.shape
    xb = x.reshape(t, n // QK_K, QK_K)
    imax = np.argmax(np.abs(xb), axis=-1)
    vmax = np.take_along_axis(xb, imax[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore", over="ignore"):
        iscale = (np.float32(-127.0) / vmax).astype(np.float32)
    usable = np.isfinite(iscale)
    iscale = np.where(usable, iscale, np.float32(0.0)).astype(np.float32)
    q = np.minimum(nearest_int(iscale[..., None] * xb), 127)
    q = np.where(usable[..., None], q, 0).astype(np.int8)
    d = np.float32(1.0) / np.where(usable, iscale, np.float32(np.inf))
    bsums = q.reshape(t, n // 16, 16).sum(axis=-1, dtype=np.int32).astype(np.int16)
    return Q8K(q.reshape(t, n), d.astype(np.float32), bsums)


def dequantize_q8_K(q8: Q8K) -> np.ndarray:
    """``dequantize_row_q8_K``: d * qs, float32 [T, n]."""
    t, n = q8.qs.shape
    qs = q8.qs.reshape(t, n // QK_K, QK_K).astype(np.float32)
    return (q8.d[..., None] * qs).reshape(t, n)


def get_scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 scale bytes of Q4_K/Q5_K blocks [..., 12] into 6-bit scales and mins [..., 8].

    Sub-blocks 0-3 keep scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7 put
    their low 4 bits in bytes 8-11 and their top 2 bits in the spare top bits of bytes 0-7.
    """
    s = scales.astype(np.uint8)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


def _blocks(raw: np.ndarray, block: np.dtype) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] % block.itemsize:
        raise ValueError(f"expected uint8 [rows, k*{block.itemsize}] blocks, got shape {raw.shape}")
    return raw.view(block)


def _q8k_parts(q8: Q8K, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = q8.qs.shape[0]
    if q8.qs.shape[1] != nb * QK_K:
        raise ValueError(f"activations have {q8.qs.shape[1]} values per row, weights {nb * QK_K}")
    return q8.qs.reshape(t, nb, QK_K).astype(np.int64), q8.d, q8.bsums.reshape(t, nb, 16).astype(np.int64)


class _KQuant:
    qtype: GGMLQuantizationType
    block: np.dtype
    block_size = QK_K

    @classmethod
    def row_bytes(cls, n: int) -> int:
        """Bytes of one row of n values (n a multiple of 256)."""
        return n // QK_K * cls.block.itemsize

    @classmethod
    def quants(cls, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per block: the integer weights times their sub-block scale, int64 [k, nb, 256], and fp16 d."""
        raise NotImplementedError

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def _min_terms(cls, blocks: np.ndarray, bsums: np.ndarray, yd: np.ndarray) -> np.ndarray:
        """float64 [k, T, nb]: dmin*y.d * sum_j m_j * bsums_j (zero for types without mins)."""
        return np.zeros((blocks.shape[0], bsums.shape[0], blocks.shape[1]))

    @classmethod
    def dot_q8_K(cls, raw: np.ndarray, q8: Q8K) -> np.ndarray:
        """``ggml_vec_dot_<type>_q8_K`` of every weight row with every activation row: float32 [T, k].

        Integer sums are exact (per super-block: sum over sub-blocks of scale * sum(q * q8)); each
        super-block then adds ``(d * y.d) * sumi`` and subtracts ``(dmin * y.d) * summs`` in float32,
        as ggml does. Super-blocks are summed in float64, so results differ from ggml's float32 sum
        by rounding only.
        """
        blocks = _blocks(raw, cls.block)
        nb = blocks.shape[1]
        qs, yd, bsums = _q8k_parts(q8, nb)
        wq, wd = cls.quants(raw)
        sumi = np.einsum("kbl,tbl->ktb", wq, qs)  # exact int64
        dall = (wd[:, None, :] * yd[None, :, :]).astype(np.float32)
        main = (dall * sumi.astype(np.float32)).astype(np.float64)
        total = main - cls._min_terms(blocks, bsums, yd)
        return total.sum(axis=-1).T.astype(np.float32)


class _Q45K(_KQuant):
    @classmethod
    def _min_terms(cls, blocks: np.ndarray, bsums: np.ndarray, yd: np.ndarray) -> np.ndarray:
        _, mn = get_scale_min_k4(blocks["scales"])
        pair = bsums[..., 0::2] + bsums[..., 1::2]  # [T, nb, 8]: sums of 32 values
        summs = np.einsum("kbj,tbj->ktb", mn.astype(np.int64), pair)
        dmin = (blocks["dmin"].astype(np.float32)[:, None, :] * yd[None, :, :]).astype(np.float32)
        return (dmin * summs.astype(np.float32)).astype(np.float64)

    @classmethod
    def _nibbles(cls, blocks: np.ndarray) -> np.ndarray:
        """Low 4 bits of each weight, uint8 [k, nb, 8, 32]: 32 bytes carry sub-blocks 2i (low) and 2i+1."""
        k, nb = blocks.shape
        qs = blocks["qs"].reshape(k, nb, 4, 1, 32)
        return ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 0xF).reshape(k, nb, 8, 32)

    @classmethod
    def _q(cls, blocks: np.ndarray) -> np.ndarray:
        return cls._nibbles(blocks)

    @classmethod
    def quants(cls, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blocks = _blocks(raw, cls.block)
        k, nb = blocks.shape
        sc, _ = get_scale_min_k4(blocks["scales"])
        q = cls._q(blocks).astype(np.int64) * sc[..., None].astype(np.int64)
        return q.reshape(k, nb, QK_K), blocks["d"].astype(np.float32)

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        """``dequantize_row_q{4,5}_K``: (d*sc) * q - dmin*m in float32, per row: float32 [k, n]."""
        blocks = _blocks(raw, cls.block)
        k, nb = blocks.shape
        sc, mn = get_scale_min_k4(blocks["scales"])
        d = blocks["d"].astype(np.float32)[..., None] * sc.astype(np.float32)
        m = blocks["dmin"].astype(np.float32)[..., None] * mn.astype(np.float32)
        q = cls._q(blocks).astype(np.float32)
        return (d[..., None] * q - m[..., None]).reshape(k, nb * QK_K)


class Q4_K(_Q45K):
    """4.5 bits per weight: 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit quants."""

    qtype = GGMLQuantizationType.Q4_K
    block = BLOCK_Q4_K


class Q5_K(_Q45K):
    """5.5 bits per weight: Q4_K plus one high bit per weight in ``qh``."""

    qtype = GGMLQuantizationType.Q5_K
    block = BLOCK_Q5_K

    @classmethod
    def _q(cls, blocks: np.ndarray) -> np.ndarray:
        # Bit i of qh[l] is the high bit of value l of sub-block i.
        k, nb = blocks.shape
        qh = blocks["qh"].reshape(k, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
        return cls._nibbles(blocks) | ((qh & 1) << 4)


class Q6_K(_KQuant):
    """6.5625 bits per weight: 16 sub-blocks of 16 with signed 8-bit scales, 6-bit quants offset by 32."""

    qtype = GGMLQuantizationType.Q6_K
    block = BLOCK_Q6_K

    @classmethod
    def _q(cls, blocks: np.ndarray) -> np.ndarray:
        """Signed quants q - 32, int8 [k, nb, 256] in value order.

        Each half of 128 values uses 64 ql bytes and 32 qh bytes: value l + 32*g (g = 0..3) takes
        the low or high nibble of ql[l + 32*(g%2)] and bits 2g..2g+1 of qh[l].
        """
        k, nb = blocks.shape
        ql = blocks["ql"].reshape(k, nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        ql = (ql & 0xF).reshape(k, nb, 2, 4, 32)
        qh = blocks["qh"].reshape(k, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        qh = qh & 3
        return ((ql | (qh << 4)).astype(np.int8) - np.int8(32)).reshape(k, nb, QK_K)

    @classmethod
    def quants(cls, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blocks = _blocks(raw, cls.block)
        k, nb = blocks.shape
        q = cls._q(blocks).reshape(k, nb, 16, 16).astype(np.int64)
        q = q * blocks["scales"][..., None].astype(np.int64)
        return q.reshape(k, nb, QK_K), blocks["d"].astype(np.float32)

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        """``dequantize_row_q6_K``: (d*sc) * (q - 32) in float32, per row: float32 [k, n]."""
        blocks = _blocks(raw, cls.block)
        k, nb = blocks.shape
        d = blocks["d"].astype(np.float32)[..., None] * blocks["scales"].astype(np.float32)
        q = cls._q(blocks).reshape(k, nb, 16, 16).astype(np.float32)
        return (d[..., None] * q).reshape(k, nb * QK_K)


KQUANTS: dict[GGMLQuantizationType, type[_KQuant]] = {c.qtype: c for c in (Q4_K, Q5_K, Q6_K)}

for _cls in KQUANTS.values():
    if GGML_QUANT_SIZES[_cls.qtype] != (QK_K, _cls.block.itemsize):
        raise ImportError(f"{_cls.__name__} block layout disagrees with gguf's GGML_QUANT_SIZES")
