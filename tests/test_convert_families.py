"""Hugging Face folders of Qwen2/2.5, Qwen3, Gemma 2/3 and Phi-3 converted to GGUF as llama.cpp converts them.

Tiny seeded folders (tests/hf_families.py) of each family are converted by pipx-llama, then:

- the file runs in pipx-llama's engine and in llama.cpp with the same logits (max |Δ| <= 0.02 in F32)
  at every position of a prompt longer than the sliding windows;
- every tensor holds the Hugging Face weight under llama.cpp's name with llama.cpp's transforms
  (Gemma's ``norm + 1``, Phi-3's fused tensors kept, no Q/K permutation outside llama);
- the metadata and vocabulary carry each family's keys and llama.cpp's tokenizer rules;
- (slow, needs torch and transformers) the file equals the one llama.cpp's own convert_hf_to_gguf.py
  writes for the same folder: metadata keys, order, types and values, tensor names, order, types, shapes
  and bytes;
- original weights of a family flow through the pipeline: fetch -> convert -> quantize -> run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hf_families import (
    FAMILIES,
    gguf_differences,
    llama_models_dir,
    run_llama_cpp_converter,
    write_family_folder,
)

from pipx_llama.config import Config
from pipx_llama.convert import convert
from pipx_llama.convert.vocab import CONTROL, NORMAL, UNUSED, USER_DEFINED
from pipx_llama.engine.model import load_model
from pipx_llama.errors import ModelFileError, UnsupportedModelError
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.models.manifest import Catalog, parse_manifest, render_manifest
from pipx_llama.models.sources import PullOptions

LAYER_NAMES = {  # Hugging Face name in a layer -> llama.cpp's, per family where they differ
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
GEMMA_LAYER_NAMES = {**LAYER_NAMES, "post_attention_layernorm.weight": "post_attention_norm.weight"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
VOCAB_IDS = {"qwen2": 151643, "qwen3": 151643, "gemma2": 335, "gemma3": 335, "phi3": 32000}


@pytest.fixture(scope="session")
def llama_models() -> Path:
    return llama_models_dir()


def _ids(arch: str, n: int = 40) -> list[int]:
    return [int(i) for i in np.random.default_rng(5).integers(3, VOCAB_IDS[arch], n)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, llama_models) -> dict[str, tuple[Path, dict[str, np.ndarray], Path]]:
    """Each family's folder, its weights and its F32 conversion, made once."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for arch in FAMILIES:
        folder = root / arch
        weights = write_family_folder(folder, arch, llama_models)
        out[arch] = (folder, weights, convert(folder, root / f"{arch}.f32.gguf", "f32").path)
    return out


def _tensor(g, name: str) -> np.ndarray:
    info = g.tensors[name]
    assert info.qtype == Q.F32, name
    return np.asarray(g.tensor_bytes(name)).view(np.float32).reshape(tuple(reversed(info.shape)))


def _expected_name(arch: str, hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}." + (GEMMA_LAYER_NAMES if arch.startswith("gemma") else LAYER_NAMES)[rest]


@pytest.mark.parametrize("arch", FAMILIES)
def test_logits_equal_llama_cpps_at_every_position(arch, converted):
    llama_cpp = pytest.importorskip("llama_cpp")
    path, ids = converted[arch][2], _ids(arch)
    m = load_model(path, threads=2)
    try:
        ours = m.new_context(128, fused=False).eval(ids, all_logits=True)
    finally:
        m.close()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                          flash_attn=False)
    try:
        llm.eval(ids)
        ref = np.array(llm.scores[: len(ids)], np.float32)
    finally:
        llm.close()
    assert (ours.argmax(1) == ref.argmax(1)).all()
    err = float(np.abs(ours - ref).max())
    assert err <= 0.02, f"{arch}: max |Δlogit| {err}"
    assert float(ref.std()) > 0.1  # a model that says something


@pytest.mark.parametrize("arch", FAMILIES)
def test_tensors_are_hugging_faces_with_llama_cpps_transforms(arch, converted):
    _, weights, path = converted[arch]
    g = open_gguf(path)
    try:
        written = set(g.tensors) - {"rope_factors_long.weight", "rope_factors_short.weight"}
        expected_names = set()
        for hf_name, w in weights.items():
            name = _expected_name(arch, hf_name)
            expected_names.add(name)
            want = w + np.float32(1) if arch.startswith("gemma") and hf_name.endswith("norm.weight") else w
            np.testing.assert_array_equal(_tensor(g, name), want, err_msg=f"{arch} {name} <- {hf_name}")
        assert written == expected_names
    finally:
        g.close()


