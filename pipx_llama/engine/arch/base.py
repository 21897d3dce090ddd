"""What a model family's layers do, as data: the ``Family`` record and the hyper-parameters of one file.

Every family the engine runs is a LLaMA-style decoder: embedding, then per layer a pre-normed
attention block and a pre-normed gated feed-forward block, each added to the residual stream, then
a final norm and the output projection. Families differ in a handful of switches, which a
``Family`` lists and both forward passes read (``model.py`` per op, ``kernels/fused.py`` fused):

- RoPE on consecutive pairs (``ROPE_NORM``, llama) or on the two halves of a head (``ROPE_NEOX``,
  Qwen, Gemma, Phi-3), over the first ``n_rot`` dimensions of each head;
- biases on q, k, v (Qwen2: loaded wherever the file has them);
- per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3);
- RMSNorm of each block's output before it joins the residual (Gemma 2/3 "post" norms);
- embeddings scaled by sqrt(dim) (Gemma);
- the gate's activation: SiLU (SwiGLU) or tanh-approximated GELU (GeGLU, Gemma);
- q, k, v in one tensor, and gate, up in one tensor (Phi-3): split by rows when loaded;
- attention logit soft-capping and final logit soft-capping (Gemma 2);
- sliding-window layers with RoPE bases of their own (Gemma 2/3);
- where the attention scale goes: on q before the f16 rounding (Gemma, Phi-3) or on q·k (others).

``read_hparams`` reads what every family shares; a family's ``extra`` hook reads its own keys,
with llama.cpp's defaults (``llama-hparams.h``, ``src/models/<family>.cpp``), so the numbers match
llama.cpp's, not a paper's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from pipx_llama.errors import ModelFileError, UnsupportedModelError
from pipx_llama.formats.gguf import GGUFFile

ROPE_NORM = 0  # ggml's GGML_ROPE_TYPE_NORMAL: pairs (2i, 2i+1)
ROPE_NEOX = 2  # GGML_ROPE_TYPE_NEOX: pairs (i, i + n_rot/2)
ACT_SILU = 0  # SwiGLU: silu(gate) * up
ACT_GELU = 1  # GeGLU: gelu_tanh(gate) * up, through ggml's f16 table


@dataclass(frozen=True)
class HyperParams:
    """Everything the forward pass needs to know about a file besides its tensors."""

    arch: str
    n_vocab: int
    dim: int  # embedding length
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    n_ctx_train: int
    rope_base: float
    rope_freq_scale: float
    n_rot: int  # leading dims of each head that RoPE rotates
    norm_eps: float
    # Llama 3.1+ RoPE: pair i's angle is divided by rope_factors[i] (the file's rope_freqs.weight)
    rope_factors: tuple[float, ...] | None = None
    rope_type: int = ROPE_NORM
    # Phi-3 LongRoPE: per-pair factors for contexts up to / beyond n_ctx_orig, and cos/sin scaled by
    # rope_attn_factor (llama.cpp's rope.scaling.attn_factor)
    rope_factors_short: tuple[float, ...] | None = None
    rope_factors_long: tuple[float, ...] | None = None
    n_ctx_orig: int = 0
    rope_attn_factor: float = 1.0
    # attention scores: s = K · f16(q * q_scale), optionally soft-capped, times kq_scale
    q_scale: float = 1.0
    kq_scale: float = 0.0  # 0: 1/sqrt(head_dim), as llama.cpp's default kq_scale
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    # sliding-window attention: layers marked True see only the last ``swa_window`` positions and
    # rotate with their own RoPE base and scale
    swa_window: int = 0
    swa_layers: tuple[bool, ...] = ()
    rope_base_swa: float = 10000.0
    rope_freq_scale_swa: float = 1.0
    embed_scale: float = 1.0  # the embedding row is multiplied by this (Gemma: sqrt(dim))

    def is_swa(self, layer: int) -> bool:
        return self.swa_window > 0 and bool(self.swa_layers) and self.swa_layers[layer]

    def factors_for(self, n_ctx: int) -> tuple[float, ...] | None:
        """The per-pair RoPE factors a context of ``n_ctx`` uses (llama_model::get_rope_factors)."""
        if self.rope_factors is not None:
            return self.rope_factors
        if self.rope_factors_long is not None and n_ctx > self.n_ctx_orig:
            return self.rope_factors_long
        return self.rope_factors_short


@dataclass(frozen=True)
class Family:
    """One architecture: its GGUF name(s), its layer switches, and a hook for its own metadata."""

    names: tuple[str, ...]
    examples: str  # for messages: which models these are
    rope_type: int = ROPE_NORM
    fused_qkv: bool = False  # attn_qkv.weight: q rows, then k rows, then v rows
    fused_gate_up: bool = False  # ffn_up.weight: gate rows, then up rows (ggml_swiglu's split)
    qk_norm: bool = False  # attn_q_norm / attn_k_norm [head_dim]
    post_norms: bool = False  # attn_post_norm / ffn_post_norm [dim]
    embed_scale: bool = False  # embeddings times sqrtf(dim)
    activation: int = ACT_SILU
    extra: Callable[[Meta, HyperParams], HyperParams] | None = None


# --- reading metadata ---------------------------------------------------------------------------------------


def bad_file(path: Path, problem: str) -> ModelFileError:
    return ModelFileError(
        f"{path}: {problem}", "the file is damaged or not a complete model; download it again"
    )


class Meta:
    """Typed access to one file's metadata; every wrong type or implausible value is a ModelFileError."""

    def __init__(self, g: GGUFFile, arch: str) -> None:
        self.g = g
        self.arch = arch

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.g.metadata

    def raw(self, key: str, default: Any = None) -> Any:
        return self.g.metadata.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default: int | None = None) -> int:
        return _typed(self.g, f"{self.arch}.{key}", int, default)

    def float(self, key: str, default: float | None = None) -> float:
        return _typed(self.g, f"{self.arch}.{key}", float, default)

    def vector(self, name: str, n: int) -> np.ndarray:
        """A 1-D F32 tensor of ``n`` values (norms, biases, RoPE factors): a view of the file."""
        info = self.g.tensors.get(name)
        if info is None:
            raise bad_file(self.g.path, f"tensor {name!r} is missing")
        if info.shape != (n,) or info.qtype != GGMLQuantizationType.F32:
            raise bad_file(
                self.g.path,
                f"tensor {name!r} should be F32 of shape [{n}], found {info.qtype.name} {list(info.shape)}",
            )
        return self.g.tensor_bytes(name).view(np.float32)

    def factors(self, name: str, n: int) -> tuple[float, ...] | None:
        """RoPE frequency factors from tensor ``name`` (None when the file has none)."""
        if name not in self.g.tensors:
            return None
        f = self.vector(name, n)
        if not (np.isfinite(f).all() and (f > 0).all()):
            raise bad_file(self.g.path, f"tensor {name!r} holds a RoPE factor that is not a positive number")
        return tuple(float(v) for v in f)


