"""llama.cpp's per-tensor type choice (llama-quant.cpp), on synthetic tensor lists.

Whole-model agreement with llama.cpp itself is checked in test_quantize.py.
"""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType

from pipx_llama.errors import UnsupportedModelError, UsageError
from pipx_llama.quant import rules

Q = GGMLQuantizationType


def llama_tensors(
    n_layer: int,
    dim: int = 4096,
    ffn: int = 11008,
    kv: int = 4096,
    vocab: int = 32000,
    tied: bool = False,
    qtype: GGMLQuantizationType = Q.F16,
) -> list[tuple[str, tuple[int, ...], Q]]:
    """A llama model's tensor list in ggml shape order, as a converter writes it (file order)."""
    out = [("token_embd.weight", (dim, vocab), qtype)]
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (dim,), Q.F32), (p + "attn_q.weight", (dim, dim), qtype),
                (p + "attn_k.weight", (dim, kv), qtype), (p + "attn_v.weight", (dim, kv), qtype),
                (p + "attn_output.weight", (dim, dim), qtype), (p + "ffn_norm.weight", (dim,), Q.F32),
                (p + "ffn_gate.weight", (dim, ffn), qtype), (p + "ffn_up.weight", (dim, ffn), qtype),
                (p + "ffn_down.weight", (ffn, dim), qtype)]
    out.append(("output_norm.weight", (dim,), Q.F32))
    if not tied:
        out.append(("output.weight", (dim, vocab), qtype))
    return out


def choose(ftype: str, tensors: list, **model) -> dict[str, rules.TensorChoice]:
    info = rules.ModelInfo(**{"arch": "llama", "n_layer": 32, "n_head": 32, "n_head_kv": 32, **model})
    return {c.name: c for c in rules.choose_types(tensors, rules.file_type(ftype), info)}


def layers_with(choices: dict, suffix: str, qtype: Q) -> list[int]:
    return sorted(rules.layer_of(n) for n, c in choices.items() if n.endswith(suffix) and c.target == qtype)


# llama.cpp's use_more_bits for 32 layers: the first and last 4, and every third layer between
MORE_BITS_32 = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_llama_order_sorts_by_layer_then_bytewise_name() -> None:
    names = [
        "blk.10.attn_q.weight",
        "output.weight",
        "blk.2.ffn_up.weight",
        "blk.2.attn_k.weight",
        "token_embd.weight",
        "output_norm.weight",
    ]
    assert rules.llama_tensor_order(names) == [
        "output.weight",
        "output_norm.weight",
        "token_embd.weight",
        "blk.2.attn_k.weight",
        "blk.2.ffn_up.weight",
        "blk.10.attn_q.weight",
    ]


@pytest.mark.parametrize("ftype", list(rules.FILE_TYPES))
def test_norms_and_1d_tensors_keep_their_type(ftype: str) -> None:
    tensors = llama_tensors(4) + [("rope_freqs.weight", (64,), Q.F32), ("blk.0.attn_q.bias", (4096,), Q.F32)]
    c = choose(ftype, tensors, n_layer=4)
    for name in ("blk.0.attn_norm.weight", "output_norm.weight", "rope_freqs.weight", "blk.0.attn_q.bias"):
        assert c[name].target == Q.F32 == c[name].source


@pytest.mark.parametrize("ftype", list(rules.FILE_TYPES))
def test_output_is_q6_K_except_in_q8_0_files(ftype: str) -> None:
    c = choose(ftype, llama_tensors(4), n_layer=4)
    assert c["output.weight"].target == (Q.Q8_0 if ftype == "Q8_0" else Q.Q6_K)
    assert c["token_embd.weight"].target == rules.FILE_TYPES[ftype].default


def test_tied_embeddings_are_quantized_like_the_output() -> None:
    c = choose("Q4_0", llama_tensors(4, tied=True), n_layer=4)
    assert c["token_embd.weight"].target == Q.Q6_K


def test_output_rows_off_the_block_become_q8_0() -> None:
    # SmolLM2: dim 576 is a multiple of 32 but not of 256
    c = choose("Q4_K_M", llama_tensors(2, dim=576, ffn=1536, kv=192, vocab=49152, tied=True), n_layer=2)
    assert c["token_embd.weight"].target == Q.Q8_0 and not c["token_embd.weight"].fallback
    c = choose("Q4_0", llama_tensors(2, dim=576, ffn=1536, kv=192, vocab=49152, tied=True), n_layer=2)
    assert c["token_embd.weight"].target == Q.Q8_0 and c["token_embd.weight"].fallback


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M"])
def test_k_m_types_spend_q6_K_on_some_attn_v_and_ffn_down_layers(ftype: str) -> None:
    c = choose(ftype, llama_tensors(32))
    assert layers_with(c, "attn_v.weight", Q.Q6_K) == MORE_BITS_32
    assert layers_with(c, "ffn_down.weight", Q.Q6_K) == MORE_BITS_32
    base = rules.FILE_TYPES[ftype].default
    assert len(layers_with(c, "attn_v.weight", base)) == 32 - len(MORE_BITS_32)
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert len(layers_with(c, f"{kind}.weight", base)) == 32


def test_q4_K_S_gives_q5_K_to_the_first_attn_v_and_ffn_down_layers() -> None:
    c = choose("Q4_K_S", llama_tensors(32))
    assert layers_with(c, "attn_v.weight", Q.Q5_K) == [0, 1, 2, 3]
    assert layers_with(c, "ffn_down.weight", Q.Q5_K) == [0, 1, 2, 3]
    assert layers_with(c, "ffn_down.weight", Q.Q4_K) == list(range(4, 32))


