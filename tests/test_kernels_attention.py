"""Tests of attention and the KV cache rows (pipx_llama.engine.kernels.attention): each numba kernel
against its numpy twin on random data (f32, f16 and q8_0 caches, windows, soft-caps, rings), plus the
semantic check against a plain masked softmax."""

from __future__ import annotations

import numpy as np
import pytest

from pipx_llama.engine.kernels import attention


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)



def _kv(rng, n_ctx, kvh, D, dtype):
    return (rng.standard_normal((n_ctx, kvh, D)) * 2).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("T,start_pos", [(1, 0), (1, 77), (33, 0), (33, 40)])
@pytest.mark.parametrize("H,KVH,D", [(9, 3, 64), (6, 6, 64), (6, 2, 128), (4, 4, 128)])
def test_attention_matches_ref(dtype, T, start_pos, H, KVH, D):
    rng = _rng(T + start_pos + H + D)
    n_ctx = start_pos + T + 5
    q = (rng.standard_normal((T, H, D)) * 2).astype(np.float32)
    k, v = _kv(rng, n_ctx, KVH, D, dtype), _kv(rng, n_ctx, KVH, D, dtype)
    out = np.empty_like(q)
    attention.attention(q, k, v, start_pos, out)
    ref = attention.attention_ref(q, k, v, start_pos)
    vmax = np.abs(v.astype(np.float32)).max()
    # F16 rounding of a probability turns a last-bit difference of the scores (summation order)
    # into an F16 ulp now and then
    np.testing.assert_allclose(out, ref, rtol=0, atol=(2e-5 if dtype == np.float32 else 3e-4) * vmax)
    np.testing.assert_allclose(np.median(np.abs(out - ref)), 0.0, atol=1e-6 * vmax)


