"""The fused forward pass (kernels.fused, kernels.runtime) against the per-op path of model.py.

Tiny synthetic models (engine.warmup) run through both paths. With legacy weight types the
logits must be the same bits for every batch size and thread count, and across the context
operations (truncate, shift) that rewrite the KV cache behind the fused pass's back. With K-quants
they agree to rounding: the portable K-quant kernels are compiled with fastmath, and their
rounding even differs between a fresh compile and the same kernel loaded from numba's cache."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
from numba import njit

from pipx_llama.engine.kernels import packed, runtime, simd
from pipx_llama.engine.model import load_model
from pipx_llama.engine.warmup import write_tiny_model

# the packed kinds exist only with a SIMD tier; the rest (the portable tier's plain kinds, the fused
# pass over them, the team's threads) is what a CPU without one runs, ARM included
needs_simd = pytest.mark.skipif(simd.TIER is None, reason="no packed kernels on this CPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_model(path, seed=3, kquants=False)
    return path


@pytest.fixture(scope="module")
def tiny_k(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-k.gguf"
    write_tiny_model(path, seed=4)
    return path


@pytest.fixture(scope="module")
def tiny_q5(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-q5.gguf"
    write_tiny_model(path, seed=5, kquants=False, q5=True)
    return path


@pytest.fixture(scope="module")
def tiny_k5(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-k5.gguf"
    write_tiny_model(path, seed=6, q5=True)
    return path


def same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_logits_are_the_per_op_logits(tiny, threads):
    model = load_model(tiny, threads=threads)
    assert model.packed is not None
    fused, per_op = model.new_context(48, n_batch=8), model.new_context(48, n_batch=8, fused=False)
    prompt = [1, 17, 260, 3, 99, 200, 45, 6, 7, 8, 9, 10, 11]  # 13 tokens: batches of 8 and 5
    same_bits(fused.eval(prompt, all_logits=True), per_op.eval(prompt, all_logits=True))
    for tok in (5, 77, 280):
        same_bits(fused.eval([tok]), per_op.eval([tok]))
    same_bits(fused.eval([4, 5, 6]), per_op.eval([4, 5, 6]))


@needs_simd
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_q5_weights_give_the_per_op_logits(tiny_q5, threads):
    """Q5_0/Q5_1 repacked: prompts and generation on the fused pass, the per-op path's bits."""
    model = load_model(tiny_q5, threads=threads)
    assert model.packed is not None and not model.packed.plain
    fused, per_op = model.new_context(48, n_batch=8), model.new_context(48, n_batch=8, fused=False)
    prompt = [1, 17, 260, 3, 99, 200, 45, 6, 7, 8, 9, 10, 11]
    same_bits(fused.eval(prompt, all_logits=True), per_op.eval(prompt, all_logits=True))
    for tok in (5, 77, 280):
        same_bits(fused.eval([tok]), per_op.eval([tok]))
    same_bits(fused.eval([4, 5, 6]), per_op.eval([4, 5, 6]))


@pytest.mark.parametrize("fixture", ["tiny", "tiny_q5"])
def test_portable_tier_reads_weights_in_place_with_the_per_op_logits(fixture, request, monkeypatch):
    """Without a SIMD tier every weight is plain: generation on the fused pass, prompts per-op."""
    monkeypatch.setattr(packed, "SIMD", False)
    model = load_model(request.getfixturevalue(fixture), threads=2)
    assert model.packed is not None and model.packed.plain and model.packed.arena.size == 0
    fused, per_op = model.new_context(48, n_batch=8), model.new_context(48, n_batch=8, fused=False)
    prompt = [1, 17, 260, 3, 99, 200, 45, 6, 7, 8, 9, 10, 11]
    same_bits(fused.eval(prompt, all_logits=True), per_op.eval(prompt, all_logits=True))
    for tok in (5, 77, 280):
        same_bits(fused.eval([tok]), per_op.eval([tok]))
    same_bits(fused.eval([4, 5], all_logits=True), per_op.eval([4, 5], all_logits=True))