@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q5_K_S", "Q6_K"])
def test_plain_types_quantize_every_matrix_to_the_default(ftype: str) -> None:
    c = choose(ftype, llama_tensors(8), n_layer=8)
    default = rules.FILE_TYPES[ftype].default
    mats = [n for n in c if n.startswith("blk.") and "norm" not in n]
    assert {c[n].target for n in mats} == {default}


def test_counting_follows_layer_order_not_file_order() -> None:
    tensors = llama_tensors(32)
    c1 = choose("Q4_K_M", tensors)
    c2 = choose("Q4_K_M", list(reversed(tensors)))
    assert {n: x.target for n, x in c1.items()} == {n: x.target for n, x in c2.items()}
    assert list(c1) == rules.llama_tensor_order(n for n, _, _ in tensors)


def test_llama_70b_gets_q5_K_attn_v() -> None:
    c = choose("Q4_K_M", llama_tensors(80, dim=8192, ffn=28672, kv=1024), n_layer=80, n_head=64, n_head_kv=8)
    assert set(layers_with(c, "attn_v.weight", Q.Q6_K)) | set(layers_with(c, "attn_v.weight", Q.Q5_K)) == set(
        range(80)
    )
    assert layers_with(c, "attn_v.weight", Q.Q4_K) == []


def test_eight_experts_bump_attention() -> None:
    c = choose("Q4_K_M", llama_tensors(4), n_layer=4, n_expert=8)
    assert {c[f"blk.{i}.attn_v.weight"].target for i in range(4)} == {Q.Q8_0}
    assert {c[f"blk.{i}.attn_k.weight"].target for i in range(4)} == {Q.Q8_0}
    assert {c[f"blk.{i}.attn_output.weight"].target for i in range(4)} == {Q.Q5_K}


@pytest.mark.parametrize(("ftype", "expected"), [("Q4_K_S", Q.Q5_0), ("Q5_K_S", Q.Q5_1), ("Q6_K", Q.Q8_0)])
def test_rows_off_256_fall_back(ftype: str, expected: Q) -> None:
    c = choose(ftype, llama_tensors(2, dim=320, ffn=640, kv=320, vocab=400), n_layer=2)
    assert c["blk.0.attn_q.weight"].target == expected and c["blk.0.attn_q.weight"].fallback
    assert c["output.weight"].target == Q.Q8_0


def test_rows_off_32_fall_back_to_f16() -> None:
    tensors = [("blk.0.attn_q.weight", (100, 64), Q.F32), ("blk.0.attn_k.weight", (256, 64), Q.F32)]
    c = choose("Q4_K_M", tensors, n_layer=1)
    assert c["blk.0.attn_q.weight"].target == Q.F16 and c["blk.0.attn_q.weight"].fallback
    assert c["blk.0.attn_k.weight"].target == Q.Q4_K
    # a 32-block type has nothing smaller to fall back to: F16, as llama.cpp's tensor_type_fallback does
    for ftype in ("Q4_0", "Q5_1", "Q8_0"):
        c = choose(ftype, tensors, n_layer=1)
        assert c["blk.0.attn_q.weight"].target == Q.F16 and c["blk.0.attn_q.weight"].fallback


def test_an_80_layer_qwen2_is_a_70b_model() -> None:
    """llama.cpp types every 80-layer qwen2 (Qwen2/2.5-72B) LLM_TYPE_70B, whatever its head counts, so its
    Q4_K attn_v layers become Q5_K; an 80-layer llama without grouped-query attention is not a 70B."""
    tensors = llama_tensors(80, dim=512, ffn=512, kv=512)
    for arch, heads, kv in (("qwen2", 8, 8), ("qwen2", 8, 1)):
        c = choose("Q4_K_M", tensors, arch=arch, n_layer=80, n_head=heads, n_head_kv=kv)
        assert layers_with(c, "attn_v.weight", Q.Q4_K) == [] and layers_with(c, "attn_v.weight", Q.Q5_K)
    for arch, n_layer in (("llama", 80), ("qwen2", 64), ("qwen3", 80), ("gemma3", 80)):
        c = choose("Q4_K_M", tensors, arch=arch, n_layer=n_layer, n_head=8, n_head_kv=8)
        assert layers_with(c, "attn_v.weight", Q.Q5_K) == [] and layers_with(c, "attn_v.weight", Q.Q4_K)


def test_special_tensors_stay_unquantized() -> None:
    tensors = [
        ("blk.0.ffn_gate_inp.weight", (4096, 8), Q.F32),
        ("position_embd.weight", (768, 512), Q.F32),
        ("blk.0.ssm_conv1d.weight", (4, 1024), Q.F32),
        ("blk.0.attn_q.bias_weight_not", (4096, 4096), Q.F32),
    ]
    c = choose("Q4_0", tensors, n_layer=1)
    assert {n: x.target for n, x in c.items()} == {
        "position_embd.weight": Q.F32, "blk.0.attn_q.bias_weight_not": Q.F32,
        "blk.0.ffn_gate_inp.weight": Q.F32, "blk.0.ssm_conv1d.weight": Q.F32,
    }


def test_model_info_from_metadata() -> None:
    md = {"general.architecture": "llama", "llama.block_count": 80, "llama.attention.head_count": 64,
          "llama.attention.head_count_kv": 8}
    info = rules.ModelInfo.from_metadata(md)
    assert (info.n_layer, info.n_head, info.n_head_kv, info.n_expert, info.is_70b) == (80, 64, 8, 0, True)
    with pytest.raises(UnsupportedModelError, match="block_count"):
        rules.ModelInfo.from_metadata({"general.architecture": "llama"})


def test_file_type_names() -> None:
    assert rules.file_type("q4_k_m").name == "Q4_K_M"
    assert int(rules.file_type("Q4_K_M").ftype) == 15
    with pytest.raises(UsageError, match="Q3_K"):
        rules.file_type("Q3_K")
