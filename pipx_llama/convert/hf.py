"""Hugging Face model folders of the Llama architecture: config.json plus safetensors weights.

Weights are ``model.safetensors``, or shards listed by ``model.safetensors.index.json``. A safetensors
file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of each
tensor) and the raw data; it is read here directly -- header parsed and checked, each tensor's bytes
read on demand -- so no torch or safetensors package is needed and nothing is held beyond the tensor
being written.

Hugging Face's conversion script permuted the rows of q_proj and k_proj so that rotary embedding
could rotate halves (``rotate_half``); llama.cpp rotates consecutive pairs, so the permutation is
undone exactly as convert_hf_to_gguf.py's ``LlamaModel.permute`` does -- with the KV head count for
k_proj. A model with tied embeddings has no lm_head.weight and gets no output.weight: llama.cpp then
uses token_embd.weight for the output.
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
from pipx_llama.convert.hparams import LIMITS, read_json_object
from pipx_llama.convert.torchzip import read_exact
from pipx_llama.convert.writer import SOURCE_DTYPES, LlamaParams, SourceTensor
from pipx_llama.errors import ModelFileError, UnsupportedModelError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
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
                raise ModelFileError(f"{path}: implausible safetensors header size {n}", "the file is damaged")
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
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{path}: bad header entry for {name}: {err}", "the file is damaged") from err
        if dtype not in SOURCE_DTYPES:
            raise UnsupportedModelError(f"{path}: tensor {name} is {dtype}",
                                        "only F16, BF16 and F32 safetensors weights are supported")
        nbytes = math.prod(shape) * SOURCE_DTYPES[dtype].itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and end - begin == nbytes
                and base + end <= size and min(shape, default=0) >= 0):
            raise ModelFileError(f"{path}: tensor {name} has an inconsistent byte range or the file is truncated",
                                 "download the file again")
        out[name] = SafeTensor(path, dtype, shape, base + begin, nbytes)
    return out


def llama3_rope_factors(base: float, head_dim: int, scaling: dict, source: Path | str = "config.json") -> np.ndarray:
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
        raise ModelFileError(f"{source}: implausible llama3 rope_scaling (high_freq_factor {high:g} must exceed "
                             f"low_freq_factor {low:g})", "check config.json against the model's published one")
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
            raise ModelFileError(f"{index}: weight_map must map tensor names to shard file names in the folder",
                                 "check that the file is complete")
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
    return np.ascontiguousarray(w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What Hugging Face's convert_llama_weights_to_hf.py did; ``permute`` is its inverse."""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


@dataclass
class HfModel:
    """A Hugging Face folder, validated: hyper-parameters and the tensors to write."""

    src: Path
    config: dict[str, Any]
    params: LlamaParams
    tensors: list[SourceTensor]


def _loader(t: SafeTensor, n_head: int | None) -> Callable[[], np.ndarray]:
    if n_head is None:
        return t.read
    return lambda: permute(t.read(), n_head)


def _get(cfg: dict[str, Any], keys: tuple[str, ...], path: Path, limit: str) -> int:
    """The first of ``keys`` set in ``cfg``, a checked integer up to ``LIMITS[limit]``."""
    key = hparams.first_key(cfg, keys)
    if key is None:
        raise ModelFileError(f"{path} lacks {keys[0]}", "config.json must describe the model's dimensions")
    return hparams.integer(cfg, key, path, maximum=LIMITS[limit])