def test_big_models_on_the_portable_tier_stay_on_the_per_op_path(tiny_q5, monkeypatch):
    from pipx_llama.engine import model as model_module

    monkeypatch.setattr(packed, "SIMD", False)
    monkeypatch.setattr(model_module, "_PLAIN_FUSED_MAX_BYTES", 1024)
    assert load_model(tiny_q5, threads=2).packed is None
    monkeypatch.setattr(model_module, "_PLAIN_FUSED_MAX_BYTES", 1 << 30)
    assert load_model(tiny_q5, threads=2).packed is not None


@needs_simd
@pytest.mark.parametrize("fixture", ["tiny", "tiny_k", "tiny_q5", "tiny_k5"])
def test_repacking_slice_by_slice_gives_the_same_arena(fixture, request, monkeypatch):
    """Load repacks a few MB at a time (dropping each slice's file pages): with one group of rows per
    slice, the packed bytes are those of one whole-tensor repack."""
    from pipx_llama.engine import model as model_module

    path = request.getfixturevalue(fixture)
    monkeypatch.setattr(model_module, "_REPACK_SLICE_BYTES", 1 << 40)
    whole = load_model(path, threads=1).packed
    monkeypatch.setattr(model_module, "_REPACK_SLICE_BYTES", 1)
    sliced = load_model(path, threads=2).packed
    assert whole is not None and sliced is not None and whole.arena.size > 0
    rows = whole.wdesc[:, 1]
    assert (rows > packed.LANES).all()
    np.testing.assert_array_equal(sliced.arena, whole.arena)


