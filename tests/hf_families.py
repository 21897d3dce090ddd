"""Tiny seeded Hugging Face folders of every family pipx-llama converts, laid out as the real models are.

``write_family_folder(folder, arch, ...)`` writes config.json (the real models' keys, small sizes),
safetensors weights in bfloat16 under Hugging Face's names, and the tokenizer files the family ships:

- qwen2 / qwen3: Qwen's byte-level BPE ``tokenizer.json`` (NFC, Qwen's split regex) with the real
  151,643-token vocabulary and merges, rebuilt from llama.cpp's ``ggml-vocab-qwen2.gguf`` so that the
  pre-tokenizer hash llama.cpp's converter computes is Qwen's; Qwen 2.5's / Qwen 3's added tokens;
- gemma2 / gemma3: a small SentencePiece ``tokenizer.model`` with Gemma's id layout (pad, eos, bos,
  unk, mask, ...), no dummy prefix, byte fallback, plus ``tokenizer.json``'s added tokens;
- phi3: Phi-3's SentencePiece ``tokenizer.model`` (LLaMA's 32,000 pieces from ``ggml-vocab-phi-3.gguf``)
  with Phi-3's 32,064-row embedding and its added tokens (``</s>`` not special, as Microsoft ships it).

Every feature of a family is present: q/k/v biases (qwen2), q/k norms and a head size that is not
dim/heads (qwen3, gemma), Gemma's norm weights stored as offsets from 1, soft-capping and sliding
windows smaller than a test prompt (gemma2/3, Gemma 3 with its own pattern and local RoPE base),
fused qkv and gate_up, partial rotary and LongRoPE factors (phi3).

``llama_cpp_tree()`` extracts llama.cpp's own converter (convert_hf_to_gguf.py, conversion/, gguf-py/)
and the vocab files from the llama-cpp-python sdist the suite already fetches; the ``llama_models``
fixture of the test modules (``llama_models_dir()``) gives its ``models/`` folder (``models`` below).
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from convert_helpers import bf16, llama_tokenizer_model, write_safetensors

from pipx_llama.errors import PipxLlamaError
from pipx_llama.fetch.pip_source import download_pinned_sdist
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.tokenizer.spm import _field_bytes, _field_varint, build_model_proto

FAMILIES = ("qwen2", "qwen3", "gemma2", "gemma3", "phi3")
HF_ARCH = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
           "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
MODEL_TYPE = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}

SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"


@dataclass(frozen=True)
class Dims:
    """A tiny model's sizes; ``head_dim`` None means dim / heads."""

    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 128
    head_dim: int | None = None


SMALL = {
    "qwen2": Dims(),
    "qwen3": Dims(head_dim=24),
    "gemma2": Dims(head_dim=24),
    "gemma3": Dims(head_dim=24),
    "phi3": Dims(n_kv_heads=4),
}
# K-quants need rows that are multiples of 256; four layers make use_more_bits pick layers 2 and 3.
QUANT = {
    "qwen2": Dims(dim=256, n_layers=4, ffn=512),
    "qwen3": Dims(dim=256, n_layers=4, ffn=512, head_dim=128),
    "gemma2": Dims(dim=256, n_layers=4, ffn=512, head_dim=128),
    "gemma3": Dims(dim=256, n_layers=4, ffn=512, head_dim=128),
    "phi3": Dims(dim=256, n_layers=4, n_kv_heads=4, ffn=512),
}


# ---- llama.cpp's sources and vocab files, from the llama-cpp-python sdist ----------------------------------


def llama_cpp_tree(data_dir: Path) -> Path:
    """The llama.cpp tree of the llama-cpp-python sdist (fetched through pip into ``data_dir/sdists`` when
    it is not there yet) with the files these tests use, extracted once."""
    dest = data_dir / "llama.cpp-0.3.36"
    marker = dest / ".complete"
    if marker.exists():
        return dest
    sdist = data_dir / "sdists" / SDIST
    if not sdist.exists():
        from conftest import VOCAB_REQ, VOCAB_SDIST_SHA256

        sdist = download_pinned_sdist(VOCAB_REQ, VOCAB_SDIST_SHA256, data_dir / "sdists")
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "models/ggml-vocab-qwen2.gguf",
              "models/ggml-vocab-phi-3.gguf")
    with tarfile.open(sdist, "r:gz") as tf:
        for info in tf.getmembers():
            rel = info.name[len(SDIST_ROOT):] if info.name.startswith(SDIST_ROOT) else None
            if rel is None or not info.isfile() or not rel.startswith(wanted):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(info)
            assert src is not None
            with src, open(target, "wb") as out:
                out.write(src.read())
    marker.write_text("ok")
    return dest


