"""Packed (rows-as-lanes) SIMD kernels: bit-identical to the portable legacy kernels, and against the
numpy twins for the K-quants. Every SIMD tier this CPU supports is run in a subprocess (the tier is
fixed when the kernels are compiled), so an AVX-512 machine also tests the AVX2 code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_formats_legacy import quantized
from test_kernels_kquants import random_blocks

from pipx_llama.engine.kernels import WEIGHT_KERNELS, packed, simd
from pipx_llama.formats import kquants as kq
from pipx_llama.formats import legacy as ql

# the packed kinds exist only with a SIMD tier; the rest (the portable tier's plain kinds, the fused
# pass over them, the team's threads) is what a CPU without one runs, ARM included
needs_simd = pytest.mark.skipif(simd.TIER is None, reason="no packed kernels on this CPU")

LEGACY = [ql.Q4_0, ql.Q4_1, ql.Q8_0, ql.Q5_0, ql.Q5_1]
KQUANTS = [kq.Q4_K, kq.Q6_K, kq.Q5_K]


def portable(qtype, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], raw.shape[0]), np.float32)
    WEIGHT_KERNELS[qtype].matmul(raw, x, out)
    return out


def packed_matmul(qtype, raw: np.ndarray, x: np.ndarray, plain: bool = False) -> np.ndarray:
    out = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)
    packed.PackedMatrix(qtype, raw, plain=plain).matmul(x, out)
    return out


@needs_simd
@pytest.mark.parametrize("fmt", LEGACY, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("rows", "T"), [(37, 1), (16, 3), (50, 4), (33, 9), (64, 20)])
def test_legacy_same_bits_as_portable_kernels(fmt, rows: int, T: int) -> None:
    """Row counts that are not multiples of 16 and token counts around the 4-token kernel."""
    rng = np.random.default_rng(rows * 100 + T)
    raw = quantized(fmt, rows, 288, seed=T)
    x = (rng.standard_normal((T, 288)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    x[0, :32] = 0.0
    got = packed_matmul(fmt.qtype, raw, x)
    want = portable(fmt.qtype, raw, x)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@needs_simd
def test_q8_0_extreme_weights_and_activations() -> None:
    """-128 weights and full-range activations: no int16 saturation on any tier."""
    rows, n = 32, 256
    raw = np.zeros((rows, n // 32 * 34), np.uint8)
    blocks = raw.reshape(rows, n // 32, 34)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[:, :, 2:] = np.uint8(0x80)  # q = -128
    blocks[1::2, :, 2:] = 127
    x = np.full((2, n), 3.0, np.float32)
    x[1, ::2] = -3.0
    got = packed_matmul(ql.Q8_0.qtype, raw, x)
    np.testing.assert_array_equal(got.view(np.uint32), portable(ql.Q8_0.qtype, raw, x).view(np.uint32))


@needs_simd
@pytest.mark.parametrize("cls", KQUANTS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("rows", "nb", "T"), [(37, 2, 1), (16, 1, 4), (20, 3, 6)])
def test_kquants_against_integer_twin(cls, rows: int, nb: int, T: int) -> None:
    rng = np.random.default_rng(rows + nb + T)
    raw = random_blocks(cls, rng, rows, nb, sane=True)
    x = (rng.standard_normal((T, nb * 256)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    x[0, :256] = 0.0
    got = packed_matmul(cls.qtype, raw, x)
    q8 = kq.quantize_row_q8_K_ref(x)
    want = cls.dot_q8_K(raw, q8)
    magnitude = (np.abs(kq.dequantize_q8_K(q8).astype(np.float64))
                 @ np.abs(cls.dequantize(raw).astype(np.float64)).T)
    assert np.all(np.abs(got - want) <= 1e-5 * magnitude)


@needs_simd
@pytest.mark.parametrize("cls", KQUANTS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("want_q", [-127, 127])
def test_kquants_full_range_activations(cls, want_q: int) -> None:
    """Activations all at an end of Q8_K's range (-127 or 127): the largest block sums and int16 chunk
    sums these weights can give, and still the integer twin's result on every tier."""
    rng = np.random.default_rng(3)
    raw = random_blocks(cls, rng, 32, 2, sane=True)
    x = np.full((5, 512), -1.0, np.float32)  # ggml maps the largest |x| to -127
    if want_q == 127:
        x[:, ::256] = 1.0  # then every -1 maps to +127
    q8 = kq.quantize_row_q8_K_ref(x)
    assert (q8.qs.reshape(5, 2, 256)[:, :, 1:] == want_q).all()
    got = packed_matmul(cls.qtype, raw, x)
    want = cls.dot_q8_K(raw, q8)
    magnitude = (np.abs(kq.dequantize_q8_K(q8).astype(np.float64))
                 @ np.abs(cls.dequantize(raw).astype(np.float64)).T)
    assert np.all(np.abs(got - want) <= 1e-5 * magnitude)


