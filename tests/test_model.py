"""The engine against llama.cpp's own outputs on the real SmolLM2 model (shared/golden)."""

from __future__ import annotations

import numpy as np
import pytest

from pipx_llama.engine.generate import generate
from pipx_llama.engine.model import load_model
from pipx_llama.engine.perplexity import window_perplexity
from pipx_llama.engine.sampler import GREEDY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(smollm2_path):
    m = load_model(smollm2_path, threads=2)
    yield m
    m.close()


def test_hyperparameters_from_metadata(model):
    hp = model.hparams
    assert (hp.dim, hp.n_layers, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.ffn_dim) == (576, 30, 9, 3, 64, 1536)
    assert (hp.n_vocab, hp.n_ctx_train, hp.n_rot) == (49152, 8192, 64)
    assert hp.rope_base == 100000.0
    assert model.output is model.tok_embd  # tied: the file has no output.weight


def test_tokenizer_matches_llama_cpp(model, golden):
    for case in golden["cases"]:
        assert model.tokenizer.encode(case["prompt"]) == case["prompt_ids"], case["prompt"]


def test_logits_match_llama_cpp(model, golden):
    top1_hits, positions, deltas = 0, 0, []
    ctx = model.new_context(512)
    for case in golden["cases"]:
        ctx.reset()
        ids = case["prompt_ids"] + case["greedy_ids"]
        logits = ctx.eval(ids, all_logits=True)
        first = len(case["prompt_ids"]) - 1
        for i, top in enumerate(case["top_logits"]):
            row = logits[first + i]
            positions += 1
            top1_hits += int(np.argmax(row)) == top[0][0]
            deltas.extend(abs(float(row[tok]) - val) for tok, val in top)
    top1 = top1_hits / positions
    median = float(np.median(deltas))
    print(f"\nfidelity: top-1 agreement {top1:.1%} over {positions} positions; "
          f"median |dlogit| {median:.4f}, max {max(deltas):.4f} over llama.cpp's top-8")
    assert top1 >= 0.95
    assert median <= 0.4


def test_greedy_generation_follows_llama_cpp(model, golden):
    ctx = model.new_context(512)
    for case in golden["cases"]:
        ctx.reset()
        n = case["safe_prefix_len"]
        gen = generate(ctx, case["prompt_ids"], max_tokens=n, sampler=GREEDY)
        ids = [p.token for p in gen if p.token >= 0]
        assert ids == case["greedy_ids"][:n], case["prompt"]
        assert gen.text == case["safe_prefix_text"]


def test_window_perplexity_matches_llama_cpp(model, golden):
    ref = golden["perplexity"]
    ppl = window_perplexity(model, ref["ids"][: ref["n_tokens"]])
    print(f"\nwindow perplexity: ours {ppl:.4f}, llama.cpp {ref['ppl']:.4f} ({ppl / ref['ppl'] - 1:+.2%})")
    assert abs(ppl / ref["ppl"] - 1) <= 0.02
