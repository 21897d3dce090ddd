"""Tests of the non-matmul kernels (pipx_llama.engine.kernels.ops): each numba kernel against its
numpy twin on random data, plus semantic checks (RoPE's relative-position property) and the exactness
of the F16 and exp helpers. Attention's tests are in test_kernels_attention.py."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from pipx_llama.engine.kernels import ops


@njit
def _map_f16_to_f32(h, out):
    for i in range(h.shape[0]):
        out[i] = ops.f16_bits_to_f32(h[i])


@njit
def _map_f16_to_f32_hw(h, out):
    for i in range(h.shape[0]):
        out[i] = ops.f16_bits_to_f32_hw(h[i])


@njit
def _map_f32_to_f16(x, out):
    for i in range(x.shape[0]):
        out[i] = ops.f32_to_f16_bits_sw(x[i])


@njit
def _map_f32_to_f16_hw(x, out):
    for i in range(x.shape[0]):
        out[i] = ops.f32_to_f16_bits_hw(x[i])


@njit(fastmath=ops._FAST)
def _map_f32_to_f16_fast(x, out):
    for i in range(x.shape[0]):
        out[i] = ops.f32_to_f16_bits(x[i])


@njit(fastmath=ops._FAST)
def _map_expf(x, out):
    for i in range(x.shape[0]):
        out[i] = ops._expf(x[i])


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("hw", [False, True])
def test_f16_to_f32_exhaustive(hw):
    if hw and not ops.HAVE_F16C:
        pytest.skip("numba does not target F16C here")
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.size, np.float32)
    (_map_f16_to_f32_hw if hw else _map_f16_to_f32)(bits, out)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))


@pytest.mark.parametrize("variant", ["sw", "hw", "fastmath caller"])
def test_f32_to_f16_matches_numpy_rounding(variant):
    if variant == "hw" and not ops.HAVE_F16C:
        pytest.skip("numba does not target F16C here")
    convert = {"sw": _map_f32_to_f16, "hw": _map_f32_to_f16_hw,
               "fastmath caller": _map_f32_to_f16_fast}[variant]
    rng = _rng(1)
    x = (rng.standard_normal(200_000) * np.exp(rng.uniform(-30, 15, 200_000))).astype(np.float32)
    edges = [0.0, -0.0, 65504.0, 65519.99, 65520.0, -70000.0, np.inf, -np.inf, 5.96e-8, 2.98e-8, 2.99e-8,
             6.1e-5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2049.0, 2051.0]
    x = np.concatenate([x, np.array(edges, np.float32), np.arange(-4096, 4096, 0.25, dtype=np.float32)])
    out = np.empty(x.size, np.uint16)
    convert(x, out)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(out, ref)
    nan = np.empty(1, np.uint16)
    convert(np.array([np.nan], np.float32), nan)
    assert np.isnan(nan.view(np.float16)[0])


def test_expf_within_two_ulp_and_limits():
    x = np.concatenate([np.linspace(-103.0, 88.7, 400_001), np.linspace(-1, 1, 10_001)]).astype(np.float32)
    out = np.empty_like(x)
    _map_expf(x, out)
    ref = np.exp(x.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    normal = ref > np.finfo(np.float32).tiny
    assert (np.abs(out - ref)[normal] / ulp[normal]).max() < 2.0
    assert np.all(np.abs(out - ref)[~normal] <= 2 * ulp[~normal])
    lim = np.empty(4, np.float32)
    _map_expf(np.array([-np.inf, -200.0, 89.0, 0.0], np.float32), lim)
    assert lim[0] == 0.0 and lim[1] == 0.0 and np.isinf(lim[2]) and lim[3] == 1.0


# ----------------------------------------------------------------------------- rmsnorm


@pytest.mark.parametrize("T,dim", [(1, 576), (33, 576), (20, 4096)])
def test_rmsnorm_matches_ref(T, dim):
    rng = _rng(T)
    x = (rng.standard_normal((T, dim)) * 3).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    out = np.empty_like(x)
    ops.rmsnorm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, ops.rmsnorm_ref(x, w, 1e-5), rtol=1e-6, atol=0)
    # the normalized rows have unit RMS (weight 1)
    ones = np.ones(dim, np.float32)
    ops.rmsnorm(x, ones, 1e-6, out)
    np.testing.assert_allclose(np.sqrt((out.astype(np.float64) ** 2).mean(axis=1)), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- rope


def test_rope_cache_matches_ref_and_ggml_recurrence():
    cos, sin = ops.rope_cache(2048, 64, 10000.0)
    cos_r, sin_r = ops.rope_cache_ref(2048, 64, 10000.0)
    assert cos.shape == sin.shape == (2048, 32) and cos.dtype == np.float32
    np.testing.assert_allclose(cos, cos_r, rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(sin, sin_r, rtol=0, atol=1.2e-7)
    # pair 0 turns by exactly the position; later pairs by the float32 recurrence, close to p*base^(-2i/n)
    np.testing.assert_allclose(cos[:, 0], np.cos(np.arange(2048.0)), atol=2e-7)
    exact = np.arange(2048.0)[:, None] * 10000.0 ** (-2.0 * np.arange(32) / 64)
    np.testing.assert_allclose(cos, np.cos(exact), atol=5e-4)
    c2, _ = ops.rope_cache(16, 64, 10000.0, freq_scale=0.25)
    np.testing.assert_allclose(c2[8], cos[2], atol=2e-7)
    with pytest.raises(ValueError):
        ops.rope_cache(16, 63, 10000.0)


def test_rope_cache_with_llama31_factors():
    factors = np.linspace(1.0, 8.0, 32).astype(np.float32)
    cos, sin = ops.rope_cache(1024, 64, 500000.0, factors=factors)
    cos_r, sin_r = ops.rope_cache_ref(1024, 64, 500000.0, factors=factors)
    np.testing.assert_allclose(cos, cos_r, rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(sin, sin_r, rtol=0, atol=1.2e-7)
    plain_cos, plain_sin = ops.rope_cache(1024, 64, 500000.0)
    ones_cos, ones_sin = ops.rope_cache(1024, 64, 500000.0, factors=np.ones(32, np.float32))
    assert np.array_equal(ones_cos, plain_cos) and np.array_equal(ones_sin, plain_sin)
    # a factor of 2 halves every angle exactly: position 2p then turns as far as position p did
    twice_cos, twice_sin = ops.rope_cache(1024, 64, 500000.0, factors=np.full(32, 2.0, np.float32))
    assert (np.array_equal(twice_cos[0:1024:2], plain_cos[:512])
            and np.array_equal(twice_sin[0:1024:2], plain_sin[:512]))
    with pytest.raises(ValueError):
        ops.rope_cache(16, 64, 10000.0, factors=np.ones(16, np.float32))


@pytest.mark.parametrize("T,H,D,n_rot,start", [(1, 9, 64, 64, 0), (1, 32, 128, 128, 700), (33, 9, 64, 64, 5),
                                               (33, 32, 128, 128, 0), (7, 3, 64, 32, 100)])
def test_rope_matches_ref(T, H, D, n_rot, start):
    rng = _rng(T * H)
    cos, sin = ops.rope_cache(1024, n_rot, 500000.0 if D == 128 else 10000.0)
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    positions = np.arange(start, start + T, dtype=np.int32)
    ref = ops.rope_ref(x, positions, cos, sin)
    ops.rope(x, positions, cos, sin)
    np.testing.assert_array_equal(x, ref)
    if n_rot < D:
        np.testing.assert_array_equal(x[..., n_rot:], ref[..., n_rot:])


@pytest.mark.parametrize("T,H,D,n_rot,start", [(1, 12, 128, 128, 0), (33, 9, 64, 64, 5), (7, 3, 96, 64, 100),
                                               (5, 4, 256, 256, 3000)])
def test_rope_neox_matches_ref(T, H, D, n_rot, start):
    rng = _rng(T * H + 1)
    cos, sin = ops.rope_cache(4096, n_rot, 1000000.0)
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    positions = np.arange(start, start + T, dtype=np.int32)
    ref = ops.rope_neox_ref(x, positions, cos, sin)
    ops.rope_neox(x, positions, cos, sin)
    np.testing.assert_array_equal(x, ref)
    np.testing.assert_array_equal(x[..., n_rot:], ref[..., n_rot:])


def test_rope_neox_pairs_the_two_halves():
    """Position 1 with one angle rotates (x[0], x[half]) and leaves the normal layout's partner alone."""
    cos, sin = ops.rope_cache(4, 4, 10000.0)
    x = np.array([[[1.0, 0.0, 0.0, 0.0]]], np.float32)
    ops.rope_neox(x, np.array([1], np.int32), cos, sin)
    np.testing.assert_allclose(x[0, 0], [np.cos(1.0), 0.0, np.sin(1.0), 0.0], atol=1e-6)