def _typed(g: GGUFFile, key: str, kind: type, default: Any) -> Any:
    if key not in g.metadata:
        if default is not None:
            return default
        raise bad_file(g.path, f"metadata {key!r} is missing")
    value = g.metadata[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise bad_file(g.path, f"metadata {key!r} should be an integer, found {type(value).__name__}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise bad_file(g.path, f"metadata {key!r} should be a number, found {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise bad_file(g.path, f"metadata {key!r} is {value}")
        return value
    if not isinstance(value, kind):
        raise bad_file(g.path, f"metadata {key!r} should be {kind.__name__}, found {type(value).__name__}")
    return value


def architecture(g: GGUFFile) -> str:
    return _typed(g, "general.architecture", str, None)


def read_hparams(g: GGUFFile, family: Family) -> HyperParams:
    """The hyper-parameters every family shares, checked against each other, then the family's own."""
    arch = architecture(g)
    m = Meta(g, arch)
    dim = m.int("embedding_length")
    n_heads = m.int("attention.head_count")
    n_layers = m.int("block_count")
    ffn_dim = m.int("feed_forward_length")
    n_ctx_train = m.int("context_length")
    if not (0 < dim <= 1 << 16 and 0 < n_heads <= 1 << 12 and 0 < n_layers <= 1024 and 0 < ffn_dim <= 1 << 20
            and 0 < n_ctx_train):
        raise bad_file(
            g.path,
            f"implausible hyper-parameters: dim {dim}, heads {n_heads}, layers {n_layers}, "
            f"ffn {ffn_dim}, context {n_ctx_train}",
        )
    n_kv_heads = m.int("attention.head_count_kv", n_heads)
    if not 0 < n_kv_heads <= n_heads or n_heads % n_kv_heads:
        raise bad_file(g.path, f"{n_heads} attention heads cannot be grouped over {n_kv_heads} KV heads")
    if not m.has("attention.key_length") and dim % n_heads:
        raise bad_file(g.path, f"embedding length {dim} is not a multiple of the {n_heads} heads")
    head_dim = m.int("attention.key_length", dim // n_heads)
    if head_dim != m.int("attention.value_length", head_dim) or head_dim % 2 or not 0 < head_dim <= 1024:
        raise UnsupportedModelError(
            f"{g.path}: head size {head_dim} (key/value lengths differ or odd) is not supported",
            "use a standard model of a supported family",
        )
    n_rot = m.int("rope.dimension_count", head_dim)
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise bad_file(g.path, f"RoPE dimension count {n_rot} does not fit the head size {head_dim}")
    rope_base = m.float("rope.freq_base", 10000.0)
    eps = m.float("attention.layer_norm_rms_epsilon", 1e-5)
    if not (rope_base > 0 and 0 < eps < 1):
        raise bad_file(g.path, f"implausible RoPE base {rope_base} or RMS epsilon {eps}")
    freq_scale = _rope_scaling(g, m)
    attn_factor = m.float("rope.scaling.attn_factor", 1.0)
    if not 0 < attn_factor <= 16:
        raise bad_file(g.path, f"RoPE attention factor {attn_factor} is implausible")
    n_ctx_orig = m.int("rope.scaling.original_context_length", n_ctx_train)
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise bad_file(g.path, "tensor 'token_embd.weight' is missing")
    n_vocab = embd.shape[1] if len(embd.shape) == 2 else 0
    hp = HyperParams(
        arch=arch, n_vocab=n_vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, ffn_dim=ffn_dim, n_ctx_train=n_ctx_train, rope_base=rope_base,
        rope_freq_scale=freq_scale, n_rot=n_rot, norm_eps=eps, rope_type=family.rope_type,
        rope_factors=m.factors("rope_freqs.weight", n_rot // 2),
        rope_factors_short=m.factors("rope_factors_short.weight", n_rot // 2),
        rope_factors_long=m.factors("rope_factors_long.weight", n_rot // 2),
        n_ctx_orig=n_ctx_orig, rope_attn_factor=attn_factor,
        embed_scale=float(np.sqrt(np.float32(dim))) if family.embed_scale else 1.0,
    )
    if family.extra is not None:
        hp = family.extra(m, hp)
    return hp


def _rope_scaling(g: GGUFFile, m: Meta) -> float:
    """freq_scale from ``rope.scaling.type``/``factor`` (llama.cpp reads "linear" when the type is absent)."""
    scaling = m.raw("rope.scaling.type", "linear")
    if scaling == "none":
        return 1.0
    if scaling != "linear":
        raise UnsupportedModelError(f"{g.path}: RoPE scaling {scaling!r} is not supported (none, linear)",
                                    "use a model without YaRN or other long-context RoPE scaling")
    factor = m.float("rope.scaling.factor", 0.0)
    if factor < 0:
        raise bad_file(g.path, f"RoPE scaling factor {factor} must be positive")
    return 1.0 if factor == 0.0 else 1.0 / factor


def swa_pattern(m: Meta, n_layers: int, default_period: int) -> tuple[bool, ...]:
    """Which layers slide (llama.cpp's load_swa_pattern): an explicit per-layer array, or a period n where
    every n-th layer (the last of each period) is global."""
    raw = m.raw("attention.sliding_window_pattern")
    if raw is not None and not isinstance(raw, (int, np.integer)):
        flags = np.asarray(raw)
        if flags.shape != (n_layers,):
            raise bad_file(m.g.path, f"sliding_window_pattern has {flags.size} entries for {n_layers} layers")
        return tuple(bool(f) for f in flags)
    period = m.int("attention.sliding_window_pattern", default_period)
    if period < 0:
        raise bad_file(m.g.path, f"sliding_window_pattern {period} is negative")
    return tuple(period == 0 or layer % period < period - 1 for layer in range(n_layers))


def with_swa(m: Meta, hp: HyperParams, window: int, period: int) -> HyperParams:
    """``hp`` with sliding-window layers: ``window`` positions, every ``period``-th layer global."""
    if window < 1 or window > 1 << 24:
        raise bad_file(m.g.path, f"sliding window of {window} positions is implausible")
    base_swa = m.float("rope.freq_base_swa", 10000.0)
    if base_swa <= 0:
        raise bad_file(m.g.path, f"RoPE base of the sliding-window layers {base_swa} must be positive")
    return dataclasses.replace(hp, swa_window=window, swa_layers=swa_pattern(m, hp.n_layers, period),
                               rope_base_swa=base_swa, rope_freq_scale_swa=1.0)


def gemma_q_scale(hp: HyperParams, big_layers: int) -> float:
    """Gemma's query scale (gemma_pytorch's config): 1/sqrt(dim/heads) for the 27B, 1/sqrt(head_dim)
    otherwise; llama.cpp tells the 27B by its layer count."""
    denom = hp.dim // hp.n_heads if hp.n_layers == big_layers else hp.head_dim
    return float(np.float32(1.0) / np.sqrt(np.float32(denom)))
