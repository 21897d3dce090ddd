"""Token samplers, in llama.cpp's default order: logit bias, repeat penalty, top-k, top-p, min-p,
temperature, draw.

``temperature <= 0`` is greedy (argmax after the penalties), as llama.cpp's ``--temp 0``.
A seeded ``numpy.random.Generator`` makes sampled runs reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipx_llama.engine.kernels import ops
from pipx_llama.errors import UsageError


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # -1 = whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's logit_bias

    def validate(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top-k must be >= 0 (0 = off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top-p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min-p must be in [0, 1], got {self.min_p}"),
            (self.repeat_penalty > 0, f"repeat penalty must be > 0, got {self.repeat_penalty}"),
            (self.repeat_last_n >= -1, f"repeat-last-n must be >= -1, got {self.repeat_last_n}"),
            (-2.0 <= self.presence_penalty <= 2.0,
             f"presence penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency penalty must be in [-2, 2], got {self.frequency_penalty}"),
        ]
        checks += [(id_ >= 0 and math.isfinite(bias), f"logit bias {bias} for token {id_} is not usable")
                   for id_, bias in self.logit_bias]
        for ok, message in checks:
            if not ok:  # NaN fails every comparison, so it lands here too
                raise UsageError(message, "see `pipx-llama run --help` for the sampling options")


GREEDY = SamplerConfig(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


class Sampler:
    """Stateful only through its random generator; call ``sample`` once per generated token."""

    def __init__(self, config: SamplerConfig) -> None:
        config.validate()
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        # the bias as arrays once per request, not once per token
        self._bias_ids = np.array([i for i, _ in config.logit_bias], np.int64)
        self._bias = np.array([b for _, b in config.logit_bias], np.float64)

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> int:
        cfg = self.config
        logits = apply_logit_bias(logits, self._bias_ids, self._bias)
        logits = apply_penalties(logits, history, cfg)
        if cfg.temperature <= 0:
            return int(np.argmax(logits))
        ids, probs = filter_candidates(logits, cfg)
        # numpy's Generator.choice(ids.size, p=probs), the same draw from the same generator state
        return int(ids[ops.draw(probs, self.rng.random())])


def apply_logit_bias(logits: np.ndarray, ids: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Adds bias[j] to the logit of token ids[j] (as llama.cpp's logit-bias sampler; an id listed twice
    gets both); a new array when there is any."""
    if not ids.size:
        return logits
    out = logits.astype(np.float32, copy=True)
    np.add.at(out, ids, bias)
    return out


def apply_penalties(logits: np.ndarray, history: Sequence[int], cfg: SamplerConfig) -> np.ndarray:
    """llama.cpp's penalties over the last ``repeat_last_n`` tokens; returns a new array when it changes
    any."""
    if cfg.repeat_penalty == 1.0 and cfg.presence_penalty == 0.0 and cfg.frequency_penalty == 0.0:
        return logits
    if cfg.repeat_last_n == 0:
        return logits
    window = list(history) if cfg.repeat_last_n == -1 else list(history)[-cfg.repeat_last_n:]
    if not window:
        return logits
    ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
    out = logits.astype(np.float32, copy=True)
    vals = out[ids]
    # as llama.cpp: divide positive logits, multiply negative ones, so the penalty always lowers them
    vals = np.where(vals <= 0, vals * cfg.repeat_penalty, vals / cfg.repeat_penalty)
    vals = vals - counts * cfg.frequency_penalty - cfg.presence_penalty
    out[ids] = vals
    return out


def filter_candidates(logits: np.ndarray, cfg: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids (equal logits: lower id first) and their probabilities after top-k, top-p, min-p and
    temperature."""
    n = logits.size
    k = n if cfg.top_k <= 0 else min(cfg.top_k, n)
    if k < n:
        ids = np.empty(k, np.int64)
        ops.top_k(np.ascontiguousarray(logits, np.float32), ids)
    else:
        ids = np.argsort(-logits, kind="stable")
    vals = logits[ids].astype(np.float64)
    probs = np.empty(vals.size)
    keep = ops.candidate_probs(vals, cfg.top_p, cfg.min_p, cfg.temperature, probs)
    return ids[:keep], probs[:keep]
