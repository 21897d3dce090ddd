"""The engine against llama.cpp's own outputs on the real SmolLM2 model (shared/golden)."""

from __future__ import annotations

import numpy as np
import pytest
from greedy import WIDE, StableAnswer, all_stable, golden_prefix

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
    assert ((hp.dim, hp.n_layers, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.ffn_dim)
            == (576, 30, 9, 3, 64, 1536))
    assert (hp.n_vocab, hp.n_ctx_train, hp.n_rot) == (49152, 8192, 64)
    assert hp.rope_base == 100000.0
    assert model.output is model.tok_embd  # tied: the file has no output.weight


def test_tokenizer_matches_llama_cpp(model, golden):
    for case in golden["cases"]:
        assert model.tokenizer.encode(case["prompt"]) == case["prompt_ids"], case["prompt"]


@pytest.mark.fidelity
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


@pytest.mark.fidelity
def test_greedy_generation_follows_llama_cpp(model, golden):
    ctx = model.new_context(512)
    for case in golden["cases"]:
        ctx.reset()
        want_ids, want_text = golden_prefix(case)
        gen = generate(ctx, case["prompt_ids"], max_tokens=len(want_ids), sampler=GREEDY)
        ids = [p.token for p in gen if p.token >= 0]
        assert ids == want_ids, case["prompt"]
        assert gen.text == want_text


def test_window_perplexity_matches_llama_cpp(model, golden):
    ref = golden["perplexity"]
    ppl = window_perplexity(model, ref["ids"][: ref["n_tokens"]])
    print(f"\nwindow perplexity: ours {ppl:.4f}, llama.cpp {ref['ppl']:.4f} ({ppl / ref['ppl'] - 1:+.2%})")
    assert abs(ppl / ref["ppl"] - 1) <= 0.02


@pytest.mark.fidelity
def test_q8_0_kv_cache_follows_llama_cpp_with_the_same_cache(model, golden, smollm2_path):
    """-ctk/-ctv q8_0 against llama.cpp with the same cache (its flash-attention path, which a quantized V
    requires): top-1 agreement at every position of the golden cases, perplexity of the golden window."""
    from pipx_llama.engine.perplexity import log_softmax_at

    llama_cpp = pytest.importorskip("llama_cpp")
    window = golden["perplexity"]["ids"][: golden["perplexity"]["n_tokens"]]
    seqs = [case["prompt_ids"] + case["greedy_ids"] for case in golden["cases"]] + [window]
    ctx = model.new_context(512, type_k="q8_0", type_v="q8_0")
    ours = []
    for ids in seqs:
        ctx.reset()
        ours.append(ctx.eval(ids, all_logits=True))
    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, n_batch=512, logits_all=True,
                          verbose=False, n_threads=2, flash_attn=True,
                          type_k=8, type_v=8)  # 8: GGML_TYPE_Q8_0
    theirs = []
    try:
        for ids in seqs:
            llm.reset()
            llm.eval(ids)
            theirs.append(np.array(llm.scores[: len(ids)], np.float32))
    finally:
        llm.close()
    top1 = np.mean(np.concatenate([a.argmax(1) == b.argmax(1) for a, b in zip(ours, theirs)]))
    target = np.asarray(window[1:])
    ppl = [float(np.exp(-log_softmax_at(lg[:-1], target).mean())) for lg in (ours[-1], theirs[-1])]
    print(f"\nq8_0 KV cache: top-1 agreement {top1:.1%}; window perplexity ours {ppl[0]:.4f}, "
          f"llama.cpp {ppl[1]:.4f} ({ppl[0] / ppl[1] - 1:+.2%}); "
          f"f16 golden {golden['perplexity']['ppl']:.4f}")
    assert top1 >= 0.95
    assert abs(ppl[0] / ppl[1] - 1) <= 0.01


# --- the conversations other tests assert greedy answers of (tests/greedy.py) ------------------------------


def _top2(row) -> tuple[int, float]:
    row = np.asarray(row, np.float32).reshape(-1)
    second, first = np.argsort(row)[-2:]
    return int(first), float(row[first] - row[second])


def _answer_gaps(tokenizer, case: StableAnswer, first_row, next_row) -> tuple[str, list[float], bool]:
    """Greedy tokens until ``case.answer`` is out (and one more where the turn must end there): their
    text, the top-2 gap of each step, and whether the last step ends the turn."""
    row, ids, gaps = first_row, [], []
    while len(tokenizer.decode(ids)) < len(case.answer) and len(ids) < 64:
        token, gap = _top2(row)
        ids.append(token)
        gaps.append(gap)
        row = next_row(token)
    ended = True
    if case.ends:
        token, gap = _top2(row)
        gaps.append(gap)
        ended = tokenizer.is_eog(token)
    return tokenizer.decode(ids), gaps, ended


