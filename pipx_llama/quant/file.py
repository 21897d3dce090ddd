"""Quantize a GGUF model to a llama.cpp file type (Q4_0 ... Q6_K), as ``llama-quantize`` does.

``quantize_model(src, dst, "Q4_K_M")`` reads ``src`` with pipx-llama's validating reader, chooses
each tensor's type with llama.cpp's rules (:mod:`pipx_llama.quant.rules`), and writes a GGUF v3 file
with ``gguf.GGUFWriter`` whose tensors are byte-for-byte what llama.cpp's quantizer writes:

- metadata is copied key by key with its original value types, in order; split keys are dropped and
  ``general.quantization_version`` and ``general.file_type`` are set last, as llama.cpp does;
- tensors come in llama.cpp's order (by layer, then name). A tensor whose type does not change is
  copied; any other is widened to float32 (F16/BF16 exactly; a quantized source is dequantized
  first, which needs ``allow_requantize`` as llama.cpp's ``--allow-requantize``) and quantized by
  the numba kernels of :mod:`pipx_llama.quant.quantize_legacy` / :mod:`pipx_llama.quant.quantize_kquants`;
- memory stays bounded: a tensor is read in chunks of rows (about ``chunk_elements`` values) with
  ordinary reads, so the page cache, not the process, holds the input; at most one output tensor
  is held at a time;
- output goes to a hidden temporary file next to ``dst``, flushed to disk and renamed to ``dst`` only
  once complete (:func:`pipx_llama.files.atomic_output`, as the converter writes); any failure or
  interruption (including an exception raised by ``on_event``) deletes it, and a full disk is a
  ``DiskFullError``;
- progress: ``on_event(ProgressEvent)`` gets ``start``, then one ``progress`` event per tensor
  (``done``/``total`` in input bytes, the tensor and its types in ``message``), then ``done``.

NaN or infinite weights, and values too large for a format's fp16 scales, are refused with a
``QuantizeValueError`` naming the tensor and row (llama.cpp refuses such data too).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, GGUFWriter
from numba import njit, prange

from pipx_llama.engine import WEIGHT_KERNELS
from pipx_llama.errors import ModelFileError, UnsupportedModelError, UsageError
from pipx_llama.events import ProgressEvent
from pipx_llama.files import atomic_output, check_free
from pipx_llama.formats.floats import fp32_to_bf16_bits
from pipx_llama.formats.fp16 import fp16_bits
from pipx_llama.formats.gguf import GGUFFile, TensorInfo, open_gguf
from pipx_llama.quant.quantize_kquants import KQUANT_QUANTIZERS
from pipx_llama.quant.quantize_legacy import (
    LEGACY_QUANTIZERS,
    STATUS_NONFINITE,
    RowQuantizer,
    f32_bits,
)
from pipx_llama.quant.rules import QUANTIZED_TYPES, FileType, ModelInfo, TensorChoice, choose_types, file_type

Q = GGMLQuantizationType
i32 = np.int32
QUANTIZERS: dict[GGMLQuantizationType, RowQuantizer] = {**LEGACY_QUANTIZERS, **KQUANT_QUANTIZERS}
# Keys llama.cpp's quantizer drops (split files are written whole) or sets itself, last.
_DROPPED_KEYS = ("split.no", "split.count", "split.tensors.count", "general.quantization_version",
                 "general.file_type")
DEFAULT_CHUNK_ELEMENTS = 1 << 23


class QuantizeValueError(ModelFileError):
    """A tensor holds values that cannot be quantized (NaN, infinity, or too large for fp16 scales)."""


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize_model`` wrote."""

    path: Path
    file_type: str
    n_tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float
    n_fallback: int
    types: dict[str, str] = field(default_factory=dict)


# --- widening kernels ---------------------------------------------------------------------------


@njit(cache=True, parallel=True, nogil=True)
def widen_f16(h: np.ndarray, out: np.ndarray) -> None:
    """fp16 bit patterns uint16 [k, n] -> their exact float32 values, written as bits into out int32 [k, n].

    Integer operations only, so LLVM vectorizes it (a table lookup would be a gather): normal numbers
    re-bias the exponent, subnormals are their mantissa times 2**-24 (exact in float32), and
    infinities and NaNs keep their payload, as numpy's and ggml's conversions do.
    """
    for r in prange(h.shape[0]):
        hr = h[r]
        o = out[r]
        for j in range(hr.shape[0]):
            v = i32(hr[j])
            mant = i32(v & i32(0x3FF))
            e = i32((v >> i32(10)) & i32(0x1F))
            sign = i32(i32(v & i32(0x8000)) << i32(16))
            normal = i32(sign | i32(i32(e + i32(112)) << i32(23)) | i32(mant << i32(13)))
            special = i32(sign | i32(0x7F800000) | i32(mant << i32(13)))
            sub = i32(sign | f32_bits(np.float32(mant) * np.float32(5.960464477539063e-08)))
            o[j] = sub if e == 0 else (special if e == 31 else normal)