def _meta(path: Path) -> dict:
    g = open_gguf(path)
    try:
        return dict(g.metadata)
    finally:
        g.close()


def test_family_metadata(converted):
    q2, q3, g2, g3, p3 = (_meta(converted[a][2]) for a in FAMILIES)
    assert q2["general.architecture"] == "qwen2" and q2["qwen2.rope.freq_base"] == 1e6
    assert "qwen2.attention.key_length" not in q2 and "qwen2.rope.dimension_count" not in q2
    assert (q3["qwen3.attention.key_length"], q3["qwen3.attention.value_length"]) == (24, 24)
    assert (g2["gemma2.attn_logit_softcapping"], g2["gemma2.final_logit_softcapping"]) == (5.0, 3.0)
    assert g2["gemma2.attention.sliding_window"] == 5 and "gemma2.rope.freq_base" not in g2
    assert (g3["gemma3.rope.freq_base"], g3["gemma3.rope.freq_base_swa"]) == (1e6, 1e4)
    assert (g3["gemma3.attention.sliding_window"], g3["gemma3.attention.sliding_window_pattern"]) == (5, 2)
    assert "gemma3.final_logit_softcapping" not in g3 and g3["tokenizer.ggml.add_space_prefix"] is False
    # Phi-3: partial rotary (0.75 of 64 wide / 4 heads), LongRoPE beyond 256 positions with its
    # attention factor
    assert p3["phi3.rope.dimension_count"] == 12 and p3["phi3.rope.scaling.original_context_length"] == 256
    assert p3["phi3.rope.scaling.attn_factor"] == pytest.approx(
        np.sqrt(1 + np.log(131072 / 256) / np.log(256))
    )
    assert list(p3)[:2] == ["general.architecture", "phi3.rope.scaling.attn_factor"]  # as llama.cpp orders it
    cfg = json.loads((converted["phi3"][0] / "config.json").read_text())
    g = open_gguf(converted["phi3"][2])
    try:
        for kind in ("long", "short"):
            got = g.tensor_bytes(f"rope_factors_{kind}.weight").view(np.float32)
            np.testing.assert_array_equal(got, np.float32(cfg["rope_scaling"][f"{kind}_factor"]))
    finally:
        g.close()


