"""numpy references of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and of ggml's Q8_0/Q8_1 activation quantizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from pipx_llama.formats import legacy as ql
from pipx_llama.formats.floats import round_to_fp16
from pipx_llama.formats.gguf import open_gguf

FORMATS = [ql.Q4_0, ql.Q4_1, ql.Q5_0, ql.Q5_1, ql.Q8_0]


def quantized(fmt: type[ql.LegacyFormat], rows: int, n: int, seed: int) -> np.ndarray:
    """Rows made by gguf-py's quantizer from gaussian weights (with an outlier per row)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    w[:, 5] *= 20
    return gq.quantize(w, fmt.qtype)


def random_blocks(fmt: type[ql.LegacyFormat], rows: int, n: int, seed: int) -> np.ndarray:
    """Random bytes for every field, then sane fp16 scales (and minimums) written over them."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, n // ql.QK * fmt.type_size), dtype=np.uint8)
    blocks = raw.view(fmt.block_dtype)
    blocks["d"] = rng.uniform(-0.05, 0.05, blocks.shape).astype(np.float16)
    if fmt.has_min:
        blocks["m"] = rng.uniform(-1, 1, blocks.shape).astype(np.float16)
    return raw


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def adversarial_rows() -> np.ndarray:
    """Rows of 64 that stress the activation quantizers (each block of 32 is its own case)."""
    rng = np.random.default_rng(7)
    rows = np.zeros((8, 64), np.float32)
    rows[1] = rng.standard_normal(64)
    rows[1, 3] = 3e38  # one huge value: its block's d overflows fp16
    rows[1, 40] = -1e30
    rows[2] = rng.standard_normal(64) * np.float32(1e-30)  # tiny, still finite 1/d
    rows[3, :32] = np.arange(32) - 15.5  # amax 16.5: exact ties after scaling?
    rows[3, 32:] = (np.arange(32) - 16) * np.float32(127 / 16)  # x * id lands on .5 values
    rows[4, :32] = -0.0
    rows[4, 32:] = 1.0
    rows[5] = np.float32(2.0) ** rng.integers(-20, 20, 64).astype(np.float32) * rng.choice([-1, 1], 64)
    rows[6] = rng.standard_normal(64) * np.float32(1e-39)  # subnormal: 1/d is inf (undefined in C)
    rows[7, ::2] = 127.0
    rows[7, 1::2] = -127.0
    return rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_layout_matches_ggml(fmt: type[ql.LegacyFormat]) -> None:
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[fmt.qtype]
    assert fmt.block_dtype.itemsize == fmt.type_size
    assert fmt.block_dtype.names[0] == "d" and fmt.block_dtype.fields["d"][1] == 0
    assert fmt.block_dtype.names[-1] == "qs"
    assert ql.FORMATS[fmt.qtype] is fmt
    assert ql.BLOCK_Q8_1.itemsize == 36


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_gguf_on_quantized_rows(fmt: type[ql.LegacyFormat]) -> None:
    raw = quantized(fmt, 6, 256, seed=11)
    assert_same_bits(fmt.dequantize(raw), gq.dequantize(raw, fmt.qtype))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_gguf_on_random_bytes(fmt: type[ql.LegacyFormat]) -> None:
    raw = random_blocks(fmt, 7, 320, seed=12)
    assert_same_bits(fmt.dequantize(raw), gq.dequantize(raw, fmt.qtype))


@pytest.mark.parametrize(("name", "qtype"), [("blk.0.ffn_down.weight", GGMLQuantizationType.Q4_1),
                                             ("blk.7.attn_q.weight", GGMLQuantizationType.Q4_1),
                                             ("token_embd.weight", GGMLQuantizationType.Q8_0)])
def test_dequantize_matches_gguf_on_smollm2(
    smollm2_path: Path, name: str, qtype: GGMLQuantizationType
) -> None:
    g = open_gguf(smollm2_path)
    info = g.tensors[name]
    assert info.qtype == qtype
    rows = g.tensor_bytes(name).reshape(info.shape[1], -1)
    pick = rows[[0, 1, info.shape[1] // 2, info.shape[1] - 1]]
    assert_same_bits(ql.FORMATS[qtype].dequantize(pick), gq.dequantize(pick, qtype))


def test_q8_0_reference_matches_gguf_quantizer() -> None:
    """gguf-py's Q8_0 quantizer is bit-exact with quantize_row_q8_0_ref: same qs, same fp16 d."""
    rng = np.random.default_rng(13)
    x = np.concatenate(
        [
            rng.standard_normal((5, 128)).astype(np.float32),
            adversarial_rows()[[0, 1, 3, 4, 5, 7]].repeat(2, 1),
        ]
    )
    qs, d = ql.quantize_row_q8_0(x)
    with np.errstate(over="ignore"):  # the 3e38 row's d is inf in fp16
        blocks = gq.quantize(x, GGMLQuantizationType.Q8_0).view(ql.BLOCK_Q8_0)
    np.testing.assert_array_equal(qs, blocks["qs"].reshape(x.shape))
    assert_same_bits(d, blocks["d"].astype(np.float32))


