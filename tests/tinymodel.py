"""Write tiny but complete GGUF files of every supported family for tests.

``write_tiny_model`` writes a GGUF v3 file with ``gguf.GGUFWriter`` that carries everything llama.cpp's
loader reads for a model of its family: the hyper-parameters, every tensor under llama.cpp's name, and a
small tokenizer (GPT-2 byte-level BPE or LLaMA SentencePiece). Weights are seeded random numbers,
quantized with ``gguf.quants``; the function returns them dequantized so a test can run a plain
numpy forward pass against exactly what the file holds.

Shapes in the returned dict are numpy (torch) order: a weight is ``[rows = outputs, cols = inputs]``,
the reverse of the ggml order the GGUF header lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
from gguf import quants as gguf_quants

_FILE_TYPE = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
}
SUPPORTED_QTYPES = tuple(_FILE_TYPE)

# Merges of the tiny BPE vocabulary, in rank order, in GPT-2's byte-level alphabet (Ġ is a space).
BPE_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġt", "he"), ("r", "e"),
    ("l", "l"), ("Ġ", "w"), ("o", "r"), ("Ġ", "s"), ("he", "ll"), ("hell", "o"), ("Ġ", "hello"),
    ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("Ġ", "i"), ("Ġi", "s"),
]
BPE_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Pieces of the tiny SentencePiece vocabulary, best score first (▁ is a space).
SPM_PIECES = [
    "▁t", "he", "in", "▁a", "er", "on", "▁th", "▁the", "ll", "▁w", "or", "▁s", "el", "▁h", "▁he",
    "▁hel", "▁hell", "▁hello", "ld", "▁wor", "▁world", "▁i", "▁is", "lo", "re", "at",
]
SPM_CHARS = ["▁", *"etaoinshrdlcumwfgypbvkjxqz", *"0123456789", *",.!?'"]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% "
    "endif %}"
)


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode map as a list: entry ``i`` stands for byte ``order[i]``; see
    ``gpt2_byte_order``."""
    return [chr(c) for _, c in _gpt2_pairs()]


def gpt2_byte_order() -> list[int]:
    """The byte each of GPT-2's first 256 vocabulary entries stands for."""
    return [b for b, _ in _gpt2_pairs()]


def _gpt2_pairs() -> list[tuple[int, int]]:
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    pairs = [(b, b) for b in printable]
    n = 0
    for b in range(256):
        if b not in printable:
            pairs.append((b, 256 + n))
            n += 1
    return pairs


def _bpe_vocab() -> tuple[list[str], list[int], list[float] | None, dict[str, Any]]:
    tokens = gpt2_byte_chars()
    for left, right in BPE_MERGES:
        if left not in tokens or right not in tokens:
            raise ValueError(f"merge {left!r} {right!r} uses a token that is not in the vocabulary yet")
        tokens.append(left + right)
    types = [int(TokenType.NORMAL)] * len(tokens)
    tokens += BPE_CONTROL
    types += [int(TokenType.CONTROL)] * len(BPE_CONTROL)
    ids = {t: i for i, t in enumerate(tokens)}
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in BPE_MERGES],
        "tokenizer.ggml.bos_token_id": ids["<|im_start|>"],
        "tokenizer.ggml.eos_token_id": ids["<|im_end|>"],
        "tokenizer.ggml.unknown_token_id": ids["<|endoftext|>"],
        "tokenizer.ggml.padding_token_id": ids["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    return tokens, types, None, meta


def _spm_vocab() -> tuple[list[str], list[int], list[float] | None, dict[str, Any]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    scores = [0.0, 0.0, 0.0]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(TokenType.BYTE)] * 256
    scores += [0.0] * 256
    # like a real SentencePiece model: merged pieces score higher than the single characters
    for i, piece in enumerate(SPM_PIECES + SPM_CHARS):
        tokens.append(piece)
        types.append(int(TokenType.NORMAL))
        scores.append(-float(i) if len(piece) > 1 or piece == "▁" else -1000.0 - i)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
    }
    return tokens, types, scores, meta


