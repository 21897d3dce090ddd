"""The numpy references of the K-quant formats against gguf-py and literal transcriptions of ggml's C.

gguf-py cannot quantize K-quants, so weight blocks are random bytes with finite fp16 scales.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pipx_llama.formats import kquants as kq

TYPES = [kq.Q4_K, kq.Q5_K, kq.Q6_K]


def random_finite_fp16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Any finite fp16 bit pattern: both signs, zeros, subnormals, up to 65504."""
    bits = rng.integers(0, 0x7C00, size=shape, dtype=np.uint16) | (
        rng.integers(0, 2, size=shape, dtype=np.uint16) << 15
    )
    return bits.view(np.float16)


def random_blocks(cls: type, rng: np.random.Generator, rows: int, nb: int, sane: bool = False) -> np.ndarray:
    """uint8 [rows, nb*block] of random block bytes with finite d (and dmin); small ones if sane."""
    raw = rng.integers(0, 256, size=(rows, nb * cls.block.itemsize), dtype=np.uint8)
    blocks = raw.view(cls.block)
    for field in ("d", "dmin"):
        if field in cls.block.names:
            if sane:
                blocks[field] = rng.uniform(-0.02, 0.02, blocks[field].shape).astype(np.float16)
            else:
                blocks[field] = random_finite_fp16(rng, blocks[field].shape)
    return raw