def read_hf_model(src: Path) -> HfModel:
    """Open a Hugging Face Llama folder (no tensor data is read yet)."""
    cfg_path = src / "config.json"
    try:
        cfg = read_json_object(cfg_path)
    except FileNotFoundError as err:
        raise ModelFileError(f"cannot read {cfg_path}: no such file", "check that the file is complete") from err
    if "text_config" in cfg:
        if not isinstance(cfg["text_config"], dict):
            raise ModelFileError(f"{cfg_path}: text_config must be an object")
        cfg = {**cfg, **cfg["text_config"]}
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    if not any(isinstance(a, str) and a in ARCHITECTURES for a in archs):
        raise UnsupportedModelError(f"{src}: architecture {archs or cfg.get('model_type')} is not supported",
                                    "pipx-llama converts Llama-architecture models (" + ", ".join(ARCHITECTURES) + ")")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{src}: models with attention or MLP biases are not supported")

    # every value checked before anything is sized from it (a config.json may say 1e8 layers)
    n_embd = _get(cfg, ("hidden_size", "n_embd", "dim"), cfg_path, "width")
    n_layer = _get(cfg, ("num_hidden_layers", "n_layers", "n_layer", "num_layers"), cfg_path, "layers")
    n_head = _get(cfg, ("num_attention_heads", "n_head", "n_heads"), cfg_path, "heads")
    n_head_kv = (hparams.integer(cfg, "num_key_value_heads", cfg_path, maximum=LIMITS["heads"])
                 if cfg.get("num_key_value_heads") is not None else n_head)
    n_ff = _get(cfg, ("intermediate_size", "n_inner", "hidden_dim"), cfg_path, "width")
    n_ctx = _get(cfg, ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                       "model_max_length"), cfg_path, "context")
    eps_key = hparams.first_key(cfg, ("rms_norm_eps", "norm_eps"))
    if eps_key is None:
        raise ModelFileError(f"{cfg_path} lacks rms_norm_eps", "config.json must describe the model's dimensions")
    norm_eps = hparams.number(cfg, eps_key, cfg_path, below=1.0)
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise ModelFileError(f"{cfg_path}: implausible dimensions ({n_embd} wide, {n_head} heads, {n_head_kv} KV heads)")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and hparams.integer(cfg, "head_dim", cfg_path, maximum=LIMITS["head_dim"]) != (
            n_embd // n_head):
        raise UnsupportedModelError(f"{src}: head_dim {head_dim} differs from hidden_size / heads",
                                    "such models are not supported by pipx-llama's engine")
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ModelFileError(f"{cfg_path}: rope_scaling must be an object, not {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    linear = None
    if rope_type == "linear" and "factor" in scaling:
        linear = hparams.number(scaling, "factor", f"{cfg_path} rope_scaling")
    elif rope_type not in (None, "default", "llama3"):
        raise UnsupportedModelError(f"{src}: RoPE scaling {str(rope_type)[:40]!r} is not supported",
                                    "only linear and Llama 3.1 ('llama3') RoPE scaling are supported")
    rope_theta = hparams.number(cfg, "rope_theta", cfg_path) if cfg.get("rope_theta") is not None else None
    cfg_vocab = hparams.integer(cfg, "vocab_size", cfg_path, maximum=LIMITS["vocab"]) if cfg.get("vocab_size") else None

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
            heads = n_head if rest.startswith("self_attn.q_proj") else n_head_kv if rest.startswith(
                "self_attn.k_proj") else None
            by_gguf[f"blk.{int(parts[2])}.{_LAYER[rest]}"] = (t, heads)
        else:
            unknown.append(name)
    if unknown:
        raise UnsupportedModelError(f"{src}: unexpected tensors {unknown[:5]}",
                                    "this is not a plain Llama-architecture model")

    embd = by_gguf.get("token_embd.weight")
    if embd is None:
        raise ModelFileError(f"{src}: model.embed_tokens.weight is missing")
    n_vocab = cfg_vocab or embd[0].shape[0]
    head_dim = n_embd // n_head
    kv_dim = n_head_kv * head_dim
    want: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,)}
    for i in range(n_layer):
        p = f"blk.{i}."
        want.update({
            p + "attn_norm.weight": (n_embd,), p + "ffn_norm.weight": (n_embd,),
            p + "attn_q.weight": (n_embd, n_embd), p + "attn_k.weight": (kv_dim, n_embd),
            p + "attn_v.weight": (kv_dim, n_embd), p + "attn_output.weight": (n_embd, n_embd),
            p + "ffn_gate.weight": (n_ff, n_embd), p + "ffn_up.weight": (n_ff, n_embd),
            p + "ffn_down.weight": (n_embd, n_ff),
        })
    if "output.weight" in by_gguf:
        want["output.weight"] = (n_vocab, n_embd)
    elif not cfg.get("tie_word_embeddings"):
        raise ModelFileError(f"{src}: lm_head.weight is missing and config.json does not tie the embeddings",
                             "the weights are incomplete; download them again")
    missing = sorted(set(want) - set(by_gguf))
    extra = sorted(set(by_gguf) - set(want))
    if missing or extra:
        raise ModelFileError(f"{src}: the tensors do not match config.json's {n_layer} layers"
                             + (f"; missing {missing[:4]}" if missing else "")
                             + (f"; unexpected {extra[:4]}" if extra else ""),
                             "check that config.json belongs to these weights")
    tensors = []
    if rope_type == "llama3":
        factors = llama3_rope_factors(rope_theta if rope_theta is not None else 10000.0, head_dim, scaling,
                                      cfg_path)
        tensors.append(SourceTensor("rope_freqs.weight", factors.shape, "F32", lambda: factors))
    for name, shape in want.items():
        t, heads = by_gguf[name]
        if t.shape != shape:
            raise ModelFileError(f"{src}: {name} has shape {list(t.shape)}, expected {list(shape)} from config.json")
        tensors.append(SourceTensor(name, shape, t.kind, _loader(t, heads)))

    params = LlamaParams(
        n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff, n_head=n_head,
        n_head_kv=n_head_kv, norm_eps=norm_eps, rope_theta=rope_theta,
        rope_dim=head_dim, rope_scaling_linear=linear, key_length=head_dim if "head_dim" in cfg else None,
    )
    return HfModel(src, cfg, params, tensors)