def llama_models_dir() -> Path:
    """llama.cpp's ``models/`` folder (vocab files) from the sdist, or a skip (a failure where CI requires
    test data) with the reason."""
    from conftest import _data_dir, _data_lock, _unavailable

    try:
        with _data_lock():
            return llama_cpp_tree(_data_dir()) / "models"
    except (PipxLlamaError, OSError, tarfile.TarError) as err:
        _unavailable("llama.cpp's sources from the llama-cpp-python sdist", err)
        raise


def _vocab_meta(path: Path) -> dict[str, Any]:
    g = open_gguf(path)
    try:
        return dict(g.metadata)
    finally:
        g.close()


# ---- tokenizers --------------------------------------------------------------------------------------------

QWEN_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# Qwen 2.5's added tokens after <|endoftext|> (151643): (text, special)
QWEN25_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN3_ADDED = QWEN25_ADDED + [("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
                              ("</think>", False)]
QWEN_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
    "'<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def _added_entry(tid: int, text: str, special: bool) -> dict[str, Any]:
    return {"id": tid, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def write_qwen_tokenizer(folder: Path, vocab_gguf: Path, arch: str) -> int:
    """Qwen's tokenizer.json / tokenizer_config.json; returns the number of tokens (vocab + added)."""
    meta = _vocab_meta(vocab_gguf)
    tokens = list(meta["tokenizer.ggml.tokens"])[:151643]
    merges = [m.split(" ", 1) for m in meta["tokenizer.ggml.merges"]]
    added = QWEN3_ADDED if arch == "qwen3" else QWEN25_ADDED
    added_json = [_added_entry(151643 + i, t, s) for i, (t, s) in enumerate(added)]
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_json,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": False,
                "add_prefix_space": False,
                "added_tokens_decoder": {
                    str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added_json
                },
                "bos_token": None,
                "chat_template": QWEN_TEMPLATE,
                "clean_up_tokenization_spaces": False,
                "eos_token": "<|im_end|>",
                "errors": "replace",
                "model_max_length": 131072,
                "pad_token": "<|endoftext|>",
                "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": None,
            },
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    return 151643 + len(added)


# Gemma's SentencePiece layout: ids 0..4, then the chat markers, bytes, and merged pieces.
GEMMA_CONTROL = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "[multimodal]",
    "<start_of_turn>",
    "<end_of_turn>",
]
GEMMA_PIECES = [
    "▁t", "he", "in", "▁a", "er", "on", "▁th", "▁the", "ll", "▁w", "or", "▁s", "el", "▁h", "▁he", "▁hel",
    "▁hell", "▁hello", "ld", "▁wor", "▁world", "▁i", "▁is", "lo", "re", "at", "▁▁", "\n", "\n\n",
]
GEMMA_CHARS = ["▁", *"etaoinshrdlcumwfgypbvkjxqz", *"0123456789", *",.!?'"]


def write_gemma_tokenizer(folder: Path) -> int:
    """Gemma-style tokenizer.model (+ tokenizer.json's added tokens, tokenizer_config.json); returns its
    size."""
    tokens = list(GEMMA_CONTROL)
    sp_types = [3, 3, 3, 2, 4, 4, 4, 4]  # control, control, control, unknown, user-defined...
    scores = [0.0] * len(tokens)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    sp_types += [6] * 256
    scores += [0.0] * 256
    for i, piece in enumerate(GEMMA_PIECES + GEMMA_CHARS):
        tokens.append(piece)
        sp_types.append(1)
        scores.append(-float(i) if len(piece) > 1 or piece == "▁" else -1000.0 - i)
    proto = build_model_proto(tokens, np.asarray(scores, np.float32), sp_types, 3, True)
    # trainer ids as Gemma's: pad 0, eos 1, bos 2, unk 3 (a second trainer_spec merges into the first)
    trainer = _field_varint(40, 3) + _field_varint(41, 2) + _field_varint(42, 1) + _field_varint(43, 0)
    (folder / "tokenizer.model").write_bytes(proto + _field_bytes(2, trainer))
    special = {0, 1, 2, 3, 6, 7}
    added = [_added_entry(i, t, i in special) for i, t in enumerate(GEMMA_CONTROL)]
    (folder / "tokenizer.json").write_text(
        json.dumps(
            {
                "version": "1.0",
                "added_tokens": added,
                "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
                "pre_tokenizer": None,
                "post_processor": None,
                "decoder": None,
                "model": {
                    "type": "BPE",
                    "dropout": None,
                    "unk_token": "<unk>",
                    "byte_fallback": True,
                    "fuse_unk": True,
                    "vocab": {t: i for i, t in enumerate(tokens)},
                    "merges": [],
                },
            },
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "bos_token": "<bos>", "chat_template": GEMMA_TEMPLATE, "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
        "sp_model_kwargs": {}, "model_max_length": 1000000000000000019884624838656,
    }, ensure_ascii=False), encoding="utf-8")
    return len(tokens)


