"""Test helpers for the converters: torch zip checkpoints written without torch, a LLaMA tokenizer.model
rebuilt from llama.cpp's vocab file, Meta- and Hugging Face-format folders, and a numpy LLaMA forward.

``write_torch_zip`` writes what ``torch.save(state_dict, path)`` writes (checked once by hand against
torch 2.13: its files load in torch and torch's files load in our reader): a zip of stored members
``<name>/data.pkl`` (a protocol-2 pickle of an ``OrderedDict`` whose values are
``torch._utils._rebuild_tensor_v2`` calls over persistent-id storages), ``<name>/data/<key>`` (the raw
little-endian elements, 64-byte aligned like torch's), ``.format_version``, ``.storage_alignment``,
``byteorder`` and ``version``. The pickle is emitted opcode by opcode, as torch's pickler emits it.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from pipx_llama.tokenizer.spm import _field_bytes, _field_varint, build_model_proto

STORAGE_CLASS = {"F16": "HalfStorage", "BF16": "BFloat16Storage", "F32": "FloatStorage"}
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4}


@dataclass
class TensorSpec:
    """A tensor to write without holding it: its kind, shape and a source of its raw bytes in order."""

    kind: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[bytes | np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.kind]


def bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even), as uint16 bit patterns."""
    return (
        gguf_quants.quantize(np.asarray(values, np.float32), GGMLQuantizationType.BF16)
        .view(np.uint16)
        .reshape(np.shape(values))
    )


def _spec(value: np.ndarray | TensorSpec | tuple[str, np.ndarray]) -> TensorSpec:
    if isinstance(value, TensorSpec):
        return value
    if isinstance(value, tuple):
        kind, arr = value
    else:
        arr = value
        kind = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}[arr.dtype]
    arr = np.ascontiguousarray(arr)
    return TensorSpec(kind, tuple(arr.shape), lambda: [arr.tobytes()])


