"""Hugging Face folders (config.json + safetensors) converted to GGUF.

A small random model checks the mechanics exactly (Q/K un-permutation with grouped KV heads, shards,
dtypes, tied and untied output); the real SmolLM2, turned back into a Hugging Face folder, checks the
whole path against the GGUF llama.cpp made of it.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import (
    bf16,
    llama_tokenizer_model,
    meta_forward,
    random_meta_shards,
    write_safetensors,
    write_smollm2_hf_folder,
)
from gguf import GGMLQuantizationType as QT
from greedy import NEAR_TIE

from pipx_llama.convert import convert
from pipx_llama.convert.hf import (
    find_weights,
    hf_permute,
    llama3_rope_factors,
    permute,
    read_hf_model,
    read_safetensors_header,
)
from pipx_llama.engine.model import load_model
from pipx_llama.errors import ModelFileError, UnsupportedModelError
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.quant.file import quantize_model

DIM, N_LAYERS, N_HEADS, N_KV, N_VOCAB = 64, 2, 8, 2, 32000
IDS = [1, 450, 4996, 17354, 1701, 1134, 29889]
HF_LAYER = {
    "attention_norm.weight": "input_layernorm.weight", "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


def _rope_consecutive(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """llama.cpp / Meta: rotate pairs (x[2i], x[2i+1]) of each head."""
    d = x.shape[1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    x0, x1 = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
    out[:, 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
    return out


def _rope_half(x: np.ndarray, pos: int, theta: float = 10000.0) -> np.ndarray:
    """Hugging Face's rotate_half: rotate pairs (x[i], x[i + d/2])."""
    d = x.shape[1]
    ang = np.tile(pos * theta ** (-np.arange(0, d, 2) / d), 2)
    rot = np.concatenate([-x[:, d // 2:], x[:, : d // 2]], axis=1)
    return x * np.cos(ang) + rot * np.sin(ang)


@pytest.mark.parametrize("heads", [1, 3, 8])
def test_permute_undoes_hugging_faces_rotary_layout(heads):
    rng = np.random.default_rng(heads)
    hd = 16
    w = rng.standard_normal((heads * hd, 24))
    np.testing.assert_array_equal(permute(hf_permute(w, heads), heads), w)
    x = rng.standard_normal(24)
    # HF's rotate_half rope on HF's rows gives, row for row, what llama.cpp's rope gives on the un-
    # permuted rows.
    hf = _rope_half((hf_permute(w, heads) @ x).reshape(heads, hd), pos=5)
    ours = _rope_consecutive((w @ x).reshape(heads, hd), pos=5)
    np.testing.assert_allclose(permute(hf.reshape(-1, 1), heads).reshape(heads, hd), ours, atol=1e-12)


def test_safetensors_header_checks(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_safetensors(tmp_path / "ok.safetensors", {"a": ("F32", a), "b": ("BF16", bf16(a))})
    t = read_safetensors_header(tmp_path / "ok.safetensors")
    np.testing.assert_array_equal(t["a"].read(), a)
    assert t["b"].kind == "BF16" and t["b"].shape == (2, 3)
    write_safetensors(tmp_path / "int.safetensors", {"q": ("I8", np.zeros(4, np.int8))})
    with pytest.raises(UnsupportedModelError, match="I8"):
        read_safetensors_header(tmp_path / "int.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(ModelFileError, match="truncated"):
        read_safetensors_header(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelFileError, match="header size"):
        read_safetensors_header(tmp_path / "junk.safetensors")


@pytest.fixture(scope="module")
def tokenizer_model(vocab_dir) -> bytes:
    g = open_gguf(vocab_dir / "ggml-vocab-llama-spm.gguf")
    m = g.metadata
    try:
        return llama_tokenizer_model(m["tokenizer.ggml.tokens"], m["tokenizer.ggml.scores"],
                                     m["tokenizer.ggml.token_type"])
    finally:
        g.close()


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    """One shard holding the whole random model, in Meta's names and layout (no permutation)."""
    return random_meta_shards(np.random.default_rng(3), N_VOCAB, DIM, N_LAYERS, N_HEADS, 1, n_kv_heads=N_KV)[
        0
    ]


def write_hf_folder(folder: Path, weights: dict[str, np.ndarray], tokenizer_model: bytes, dtype: str = "F16",
                    tied: bool = False, shards: int = 2, **config) -> Path:
    """The model as Hugging Face stores it: HF names, q/k rows permuted, safetensors (sharded) + config."""
    folder.mkdir(parents=True, exist_ok=True)
    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": weights["tok_embeddings.weight"],
                                 "model.norm.weight": weights["norm.weight"]}
    if not tied:
        hf["lm_head.weight"] = weights["output.weight"]
    for name, w in weights.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest == "attention.wq.weight":
                w = hf_permute(w, N_HEADS)
            elif rest == "attention.wk.weight":
                w = hf_permute(w, N_KV)
            hf[f"model.layers.{i}.{HF_LAYER[rest]}"] = w
    conv = {"F16": lambda a: a.astype(np.float16), "F32": lambda a: a.astype(np.float32),
            "BF16": lambda a: bf16(a.astype(np.float32))}[dtype]
    names = sorted(hf)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = names[s::shards]
        write_safetensors(folder / fname, {n: (dtype, conv(hf[n])) for n in part})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": DIM,
        "intermediate_size": weights["layers.0.feed_forward.w1.weight"].shape[0],
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV,
        "num_hidden_layers": N_LAYERS,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "vocab_size": N_VOCAB,
        "tie_word_embeddings": tied,
        **config,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False,
                                                              "bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def test_small_model_runs_as_the_reference(tmp_path, weights, tokenizer_model):
    src = write_hf_folder(tmp_path / "hf", weights, tokenizer_model, dtype="F16")
    r = convert(src, tmp_path / "m.gguf", "f32")
    assert r.source_format == "hf"
    g = open_gguf(r.path)
    for meta_name, hf_name in (("layers.1.attention.wq.weight", "blk.1.attn_q.weight"),
                               ("layers.1.attention.wk.weight", "blk.1.attn_k.weight")):
        got = np.asarray(g.tensor_bytes(hf_name)).view(np.float32).reshape(weights[meta_name].shape)
        np.testing.assert_array_equal(got, weights[meta_name].astype(np.float32))
    assert g.metadata["llama.attention.head_count_kv"] == N_KV
    assert g.metadata["tokenizer.ggml.add_bos_token"] is True
    g.close()
    m = load_model(r.path, threads=2)
    try:
        got = m.new_context(64).eval(IDS, all_logits=True)
    finally:
        m.close()
    want = meta_forward([weights], IDS, N_HEADS, N_LAYERS, 1e-6, n_kv_heads=N_KV)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_source_dtypes(tmp_path, weights, tokenizer_model, dtype):
    src = write_hf_folder(tmp_path / "hf", weights, tokenizer_model, dtype=dtype, shards=1)
    g = open_gguf(convert(src, tmp_path / "m.gguf", "f16").path)
    w = weights["layers.0.feed_forward.w2.weight"].astype(np.float32)
    if dtype == "BF16":
        w = (bf16(w).astype(np.uint32) << 16).view(np.float32)
    got = np.asarray(g.tensor_bytes("blk.0.ffn_down.weight")).view(np.float16).reshape(w.shape)
    np.testing.assert_array_equal(got, w.astype(np.float16))
    assert g.tensors["blk.0.ffn_norm.weight"].qtype == QT.F32
    g.close()


def test_tied_embeddings_write_no_output_tensor(tmp_path, weights, tokenizer_model):
    src = write_hf_folder(tmp_path / "hf", weights, tokenizer_model, tied=True)
    g = open_gguf(convert(src, tmp_path / "m.gguf", "f16").path)
    assert "output.weight" not in g.tensors and "token_embd.weight" in g.tensors
    g.close()
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(ModelFileError, match="lm_head.weight is missing"):
        convert(src, tmp_path / "m2.gguf", "f16")


@pytest.mark.parametrize("change, error", [
    ({"architectures": ["FalconForCausalLM"]}, "architecture"),
    ({"attention_bias": True}, "biases"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"head_dim": 32}, "head_dim"),
])
def test_unsupported_configs(tmp_path, weights, tokenizer_model, change, error):
    src = write_hf_folder(tmp_path / "hf", weights, tokenizer_model, **change)
    with pytest.raises(UnsupportedModelError, match=error):
        convert(src, tmp_path / "m.gguf", "f16")


def test_linear_rope_scaling_is_written(tmp_path, weights, tokenizer_model):
    src = write_hf_folder(
        tmp_path / "hf",
        weights,
        tokenizer_model,
        rope_scaling={"type": "linear", "factor": 2.0},
        rope_theta=500000.0,
    )
    g = open_gguf(convert(src, tmp_path / "m.gguf", "f16").path)
    assert g.metadata["llama.rope.scaling.type"] == "linear"
    assert g.metadata["llama.rope.scaling.factor"] == 2.0
    assert g.metadata["llama.rope.freq_base"] == 500000.0
    g.close()


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, weights, tokenizer_model):
    """Llama 3.1's rope_scaling is written as llama.cpp writes it: a rope_freqs.weight tensor, no scaling
    type."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    src = write_hf_folder(tmp_path / "hf", weights, tokenizer_model, rope_scaling=scaling, rope_theta=10000.0)
    out = convert(src, tmp_path / "m.gguf", "f16").path
    g = open_gguf(out)
    try:
        assert "llama.rope.scaling.type" not in g.metadata
        info = g.tensors["rope_freqs.weight"]
        got = g.tensor_bytes("rope_freqs.weight").view(np.float32).copy()
    finally:
        g.close()
    head_dim = len(got) * 2
    assert info.qtype.name == "F32" and info.shape == (head_dim // 2,)
    # llama.cpp's convert_hf_to_gguf formula, in float64
    expected = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * 10000.0 ** (i / head_dim)
        if wavelen < 64 / 4.0:
            expected.append(1.0)
        elif wavelen > 64 / 1.0:
            expected.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 8.0 + smooth))
    np.testing.assert_allclose(got, expected, rtol=2e-6)
    assert got[0] == 1.0 and got[-1] == 8.0 and len(set(got.tolist())) > 2  # all three regimes occur
    # quantizing keeps the factors (1-D tensors stay F32)
    quantize_model(out, tmp_path / "q.gguf", "Q8_0", threads=1)
    for path in (out, tmp_path / "q.gguf"):
        m = load_model(path, threads=1)
        try:
            assert m.hparams.rope_factors == tuple(float(f) for f in got)
        finally:
            m.close()


def test_missing_shard_and_wrong_shapes(tmp_path, weights, tokenizer_model):
    src = write_hf_folder(tmp_path / "hf", weights, tokenizer_model)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(ModelFileError, match="ffn_gate.weight has shape"):
        convert(src, tmp_path / "m.gguf", "f16")
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFileError, match="missing"):
        convert(src, tmp_path / "m.gguf", "f16")


# ---- the real SmolLM2, as a Hugging Face folder ------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory, smollm2_path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    return folder, write_smollm2_hf_folder(folder, smollm2_path)


@pytest.mark.slow
@pytest.mark.fidelity
def test_smollm2_from_hugging_face_layout(tmp_path, smollm2_hf, smollm2_path, golden):
    src, expected = smollm2_hf
    t0 = time.monotonic()
    r = convert(src, tmp_path / "smollm2.f16.gguf", "f16")
    seconds = time.monotonic() - t0

    new, orig = open_gguf(r.path), open_gguf(smollm2_path)
    # every hyper-parameter and tokenizer key equals what llama.cpp's converter wrote for the real model
    for k, want in orig.metadata.items():
        if k.startswith(("llama.", "tokenizer.")):
            got = new.metadata.get(k)
            assert (np.array_equal(got, want) if isinstance(want, np.ndarray) else got == want), k
    assert new.metadata["general.sampling.temp"] == pytest.approx(0.2)  # from generation_config.json
    # tensor for tensor: the un-permuted weights, rounded to f16 (norms f32)
    assert set(new.tensors) == set(expected) and "output.weight" not in new.tensors
    for name, want in expected.items():
        ti = new.tensors[name]
        data = np.asarray(new.tensor_bytes(name))
        got = data.view(np.float32 if ti.qtype == QT.F32 else np.float16).reshape(want.shape)
        np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=name)
    new.close()
    orig.close()

    a, b = load_model(smollm2_path, threads=2), load_model(r.path, threads=2)
    try:
        ca, cb = a.new_context(256), b.new_context(256)
        agree = positions = 0
        d_orig, d_golden = [], []
        for case in golden["cases"]:
            assert b.tokenizer.encode(case["prompt"]) == case["prompt_ids"], case["prompt"]
            n = len(case["prompt_ids"]) + len(case["top_logits"]) - 1
            ids = (case["prompt_ids"] + case["greedy_ids"])[:n]
            ca.reset()
            cb.reset()
            la, lb = ca.eval(ids, all_logits=True), cb.eval(ids, all_logits=True)
            first = len(case["prompt_ids"]) - 1
            for i, (top, margin) in enumerate(zip(case["top_logits"], case["top2_margins"])):
                ra, rb = la[first + i], lb[first + i]
                positions += 1
                agree += int(np.argmax(ra) == np.argmax(rb))
                if margin >= NEAR_TIE:  # past a near-tie the side taken is the CPU's arithmetic's
                    assert np.argmax(rb) == top[0][0]
                d_orig.extend(abs(float(ra[t]) - float(rb[t])) for t, _ in top)
                d_golden.extend(abs(float(rb[t]) - v) for t, v in top)
    finally:
        a.close()
        b.close()
    print(
        f"\nconverted {r.n_tensors} tensors ({r.nbytes / 2**20:.0f} MiB) in {seconds:.2f}s; top-1 agreement "
        f"with the "
        f"Q4_1 original {agree}/{positions}; median |dlogit| vs original {np.median(d_orig):.3f} "
        f"(max {max(d_orig):.3f}), vs llama.cpp's logits {np.median(d_golden):.3f}"
    )
    # The converted model carries the Q4_1 weights exactly (up to bf16/f16 rounding); what differs is the
    # Q4_1 engine path's 8-bit activation quantization, so the logits stay within that noise.
    assert agree >= 0.9 * positions
    assert np.median(d_orig) <= 0.25
    assert np.median(d_golden) <= 0.25


GOOD_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
               "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2,
               "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "vocab_size": 32000}


@pytest.mark.parametrize("change, field, expect", [
    ({"num_hidden_layers": 1e8}, "num_hidden_layers", "must be an integer from 1 to 1024, got 100000000.0"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers", "got '2'"),
    ({"hidden_size": float("nan")}, "hidden_size", "got nan"),
    ({"hidden_size": 1e300}, "hidden_size", "must be an integer"),
    ({"num_attention_heads": 0}, "num_attention_heads", "from 1 to"),
    ({"num_key_value_heads": -1}, "num_key_value_heads", "from 1 to"),
    ({"intermediate_size": [128]}, "intermediate_size", "got [128]"),
    ({"max_position_embeddings": 1e300}, "max_position_embeddings", "must be an integer"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps", "must be a finite number above 0 and below 1, got nan"),
    ({"rms_norm_eps": 0}, "rms_norm_eps", "got 0"),
    ({"rope_theta": -10000.0}, "rope_theta", "must be a finite number above 0, got -10000.0"),
    ({"rope_theta": float("inf")}, "rope_theta", "got inf"),
    ({"rope_theta": "10000"}, "rope_theta", "got '10000'"),
    ({"vocab_size": 10**12}, "vocab_size", "must be an integer from 1 to"),
    ({"head_dim": 1e9}, "head_dim", "must be an integer from 1 to 4096"),
    ({"rope_scaling": {"type": "linear", "factor": float("nan")}}, "factor", "got nan"),
    ({"rope_scaling": {"type": "linear", "factor": "2"}}, "factor", "got '2'"),
    ({"rope_scaling": [1, 2]}, "rope_scaling", "must be an object, not list"),
    ({"text_config": [1]}, "text_config", "must be an object"),
])
def test_hostile_config_json_is_refused_before_any_allocation(tmp_path, monkeypatch, change, field, expect):
    monkeypatch.setattr(
        "pipx_llama.convert.hf.find_weights", lambda src: pytest.fail("the weights were opened")
    )
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**GOOD_CONFIG, **change}))
    with pytest.raises(ModelFileError) as exc:
        read_hf_model(src)
    msg = exc.value.message
    assert msg.startswith(str(src / "config.json")) and f" {field} " in msg + " " and expect in msg, msg


@pytest.mark.parametrize("scaling, expect", [
    ({"rope_type": "llama3", "factor": float("nan")}, "factor must be a finite number above 0, got nan"),
    ({"rope_type": "llama3", "low_freq_factor": -1.0}, "low_freq_factor must be a finite number above 0"),
    ({"rope_type": "llama3", "original_max_position_embeddings": float("inf")}, "got inf"),
    ({"rope_type": "llama3", "high_freq_factor": 1.0, "low_freq_factor": 4.0}, "must exceed low_freq_factor"),
])
def test_hostile_llama3_rope_scaling_is_refused(scaling, expect):
    with pytest.raises(ModelFileError, match=re.escape(expect)):
        llama3_rope_factors(10000.0, 64, scaling, "config.json")


def test_hostile_safetensors_index_and_header(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    for weight_map in ([], {"a": ["x"]}, {"a": "../../etc/model.safetensors"}, {"a": 5}):
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ModelFileError, match="weight_map must map tensor names to shard file names"):
            find_weights(src)
    deep = b"[" * 100_000 + b"]" * 100_000
    (src / "x.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep)
    with pytest.raises(ModelFileError, match="header is not valid JSON"):
        read_safetensors_header(src / "x.safetensors")
