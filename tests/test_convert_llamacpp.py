"""Converted files in llama.cpp itself (through llama-cpp-python; skipped when it is not installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from convert_helpers import (
    llama_tokenizer_model,
    meta_forward,
    random_meta_shards,
    write_meta_folder,
    write_smollm2_hf_folder,
)

from pipx_llama.convert import convert
from pipx_llama.formats.gguf import open_gguf

llama_cpp = pytest.importorskip("llama_cpp")

PARAMS = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
IDS = [1, 450, 4996, 17354, 1701, 1134, 29889]


def run_llama_cpp(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], np.float32)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def meta_case(tmp_path_factory, vocab_dir):
    g = open_gguf(vocab_dir / "ggml-vocab-llama-spm.gguf")
    m = g.metadata
    model = llama_tokenizer_model(
        m["tokenizer.ggml.tokens"], m["tokenizer.ggml.scores"], m["tokenizer.ggml.token_type"]
    )
    g.close()
    shards = random_meta_shards(np.random.default_rng(11), 32000, PARAMS["dim"], PARAMS["n_layers"],
                                PARAMS["n_heads"], 2)
    folder = write_meta_folder(tmp_path_factory.mktemp("lc") / "tiny", shards, PARAMS, model)
    return folder, shards


@pytest.mark.parametrize("outtype, tolerance", [("f32", 2e-4), ("f16", 2e-2), ("q8_0", 0.1)])
def test_meta_conversion_runs_in_llama_cpp(tmp_path, meta_case, outtype, tolerance):
    folder, shards = meta_case
    out = convert(folder, tmp_path / f"tiny.{outtype}.gguf", outtype).path
    got = run_llama_cpp(out, IDS)
    want = meta_forward(shards, IDS, PARAMS["n_heads"], PARAMS["n_layers"], PARAMS["norm_eps"])
    assert np.abs(got - want).max() <= tolerance * max(1.0, np.abs(want).max())


@pytest.mark.slow
def test_smollm2_conversion_runs_in_llama_cpp(tmp_path, smollm2_path, golden):
    src = tmp_path / "SmolLM2-135M-Instruct"
    write_smollm2_hf_folder(src, smollm2_path)
    out = convert(src, tmp_path / "smollm2.f16.gguf", "f16").path
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        deltas, agree, positions = [], 0, 0
        for case in golden["cases"]:
            assert llm.tokenize(case["prompt"].encode(), add_bos=False, special=True) == case["prompt_ids"]
            n = len(case["prompt_ids"]) + len(case["top_logits"]) - 1
            llm.reset()
            llm.eval((case["prompt_ids"] + case["greedy_ids"])[:n])
            scores = np.array(llm.scores[:n])
            first = len(case["prompt_ids"]) - 1
            for i, top in enumerate(case["top_logits"]):
                row = scores[first + i]
                positions += 1
                agree += int(np.argmax(row) == top[0][0])
                deltas.extend(abs(float(row[t]) - v) for t, v in top)
    finally:
        llm.close()
    print(
        f"\nllama.cpp on the converted F16 file vs llama.cpp on the Q4_1 original: top-1 "
        f"{agree}/{positions}, "
        f"median |dlogit| {np.median(deltas):.3f}"
    )
    assert agree >= 0.9 * positions
    assert np.median(deltas) <= 0.25