def widen_f16_ref(h: np.ndarray) -> np.ndarray:
    """numpy twin of ``widen_f16``."""
    return np.asarray(h, dtype=np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, parallel=True, nogil=True)
def widen_bf16(h: np.ndarray, out: np.ndarray) -> None:
    """bf16 bit patterns uint16 [k, n] -> their float32 bit patterns uint32 [k, n] (h << 16)."""
    for r in prange(h.shape[0]):
        for j in range(h.shape[1]):
            out[r, j] = np.uint32(h[r, j]) << np.uint32(16)


def widen_bf16_ref(h: np.ndarray) -> np.ndarray:
    """numpy twin of ``widen_bf16``, as float32."""
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- metadata ------------------------------------------------------------------------------------


def _kv_types(header: bytes, n_kv: int) -> dict[str, tuple[GGUFValueType, GGUFValueType | None]]:
    """Each metadata key's value type (and array element type), walking a header the reader validated."""
    sizes = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
             GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1,
             GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
    pos = 24
    out: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}

    def u32() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack_from("<I", header, pos - 4)[0]

    def u64() -> int:
        nonlocal pos
        pos += 8
        return struct.unpack_from("<Q", header, pos - 8)[0]

    def skip(vtype: GGUFValueType) -> None:
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            n = u64()
            pos += n
        else:
            pos += sizes[vtype]

    for _ in range(n_kv):
        klen = u64()
        key = header[pos : pos + klen].decode("utf-8", "surrogateescape")
        pos += klen
        vtype = GGUFValueType(u32())
        if vtype == GGUFValueType.ARRAY:
            etype = GGUFValueType(u32())
            count = u64()
            if etype == GGUFValueType.STRING:
                for _ in range(count):
                    skip(etype)
            else:
                pos += count * sizes[etype]
            out[key] = (vtype, etype)
        else:
            skip(vtype)
            out[key] = (vtype, None)
    return out


def _plain(value: Any) -> Any:
    """A reader value in the form GGUFWriter packs: strings as bytes (kept byte-exact), arrays as lists."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v for v in value]
    return value


class _Writer(GGUFWriter):
    """GGUFWriter that can also write empty arrays (llama.cpp copies them; gguf-py refuses)."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if vtype == GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _copy_metadata(writer: GGUFWriter, g: GGUFFile, ft: FileType) -> None:
    with open(g.path, "rb") as f:
        header = f.read(g.data_offset)
    n_kv = struct.unpack_from("<Q", header, 16)[0]
    types = _kv_types(header, n_kv)
    writer.kv_data[0].clear()
    for key, value in g.metadata.items():
        if key in _DROPPED_KEYS:
            continue
        vtype, sub = types[key]
        writer.add_key_value(key, _plain(value), vtype, sub)
    writer.add_uint32("general.quantization_version", GGML_QUANT_VERSION)
    writer.add_uint32("general.file_type", int(ft.ftype))
    alignment = g.metadata.get("general.alignment")
    if isinstance(alignment, int):
        writer.data_alignment = alignment


# --- tensors -------------------------------------------------------------------------------------


def _read_into(f: Any, offset: int, buf: np.ndarray) -> None:
    view = memoryview(buf).cast("B")
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ModelFileError(f"{f.name}: unexpected end of file at byte {offset + got}",
                                 "the file was truncated while being read; check it and try again")
        got += n


