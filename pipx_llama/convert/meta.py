"""Meta's original LLaMA checkpoints: ``consolidated.NN.pth`` shards, ``params.json``, ``tokenizer.model``.

Each shard holds one model-parallel slice of every weight (see known-hashes.md): ``wq``, ``wk``,
``wv``, ``w1``, ``w3`` and ``output`` are split along dim 0 of their ``[out, in]`` matrix, ``wo``,
``w2`` and ``tok_embeddings`` along dim 1; 1-D norms are copied whole into every shard and taken
from the first; ``rope.freqs`` is not a weight. Merging happens per tensor, at write time: each shard
is read straight into its rows (dim 0) or copied into its columns (dim 1) of the merged array.

Meta's rotary embedding multiplies consecutive pairs (x[2i], x[2i+1]) as complex numbers -- llama.cpp's
own layout -- so unlike Hugging Face checkpoints no Q/K permutation is undone. Hyper-parameters
follow llama.cpp's convert_legacy_llama.py: FFN size from w1's shape, vocabulary size from the
tokenizer when params.json says -1, training context guessed from the model generation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipx_llama.convert import hparams
from pipx_llama.convert.hparams import LIMITS, read_json_object
from pipx_llama.convert.torchzip import TorchTensor, load_torch_zip
from pipx_llama.convert.writer import SOURCE_DTYPES, LlamaParams, SourceTensor
from pipx_llama.errors import ModelFileError, UnsupportedModelError

_SHARD_RE = re.compile(r"consolidated\.(\d{2})\.pth")
_TOP = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
_LAYER = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}
_SPLIT_COLUMNS = ("tok_embeddings.weight", ".attention.wo.weight", ".feed_forward.w2.weight")


@dataclass
class MetaCheckpoint:
    """A Meta checkpoint folder, validated: hyper-parameters and the tensors to write, lazily merged."""

    src: Path
    shards: list[Path]
    params: LlamaParams
    tensors: list[SourceTensor]
    tokenizer_model: Path
    params_vocab_size: int


def find_shards(src: Path) -> list[Path]:
    """``consolidated.00.pth``, ``.01``, ... in order; a gap in the numbering is an error."""
    found = sorted(
        (int(m.group(1)), p) for p in src.glob("consolidated.*.pth") if (m := _SHARD_RE.fullmatch(p.name))
    )
    if not found:
        raise ModelFileError(
            f"{src} holds no consolidated.NN.pth files", "point to the folder of one model size"
        )
    numbers = [n for n, _ in found]
    if numbers != list(range(len(found))):
        raise ModelFileError(
            f"{src}: shard files are not numbered 00..{len(found) - 1:02d} (found {numbers})",
            "a shard is missing; download it again",
        )
    return [p for _, p in found]


def _merge_axis(name: str) -> int:
    return 1 if name.endswith(_SPLIT_COLUMNS) else 0


def _gguf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    _, index, rest = name.split(".", 2)
    return f"blk.{index}.{_LAYER[rest]}"


def _merged_loader(parts: list[TorchTensor], shape: tuple[int, ...], axis: int) -> Any:
    dtype = parts[0].dtype

    def load() -> np.ndarray:
        out = np.empty(shape, dtype)
        if len(parts) == 1:
            return parts[0].read(out)
        pos = 0
        for part in parts:
            n = part.shape[axis]
            if axis == 0:
                part.read(out[pos:pos + n])
            else:
                out[:, pos:pos + n] = part.read()
            pos += n
        return out

    return load


def _n_ctx(params: dict[str, Any]) -> int:
    """convert_legacy_llama.py's guess of the training context: params.json does not record it."""
    if params.get("rope_theta") == 1000000:
        return 16384  # CodeLlama
    if params.get("norm_eps") == 1e-05:
        return 4096  # LLaMA 2
    return 2048  # LLaMA 1


