"""What llama.cpp's convert_hf_to_gguf.py does differently for each Hugging Face family it converts.

One ``HfFamily`` per architecture: the GGUF architecture name, the tensors a layer has (biases,
q/k norms, Gemma's post norms, Phi-3's fused qkv and gate_up kept fused), the weight transforms
(Q/K rows un-permuted for llama only; ``+ 1`` on every Gemma norm, as Gemma's RMSNorm multiplies by
``1 + weight``), the hyper-parameter keys in the order and with the defaults the converter's class
writes them (``LlamaModel``, the base ``TextModel`` for Qwen2/Qwen3, ``Gemma2Model``, ``Gemma3Model``,
``Phi3MiniModel``), and the tokenizer rules.

llama.cpp reads config.json through ``transformers.AutoConfig``, so a key the file leaves out has
the value of transformers' config class; those defaults are repeated here (``_DEFAULTS``). Where
llama.cpp writes nothing for a Gemma 3 layer pattern other than its own default of 6 (a model that
would then run wrongly), the pattern is written; every real Gemma 3 has the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType as VT

from pipx_llama.convert.vocab import Vocab, bpe_vocab, load_vocab, phi3_vocab, spm_vocab
from pipx_llama.convert.writer import FILE_TYPE_KEY, KV, ModelParams, SourceTensor
from pipx_llama.errors import ModelFileError, UnsupportedModelError

# transformers' defaults for keys a config.json may leave out (its config classes' field defaults)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "qwen3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": 128},
    "gemma2": {
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "head_dim": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
        "vocab_size": 256000,
    },
    "gemma3": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "head_dim": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 4096,
        "vocab_size": 262208,
        "tie_word_embeddings": True,
    },
    "phi3": {
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 1.0,
        "vocab_size": 32064,
    },
}
GEMMA3_PATTERN = 6  # llama.cpp's default period of sliding-window and global layers for gemma3


@dataclass(frozen=True)
class Dims:
    """A model's sizes, read from config.json (with transformers' defaults)."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int
    n_ctx: int
    norm_eps: float
    n_vocab: int
    tied: bool


@dataclass(frozen=True)
class HfFamily:
    """How one Hugging Face architecture becomes a GGUF file (see the module docstring)."""

    arch: str  # GGUF architecture
    examples: str
    params: Callable[[dict[str, Any], Dims, Path], ModelParams]
    vocab: Callable[[Path, dict[str, Any], Dims], Vocab]
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # Gemma: post_attention_norm, post_ffw_norm
    fused: bool = False  # Phi-3: attn_qkv and ffn_up (gate rows, then up rows) as they are stored
    norm_offset: bool = False  # Gemma: + 1 on every norm weight
    tied_only: bool = False  # Gemma: lm_head is never converted (llama.cpp skips it)
    trim_embeddings: bool = False  # Gemma 3: token_embd rows beyond the vocabulary are dropped
    extra: Callable[[dict[str, Any], Dims, Path], list[SourceTensor]] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


def layer_shapes(fam: HfFamily, d: Dims) -> dict[str, tuple[int, ...]]:
    """GGUF name suffix -> numpy shape of the tensors of one layer."""
    q_dim, kv_dim = d.n_head * d.head_dim, d.n_head_kv * d.head_dim
    s: dict[str, tuple[int, ...]] = {"attn_norm.weight": (d.n_embd,)}
    if fam.fused:
        s["attn_qkv.weight"] = (q_dim + 2 * kv_dim, d.n_embd)
    else:
        s.update({"attn_q.weight": (q_dim, d.n_embd), "attn_k.weight": (kv_dim, d.n_embd),
                  "attn_v.weight": (kv_dim, d.n_embd)})
    if fam.qkv_bias:
        s.update({"attn_q.bias": (q_dim,), "attn_k.bias": (kv_dim,), "attn_v.bias": (kv_dim,)})
    if fam.qk_norm:
        s.update({"attn_q_norm.weight": (d.head_dim,), "attn_k_norm.weight": (d.head_dim,)})
    s["attn_output.weight"] = (d.n_embd, q_dim)
    if fam.post_norms:
        s["post_attention_norm.weight"] = (d.n_embd,)
    s["ffn_norm.weight"] = (d.n_embd,)
    if fam.fused:
        s["ffn_up.weight"] = (2 * d.n_ff, d.n_embd)
    else:
        s.update({"ffn_gate.weight": (d.n_ff, d.n_embd), "ffn_up.weight": (d.n_ff, d.n_embd)})
    s["ffn_down.weight"] = (d.n_embd, d.n_ff)
    if fam.post_norms:
        s["post_ffw_norm.weight"] = (d.n_embd,)
    return s


