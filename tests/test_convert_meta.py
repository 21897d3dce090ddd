"""Meta-format checkpoints (two consolidated.NN.pth shards written without torch) converted to GGUF.

The tokenizer.model is llama.cpp's LLaMA vocabulary (ggml-vocab-llama-spm.gguf) turned back into a
SentencePiece model; the weights are small and random. The converted model must compute what Meta's
model-parallel code computes over the unmerged shards, and its vocabulary must be llama.cpp's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import (
    bf16,
    llama_tokenizer_model,
    meta_ffn,
    meta_forward,
    random_meta_shards,
    write_meta_folder,
    write_torch_zip,
)
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants

from pipx_llama.convert import convert
from pipx_llama.convert.meta import _n_ctx, read_meta_checkpoint
from pipx_llama.convert.torchzip import ConvertSecurityError
from pipx_llama.engine.model import load_model
from pipx_llama.errors import ModelFileError
from pipx_llama.formats.gguf import open_gguf

DIM, N_LAYERS, N_HEADS, N_SHARDS, N_VOCAB = 64, 2, 4, 2, 32000
PARAMS = {
    "dim": DIM,
    "multiple_of": 32,
    "n_heads": N_HEADS,
    "n_layers": N_LAYERS,
    "norm_eps": 1e-06,
    "vocab_size": -1,
}
IDS = [1, 450, 4996, 17354, 1701, 1134, 29889, 13, 3492, 31999]


@pytest.fixture(scope="module")
def spm_vocab_meta(vocab_dir) -> dict:
    g = open_gguf(vocab_dir / "ggml-vocab-llama-spm.gguf")
    try:
        return dict(g.metadata)
    finally:
        g.close()


@pytest.fixture(scope="module")
def tokenizer_model(spm_vocab_meta) -> bytes:
    m = spm_vocab_meta
    return llama_tokenizer_model(
        m["tokenizer.ggml.tokens"], m["tokenizer.ggml.scores"], m["tokenizer.ggml.token_type"]
    )


@pytest.fixture(scope="module")
def shards() -> list[dict[str, np.ndarray]]:
    return random_meta_shards(np.random.default_rng(7), N_VOCAB, DIM, N_LAYERS, N_HEADS, N_SHARDS)


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, shards, tokenizer_model) -> Path:
    return write_meta_folder(tmp_path_factory.mktemp("meta") / "tiny", shards, PARAMS, tokenizer_model)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, meta_dir) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {t: convert(meta_dir, out / f"tiny.{t}.gguf", t).path for t in ("f32", "f16", "bf16", "q8_0")}


def merged(shards: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    parts = [s[name] for s in shards]
    if parts[0].ndim == 1:
        return parts[0]
    axis = 1 if name == "tok_embeddings.weight" or name.endswith((".wo.weight", ".w2.weight")) else 0
    return np.concatenate(parts, axis=axis)


GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    **{
        f"layers.{i}.{k}": f"blk.{i}.{v}"
        for i in range(N_LAYERS)
        for k, v in {
            "attention.wq.weight": "attn_q.weight",
            "attention.wk.weight": "attn_k.weight",
            "attention.wv.weight": "attn_v.weight",
            "attention.wo.weight": "attn_output.weight",
            "feed_forward.w1.weight": "ffn_gate.weight",
            "feed_forward.w2.weight": "ffn_down.weight",
            "feed_forward.w3.weight": "ffn_up.weight",
            "attention_norm.weight": "attn_norm.weight",
            "ffn_norm.weight": "ffn_norm.weight",
        }.items()
    },
}


def test_engine_equals_numpy_forward_over_unmerged_shards(converted, shards):
    m = load_model(converted["f32"], threads=2)
    try:
        got = m.new_context(64).eval(IDS, all_logits=True)
    finally:
        m.close()
    want = meta_forward(shards, IDS, N_HEADS, N_LAYERS, PARAMS["norm_eps"])
    assert got.shape == (len(IDS), N_VOCAB)
    err = np.abs(got - want).max()
    print(f"\nmax |logit difference| {err:.2e} (logits up to {np.abs(want).max():.2f})")
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_q8_0_output_runs_close_to_the_reference(converted, shards):
    m = load_model(converted["q8_0"], threads=2)
    try:
        got = m.new_context(64).eval(IDS, all_logits=True)
    finally:
        m.close()
    want = meta_forward(shards, IDS, N_HEADS, N_LAYERS, PARAMS["norm_eps"])
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_vocabulary_is_llama_cpps_token_for_token(converted, spm_vocab_meta):
    g = open_gguf(converted["f16"])
    keys = [k for k in spm_vocab_meta if k.startswith("tokenizer.")]
    assert set(keys) >= {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}
    for k in keys:
        want, got = spm_vocab_meta[k], g.metadata.get(k)
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype, k
            np.testing.assert_array_equal(got, want, err_msg=k)
        else:
            assert got == want, k
    assert sorted(k for k in g.metadata if k.startswith("tokenizer.")) == sorted(keys)
    g.close()


def test_the_rebuilt_tokenizer_model_tokenizes_like_llama(converted):
    m = load_model(converted["f16"], threads=1)
    try:
        assert m.tokenizer.encode("Hello world") == [1, 15043, 3186]
    finally:
        m.close()


def test_hyperparameters(converted):
    g = open_gguf(converted["f16"])
    md = g.metadata
    assert md["general.architecture"] == "llama"
    assert md["general.name"] == "Tiny"  # gguf-py's name heuristics, as in llama.cpp
    assert (md["llama.block_count"], md["llama.embedding_length"], md["llama.feed_forward_length"]) == (
        N_LAYERS, DIM, meta_ffn(DIM, 32))
    assert (md["llama.attention.head_count"], md["llama.attention.head_count_kv"]) == (N_HEADS, N_HEADS)
    assert md["llama.context_length"] == 2048  # norm_eps 1e-6: LLaMA 1
    assert md["llama.rope.dimension_count"] == DIM // N_HEADS
    assert md["llama.vocab_size"] == N_VOCAB  # params.json says -1: taken from the tokenizer
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert "llama.rope.freq_base" not in md
    assert md["general.file_type"] == 1
    assert "rope_freqs.weight" not in g.tensors and "rope.freqs" not in g.tensors
    g.close()


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_tensors_are_the_merged_shards(converted, shards, outtype):
    g = open_gguf(converted[outtype])
    assert set(g.tensors) == set(GGUF_NAMES.values())
    for meta_name, name in GGUF_NAMES.items():
        ti = g.tensors[name]
        full = merged(shards, meta_name)
        assert tuple(reversed(ti.shape)) == full.shape, name
        data = np.asarray(g.tensor_bytes(name))
        f32 = full.astype(np.float32)
        if full.ndim == 1 or outtype == "f32":
            assert ti.qtype == QT.F32
            np.testing.assert_array_equal(data.view(np.float32).reshape(full.shape), f32, err_msg=name)
        elif outtype == "f16":
            assert ti.qtype == QT.F16
            np.testing.assert_array_equal(data.view(np.float16).reshape(full.shape), full, err_msg=name)
        elif outtype == "bf16":
            assert ti.qtype == QT.BF16
            np.testing.assert_array_equal(data.view(np.uint16).reshape(full.shape), bf16(f32), err_msg=name)
        else:
            assert ti.qtype == QT.Q8_0
            want = gguf_quants.quantize(f32, QT.Q8_0)
            np.testing.assert_array_equal(data.reshape(want.shape), want, err_msg=name)
    g.close()


def test_bf16_checkpoints(tmp_path, shards, tokenizer_model):
    bf_shards = [{k: ("BF16", bf16(v.astype(np.float32))) for k, v in s.items()} for s in shards]
    folder = tmp_path / "bf"
    folder.mkdir()
    for i, s in enumerate(bf_shards):
        write_torch_zip(folder / f"consolidated.{i:02d}.pth", s)
    (folder / "params.json").write_text(json.dumps(PARAMS))
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    out = convert(folder, tmp_path / "bf.gguf", "f32").path
    g = open_gguf(out)
    w = np.asarray(g.tensor_bytes("blk.1.ffn_down.weight")).view(np.float32).reshape(DIM, -1)
    want = np.concatenate([(s["layers.1.feed_forward.w2.weight"][1].astype(np.uint32) << 16).view(np.float32)
                           for s in bf_shards], axis=1)
    np.testing.assert_array_equal(w, want)
    g.close()


def test_tokenizer_one_level_up_and_a_single_shard(tmp_path, shards, tokenizer_model):
    one = [{k: merged(shards, k) for k in shards[0] if k != "rope.freqs"}]
    write_meta_folder(tmp_path / "7B", one, PARAMS, tokenizer_model)
    shutil.move(tmp_path / "7B" / "tokenizer.model", tmp_path / "tokenizer.model")
    r = convert(tmp_path / "7B", tmp_path / "one.gguf", "f16")
    assert r.source_format == "meta" and r.n_tensors == len(GGUF_NAMES)


def test_progress_events(tmp_path, meta_dir):
    events = []
    r = convert(meta_dir, tmp_path / "ev.gguf", "f16", on_event=events.append)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("progress") == r.n_tensors
    done = [e.done for e in events if e.kind == "progress"]
    assert done == sorted(done) and done[-1] == events[0].total
    assert any("blk.1.ffn_down.weight" in (e.message or "") for e in events)


def test_training_context_guess():
    assert _n_ctx({"norm_eps": 1e-06}) == 2048
    assert _n_ctx({"norm_eps": 1e-05}) == 4096
    assert _n_ctx({"norm_eps": 1e-05, "rope_theta": 1000000}) == 16384


def _copy(meta_dir: Path, dest: Path) -> Path:
    shutil.copytree(meta_dir, dest)
    return dest


def test_vocab_size_in_params_must_match(tmp_path, meta_dir):
    d = _copy(meta_dir, tmp_path / "m")
    (d / "params.json").write_text(json.dumps({**PARAMS, "vocab_size": N_VOCAB}))
    convert(d, tmp_path / "ok.gguf", "f16")
    (d / "params.json").write_text(json.dumps({**PARAMS, "vocab_size": 31000}))
    with pytest.raises(ModelFileError, match="vocab_size 31000"):
        convert(d, tmp_path / "bad.gguf", "f16")


def test_params_must_describe_the_shards(tmp_path, meta_dir):
    d = _copy(meta_dir, tmp_path / "m")
    (d / "params.json").write_text(json.dumps({**PARAMS, "n_layers": 3}))
    with pytest.raises(ModelFileError, match="3 layers"):
        convert(d, tmp_path / "x.gguf", "f16")
    (d / "params.json").write_text(json.dumps({**PARAMS, "n_heads": 8, "n_kv_heads": 2}))
    with pytest.raises(ModelFileError, match="attention.wk.weight has shape"):
        convert(d, tmp_path / "x.gguf", "f16")


def test_missing_or_mismatched_shards(tmp_path, meta_dir, shards):
    d = _copy(meta_dir, tmp_path / "gap")
    (d / "consolidated.01.pth").rename(d / "consolidated.02.pth")
    with pytest.raises(ModelFileError, match="not numbered"):
        convert(d, tmp_path / "x.gguf", "f16")
    d = _copy(meta_dir, tmp_path / "odd")
    write_torch_zip(d / "consolidated.01.pth", {k: v for k, v in shards[1].items() if k != "output.weight"})
    with pytest.raises(ModelFileError, match="different tensors"):
        convert(d, tmp_path / "x.gguf", "f16")


def test_a_malicious_shard_stops_the_conversion(tmp_path, meta_dir):
    d = _copy(meta_dir, tmp_path / "evil")
    marker = tmp_path / "pwned"
    payload = f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode()
    write_torch_zip(d / "consolidated.01.pth", {"w": np.ones((2, 2), np.float16)}, data_pkl=payload)
    out = tmp_path / "evil.gguf"
    with pytest.raises(ConvertSecurityError):
        convert(d, out, "f16")
    assert not marker.exists()
    assert not out.exists() and not list(tmp_path.glob(".evil.gguf*"))


@pytest.mark.parametrize("change, field, expect", [
    ({"n_layers": 1e8}, "n_layers", "must be an integer from 1 to 1024, got 100000000.0"),
    ({"n_layers": 10**30}, "n_layers", "must be an integer from 1 to 1024"),
    ({"n_layers": "32"}, "n_layers", "got '32'"),
    ({"n_layers": None}, "n_layers", "got None"),
    ({"n_layers": 32.5}, "n_layers", "must be an integer"),
    ({"dim": float("nan")}, "dim", "got nan"),
    ({"dim": True}, "dim", "got True"),
    ({"dim": -4096}, "dim", "from 1 to"),
    ({"n_heads": 0}, "n_heads", "from 1 to"),
    ({"n_kv_heads": -2}, "n_kv_heads", "from 1 to"),
    ({"vocab_size": 1e12}, "vocab_size", "must be an integer from 1 to"),
    ({"norm_eps": float("nan")}, "norm_eps", "must be a finite number above 0 and below 1, got nan"),
    ({"norm_eps": float("inf")}, "norm_eps", "got inf"),
    ({"norm_eps": -1e-6}, "norm_eps", "got -1e-06"),
    ({"norm_eps": "1e-6"}, "norm_eps", "got '1e-6'"),
    ({"rope_theta": -10000.0}, "rope_theta", "must be a finite number above 0, got -10000.0"),
    ({"rope_theta": float("nan")}, "rope_theta", "got nan"),
    ({"rope_theta": [1]}, "rope_theta", "got [1]"),
])
def test_hostile_params_json_is_refused_before_any_allocation(tmp_path, monkeypatch, change, field, expect):
    """Checked before a shard is opened or anything is sized from the values (n_layers 1e8 sized a set of
    900 million tensor names)."""
    monkeypatch.setattr("pipx_llama.convert.meta.load_torch_zip", lambda p: pytest.fail("a shard was loaded"))
    d = tmp_path / "m"
    d.mkdir()
    (d / "consolidated.00.pth").write_bytes(b"")
    (d / "params.json").write_text(json.dumps({**PARAMS, **change}))
    with pytest.raises(ModelFileError) as exc:
        read_meta_checkpoint(d)
    assert exc.value.message.startswith(f"{d / 'params.json'}: {field} ") and expect in exc.value.message
    assert "\n" not in exc.value.message


@pytest.mark.parametrize("text, expect", [
    ("[]", "must hold a JSON object, not list"),
    ("null", "must hold a JSON object, not NoneType"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"dim": 4096, ', "not valid JSON"),
    (b'{"dim": "\xff"}', "not UTF-8 text (byte 9)"),
])
def test_a_params_json_that_is_no_object_is_refused(tmp_path, monkeypatch, text, expect):
    monkeypatch.setattr("pipx_llama.convert.meta.load_torch_zip", lambda p: pytest.fail("a shard was loaded"))
    d = tmp_path / "m"
    d.mkdir()
    (d / "consolidated.00.pth").write_bytes(b"")
    (d / "params.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelFileError, match=re.escape(expect)):
        read_meta_checkpoint(d)
