"""numba kernels of F32/F16/BF16 weights and the fp16/bf16 roundings, against numpy
(pipx_llama.formats.floats) and, when llama-cpp-python is installed, against ggml's own C functions."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from pipx_llama.engine.kernels import WEIGHT_KERNELS
from pipx_llama.engine.kernels import floats as kf
from pipx_llama.formats import floats as qf

FORMATS = [qf.F32, qf.F16, qf.BF16]


def frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def fp16_boundaries() -> np.ndarray:
    """Every float32 halfway between two neighbouring fp16 values, and its float32 neighbours."""
    h = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = ((h[:-1] + h[1:]) / 2).astype(np.float32)  # exact: fp16 midpoints fit in float32
    bits = mid.view(np.uint32)
    near = np.concatenate([bits - 1, bits, bits + 1]).view(np.float32)
    return np.concatenate([near, -near, np.float32([65504, 65519.996, 65520, 1e9, np.inf, -np.inf, 0, -0.0])])


def test_round_to_fp16_matches_numpy_at_every_tie() -> None:
    x = fp16_boundaries().reshape(1, -1)
    out = np.empty_like(x)
    kf.round_to_fp16(x, out, kf.FP16_TABLE)
    with np.errstate(over="ignore"):
        expect = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.view(np.uint32), expect.view(np.uint32))


def test_round_to_fp16_matches_numpy_on_random_bits() -> None:
    rng = np.random.default_rng(41)
    x = rng.integers(0, 1 << 32, (50, 2000), dtype=np.uint64).astype(np.uint32).view(np.float32)
    out = np.empty_like(x)
    kf.round_to_fp16(x, out, kf.FP16_TABLE)
    finite = ~np.isnan(x)
    with np.errstate(over="ignore"):
        expect = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out[finite].view(np.uint32), expect[finite].view(np.uint32))
    assert np.all(np.isnan(out[~finite]))


def test_round_to_bf16_matches_reference() -> None:
    rng = np.random.default_rng(42)
    x = rng.integers(0, 1 << 32, (20, 1000), dtype=np.uint64).astype(np.uint32).view(np.float32)
    out = np.empty_like(x)
    kf.round_to_bf16(x, out)
    np.testing.assert_array_equal(out.view(np.uint32), qf.round_to_bf16(x).view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_numpy_bit_for_bit(fmt: type[qf.FloatFormat]) -> None:
    rng = np.random.default_rng(43)
    raw = frozen(rng.integers(0, 256, (6, 96 * fmt.type_size), dtype=np.uint8))
    out = np.empty((6, 96), np.float32)
    WEIGHT_KERNELS[fmt.qtype].dequantize(raw, out)
    np.testing.assert_array_equal(out.view(np.uint32), fmt.dequantize(raw).view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 7, 64])
def test_matmul_matches_twin(fmt: type[qf.FloatFormat], T: int) -> None:
    rng = np.random.default_rng(44 + T)
    w = rng.standard_normal((37, 200)).astype(np.float32)
    raw = frozen(gq.quantize(w, fmt.qtype).view(np.uint8).reshape(37, -1))
    x = rng.standard_normal((T, 200)).astype(np.float32)
    out = np.full((T, 37), np.nan, np.float32)
    WEIGHT_KERNELS[fmt.qtype].matmul(raw, x, out)
    mag = np.abs(x.astype(np.float64)) @ np.abs(fmt.dequantize(raw).astype(np.float64)).T
    assert np.all(np.abs(out - fmt.matmul_ref(raw, x)) <= 1e-5 * mag)


def test_matmul_rejects_mismatched_shapes() -> None:
    kernel = WEIGHT_KERNELS[GGMLQuantizationType.F16]
    raw = frozen(np.zeros((3, 64), np.uint8))
    with pytest.raises(ValueError, match="elements"):
        kernel.matmul(raw, np.zeros((1, 64), np.float32), np.empty((1, 3), np.float32))
    with pytest.raises(ValueError, match="output"):
        kernel.matmul(raw, np.zeros((1, 32), np.float32), np.empty((3, 1), np.float32))


# --- cross-check with ggml's own C code, when llama-cpp-python is installed ----------------------


@pytest.fixture(scope="module")
def ggml_cpu() -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib_dir.glob("*ggml-cpu.*"))
    if not found:
        pytest.skip(f"no libggml-cpu under {lib_dir}")
    cpu = ctypes.CDLL(str(found[0]))
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init()
    return cpu


def _p(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_activation_rounding_matches_ggml_c(ggml_cpu: ctypes.CDLL, kind: str) -> None:
    """ggml_cpu_fp32_to_fp16/bf16 are what the CPU backend applies to activations for F16/BF16 weights."""
    rng = np.random.default_rng(45)
    noise = rng.integers(0, 1 << 32, 100000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([fp16_boundaries(), noise[~np.isnan(noise)]]).reshape(1, -1)
    fn = getattr(ggml_cpu, f"ggml_cpu_fp32_to_{kind}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    bits = np.empty(x.shape[1], np.uint16)
    fn(_p(x), _p(bits), x.shape[1])
    ours = np.empty_like(x)
    if kind == "fp16":
        kf.round_to_fp16(x, ours, kf.FP16_TABLE)
        theirs = bits.view(np.float16).astype(np.float32)
    else:
        kf.round_to_bf16(x, ours)
        theirs = qf.bf16_bits_to_fp32(bits)
    np.testing.assert_array_equal(ours[0].view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("fmt", [qf.F16, qf.BF16])
def test_matmul_matches_ggml_vec_dot(ggml_cpu: ctypes.CDLL, fmt: type[qf.FloatFormat]) -> None:
    kind = fmt.qtype.name.lower()  # f16 / bf16, as in ggml_vec_dot_<kind>
    half = "fp16" if kind == "f16" else kind  # as in ggml_cpu_fp32_to_<half>
    rng = np.random.default_rng(46)
    raw = frozen(gq.quantize(rng.standard_normal((9, 320)).astype(np.float32), fmt.qtype)
                 .view(np.uint8).reshape(9, -1))
    x = rng.standard_normal((2, 320)).astype(np.float32)
    to_half = getattr(ggml_cpu, f"ggml_cpu_fp32_to_{half}")
    to_half.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    vp, size = ctypes.c_void_p, ctypes.c_size_t
    vec_dot = getattr(ggml_cpu, f"ggml_vec_dot_{kind}")
    vec_dot.argtypes = [ctypes.c_int, vp, size, vp, size, vp, size, ctypes.c_int]
    vec_dot.restype = None
    c_out = np.empty((2, 9), np.float32)
    for t in range(2):
        y = np.empty(320, np.uint16)
        to_half(_p(x[t]), _p(y), 320)
        for r in range(9):
            vec_dot(320, _p(c_out[t, r:]), 0, _p(raw[r]), 0, _p(y), 0, 1)
    out = np.empty((2, 9), np.float32)
    WEIGHT_KERNELS[fmt.qtype].matmul(raw, x, out)
    mag = np.abs(x.astype(np.float64)) @ np.abs(fmt.dequantize(raw).astype(np.float64)).T
    assert np.all(np.abs(out - c_out) <= 1e-5 * mag)
