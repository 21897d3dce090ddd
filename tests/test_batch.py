"""Batches mixing sequences: each sequence's logits are those it gets evaluated alone.

Three sequences of different lengths step together: a prompt chunk of one next to single decode
tokens of the others, then all decoding. With legacy-quantized weights the per-op path (which the
batch runs) and the fused pass give the same bits, and a matmul row does not depend on the other rows
of its batch, so the comparison is exact -- against the per-op path and against the fused pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tinymodel import FAMILY_FEATURES, write_tiny_model

from pipx_llama.engine.batch import BatchEval, Part, new_slots
from pipx_llama.engine.model import load_model
from pipx_llama.errors import ContextFullError, UsageError

RNG = np.random.default_rng(11)
SEQS = [[int(i) for i in RNG.integers(3, 270, n)] for n in (30, 9, 6)]
# per step, the tokens each sequence appends (an empty tuple: that sequence sits this step out)
SCHEDULE = [
    ((0, 12), (0, 5), ()),  # a prompt chunk of A next to B's prompt
    ((12, 24), (5, 6), (0, 4)),  # A's next chunk, a decode token of B, C's whole prompt
    ((24, 25), (6, 7), (4, 5)),  # all decoding
    ((25, 30), (7, 8), (5, 6)),
    ((), (8, 9), ()),
]


def _steps(seq: int) -> list[list[int]]:
    return [SEQS[seq][a:b] for a, b in (step[seq] or (0, 0) for step in SCHEDULE) if a < b]


def _alone(model, seq: int, fused: bool) -> np.ndarray:
    ctx = model.new_context(64, n_batch=16, fused=fused)
    return np.stack([ctx.eval(chunk)[-1] for chunk in _steps(seq)])


def _batched(model, pooled: bool = False) -> list[np.ndarray]:
    """Every sequence's logits, step by step; ``pooled``: contexts of one KV pool (the fused pass)."""
    if pooled:
        pool = new_slots(model, len(SEQS), 64, n_batch=48)
        contexts, batch = pool.contexts, BatchEval(model, 48, pool)
    else:
        contexts = [model.new_context(64, n_batch=16, fused=False) for _ in SEQS]
        batch = BatchEval(model, 48)
    got: list[list[np.ndarray]] = [[] for _ in SEQS]
    for step in SCHEDULE:
        parts, owners = [], []
        for s, span in enumerate(step):
            if span:
                parts.append(Part(contexts[s], SEQS[s][span[0]:span[1]]))
                owners.append(s)
        for s, logits in zip(owners, batch.eval(parts)):
            got[s].append(logits)
    return [np.stack(g) for g in got]


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("arch", sorted(FAMILY_FEATURES))
def test_a_batch_of_three_sequences_gives_each_its_own_logits(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    write_tiny_model(path, arch=arch, seed=3, n_layers=3, tied=False, qtype=Q.Q4_0)
    m = load_model(path, threads=2)
    try:
        got, pooled = _batched(m), _batched(m, pooled=True)
        for s in range(len(SEQS)):
            _same_bits(got[s], _alone(m, s, fused=False))
            _same_bits(pooled[s], got[s])
            if m.packed is not None:
                _same_bits(got[s], _alone(m, s, fused=True))
    finally:
        m.close()


def test_a_batch_on_the_real_smollm2(smollm2_path):
    m = load_model(smollm2_path, threads=2)
    try:
        got, pooled = _batched(m), _batched(m, pooled=True)
        for s in range(len(SEQS)):
            _same_bits(got[s], _alone(m, s, fused=False))
            _same_bits(got[s], _alone(m, s, fused=True))
            _same_bits(pooled[s], got[s])
    finally:
        m.close()


def test_a_batch_continues_a_context_the_fused_pass_filled(tmp_path):
    """A server slot evaluates alone on the fused pass, then in batches: the cache is the same."""
    path = tmp_path / "gemma3.gguf"
    write_tiny_model(path, arch="gemma3", seed=3, n_layers=3, tied=False, qtype=Q.Q4_0)
    m = load_model(path, threads=2)
    try:
        ctx, alone = m.new_context(64, n_batch=16), m.new_context(64, n_batch=16, fused=False)
        ctx.eval(SEQS[0][:20])
        alone.eval(SEQS[0][:20])
        other = m.new_context(64, n_batch=16, fused=False)
        batch = BatchEval(m, 32)
        for t in SEQS[0][20:26]:
            got, _ = batch.eval([Part(ctx, [t]), Part(other, [t])])
            _same_bits(got, alone.eval([t])[-1])
        assert ctx.tokens == SEQS[0][:26] and ctx.n_past == 26
    finally:
        m.close()


def test_a_part_without_logits_and_the_refusals(tmp_path):
    path = tmp_path / "llama.gguf"
    write_tiny_model(path, arch="llama", seed=3, n_layers=2, tied=False, qtype=Q.Q4_0)
    m = load_model(path, threads=1)
    try:
        a, b = m.new_context(16, n_batch=8, fused=False), m.new_context(16, n_batch=8, fused=False)
        batch = BatchEval(m, 12)
        out = batch.eval([Part(a, [5, 6, 7], logits=False), Part(b, [8])])
        assert out[0] is None and out[1].shape == (m.hparams.n_vocab,)
        with pytest.raises(UsageError, match="two parts of one sequence"):
            batch.eval([Part(a, [1]), Part(a, [2])])
        with pytest.raises(UsageError, match="exceeds its context's batch"):
            batch.eval([Part(a, list(range(3, 12)))])
        with pytest.raises(UsageError, match="exceeds this evaluator's"):
            batch.eval([Part(a, [3] * 7), Part(b, [3] * 7)])
        with pytest.raises(UsageError, match="outside the vocabulary"):
            batch.eval([Part(a, [m.hparams.n_vocab])])
        b.eval([3] * 8)
        with pytest.raises(ContextFullError):
            batch.eval([Part(b, [3] * 8)])
        assert a.n_past == 3 and b.n_past == 9  # a refused batch changes nothing
    finally:
        m.close()