def _typed(value: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """Pick the GGUF type a llama.cpp converter would use for a plain Python value."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], GGUFValueType):
        val, vtype = value
        if vtype == GGUFValueType.ARRAY:
            raise ValueError("give arrays as (list, GGUFValueType.<element type>)")
        if isinstance(val, np.ndarray):
            val = val.tolist()
        if isinstance(val, list):
            return val, GGUFValueType.ARRAY, vtype
        return val, vtype, None
    if isinstance(value, bool):
        return value, GGUFValueType.BOOL, None
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if 0 <= value < 1 << 32:
            return value, GGUFValueType.UINT32, None
        if -(1 << 31) <= value < 0:
            return value, GGUFValueType.INT32, None
        return value, GGUFValueType.UINT64 if value > 0 else GGUFValueType.INT64, None
    if isinstance(value, (float, np.floating)):
        return float(value), GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return value, GGUFValueType.STRING, None
    if isinstance(value, (list, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else list(value)
        if not items:
            raise ValueError("GGUF arrays cannot be empty")
        if all(isinstance(v, str) for v in items):
            sub = GGUFValueType.STRING
        elif all(isinstance(v, bool) for v in items):
            sub = GGUFValueType.BOOL
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            sub = GGUFValueType.INT32
        else:
            items = [float(v) for v in items]
            sub = GGUFValueType.FLOAT32
        return items, GGUFValueType.ARRAY, sub
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _quantize(rng: np.random.Generator, shape: tuple[int, ...], std: float, qtype: GGMLQuantizationType,
              mean: float = 0.0) -> tuple[np.ndarray, GGMLQuantizationType | None, np.ndarray]:
    """Random weights -> (data for GGUFWriter.add_tensor, its raw_dtype, the f32 values the file holds)."""
    w = (mean + std * rng.standard_normal(shape)).astype(np.float32)
    try:
        data = gguf_quants.quantize(w, qtype)
    except NotImplementedError:
        raise ValueError(f"gguf.quants cannot quantize to {qtype.name}") from None
    raw = qtype if data.dtype == np.uint8 else None
    values = gguf_quants.dequantize(data, qtype).astype(np.float32, copy=False).reshape(shape)
    return data, raw, values


# What each family's tiny model carries besides the llama layer (see pipx_llama/engine/arch): the switches
# the writer acts on, and metadata in llama.cpp's keys (without the architecture prefix).
FAMILY_FEATURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"biases": True},
    "qwen3": {"qk_norm": True, "head_dim": 24},
    "gemma2": {
        "post_norms": True,
        "tied_only": True,
        "meta": {
            "attention.sliding_window": 6,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
        },
    },
    "gemma3": {
        "post_norms": True,
        "qk_norm": True,
        "meta": {
            "attention.sliding_window": 5,
            "attention.sliding_window_pattern": 2,
            "rope.freq_base_swa": 10000.0,
            "rope.freq_base": 1000000.0,
        },
    },
    "phi3": {
        "fused": True,
        "rot": 12,
        "longrope": True,
        "meta": {"rope.scaling.original_context_length": 256, "rope.scaling.attn_factor": 1.1902380714238083},
    },
}


def write_tiny_llama(path: str | Path, **kwargs: Any) -> dict[str, np.ndarray]:
    """``write_tiny_model`` for architecture ``llama``."""
    return write_tiny_model(path, arch="llama", **kwargs)


def write_tiny_model(
    path: str | Path,
    *,
    arch: str = "llama",
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    vocab: int | None = None,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    tied: bool = True,
    seed: int = 0,
    tokenizer: str = "bpe",
    extra_metadata: Mapping[str, Any] | None = None,
    rope_freqs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Write a small valid GGUF v3 of family ``arch`` to ``path``; return its weights as float32 arrays by
    name.

    Every feature of the family is exercised (``FAMILY_FEATURES``): biases, q/k norms, post norms,
    soft-capping, sliding windows smaller than a test prompt, partial rotary, LongRoPE factors,
    fused q/k/v and gate/up tensors.

    ``vocab`` pads the tokenizer's own vocabulary (about 300 tokens) with unused ``[PADn]`` tokens up to
    that size. ``qtype`` applies to every 2-D weight; norms stay F32. ``tied`` leaves out
    ``output.weight`` so the output projection reuses ``token_embd.weight``.

    ``extra_metadata`` overrides or adds metadata after the defaults are set: a plain value gets the
    type llama.cpp's converters use (non-negative int: UINT32, float: FLOAT32, list: ARRAY), a
    ``(value, GGUFValueType.X)`` pair forces the type (for a list, X is the element type), and
    ``None`` removes the key.

    ``rope_freqs`` (f32 [head_dim // 2]) adds Llama 3.1's per-pair RoPE factors as ``rope_freqs.weight``.
    """
    qtype = GGMLQuantizationType(qtype)
    features = FAMILY_FEATURES[arch]
    if qtype not in _FILE_TYPE:
        raise ValueError(f"qtype {qtype.name} is not one of {[t.name for t in SUPPORTED_QTYPES]}")
    head_dim = features.get("head_dim", dim // n_heads)
    if n_heads % n_kv_heads or head_dim % 2 or ("head_dim" not in features and dim % n_heads):
        raise ValueError(f"dim {dim}, {n_heads} heads and {n_kv_heads} KV heads do not make a {arch} model")
    if tokenizer == "bpe":
        tokens, types, scores, tok_meta = _bpe_vocab()
    elif tokenizer == "spm":
        tokens, types, scores, tok_meta = _spm_vocab()
    else:
        raise ValueError(f"tokenizer must be 'bpe' or 'spm', not {tokenizer!r}")
    if vocab is not None:
        if vocab < len(tokens):
            raise ValueError(
                f"vocab {vocab} is smaller than the {tokenizer} vocabulary's {len(tokens)} tokens"
            )
        n_pad = vocab - len(tokens)
        tokens += [f"[PAD{i}]" for i in range(n_pad)]
        types += [int(TokenType.UNUSED)] * n_pad
        if scores is not None:
            scores += [-1e9] * n_pad
    n_vocab = len(tokens)
    n_rot = features.get("rot", head_dim)

    a = arch
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": f"tiny {tokenizer} model",  # llama.cpp keys vocabulary quirks on names like "phi3"
        f"{a}.block_count": n_layers,
        f"{a}.context_length": 512,
        f"{a}.embedding_length": dim,
        f"{a}.feed_forward_length": ffn,
        f"{a}.attention.head_count": n_heads,
        f"{a}.attention.head_count_kv": n_kv_heads,
        f"{a}.rope.freq_base": 10000.0,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-5 if arch != "gemma2" else 1e-6,
        "general.file_type": int(_FILE_TYPE[qtype]),
        f"{a}.vocab_size": n_vocab,
        f"{a}.rope.dimension_count": n_rot,
        "tokenizer.ggml.tokens": (tokens, GGUFValueType.STRING),
        "tokenizer.ggml.token_type": (types, GGUFValueType.INT32),
        "general.quantization_version": GGML_QUANT_VERSION,
    }
    if "head_dim" in features:
        meta[f"{a}.attention.key_length"] = head_dim
        meta[f"{a}.attention.value_length"] = head_dim
    for key, value in features.get("meta", {}).items():
        meta[f"{a}.{key}"] = value
    if scores is not None:
        meta["tokenizer.ggml.scores"] = (scores, GGUFValueType.FLOAT32)
    meta.update(tok_meta)
    for key, value in (extra_metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value

    rng = np.random.default_rng(seed)
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    # (name, numpy shape, std, mean); matrices scaled by 1/sqrt(fan-in) keep activations near unit size
    plan: list[tuple[str, tuple[int, ...], float, float]] = [("token_embd.weight", (n_vocab, dim), 1.0, 0.0)]
    if features.get("longrope"):
        plan += [
            ("rope_factors_short.weight", (n_rot // 2,), 0.3, 1.5),
            ("rope_factors_long.weight", (n_rot // 2,), 1.0, 4.0),
        ]
    for i in range(n_layers):
        p = f"blk.{i}."
        plan.append((p + "attn_norm.weight", (dim,), 0.1, 1.0))
        if features.get("fused"):
            plan.append((p + "attn_qkv.weight", (q_dim + 2 * kv_dim, dim), dim**-0.5, 0.0))
        else:
            plan += [(p + "attn_q.weight", (q_dim, dim), dim**-0.5, 0.0),
                     (p + "attn_k.weight", (kv_dim, dim), dim**-0.5, 0.0),
                     (p + "attn_v.weight", (kv_dim, dim), dim**-0.5, 0.0)]
        if features.get("biases"):
            plan += [(p + "attn_q.bias", (q_dim,), 0.5, 0.0), (p + "attn_k.bias", (kv_dim,), 0.5, 0.0),
                     (p + "attn_v.bias", (kv_dim,), 0.5, 0.0)]
        if features.get("qk_norm"):
            plan += [(p + "attn_q_norm.weight", (head_dim,), 0.2, 1.0),
                     (p + "attn_k_norm.weight", (head_dim,), 0.2, 1.0)]
        plan.append((p + "attn_output.weight", (dim, q_dim), q_dim**-0.5, 0.0))
        if features.get("post_norms"):
            plan.append((p + "post_attention_norm.weight", (dim,), 0.1, 1.0))
        plan.append((p + "ffn_norm.weight", (dim,), 0.1, 1.0))
        if features.get("fused"):
            plan.append((p + "ffn_up.weight", (2 * ffn, dim), dim**-0.5, 0.0))
        else:
            plan += [(p + "ffn_gate.weight", (ffn, dim), dim**-0.5, 0.0),
                     (p + "ffn_up.weight", (ffn, dim), dim**-0.5, 0.0)]
        plan.append((p + "ffn_down.weight", (dim, ffn), ffn**-0.5, 0.0))
        if features.get("post_norms"):
            plan.append((p + "post_ffw_norm.weight", (dim,), 0.1, 1.0))
    plan.append(("output_norm.weight", (dim,), 0.1, 1.0))
    if not tied and not features.get("tied_only"):
        plan.append(("output.weight", (n_vocab, dim), dim**-0.5, 0.0))

    writer = GGUFWriter(path, arch)
    writer.kv_data[0].clear()  # the constructor adds general.architecture; ``meta`` decides it
    for key, value in meta.items():
        val, vtype, sub = _typed(value)
        writer.add_key_value(key, val, vtype, sub_type=sub)

    weights: dict[str, np.ndarray] = {}
    if rope_freqs is not None:
        factors = np.asarray(rope_freqs, np.float32)
        writer.add_tensor("rope_freqs.weight", factors)
        weights["rope_freqs.weight"] = factors
    for name, shape, std, mean in plan:
        data, raw, values = _quantize(rng, shape, std, qtype if len(shape) == 2 else GGMLQuantizationType.F32,
                                      mean)
        if name.startswith("rope_factors"):
            data = values = np.abs(values).astype(np.float32) + np.float32(0.5)
            raw = None
        writer.add_tensor(name, data, raw_dtype=raw)
        weights[name] = values
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return weights


def tiny_llama_bytes(tmp_dir: str | Path, name: str = "tiny.gguf", **kwargs: Any) -> bytes:
    """Write a tiny model into ``tmp_dir`` and return the file's bytes (for tests that mutate them)."""
    path = Path(tmp_dir) / name
    write_tiny_llama(path, **kwargs)
    return path.read_bytes()