class _Pickle:
    """Pickle opcodes, protocol 2, as torch's pickler writes a state dict."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")

    def op(self, code: bytes) -> None:
        self.out += code

    def glob(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def str(self, s: str) -> None:
        data = s.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(data)) + data

    def int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        elif -(2**31) <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)
        else:
            data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data

    def int_tuple(self, values: tuple[int, ...]) -> None:
        if not values:
            self.op(b")")
            return
        self.op(b"(")
        for v in values:
            self.int(v)
        self.op(b"t")


def state_dict_pickle(entries: list[tuple[str, str, str, int, tuple[int, ...]]]) -> bytes:
    """data.pkl for ``(name, kind, storage key, numel, shape)`` entries, each a whole contiguous storage."""
    p = _Pickle()
    p.glob("collections", "OrderedDict")
    p.op(b")R")
    p.op(b"(")
    for name, kind, key, numel, shape in entries:
        p.str(name)
        p.glob("torch._utils", "_rebuild_tensor_v2")
        p.op(b"(")
        p.op(b"(")
        p.str("storage")
        p.glob("torch", STORAGE_CLASS[kind])
        p.str(key)
        p.str("cpu")
        p.int(numel)
        p.op(b"tQ")  # TUPLE, BINPERSID
        p.int(0)
        p.int_tuple(shape)
        strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        p.int_tuple(strides)
        p.op(b"\x89")  # NEWFALSE: requires_grad
        p.glob("collections", "OrderedDict")
        p.op(b")R")  # backward_hooks = OrderedDict()
        p.op(b"tR")
    p.op(b"u.")  # SETITEMS, STOP
    return bytes(p.out)


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int, align: int = 64) -> zipfile.ZipInfo:
    """A stored-member header padded (torch's "FB" extra field) so the member's data starts aligned."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    pos = zf.fp.tell()
    header = 30 + len(name.encode()) + (20 if zip64 else 0) + 4
    pad = (-(pos + header)) % align
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def write_torch_zip(path: str | Path, tensors: Mapping[str, Any], archive: str | None = None,
                    data_pkl: bytes | None = None) -> Path:
    """Write a checkpoint as ``torch.save`` does. Values: float16/float32 arrays, ``("BF16", uint16
    array)`` or ``TensorSpec``. ``data_pkl`` replaces the generated pickle (for malicious-file tests)."""
    path = Path(path)
    archive = archive or path.name.split(".")[0]
    specs = {name: _spec(v) for name, v in tensors.items()}
    entries = [
        (name, s.kind, str(i), math.prod(s.shape), s.shape) for i, (name, s) in enumerate(specs.items())
    ]
    pkl = data_pkl if data_pkl is not None else state_dict_pickle(entries)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        records: list[tuple[str, bytes]] = [
            ("data.pkl", pkl),
            (".format_version", b"1"),
            (".storage_alignment", b"64"),
            ("byteorder", b"little"),
        ]
        for name, data in records:
            zf.writestr(_aligned_info(zf, f"{archive}/{name}", len(data)), data)
        for key, (_, spec) in enumerate(specs.items()):
            info = _aligned_info(zf, f"{archive}/data/{key}", spec.nbytes)
            with zf.open(info, "w", force_zip64=spec.nbytes * 1.05 > zipfile.ZIP64_LIMIT) as w:
                for chunk in spec.chunks():
                    w.write(chunk.tobytes() if isinstance(chunk, np.ndarray) else chunk)
        zf.writestr(_aligned_info(zf, f"{archive}/version", 2), b"3\n")
        zf.writestr(_aligned_info(zf, f"{archive}/.data/serialization_id", 40), b"0" * 40)
    return path


# ---- the LLaMA tokenizer.model, rebuilt from llama.cpp's ggml-vocab-llama-spm.gguf --------------------

def llama_tokenizer_model(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> bytes:
    """ModelProto bytes like Meta's tokenizer.model: BPE, byte fallback, identity normalizer with the
    dummy prefix, ids 0/1/2 for unk/bos/eos. GGUF token types use SentencePiece's numbering."""
    proto = build_model_proto(tokens, np.asarray(scores, np.float32), [int(t) for t in types], 0, True)
    # A second normalizer_spec merges into the first (protobuf semantics): LLaMA's adds the dummy prefix.
    normalizer = (
        _field_bytes(1, b"identity") + _field_varint(3, 1) + _field_varint(4, 0) + _field_varint(5, 1)
    )
    return proto + _field_bytes(3, normalizer)


# ---- model folders -------------------------------------------------------------------------------------

def meta_ffn(dim: int, multiple_of: int) -> int:
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def random_meta_shards(rng: np.random.Generator, n_vocab: int, dim: int, n_layers: int, n_heads: int,
                       n_shards: int, multiple_of: int = 32, std: float = 0.08,
                       n_kv_heads: int | None = None) -> list[dict[str, np.ndarray]]:
    """Model-parallel shards of a random LLaMA: each shard's slice of every weight, float16."""
    n_ff = meta_ffn(dim, multiple_of)
    hd = dim // n_heads
    kv_dim = (n_kv_heads or n_heads) * hd

    def w(*shape: int, scale: float = std) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float16)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float16)

    shards: list[dict[str, np.ndarray]] = [{} for _ in range(n_shards)]
    full = {
        "norm.weight": norm(),
        "tok_embeddings.weight": w(n_vocab, dim, scale=1.0),
        "output.weight": w(n_vocab, dim),
    }
    for i in range(n_layers):
        p = f"layers.{i}."
        full.update({
            p + "attention.wq.weight": w(dim, dim), p + "attention.wk.weight": w(kv_dim, dim),
            p + "attention.wv.weight": w(kv_dim, dim), p + "attention.wo.weight": w(dim, dim),
            p + "feed_forward.w1.weight": w(n_ff, dim), p + "feed_forward.w2.weight": w(dim, n_ff),
            p + "feed_forward.w3.weight": w(n_ff, dim),
            p + "attention_norm.weight": norm(), p + "ffn_norm.weight": norm(),
        })
    freqs = (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    for name, arr in full.items():
        if arr.ndim == 1:
            parts = [arr] * n_shards
        elif name == "tok_embeddings.weight" or name.endswith((".wo.weight", ".w2.weight")):
            parts = np.split(arr, n_shards, axis=1)
        else:
            parts = np.split(arr, n_shards, axis=0)
        for s, part in zip(shards, parts):
            s[name] = np.ascontiguousarray(part)
    for s in shards:
        s["rope.freqs"] = freqs
    return shards


def write_meta_folder(folder: Path, shards: list[dict[str, np.ndarray]], params: dict[str, Any],
                      tokenizer_model: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        write_torch_zip(folder / f"consolidated.{i:02d}.pth", shard)
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    return folder


def write_safetensors(path: Path, tensors: Mapping[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file of ``name -> (dtype name, array)``, as the safetensors library lays it out."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, arr) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


# ---- a plain numpy LLaMA over Meta's sharded weights -------------------------------------------------------

def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_complex(x: np.ndarray, theta: float) -> np.ndarray:
    """Meta's apply_rotary_emb: consecutive pairs as complex numbers times e^(i*pos*freq)."""
    T, H, D = x.shape
    freqs = 1.0 / (theta ** (np.arange(0, D, 2, dtype=np.float64)[: D // 2] / D))
    angles = np.outer(np.arange(T), freqs)
    rot = np.exp(1j * angles)[:, None, :]
    xc = x.astype(np.float64).reshape(T, H, D // 2, 2)
    z = (xc[..., 0] + 1j * xc[..., 1]) * rot
    return np.stack([z.real, z.imag], axis=-1).reshape(T, H, D).astype(np.float32)


def meta_forward(shards: list[dict[str, np.ndarray]], ids: list[int], n_heads: int, n_layers: int,
                 norm_eps: float, theta: float = 10000.0, kv_f16: bool = True,
                 n_kv_heads: int | None = None) -> np.ndarray:
    """Logits [T, vocab] of Meta's model-parallel LLaMA, computed shard by shard (never merged), in f32.

    ``kv_f16`` rounds as llama.cpp's float16 KV cache does (and our engine): keys and values are stored
    as float16, and the queries and softmax probabilities are rounded to float16 for their dot products.
    """
    half = (lambda a: a.astype(np.float16).astype(np.float32)) if kv_f16 else (lambda a: a)
    f = {k: v for k, v in shards[0].items()}
    f32 = [{k: v.astype(np.float32) for k, v in s.items()} for s in shards]
    x = np.concatenate([s["tok_embeddings.weight"][ids] for s in f32], axis=1)
    T, dim = x.shape
    hd = dim // n_heads
    group = n_heads // (n_kv_heads or n_heads)
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    for i in range(n_layers):
        p = f"layers.{i}."
        h = _rms(x, f[p + "attention_norm.weight"].astype(np.float32), norm_eps)
        attn_out = np.zeros_like(x)
        for s in f32:
            q = (h @ s[p + "attention.wq.weight"].T).reshape(T, -1, hd)
            k = (h @ s[p + "attention.wk.weight"].T).reshape(T, -1, hd)
            v = (h @ s[p + "attention.wv.weight"].T).reshape(T, -1, hd)
            q, k = _rope_complex(q, theta), _rope_complex(k, theta)
            q, k, v = half(q), np.repeat(half(k), group, axis=1), np.repeat(half(v), group, axis=1)
            scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", half(scores), v).reshape(T, -1)
            attn_out += o @ s[p + "attention.wo.weight"].T
        x = x + attn_out
        h = _rms(x, f[p + "ffn_norm.weight"].astype(np.float32), norm_eps)
        ffn = np.zeros_like(x)
        for s in f32:
            a = h @ s[p + "feed_forward.w1.weight"].T
            b = h @ s[p + "feed_forward.w3.weight"].T
            ffn += (a / (1.0 + np.exp(-a)) * b) @ s[p + "feed_forward.w2.weight"].T
        x = x + ffn
    h = _rms(x, f["norm.weight"].astype(np.float32), norm_eps)
    return np.concatenate([h @ s["output.weight"].T for s in f32], axis=1)


# ---- Hugging Face tokenizer.json, rebuilt from a GGUF vocabulary -------------------------------------------

SMOLLM_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
]}
LLAMA3_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {
                "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
                "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
BYTELEVEL_POST = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}


def llama3_post_processor(bos: str, bos_id: int) -> dict:
    return {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}},
    ]}


def tokenizer_json_from_gguf(meta: Mapping[str, Any], pre_tokenizer: dict, post_processor: dict | None,
                             ignore_merges: bool = False, merges_as_pairs: bool = True) -> dict:
    """A tokenizer.json with the GGUF's tokens and merges; CONTROL tokens become special added tokens."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    merges = list(meta["tokenizer.ggml.merges"])
    model: dict[str, Any] = {
        "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
        "vocab": {t: i for i, t in enumerate(tokens)},
        "merges": [m.split(" ", 1) for m in merges] if merges_as_pairs else merges,
    }
    if ignore_merges:
        model["ignore_merges"] = True
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(tokens)
            if types[i] == 3
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": model,
    }


def read_vocab_cases(vocab_dir: Path, name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's ``.inp``/``.out`` test pairs (test-tokenizer-0's format)."""
    raw = (vocab_dir / (name + ".inp")).read_bytes().decode("utf-8")
    inputs = raw.split("\n__ggml_vocab_test__\n")
    if inputs and inputs[-1] == "":
        inputs.pop()
    outputs = (vocab_dir / (name + ".out")).read_bytes().decode("utf-8").splitlines()
    assert len(inputs) == len(outputs)
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outputs)]


# ---- the real SmolLM2 as a Hugging Face folder -------------------------------------------------------------

HF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _dequantized(g, name: str) -> np.ndarray:
    ti = g.tensors[name]
    rows = int(np.prod(ti.shape[1:]))
    raw = np.asarray(g.tensor_bytes(name)).reshape(rows, -1)
    return gguf_quants.dequantize(raw, ti.qtype).reshape(tuple(reversed(ti.shape)))


def write_smollm2_hf_folder(folder: Path, gguf_path: Path) -> dict[str, np.ndarray]:
    """SmolLM2 as Hugging Face ships it, rebuilt from its GGUF: dequantized weights in bf16 with q/k permuted
    back, two safetensors shards, config.json, tokenizer.json / tokenizer_config.json from its vocabulary,
    generation_config.json. Returns what each GGUF tensor of a conversion must hold, as float32."""
    from pipx_llama.convert.hf import hf_permute
    from pipx_llama.formats.gguf import open_gguf

    folder.mkdir(parents=True)
    g = open_gguf(gguf_path)
    md = g.metadata
    n_head, n_kv = md["llama.attention.head_count"], md["llama.attention.head_count_kv"]
    expected: dict[str, np.ndarray] = {}  # GGUF name -> what the converted file must hold (as float32)
    hf: dict[str, tuple[str, np.ndarray]] = {}
    for name in g.tensors:
        w = bf16(_dequantized(g, name))
        expected[name] = (w.astype(np.uint32) << 16).view(np.float32)
        if name == "token_embd.weight":
            hf_name = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf_name = "model.norm.weight"
        else:
            _, i, part, _ = name.split(".")
            hf_name = f"model.layers.{i}.{HF_NAMES[part]}.weight"
            w = hf_permute(w, n_head) if part == "attn_q" else hf_permute(w, n_kv) if part == "attn_k" else w
        hf[hf_name] = ("BF16", w)
    names = sorted(hf)
    weight_map = {}
    for s, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        write_safetensors(folder / fname, {n: hf[n] for n in part})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": md["llama.embedding_length"],
                "intermediate_size": md["llama.feed_forward_length"],
                "num_attention_heads": n_head,
                "num_key_value_heads": n_kv,
                "num_hidden_layers": md["llama.block_count"],
                "max_position_embeddings": md["llama.context_length"],
                "rms_norm_eps": 1e-05,
                "rope_theta": md["llama.rope.freq_base"],
                "tie_word_embeddings": True,
                "vocab_size": md["llama.vocab_size"],
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 2,
                "torch_dtype": "bfloat16",
            }
        )
    )
    tj = tokenizer_json_from_gguf(md, SMOLLM_PRE_TOKENIZER, BYTELEVEL_POST)
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "chat_template": md["tokenizer.chat_template"],
                "model_max_length": 8192,
                "tokenizer_class": "GPT2Tokenizer",
            }
        )
    )
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                               "temperature": 0.2, "top_p": 0.9}))
    g.close()
    return expected
