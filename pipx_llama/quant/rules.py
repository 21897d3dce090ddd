"""Which ggml type each tensor gets when a model is quantized to a llama.cpp file type.

A port of the type choice in llama.cpp's ``src/llama-quant.cpp`` (``tensor_allows_quantization``,
``llama_tensor_get_type_impl``, ``tensor_type_fallback``) for the file types pipx-llama writes:
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M and Q6_K. In short:

- only tensors of 2 or more dimensions whose name ends in ``weight`` are quantized, and never norms
  (``*_norm.weight``) or a few small special tensors; the rest keep their type;
- ``output.weight`` (and ``token_embd.weight`` when the embeddings are tied to the output) becomes
  Q6_K, or Q8_0 when its rows are not a multiple of the file type's block (and for Falcon), and
  stays Q8_0 in a Q8_0 file;
- Q4_K_M and Q5_K_M give ``attn_v`` and ``ffn_down`` Q6_K in the first and last eighth of the layers
  and in every third layer between (``use_more_bits``); Q4_K_S gives the first four ``attn_v`` and
  the first eighth of the ``ffn_down`` layers Q5_K;
- a row length that is not a multiple of the chosen type's block falls back: Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 if that does not fit either (a 32-block type such as
  Q4_0 or Q8_0 goes to F16 directly);
- architectures differ only through llama.cpp's model type: ``LLM_TYPE_70B`` (an 80-layer llama with
  grouped-query attention, any 80-layer qwen2, ...) gives Q5_K instead of Q4_K to ``attn_v``; the
  fused ``attn_qkv`` of Phi-3 counts and is upgraded as ``attn_v``.

The counters (``i_attention_wv``, ``i_ffn_down``) advance in llama.cpp's tensor order, which
``llama_tensor_order`` reproduces (its loader sorts tensors by layer, then by name).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from pipx_llama.errors import UnsupportedModelError, UsageError

Q = GGMLQuantizationType


@dataclass(frozen=True)
class FileType:
    """A llama.cpp file type: its name, ``general.file_type`` value and default tensor type."""

    name: str
    ftype: LlamaFileType
    default: GGMLQuantizationType


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("Q4_0", LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
        FileType("Q4_1", LlamaFileType.MOSTLY_Q4_1, Q.Q4_1),
        FileType("Q5_0", LlamaFileType.MOSTLY_Q5_0, Q.Q5_0),
        FileType("Q5_1", LlamaFileType.MOSTLY_Q5_1, Q.Q5_1),
        FileType("Q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
        FileType("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, Q.Q4_K),
        FileType("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
        FileType("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, Q.Q5_K),
        FileType("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K),
        FileType("Q6_K", LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
    )
}

QUANTIZED_TYPES = frozenset(
    t for t in GGMLQuantizationType if t not in (Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64)
)

# Substrings that keep a tensor unquantized (tensor_allows_quantization), besides "_norm.weight".
_NEVER = (
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
# Whole names kept unquantized: positional embeddings and token types (BERT-style models).
_NEVER_EXACT = ("position_embd.weight", "token_types.weight")

_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def layer_of(name: str) -> int:
    """The layer number llama.cpp's ``sscanf(name, "blk.%d.")`` reads, or -1."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def llama_tensor_order(names: Iterable[str]) -> list[str]:
    """Tensor names in llama.cpp's loader order: by layer (non-layer tensors first), then bytewise."""
    return sorted(names, key=lambda n: (layer_of(n), n.encode("utf-8", "surrogateescape")))


def category(name: str) -> str:
    """llama.cpp's ``tensor_get_category``."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_qkv"),
        ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def _is_attn_v(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def allows_quantization(name: str, n_dims: int) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` (with ``quantize_output_tensor`` on)."""
    if n_dims < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    if name in _NEVER_EXACT:
        return False
    return not any(s in name for s in _NEVER)


@dataclass(frozen=True)
class ModelInfo:
    """The hyper-parameters the type choice looks at."""

    arch: str
    n_layer: int
    n_head: int = 0
    n_head_kv: int = 0
    n_expert: int = 0

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ModelInfo:
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise UnsupportedModelError(
                "the model has no general.architecture", "this is not a llama.cpp model file"
            )

        def num(key: str, default: int = 0) -> int:
            v = metadata.get(f"{arch}.{key}", default)
            # per-layer arrays (e.g. OpenELM's head counts): llama.cpp's quantizer reads layer 0
            return int(v[0]) if hasattr(v, "__len__") and len(v) else int(v)

        n_layer = num("block_count")
        if n_layer <= 0:
            raise UnsupportedModelError(f"the model's {arch}.block_count is missing or zero",
                                        "this file does not describe a layered model llama.cpp can quantize")
        n_head = num("attention.head_count")
        return cls(arch, n_layer, n_head, num("attention.head_count_kv", n_head), num("expert_count"))

    @property
    def is_70b(self) -> bool:
        """llama.cpp's ``LLM_TYPE_70B``, as each architecture's ``load_arch_hparams`` sets it: an 80-layer
        llama with grouped-query attention, any 80-layer qwen2 (Qwen2/2.5-72B), deci and olmo, a 68-layer
        jais2."""
        if self.arch == "llama":
            return self.n_layer == 80 and self.n_head != self.n_head_kv
        return _LAYERS_70B.get(self.arch) == self.n_layer