@needs_simd
@pytest.mark.parametrize("cls", KQUANTS, ids=lambda c: c.__name__)
def test_kquant_rows_do_not_depend_on_the_tokens_beside_them(cls) -> None:
    """Whatever kernel several tokens take (simd.KQUANT_TOKENS: one, two, three or four tokens a weight
    load, by tier), each token's row has the bits it has alone: a prompt's logits, and a server batch's,
    are those of its tokens evaluated one by one."""
    rng = np.random.default_rng(11)
    raw = random_blocks(cls, rng, 37, 3, sane=True)
    x = (rng.standard_normal((9, 3 * 256)) * rng.uniform(0.1, 10, (9, 1))).astype(np.float32)
    together = packed_matmul(cls.qtype, raw, x)
    for t in range(x.shape[0]):
        alone = packed_matmul(cls.qtype, raw, x[t : t + 1])
        np.testing.assert_array_equal(together[t].view(np.uint32), alone[0].view(np.uint32))


def _kquant_loop(kind: str, nt: int):
    """A compiled loop calling the ``nt``-token kernel on every row group for tokens 0..T-1."""
    from numba import njit

    kernel = simd._make_kquant_intrinsic(kind, nt)
    rec = simd.KQUANT_RECORD[kind]

    @njit
    def run(arena, nb, groups, xq, xd, xb16, xb32, T, res, out):
        for g in range(groups):
            for t in range(0, T, nt):
                kernel(arena, g * nb * rec, nb, xq, xd, xb16, xb32, t, nb * rec, res)
                out[t : t + nt, g * simd.LANES : (g + 1) * simd.LANES] = res[:nt]

    return run