def _q8_rows(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[:-1] + (x.shape[-1] // 32 * 34,), np.uint8)
    for idx in np.ndindex(x.shape[:-1]):
        attention.q8_0_store_row(x[idx], out[idx])
    return out


def test_q8_0_store_row_matches_ref_and_ggml_blocks():
    from pipx_llama.formats import legacy as ql

    rng = _rng(21)
    x = (rng.standard_normal(256) * rng.uniform(0.01, 50)).astype(np.float32)
    x[:32] = 0.0  # an all-zero block: d = 0, every quant 0
    x[32:64] = np.arange(32, dtype=np.float32) - 16.0  # ties of the rounding (x/d = k + 0.5 for some)
    got = np.empty(256 // 32 * 34, np.uint8)
    attention.q8_0_store_row(x, got)
    np.testing.assert_array_equal(got, attention.q8_0_store_row_ref(x))
    qs, d = ql.quantize_row_q8_0(x[None, :])  # the quantizer's own reference (llama.cpp's bytes)
    blocks = got.reshape(-1, 34)
    np.testing.assert_array_equal(blocks[:, 2:].view(np.int8).reshape(-1), qs[0])
    np.testing.assert_array_equal(blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0], d[0])
    back = np.empty(256, np.float32)
    attention.q8_0_load_row(got, back)
    np.testing.assert_array_equal(back, attention.q8_0_load_ref(got))


@pytest.mark.parametrize("types", [("q8_0", "q8_0"), ("q8_0", "f16"), ("f16", "q8_0")])
@pytest.mark.parametrize("T,start_pos,window,softcap", [(1, 50, 0, 0.0), (9, 20, 0, 0.0), (5, 30, 8, 30.0)])
def test_attention_over_q8_0_caches_matches_ref(types, T, start_pos, window, softcap):
    rng = _rng(T + start_pos)
    H, KVH, D = 6, 2, 64
    n_ctx = start_pos + T + 3
    q = (rng.standard_normal((T, H, D)) * 2).astype(np.float32)
    k, v = _kv(rng, n_ctx, KVH, D, np.float32), _kv(rng, n_ctx, KVH, D, np.float32)
    kc = _q8_rows(k) if types[0] == "q8_0" else k.astype(np.float16)
    vc = _q8_rows(v) if types[1] == "q8_0" else v.astype(np.float16)
    out = np.empty_like(q)
    attention.attention(q, kc, vc, start_pos, out, window=window, softcap=softcap)
    ref = attention.attention_ref(q, kc, vc, start_pos, window=window, softcap=softcap)
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-4 * np.abs(v).max())
    # and the q8_0 side really is read as q8_0: f16 copies of the same values give other results
    out16 = np.empty_like(q)
    attention.attention(q, k.astype(np.float16), v.astype(np.float16), start_pos, out16, window=window,
                        softcap=softcap)
    assert np.abs(out16 - out).max() > 10 * np.abs(out - ref).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_independent_of_chunking(dtype):
    rng = _rng(11)
    T, H, KVH, D, start = 33, 9, 3, 64, 60
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k, v = _kv(rng, 128, KVH, D, dtype), _kv(rng, 128, KVH, D, dtype)
    ku, vu = attention._as_kernel_cache(k), attention._as_kernel_cache(v)
    results = []
    for n_chunks in (1, 2, 5):
        out = np.empty_like(q)
        attention.attention_kernel(q, ku, vu, start, 0, np.float32(1), attention.attention_scale(D),
                                   np.float32(0), out, attention.attention_scratch(128, D, n_chunks))
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def _plain_attention(q, k, v, start_pos):
    """Masked-softmax attention written the textbook way, in float64."""
    T, H, D = q.shape
    n = start_pos + T
    group = H // k.shape[1]
    kk = np.repeat(k[:n].astype(np.float64), group, axis=1)  # [n, H, D]
    vv = np.repeat(v[:n].astype(np.float64), group, axis=1)
    scores = np.einsum("thd,jhd->htj", q.astype(np.float64), kk) / np.sqrt(D)
    allowed = np.arange(n)[None, :] <= (start_pos + np.arange(T))[:, None]  # [T, n]
    scores = np.where(allowed[None], scores, -np.inf)
    p = np.exp(scores - scores.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    return np.einsum("htj,jhd->thd", p, vv)


@pytest.mark.parametrize("H,KVH,D,start_pos", [(9, 3, 64, 0), (8, 8, 128, 0), (9, 3, 64, 50)])
def test_attention_equals_plain_masked_softmax(H, KVH, D, start_pos):
    rng = _rng(H * D)
    T = 40
    n_ctx = start_pos + T
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k, v = _kv(rng, n_ctx, KVH, D, np.float32), _kv(rng, n_ctx, KVH, D, np.float32)
    out = np.empty_like(q)
    attention.attention(q, k, v, start_pos, out)
    np.testing.assert_allclose(out, _plain_attention(q, k, v, start_pos), rtol=0, atol=1e-5)
    # F16 storage changes the answer only by F16 rounding
    out16 = np.empty_like(q)
    attention.attention(q, k.astype(np.float16), v.astype(np.float16), start_pos, out16)
    np.testing.assert_allclose(out16, out, rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("T,start_pos,window", [(1, 0, 4), (1, 77, 16), (33, 40, 16), (20, 3, 100)])
@pytest.mark.parametrize("softcap,q_scale,kq_scale",
                         [(0.0, 1.0, None), (50.0, 0.0625, 1.0), (3.0, 1.0, None)])
def test_attention_window_and_caps_match_ref(dtype, T, start_pos, window, softcap, q_scale, kq_scale):
    rng = _rng(T + start_pos + window)
    H, KVH, D = 6, 2, 64
    q = (rng.standard_normal((T, H, D)) * 2).astype(np.float32)
    k, v = _kv(rng, start_pos + T, KVH, D, dtype), _kv(rng, start_pos + T, KVH, D, dtype)
    kw = {"window": window, "q_scale": q_scale, "kq_scale": kq_scale, "softcap": softcap}
    out = np.empty_like(q)
    attention.attention(q, k, v, start_pos, out, **kw)
    ref = attention.attention_ref(q, k, v, start_pos, **kw)
    vmax = np.abs(v.astype(np.float32)).max()
    np.testing.assert_allclose(out, ref, rtol=0, atol=(3e-5 if dtype == np.float32 else 3e-4) * vmax)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_over_a_ring_equals_attention_over_the_whole_cache(dtype):
    """A sliding-window layer keeps position p in row p % R: the result equals a full cache's."""
    rng = _rng(21)
    H, KVH, D, window, T, start = 4, 2, 64, 8, 5, 37
    n = start + T
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k, v = _kv(rng, n, KVH, D, dtype), _kv(rng, n, KVH, D, dtype)
    R = window + T
    ring_k, ring_v = np.zeros((R, KVH, D), dtype), np.zeros((R, KVH, D), dtype)
    for p in range(n - R, n):
        ring_k[p % R], ring_v[p % R] = k[p], v[p]
    full, ring = np.empty_like(q), np.empty_like(q)
    attention.attention(q, k, v, start, full, window=window)
    attention.attention(q, ring_k, ring_v, start, ring, window=window)
    np.testing.assert_allclose(ring, full, rtol=0, atol=1e-6 * np.abs(v.astype(np.float32)).max())
    # the window matters: attending to everything differs
    everything = np.empty_like(q)
    attention.attention(q, k, v, start, everything)
    assert np.abs(everything - full).max() > 1e-3
    # the batch reads window + T - 1 positions at once: one row fewer cannot hold them
    attention.attention(q, ring_k, ring_v, start, ring, window=window)
    with pytest.raises(ValueError):
        attention.attention(q, ring_k[: window + T - 2], ring_v[: window + T - 2], start, ring, window=window)


def test_attention_first_token_returns_its_value():
    rng = _rng(5)
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    v = _kv(rng, 8, 2, 64, np.float32)
    out = np.empty_like(q)
    attention.attention(q, _kv(rng, 8, 2, 64, np.float32), v, 0, out)
    np.testing.assert_allclose(out[0], np.repeat(v[0], 2, axis=0), rtol=1e-6)


def test_attention_rejects_mismatched_shapes():
    q = np.zeros((2, 9, 64), np.float32)
    k = np.zeros((16, 3, 64), np.float16)
    with pytest.raises(ValueError):
        attention.attention(q, k, k, 15, np.empty_like(q))  # positions 15..16 exceed the cache
    with pytest.raises(ValueError):
        attention.attention(q, np.zeros((16, 4, 64), np.float16), np.zeros((16, 4, 64), np.float16), 0,
                            np.empty_like(q))
    with pytest.raises(ValueError):
        attention.attention(q, k, k, 0, np.empty_like(q), scratch=np.empty((2, 10), np.float32))
    with pytest.raises(TypeError):
        attention.attention(q, k.astype(np.float64), k.astype(np.float64), 0, np.empty_like(q))


@pytest.mark.skipif(not attention.ROW_BLOCKS, reason="no SIMD tier: the rows go one by one")
@pytest.mark.parametrize("D", [64, 96, 128, 256])
def test_row_blocks_match_numpy(D):
    """One score block and one V pass against numpy in float64, at an offset inside the cache and the
    vectors (the blocks read row r0 + r of one KV head; the scores land at ``off``)."""
    from numba import njit

    rng = _rng(D)
    kvh, r0, off = 1, 5, 3
    cache = (rng.standard_normal((r0 + 20, 3, D)) * 2).astype(np.float16)
    q = rng.standard_normal(D).astype(np.float16).astype(np.float32)
    scores = np.full(off + attention.SCORE_ROWS + 4, np.nan, np.float32)

    @njit
    def blocks(q, cache, scores, acc):
        attention._score_block(q, cache, r0, kvh, np.float32(0.125), scores, off)
        attention._v_block(scores, off, cache, r0, kvh, acc)

    acc = rng.standard_normal(D).astype(np.float32)
    acc0 = acc.copy()
    blocks(q, cache.view(np.uint16), scores, acc)
    k = cache[r0 : r0 + attention.SCORE_ROWS, kvh].astype(np.float64)
    want = (k @ q.astype(np.float64)) * 0.125
    np.testing.assert_allclose(scores[off : off + attention.SCORE_ROWS], want, rtol=1e-5, atol=1e-5)
    assert np.isnan(scores[:off]).all() and np.isnan(scores[off + attention.SCORE_ROWS :]).all()
    p = scores[off : off + attention.V_ROWS].astype(np.float64)
    v = cache[r0 : r0 + attention.V_ROWS, kvh].astype(np.float64)
    np.testing.assert_allclose(acc, acc0 + p @ v, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("D", [40, 64])
@pytest.mark.parametrize("start_pos", range(0, 40, 3))
def test_attention_blocks_and_tails_match_ref(D, start_pos):
    """Every number of cached rows up to a few blocks, so full blocks and the rows after them (one by one)
    both count; D = 40 is no multiple of the block's lanes and takes the row-by-row loops throughout."""
    rng = _rng(start_pos + D)
    q = (rng.standard_normal((1, 6, D)) * 2).astype(np.float32)
    k, v = _kv(rng, start_pos + 1, 2, D, np.float16), _kv(rng, start_pos + 1, 2, D, np.float16)
    out = np.empty_like(q)
    attention.attention(q, k, v, start_pos, out)
    ref = attention.attention_ref(q, k, v, start_pos)
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-4 * np.abs(v.astype(np.float32)).max())


@pytest.mark.parametrize("cache", ["f16", "q8_0"])
def test_score_and_v_loops_ask_for_rows_ahead(cache):
    """Each loop over cache rows prefetches the row PREFETCH_ROWS on (a hint: the results are the tests
    above), and the hint reaches the machine code."""
    from numba import njit

    fast = attention._FAST
    if cache == "f16":
        loops = (attention._scores, attention._accumulate, attention._scores_f16, attention._accumulate_f16)
        k = np.zeros((40, 2, 64), np.uint16)
        args = ((np.zeros(64, np.float32), k, 1, 0, 37, np.zeros(40, np.float32), 0, np.float32(0),
                 np.float32(0), np.float32(1)),
                (np.ones(40, np.float32), 0, k, 1, 0, 37, np.zeros(64, np.float32)))
        args = args * 2
    else:
        loops = (attention._scores_q8, attention._accumulate_q8)
        k = np.zeros((40, 2, 68), np.uint8)
        args = ((np.zeros(64, np.float32), np.zeros(2, np.float32), k, 1, 0, 37, np.zeros(40, np.float32),
                 0, np.float32(0), np.float32(0), np.float32(1)),
                (np.ones(40, np.float32), 0, k, 1, 0, 37, np.zeros(64, np.float32)))
    for loop, a in zip(loops, args, strict=True):
        # a fresh compile: numba shows no assembly of cached code
        fresh = njit(loop.py_func, fastmath=fast, error_model="numpy")
        fresh(*a)
        asm = fresh.inspect_asm(fresh.signatures[0])
        assert "prefetcht0" in asm or "prfm" in asm, loop.py_func.__name__  # x86, ARM
