"""Every family on tiny seeded models: logits against llama.cpp at every position, each feature shown to
matter, the fused pass equal to the per-op pass, and the KV cache of sliding-window layers.

The tiny models (tests/tinymodel.py) carry each family's features: q/k/v biases (qwen2), per-head q/k
norms and wider heads (qwen3, gemma3), post norms, GeGLU and embedding scaling (gemma), attention and
final soft-capping (gemma2), sliding windows smaller than the prompt (gemma2/3), fused q/k/v and
gate/up tensors, partial rotary and LongRoPE factors with an attention factor (phi3).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tinymodel import FAMILY_FEATURES, write_tiny_model

from pipx_llama.engine.arch import FAMILIES, family_of
from pipx_llama.engine.model import load_model
from pipx_llama.errors import UnsupportedModelError, UsageError

FAMILY_NAMES = sorted(FAMILY_FEATURES)
IDS = [int(i) for i in np.random.default_rng(5).integers(3, 270, 40)]


def _write(tmp_path, arch, **kw):
    path = tmp_path / f"{arch}-{kw.get('qtype', Q.F32).name}.gguf"
    write_tiny_model(path, arch=arch, seed=3, n_layers=3, tied=False, **kw)
    return path


def _ours(path, n_ctx=128, fused=True, ids=IDS, cache="f16"):
    m = load_model(path, threads=2)
    try:
        return m.new_context(n_ctx, fused=fused, type_k=cache, type_v=cache).eval(ids, all_logits=True)
    finally:
        m.close()


def _llama_cpp(path, n_ctx=128, ids=IDS, cache="f16"):
    """llama.cpp's logits; a q8_0 cache needs its flash-attention path (it refuses a quantized V without)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ggml_type = {"f16": 1, "q8_0": 8}[cache]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                          flash_attn=cache != "f16", type_k=ggml_type, type_v=ggml_type)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], np.float32)
    finally:
        llm.close()


def test_every_family_is_registered_and_others_are_refused():
    assert set(FAMILY_NAMES) == set(FAMILIES)
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported.*qwen2"):
        family_of("mamba", "x.gguf")


@pytest.mark.parametrize("arch", FAMILY_NAMES)
def test_logits_match_llama_cpp_at_every_position(tmp_path, arch):
    path = _write(tmp_path, arch)
    ours, ref = _ours(path, fused=False), _llama_cpp(path)
    assert (ours.argmax(1) == ref.argmax(1)).all()
    err = np.abs(ours - ref).max()
    assert err <= 0.02, f"{arch}: max |Δlogit| {err}"


@pytest.mark.parametrize("arch,change", [
    ("gemma2", {"gemma2.attention.sliding_window": 4096}),  # the window is smaller than the prompt
    ("gemma2", {"gemma2.attn_logit_softcapping": 1000.0}),
    ("gemma2", {"gemma2.final_logit_softcapping": 1000.0}),
    ("gemma3", {"gemma3.attention.sliding_window": 4096}),
    ("gemma3", {"gemma3.rope.freq_base_swa": 1000000.0}),  # the sliding layers' own RoPE base
    ("phi3", {"phi3.rope.scaling.attn_factor": 1.0}),
])
def test_each_feature_matters(tmp_path, arch, change):
    """Changing one of the family's numbers changes the logits, and llama.cpp agrees with both."""
    base = _write(tmp_path, arch)
    other = tmp_path / "changed.gguf"
    write_tiny_model(other, arch=arch, seed=3, n_layers=3, tied=False, extra_metadata=change)
    a, b = _ours(base), _ours(other)
    assert np.abs(a - b).max() > 0.05
    np.testing.assert_allclose(b, _llama_cpp(other), atol=0.02, rtol=0)


def test_phi3_long_factors_apply_beyond_the_original_context(tmp_path):
    """Contexts up to rope.scaling.original_context_length (256 here) rotate with the short factors,
    longer ones with the long factors (llama.cpp pads the context to 256 before it chooses; a real
    model's original context is a multiple of 256, so the choice is the same)."""
    path = _write(tmp_path, "phi3")
    short, long_ = _ours(path, n_ctx=128), _ours(path, n_ctx=400)
    assert np.abs(short - long_).max() > 0.05
    np.testing.assert_allclose(long_, _llama_cpp(path, n_ctx=400), atol=0.02, rtol=0)