@needs_simd
@pytest.mark.parametrize("cls", KQUANTS, ids=lambda c: c.__name__)
def test_every_kquant_token_count_gives_the_same_bits(cls) -> None:
    """Each tier takes one of the kernels of 1 to 4 tokens (simd.KQUANT_TOKENS, chosen by measurement), so
    each of them must give every token the bits the one-token kernel gives: a new choice may take any."""
    from pipx_llama.engine.kernels.kquants import quantize_q8_K

    kind = {kq.Q4_K: "q4_K", kq.Q5_K: "q5_K", kq.Q6_K: "q6_K"}[cls]
    rng = np.random.default_rng(5)
    nb, T = 3, 12  # 12 tokens: whole calls of 1, 2, 3 and 4
    pm = packed.PackedMatrix(cls.qtype, random_blocks(cls, rng, 32, nb, sane=True))
    x = (rng.standard_normal((T, nb * 256)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    xq, xd = np.zeros((T, nb * 256), np.int8), np.zeros((T, nb), np.float32)
    sums16 = np.empty((T, nb * 16), np.int16)
    xb16, xb32 = np.zeros((T, nb * 16), np.int32), np.zeros((T, nb * 8), np.int32)
    quantize_q8_K(x, xq, xd, sums16)
    packed.ksums(sums16, xb16, xb32, 0, T)
    outs = []
    for nt in (1, 2, 3, 4):
        out = np.full((T, 32), np.nan, np.float32)
        _kquant_loop(kind, nt)(pm.arena, nb, 2, xq, xd, xb16, xb32, T, np.empty((4, simd.LANES), np.float32),
                               out)
        outs.append(out)
    assert np.isfinite(outs[0]).all()
    for nt, out in zip((2, 3, 4), outs[1:]):
        np.testing.assert_array_equal(out.view(np.uint32), outs[0].view(np.uint32), err_msg=f"{nt} tokens")


def test_kquant_tokens_per_load_are_known_for_every_tier() -> None:
    for tier, per_kind in simd.KQUANT_TOKENS.items():
        assert set(per_kind) == {"q4_K", "q5_K", "q6_K"}, tier
        assert all(1 <= nt <= 4 for nt in per_kind.values()), tier
    if simd.TIER is not None:
        assert {k: nt for k, (_, nt) in simd.kquant_multi.items()} == simd.KQUANT_TOKENS[simd.TIER]


@needs_simd
@pytest.mark.parametrize("cls", KQUANTS, ids=lambda c: c.__name__)
def test_kquants_close_to_portable_kernels(cls) -> None:
    rng = np.random.default_rng(5)
    raw = random_blocks(cls, rng, 48, 4, sane=True)
    x = rng.standard_normal((5, 1024)).astype(np.float32)
    got = packed_matmul(cls.qtype, raw, x)
    want = portable(cls.qtype, raw, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("fmt", LEGACY, ids=lambda f: f.__name__)
def test_plain_forms_of_packed_types_same_bits(fmt) -> None:
    """The plain (in-place) forms: portable loops over the ggml rows in the mapped file."""
    rng = np.random.default_rng(11)
    raw = quantized(fmt, 37, 288, seed=4)
    x = (rng.standard_normal((3, 288)) * 3).astype(np.float32)
    got = packed_matmul(fmt.qtype, raw, x, plain=True)
    np.testing.assert_array_equal(got.view(np.uint32), portable(fmt.qtype, raw, x).view(np.uint32))


@pytest.mark.parametrize("cls", KQUANTS, ids=lambda c: c.__name__)
def test_plain_forms_of_kquants_close_to_portable(cls) -> None:
    rng = np.random.default_rng(12)
    raw = random_blocks(cls, rng, 37, 3, sane=True)
    x = rng.standard_normal((4, 768)).astype(np.float32)
    got = packed_matmul(cls.qtype, raw, x, plain=True)
    want = portable(cls.qtype, raw, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_plain_kinds_keep_the_ggml_rows() -> None:
    raw = quantized(ql.Q5_1, 20, 64, seed=2)
    m = packed.PackedMatrix(ql.Q5_1.qtype, raw, plain=True)
    assert m.kind in packed.PLAIN_KINDS and m.arena.size == 0 and np.array_equal(m.mapped, raw.reshape(-1))


@needs_simd
def test_q5_fifth_bits_reach_every_element() -> None:
    """Row r has only fifth bit r set: every position of the reordered bits reaches its element."""
    for fmt in (ql.Q5_0, ql.Q5_1):
        raw = quantized(fmt, 32, 32, seed=9)
        qh_at = 2 if fmt is ql.Q5_0 else 4
        bits = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype("<u4")
        raw[:, qh_at : qh_at + 4] = bits.view(np.uint8).reshape(32, 4)
        x = np.eye(32, dtype=np.float32) * 4.0
        got = packed_matmul(fmt.qtype, raw, x)
        np.testing.assert_array_equal(got.view(np.uint32), portable(fmt.qtype, raw, x).view(np.uint32))


def test_fp16_decoding_equals_the_lookup_table() -> None:
    """The plain kinds decode fp16 scales by arithmetic; every one of the 65536 values as the table."""
    from numba import njit

    from pipx_llama.engine.kernels.floats import FP16_TABLE

    @njit(cache=False)
    def decode_all(a):
        out = np.empty(a.size // 2, np.float32)
        for i in range(out.size):
            out[i] = packed._f16(a, 2 * i)
        return out

    got = decode_all(np.arange(65536, dtype=np.uint16).view(np.uint8))
    nan = np.isnan(FP16_TABLE)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), FP16_TABLE[~nan].view(np.uint32))


@needs_simd
def test_rejects_mismatched_shapes() -> None:
    raw = quantized(ql.Q4_0, 16, 64, seed=1)
    m = packed.PackedMatrix(ql.Q4_0.qtype, raw)
    with pytest.raises(ValueError):
        m.matmul(np.zeros((1, 32), np.float32), np.zeros((1, 16), np.float32))


_LOWER_TIERS = [t for t in ("avx2", "vnni256") if simd.TIER is not None and
                ["avx2", "vnni256", "vnni512"].index(t) < ["avx2", "vnni256", "vnni512"].index(simd.TIER)]


@pytest.mark.parametrize("tier", _LOWER_TIERS)
def test_lower_tiers_give_the_same_bits(tier: str, tmp_path: Path) -> None:
    """The tests above, in a process whose kernels are compiled for a lower tier."""
    from pipx_llama._numba_cache import CACHE_DIR

    # the tier changes the compiled code but not the sources numba's cache checks: keep tiers apart
    env = dict(os.environ, PIPX_LLAMA_SIMD=tier, NUMBA_CACHE_DIR=f"{CACHE_DIR}-simd-{tier}")
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__)), "-k", "not lower_tiers"], cwd=here.parent, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_tier_can_be_lowered_not_raised() -> None:
    code = "from pipx_llama.engine.kernels import simd; print(simd.TIER)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PIPX_LLAMA_SIMD="off"),
                         capture_output=True, text=True, check=False).stdout.strip()
    assert out == "None"


