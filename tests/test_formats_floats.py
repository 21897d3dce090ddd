"""numpy references of the float weight formats F32/F16/BF16 against gguf-py and ggml's rounding."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from pipx_llama.formats import floats as qf


def _rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    x = rng.standard_normal((rows, n)).astype(np.float32) * np.float32(3)
    x[0, :8] = [0.0, -0.0, 1e-40, -1e-42, 65504.0, 65520.0, 3e38, -np.inf]
    return x


@pytest.mark.parametrize("fmt", [qf.F32, qf.F16, qf.BF16])
def test_format_facts_match_gguf(fmt: type[qf.FloatFormat]) -> None:
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[fmt.qtype]
    assert qf.FORMATS[fmt.qtype] is fmt


@pytest.mark.parametrize("fmt", [qf.F32, qf.F16, qf.BF16])
def test_dequantize_matches_gguf_bit_for_bit(fmt: type[qf.FloatFormat]) -> None:
    rng = np.random.default_rng(1)
    x = _rows(rng, 5, 96)
    with np.errstate(over="ignore"):  # the large test values are inf in fp16
        raw = gq.quantize(x, fmt.qtype).view(np.uint8).reshape(5, -1)
    ours = fmt.dequantize(raw)
    theirs = gq.dequantize(raw, fmt.qtype).reshape(5, -1)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_dequantize_random_f16_and_bf16_bit_patterns() -> None:
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 1 << 16, (4, 64), dtype=np.uint16)
    bits[0, :4] = [0x7C00, 0xFC00, 0x0001, 0x8000]  # +inf, -inf, smallest subnormal, -0
    raw = bits.view(np.uint8)
    for fmt in (qf.F16, qf.BF16):
        ours = fmt.dequantize(raw)
        theirs = gq.dequantize(raw, fmt.qtype).reshape(4, -1)
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_bf16_rounding_is_ggmls() -> None:
    """gguf-py's BF16 quantizer is ggml_compute_fp32_to_bf16; ours must give the same bits."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 1 << 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[~np.isnan(x)]
    x = np.concatenate([x, np.float32([0.0, -0.0, np.inf, -np.inf, 1.00390625, 1.01171875, 3.4e38])])
    ours = qf.fp32_to_bf16_bits(x)
    theirs = gq.quantize(x.reshape(1, -1), GGMLQuantizationType.BF16).view(np.uint16).reshape(-1)
    np.testing.assert_array_equal(ours, theirs)
    # ties go to even: 1 + 2**-8 is halfway between 1 and 1 + 2**-7
    assert qf.round_to_bf16(np.float32([1.00390625, 1.01171875])).tolist() == [1.0, 1.015625]


def test_bf16_nan_stays_nan_and_quiet() -> None:
    nan = np.array([0x7F800001], dtype=np.uint32).view(np.float32)
    bits = qf.fp32_to_bf16_bits(nan)
    assert bits[0] == 0x7F80 | 64
    assert np.isnan(qf.bf16_bits_to_fp32(bits)[0])


def test_fp16_rounding_ties_and_overflow() -> None:
    x = np.float32([1 + 2.0**-11, 1 + 3 * 2.0**-11, 65504.0, 65519.0, 65520.0, 2.0**-25, 2.0**-24 * 1.5])
    assert qf.round_to_fp16(x).tolist() == [1.0, 1 + 2.0**-9, 65504.0, 65504.0, np.inf, 0.0, 2.0**-23]


def test_matmul_ref_rounds_activations_like_ggml() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 64)).astype(np.float32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    for fmt, rnd in ((qf.F32, lambda a: a), (qf.F16, qf.round_to_fp16), (qf.BF16, qf.round_to_bf16)):
        raw = gq.quantize(w, fmt.qtype).view(np.uint8).reshape(3, -1)
        expect = rnd(x).astype(np.float64) @ fmt.dequantize(raw).astype(np.float64).T
        np.testing.assert_allclose(fmt.matmul_ref(raw, x), expect, rtol=1e-6)
