"""Write a GGUF v3 model file from a stream of source tensors, one tensor in memory at a time.

``gguf.GGUFWriter`` is driven in its streaming mode: every tensor's name, shape and type is declared
first (``add_tensor_info``), the header, key/values and tensor infos are written, then each tensor is
loaded, converted and written (``write_tensor_data``) and dropped before the next is loaded. Output
goes to a hidden temporary file in the destination folder, renamed over the destination only once
it is complete and flushed to disk; a failed or interrupted run removes it.

Output types follow llama.cpp's converters: 1-D tensors and norms are F32; everything else is the
requested type, except that Q8_0 falls back to F16 for a row length that is not a multiple of 32
(``gguf.quants`` raises ``QuantError`` there, and convert_hf_to_gguf.py falls back the same way).
Conversions and Q8_0 use ``gguf.quants``, row block by row block, so temporaries stay small.

Metadata follows llama.cpp's converters key for key and in their order: ``general.architecture``,
the family's early keys (Phi-3's LongRoPE attention factor, which llama.cpp adds while it prepares
the tensors), ``general.type`` and the other ``general.*`` keys, the family's hyper-parameters
(``ModelParams.kvs``, with ``general.file_type`` where the family writes it), the quantization
version, then the tokenizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from pipx_llama.convert.vocab import Vocab
from pipx_llama.errors import ModelFileError, UsageError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.files import atomic_output, check_free

OUTTYPES: dict[str, QT] = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}
FILE_TYPES: dict[QT, gguf.LlamaFileType] = {
    QT.F32: gguf.LlamaFileType.ALL_F32,
    QT.F16: gguf.LlamaFileType.MOSTLY_F16,
    QT.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
SOURCE_DTYPES: dict[str, np.dtype] = {"F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F32": np.dtype("<f4")}
# Elements converted per block of rows: bounds the float32 temporaries of a conversion (16 MiB each).
_CHUNK_ELEMENTS = 1 << 22
# Room left on the disk beyond the file itself before a conversion is refused for space.
_DISK_MARGIN = 64 << 20


@dataclass
class SourceTensor:
    """A tensor to write: GGUF name, numpy-order shape, source type and a loader called once."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "F16", "BF16" or "F32": the dtype ``load`` returns (BF16 as uint16 bit patterns)
    load: Callable[[], np.ndarray]


@dataclass(frozen=True)
class KV:
    """One metadata key/value with its GGUF type (``sub_type``: the element type of an array)."""

    key: str
    value: Any
    vtype: VT
    sub_type: VT | None = None


FILE_TYPE_KEY = "general.file_type"


@dataclass
class ModelParams:
    """A model's architecture and hyper-parameter metadata, in the order llama.cpp's converter writes it.

    ``kvs`` holds ``general.file_type`` with value None: the writer fills in the output type's.
    """

    arch: str
    kvs: list[KV]
    early: list[KV] = field(default_factory=list)


@dataclass
class LlamaParams:
    """The ``llama.*`` hyper-parameters llama.cpp's loader reads."""

    n_vocab: int
    n_ctx: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    norm_eps: float
    rope_theta: float | None = None
    rope_dim: int | None = None
    rope_scaling_linear: float | None = None
    key_length: int | None = None  # written (as key and value length) when config.json names head_dim

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def model_params(self) -> ModelParams:
        """The ``llama.*`` keys in the order convert_hf_to_gguf.py's LlamaModel adds them."""
        a = "llama"
        kvs = [
            KV(f"{a}.block_count", self.n_layer, VT.UINT32),
            KV(f"{a}.context_length", self.n_ctx, VT.UINT32),
            KV(f"{a}.embedding_length", self.n_embd, VT.UINT32),
            KV(f"{a}.feed_forward_length", self.n_ff, VT.UINT32),
            KV(f"{a}.attention.head_count", self.n_head, VT.UINT32),
            KV(f"{a}.attention.head_count_kv", self.n_head_kv, VT.UINT32),
        ]
        if self.rope_theta is not None:
            kvs.append(KV(f"{a}.rope.freq_base", self.rope_theta, VT.FLOAT32))
        kvs.append(KV(f"{a}.attention.layer_norm_rms_epsilon", self.norm_eps, VT.FLOAT32))
        if self.key_length is not None:
            kvs += [KV(f"{a}.attention.key_length", self.key_length, VT.UINT32),
                    KV(f"{a}.attention.value_length", self.key_length, VT.UINT32)]
        kvs += [KV(FILE_TYPE_KEY, None, VT.UINT32), KV(f"{a}.vocab_size", self.n_vocab, VT.UINT32),
                KV(f"{a}.rope.dimension_count", self.rope_dim if self.rope_dim is not None else self.head_dim,
                   VT.UINT32)]
        if self.rope_scaling_linear is not None:
            kvs += [KV(f"{a}.rope.scaling.type", gguf.RopeScalingType.LINEAR.value, VT.STRING),
                    KV(f"{a}.rope.scaling.factor", self.rope_scaling_linear, VT.FLOAT32)]
        return ModelParams(a, kvs)


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    path: Path
    outtype: str
    n_tensors: int
    nbytes: int
    seconds: float
    source_format: str = ""
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count


def outtype_from_name(name: str) -> QT:
    qtype = OUTTYPES.get(name.lower())
    if qtype is None:
        raise UsageError(f"unknown output type {name!r}", "choose one of: " + ", ".join(OUTTYPES))
    return qtype