class _TensorSource:
    """Reads a tensor's rows in chunks and widens them to float32."""

    def __init__(self, f: Any, info: TensorInfo) -> None:
        self.f = f
        self.info = info
        self.n = info.shape[0]
        self.rows = info.n_elements // self.n
        block, size = GGML_QUANT_SIZES[info.qtype]
        self.row_bytes = self.n // block * size

    def raw(self) -> np.ndarray:
        buf = np.empty(self.info.nbytes, np.uint8)
        _read_into(self.f, self.info.offset, buf)
        return buf

    def rows_f32(self, r0: int, k: int, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows r0..r0+k as float32 [k, n]; ``raw`` and ``out`` are scratch buffers big enough."""
        src = raw[: k * self.row_bytes].reshape(k, self.row_bytes)
        _read_into(self.f, self.info.offset + r0 * self.row_bytes, src)
        x = out[: k * self.n].reshape(k, self.n)
        qtype = self.info.qtype
        if qtype == Q.F32:
            return src.view(np.float32)
        if qtype == Q.F16:
            widen_f16(src.view(np.uint16), x.view(np.int32))
        elif qtype == Q.BF16:
            widen_bf16(src.view(np.uint16), x.view(np.uint32))
        else:
            WEIGHT_KERNELS[qtype].dequantize(src, x)
        return x


def _check_widenable(choices: list[TensorChoice]) -> None:
    for c in choices:
        if c.source != c.target and c.source not in (Q.F32, Q.F16, Q.BF16) and c.source not in WEIGHT_KERNELS:
            raise UnsupportedModelError(
                f"tensor {c.name!r} is stored as {c.source.name}, which pipx-llama cannot convert to "
                f"{c.target.name}",
                "quantize from an F32, F16 or BF16 model (or one in Q4_0..Q8_0, Q4_K..Q6_K)",
            )


def _value_error(src: Path, choice: TensorChoice, row: int, code: int, x: np.ndarray) -> QuantizeValueError:
    if code & STATUS_NONFINITE:
        bad = int(np.count_nonzero(~np.isfinite(x)))
        return QuantizeValueError(
            f"{src}: tensor {choice.name!r} holds NaN or infinite values ({bad} in row {row}); it cannot be "
            f"quantized",
            "the model file is damaged or was converted from broken weights; re-download or re-convert it",
        )
    biggest = float(np.max(np.abs(x)))
    return QuantizeValueError(
        f"{src}: tensor {choice.name!r} row {row} has values up to {biggest:.4g}, too large for "
        f"{choice.target.name}'s fp16 block scales",
        "this tensor cannot be stored in that format (llama.cpp refuses it too); check the model's weights",
    )


def _quantized_tensor(
    src_path: Path, source: _TensorSource, choice: TensorChoice, chunk_elements: int
) -> np.ndarray:
    """The tensor's bytes in its target type, built chunk by chunk: uint8 [rows, target row bytes]."""
    n, rows = source.n, source.rows
    target = choice.target
    per_chunk = max(1, min(rows, chunk_elements // n))
    raw = np.empty(per_chunk * source.row_bytes, np.uint8)
    scratch = np.empty(per_chunk * n, np.float32)
    block, size = GGML_QUANT_SIZES[target]
    out = np.empty((rows, n // block * size), np.uint8)
    status = np.zeros(per_chunk, np.uint8)
    for r0 in range(0, rows, per_chunk):
        k = min(per_chunk, rows - r0)
        x = source.rows_f32(r0, k, raw, scratch)
        if target in QUANTIZERS:
            QUANTIZERS[target](x, out[r0 : r0 + k], status[:k])
            bad = np.flatnonzero(status[:k])
            if bad.size:
                row = int(bad[0])
                raise _value_error(src_path, choice, r0 + row, int(status[row]), x[row])
        else:
            _store_float(x, out[r0 : r0 + k], target, src_path, choice, r0)
    return out


def _store_float(x: np.ndarray, out: np.ndarray, target: GGMLQuantizationType, src_path: Path,
                 choice: TensorChoice, r0: int) -> None:
    """F32/F16/BF16 targets (F16 is llama.cpp's last-resort fallback): round like ggml's converters."""
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise _value_error(src_path, choice, r0 + row, STATUS_NONFINITE, x[row])
    if target == Q.F32:
        out[...] = x.view(np.uint8)
    elif target == Q.F16:
        out[...] = fp16_bits(x).view(np.uint8)
    elif target == Q.BF16:
        out[...] = fp32_to_bf16_bits(x).view(np.uint8)
    else:
        raise UnsupportedModelError(f"cannot write tensor {choice.name!r} as {target.name}",
                                    "this type is not one pipx-llama quantizes to")


# --- the driver ----------------------------------------------------------------------------------


def _check_paths(src: Path, dst: Path) -> None:
    if not dst.parent.is_dir():
        raise UsageError(
            f"{dst.parent}: no such folder for the output file", "create the folder or fix the path"
        )
    if dst.is_dir():
        raise UsageError(f"{dst}: is a folder", "give the output a file name, e.g. model-Q4_K_M.gguf")
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise UsageError(
            f"{dst}: the output would overwrite the input", "write the quantized model to another file"
        )


def plan_quantization(g: GGUFFile, ft: FileType) -> list[TensorChoice]:
    """Every tensor's target type for file type ``ft``, in the order they will be written."""
    model = ModelInfo.from_metadata(g.metadata)
    return choose_types([(t.name, t.shape, t.qtype) for t in g.tensors.values()], ft, model)


def _output_bytes(choice: TensorChoice) -> int:
    n = 1
    for d in choice.shape:
        n *= d
    block, size = GGML_QUANT_SIZES[choice.target]
    return n // block * size


def quantize_model(
    src: str | Path,
    dst: str | Path,
    ftype: str,
    *,
    threads: int | None = None,
    allow_requantize: bool = False,
    on_event: Callable[[ProgressEvent], None] | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> QuantizeResult:
    """Quantize the GGUF model ``src`` to ``dst`` with llama.cpp's file type ``ftype`` (e.g. "Q4_K_M").

    ``threads`` sets numba's thread count for the call (default: all cores). A tensor already stored
    in another quantized type is re-quantized only with ``allow_requantize`` (quality suffers).
    """
    src, dst = Path(src), Path(dst)
    ft = file_type(ftype)
    _check_paths(src, dst)
    g = open_gguf(src)
    try:
        choices = plan_quantization(g, ft)
        _check_widenable(choices)
        needs = [c for c in choices if c.source != c.target and c.source in QUANTIZED_TYPES]
        if needs and not allow_requantize:
            c = needs[0]
            raise UsageError(
                f"{src}: tensor {c.name!r} is already quantized ({c.source.name}); requantizing it to "
                f"{c.target.name} is disabled ({len(needs)} tensors would be requantized)",
                "quantize from an F32/F16/BF16 model, or pass --allow-requantize (quality suffers)",
            )
        bytes_out = sum(_output_bytes(c) for c in choices)
        check_free(dst.parent, bytes_out + (1 << 20), f"the quantized model {dst.name}")
        previous_threads = numba.get_num_threads()
        if threads is not None:
            if threads < 1:
                raise UsageError(
                    f"--threads must be at least 1, got {threads}", "pass a positive thread count"
                )
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            return _write(g, src, dst, ft, choices, bytes_out, on_event, chunk_elements)
        finally:
            numba.set_num_threads(previous_threads)
    finally:
        g.close()


def _write(g: GGUFFile, src: Path, dst: Path, ft: FileType, choices: list[TensorChoice], bytes_out: int,
           on_event: Callable[[ProgressEvent], None] | None, chunk_elements: int) -> QuantizeResult:
    emit = on_event or (lambda ev: None)
    label = str(dst)
    bytes_in = sum(g.tensors[c.name].nbytes for c in choices)
    t0 = time.monotonic()
    with atomic_output(dst, f"the quantized model {dst.name}") as tmp:
        writer = _Writer(tmp, g.metadata.get("general.architecture", ""))
        try:
            _copy_metadata(writer, g, ft)
            for c in choices:
                writer.add_tensor_info(
                    c.name,
                    tuple(reversed(c.shape)),
                    np.dtype(np.float32),
                    _output_bytes(c),
                    raw_dtype=c.target,
                )
            emit(ProgressEvent("start", label, 0, bytes_in,
                               message=f"{len(choices)} tensors to {ft.name}, {bytes_out / 2**20:.1f} MiB"))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensors(writer, g, src, choices, bytes_in, emit, chunk_elements, label, t0)
        finally:
            writer.close()  # before atomic_output renames or removes it (Windows cannot while it is open)
    seconds = time.monotonic() - t0
    emit(
        ProgressEvent(
            "done",
            label,
            bytes_in,
            bytes_in,
            message=f"{bytes_in / 2**20:.1f} MiB -> {bytes_out / 2**20:.1f} MiB in {seconds:.1f} s",
        )
    )
    return QuantizeResult(dst, ft.name, len(choices), bytes_in, bytes_out, seconds,
                          sum(c.fallback for c in choices), {c.name: c.target.name for c in choices})


def _write_tensors(writer: GGUFWriter, g: GGUFFile, src: Path, choices: list[TensorChoice], bytes_in: int,
                   emit: Callable[[ProgressEvent], None], chunk_elements: int, label: str, t0: float) -> None:
    """Every tensor's data in its target type, one at a time, with a progress event each."""
    done = 0
    with open(src, "rb", buffering=0) as f:
        for i, c in enumerate(choices):
            source = _TensorSource(f, g.tensors[c.name])
            if c.source == c.target:
                data = source.raw()
            else:
                data = _quantized_tensor(src, source, c, chunk_elements)
            writer.write_tensor_data(data)
            del data
            done += source.info.nbytes
            elapsed = time.monotonic() - t0
            speed = done / elapsed if elapsed > 0 else None
            eta = (bytes_in - done) / speed if speed else None
            shape = "x".join(str(d) for d in c.shape)
            what = c.target.name if c.source == c.target else f"{c.source.name} -> {c.target.name}"
            fb = " (fallback)" if c.fallback else ""
            emit(ProgressEvent("progress", label, done, bytes_in, speed, eta,
                               message=f"[{i + 1}/{len(choices)}] {c.name} [{shape}] {what}{fb}"))
