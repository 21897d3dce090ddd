"""The one fp16 rounding (pipx_llama.formats.fp16): numpy's rounding on every finite value class, the one
NaN rule, and the same bits from every user of it -- the engine's software and hardware paths, the F16
weight kernel, the quantizer."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from pipx_llama.engine.kernels import floats as kernel_floats
from pipx_llama.engine.kernels import ops
from pipx_llama.formats import fp16
from pipx_llama.quant import quantize_legacy


@njit
def _sw(x, out):
    for i in range(x.shape[0]):
        out[i] = ops.f32_to_f16_bits_sw(x[i])


@njit
def _hw(x, out):
    for i in range(x.shape[0]):
        out[i] = ops.f32_to_f16_bits_hw(x[i])


@njit
def _quantizer(x, out):
    for i in range(x.shape[0]):
        out[i] = quantize_legacy.fp16_bits(x[i])


def _nans() -> np.ndarray:
    """Quiet and signalling NaNs of both signs, with payloads in the kept and in the dropped bits."""
    mants = [0x400000, 0x400001, 0x7FFFFF, 0x000001, 0x001FFF, 0x002000, 0x3FE000, 0x155555, 0x2AAAAA]
    bits = [s | 0x7F800000 | m for s in (0, 0x80000000) for m in mants]
    return np.array(bits, np.uint32).view(np.float32)


def _finite_and_edges() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(100_000) * np.exp(rng.uniform(-30, 15, 100_000))).astype(np.float32)
    edges = [0.0, -0.0, 65504.0, 65519.99, 65520.0, -70000.0, np.inf, -np.inf, 5.96e-8, 2.98e-8, 2.99e-8,
             6.1e-5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2049.0, 2051.0, 3e38, -1e-45]
    return np.concatenate([x, np.array(edges, np.float32)])


def expected_nan_bits(x: np.ndarray) -> np.ndarray:
    """The rule, written out: sign kept, top 10 payload bits kept, quiet bit set."""
    u = x.view(np.uint32).astype(np.int64)
    return (((u >> 16) & 0x8000) | 0x7C00 | 0x0200 | ((u & 0x7FFFFF) >> 13)).astype(np.uint16)


def test_finite_values_round_as_numpy():
    x = _finite_and_edges()
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(fp16.fp16_bits(x), ref)


def test_nan_rule():
    x = _nans()
    got = fp16.fp16_bits(x)
    np.testing.assert_array_equal(got, expected_nan_bits(x))
    assert np.isnan(got.view(np.float16)).all()
    assert (got & 0x0200).all()  # quiet
    np.testing.assert_array_equal(got >> 15, x.view(np.uint32) >> 31)  # sign


@pytest.mark.parametrize("user", ["engine software", "engine hardware", "quantizer"])
def test_every_user_gives_the_same_bits(user):
    """The engine without F16C, with F16C, and the quantizer: one rounding, NaNs included."""
    if user == "engine hardware" and not ops.HAVE_F16C:
        pytest.skip("numba does not target F16C here")
    x = np.concatenate([_finite_and_edges(), _nans()])
    out = np.empty(x.size, np.uint16)
    {"engine software": _sw, "engine hardware": _hw, "quantizer": _quantizer}[user](x, out)
    np.testing.assert_array_equal(out, fp16.fp16_bits(x))


def test_f16_weight_kernel_rounds_activations_with_it():
    x = np.concatenate([_finite_and_edges(), _nans()]).reshape(1, -1)
    out = np.empty_like(x)
    kernel_floats.round_to_fp16(x, out, fp16.FP16_TABLE)
    expected = fp16.FP16_TABLE[fp16.fp16_bits(x)]
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


def test_table_decodes_every_fp16_value():
    bits = np.arange(1 << 16, dtype=np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(fp16.FP16_TABLE), nan)
    np.testing.assert_array_equal(fp16.FP16_TABLE[~nan].view(np.uint32), ref[~nan].view(np.uint32))