def test_q8_quantizers_round_half_away_from_zero() -> None:
    x = np.zeros((1, 32), np.float32)
    x[0, :5] = [127.0, 2.5, -3.5, 0.5, -0.5]  # amax 127: d = 1, so these land exactly on .5
    qs, d = ql.quantize_row_q8_0(x)
    assert qs[0, :5].tolist() == [127, 3, -4, 1, -1]
    assert d[0, 0] == 1.0


def test_q8_1_shares_q8_0_and_adds_scaled_sums() -> None:
    x = adversarial_rows()
    qs0, d0 = ql.quantize_row_q8_0(x)
    qs, d, s = ql.quantize_row_q8_1(x)
    np.testing.assert_array_equal(qs, qs0)
    assert_same_bits(d, d0)
    rng = np.random.default_rng(14)
    y = rng.standard_normal((3, 96)).astype(np.float32)
    qs, d, s = ql.quantize_row_q8_1(y)
    raw_d = np.abs(y.reshape(3, 3, 32)).max(-1) / np.float32(127)  # unrounded, as the reference uses
    sums = qs.reshape(3, 3, 32).astype(np.int32).sum(-1).astype(np.float32)
    assert_same_bits(s, round_to_fp16(sums * raw_d))


def test_q8_quantizers_on_degenerate_blocks() -> None:
    qs, d, s = ql.quantize_row_q8_1(adversarial_rows())
    assert np.all(qs[4, :32] == 0) and d[4, 0] == 0 and s[4, 0] == 0  # -0.0 block
    assert np.all(qs[4, 32:] == 127)
    assert np.isinf(d[1, 0]) and qs[1, 3] == 127  # 3e38 / 127 overflows fp16
    assert np.all(np.abs(qs) <= 127)
    assert np.all(np.abs(qs[6]) == 127)  # subnormal d, 1/d = inf (undefined in C): saturated
    assert np.all(qs[7] == np.tile([127, -127], 32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_ref_is_the_blockwise_integer_dot(fmt: type[ql.LegacyFormat]) -> None:
    """The twin equals float64 arithmetic on dequantized weights and dequantized activations,
    except for the fp16 rounding of Q8_1's s (used against m in the _1 types)."""
    raw = quantized(fmt, 5, 128, seed=15)
    rng = np.random.default_rng(16)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    acts = fmt.quantize_activations(x)
    xq = (acts[0].reshape(3, 4, 32) * acts[1][..., None].astype(np.float64)).reshape(3, 128)
    w = fmt.dequantize(raw).astype(np.float64)
    expect = xq @ w.T
    got = fmt.matmul_ref(raw, x)
    scale = np.abs(xq) @ np.abs(w).T
    if fmt.has_min:
        _, m = fmt.scales(raw)
        scale += np.abs(xq).reshape(3, 4, 32).sum(-1) @ np.abs(m).T
    rtol = 2.0**-10 if fmt.has_min else 1e-6
    assert np.all(np.abs(got - expect) <= rtol * scale)