def c_quantize_row_q8_K(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Line-by-line transcription of ggml's quantize_row_q8_K_ref with float32 scalars (slow)."""
    f32 = np.float32
    nb = x.size // 256
    qs = np.zeros(x.size, np.int8)
    d = np.zeros(nb, np.float32)
    bsums = np.zeros(nb * 16, np.int16)
    for i in range(nb):
        blk = x[i * 256 : (i + 1) * 256]
        vmax = f32(0.0)
        amax = f32(0.0)
        for v in blk:
            ax = abs(f32(v))
            if ax > amax:
                amax = ax
                vmax = f32(v)
        if not amax:
            continue
        iscale = f32(-127.0) / vmax
        for j, v in enumerate(blk):
            val = np.array(f32(iscale * f32(v)) + f32(12582912.0), np.float32)
            q = int((val.view(np.int32) & 0x007FFFFF) - 0x00400000)
            qs[i * 256 + j] = min(127, q)
        for j in range(16):
            bsums[i * 16 + j] = int(qs[i * 256 + j * 16 : i * 256 + j * 16 + 16].astype(np.int32).sum())
        d[i] = f32(1.0) / iscale
    return qs, d, bsums


def adversarial_rows() -> np.ndarray:
    """Rows of 512 values (two super-blocks) that stress the quantizer's edge cases."""
    rng = np.random.default_rng(7)
    rows = []
    rows.append(np.zeros(512, np.float32))  # all zero
    r = np.full(512, -0.0, np.float32)
    r[300] = 1.0
    rows.append(r)  # negative zeros, then one non-zero block
    r = rng.uniform(-1e-6, 1e-6, 512).astype(np.float32)
    r[17] = 3.0e4
    r[400] = -7.0e3
    rows.append(r)  # one huge value among tiny ones
    r = rng.standard_normal(512).astype(np.float32)
    r[5] = 9.0
    r[6] = -9.0
    r[300] = -9.0
    r[301] = 9.0
    rows.append(r)  # tied magnitudes of opposite sign: the first one sets the sign
    r = np.arange(512, dtype=np.float32) - 255.5
    rows.append(r)  # iscale * x lands on many exact halves
    r = np.full(512, 1e-40, np.float32)
    r[::3] = -2e-39
    r[100] = 1e-30
    r[256:] = 3e-38
    r[511] = -1e-36
    rows.append(r)  # subnormals with a tiny normal max; a block whose max is just above 127/FLT_MAX
    r = rng.standard_normal(512).astype(np.float32) * 1e30
    rows.append(r)  # huge values
    r = np.full(512, 1e-40, np.float32)
    r[::3] = -2e-39
    rows.append(r)  # last: subnormals only, iscale overflows (outside ggml's domain, stored as zeros)
    return np.stack(rows)


# ---------------------------------------------------------------- formats


def test_block_layouts_match_ggml_sizes() -> None:
    for cls in TYPES:
        assert GGML_QUANT_SIZES[cls.qtype] == (kq.QK_K, cls.block.itemsize)
    assert kq.BLOCK_Q4_K.itemsize == 144
    assert kq.BLOCK_Q5_K.itemsize == 176
    assert kq.BLOCK_Q6_K.itemsize == 210
    assert kq.BLOCK_Q8_K.itemsize == 292
    assert set(kq.KQUANTS) == {
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
    }


def test_get_scale_min_k4_matches_c() -> None:
    rng = np.random.default_rng(1)
    scales = rng.integers(0, 256, size=(200, 12), dtype=np.uint8)
    sc, mn = kq.get_scale_min_k4(scales)
    for row in range(scales.shape[0]):
        q = [int(v) for v in scales[row]]
        for j in range(8):
            if j < 4:
                want = (q[j] & 63, q[j + 4] & 63)
            else:
                want = ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
            assert (int(sc[row, j]), int(mn[row, j])) == want


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.__name__)
def test_dequantize_matches_gguf_bit_for_bit(cls: type) -> None:
    rng = np.random.default_rng(2)
    raw = random_blocks(cls, rng, rows=2000, nb=3)
    ours = cls.dequantize(raw)
    theirs = gguf.quants.dequantize(raw, cls.qtype)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (2000, 768)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_q5_K_high_bits_and_q6_K_layout_against_c_loops() -> None:
    """Spot-check value order against transcriptions of dequantize_row_q5_K / q6_K."""
    rng = np.random.default_rng(3)
    raw5 = random_blocks(kq.Q5_K, rng, rows=3, nb=1, sane=True)
    raw6 = random_blocks(kq.Q6_K, rng, rows=3, nb=1, sane=True)
    got5 = kq.Q5_K.dequantize(raw5)
    got6 = kq.Q6_K.dequantize(raw6)
    for r in range(3):
        b5 = raw5[r].view(kq.BLOCK_Q5_K)[0]
        sc, mn = kq.get_scale_min_k4(b5["scales"])
        want = []
        for j in range(4):
            u1, u2 = 1 << (2 * j), 2 << (2 * j)
            ql = b5["qs"][32 * j : 32 * j + 32]
            d1, m1 = (
                np.float32(b5["d"]) * np.float32(sc[2 * j]),
                np.float32(b5["dmin"]) * np.float32(mn[2 * j]),
            )
            d2 = np.float32(b5["d"]) * np.float32(sc[2 * j + 1])
            m2 = np.float32(b5["dmin"]) * np.float32(mn[2 * j + 1])
            want += [d1 * np.float32((ql[l] & 0xF) + (16 if b5["qh"][l] & u1 else 0)) - m1 for l in range(32)]
            want += [d2 * np.float32((ql[l] >> 4) + (16 if b5["qh"][l] & u2 else 0)) - m2 for l in range(32)]
        assert np.array_equal(np.array(want, np.float32), got5[r])

        b6 = raw6[r].view(kq.BLOCK_Q6_K)[0]
        want6 = np.zeros(256, np.float32)
        d = np.float32(b6["d"])
        for n in range(2):
            ql, qh, sc6 = b6["ql"][64 * n :], b6["qh"][32 * n :], b6["scales"][8 * n :]
            for l in range(32):
                is_ = l // 16
                q1 = ((int(ql[l]) & 0xF) | (((int(qh[l]) >> 0) & 3) << 4)) - 32
                q2 = ((int(ql[l + 32]) & 0xF) | (((int(qh[l]) >> 2) & 3) << 4)) - 32
                q3 = ((int(ql[l]) >> 4) | (((int(qh[l]) >> 4) & 3) << 4)) - 32
                q4 = ((int(ql[l + 32]) >> 4) | (((int(qh[l]) >> 6) & 3) << 4)) - 32
                want6[128 * n + l] = d * np.float32(sc6[is_]) * np.float32(q1)
                want6[128 * n + l + 32] = d * np.float32(sc6[is_ + 2]) * np.float32(q2)
                want6[128 * n + l + 64] = d * np.float32(sc6[is_ + 4]) * np.float32(q3)
                want6[128 * n + l + 96] = d * np.float32(sc6[is_ + 6]) * np.float32(q4)
        assert np.array_equal(want6, got6[r])