def test_rope_cache_mscale_multiplies_cos_and_sin():
    plain = ops.rope_cache(64, 32, 10000.0)
    scaled = ops.rope_cache(64, 32, 10000.0, mscale=1.1902380714238083)
    ref = ops.rope_cache_ref(64, 32, 10000.0, mscale=1.1902380714238083)
    for a, b, r in zip(plain, scaled, ref):
        np.testing.assert_array_equal(b, a * np.float32(1.1902380714238083))
        np.testing.assert_allclose(b, r, rtol=0, atol=1.5e-7)


def test_rope_dot_depends_only_on_relative_position():
    rng = _rng(3)
    cos, sin = ops.rope_cache(4096, 128, 10000.0)
    q = rng.standard_normal((1, 1, 128)).astype(np.float32)
    k = rng.standard_normal((1, 1, 128)).astype(np.float32)

    def dot(m: int, n: int) -> float:
        qq, kk = q.copy(), k.copy()
        ops.rope(qq, np.array([m], np.int32), cos, sin)
        ops.rope(kk, np.array([n], np.int32), cos, sin)
        return float(qq.astype(np.float64).ravel() @ kk.astype(np.float64).ravel())

    for delta in (0, 1, 17, 300):
        values = [dot(n + delta, n) for n in (0, 5, 123, 1000, 3000)]
        np.testing.assert_allclose(values, values[0], rtol=0, atol=2e-3 * np.abs(q).sum())
    # and it does depend on the offset
    assert abs(dot(1, 0) - dot(40, 0)) > 1e-3