@dataclass(frozen=True)
class TensorChoice:
    """The type chosen for one tensor; ``fallback`` when the row length forced a substitute type."""

    name: str
    shape: tuple[int, ...]
    source: GGMLQuantizationType
    target: GGMLQuantizationType
    fallback: bool = False


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
# src/models/<arch>.cpp: the layer count at which these architectures are typed LLM_TYPE_70B
_LAYERS_70B = {"qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


class _Chooser:
    """``quantize_state_impl`` plus ``llama_tensor_get_type_impl`` for one run."""

    def __init__(self, ft: FileType, model: ModelInfo, names: Sequence[str]) -> None:
        self.ft = ft
        self.model = model
        cats = [category(n) for n in names]
        self.n_attention_wv = sum(_is_attn_v(c) for c in cats)
        self.has_tied_embeddings = "output" not in cats
        self.n_ffn_down = model.n_layer
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def _layer(self, counter: int, name: str) -> int:
        if self.model.n_expert <= 1:
            return counter
        m = _LAYER.match(name)
        if m is None:
            raise UnsupportedModelError(f"cannot tell the layer of tensor {name!r}",
                                        "its name should start with blk.N. as llama.cpp names layers")
        i_layer = int(m.group(1))
        if not 0 <= i_layer < self.model.n_layer:
            raise UnsupportedModelError(
                f"tensor {name!r} is in layer {i_layer}, outside 0..{self.model.n_layer - 1}",
                "the file's block_count does not match its tensors",
            )
        return i_layer

    def impl(self, name: str, shape: Sequence[int], new_type: GGMLQuantizationType) -> GGMLQuantizationType:
        ftype, model, cat = self.ft.name, self.model, category(name)
        if cat == "output" or (self.has_tied_embeddings and cat == "token_embd"):
            if model.arch == "falcon" or shape[0] % GGML_QUANT_SIZES[new_type][0]:
                return Q.Q8_0
            return new_type if new_type == Q.Q8_0 else Q.Q6_K
        if cat == "token_embd":
            return new_type
        if _is_attn_v(cat):
            if ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(self.i_attention_wv, self.n_attention_wv):
                new_type = Q.Q6_K
            elif ftype == "Q4_K_S" and self.i_attention_wv < 4:
                new_type = Q.Q5_K
            if model.is_70b and new_type in (Q.Q3_K, Q.Q4_K):
                new_type = Q.Q5_K
            if model.n_expert == 8:
                new_type = Q.Q8_0
            self.i_attention_wv += 1
        elif cat == "attn_k":
            if model.n_expert == 8:
                new_type = Q.Q8_0
        elif cat == "ffn_down":
            i_layer, n_layer = self._layer(self.i_ffn_down, name), self.n_ffn_down
            if ftype == "Q4_K_M":
                if model.arch == "falcon":
                    new_type = (Q.Q6_K if i_layer < n_layer // 16
                                else Q.Q5_K if _use_more_bits(i_layer, n_layer) else Q.Q4_K)
                elif _use_more_bits(i_layer, n_layer):
                    new_type = Q.Q6_K
            elif ftype == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
                new_type = Q.Q6_K
            elif ftype == "Q4_K_S" and model.arch != "falcon" and i_layer < n_layer // 8:
                new_type = Q.Q5_K
            self.i_ffn_down += 1
        elif (
            cat == "attn_output"
            and model.arch != "falcon"
            and model.n_expert == 8
            and ftype in ("Q4_K_S", "Q4_K_M")
        ):
            new_type = Q.Q5_K
        return new_type

    def choose(self, name: str, shape: tuple[int, ...], source: GGMLQuantizationType) -> TensorChoice:
        if not allows_quantization(name, len(shape)):
            return TensorChoice(name, shape, source, source)
        new_type = self.impl(name, shape, self.ft.default)
        ncols = shape[0]
        if ncols % GGML_QUANT_SIZES[new_type][0] == 0:
            return TensorChoice(name, shape, source, new_type)
        block = GGML_QUANT_SIZES[new_type][0]
        # a 32-block type has no smaller block to fall back to: F16 (tensor_type_fallback's default case)
        fallback = _FALLBACK.get(new_type, new_type if block <= 32 else None)
        if fallback is None:
            raise UnsupportedModelError(
                f"tensor {name!r} has rows of {ncols} values, not a multiple of {new_type.name}'s block of "
                f"{GGML_QUANT_SIZES[new_type][0]}, and llama.cpp defines no fallback type for "
                f"{new_type.name}",
                "choose a K-quant file type (Q4_K_M, Q5_K_M, Q6_K), which fall back to other types",
            )
        if ncols % GGML_QUANT_SIZES[fallback][0]:
            fallback = Q.F16
        return TensorChoice(name, shape, source, fallback, fallback=True)


def file_type(name: str) -> FileType:
    """The file type called ``name`` (case-insensitive), or a UsageError listing the choices."""
    ft = FILE_TYPES.get(name.upper())
    if ft is None:
        raise UsageError(f"unknown quantization type {name!r}",
                         f"choose one of {', '.join(FILE_TYPES)}")
    return ft


def choose_types(
    tensors: Sequence[tuple[str, tuple[int, ...], GGMLQuantizationType]], ft: FileType, model: ModelInfo,
) -> list[TensorChoice]:
    """The target type of each tensor ``(name, ggml shape, type)``, in llama.cpp's tensor order."""
    by_name = {name: (tuple(shape), qtype) for name, shape, qtype in tensors}
    order = llama_tensor_order(by_name)
    chooser = _Chooser(ft, model, order)
    return [chooser.choose(name, *by_name[name]) for name in order]
