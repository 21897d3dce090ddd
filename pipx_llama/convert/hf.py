"""Hugging Face model folders: config.json plus safetensors weights, of the families in ``families``.

Weights are ``model.safetensors``, or shards listed by ``model.safetensors.index.json``. A safetensors
file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of each
tensor) and the raw data; it is read here directly -- header parsed and checked, each tensor's bytes
read on demand -- so no torch or safetensors package is needed and nothing is held beyond the tensor
being written.

Tensors are written in the order llama.cpp's converter writes them: generated tensors (RoPE factors)
first, then shard by shard (in file-name order) each shard's tensors by name.

Llama: Hugging Face's conversion script permuted the rows of q_proj and k_proj so that rotary
embedding could rotate halves (``rotate_half``); llama.cpp's llama rotates consecutive pairs, so the
permutation is undone exactly as convert_hf_to_gguf.py's ``LlamaModel.permute`` does -- with the KV
head count for k_proj. The other families rotate halves in llama.cpp too, and are not permuted. A
model with tied embeddings has no lm_head.weight and gets no output.weight: llama.cpp then uses
token_embd.weight for the output.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipx_llama.convert import hparams
from pipx_llama.convert.families import HF_ARCHITECTURES, HF_FAMILIES, Dims, layer_shapes, tensor_name_map
from pipx_llama.convert.hparams import LIMITS, read_json_object
from pipx_llama.convert.torchzip import read_exact
from pipx_llama.convert.vocab import Vocab, load_vocab
from pipx_llama.convert.writer import SOURCE_DTYPES, LlamaParams, ModelParams, SourceTensor
from pipx_llama.errors import ModelFileError, UnsupportedModelError

LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_MAX_HEADER = 100 << 20
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass(frozen=True)
class SafeTensor:
    """One tensor of a safetensors file: where its bytes lie, described but not read."""

    path: Path
    kind: str  # "F16", "BF16", "F32"
    shape: tuple[int, ...]
    offset: int  # absolute file offset
    nbytes: int

    def read(self) -> np.ndarray:
        dtype = SOURCE_DTYPES[self.kind]
        out = np.empty(self.shape, dtype)
        read_exact(self.path, self.offset, out.reshape(-1).view(np.uint8))
        return out


def read_safetensors_header(path: Path) -> dict[str, SafeTensor]:
    """The tensors a safetensors file declares, checked against the file's size."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelFileError(f"{path} is too short to be a safetensors file", "download it again")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise ModelFileError(
                    f"{path}: implausible safetensors header size {n}", "the file is damaged"
                )
            header_bytes = f.read(n)
            size = f.seek(0, 2)
    except OSError as err:
        raise ModelFileError(f"cannot read {path}: {err}", "check the path and permissions") from err
    if len(header_bytes) != n:
        raise ModelFileError(f"{path} is truncated (in its header)", "download it again")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ModelFileError(f"{path}: the safetensors header is not valid JSON: {str(err)[:120]}",
                             "the file is damaged") from err
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: the safetensors header is not a JSON object")
    base = 8 + n
    out: dict[str, SafeTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(
                f"{path}: bad header entry for {name}: {err}", "the file is damaged"
            ) from err
        if dtype not in SOURCE_DTYPES:
            raise UnsupportedModelError(f"{path}: tensor {name} is {dtype}",
                                        "only F16, BF16 and F32 safetensors weights are supported")
        nbytes = math.prod(shape) * SOURCE_DTYPES[dtype].itemsize
        if not (
            isinstance(begin, int)
            and isinstance(end, int)
            and 0 <= begin <= end
            and end - begin == nbytes
            and base + end <= size
            and min(shape, default=0) >= 0
        ):
            raise ModelFileError(
                f"{path}: tensor {name} has an inconsistent byte range or the file is truncated",
                "download the file again",
            )
        out[name] = SafeTensor(path, dtype, shape, base + begin, nbytes)
    return out


def llama3_rope_factors(
    base: float, head_dim: int, scaling: dict, source: Path | str = "config.json"
) -> np.ndarray:
    """Llama 3.1's per-pair RoPE factors f32 [head_dim // 2], as llama.cpp's converter computes them.

    Pairs that turn fast (wavelength below original_context / high_freq_factor) keep their angle,
    slow ones are divided by ``factor``, and those between are blended smoothly.
    """
    f32 = np.float32
    where = f"{source} rope_scaling"
    values = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, **scaling}
    factor, low, high, old_ctx = (f32(hparams.number(values, k, where)) for k in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
    if not high > low:
        raise ModelFileError(
            f"{source}: implausible llama3 rope_scaling (high_freq_factor {high:g} must exceed "
            f"low_freq_factor {low:g})",
            "check config.json against the model's published one",
        )
    freqs = f32(1.0) / (f32(base) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
    wavelen = f32(2 * math.pi) / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = f32(1.0) / ((f32(1.0) - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, f32(1.0), np.where(wavelen > old_ctx / low, factor, blended))
    return out.astype(f32)


def find_weights(src: Path) -> dict[str, SafeTensor]:
    """All tensors of the model: from the shard index, model.safetensors, or model*.safetensors."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and v and "/" not in v and "\\" not in v and v not in (".", "..")
                for v in weight_map.values()):
            raise ModelFileError(
                f"{index}: weight_map must map tensor names to shard file names in the folder",
                "check that the file is complete",
            )
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (src / name).is_file():
                raise ModelFileError(f"{src}: shard {name} listed in {index.name} is missing", "download it")
    elif (src / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    else:
        files, weight_map = sorted(p.name for p in src.glob("model*.safetensors")), None
        if not files:
            raise ModelFileError(f"{src} has no model.safetensors (nor a sharded index)",
                                 "only safetensors weights are supported for Hugging Face folders")
    tensors: dict[str, SafeTensor] = {}
    for name in files:
        for tname, t in read_safetensors_header(src / name).items():
            if tname in tensors:
                raise ModelFileError(f"{src}: tensor {tname} appears in more than one shard")
            tensors[tname] = t
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ModelFileError(f"{src}: tensors listed in the index are not in the shards: {missing[:5]}",
                                 "a shard is incomplete; download it again")
    return tensors


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo Hugging Face's rotary row permutation (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What Hugging Face's convert_llama_weights_to_hf.py did; ``permute`` is its inverse."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


@dataclass
class HfModel:
    """A Hugging Face folder, validated: its family, hyper-parameters, vocabulary and the tensors to write."""

    src: Path
    config: dict[str, Any]
    family: str
    params: ModelParams
    vocab: Vocab
    tensors: list[SourceTensor]
    n_vocab: int


def _get(
    cfg: dict[str, Any], keys: tuple[str, ...], path: Path, limit: str, default: int | None = None
) -> int:
    """The first of ``keys`` set in ``cfg``, a checked integer up to ``LIMITS[limit]`` (or ``default``)."""
    key = hparams.first_key(cfg, keys)
    if key is None:
        if default is not None:
            return default
        raise ModelFileError(f"{path} lacks {keys[0]}", "config.json must describe the model's dimensions")
    return hparams.integer(cfg, key, path, maximum=LIMITS[limit])


def _get_float(cfg: dict[str, Any], keys: tuple[str, ...], path: Path, default: float | None = None, *,
               below: float = math.inf) -> float:
    key = hparams.first_key(cfg, keys)
    if key is None:
        if default is not None:
            return float(default)
        raise ModelFileError(f"{path} lacks {keys[0]}", "config.json must describe the model")
    return hparams.number(cfg, key, path, below=below)


def read_config(src: Path) -> dict[str, Any]:
    """config.json (bounded, a JSON object), with a multimodal model's text_config merged in (as llama.cpp
    does)."""
    cfg_path = src / "config.json"
    try:
        cfg = read_json_object(cfg_path)
    except FileNotFoundError as err:
        raise ModelFileError(
            f"cannot read {cfg_path}: no such file", "check that the file is complete"
        ) from err
    if "text_config" in cfg:
        if not isinstance(cfg["text_config"], dict):
            raise ModelFileError(f"{cfg_path}: text_config must be an object")
        cfg = {**cfg, **cfg["text_config"]}
    return cfg


def family_of_config(src: Path, cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    for a in archs:
        if not isinstance(a, str):
            continue
        if a in LLAMA_ARCHITECTURES:
            return "llama"
        if a in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[a]
    known = ", ".join((*LLAMA_ARCHITECTURES, *HF_ARCHITECTURES))
    raise UnsupportedModelError(f"{src}: architecture {archs or cfg.get('model_type')} is not supported",
                                f"pipx-llama converts these Hugging Face architectures: {known}")


def read_dims(src: Path, cfg: dict[str, Any], defaults: dict[str, Any],
              n_embd_rows: Callable[[], int | None] = lambda: None) -> Dims:
    """The model's sizes from config.json, each checked (type, bounds) before anything is sized from it, then
    against each other; ``n_embd_rows`` (the embedding's rows, read only when vocab_size is missing)."""
    path = src / "config.json"
    n_embd = _get(cfg, ("hidden_size", "n_embd", "dim"), path, "width")
    n_layer = _get(cfg, ("num_hidden_layers", "n_layers", "n_layer", "num_layers"), path, "layers")
    n_head = _get(cfg, ("num_attention_heads", "n_head", "n_heads"), path, "heads",
                  default=defaults.get("num_attention_heads"))
    n_head_kv = _get(cfg, ("num_key_value_heads", "n_kv_heads", "n_head_kv"), path, "heads",
                     default=defaults.get("num_key_value_heads", n_head))
    n_ff = _get(cfg, ("intermediate_size", "n_inner", "hidden_dim"), path, "width")
    n_ctx = _get(cfg, ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                       "model_max_length"), path, "context", default=defaults.get("max_position_embeddings"))
    norm_eps = _get_float(
        cfg, ("rms_norm_eps", "norm_eps"), path, default=defaults.get("rms_norm_eps"), below=1.0
    )
    head_dim = _get(
        cfg, ("head_dim",), path, "head_dim", default=defaults.get("head_dim", n_embd // max(n_head, 1))
    )
    if n_head % n_head_kv or head_dim % 2:
        raise ModelFileError(
            f"{path}: implausible dimensions ({n_embd} wide, {n_layer} layers, {n_head} heads, "
            f"{n_head_kv} KV heads, head size {head_dim})"
        )
    if hparams.first_key(cfg, ("vocab_size",)) is not None or defaults.get("vocab_size"):
        n_vocab = _get(cfg, ("vocab_size",), path, "vocab", default=defaults.get("vocab_size"))
    else:
        rows = n_embd_rows()
        if rows is None:
            raise ModelFileError(
                f"{path} lacks vocab_size", "config.json must describe the model's dimensions"
            )
        n_vocab = rows
    tied = bool(cfg.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False)))
    return Dims(n_embd, n_layer, n_head, n_head_kv, n_ff, head_dim, n_ctx, norm_eps, n_vocab, tied)


def _embedding_rows(weights: dict[str, SafeTensor]) -> int | None:
    embd = next((t for n, t in weights.items() if _hf_name(n) == "model.embed_tokens.weight"), None)
    return embd.shape[0] if embd is not None and embd.shape else None


def _hf_name(name: str) -> str | None:
    """A weight's name as llama.cpp's converter sees it, or None for tensors it skips."""
    if name.endswith(_SKIPPED_SUFFIXES):
        return None
    # multimodal checkpoints: the text model's weights, without the vision tower and projector
    if "vision_tower" in name or "multi_modal_projector" in name or name.startswith(("vision_", "audio_")):
        return None
    return name.replace("language_model.", "")


def _plus_one(t: SafeTensor) -> tuple[str, Callable[[], np.ndarray]]:
    """Gemma's ``norm + 1``: in float16 for float16 weights, in float32 otherwise (bfloat16 is widened
    first), as llama.cpp's converter computes it with torch."""
    if t.kind == "F16":
        return "F16", lambda: t.read() + np.float16(1)
    if t.kind == "BF16":
        return "F32", lambda: (t.read().astype(np.uint32) << 16).view(np.float32) + np.float32(1)
    return "F32", lambda: t.read() + np.float32(1)


def _loader(t: SafeTensor, n_head: int | None) -> Callable[[], np.ndarray]:
    if n_head is None:
        return t.read
    return lambda: permute(t.read(), n_head)


def _rows(t: SafeTensor, n: int) -> Callable[[], np.ndarray]:
    return lambda: np.ascontiguousarray(t.read()[:n])


def read_hf_model(src: Path) -> HfModel:
    """Open a Hugging Face folder of a supported family (no tensor data is read yet)."""
    cfg = read_config(src)
    family = family_of_config(src, cfg)
    if family == "llama":
        return _read_llama(src, cfg)
    fam = HF_FAMILIES[family]
    d = read_dims(src, cfg, fam.defaults, lambda: _embedding_rows(find_weights(src)))
    weights = find_weights(src)
    embd = next((t for n, t in weights.items() if _hf_name(n) == "model.embed_tokens.weight"), None)
    vocab = fam.vocab(src, cfg, d)
    n_rows = d.n_vocab
    if fam.trim_embeddings and embd is not None:
        n_rows = min(embd.shape[0], len(vocab.tokens))

    names = tensor_name_map(fam.arch, d.n_layer)
    by_gguf: dict[str, tuple[str, SafeTensor]] = {}
    unknown = []
    for name, t in weights.items():
        hf_name = _hf_name(name)
        if hf_name is None or (fam.tied_only and hf_name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name in by_gguf:
            unknown.append(name)
            continue
        by_gguf[gguf_name] = (hf_name, t)
    if unknown:
        raise UnsupportedModelError(f"{src}: unexpected tensors {unknown[:5]}",
                                    f"this is not a plain {fam.examples} model")

    want: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (d.n_vocab, d.n_embd),
        "output_norm.weight": (d.n_embd,),
    }
    for i in range(d.n_layer):
        want.update({f"blk.{i}.{k}": v for k, v in layer_shapes(fam, d).items()})
    if "output.weight" in by_gguf:
        want["output.weight"] = (d.n_vocab, d.n_embd)
    elif not (d.tied or fam.tied_only):
        raise ModelFileError(f"{src}: lm_head.weight is missing and config.json does not tie the embeddings",
                             "the weights are incomplete; download them again")
    _check_names(src, want, by_gguf, d.n_layer)

    tensors = list(fam.extra(cfg, d, src)) if fam.extra is not None else []
    for gguf_name, (hf_name, t) in by_gguf.items():
        if t.shape != want[gguf_name]:
            raise ModelFileError(f"{src}: {gguf_name} has shape {list(t.shape)}, expected "
                                 f"{list(want[gguf_name])} from config.json")
        if fam.norm_offset and hf_name.endswith("norm.weight"):
            kind, load = _plus_one(t)
            tensors.append(SourceTensor(gguf_name, t.shape, kind, load))
        elif gguf_name == "token_embd.weight" and n_rows != t.shape[0]:
            tensors.append(SourceTensor(gguf_name, (n_rows, *t.shape[1:]), t.kind, _rows(t, n_rows)))
        else:
            tensors.append(SourceTensor(gguf_name, t.shape, t.kind, t.read))
    return HfModel(src, cfg, family, fam.params(cfg, d, src), vocab, tensors, n_rows)


def _check_names(src: Path, want: dict[str, tuple[int, ...]], have: dict[str, Any], n_layer: int) -> None:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if "token_embd.weight" in missing:
        raise ModelFileError(f"{src}: model.embed_tokens.weight is missing")
    if missing or extra:
        raise ModelFileError(f"{src}: the tensors do not match config.json's {n_layer} layers"
                             + (f"; missing {missing[:4]}" if missing else "")
                             + (f"; unexpected {extra[:4]}" if extra else ""),
                             "check that config.json belongs to these weights")


def _read_llama(src: Path, cfg: dict[str, Any]) -> HfModel:
    """A Llama-architecture folder: Q/K rows un-permuted, LlamaModel's keys and vocabulary rules."""
    cfg_path = src / "config.json"
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{src}: models with attention or MLP biases are not supported")
    d = read_dims(src, cfg, {}, lambda: _embedding_rows(find_weights(src)))
    if d.n_embd % d.n_head or (d.n_embd // d.n_head) % 2:
        raise ModelFileError(f"{cfg_path}: implausible dimensions ({d.n_embd} wide, {d.n_head} heads)")
    if d.head_dim != d.n_embd // d.n_head:
        raise UnsupportedModelError(f"{src}: head_dim {d.head_dim} differs from hidden_size / heads",
                                    "such models are not supported by pipx-llama's engine")
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ModelFileError(f"{cfg_path}: rope_scaling must be an object, not {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    linear = None
    if rope_type == "linear" and "factor" in scaling:
        linear = hparams.number(scaling, "factor", f"{cfg_path} rope_scaling")
    elif rope_type not in (None, "default", "llama3"):
        raise UnsupportedModelError(f"{src}: RoPE scaling {rope_type!r} is not supported",
                                    "only linear and Llama 3.1 ('llama3') RoPE scaling are supported")
    rope_theta = hparams.number(cfg, "rope_theta", cfg_path) if cfg.get("rope_theta") is not None else None
    weights = find_weights(src)

    unknown = []
    by_gguf: dict[str, tuple[SafeTensor, int | None]] = {}
    for name, t in weights.items():
        if name.endswith(_SKIPPED_SUFFIXES):
            continue
        if name in _TOP:
            by_gguf[_TOP[name]] = (t, None)
            continue
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER:
            rest = parts[3]
            heads = d.n_head if rest.startswith("self_attn.q_proj") else d.n_head_kv if rest.startswith(
                "self_attn.k_proj") else None
            by_gguf[f"blk.{int(parts[2])}.{_LAYER[rest]}"] = (t, heads)
        else:
            unknown.append(name)
    if unknown:
        raise UnsupportedModelError(f"{src}: unexpected tensors {unknown[:5]}",
                                    "this is not a plain Llama-architecture model")

    kv_dim = d.n_head_kv * d.head_dim
    want: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (d.n_vocab, d.n_embd),
        "output_norm.weight": (d.n_embd,),
    }
    for i in range(d.n_layer):
        p = f"blk.{i}."
        want.update({
            p + "attn_norm.weight": (d.n_embd,), p + "ffn_norm.weight": (d.n_embd,),
            p + "attn_q.weight": (d.n_embd, d.n_embd), p + "attn_k.weight": (kv_dim, d.n_embd),
            p + "attn_v.weight": (kv_dim, d.n_embd), p + "attn_output.weight": (d.n_embd, d.n_embd),
            p + "ffn_gate.weight": (d.n_ff, d.n_embd), p + "ffn_up.weight": (d.n_ff, d.n_embd),
            p + "ffn_down.weight": (d.n_embd, d.n_ff),
        })
    if "output.weight" in by_gguf:
        want["output.weight"] = (d.n_vocab, d.n_embd)
    elif not cfg.get("tie_word_embeddings"):
        raise ModelFileError(f"{src}: lm_head.weight is missing and config.json does not tie the embeddings",
                             "the weights are incomplete; download them again")
    _check_names(src, want, by_gguf, d.n_layer)
    tensors = []
    if rope_type == "llama3":
        factors = llama3_rope_factors(
            float(rope_theta if rope_theta is not None else 10000.0), d.head_dim, scaling, cfg_path
        )
        tensors.append(SourceTensor("rope_freqs.weight", factors.shape, "F32", lambda: factors))
    for name, (t, heads) in by_gguf.items():
        shape = want[name]
        if t.shape != shape:
            raise ModelFileError(
                f"{src}: {name} has shape {list(t.shape)}, expected {list(shape)} from config.json"
            )
        tensors.append(SourceTensor(name, shape, t.kind, _loader(t, heads)))

    params = LlamaParams(
        n_vocab=d.n_vocab,
        n_ctx=d.n_ctx,
        n_embd=d.n_embd,
        n_layer=d.n_layer,
        n_ff=d.n_ff,
        n_head=d.n_head,
        n_head_kv=d.n_head_kv,
        norm_eps=d.norm_eps,
        rope_theta=float(rope_theta) if rope_theta is not None else None,
        rope_dim=d.head_dim,
        rope_scaling_linear=linear,
        key_length=d.head_dim if "head_dim" in cfg else None,
    )
    vocab = load_vocab(src, d.n_vocab)
    return HfModel(src, cfg, "llama", params.model_params(), vocab, tensors, d.n_vocab)