# ----------------------------------------------------------------------------- elementwise, softmax


@pytest.mark.parametrize("T,n", [(1, 1536), (33, 1536), (20, 11008)])
def test_swiglu_matches_ref(T, n):
    rng = _rng(n + T)
    gate = (rng.standard_normal((T, n)) * 6).astype(np.float32)
    gate[0, :4] = [-100.0, 100.0, 0.0, -0.0]
    up = rng.standard_normal((T, n)).astype(np.float32)
    out = np.empty_like(gate)
    ops.swiglu(gate, up, out)
    ref = ops.swiglu_ref(gate, up)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-37)
    assert np.all(np.isfinite(out))


def test_gelu_table_matches_ggml_formula():
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    finite = np.isfinite(x) & (np.abs(x) < 10)
    xf = x[finite].astype(np.float64)
    exact = 0.5 * xf * (1 + np.tanh(0.7978845608028654 * xf * (1 + 0.044715 * xf * xf)))
    table = ops.GELU_F16_TABLE[finite].view(np.float16).astype(np.float64)
    # one F16 rounding of the float32 formula (absolute near zero: F16 subnormals are 6e-8 apart)
    np.testing.assert_allclose(table, exact, rtol=1e-3, atol=2e-7)


@pytest.mark.parametrize("T,n", [(1, 2048), (33, 1536), (16, 8192)])
def test_geglu_matches_ref(T, n):
    rng = _rng(n + T + 7)
    gate = (rng.standard_normal((T, n)) * 6).astype(np.float32)
    gate[0, :6] = [-100.0, 100.0, 0.0, -0.0, -10.0, 10.0]
    up = rng.standard_normal((T, n)).astype(np.float32)
    out = np.empty_like(gate)
    ops.geglu(gate, up, ops.GELU_F16_TABLE, out)
    np.testing.assert_array_equal(out, ops.geglu_ref(gate, up))
    assert out[0, 0] == 0.0 and out[0, 1] == 100.0 * up[0, 1]


def test_softcap_matches_ref_and_bounds_the_values():
    rng = _rng(9)
    x = (rng.standard_normal((3, 5000)) * 40).astype(np.float32)
    ref = ops.softcap_ref(x, 30.0)
    ops.softcap(x, 30.0)
    np.testing.assert_allclose(x, ref, rtol=2e-7, atol=2e-6)
    assert np.abs(x).max() <= 30.0