@needs_simd
def test_q5_K_logits_close_to_the_per_op_logits(tiny_k5):
    model = load_model(tiny_k5, threads=2)
    assert model.packed is not None and not model.packed.plain
    fused, per_op = model.new_context(32, n_batch=4), model.new_context(32, n_batch=4, fused=False)
    prompt = [1, 17, 260, 3, 99, 200, 45, 6, 7]
    got, want = fused.eval(prompt, all_logits=True), per_op.eval(prompt, all_logits=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for tok in (5, 77, 280):
        got, want = fused.eval([tok]), per_op.eval([tok])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_kquant_logits_close_to_the_per_op_logits(tiny_k):
    model = load_model(tiny_k, threads=2)
    prompt = [1, 17, 260, 3, 99, 200, 45, 6, 7]
    got = model.new_context(32, n_batch=4).eval(prompt, all_logits=True)
    want = model.new_context(32, n_batch=4, fused=False).eval(prompt, all_logits=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kquants", [False, True])
def test_results_do_not_depend_on_thread_count(tiny, tiny_k, kquants):
    outs = []
    for threads in (1, 2, 4):
        ctx = load_model(tiny_k if kquants else tiny, threads=threads).new_context(32)
        outs.append(np.concatenate([ctx.eval(list(range(3, 20)), all_logits=True), ctx.eval([21])]))
    same_bits(outs[0], outs[1])
    same_bits(outs[0], outs[2])


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_token_items_cover_every_token_once(threads):
    """Per-token stages: items of ``per`` tokens cover 0..T-1 exactly; they hold MIN_TOKENS_PER_ITEM tokens
    or more where every thread still gets one, and no more than a thread's share otherwise."""
    from pipx_llama.engine.kernels import fused

    for T in range(1, 300):
        items, per = fused._token_items(T, threads)
        assert (items - 1) * per < T <= items * per
        share = -(-T // threads)
        assert per >= min(fused.MIN_TOKENS_PER_ITEM, share)
        assert per <= max(share if share <= fused.MIN_TOKENS_PER_ITEM else fused.MIN_TOKENS_PER_ITEM,
                          -(-T // (4 * threads)))
        if T >= 4 * threads * fused.MIN_TOKENS_PER_ITEM:
            assert items >= 2 * threads


def test_truncate_and_shift_under_the_fused_pass(tiny):
    model = load_model(tiny, threads=2)
    a, b = model.new_context(24), model.new_context(24, fused=False)
    for ctx in (a, b):
        ctx.eval(list(range(10, 30)))
        ctx.truncate(12)
        ctx.eval([40, 41])
        ctx.shift(2, 6)
    same_bits(a.eval([50]), b.eval([50]))
    assert a.tokens == b.tokens and a.n_past == b.n_past


def test_workers_stop_when_the_context_goes(tiny):
    gc.collect()
    before = set(threading.enumerate())
    ctx = load_model(tiny, threads=3).new_context(16)
    ctx.eval([1, 2])
    workers = [t for t in threading.enumerate() if t.name.startswith("pipx-llama-worker") and t not in before]
    assert len(workers) == 2
    del ctx
    gc.collect()
    for t in workers:
        t.join(timeout=5)
        assert not t.is_alive()


@njit
def _take_all(ctl, stage, tag, n):
    got = []
    while True:
        i = runtime.take(ctl, stage, tag, n)
        if i < 0 or i >= n:
            return got, i
        got.append(i)


def test_items_are_taken_once_and_stale_evaluations_get_nothing():
    ctl = runtime.control_array(2)
    runtime.publish(ctl, 2, 7)
    got, end = _take_all(ctl, 1, 7, 5)
    assert list(got) == [0, 1, 2, 3, 4] and end == 5
    runtime.publish(ctl, 2, 8)  # a newer evaluation: a thread still on evaluation 7 must stop
    got, end = _take_all(ctl, 1, 7, 5)
    assert list(got) == [] and end == -1
    assert not _wait(ctl, 0, 7, 1)


@njit
def _wait(ctl, stage, tag, n):
    return runtime.wait_stage(ctl, stage, tag, n)


def test_small_matmuls_split_into_one_item_per_thread_unless_cores_differ(tiny):
    from pipx_llama.engine.kernels import fused

    assert fused.items_per_thread(2, None) == fused.MM_ITEMS_ALIKE == 1
    assert fused.items_per_thread(4, 4) == 1  # no more threads than performance cores
    assert fused.items_per_thread(12, 4) == fused.MM_ITEMS_MIXED == 2
    model = load_model(tiny, threads=2)
    b = model.new_context(32, fused=False).fused_bundle()
    counts = {}
    for items in (1, 2):
        b.hp[fused.HP_ITEMS] = items
        ops = (fused.OP_QKV, fused.OP_GATE_UP, fused.OP_DOWN)
        counts[items] = [fused.n_items(op, 0, 1, 2, b) for op in ops]
    assert counts[1] == [6, 2, 2] and counts[2] == [12, 4, 4], counts


@pytest.mark.parametrize(("T", "H", "KVH", "threads"), [(1, 9, 3, 2), (8, 9, 3, 2), (2, 9, 3, 2),
                                                        (3, 4, 1, 2), (5, 32, 32, 2), (1, 4, 2, 1),
                                                        (128, 15, 5, 3)])
def test_attention_units_cover_every_head_once_and_share_a_kv_head(T, H, KVH, threads):
    from pipx_llama.engine.kernels import fused

    units, per = fused.attend_units(T, H, KVH, threads)
    seen = []
    for u in range(units):
        t, h0 = fused.attend_unit(u, per, H)
        heads = range(h0, h0 + per)
        assert len({h // (H // KVH) for h in heads}) == 1  # one KV head's rows per unit
        seen += [(t, h) for h in heads]
    assert sorted(seen) == [(t, h) for t in range(T) for h in range(H)]
    # groups where they keep every thread busy; single heads where a token has too few KV heads for that
    assert per == (H // KVH if T * KVH >= 2 * threads else 1)
