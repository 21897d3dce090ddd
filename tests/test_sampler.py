"""Samplers: greedy, penalties, top-k/top-p/min-p filters, temperature, seeded reproducibility."""

import numpy as np
import pytest

from pipx_llama.engine.sampler import GREEDY, Sampler, SamplerConfig, apply_penalties, filter_candidates
from pipx_llama.errors import UsageError


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert Sampler(GREEDY).sample(logits, []) == 1


def test_repeat_penalty_divides_positive_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    cfg = SamplerConfig(repeat_penalty=2.0, repeat_last_n=64)
    out = apply_penalties(logits, [0, 1, 1], cfg)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # the input is not modified


def test_repeat_last_n_limits_the_window():
    logits = np.array([2.0, 2.0], np.float32)
    out = apply_penalties(logits, [0, 1], SamplerConfig(repeat_penalty=2.0, repeat_last_n=1))
    assert out.tolist() == [2.0, 1.0]
    assert apply_penalties(logits, [0, 1], SamplerConfig(repeat_penalty=2.0, repeat_last_n=0)) is logits


def test_frequency_and_presence_penalties():
    logits = np.zeros(3, np.float32)
    cfg = SamplerConfig(frequency_penalty=0.5, presence_penalty=0.25)
    assert apply_penalties(logits, [2, 2, 0], cfg).tolist() == [-0.75, 0.0, -1.25]


def test_penalty_can_change_greedy_choice():
    logits = np.array([3.0, 2.0], np.float32)
    cfg = SamplerConfig(temperature=0.0, repeat_penalty=2.0)
    assert Sampler(cfg).sample(logits, [0]) == 1


def test_top_k_keeps_k_best_in_order():
    logits = np.array([1.0, 5.0, 3.0, 4.0, 2.0], np.float32)
    ids, probs = filter_candidates(logits, SamplerConfig(top_k=3, top_p=1.0, min_p=0.0, temperature=1.0))
    assert ids.tolist() == [1, 3, 2]
    assert probs.sum() == pytest.approx(1.0)
    assert probs[0] > probs[1] > probs[2]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    ids, _ = filter_candidates(logits, SamplerConfig(top_k=0, top_p=0.75, min_p=0.0, temperature=1.0))
    assert ids.tolist() == [0, 1]
    ids, _ = filter_candidates(logits, SamplerConfig(top_k=0, top_p=0.85, min_p=0.0, temperature=1.0))
    assert ids.tolist() == [0, 1, 2]


def test_min_p_drops_tokens_below_fraction_of_best():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    ids, _ = filter_candidates(logits, SamplerConfig(top_k=0, top_p=1.0, min_p=0.2, temperature=1.0))
    assert ids.tolist() == [0, 1, 2]


def test_temperature_sharpens_and_flattens():
    logits = np.array([2.0, 1.0], np.float32)
    base = SamplerConfig(top_k=0, top_p=1.0, min_p=0.0)
    _, cold = filter_candidates(logits, SamplerConfig(**{**base.__dict__, "temperature": 0.5}))
    _, hot = filter_candidates(logits, SamplerConfig(**{**base.__dict__, "temperature": 2.0}))
    assert cold[0] > hot[0] > 0.5


def test_seed_makes_sampling_reproducible_and_distribution_right():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=1000).astype(np.float32)
    cfg = SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = [Sampler(cfg).sample(logits, []) for _ in range(3)]
    s1, s2 = Sampler(cfg), Sampler(cfg)
    assert [s1.sample(logits, []) for _ in range(50)] == [s2.sample(logits, []) for _ in range(50)]
    assert len(set(a)) == 1
    two = np.array([np.log(0.8), np.log(0.2)], np.float32)
    s = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7))
    draws = [s.sample(two, []) for _ in range(4000)]
    assert 0.77 < draws.count(0) / 4000 < 0.83


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("min_p", 2.0), ("repeat_penalty", 0.0),
                                         ("temperature", float("nan")),
                                         ("repeat_last_n", -2)])
def test_invalid_settings_are_refused(field, value):
    with pytest.raises(UsageError):
        Sampler(SamplerConfig(**{field: value}))


def test_logit_bias_is_added_before_the_penalties():
    logits = np.array([1.0, 3.0, 2.0], np.float32)
    cfg = SamplerConfig(temperature=0.0, logit_bias=((1, -100.0), (0, 0.5)))
    assert Sampler(cfg).sample(logits, []) == 2
    assert logits.tolist() == [1.0, 3.0, 2.0]  # the caller's array is left alone
    # the penalty divides the biased logit, as llama.cpp's chain (logit bias first) does
    cfg = SamplerConfig(temperature=0.0, repeat_penalty=2.0, logit_bias=((0, 4.0),))
    assert Sampler(cfg).sample(logits, [0]) == 1  # (1 + 4) / 2 = 2.5 < 3
    with pytest.raises(UsageError):
        Sampler(SamplerConfig(logit_bias=((0, float("nan")),)))