def _tokenizer_path(src: Path) -> Path:
    for candidate in (src / "tokenizer.model", src.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise ModelFileError(f"no tokenizer.model in {src} or {src.parent}",
                         "Meta ships tokenizer.model next to the model-size folders; copy it in")


def read_meta_checkpoint(src: Path) -> MetaCheckpoint:
    """Open a Meta checkpoint folder (no tensor data is read yet)."""
    shards = find_shards(src)
    params_file = src / "params.json"
    try:
        raw = read_json_object(params_file)
    except FileNotFoundError as err:
        raise ModelFileError(
            f"{src} has no params.json", "copy the model's params.json into the folder"
        ) from err
    if raw.get("moe"):
        raise UnsupportedModelError(
            f"{src} is a mixture-of-experts model", "only dense LLaMA models are supported"
        )
    # every value checked before anything is sized from it (a params.json may say n_layers 1e8)
    dim = hparams.integer(raw, "dim", params_file, maximum=LIMITS["width"])
    n_layers = hparams.integer(raw, "n_layers", params_file, maximum=LIMITS["layers"])
    n_heads = hparams.integer(raw, "n_heads", params_file, maximum=LIMITS["heads"])
    n_kv_heads = (hparams.integer(raw, "n_kv_heads", params_file, maximum=LIMITS["heads"])
                  if raw.get("n_kv_heads") is not None else n_heads)
    norm_eps = hparams.number(raw, "norm_eps", params_file, below=1.0)
    vocab_size = -1
    if raw.get("vocab_size", -1) != -1:
        vocab_size = hparams.integer(raw, "vocab_size", params_file, maximum=LIMITS["vocab"])
    rope_theta = hparams.number(raw, "rope_theta", params_file) if raw.get("rope_theta") is not None else None
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ModelFileError(f"{params_file}: implausible dimensions (dim {dim}, {n_heads} heads, "
                             f"{n_kv_heads} KV heads, {n_layers} layers)")

    loaded = [load_torch_zip(p) for p in shards]
    names = [n for n in loaded[0] if n != "rope.freqs"]
    for p, part in zip(shards[1:], loaded[1:]):
        other = {n for n in part if n != "rope.freqs"}
        if other != set(names):
            diff = sorted(other.symmetric_difference(names))
            raise ModelFileError(f"{p} holds different tensors than {shards[0].name}: {diff[:5]}",
                                 "the shards come from different models or one is damaged")

    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    expected_names = set(_TOP) | {f"layers.{i}.{k}" for i in range(n_layers) for k in _LAYER}
    if set(names) != expected_names:
        missing, extra = sorted(expected_names - set(names)), sorted(set(names) - expected_names)
        raise ModelFileError(
            f"{src}: the tensors do not match params.json's {n_layers} layers"
            + (f"; missing {missing[:4]}" if missing else "")
            + (f"; unexpected {extra[:4]}" if extra else ""),
            "check that params.json belongs to these shards",
        )

    merged: dict[str, tuple[tuple[int, ...], list[TorchTensor]]] = {}
    for name in names:
        parts = [part[name] for part in loaded]
        kinds = {t.kind for t in parts}
        if len(kinds) != 1:
            raise ModelFileError(
                f"{src}: tensor {name} has different types in different shards ({sorted(kinds)})"
            )
        if len(parts[0].shape) == 1:
            merged[name] = (parts[0].shape, parts[:1])
            continue
        if any(len(t.shape) != 2 for t in parts):
            raise ModelFileError(f"{src}: tensor {name} is not a matrix in every shard")
        axis = _merge_axis(name)
        other = {t.shape[1 - axis] for t in parts}
        if len(other) != 1:
            raise ModelFileError(f"{src}: the shards of {name} do not line up ({[t.shape for t in parts]})")
        shape = list(parts[0].shape)
        shape[axis] = sum(t.shape[axis] for t in parts)
        merged[name] = (tuple(shape), parts)

    n_vocab = merged["tok_embeddings.weight"][0][0]
    n_ff = merged["layers.0.feed_forward.w1.weight"][0][0]
    want = {
        "tok_embeddings.weight": (n_vocab, dim), "norm.weight": (dim,), "output.weight": (n_vocab, dim),
    }
    for i in range(n_layers):
        p = f"layers.{i}."
        want.update({
            p + "attention_norm.weight": (dim,), p + "ffn_norm.weight": (dim,),
            p + "attention.wq.weight": (dim, dim), p + "attention.wk.weight": (kv_dim, dim),
            p + "attention.wv.weight": (kv_dim, dim), p + "attention.wo.weight": (dim, dim),
            p + "feed_forward.w1.weight": (n_ff, dim), p + "feed_forward.w3.weight": (n_ff, dim),
            p + "feed_forward.w2.weight": (dim, n_ff),
        })
    for name, shape in want.items():
        if merged[name][0] != shape:
            raise ModelFileError(f"{src}: {name} has shape {list(merged[name][0])}, expected {list(shape)} "
                                 "from params.json", "check that params.json belongs to these shards")
    if vocab_size not in (-1, n_vocab):
        raise ModelFileError(
            f"{params_file} says vocab_size {vocab_size} but tok_embeddings has {n_vocab} rows"
        )

    tensors: list[SourceTensor] = []
    order = list(_TOP)[:1] + [f"layers.{i}.{k}" for i in range(n_layers) for k in _LAYER] + list(_TOP)[1:]
    for name in order:
        shape, parts = merged[name]
        gguf_name = _gguf_name(name)
        if parts[0].dtype != SOURCE_DTYPES[parts[0].kind]:
            raise UnsupportedModelError(f"{src}: tensor {name} has an unsupported type")
        tensors.append(
            SourceTensor(gguf_name, shape, parts[0].kind, _merged_loader(parts, shape, _merge_axis(name)))
        )

    params = LlamaParams(
        n_vocab=n_vocab, n_ctx=_n_ctx(raw), n_embd=dim, n_layer=n_layers, n_ff=n_ff, n_head=n_heads,
        n_head_kv=n_kv_heads, norm_eps=norm_eps,
        rope_theta=rope_theta,
    )
    return MetaCheckpoint(src, shards, params, tensors, _tokenizer_path(src), vocab_size)