# ---- rope parameters as transformers standardizes them -----------------------------------------------------


def rope_parameters(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The global (full-attention) RoPE parameters: type, theta, scaling keys."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelFileError(f"config.json: rope_scaling is not an object: {params!r}")
    params = dict(params.get("full_attention", params))
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params:
        theta = cfg.get("rope_theta", defaults.get("rope_theta"))
        if theta is not None:
            params["rope_theta"] = theta
    return params


def _rope_scaling_kvs(a: str, rope: dict[str, Any], src: Path, allowed: tuple[str, ...]) -> list[KV]:
    """``rope.scaling.*`` as the base TextModel writes them for linear and YaRN scaling."""
    kind = rope.get("rope_type")
    if kind in (None, "default"):
        return []
    if kind not in allowed:
        raise UnsupportedModelError(f"{src}: RoPE scaling {kind!r} is not supported for this family",
                                    "supported: " + ", ".join(("default", *allowed)))
    factor = rope.get("factor")
    if factor is None:
        raise ModelFileError(f"{src}: rope_scaling of type {kind!r} has no factor")
    if kind == "linear":
        return [KV(f"{a}.rope.scaling.type", "linear", VT.STRING), _f32(f"{a}.rope.scaling.factor", factor)]
    out = [KV(f"{a}.rope.scaling.type", "yarn", VT.STRING), _f32(f"{a}.rope.scaling.factor", factor)]
    if rope.get("original_max_position_embeddings") is None:
        raise ModelFileError(f"{src}: YaRN rope_scaling needs original_max_position_embeddings")
    out.append(_u32(f"{a}.rope.scaling.original_context_length", rope["original_max_position_embeddings"]))
    for key, gguf_key in (
        ("extrapolation_factor", "yarn_ext_factor"),
        ("attention_factor", "yarn_attn_factor"),
        ("beta_fast", "yarn_beta_fast"),
        ("beta_slow", "yarn_beta_slow"),
    ):
        value = rope.get(key, rope.get("attn_factor") if key == "attention_factor" else None)
        if value is not None:
            out.append(_f32(f"{a}.rope.scaling.{gguf_key}", value))
    return out


_BAD_VALUE = "compare config.json with the model's published one; it may be damaged or not for this model"


def _number(key: str, v: Any) -> float:
    """A config value bound for GGUF key ``key``: a finite JSON number (no strings, booleans, nulls)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ModelFileError(f"config.json: the value for {key} must be a finite number, got {str(v)[:40]!r}",
                             _BAD_VALUE)
    return v


def _u32(key: str, v: Any) -> KV:
    n = _number(key, v)
    if n != int(n) or not 0 <= n < 1 << 32:
        raise ModelFileError(
            f"config.json: the value for {key} must be an integer from 0 to 2**32-1, got {n!r}", _BAD_VALUE
        )
    return KV(key, int(n), VT.UINT32)


def _f32(key: str, v: Any) -> KV:
    return KV(key, float(_number(key, v)), VT.FLOAT32)


# ---- Qwen2 / Qwen3: the base TextModel's keys --------------------------------------------------------------


def _qwen_params(arch: str) -> Callable[[dict[str, Any], Dims, Path], ModelParams]:
    def params(cfg: dict[str, Any], d: Dims, src: Path) -> ModelParams:
        a = arch
        rope = rope_parameters(cfg, _DEFAULTS[arch])
        kvs = [_u32(f"{a}.block_count", d.n_layer), _u32(f"{a}.context_length", d.n_ctx),
               _u32(f"{a}.embedding_length", d.n_embd), _u32(f"{a}.feed_forward_length", d.n_ff),
               _u32(f"{a}.attention.head_count", d.n_head), _u32(f"{a}.attention.head_count_kv", d.n_head_kv)]
        kvs += _rope_scaling_kvs(a, rope, src, ("linear", "yarn"))
        kvs += [_f32(f"{a}.rope.freq_base", rope["rope_theta"]), _f32(f"{a}.attention.layer_norm_rms_epsilon",
                                                                       d.norm_eps)]
        if arch == "qwen3" or cfg.get("head_dim") is not None:
            kvs += [
                _u32(f"{a}.attention.key_length", d.head_dim),
                _u32(f"{a}.attention.value_length", d.head_dim),
            ]
        kvs.append(KV(FILE_TYPE_KEY, None, VT.UINT32))
        return ModelParams(a, kvs)

    return params


def _base_vocab(model_dir: Path, cfg: dict[str, Any], d: Dims) -> Vocab:
    """TextModel's default: SentencePiece when there is a tokenizer.model, else byte-level BPE."""
    return load_vocab(model_dir, d.n_vocab, llama_rules=False)


# ---- Gemma 2 / Gemma 3 -------------------------------------------------------------------------------------


def _gemma2_params(cfg: dict[str, Any], d: Dims, src: Path) -> ModelParams:
    a = "gemma2"
    caps = {k: cfg.get(k, _DEFAULTS[a][k]) for k in ("attn_logit_softcapping", "final_logit_softcapping",
                                                       "sliding_window")}
    for key, value in caps.items():
        if value is None:
            raise UnsupportedModelError(
                f"{src}: Gemma 2 with {key} = null is not supported",
                "llama.cpp's gemma2 always soft-caps and slides; use the model's own config",
            )
    return ModelParams(a, [
        _u32(f"{a}.context_length", d.n_ctx), _u32(f"{a}.embedding_length", d.n_embd),
        _u32(f"{a}.block_count", d.n_layer), _u32(f"{a}.feed_forward_length", d.n_ff),
        _u32(f"{a}.attention.head_count", d.n_head), _u32(f"{a}.attention.head_count_kv", d.n_head_kv),
        _f32(f"{a}.attention.layer_norm_rms_epsilon", d.norm_eps),
        _u32(f"{a}.attention.key_length", d.head_dim), _u32(f"{a}.attention.value_length", d.head_dim),
        KV(FILE_TYPE_KEY, None, VT.UINT32),
        _f32(f"{a}.attn_logit_softcapping", caps["attn_logit_softcapping"]),
        _f32(f"{a}.final_logit_softcapping", caps["final_logit_softcapping"]),
        _u32(f"{a}.attention.sliding_window", caps["sliding_window"]),
    ])


def gemma3_sliding_layers(cfg: dict[str, Any], n_layer: int, src: Path) -> list[bool]:
    """Which layers slide: config.json's layer_types, else its period (transformers' default: 6)."""
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layer or any(
                t not in ("sliding_attention", "full_attention") for t in types):
            raise ModelFileError(
                f"{src}: layer_types should list sliding_attention/full_attention for each of "
                f"the {n_layer} layers"
            )
        return [t == "sliding_attention" for t in types]
    period = int(_u32("sliding_window_pattern", cfg.get("sliding_window_pattern", GEMMA3_PATTERN)).value)
    if period < 1:
        raise ModelFileError(f"{src}: sliding_window_pattern {period} must be at least 1")
    return [bool((i + 1) % period) for i in range(n_layer)]


def _gemma3_pattern_kvs(a: str, sliding: list[bool]) -> list[KV]:
    """Nothing for llama.cpp's default period of 6; a period or a per-layer array otherwise."""
    n = len(sliding)
    if sliding == [bool((i + 1) % GEMMA3_PATTERN) for i in range(n)]:
        return []
    for period in range(1, n + 1):
        if sliding == [bool((i + 1) % period) for i in range(n)]:
            return [_u32(f"{a}.attention.sliding_window_pattern", period)]
    return [KV(f"{a}.attention.sliding_window_pattern", sliding, VT.ARRAY, VT.BOOL)]


def _gemma3_params(cfg: dict[str, Any], d: Dims, src: Path) -> ModelParams:
    a, dflt = "gemma3", _DEFAULTS["gemma3"]
    if cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(f"{src}: Gemma 3 has no attention soft-capping, but config.json sets one",
                                    "check that config.json belongs to a Gemma 3 model")
    rope = rope_parameters(cfg, dflt)
    sliding_rope = (cfg.get("rope_parameters") or {}).get("sliding_attention") or {}
    theta_swa = sliding_rope.get("rope_theta", cfg.get("rope_local_base_freq", dflt["rope_local_base_freq"]))
    kvs = [_u32(f"{a}.block_count", d.n_layer), _u32(f"{a}.context_length", d.n_ctx),
           _u32(f"{a}.embedding_length", d.n_embd), _u32(f"{a}.feed_forward_length", d.n_ff),
           _u32(f"{a}.attention.head_count", d.n_head), _u32(f"{a}.attention.head_count_kv", d.n_head_kv)]
    kvs += _rope_scaling_kvs(a, rope, src, ("linear",))
    kvs += [_f32(f"{a}.rope.freq_base", rope["rope_theta"]), _f32(f"{a}.rope.freq_base_swa", theta_swa),
            _f32(f"{a}.attention.layer_norm_rms_epsilon", d.norm_eps),
            _u32(f"{a}.attention.key_length", d.head_dim), _u32(f"{a}.attention.value_length", d.head_dim),
            KV(FILE_TYPE_KEY, None, VT.UINT32)]
    if cfg.get("final_logit_softcapping"):
        kvs.append(_f32(f"{a}.final_logit_softcapping", cfg["final_logit_softcapping"]))
    sliding = gemma3_sliding_layers(cfg, d.n_layer, src)
    if any(sliding):
        window = cfg.get("sliding_window", dflt["sliding_window"])
        if not isinstance(window, int) or window < 1:
            raise ModelFileError(f"{src}: sliding_window {window!r} is not a positive number of positions")
        kvs.append(_u32(f"{a}.attention.sliding_window", window))
        kvs += _gemma3_pattern_kvs(a, sliding)
    return ModelParams(a, kvs)


def _gemma_vocab(model_dir: Path, cfg: dict[str, Any], d: Dims) -> Vocab:
    """SentencePiece with no space prefix (Gemma 3 without tokenizer.model: byte-level BPE)."""
    tokenizer_model = model_dir / "tokenizer.model"
    if tokenizer_model.is_file():
        vocab = spm_vocab(tokenizer_model, model_dir, d.n_vocab, llama_defaults=False)
        vocab.add_space_prefix = False
        return vocab
    if cfg.get("model_type") == "gemma2" or "Gemma2ForCausalLM" in (cfg.get("architectures") or []):
        raise ModelFileError(
            f"{model_dir} has no tokenizer.model", "Gemma 2 models ship one; copy it into the folder"
        )
    return bpe_vocab(model_dir, d.n_vocab, current_rules=True)


# ---- Phi-3 -------------------------------------------------------------------------------------------------


def phi3_rope(cfg: dict[str, Any], d: Dims, src: Path) -> tuple[dict[str, Any], int, int]:
    """(rope parameters, rotated dimensions per head, original context) as Phi3MiniModel derives them."""
    dflt = _DEFAULTS["phi3"]
    rope = rope_parameters(cfg, dflt)
    rot_pct = float(
        _number(
            "partial_rotary_factor",
            rope.get(
                "partial_rotary_factor", cfg.get("partial_rotary_factor", dflt["partial_rotary_factor"])
            ),
        )
    )
    rope_dims = int(rot_pct * d.n_embd) // d.n_head
    orig = rope.get("original_max_position_embeddings",
                    cfg.get("original_max_position_embeddings", dflt["original_max_position_embeddings"]))
    if not (0 < rope_dims <= d.head_dim and rope_dims % 2 == 0) or int(orig) < 1:
        raise ModelFileError(
            f"{src}: partial_rotary_factor {rot_pct} or original_max_position_embeddings {orig} "
            "is implausible"
        )
    return rope, rope_dims, int(orig)


def _phi3_longrope(cfg: dict[str, Any], d: Dims, src: Path) -> tuple[float, list[float], list[float]] | None:
    """(attention factor, long factors, short factors), or None for a model without LongRoPE."""
    rope, rope_dims, orig = phi3_rope(cfg, d, src)
    long_f, short_f = rope.get("long_factor"), rope.get("short_factor")
    if not long_f:
        if rope.get("rope_type") not in (None, "default"):
            raise UnsupportedModelError(f"{src}: RoPE scaling {rope.get('rope_type')!r} without factors")
        return None
    kind = str(rope.get("rope_type") or "").lower()
    if kind not in ("su", "longrope"):
        raise UnsupportedModelError(
            f"{src}: Phi-3 RoPE scaling {kind or '(missing type)'!r} is not supported",
            "only LongRoPE ('longrope' / 'su') is",
        )
    if short_f is None or len(long_f) != len(short_f) or len(long_f) != rope_dims // 2:
        raise ModelFileError(
            f"{src}: rope_scaling's long and short factors must both have {rope_dims // 2} entries"
        )
    scale = d.n_ctx / orig
    attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    return attn_factor, [float(v) for v in long_f], [float(v) for v in short_f]


def _phi3_params(cfg: dict[str, Any], d: Dims, src: Path) -> ModelParams:
    a = "phi3"
    rope, rope_dims, orig = phi3_rope(cfg, d, src)
    longrope = _phi3_longrope(cfg, d, src)
    early = [_f32(f"{a}.rope.scaling.attn_factor", longrope[0])] if longrope else []
    window = cfg.get("sliding_window")
    return ModelParams(
        a,
        [
            _u32(f"{a}.context_length", d.n_ctx),
            _u32(f"{a}.rope.scaling.original_context_length", orig),
            _u32(f"{a}.embedding_length", d.n_embd),
            _u32(f"{a}.feed_forward_length", d.n_ff),
            _u32(f"{a}.block_count", d.n_layer),
            _u32(f"{a}.attention.head_count", d.n_head),
            _u32(f"{a}.attention.head_count_kv", d.n_head_kv),
            _f32(f"{a}.attention.layer_norm_rms_epsilon", d.norm_eps),
            _u32(f"{a}.rope.dimension_count", rope_dims),
            _f32(f"{a}.rope.freq_base", rope["rope_theta"]),
            KV(FILE_TYPE_KEY, None, VT.UINT32),
            # llama.cpp writes 0 for "no window" (Phi-4) and ignores the value for Phi-3
            _u32(f"{a}.attention.sliding_window", window if window is not None else 0),
        ],
        early,
    )


def _phi3_extra(cfg: dict[str, Any], d: Dims, src: Path) -> list[SourceTensor]:
    longrope = _phi3_longrope(cfg, d, src)
    if longrope is None:
        return []
    out = []
    for name, values in (
        ("rope_factors_long.weight", longrope[1]),
        ("rope_factors_short.weight", longrope[2]),
    ):
        arr = np.asarray(values, np.float32)
        out.append(SourceTensor(name, arr.shape, "F32", lambda arr=arr: arr))
    return out


def _phi3_vocab(model_dir: Path, cfg: dict[str, Any], d: Dims) -> Vocab:
    return phi3_vocab(model_dir, d.n_vocab)


HF_FAMILIES: dict[str, HfFamily] = {
    "qwen2": HfFamily(
        "qwen2",
        "Qwen2, Qwen2.5",
        _qwen_params("qwen2"),
        _base_vocab,
        qkv_bias=True,
        defaults=_DEFAULTS["qwen2"],
    ),
    "qwen3": HfFamily(
        "qwen3", "Qwen3", _qwen_params("qwen3"), _base_vocab, qk_norm=True, defaults=_DEFAULTS["qwen3"]
    ),
    "gemma2": HfFamily(
        "gemma2",
        "Gemma 2",
        _gemma2_params,
        _gemma_vocab,
        post_norms=True,
        norm_offset=True,
        tied_only=True,
        defaults=_DEFAULTS["gemma2"],
    ),
    "gemma3": HfFamily(
        "gemma3",
        "Gemma 3",
        _gemma3_params,
        _gemma_vocab,
        qk_norm=True,
        post_norms=True,
        norm_offset=True,
        tied_only=True,
        trim_embeddings=True,
        defaults=_DEFAULTS["gemma3"],
    ),
    "phi3": HfFamily(
        "phi3",
        "Phi-3, Phi-3.5, Phi-4-mini",
        _phi3_params,
        _phi3_vocab,
        fused=True,
        extra=_phi3_extra,
        defaults=_DEFAULTS["phi3"],
    ),
}
# Hugging Face ``architectures`` -> family (llama is handled by hf.py's own path)
HF_ARCHITECTURES: dict[str, str] = {
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3", "Phi3ForCausalLM": "phi3",
}


def tensor_name_map(arch: str, n_layer: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layer)
