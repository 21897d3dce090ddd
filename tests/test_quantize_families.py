"""Quantizing every family byte for byte as llama.cpp's quantizer does (``llama_model_quantize``).

The tiny Hugging Face folders of tests/hf_families.py (rows of 256/512 so that every K-quant applies,
four layers so that Q4_K_M's and Q5_K_M's upgrades pick some layers and not others) are converted to
F16 by pipx-llama, then quantized by both; the files must be identical. Two rules that depend on the
model: an 80-layer qwen2 is llama.cpp's "70B" type, and rows that are not a multiple of 32 fall back
to F16 even for 32-block types.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from hf_families import FAMILIES, QUANT, llama_models_dir, write_family_folder
from quantize_oracles import llama_quantize
from tinymodel import write_tiny_model

from pipx_llama.convert import convert
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.quant.file import quantize_model
from pipx_llama.quant.rules import FILE_TYPES

QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0")


@pytest.fixture(scope="session")
def llama_models() -> Path:
    return llama_models_dir()


def _same_as_llama_cpp(src: Path, tmp_path: Path, ftype: str) -> dict[str, str]:
    ours, theirs = tmp_path / f"{ftype}.gguf", tmp_path / f"{ftype}-llama.gguf"
    result = quantize_model(src, ours, ftype, threads=2)
    llama_quantize(src, theirs, int(FILE_TYPES[ftype].ftype), threads=2)
    assert ours.read_bytes() == theirs.read_bytes(), f"{src.name} {ftype} differs from llama.cpp"
    theirs.unlink()
    return result.types


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_converted_family_quantizes_like_llama_cpp(arch, tmp_path, llama_models):
    folder = tmp_path / arch
    write_family_folder(folder, arch, llama_models, QUANT[arch], seed=7)
    src = convert(folder, tmp_path / f"{arch}-f16.gguf", "f16").path
    for ftype in QUANTS:
        types = _same_as_llama_cpp(src, tmp_path, ftype)
        if ftype == "Q4_K_M":
            # the upgrades that make Q4_K_M what it is happened (attn_v, or Phi-3's fused attn_qkv)
            v = "attn_qkv" if arch == "phi3" else "attn_v"
            assert [types[f"blk.{i}.{v}.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
            assert types["blk.3.ffn_down.weight"] == "Q6_K" and types["blk.0.ffn_down.weight"] == "Q4_K"


@pytest.mark.slow
def test_an_80_layer_qwen2_quantizes_like_llama_cpps_70b(tmp_path):
    src = tmp_path / "qwen2-80.gguf"
    write_tiny_model(src, arch="qwen2", dim=256, n_layers=80, n_heads=4, n_kv_heads=4, ffn=256, qtype=Q.F16,
                     tied=True, seed=1)
    types = _same_as_llama_cpp(src, tmp_path, "Q4_K_M")
    assert {types[f"blk.{i}.attn_v.weight"] for i in range(80)} == {"Q5_K", "Q6_K"}
    _same_as_llama_cpp(src, tmp_path, "Q4_K_S")


def test_rows_off_32_quantize_like_llama_cpp(tmp_path):
    src = tmp_path / "d48.gguf"
    write_tiny_model(
        src, arch="qwen2", dim=48, n_heads=4, n_kv_heads=2, ffn=96, qtype=Q.F32, tied=False, seed=2
    )
    for ftype in ("Q4_0", "Q8_0", "Q4_K_M"):
        types = _same_as_llama_cpp(src, tmp_path, ftype)
        assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] != "F16"
    g = open_gguf(tmp_path / "Q4_0.gguf")
    try:
        assert g.tensors["output.weight"].qtype == Q.F16
    finally:
        g.close()
