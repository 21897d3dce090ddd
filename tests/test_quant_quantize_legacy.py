"""The Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 quantizers: numba kernels, numpy twins, gguf-py and ggml agree byte for
byte."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from numba import njit
from quantize_oracles import adversarial_rows, ggml_quantize, real_rows

from pipx_llama.quant import quantize_legacy as ql

TYPES = list(ql.LEGACY_QUANTIZERS)
SMOL_TENSORS = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.29.attn_v.weight", "output_norm.weight"]


@pytest.fixture(scope="module")
def smol_rows(smollm2_path):
    return real_rows(smollm2_path, SMOL_TENSORS, 576)


@njit(cache=True)
def _fp16_bits_many(v: np.ndarray, out: np.ndarray) -> None:
    for i in range(v.size):
        out[i] = ql.fp16_bits(v[i])


@njit(cache=True)
def _low_bytes_many(v: np.ndarray, out: np.ndarray) -> None:
    for i in range(v.size):
        out[i] = ql.c_low_byte(v[i])


def test_fp16_bits_round_to_nearest_even_like_numpy() -> None:
    rng = np.random.default_rng(1)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, 6e-8, 5.960464477539063e-08,
                        2.9802322387695312e-08, 2.98023259e-08, 1e-45, 6.103515625e-05, 6.1035e-05,
                        1.0009765625 / 2 + 1.0 / 4096, 2049.0, 2051.0, -2049.0], np.float32)
    # every fp16 value and every midpoint between neighbours (the ties)
    h = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)
    v = np.concatenate([special, h, -h, mids, -mids, rng.standard_normal(10000).astype(np.float32) * 100])
    out = np.empty(v.size, np.int64)
    _fp16_bits_many(v, out)
    with np.errstate(over="ignore"):
        expected = v.astype(np.float16).view(np.uint16)
    assert np.array_equal(out, expected)


def test_c_low_byte_matches_twin_including_undefined_conversions() -> None:
    v = np.array(
        [
            0.0,
            0.49,
            0.5,
            15.99,
            16.5,
            -0.9,
            -1.0,
            -128.5,
            127.9,
            255.5,
            256.0,
            3e9,
            -3e9,
            2147483520.0,
            -2147483648.0,
            np.inf,
            -np.inf,
            np.nan,
        ],
        np.float32,
    )
    out = np.empty(v.size, np.int64)
    _low_bytes_many(v, out)
    assert np.array_equal(out, ql.c_low_byte_ref(v))
    assert list(out[:9]) == [0, 0, 0, 15, 16, 0, 255, 128, 127]
    assert list(out[-3:]) == [0, 0, 0]  # x86 gives 0x80000000 for inf and NaN


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_matches_twin(qtype: GGMLQuantizationType) -> None:
    q = ql.LEGACY_QUANTIZERS[qtype]
    rng = np.random.default_rng(int(qtype))
    x = np.concatenate(
        [adversarial_rows(256, 32), (rng.standard_normal((9, 256)) * rng.uniform(1e-4, 10, (9, 1)))]
    )
    x = x.astype(np.float32)
    status = np.full(x.shape[0], 99, np.uint8)
    assert np.array_equal(q(x, status=status), q.reference(x))
    assert not status.any()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_gguf_py_on_real_tensors(qtype: GGMLQuantizationType, smol_rows: np.ndarray) -> None:
    q = ql.LEGACY_QUANTIZERS[qtype]
    assert np.array_equal(q(smol_rows), gguf.quants.quantize(smol_rows, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_gguf_py_on_adversarial_blocks(qtype: GGMLQuantizationType) -> None:
    q = ql.LEGACY_QUANTIZERS[qtype]
    x = adversarial_rows(128, 32)
    # gguf-py's numpy misses two corners of the C code: a block of zeros whose first value is -0.0
    # (it keeps that sign for the scale) and blocks so small that 1/d overflows (numpy's float->int
    # casts of inf/NaN differ from x86's); ggml itself is the oracle for those below.
    lead_neg_zero = np.signbit(x[:, 0]) & (x[:, 0] == 0)
    tiny = np.abs(x[:, :32]).max(axis=1) < 1e-36
    keep = ~(lead_neg_zero | tiny)
    with np.errstate(all="ignore"):
        expected = gguf.quants.quantize(x[keep], qtype)
    assert np.array_equal(q(x[keep]), expected)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_ggml_on_adversarial_and_real_blocks(
    qtype: GGMLQuantizationType, smol_rows: np.ndarray
) -> None:
    q = ql.LEGACY_QUANTIZERS[qtype]
    x = np.concatenate([adversarial_rows(576, 32), smol_rows[:256]])
    assert np.array_equal(q(x), ggml_quantize(qtype, x))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_values_are_flagged(qtype: GGMLQuantizationType, bad: float) -> None:
    x = np.ones((3, 64), np.float32)
    x[1, 40] = bad
    status = np.zeros(3, np.uint8)
    ql.LEGACY_QUANTIZERS[qtype](x, status=status)
    assert status[0] == 0 and status[2] == 0
    assert status[1] & ql.STATUS_NONFINITE


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_scales_beyond_fp16_are_flagged(qtype: GGMLQuantizationType) -> None:
    x = np.ones((2, 64), np.float32)
    x[1, 3] = 3e9  # d = 3e9/127 (Q8_0) and smaller ratios for the others: all above 65504
    status = np.zeros(2, np.uint8)
    ql.LEGACY_QUANTIZERS[qtype](x, status=status)
    assert status[0] == 0
    assert status[1] == ql.STATUS_SCALE_OVERFLOW


def test_quantizer_checks_shapes() -> None:
    q = ql.LEGACY_QUANTIZERS[GGMLQuantizationType.Q4_0]
    with pytest.raises(ValueError, match="multiple of 32"):
        q(np.zeros((2, 48), np.float32))
    with pytest.raises(ValueError, match="output must be"):
        q(np.zeros((2, 64), np.float32), out=np.zeros((2, 35), np.uint8))
    assert q.row_bytes(4096) == 4096 // 32 * 18