@pytest.mark.parametrize("T,dim", [(1, 576), (33, 4096)])
def test_add_inplace_matches_ref(T, dim):
    rng = _rng(dim)
    x = rng.standard_normal((T, dim)).astype(np.float32)
    y = rng.standard_normal((T, dim)).astype(np.float32)
    ref = ops.add_inplace_ref(x, y)
    ops.add_inplace(x, y)
    np.testing.assert_array_equal(x, ref)


def test_row_max_orders_like_floats():
    rng = _rng(9)
    for row in (rng.standard_normal(1000).astype(np.float32) - 50, rng.standard_normal(77).astype(np.float32),
                np.array([-np.inf, -3.0, -np.inf], np.float32), np.array([-np.inf], np.float32),
                np.array([-0.0, -1e-45, -2.0], np.float32), np.array([1e-45, 0.0, -0.0], np.float32)):
        assert ops._row_max(row) == row.max()
    assert np.isnan(ops._row_max(np.array([1.0, np.nan, 2.0], np.float32)))


@pytest.mark.parametrize("T,vocab", [(1, 49152), (5, 32000), (12, 1000)])
def test_softmax_and_log_softmax_match_ref(T, vocab):
    rng = _rng(vocab)
    x = (rng.standard_normal((T, vocab)) * 8).astype(np.float32)
    x[0, :3] = -np.inf  # masked tokens, as samplers produce
    p = np.empty_like(x)
    ops.softmax(x, p)
    np.testing.assert_allclose(p, ops.softmax_ref(x), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(p.astype(np.float64).sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(p[0, :3] == 0.0)
    lp = np.empty_like(x)
    ops.log_softmax(x, lp)
    finite = np.isfinite(x)
    np.testing.assert_allclose(lp[finite], ops.log_softmax_ref(x)[finite], rtol=1e-6, atol=1e-4)
    assert np.all(lp[0, :3] == -np.inf)


@pytest.mark.parametrize("k", [1, 2, 7, 40, 1000])
def test_top_k_matches_ref_with_ties(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal(49152).astype(np.float32)
    x[rng.integers(0, x.size, 2000)] = np.float32(2.5)  # many ties, some among the best
    x[:3] = x.max()
    out = np.empty(k, np.int64)
    ops.top_k(x, out)
    np.testing.assert_array_equal(out, ops.top_k_ref(x, k))


@pytest.mark.parametrize("n", [49152, 151936, 4000, 100])
def test_top_k_blocks_hold_every_winner(n):
    """The first pass keeps only blocks whose max reaches the k-th largest block max: winners spread over
    many blocks, crowded into one, tied with that max, or in the short last block are all found (100
    values: too few blocks for k, one heap over all)."""
    rng = np.random.default_rng(n)
    k = 8
    cases = []
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.choice(n, k, replace=False)] = np.float32(9.0)  # one winner in each of k blocks, most likely
    cases.append(x)
    x = rng.standard_normal(n).astype(np.float32)
    x[64:64 + 2 * k] = np.linspace(5, 6, 2 * k, dtype=np.float32)  # every winner in one block
    cases.append(x)
    x = np.zeros(n, np.float32)
    x[::97] = np.float32(1.0)  # block maxima tied with each other and with the k-th value
    cases.append(x)
    x = rng.standard_normal(n).astype(np.float32)
    x[-1] = np.float32(7.0)  # a winner in the last (short) block
    cases.append(x)
    x = rng.standard_normal(n).astype(np.float32)
    x[3] = np.nan  # a nan max: the heap reads every block, as before
    cases.append(x)
    for x in cases:
        out = np.empty(k, np.int64)
        ops.top_k(x, out)
        want = ops.top_k_ref(x, k) if not np.isnan(x).any() else _heap_every_value(x, k)
        np.testing.assert_array_equal(out, want)


def _heap_every_value(x, k):
    out = np.empty(k, np.int64)
    ops._heap_of_blocks(x, out, np.arange((x.size + ops.TOP_K_BLOCK - 1) // ops.TOP_K_BLOCK), ops.TOP_K_BLOCK)
    return out


def test_top_k_of_none_writes_nothing():
    buf = np.full(4, -1, np.int64)
    ops.top_k(np.arange(1000, dtype=np.float32), buf[:0])  # k = 0: not even past the end of ``out``
    np.testing.assert_array_equal(buf, -1)


def test_top_k_of_the_whole_array_is_a_stable_descending_sort():
    x = np.array([1.0, 3.0, 3.0, -2.0, 0.5, 3.0], np.float32)
    out = np.empty(x.size, np.int64)
    ops.top_k(x, out)
    np.testing.assert_array_equal(out, [1, 2, 5, 0, 4, 3])
    np.testing.assert_array_equal(out, np.argsort(-x, kind="stable"))


@pytest.mark.parametrize("n", [1, 2, 40, 300])
def test_candidate_probs_matches_ref(n):
    """top-p, min-p and temperature over candidates sorted largest first, ties included: the same number
    kept and the same probabilities as the numpy twin (to rounding: exp and the sums are computed apart)."""
    rng = np.random.default_rng(n)
    for scale in (0.1, 1.0, 5.0):
        vals = np.sort(rng.standard_normal(n) * scale)[::-1].copy()
        if n > 4:
            vals[1:4] = vals[1]  # ties among the best
        for top_p in (1.0, 0.95, 0.5, 0.01):
            for min_p in (0.0, 0.05, 0.5):
                for temperature in (0.1, 0.7, 1.0, 2.0):
                    probs = np.full(n + 1, -1.0)
                    keep = ops.candidate_probs(vals, top_p, min_p, temperature, probs)
                    want = ops.candidate_probs_ref(vals, top_p, min_p, temperature)
                    assert keep == want.size, (scale, top_p, min_p, temperature)
                    np.testing.assert_allclose(probs[:keep], want, rtol=1e-12)
                    assert probs[n] == -1.0  # nothing written past the candidates


def test_candidate_probs_filters_as_documented():
    vals = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    probs = np.empty(4)
    assert ops.candidate_probs(vals, 0.75, 0.0, 1.0, probs) == 2  # 0.5 + 0.3 reaches 0.75
    np.testing.assert_allclose(probs[:2], [0.625, 0.375])
    assert ops.candidate_probs(vals, 1.0, 0.25, 1.0, probs) == 3  # 0.15 >= 0.25 * 0.5, 0.05 is not
    assert ops.candidate_probs(vals, 1.0, 1.0, 1.0, probs) == 1
    assert ops.candidate_probs(vals, 1.0, 0.0, 1.0, probs) == 4
    np.testing.assert_allclose(probs, [0.5, 0.3, 0.15, 0.05])


def test_draw_is_numpys_choice():
    """The draw from a generator's next uniform number picks what Generator.choice(n, p=probs) picks from the
    same state (and the numpy twin agrees), and leaves the generator where choice leaves it."""
    for seed in range(3000):
        n = 1 + seed % 50
        probs = np.random.default_rng(seed).random(n) ** 4
        probs /= probs.sum()
        theirs, ours = np.random.default_rng(seed + 1), np.random.default_rng(seed + 1)
        u = ours.random()
        assert ops.draw(probs, u) == ops.draw_ref(probs, u) == theirs.choice(n, p=probs), seed
        assert ours.random() == theirs.random()
    probs = np.array([0.25, 0.0, 0.75])
    assert [ops.draw(probs, u) for u in (0.0, 0.2499, 0.25, 0.9999)] == [0, 0, 2, 2]  # never a p = 0 entry


@njit
def _block_reductions(x, q, out_max, out_sums):
    for t in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            out_max[t, b] = ops.block32_absmax(x, t, 32 * b)
            out_sums[t, b] = ops.block32_sum_i8(q, t, 32 * b)


@pytest.mark.parametrize("step", [1, 2])  # rows of adjacent elements (one vector load), and with gaps
def test_block_reductions_match_numpy_on_row_slices(step):
    rng = np.random.default_rng(7)
    wide = (rng.standard_normal((5, 320)) * 50).astype(np.float32)
    wide[2, 40 * step] = -1e30  # the largest magnitude is a negative value
    qwide = rng.integers(-128, 128, (5, 320)).astype(np.int8)
    x, q = wide[1:4, : 128 * step : step], qwide[1:4, : 128 * step : step]  # rows of a wider buffer
    maxes = np.empty((3, 4), np.float32)
    sums = np.empty((3, 4), np.int32)
    _block_reductions(x, q, maxes, sums)
    np.testing.assert_array_equal(maxes, np.abs(x).reshape(3, 4, 32).max(axis=2))
    np.testing.assert_array_equal(sums, q.astype(np.int32).reshape(3, 4, 32).sum(axis=2))