def tensor_type(name: str, shape: Sequence[int], outtype: QT) -> QT:
    """The ggml type a tensor is written in for a requested output type."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return QT.F32
    if outtype == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0] != 0:
        return QT.F16
    return outtype


def tensor_nbytes(shape: Sequence[int], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _as_f32(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "BF16":
        return _bf16_to_f32(arr)
    return arr.astype(np.float32, copy=False)


def convert_tensor(arr: np.ndarray, kind: str, qtype: QT) -> np.ndarray:
    """``arr`` (source ``kind``) as the bytes of ggml type ``qtype``; rows are converted block by block."""
    if arr.dtype != SOURCE_DTYPES[kind]:
        raise ValueError(f"expected {SOURCE_DTYPES[kind]} for a {kind} tensor, got {arr.dtype}")
    if (qtype == QT.F16 and kind == "F16") or (qtype == QT.F32 and kind == "F32") or (
        qtype == QT.BF16 and kind == "BF16"
    ):
        return arr
    if qtype == QT.F32:
        return _as_f32(arr, kind)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    rows = arr.reshape(-1, arr.shape[-1])
    n_rows, n_cols = rows.shape
    if qtype == QT.F16:
        out = np.empty((n_rows, n_cols), np.float16)
    elif qtype == QT.BF16:
        out = np.empty((n_rows, n_cols), np.uint16)
    elif qtype == QT.Q8_0:
        out = np.empty((n_rows, tensor_nbytes((n_cols,), QT.Q8_0)), np.uint8)
    else:
        raise ValueError(f"unsupported output type {qtype.name}")
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    for a in range(0, n_rows, step):
        block = _as_f32(rows[a:a + step], kind)
        if qtype == QT.F16:
            out[a:a + step] = block.astype(np.float16)
        else:
            out[a:a + step] = gguf.quants.quantize(block, qtype).view(out.dtype)
    return out


def model_metadata(src_dir: Path, tensors: Sequence[SourceTensor]) -> gguf.Metadata:
    """``general.*`` (and sampling defaults from generation_config.json) as llama.cpp derives them."""
    total = sum(math.prod(t.shape) for t in tensors)
    try:
        meta = gguf.Metadata.load(None, src_dir, None, total)
    except Exception:  # noqa: BLE001 -- a model card gguf-py cannot parse only costs the descriptive fields
        meta = gguf.Metadata()
    if meta.name is None:
        meta.name = src_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, total, 0, 0)
    return meta


def _add_kvs(w: gguf.GGUFWriter, kvs: Sequence[KV], outtype: QT) -> None:
    for kv in kvs:
        value = int(FILE_TYPES[outtype]) if kv.key == FILE_TYPE_KEY else kv.value
        w.add_key_value(kv.key, value, kv.vtype, sub_type=kv.sub_type)


def write_gguf(
    out_path: str | Path,
    params: LlamaParams | ModelParams,
    vocab: Vocab,
    tensors: Sequence[SourceTensor],
    outtype: QT,
    meta: gguf.Metadata,
    on_event: EventCallback | None = None,
) -> ConvertResult:
    """Write the GGUF file, streaming tensor by tensor; see the module docstring."""
    out_path = Path(out_path)
    if outtype not in FILE_TYPES:
        raise UsageError(f"cannot convert to {outtype.name}", "choose f32, f16, bf16 or q8_0")
    folder = out_path.parent if str(out_path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"the output folder {folder} does not exist", "create it first")
    if out_path.is_dir():
        raise UsageError(f"{out_path} is a folder", "give the path of the .gguf file to write")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")

    plan = [(t, tensor_type(t.name, t.shape, outtype)) for t in tensors]
    total = sum(tensor_nbytes(t.shape, q) for t, q in plan)
    check_free(folder, total + _DISK_MARGIN, f"the converted model {out_path.name}")

    label = out_path.name
    emit = on_event or (lambda _ev: None)
    started = time.monotonic()
    model = params.model_params() if isinstance(params, LlamaParams) else params
    w = gguf.GGUFWriter(None, model.arch)
    with atomic_output(out_path, f"the converted model {out_path.name}") as tmp:
        try:
            _add_kvs(w, model.early, outtype)
            w.add_type(gguf.GGUFType.MODEL)
            meta.set_gguf_meta_model(w)
            _add_kvs(w, model.kvs, outtype)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            vocab.add_to_gguf(w)
            for t, q in plan:
                w.add_tensor_info(
                    t.name, t.shape, np.dtype(np.float32), tensor_nbytes(t.shape, q), raw_dtype=q
                )
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            emit(
                ProgressEvent(
                    "start", label, 0, total, message=f"writing {len(plan)} tensors as {outtype.name}"
                )
            )
            done = 0
            for i, (t, q) in enumerate(plan):
                data = t.load()
                if tuple(data.shape) != tuple(t.shape):
                    raise ModelFileError(
                        f"tensor {t.name}: expected shape {t.shape}, the source gave {data.shape}"
                    )
                data = convert_tensor(data, t.kind, q)
                w.write_tensor_data(data)
                del data
                done += tensor_nbytes(t.shape, q)
                emit(ProgressEvent("progress", label, done, total,
                                   message=f"[{i + 1}/{len(plan)}] {t.name} {q.name} {list(t.shape)}"))
        finally:
            w.close()  # before atomic_output renames or removes the file (Windows cannot while it is open)
    emit(ProgressEvent("done", label, total, total, message=f"wrote {out_path}"))
    counts: dict[str, int] = {}
    for _, q in plan:
        counts[q.name] = counts.get(q.name, 0) + 1
    return ConvertResult(out_path, outtype.name, len(plan), out_path.stat().st_size,
                         time.monotonic() - started, tensor_types=counts)