def _prompt_ids(tokenizer, case: StableAnswer) -> list[int]:
    text = tokenizer.chat_prompt(list(case.messages), add_generation_prompt=True)
    return tokenizer.encode(text, add_special=True, parse_special=True)


def _check_stable(tokenizer, first_row, next_row) -> list[str]:
    problems = []
    for case in all_stable():
        text, gaps, ended = _answer_gaps(tokenizer, case, first_row(case), next_row)
        if not (text.startswith(case.answer) and ended and min(gaps) >= WIDE):
            problems.append(f"{case.messages[-1]['content']!r}: {text!r}, ended {ended}, "
                            f"gaps {' '.join(f'{g:.2f}' for g in gaps)}")
    return problems


@pytest.mark.fidelity
def test_stable_answers_hold_in_our_engine(model):
    """Every answer other tests rely on is there, with no near-tie on the way, in this CPU's arithmetic."""
    ctx = model.new_context(512)

    def first_row(case):
        ctx.reset()
        return ctx.eval(_prompt_ids(model.tokenizer, case))

    problems = _check_stable(model.tokenizer, first_row, lambda token: ctx.eval([token]))
    assert not problems, "\n".join(problems)


def test_stable_answers_hold_in_llama_cpp(model, smollm2_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, logits_all=True, verbose=False,
                          n_threads=2)

    def first_row(case):
        llm.reset()
        llm.eval(_prompt_ids(model.tokenizer, case))
        return llm.scores[llm.n_tokens - 1]

    def next_row(token):
        llm.eval([token])
        return llm.scores[llm.n_tokens - 1]

    try:
        problems = _check_stable(model.tokenizer, first_row, next_row)
    finally:
        llm.close()
    assert not problems, "\n".join(problems)


# --- Llama 3.1's per-pair RoPE factors (rope_freqs.weight), on a tiny model, against llama.cpp -------------

LLAMA31_FACTORS = np.array([1.0, 1.0, 1.0, 1.7, 3.2, 6.4, 8.0, 8.0], np.float32)  # head_dim 16: 8 pairs
LLAMA31_IDS = [(7 * i + 3) % 250 + 20 for i in range(48)]


@pytest.fixture(scope="module")
def llama31_tiny(tmp_path_factory):
    from tinymodel import write_tiny_llama

    d = tmp_path_factory.mktemp("llama31")
    with_f, without = d / "factors.gguf", d / "plain.gguf"
    write_tiny_llama(with_f, rope_freqs=LLAMA31_FACTORS, seed=31,
                     extra_metadata={"llama.rope.freq_base": 500000.0})
    write_tiny_llama(without, seed=31, extra_metadata={"llama.rope.freq_base": 500000.0})
    return with_f, without


def _all_logits(path, fused=True):
    m = load_model(path, threads=2)
    try:
        return m.new_context(128, fused=fused).eval(LLAMA31_IDS, all_logits=True)
    finally:
        m.close()


def test_rope_factors_are_read_and_change_the_result(llama31_tiny):
    with_f, without = llama31_tiny
    m = load_model(with_f, threads=1)
    assert m.hparams.rope_factors == tuple(float(f) for f in LLAMA31_FACTORS)
    m.close()
    a, b = _all_logits(with_f), _all_logits(without)
    assert np.abs(a - b).max() > 0.05  # the factors matter at these positions
    np.testing.assert_array_equal(a, _all_logits(with_f, fused=False))


def test_rope_factors_match_llama_cpp(llama31_tiny):
    llama_cpp = pytest.importorskip("llama_cpp")
    with_f, _ = llama31_tiny
    ours = _all_logits(with_f)
    llm = llama_cpp.Llama(model_path=str(with_f), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(LLAMA31_IDS)
        ref = np.array(llm.scores[: len(LLAMA31_IDS)], np.float32)
    finally:
        llm.close()
    err = np.abs(ours - ref).max()
    assert err < 5e-3, f"max |Δlogit| {err}"  # ignoring the factors gives ~0.5 here
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("fused", [True, False])
def test_context_shift_rerotates_keys_with_the_factors(llama31_tiny, fused):
    """Layer 0's keys depend only on token and position: after a shift they equal a fresh evaluation's."""
    with_f, _ = llama31_tiny
    m = load_model(with_f, threads=2)
    try:
        shifted = m.new_context(64, fused=fused)
        shifted.eval(LLAMA31_IDS[:40])
        shifted.shift(4, 12)
        fresh = m.new_context(64, fused=fused)
        fresh.eval(LLAMA31_IDS[:4] + LLAMA31_IDS[16:40])
        k_shifted = shifted.kv.k_layer(0)[:28].astype(np.float32)
        k_fresh = fresh.kv.k_layer(0)[:28].astype(np.float32)
        # both sides are rounded to f16; the shifted one twice
        np.testing.assert_allclose(k_shifted, k_fresh, atol=4e-3 * max(1.0, float(np.abs(k_fresh).max())))
    finally:
        m.close()