# ---------------------------------------------------------------- Q8_K activations


def test_nearest_int_rounds_half_to_even() -> None:
    x = np.arange(-300.0, 300.0, 0.125, dtype=np.float32)
    assert np.array_equal(kq.nearest_int(x), np.rint(x).astype(np.int32))


def test_quantize_q8_K_matches_c_transcription() -> None:
    rng = np.random.default_rng(4)
    rows = np.concatenate([adversarial_rows()[:-1], rng.standard_normal((3, 512)).astype(np.float32) * 3])
    ref = kq.quantize_row_q8_K_ref(rows)
    for i, row in enumerate(rows):
        qs, d, bsums = c_quantize_row_q8_K(row)
        assert np.array_equal(ref.qs[i], qs), i
        assert np.array_equal(ref.d[i].view(np.uint32), d.view(np.uint32)), i
        assert np.array_equal(ref.bsums[i], bsums), i


def test_quantize_q8_K_properties() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 1024)).astype(np.float32) * rng.uniform(1e-3, 1e3, (20, 1)).astype(
        np.float32
    )
    q8 = kq.quantize_row_q8_K_ref(x)
    assert q8.qs.dtype == np.int8 and q8.d.dtype == np.float32 and q8.bsums.dtype == np.int16
    assert q8.qs.shape == (20, 1024) and q8.d.shape == (20, 4) and q8.bsums.shape == (20, 64)
    assert np.abs(q8.qs.astype(np.int32)).max() <= 127
    assert np.array_equal(q8.bsums, q8.qs.reshape(20, 64, 16).astype(np.int32).sum(-1))
    # the largest magnitude maps to -127 (sign trick): d has the opposite sign of that value
    blocks = x.reshape(20, 4, 256)
    vmax = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    assert np.all(np.sign(q8.d) == -np.sign(vmax))
    err = np.abs(kq.dequantize_q8_K(q8) - x).reshape(20, 4, 256).max(-1)
    assert np.all(err <= np.abs(q8.d) * 0.5 * (1 + 1e-5))


def test_quantize_q8_K_zero_block() -> None:
    x = np.zeros((1, 512), np.float32)
    x[0, 256:] = 1.0
    q8 = kq.quantize_row_q8_K_ref(x)
    assert q8.d[0, 0] == 0 and not q8.qs[0, :256].any() and not q8.bsums[0, :16].any()
    assert q8.d[0, 1] == np.float32(1.0) / (np.float32(-127.0) / np.float32(1.0))
    assert np.all(q8.qs[0, 256:] == -127)


def test_quantize_q8_K_block_too_small_for_iscale() -> None:
    """-127/max overflows below 127/FLT_MAX: ggml asserts; the block is stored as zeros here."""
    x = np.full((1, 256), 1e-40, np.float32)
    q8 = kq.quantize_row_q8_K_ref(x)
    assert q8.d[0, 0] == 0 and not q8.qs.any() and not q8.bsums.any()


def test_quantize_q8_K_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        kq.quantize_row_q8_K_ref(np.zeros((2, 100), np.float32))


# ---------------------------------------------------------------- integer dot products


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.__name__)
def test_dot_q8_K_equals_dequantized_product(cls: type) -> None:
    """The integer arithmetic of the twin is exactly W_dequant @ x_dequant (up to float rounding)."""
    rng = np.random.default_rng(6)
    raw = random_blocks(cls, rng, rows=40, nb=4, sane=True)
    x = rng.standard_normal((5, 1024)).astype(np.float32)
    q8 = kq.quantize_row_q8_K_ref(x)
    got = cls.dot_q8_K(raw, q8)
    w64 = cls.dequantize(raw).astype(np.float64)
    x64 = kq.dequantize_q8_K(q8).astype(np.float64)
    want = x64 @ w64.T
    magnitude = np.abs(x64) @ np.abs(w64).T
    assert got.shape == (5, 40) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= 1e-5 * magnitude)


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.__name__)
def test_quants_times_scale_fit_int16(cls: type) -> None:
    """sc*q fits int16 for every type: the kernels' expanded rows rely on it."""
    rng = np.random.default_rng(8)
    raw = random_blocks(cls, rng, rows=200, nb=2)
    q, _ = cls.quants(raw)
    assert np.abs(q).max() <= 32767