# Phi-3's added tokens (id, text, special), as tokenizer.json lists them.
PHI3_ADDED = [
    (0, "<unk>", True),
    (1, "<s>", True),
    (2, "</s>", False),
    (32000, "<|endoftext|>", True),
    (32001, "<|assistant|>", True),
    (32002, "<|placeholder1|>", True),
    (32003, "<|placeholder2|>", True),
    (32004, "<|placeholder3|>", True),
    (32005, "<|placeholder4|>", True),
    (32006, "<|system|>", True),
    (32007, "<|end|>", True),
    (32008, "<|placeholder5|>", True),
    (32009, "<|placeholder6|>", True),
    (32010, "<|user|>", True),
]


def write_phi3_tokenizer(folder: Path, vocab_gguf: Path) -> int:
    """Phi-3's tokenizer.model (LLaMA's pieces), tokenizer.json's added tokens, tokenizer_config.json."""
    meta = _vocab_meta(vocab_gguf)
    tokens = list(meta["tokenizer.ggml.tokens"])[:32000]
    scores = np.asarray(meta["tokenizer.ggml.scores"], np.float32)[:32000].copy()
    types = np.asarray(meta["tokenizer.ggml.token_type"])[:32000].copy()
    types[0], types[1], types[2] = 2, 3, 3  # unknown, control, control: as LLaMA's tokenizer.model has them
    scores[:3] = 0.0
    (folder / "tokenizer.model").write_bytes(llama_tokenizer_model(tokens, scores, types))
    added = [{**_added_entry(i, t, s), "rstrip": t == "</s>" or i >= 32000} for i, t, s in PHI3_ADDED]
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "added_tokens": added, "normalizer": None, "pre_tokenizer": None,
        "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": True, "fuse_unk": True,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []},
    }, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": False,
                "add_eos_token": False,
                "added_tokens_decoder": {
                    str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added
                },
                "bos_token": "<s>",
                "chat_template": meta["tokenizer.chat_template"],
                "clean_up_tokenization_spaces": False,
                "eos_token": "<|endoftext|>",
                "legacy": False,
                "model_max_length": 4096,
                "pad_token": "<|endoftext|>",
                "padding_side": "left",
                "sp_model_kwargs": {},
                "tokenizer_class": "LlamaTokenizer",
                "unk_token": "<unk>",
                "use_default_system_prompt": False,
            },
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    return 32064


# ---- weights and config ------------------------------------------------------------------------------------