@pytest.mark.parametrize("arch", FAMILY_NAMES)
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_fused_pass_equals_per_op_pass(tmp_path, arch, qtype):
    path = _write(tmp_path, arch, qtype=qtype)
    m = load_model(path, threads=2)
    try:
        if m.packed is None:
            pytest.skip("no packed kernels on this CPU: the per-op path is the only one")
        fused = m.new_context(128).eval(IDS, all_logits=True)
        per_op = m.new_context(128, fused=False).eval(IDS, all_logits=True)
        # token by token through the fused pass too (generation), over a window smaller than the prompt
        ctx = m.new_context(128)
        ctx.eval(IDS[:30])
        steps = np.concatenate([ctx.eval([t], all_logits=True) for t in IDS[30:]])
    finally:
        m.close()
    np.testing.assert_array_equal(fused, per_op)
    np.testing.assert_array_equal(steps, per_op[30:])


@pytest.mark.parametrize("arch", [a for a in FAMILY_NAMES if a != "qwen3"])
def test_q8_0_kv_cache_matches_llama_cpp_with_the_same_cache(tmp_path, arch):
    """Heads of 32 (q8_0 blocks): K·q against q8_0 keys, V dequantized, as llama.cpp with -ctk/-ctv q8_0."""
    path = tmp_path / f"{arch}-kv.gguf"
    write_tiny_model(path, arch=arch, seed=3, n_layers=3, tied=False, dim=128)
    ours, ref = _ours(path, cache="q8_0"), _llama_cpp(path, cache="q8_0")
    f16 = _ours(path)
    # llama.cpp rounds q's quants half to even (AVX2), we as its reference code (half away from zero)
    np.testing.assert_allclose(ours, ref, atol=5e-3, rtol=0)
    # the cache type shows, and we follow it
    assert np.abs(ours - f16).mean() > 10 * np.abs(ours - ref).mean()


def test_q8_0_kv_cache_is_refused_for_heads_not_made_of_32_value_blocks(tmp_path):
    path = _write(tmp_path, "qwen3")  # heads of 24, which llama.cpp refuses for q8_0 too
    m = load_model(path, threads=1)
    try:
        with pytest.raises(UsageError, match="multiple of 32"):
            m.new_context(64, type_k="q8_0")
        with pytest.raises(UsageError, match="cache type"):
            m.new_context(64, type_v="q4_0")
    finally:
        m.close()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fused_pass_equals_per_op_pass_with_a_q8_0_cache(tmp_path, arch):
    path = tmp_path / f"{arch}-kv-q4.gguf"
    write_tiny_model(path, arch=arch, seed=4, n_layers=3, tied=False, dim=128, qtype=Q.Q4_0)
    m = load_model(path, threads=2)
    try:
        if m.packed is None:
            pytest.skip("no packed kernels on this CPU: the per-op path is the only one")
        per_op = m.new_context(128, fused=False, type_k="q8_0", type_v="q8_0").eval(IDS, all_logits=True)
        fused = m.new_context(128, type_k="q8_0", type_v="q8_0").eval(IDS, all_logits=True)
        ctx = m.new_context(128, type_k="q8_0", type_v="q8_0")
        ctx.eval(IDS[:30])
        steps = np.concatenate([ctx.eval([t], all_logits=True) for t in IDS[30:]])
        assert ctx.kv.k.dtype == np.uint8 and ctx.kv_bytes < m.new_context(128).kv_bytes * 0.55
    finally:
        m.close()
    np.testing.assert_array_equal(fused, per_op)
    np.testing.assert_array_equal(steps, per_op[30:])


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_context_shift_with_a_q8_0_cache(tmp_path, arch):
    """q8_0 keys are dequantized, re-rotated and quantized again (as llama.cpp shifts a quantized K)."""
    from pipx_llama.engine.kernels.attention import q8_0_load_ref

    path = tmp_path / f"{arch}-kv-shift.gguf"
    write_tiny_model(path, arch=arch, seed=3, n_layers=3, tied=False, dim=128, qtype=Q.Q8_0)
    m = load_model(path, threads=2)
    try:
        shifted = m.new_context(96, n_batch=16, type_k="q8_0", type_v="q8_0")
        shifted.eval(IDS[:36])
        shifted.shift(4, 12)
        fresh = m.new_context(96, n_batch=16, type_k="q8_0", type_v="q8_0")
        fresh.eval(IDS[:4] + IDS[16:36])
        rows, window = shifted.kv.rows[0], shifted.kv.windows[0]
        read = np.arange(max(0, 24 - window + 1) if window else 0, 24) % rows
        k_shifted = q8_0_load_ref(shifted.kv.k_layer(0)[read])
        k_fresh = q8_0_load_ref(fresh.kv.k_layer(0)[read])
        assert shifted.n_past == 24 and np.isfinite(shifted.eval(IDS[36:38])).all()
    finally:
        m.close()
    # q8_0 steps are 1/127 of a block's largest value; the shifted keys went through two of them
    np.testing.assert_allclose(k_shifted, k_fresh, atol=2.5 / 127 * float(np.abs(k_fresh).max()))