@needs_simd
@pytest.mark.parametrize("kind", ["q4_1", "q6_K"])
def test_kernels_prefetch_the_next_group(kind: str) -> None:
    """Several tokens' kernels always ask for the next group's records, and so do one token's K-quant kernels
    (on AMD two records on, ``KQUANT_ONE_TOKEN_AHEAD``); one token's legacy kernels only where
    ``PREFETCH_ONE_TOKEN`` says (not on AMD's CPUs, whose own prefetchers measured better alone)."""
    from numba import njit

    legacy = kind == "q4_1"
    multi = simd.q4_1_x4 if legacy else simd.kquant_multi["q6_K"][0]
    one = simd.q4_1_x1 if legacy else simd.q6_K_x1
    nb, rec = (2, simd.LEGACY_RECORD[kind]) if legacy else (1, simd.KQUANT_RECORD[kind])
    w = np.zeros(4 * nb * rec, np.uint8)
    xq, f32, i32 = np.zeros((4, 256), np.int8), np.zeros((4, 8), np.float32), np.zeros((4, 16), np.int32)
    res = np.zeros((4, simd.LANES), np.float32)
    for kernel, expected in ((multi, True), (one, simd.PREFETCH_ONE_TOKEN if legacy else True)):
        if legacy:
            def call(w, xq, xd, xs, xsum, res, kernel=kernel):
                kernel(w, 0, nb, xq, xd, xs, xsum, 0, nb * rec, res)
            args = (w, xq, f32, f32, i32[:, :8], res)
        else:
            def call(w, xq, xd, xb16, xb32, res, kernel=kernel):
                kernel(w, 0, nb, xq, xd, xb16, xb32, 0, nb * rec, res)
            args = (w, xq, f32[:, :1], i32, i32[:, :8], res)
        fresh = njit(call)  # a fresh compile: numba shows no assembly of cached code
        fresh(*args)
        assert ("prefetcht1" in fresh.inspect_asm(fresh.signatures[0])) is expected, (kind, kernel)