def _config(arch: str, d: Dims, n_vocab: int, tied: bool, window: int, pattern: int) -> dict[str, Any]:
    head_dim = d.head_dim or d.dim // d.n_heads
    cfg: dict[str, Any] = {
        "architectures": [HF_ARCH[arch]], "model_type": MODEL_TYPE[arch], "hidden_size": d.dim,
        "intermediate_size": d.ffn, "num_attention_heads": d.n_heads, "num_hidden_layers": d.n_layers,
        "num_key_value_heads": d.n_kv_heads, "vocab_size": n_vocab, "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16", "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
    }
    if arch in ("qwen2", "qwen3"):
        cfg.update(
            {
                "hidden_act": "silu",
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
                "rope_scaling": None,
                "sliding_window": None,
                "use_sliding_window": False,
                "max_window_layers": d.n_layers,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
            }
        )
        if arch == "qwen3":
            cfg.update({"head_dim": head_dim, "attention_bias": False})
    elif arch in ("gemma2", "gemma3"):
        cfg.update(
            {
                "head_dim": head_dim,
                "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": head_dim,
                "rms_norm_eps": 1e-6,
                "sliding_window": window,
                "attention_bias": False,
                "pad_token_id": 0,
                "eos_token_id": 1,
                "bos_token_id": 2,
                "max_position_embeddings": 8192,
            }
        )
        if arch == "gemma2":
            cfg.update({"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "rope_theta": 10000.0,
                        "cache_implementation": "hybrid"})
        else:
            cfg.update({"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
                        "attn_logit_softcapping": None, "final_logit_softcapping": None,
                        "_sliding_window_pattern": pattern,
                        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                        for i in range(d.n_layers)],
                        "max_position_embeddings": 32768})
    elif arch == "phi3":
        rot = int(0.75 * d.dim) // d.n_heads
        rng = np.random.default_rng(99)
        cfg.update(
            {
                "hidden_act": "silu",
                "max_position_embeddings": 131072,
                "original_max_position_embeddings": 256,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "rope_scaling": {
                    "type": "longrope",
                    "long_factor": [round(float(v), 4) for v in 4.0 + rng.random(rot // 2)],
                    "short_factor": [round(float(v), 4) for v in 1.0 + 0.5 * rng.random(rot // 2)],
                },
                "sliding_window": 262144,
                "bos_token_id": 1,
                "eos_token_id": 32000,
                "pad_token_id": 32000,
                "embd_pdrop": 0.0,
                "resid_pdrop": 0.0,
            }
        )
    return cfg


def _weights(arch: str, d: Dims, n_vocab: int, tied: bool, seed: int) -> dict[str, np.ndarray]:
    """float32 weights under Hugging Face's names (rounded to bfloat16 later)."""
    rng = np.random.default_rng(seed)
    hd = d.head_dim or d.dim // d.n_heads
    q_dim, kv_dim = d.n_heads * hd, d.n_kv_heads * hd
    gemma = arch.startswith("gemma")

    def w(*shape: int, std: float | None = None) -> np.ndarray:
        return (rng.standard_normal(shape) * (std if std is not None else shape[-1] ** -0.5)).astype(
            np.float32
        )

    def norm(n: int) -> np.ndarray:  # Gemma stores the offset from 1
        return ((0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(n)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(n_vocab, d.dim, std=1.0 if not gemma else d.dim ** -0.5)}
    for i in range(d.n_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = norm(d.dim)
        if arch == "phi3":
            out[p + "self_attn.qkv_proj.weight"] = w(q_dim + 2 * kv_dim, d.dim)
        else:
            out[p + "self_attn.q_proj.weight"] = w(q_dim, d.dim)
            out[p + "self_attn.k_proj.weight"] = w(kv_dim, d.dim)
            out[p + "self_attn.v_proj.weight"] = w(kv_dim, d.dim)
        if arch == "qwen2":
            out[p + "self_attn.q_proj.bias"] = w(q_dim, std=0.5)
            out[p + "self_attn.k_proj.bias"] = w(kv_dim, std=0.5)
            out[p + "self_attn.v_proj.bias"] = w(kv_dim, std=0.5)
        if arch in ("qwen3", "gemma3"):
            out[p + "self_attn.q_norm.weight"] = (norm(hd) * 2).astype(np.float32)
            out[p + "self_attn.k_norm.weight"] = (norm(hd) * 2).astype(np.float32)
        out[p + "self_attn.o_proj.weight"] = w(d.dim, q_dim)
        out[p + "post_attention_layernorm.weight"] = norm(d.dim)
        if gemma:
            out[p + "pre_feedforward_layernorm.weight"] = norm(d.dim)
            out[p + "post_feedforward_layernorm.weight"] = norm(d.dim)
        if arch == "phi3":
            out[p + "mlp.gate_up_proj.weight"] = w(2 * d.ffn, d.dim)
        else:
            out[p + "mlp.gate_proj.weight"] = w(d.ffn, d.dim)
            out[p + "mlp.up_proj.weight"] = w(d.ffn, d.dim)
        out[p + "mlp.down_proj.weight"] = w(d.dim, d.ffn)
    out["model.norm.weight"] = norm(d.dim)
    if not tied:
        out["lm_head.weight"] = w(n_vocab, d.dim)
    return out


TIED = {"qwen2": True, "qwen3": True, "gemma2": True, "gemma3": True, "phi3": False}


def write_family_folder(folder: Path, arch: str, models: Path, dims: Dims | None = None, *, seed: int = 0,
                        window: int = 5, pattern: int = 2, shards: int = 2, dtype: str = "BF16",
                        layer_types: list[str] | None = None) -> dict[str, np.ndarray]:
    """Write the tiny ``arch`` model as Hugging Face ships it; returns its weights (bfloat16 values, float32).

    ``window`` is the sliding window (Gemma), ``pattern`` Gemma 3's period of sliding and global layers
    (real models: 6, which llama.cpp's converter assumes without writing it) unless ``layer_types`` lists
    each layer's kind. ``dtype``: BF16 (as Hugging Face ships these models), F16 or F32.
    """
    folder.mkdir(parents=True, exist_ok=True)
    d = dims or SMALL[arch]
    if arch in ("qwen2", "qwen3"):
        n_vocab = 151936
        write_qwen_tokenizer(folder, models / "ggml-vocab-qwen2.gguf", arch)
    elif arch in ("gemma2", "gemma3"):
        n_vocab = write_gemma_tokenizer(folder)
    elif arch == "phi3":
        n_vocab = write_phi3_tokenizer(folder, models / "ggml-vocab-phi-3.gguf")
    else:
        raise ValueError(f"no tiny Hugging Face folder for {arch!r}")
    tied = TIED[arch]
    cfg = _config(arch, d, n_vocab, tied, window, pattern)
    if layer_types is not None:
        cfg["layer_types"] = layer_types
    cfg["torch_dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": cfg.get("bos_token_id"),
                                                               "eos_token_id": cfg.get("eos_token_id"),
                                                               "do_sample": True, "temperature": 0.7}))
    exact = {"BF16": lambda v: (bf16(v).astype(np.uint32) << 16).view(np.float32).reshape(v.shape),
             "F16": lambda v: v.astype(np.float16).astype(np.float32), "F32": lambda v: v}[dtype]
    store = {"BF16": bf16, "F16": lambda v: v.astype(np.float16), "F32": lambda v: v}[dtype]
    weights = {k: exact(v) for k, v in _weights(arch, d, n_vocab, tied, seed).items()}
    names = sorted(weights)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = names[s::shards]
        write_safetensors(folder / fname, {n: (dtype, store(weights[n])) for n in part})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return weights


def run_llama_cpp_converter(tree: Path, folder: Path, out: Path, outtype: str = "f16") -> Path:
    """convert_hf_to_gguf.py from ``tree`` on ``folder`` (needs torch, transformers, sentencepiece)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the tree's own gguf-py, not PyPI's
    proc = subprocess.run(
        [
            sys.executable,
            str(tree / "convert_hf_to_gguf.py"),
            str(folder),
            "--outfile",
            str(out),
            "--outtype",
            outtype,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def gguf_differences(ours: Path, theirs: Path) -> list[str]:
    """Everything that differs between two GGUF files: metadata (keys in order, types, values) and tensors
    (names in order, types, shapes, data bytes). Empty when the files say the same."""
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(theirs)
    out = []

    def fields(r: GGUFReader) -> dict[str, tuple[Any, Any]]:
        return {
            k: ([t.name for t in f.types], f.contents())
            for k, f in r.fields.items()
            if not k.startswith("GGUF.")
        }

    fa, fb = fields(a), fields(b)
    if list(fa) != list(fb):
        out.append(f"metadata keys: ours {list(fa)} / llama.cpp {list(fb)}")
    for k in fa.keys() & fb.keys():
        if fa[k] != fb[k]:
            va, vb = (str(fa[k])[:300], str(fb[k])[:300])
            out.append(f"metadata {k}: ours {va} / llama.cpp {vb}")
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    if list(ta) != list(tb):
        out.append(f"tensor names or order: ours {list(ta)} / llama.cpp {list(tb)}")
    for name in ta.keys() & tb.keys():
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            out.append(f"tensor {name}: ours {x.tensor_type.name} {list(x.shape)} / "
                       f"llama.cpp {y.tensor_type.name} {list(y.shape)}")
        elif bytes(x.data.tobytes()) != bytes(y.data.tobytes()):
            out.append(f"tensor {name}: data differs")
    return out