def test_sliding_window_layers_keep_only_the_window(tmp_path):
    path = _write(tmp_path, "gemma3")
    m = load_model(path, threads=1)
    try:
        hp = m.hparams
        assert hp.swa_window == 5 and hp.swa_layers == (True, False, True)
        ctx = m.new_context(128, n_batch=16)
        assert ctx.kv.rows == [5 + 16, 128, 5 + 16]
        full = 3 * 128 * hp.n_kv_heads * hp.head_dim * 2 * 2
        assert ctx.kv_bytes < full * 0.5
    finally:
        m.close()


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_reuse_on_a_sliding_window_model(tmp_path, fused):
    """After a long evaluation a ring no longer holds an early prefix's window: reuse falls back to 0."""
    path = _write(tmp_path, "gemma3", qtype=Q.Q8_0)
    m = load_model(path, threads=2)
    try:
        ctx = m.new_context(128, n_batch=8, fused=fused)
        ctx.eval(IDS)
        assert ctx.reusable(len(IDS)) == len(IDS)
        assert ctx.reusable(len(IDS) - 4) == len(IDS) - 4  # its window is still in every ring
        assert ctx.reusable(10) == 0
        with pytest.raises(Exception, match="sliding-window"):
            ctx.truncate(10)
        ctx.truncate(len(IDS) - 4)
        again = ctx.eval(IDS[-4:], all_logits=True)
        fresh = m.new_context(128, n_batch=8, fused=fused).eval(IDS, all_logits=True)[-4:]
    finally:
        m.close()
    np.testing.assert_allclose(again, fresh, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "phi3"])
@pytest.mark.parametrize("fused", [True, False])
def test_context_shift_rerotates_every_layers_keys(tmp_path, arch, fused):
    """Layer 0's keys depend only on token and position: after dropping 12 positions, the keys the next
    position reads equal a fresh evaluation's of the kept tokens (up to f16 rounding), in a ring
    (gemma3's layer 0 slides) or not."""
    path = _write(tmp_path, arch, qtype=Q.Q8_0)
    m = load_model(path, threads=2)
    try:
        shifted = m.new_context(96, n_batch=16, fused=fused)
        shifted.eval(IDS[:36])
        shifted.shift(4, 12)
        fresh = m.new_context(96, n_batch=16, fused=fused)
        fresh.eval(IDS[:4] + IDS[16:36])
        rows, window = shifted.kv.rows[0], shifted.kv.windows[0]
        read = (
            np.arange(max(0, 24 - window + 1) if window else 0, 24) % rows
        )  # what position 24 reads, by row
        k_shifted = shifted.kv.k_layer(0)[read].astype(np.float32)
        k_fresh = fresh.kv.k_layer(0)[read].astype(np.float32)
        assert shifted.n_past == 24 and np.isfinite(shifted.eval(IDS[36:38])).all()
    finally:
        m.close()
    # both sides are rounded to f16; the shifted one twice
    np.testing.assert_allclose(k_shifted, k_fresh, atol=4e-3 * max(1.0, float(np.abs(k_fresh).max())))
