"""The Q4_K/Q5_K/Q6_K quantizers: numba kernels, numpy twins and ggml's reference agree byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from numba import njit
from quantize_oracles import adversarial_rows, ggml_quantize, real_rows

from pipx_llama.formats import kquants
from pipx_llama.quant import quantize_kquants as qk
from pipx_llama.quant.quantize_legacy import STATUS_NONFINITE, STATUS_SCALE_OVERFLOW

TYPES = list(qk.KQUANT_QUANTIZERS)
SMOL_TENSORS = ["blk.0.ffn_down.weight", "blk.15.attn_k.weight", "blk.29.ffn_gate.weight"]


@pytest.fixture(scope="module")
def smol_rows(smollm2_path):
    return real_rows(smollm2_path, SMOL_TENSORS, 1536)


@njit(cache=True)
def _nearest_many(v: np.ndarray, out: np.ndarray) -> None:
    for i in range(v.size):
        out[i] = qk.nearest_int(v[i])


def test_nearest_int_matches_the_bit_trick_everywhere() -> None:
    rng = np.random.default_rng(3)
    v = np.concatenate(
        [
            np.array(
                [
                    0.5,
                    1.5,
                    2.5,
                    -0.5,
                    -2.5,
                    4194303.0,
                    -4194303.0,
                    4194304.5,
                    1e7,
                    -1e7,
                    3e38,
                    np.inf,
                    -np.inf,
                    np.nan,
                    1e-45,
                    -0.0,
                ],
                np.float32,
            ),
            (rng.standard_normal(5000) * 40).astype(np.float32),
            (rng.standard_normal(1000) * 1e8).astype(np.float32),
        ]
    )
    out = np.empty(v.size, np.int64)
    _nearest_many(v, out)
    with np.errstate(invalid="ignore"):
        expected = kquants.nearest_int(v)
    assert np.array_equal(out, expected)
    assert list(out[:5]) == [0, 2, 2, 0, -2]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_matches_twin(qtype: GGMLQuantizationType) -> None:
    q = qk.KQUANT_QUANTIZERS[qtype]
    rng = np.random.default_rng(int(qtype))
    x = np.concatenate(
        [
            adversarial_rows(512, 256),
            rng.standard_normal((6, 512)) * rng.uniform(1e-4, 10, (6, 1)),
            adversarial_rows(512, 32, seed=5),
        ]
    ).astype(np.float32)
    status = np.full(x.shape[0], 99, np.uint8)
    got = q(x, status=status)
    with np.errstate(all="ignore"):
        assert np.array_equal(got, q.reference(x))
    assert not status.any()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_ggml_on_real_tensors(qtype: GGMLQuantizationType, smol_rows: np.ndarray) -> None:
    q = qk.KQUANT_QUANTIZERS[qtype]
    assert np.array_equal(q(smol_rows), ggml_quantize(qtype, smol_rows))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_ggml_on_adversarial_blocks(qtype: GGMLQuantizationType) -> None:
    q = qk.KQUANT_QUANTIZERS[qtype]
    # whole super-blocks of each corner case, and sub-blocks of them inside ordinary super-blocks
    x = np.concatenate([adversarial_rows(768, 256), adversarial_rows(768, 16, seed=1),
                        adversarial_rows(768, 32, seed=2)])
    assert np.array_equal(q(x), ggml_quantize(qtype, x))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_values_are_flagged(qtype: GGMLQuantizationType, bad: float) -> None:
    x = np.ones((3, 512), np.float32)
    x[1, 300] = bad
    status = np.zeros(3, np.uint8)
    qk.KQUANT_QUANTIZERS[qtype](x, status=status)
    assert status[0] == 0 and status[2] == 0
    assert status[1] & STATUS_NONFINITE


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_scales_beyond_fp16_are_flagged(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    x[1] *= 1e9
    status = np.zeros(2, np.uint8)
    qk.KQUANT_QUANTIZERS[qtype](x, status=status)
    assert status[0] == 0
    assert status[1] & STATUS_SCALE_OVERFLOW


def test_quantizer_checks_shapes() -> None:
    q = qk.KQUANT_QUANTIZERS[GGMLQuantizationType.Q6_K]
    with pytest.raises(ValueError, match="multiple of 256"):
        q(np.zeros((1, 576), np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        q.reference(np.zeros((1, 576), np.float32))
    assert [qk.KQUANT_QUANTIZERS[t].row_bytes(512) for t in TYPES] == [288, 352, 420]
