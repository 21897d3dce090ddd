"""Quantizers for ggml's legacy 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.

Each numba kernel is a line-by-line port of ``quantize_row_<type>_ref`` in llama.cpp's
``ggml/src/ggml-quants.c`` (what ``llama-quantize`` runs when there is no importance matrix), so
its bytes equal ggml's: the same float32 operations in the same order (numba, like the ggml-base
library, neither reassociates nor contracts them into FMAs), fp16 scales rounded to nearest even as
``GGML_FP32_TO_FP16`` does, and C's float-to-small-integer conversions as x86 performs them
(``cvttss2si``, then the low byte). That last point only matters where the C code is undefined: in
a block whose largest magnitude is so small (below about 4e-37) that ``1/d`` overflows to inf, the
products are inf or NaN, which x86 converts to 0x80000000, whose low byte is 0.

The kernels work on float32 rows ``x`` [k, n] (n a multiple of 32) and write raw ggml blocks into
``out`` uint8 [k, n/32 * type_size], one thread per row (``prange``). They also write a status per
row (``status`` uint8 [k]): bit ``STATUS_NONFINITE`` when the row holds a NaN or an infinity, bit
``STATUS_SCALE_OVERFLOW`` when a block scale does not fit in fp16 (magnitudes above about 8e6 for
Q8_0). llama.cpp rejects both (``ggml_validate_row_data``); the caller turns them into an error
naming the tensor.

Every kernel has a numpy twin ``<name>_ref`` computing the same bytes vectorized over blocks; tests
compare both with each other, with ``gguf.quants.quantize`` and with ggml itself.

The bit-level helpers used by the K-quant kernels too live here: ``f32_bits`` (a float32's bit
pattern, an LLVM bitcast), ``fp16_bits`` (``GGML_FP32_TO_FP16``) and ``c_low_byte`` (C's
float -> int8/uint8 conversion).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from pipx_llama.formats.fp16 import fp32_bits_to_fp16_bits

QK = 32
STATUS_NONFINITE = 1
STATUS_SCALE_OVERFLOW = 2

f32 = np.float32
_FLT_MAX = f32(3.4028234663852886e38)
_I32_MIN = -2147483648
_TWO31 = f32(2147483648.0)

# --- bit helpers shared with the K-quant kernels ------------------------------------------------


@intrinsic
def f32_bits(typingctx, x):
    """The bit pattern of a float32 as int32 (a bitcast, like ggml's memcpy into an int)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(inline="always")
def fp16_bits(v: np.float32) -> int:
    """``GGML_FP32_TO_FP16(v)``: the fp16 bit pattern nearest to v (ties to even) as an int."""
    return fp32_bits_to_fp16_bits(np.int64(f32_bits(v)) & np.int64(0xFFFFFFFF))


@njit(inline="always")
def c_low_byte(v: np.float32) -> int:
    """The low byte (0..255) of x86's truncating float -> int32 conversion, which is what C's
    ``(int8_t)v`` and ``(uint8_t)v`` store. NaN and out-of-range values give 0x80000000."""
    if math.isnan(v) or v >= _TWO31 or v < -_TWO31:
        return 0
    return np.int64(np.int32(v)) & 0xFF


@njit(inline="always")
def as_int8(b: int) -> int:
    """A byte 0..255 read as a signed char."""
    return ((b & 0xFF) ^ 0x80) - 0x80


@njit(inline="always")
def _roundf_byte(v: np.float32) -> int:
    """C's ``(int8_t)roundf(v)`` as the stored byte: roundf rounds half away from zero."""
    t = np.trunc(v)
    if abs(v - t) >= f32(0.5):
        t += f32(1.0) if v > f32(0.0) else f32(-1.0)
    return c_low_byte(t)


@njit(inline="always")
def _store_fp16(out: np.ndarray, r: int, o: int, h: int) -> None:
    out[r, o] = np.uint8(h & 0xFF)
    out[r, o + 1] = np.uint8((h >> 8) & 0xFF)


@njit(inline="always")
def _overflowed(h: int) -> bool:
    return (h & 0x7C00) == 0x7C00


# --- kernels ------------------------------------------------------------------------------------


@njit(inline="always")
def _absmax_block(x: np.ndarray, r: int, base: int) -> tuple[np.float32, np.float32, int]:
    """(amax, the value with that magnitude, non-finite flag) as the _0 references search it:
    the first value whose magnitude beats the running maximum, starting from 0."""
    amax = f32(0.0)
    mx = f32(0.0)
    bad = 0
    for j in range(QK):
        v = x[r, base + j]
        av = abs(v)
        if not av <= _FLT_MAX:
            bad = STATUS_NONFINITE
        if amax < av:
            amax = av
            mx = v
    return amax, mx, bad


@njit(inline="always")
def _minmax_block(x: np.ndarray, r: int, base: int) -> tuple[np.float32, np.float32, int]:
    """(min, max, non-finite flag) as the _1 references search them, from +-FLT_MAX."""
    mn = _FLT_MAX
    mx = -_FLT_MAX
    bad = 0
    for j in range(QK):
        v = x[r, base + j]
        if not abs(v) <= _FLT_MAX:
            bad = STATUS_NONFINITE
        # C's compare-and-assign, not min()/max(): ties keep the first value (the sign of a zero)
        if v < mn:  # noqa: PLR1730
            mn = v
        if v > mx:  # noqa: PLR1730
            mx = v
    return mn, mx, bad


@njit(cache=True, parallel=True)
def quantize_q4_0(x: np.ndarray, out: np.ndarray, status: np.ndarray) -> None:
    """``quantize_row_q4_0_ref`` on each row: d = max/-8, q = min(15, (int8)(x/d + 8.5))."""
    rows, n = x.shape
    for r in prange(rows):
        st = 0
        for b in range(n // QK):
            base = b * QK
            o = b * 18
            _, mx, bad = _absmax_block(x, r, base)
            d = mx / f32(-8.0)
            idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            h = fp16_bits(d)
            st |= bad | (STATUS_SCALE_OVERFLOW if _overflowed(h) else 0)
            _store_fp16(out, r, o, h)
            for j in range(16):
                q0 = min(15, as_int8(c_low_byte(x[r, base + j] * idv + f32(8.5)))) & 0xFF
                q1 = min(15, as_int8(c_low_byte(x[r, base + 16 + j] * idv + f32(8.5)))) & 0xFF
                out[r, o + 2 + j] = np.uint8(q0 | ((q1 << 4) & 0xFF))
        status[r] = st


@njit(cache=True, parallel=True)
def quantize_q4_1(x: np.ndarray, out: np.ndarray, status: np.ndarray) -> None:
    """``quantize_row_q4_1_ref``: d = (max-min)/15, m = min, q = min(15, (int8)((x-min)/d + 0.5))."""
    rows, n = x.shape
    for r in prange(rows):
        st = 0
        for b in range(n // QK):
            base = b * QK
            o = b * 20
            mn, mx, bad = _minmax_block(x, r, base)
            d = (mx - mn) / f32(15.0)
            idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            hd = fp16_bits(d)
            hm = fp16_bits(mn)
            st |= bad | (STATUS_SCALE_OVERFLOW if _overflowed(hd) or _overflowed(hm) else 0)
            _store_fp16(out, r, o, hd)
            _store_fp16(out, r, o + 2, hm)
            for j in range(16):
                q0 = min(15, as_int8(c_low_byte((x[r, base + j] - mn) * idv + f32(0.5)))) & 0xFF
                q1 = min(15, as_int8(c_low_byte((x[r, base + 16 + j] - mn) * idv + f32(0.5)))) & 0xFF
                out[r, o + 4 + j] = np.uint8(q0 | ((q1 << 4) & 0xFF))
        status[r] = st


@njit(inline="always")
def _store_q5(out: np.ndarray, r: int, o: int, q0: int, q1: int, j: int, qh: int) -> int:
    """Low nibbles of elements j and j+16 into qs[j]; returns qh with their fifth bits added."""
    out[r, o + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
    return qh | (((q0 & 0x10) >> 4) << j) | (((q1 & 0x10) >> 4) << (j + 16))


@njit(inline="always")
def _store_u32(out: np.ndarray, r: int, o: int, v: int) -> None:
    for k in range(4):
        out[r, o + k] = np.uint8((v >> (8 * k)) & 0xFF)


@njit(cache=True, parallel=True)
def quantize_q5_0(x: np.ndarray, out: np.ndarray, status: np.ndarray) -> None:
    """``quantize_row_q5_0_ref``: d = max/-16, q = min(31, (int8)(x/d + 16.5)), 5th bits in qh."""
    rows, n = x.shape
    for r in prange(rows):
        st = 0
        for b in range(n // QK):
            base = b * QK
            o = b * 22
            _, mx, bad = _absmax_block(x, r, base)
            d = mx / f32(-16.0)
            idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            h = fp16_bits(d)
            st |= bad | (STATUS_SCALE_OVERFLOW if _overflowed(h) else 0)
            _store_fp16(out, r, o, h)
            qh = 0
            for j in range(16):
                q0 = min(31, as_int8(c_low_byte(x[r, base + j] * idv + f32(16.5)))) & 0xFF
                q1 = min(31, as_int8(c_low_byte(x[r, base + 16 + j] * idv + f32(16.5)))) & 0xFF
                qh = _store_q5(out, r, o + 6, q0, q1, j, qh)
            _store_u32(out, r, o + 2, qh)
        status[r] = st


@njit(cache=True, parallel=True)
def quantize_q5_1(x: np.ndarray, out: np.ndarray, status: np.ndarray) -> None:
    """``quantize_row_q5_1_ref``: d = (max-min)/31, m = min, q = (uint8)((x-min)/d + 0.5)."""
    rows, n = x.shape
    for r in prange(rows):
        st = 0
        for b in range(n // QK):
            base = b * QK
            o = b * 24
            mn, mx, bad = _minmax_block(x, r, base)
            d = (mx - mn) / f32(31.0)
            idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            hd = fp16_bits(d)
            hm = fp16_bits(mn)
            st |= bad | (STATUS_SCALE_OVERFLOW if _overflowed(hd) or _overflowed(hm) else 0)
            _store_fp16(out, r, o, hd)
            _store_fp16(out, r, o + 2, hm)
            qh = 0
            for j in range(16):
                q0 = c_low_byte((x[r, base + j] - mn) * idv + f32(0.5))
                q1 = c_low_byte((x[r, base + 16 + j] - mn) * idv + f32(0.5))
                qh = _store_q5(out, r, o + 8, q0, q1, j, qh)
            _store_u32(out, r, o + 4, qh)
        status[r] = st


@njit(cache=True, parallel=True)
def quantize_q8_0(x: np.ndarray, out: np.ndarray, status: np.ndarray) -> None:
    """``quantize_row_q8_0_ref``: d = amax/127, q = roundf(x/d)."""
    rows, n = x.shape
    for r in prange(rows):
        st = 0
        for b in range(n // QK):
            base = b * QK
            o = b * 34
            amax, _, bad = _absmax_block(x, r, base)
            d = amax / f32(127.0)
            idv = f32(1.0) / d if d != f32(0.0) else f32(0.0)
            h = fp16_bits(d)
            st |= bad | (STATUS_SCALE_OVERFLOW if _overflowed(h) else 0)
            _store_fp16(out, r, o, h)
            for j in range(QK):
                out[r, o + 2 + j] = np.uint8(_roundf_byte(x[r, base + j] * idv))
        status[r] = st


# --- numpy twins --------------------------------------------------------------------------------


def c_low_byte_ref(v: np.ndarray) -> np.ndarray:
    """numpy twin of ``c_low_byte``: int64 array of bytes 0..255."""
    v = np.asarray(v, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        inrange = (v < _TWO31) & (v >= -_TWO31)
    t = np.where(inrange, v, np.float32(0)).astype(np.int64)
    return np.where(inrange, t & 0xFF, 0)


def _int8_ref(b: np.ndarray) -> np.ndarray:
    return ((b & 0xFF) ^ 0x80) - 0x80


def _fp16_bytes_ref(v: np.ndarray) -> np.ndarray:
    """float32 [..., 1] -> the fp16 (round to nearest even) little-endian bytes, uint8 [..., 2]."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8)


def _blocks_ref(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"rows must be float32 [k, a multiple of {QK}], got {x.shape}")
    return x.reshape(x.shape[0], x.shape[1] // QK, QK)


def _absmax_ref(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, the first value of that magnitude, or +0 when the block is all zeros) per block."""
    ax = np.abs(xb)
    amax = ax.max(axis=-1, keepdims=True)
    mx = np.take_along_axis(xb, ax.argmax(axis=-1)[..., None], axis=-1)
    return amax, np.where(amax > 0, mx, np.float32(0))


def _minmax_ref(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) per block, each the first value found (which decides the sign of a zero)."""
    mn = np.take_along_axis(xb, xb.argmin(axis=-1)[..., None], axis=-1)
    return mn, np.take_along_axis(xb, xb.argmax(axis=-1)[..., None], axis=-1)


def _inverse_ref(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def _products_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return (a * b).astype(np.float32)


def _nibbles_ref(q: np.ndarray) -> np.ndarray:
    """q [..., 32] (0..255) -> qs bytes [..., 16]: element j in the low nibble, j+16 in the high."""
    return ((q[..., :16] & 0x0F) | ((q[..., 16:] << 4) & 0xF0)).astype(np.uint8)


def _qh_ref(q: np.ndarray) -> np.ndarray:
    """Fifth bits of q [..., 32] packed little-endian into 4 bytes [..., 4] (bit j = element j)."""
    bits = ((q >> 4) & 1).astype(np.uint8)
    return np.packbits(bits, axis=-1, bitorder="little")


def _rows(xb: np.ndarray, *parts: np.ndarray) -> np.ndarray:
    out = np.concatenate([p.astype(np.uint8) for p in parts], axis=-1)
    return out.reshape(xb.shape[0], -1)


def quantize_q4_0_ref(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``quantize_q4_0``: float32 [k, n] -> uint8 [k, n/32*18]."""
    xb = _blocks_ref(x)
    _, mx = _absmax_ref(xb)
    d = (mx / np.float32(-8)).astype(np.float32)
    q = np.minimum(15, _int8_ref(c_low_byte_ref(_products_ref(xb, _inverse_ref(d)) + np.float32(8.5)))) & 0xFF
    return _rows(xb, _fp16_bytes_ref(d), _nibbles_ref(q))


def quantize_q4_1_ref(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``quantize_q4_1``: float32 [k, n] -> uint8 [k, n/32*20]."""
    xb = _blocks_ref(x)
    mn, mx = _minmax_ref(xb)
    with np.errstate(over="ignore", invalid="ignore"):
        d = ((mx - mn) / np.float32(15)).astype(np.float32)
        v = _products_ref(xb - mn, _inverse_ref(d)) + np.float32(0.5)
    q = np.minimum(15, _int8_ref(c_low_byte_ref(v))) & 0xFF
    return _rows(xb, _fp16_bytes_ref(d), _fp16_bytes_ref(mn), _nibbles_ref(q))


def quantize_q5_0_ref(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``quantize_q5_0``: float32 [k, n] -> uint8 [k, n/32*22]."""
    xb = _blocks_ref(x)
    _, mx = _absmax_ref(xb)
    d = (mx / np.float32(-16)).astype(np.float32)
    q = (
        np.minimum(31, _int8_ref(c_low_byte_ref(_products_ref(xb, _inverse_ref(d)) + np.float32(16.5))))
        & 0xFF
    )
    return _rows(xb, _fp16_bytes_ref(d), _qh_ref(q), _nibbles_ref(q))


def quantize_q5_1_ref(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``quantize_q5_1``: float32 [k, n] -> uint8 [k, n/32*24]."""
    xb = _blocks_ref(x)
    mn, mx = _minmax_ref(xb)
    with np.errstate(over="ignore", invalid="ignore"):
        d = ((mx - mn) / np.float32(31)).astype(np.float32)
        v = _products_ref(xb - mn, _inverse_ref(d)) + np.float32(0.5)
    q = c_low_byte_ref(v)
    return _rows(xb, _fp16_bytes_ref(d), _fp16_bytes_ref(mn), _qh_ref(q), _nibbles_ref(q))


def quantize_q8_0_ref(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``quantize_q8_0``: float32 [k, n] -> uint8 [k, n/32*34]."""
    xb = _blocks_ref(x)
    amax, _ = _absmax_ref(xb)
    d = (amax / np.float32(127)).astype(np.float32)
    v = _products_ref(xb, _inverse_ref(d))
    t = np.trunc(v)
    with np.errstate(invalid="ignore"):
        t = np.where(np.abs(v - t) >= np.float32(0.5), t + np.sign(v), t).astype(np.float32)
    return _rows(xb, _fp16_bytes_ref(d), c_low_byte_ref(t))


# --- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowQuantizer:
    """A weight format's quantizer: the numba kernel and its numpy twin."""

    qtype: GGMLQuantizationType
    kernel: Callable[[np.ndarray, np.ndarray, np.ndarray], None]
    reference: Callable[[np.ndarray], np.ndarray]

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None,
                 status: np.ndarray | None = None) -> np.ndarray:
        """Quantize float32 rows [k, n] with the numba kernel; returns ``out`` (uint8 [k, row_bytes]).

        Check ``status`` (uint8 [k], allocated when not given) for ``STATUS_*`` bits afterwards.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] % self.block_size:
            raise ValueError(f"{self.qtype.name} needs float32 rows [k, a multiple of {self.block_size}], "
                             f"got {x.shape}")
        shape = (x.shape[0], self.row_bytes(x.shape[1]))
        if out is None:
            out = np.empty(shape, np.uint8)
        if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"{self.qtype.name} output must be C-contiguous uint8 {shape}")
        if status is None:
            status = np.empty(x.shape[0], np.uint8)
        self.kernel(x, out, status)
        return out


LEGACY_QUANTIZERS: dict[GGMLQuantizationType, RowQuantizer] = {
    q.qtype: q
    for q in (
        RowQuantizer(GGMLQuantizationType.Q4_0, quantize_q4_0, quantize_q4_0_ref),
        RowQuantizer(GGMLQuantizationType.Q4_1, quantize_q4_1, quantize_q4_1_ref),
        RowQuantizer(GGMLQuantizationType.Q5_0, quantize_q5_0, quantize_q5_0_ref),
        RowQuantizer(GGMLQuantizationType.Q5_1, quantize_q5_1, quantize_q5_1_ref),
        RowQuantizer(GGMLQuantizationType.Q8_0, quantize_q8_0, quantize_q8_0_ref),
    )
}