def test_tokenizer_rules_per_family(converted):
    q2, q3, g2, _, p3 = (_meta(converted[a][2]) for a in FAMILIES)
    # Qwen: byte-level BPE, Qwen's pre-tokenizer found by its hash; added tokens special or not as shipped
    assert (q2["tokenizer.ggml.model"], q2["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    tokens, types = q3["tokenizer.ggml.tokens"], list(q3["tokenizer.ggml.token_type"])
    assert len(tokens) == 151936 and tokens[151667] == "<think>"
    assert types[151644] == CONTROL and types[151659] == CONTROL  # <|im_start|>; <|fim_prefix|> looks special
    assert types[151657] == USER_DEFINED and types[151667] == USER_DEFINED  # <tool_call>, <think>
    assert tokens[151700] == "[PAD151700]" and types[151700] == UNUSED and types[1000] == NORMAL
    assert (q2["tokenizer.ggml.eos_token_id"], q2["tokenizer.ggml.add_bos_token"]) == (151645, False)
    assert q2["tokenizer.ggml.add_eos_token"] is False  # ByteLevel post-processor: llama.cpp's current rule
    # Gemma: SentencePiece, its own special ids
    assert g2["tokenizer.ggml.model"] == "llama"
    assert [g2[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")] == [2, 1, 3, 0]
    # Phi-3: every added token typed by its "special" flag alone, scores -1000; </s> is not special in Phi-3
    ptypes, pscores = list(p3["tokenizer.ggml.token_type"]), list(p3["tokenizer.ggml.scores"])
    assert ptypes[:3] == [CONTROL, CONTROL, USER_DEFINED] and pscores[:3] == [-1000.0] * 3
    assert ptypes[32000:32011] == [CONTROL] * 11 and p3["tokenizer.ggml.tokens"][32010] == "<|user|>"
    assert p3["tokenizer.ggml.tokens"][32011] == "[PAD32011]" and ptypes[32011] == UNUSED
    assert "tokenizer.ggml.add_space_prefix" not in p3


@pytest.mark.parametrize("layer_types, pattern", [
    (["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2, None),  # llama.cpp's default
    (["sliding_attention", "full_attention"] * 4, 2),
    (["sliding_attention", "full_attention", "full_attention"] + ["sliding_attention"] * 5,
     [True, False, False, True, True, True, True, True]),
    (["full_attention"] * 8, "no window"),
])
def test_gemma3_layer_pattern(tmp_path, llama_models, layer_types, pattern):
    """llama.cpp assumes Gemma 3's five sliding layers per global one when the file does not say; other
    layouts are written (a period or one flag per layer) so that the file runs as the model was trained."""
    from hf_families import Dims

    folder = tmp_path / "g3"
    write_family_folder(
        folder, "gemma3", llama_models, Dims(n_layers=8, head_dim=24), layer_types=layer_types
    )
    md = _meta(convert(folder, tmp_path / "g3.gguf", "f16").path)
    key = "gemma3.attention.sliding_window_pattern"
    if pattern == "no window":
        assert "gemma3.attention.sliding_window" not in md and key not in md
    elif pattern is None:
        assert md["gemma3.attention.sliding_window"] == 5 and key not in md
    else:
        assert md[key] == pattern if isinstance(pattern, int) else list(md[key]) == pattern
    m = load_model(tmp_path / "g3.gguf", threads=1)
    try:
        want = tuple(t == "sliding_attention" for t in layer_types) if pattern != "no window" else ()
        assert m.hparams.swa_layers == want or (pattern == "no window" and m.hparams.swa_window == 0)
    finally:
        m.close()


def test_float16_norms_get_their_offset_in_float16(tmp_path, llama_models):
    """llama.cpp adds Gemma's 1 to a float16 norm in float16 (torch), to bfloat16 and float32 ones in
    float32."""
    weights = write_family_folder(tmp_path / "g2", "gemma2", llama_models, dtype="F16")
    g = open_gguf(convert(tmp_path / "g2", tmp_path / "g2.gguf", "f16").path)
    try:
        w = weights["model.layers.0.input_layernorm.weight"].astype(np.float16)
        got = _tensor(g, "blk.0.attn_norm.weight")
        np.testing.assert_array_equal(got, (w + np.float16(1)).astype(np.float32))
        assert not np.array_equal(got, w.astype(np.float32) + np.float32(1))  # the rounding is visible
    finally:
        g.close()


@pytest.mark.parametrize("arch, change, error, match", [
    ("qwen2", {"architectures": ["MambaForCausalLM"]}, UnsupportedModelError, "MambaForCausalLM"),
    ("phi3", {"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 5, "short_factor": [1.0] * 5}},
     ModelFileError, "6 entries"),
    ("gemma3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedModelError, "yarn"),
    ("gemma2", {"attn_logit_softcapping": None}, UnsupportedModelError, "attn_logit_softcapping"),
    ("qwen3", {"num_hidden_layers": 2}, ModelFileError, "unexpected"),
    ("qwen2", {"intermediate_size": 100}, ModelFileError, r"ffn_\w+\.weight has shape"),
])
def test_bad_folders_are_refused(tmp_path, llama_models, arch, change, error, match):
    folder = tmp_path / arch
    write_family_folder(folder, arch, llama_models)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(error, match=match):
        convert(folder, tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()


def test_gemma2_needs_its_tokenizer_model(tmp_path, llama_models):
    folder = tmp_path / "g2"
    write_family_folder(folder, "gemma2", llama_models)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ModelFileError, match="tokenizer.model"):
        convert(folder, tmp_path / "out.gguf", "f16")


# ---- llama.cpp's own converter as the oracle ---------------------------------------------------------------


def _require_llama_cpp_converter(llama_models: Path) -> Path:
    missing = [m for m in ("torch", "transformers", "sentencepiece") if importlib.util.find_spec(m) is None]
    if missing:
        reason = (f"llama.cpp's convert_hf_to_gguf.py needs {', '.join(missing)} (not installed): "
                  "pip install torch transformers to compare with it")
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    return llama_models.parent


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype, outtype", [
    *[(a, "BF16", "f16") for a in FAMILIES],
    ("gemma2", "F16", "f16"), ("phi3", "F32", "q8_0"), ("qwen3", "BF16", "bf16"), ("gemma3", "BF16", "f32"),
])
def test_equal_to_llama_cpps_converter(tmp_path, llama_models, arch, dtype, outtype):
    """Metadata (keys, order, types, values) and tensors (names, order, types, shapes, bytes) as
    convert_hf_to_gguf.py writes them; Gemma 3 with llama.cpp's own layer pattern (see the next test)."""
    tree = _require_llama_cpp_converter(llama_models)
    folder = tmp_path / arch
    write_family_folder(folder, arch, llama_models, dtype=dtype, pattern=6)
    theirs = run_llama_cpp_converter(tree, folder, tmp_path / "llama.gguf", outtype)
    ours = convert(folder, tmp_path / "ours.gguf", outtype).path
    assert gguf_differences(ours, theirs) == []
    assert hashlib.sha256(ours.read_bytes()).digest() == hashlib.sha256(theirs.read_bytes()).digest()


@pytest.mark.slow
def test_gemma3_other_patterns_differ_from_llama_cpp_only_by_the_pattern(tmp_path, llama_models):
    tree = _require_llama_cpp_converter(llama_models)
    folder = tmp_path / "gemma3"
    write_family_folder(folder, "gemma3", llama_models, pattern=2)
    theirs = run_llama_cpp_converter(tree, folder, tmp_path / "llama.gguf")
    ours = convert(folder, tmp_path / "ours.gguf", "f16").path
    diff = gguf_differences(ours, theirs)
    assert len(diff) == 1 and diff[0].startswith("metadata keys") and "sliding_window_pattern" in diff[0]


# ---- through the pipeline ----------------------------------------------------------------------------------


def test_original_weights_flow_through_convert_and_quantize(tmp_path, llama_models):
    """A manifest variant of format hf-safetensors: fetched (from a local folder), converted, quantized,
    run."""
    from pipx_llama.models.plan import make_plan
    from pipx_llama.models.prepare import prepare
    from pipx_llama.system import HardwareProfile

    folder = tmp_path / "weights"
    write_family_folder(folder, "gemma3", llama_models, shards=1)
    files = [{"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(folder.iterdir())]
    text = render_manifest({
        "format": 1, "name": "tiny-gemma3", "description": "a tiny Gemma 3 as Hugging Face ships it",
        "license": "Apache-2.0", "architecture": "gemma3", "parameters": 200000, "context_length": 8192,
        "variants": [{"name": "original", "format": "hf-safetensors", "files": files,
                      "sources": [{"type": "url", "base": "https://example.invalid/none/"}]}]})
    manifest = parse_manifest(text, "tiny-gemma3.toml")
    cfg = Config(home=tmp_path / "home", config_dir=tmp_path / "config")
    hw = HardwareProfile(os="Linux", os_version="test", arch="x86_64", cpu_model="test CPU", physical_cores=2,
                         logical_cores=2, simd=("avx2",), ram_total=16 << 30, ram_available=16 << 30,
                         store_path=tmp_path, disk_free=100 << 30)
    opts = PullOptions(from_dirs=[folder], offline=True)
    plan = make_plan("tiny-gemma3", quant="Q8_0", hardware=hw, config=cfg, catalog=Catalog([manifest]),
                     pull_options=opts)
    assert plan.stages == ["fetch", "convert", "quantize"]
    path = prepare(plan)
    md = _meta(path)
    assert md["general.architecture"] == "gemma3" and md["general.file_type"] == 7  # MOSTLY_Q8_0
    m = load_model(path, threads=1)
    try:
        logits = m.new_context(64).eval(_ids("gemma3", 12), all_logits=True)
    finally:
        m.close()
    assert np.isfinite(logits).all() and os.path.getsize(path) > 0


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])  # transformers 5 / 4
def test_gemma3_multimodal_checkpoint_converts_its_text_model(tmp_path, llama_models, converted, prefix):
    """Gemma3ForConditionalGeneration: the text model's weights under language_model., the hyper-parameters
    in text_config; the vision tower and projector are left out (they go to llama.cpp's mmproj file)."""
    from convert_helpers import write_safetensors

    from pipx_llama.convert.hf import read_safetensors_header

    plain, _, plain_gguf = converted["gemma3"]
    folder = tmp_path / "gemma-3-mm"
    folder.mkdir()
    for p in plain.iterdir():
        if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
            (folder / p.name).write_bytes(p.read_bytes())
    tensors = {}
    for shard in sorted(plain.glob("*.safetensors")):
        for name, t in read_safetensors_header(shard).items():
            tensors[name.replace("model.", prefix, 1)] = (t.kind, t.read())
    tensors["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = (
        "F32",
        np.ones((4, 3), np.float32),
    )
    tensors["model.multi_modal_projector.mm_input_projection_weight"] = ("F32", np.ones((4, 4), np.float32))
    write_safetensors(folder / "model.safetensors", tensors)
    text = json.loads((plain / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Gemma3ForConditionalGeneration"],
                "model_type": "gemma3",
                "text_config": text,
                "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 4},
                "mm_tokens_per_image": 256,
            }
        )
    )
    ours = convert(folder, tmp_path / "mm.gguf", "f32").path
    g, h = open_gguf(ours), open_gguf(plain_gguf)
    try:
        assert sorted(g.tensors) == sorted(h.tensors)  # the order follows the shards, which differ here
        for name in g.tensors:
            assert bytes(g.tensor_bytes(name)) == bytes(h.tensor_bytes(name)), name
    finally:
        g.close()
        h.close()
