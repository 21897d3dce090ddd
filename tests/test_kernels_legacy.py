"""numba kernels of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 against their numpy twins (pipx_llama.formats.legacy),
and against ggml's own C functions when llama-cpp-python is installed."""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from test_formats_legacy import adversarial_rows, quantized, random_blocks

from pipx_llama.engine.kernels import WEIGHT_KERNELS
from pipx_llama.engine.kernels import legacy as kl
from pipx_llama.engine.kernels.floats import FP16_TABLE
from pipx_llama.formats import legacy as ql
from pipx_llama.formats.gguf import open_gguf

FORMATS = [ql.Q4_0, ql.Q4_1, ql.Q5_0, ql.Q5_1, ql.Q8_0]
G = GGMLQuantizationType


def frozen(a: np.ndarray) -> np.ndarray:
    """Weights as the engine passes them: read-only (an mmap view), so tests share its compiled code."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def kernel_dequantize(fmt: type[ql.LegacyFormat], raw: np.ndarray) -> np.ndarray:
    out = np.empty((raw.shape[0], fmt.row_elements(raw.shape[1])), np.float32)
    WEIGHT_KERNELS[fmt.qtype].dequantize(raw, out)
    return out


def kernel_matmul(fmt: type[ql.LegacyFormat], raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)
    WEIGHT_KERNELS[fmt.qtype].matmul(raw, x, out)
    return out


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_every_legacy_type_is_registered() -> None:
    for fmt in FORMATS:
        kernel = WEIGHT_KERNELS[fmt.qtype]
        assert kernel.qtype == fmt.qtype and isinstance(kernel, kl.LegacyKernel)


# --- dequantize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_numpy_bit_for_bit(fmt: type[ql.LegacyFormat]) -> None:
    for raw in (quantized(fmt, 5, 256, seed=21), random_blocks(fmt, 9, 160, seed=22)):
        raw = frozen(raw)
        assert_same_bits(kernel_dequantize(fmt, raw), fmt.dequantize(raw))


def test_dequantize_smollm2_rows_bit_for_bit(smollm2_path: Path) -> None:
    g = open_gguf(smollm2_path)
    for name in ("blk.3.ffn_up.weight", "blk.29.attn_v.weight", "token_embd.weight"):
        info = g.tensors[name]
        rows = g.tensor_bytes(name).reshape(info.shape[1], -1)
        pick = frozen(rows[np.arange(0, info.shape[1], info.shape[1] // 7)])
        fmt = ql.FORMATS[info.qtype]
        assert_same_bits(kernel_dequantize(fmt, pick), fmt.dequantize(pick))


# --- activation quantizers ----------------------------------------------------------------------


def activation_rows() -> np.ndarray:
    rng = np.random.default_rng(23)
    big = (rng.standard_normal((40, 576)).astype(np.float32)
           * rng.uniform(1e-3, 1e3, (40, 1)).astype(np.float32))
    adv = np.tile(adversarial_rows(), (1, 9))
    return np.concatenate([adv, big])


def test_quantize_q8_0_matches_reference_bit_for_bit() -> None:
    x = activation_rows()
    qs = np.empty(x.shape, np.int8)
    d = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    kl.quantize_q8_0(x, qs, d, FP16_TABLE)
    ref_qs, ref_d = ql.quantize_row_q8_0(x)
    assert_same_bits(qs, ref_qs)
    assert_same_bits(d, ref_d)


def test_quantize_q8_1_matches_reference_bit_for_bit() -> None:
    x = activation_rows()
    qs = np.empty(x.shape, np.int8)
    d = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    s = np.empty_like(d)
    kl.quantize_q8_1(x, qs, d, s, FP16_TABLE)
    ref_qs, ref_d, ref_s = ql.quantize_row_q8_1(x)
    assert_same_bits(qs, ref_qs)
    assert_same_bits(d, ref_d)
    assert_same_bits(s, ref_s)


# --- matmul -------------------------------------------------------------------------------------


def magnitude(fmt: type[ql.LegacyFormat], raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """sum_j |w_j x_j| per output: the scale float summation-order differences are relative to."""
    return np.abs(x.astype(np.float64)) @ np.abs(fmt.dequantize(raw).astype(np.float64)).T


# T = 1 and 7 run the per-row kernel; 16, 33 and 64 the tiled one (33: a padded partial run).
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 7, 16, 33, 64])
def test_matmul_matches_integer_twin(fmt: type[ql.LegacyFormat], T: int) -> None:
    rng = np.random.default_rng(100 + T)
    raw = frozen(quantized(fmt, 37, 288, seed=T))  # 37 rows: no tile size divides it
    x = rng.standard_normal((T, 288)).astype(np.float32)
    got = kernel_matmul(fmt, raw, x)
    twin = fmt.matmul_ref(raw, x)
    assert np.all(np.abs(got - twin) <= 1e-5 * magnitude(fmt, raw, x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_few_rows_and_random_blocks(fmt: type[ql.LegacyFormat]) -> None:
    rng = np.random.default_rng(24)
    raw = frozen(random_blocks(fmt, 3, 96, seed=25))
    for T in (1, 20):
        x = rng.standard_normal((T, 96)).astype(np.float32)
        got = kernel_matmul(fmt, raw, x)
        assert np.all(np.abs(got - fmt.matmul_ref(raw, x)) <= 1e-5 * magnitude(fmt, raw, x))


def quantization_bound(fmt: type[ql.LegacyFormat], raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How far the Q8 activations may move the exact result: per element |x - d16*q| <= 0.57*d
    (half a step plus the fp16 rounding of d), and for Q8_1 the fp16 rounding of s against m."""
    T, n = x.shape
    w = np.abs(fmt.dequantize(raw).astype(np.float64)).reshape(raw.shape[0], n // 32, 32).sum(-1)
    d = np.abs(x.reshape(T, n // 32, 32)).max(-1).astype(np.float64) / 127
    bound = (0.57 * d) @ w.T
    if fmt.has_min:
        _, m = fmt.scales(raw)
        xs = np.abs(x.reshape(T, n // 32, 32)).sum(-1).astype(np.float64)
        bound += 2.0**-9 * xs @ np.abs(m.astype(np.float64)).T
    return bound + 1e-5 * magnitude(fmt, raw, x)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 64])
def test_matmul_close_to_float64(fmt: type[ql.LegacyFormat], T: int) -> None:
    rng = np.random.default_rng(26)
    raw = frozen(quantized(fmt, 45, 256, seed=27))
    x = rng.standard_normal((T, 256)).astype(np.float32)
    x[:, 7] *= 30  # an outlier coarsens one block's activation step
    got = kernel_matmul(fmt, raw, x)
    exact = x.astype(np.float64) @ fmt.dequantize(raw).astype(np.float64).T
    assert np.all(np.abs(got - exact) <= quantization_bound(fmt, raw, x))


def test_matmul_on_smollm2_weights(smollm2_path: Path) -> None:
    g = open_gguf(smollm2_path)
    rng = np.random.default_rng(28)
    for name, T in (("blk.0.ffn_down.weight", 1), ("blk.0.ffn_down.weight", 40), ("token_embd.weight", 1)):
        info = g.tensors[name]
        rows = g.tensor_bytes(name).reshape(info.shape[1], -1)
        raw = rows[:700] if info.shape[1] > 700 else rows
        fmt = ql.FORMATS[info.qtype]
        x = rng.standard_normal((T, info.shape[0])).astype(np.float32)
        got = kernel_matmul(fmt, raw, x)
        assert np.all(np.abs(got - fmt.matmul_ref(raw, x)) <= 1e-5 * magnitude(fmt, raw, x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tokens_result_does_not_depend_on_its_batch(fmt: type[ql.LegacyFormat]) -> None:
    """Prompt processing (tiles) and generation (rows) give the same bits for the same token."""
    rng = np.random.default_rng(33)
    raw = frozen(quantized(fmt, 19, 160, seed=34))
    x = rng.standard_normal((35, 160)).astype(np.float32)
    batch = kernel_matmul(fmt, raw, x)
    alone = np.concatenate([kernel_matmul(fmt, raw, x[t : t + 1]) for t in range(35)])
    assert_same_bits(batch, alone)


@pytest.mark.parametrize("fmt", [ql.Q4_1, ql.Q8_0])
def test_matmul_does_not_depend_on_thread_count(fmt: type[ql.LegacyFormat]) -> None:
    rng = np.random.default_rng(29)
    raw = frozen(quantized(fmt, 70, 128, seed=30))
    x = rng.standard_normal((40, 128)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = np.concatenate([kernel_matmul(fmt, raw, x), kernel_matmul(fmt, raw, x[:1])])
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = np.concatenate([kernel_matmul(fmt, raw, x), kernel_matmul(fmt, raw, x[:1])])
    finally:
        numba.set_num_threads(before)
    assert_same_bits(one, many)


def test_matmul_rejects_mismatched_shapes() -> None:
    kernel = WEIGHT_KERNELS[G.Q4_0]
    raw = frozen(quantized(ql.Q4_0, 4, 64, seed=31))
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="activations"):
        kernel.matmul(raw, np.zeros((2, 96), np.float32), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="activations"):
        kernel.matmul(raw, x.astype(np.float64), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="output"):
        kernel.matmul(raw, x, np.empty((4, 2), np.float32))
    with pytest.raises(ValueError, match="blocks"):
        kernel.matmul(frozen(raw[:, :-1]), x, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="output"):
        kernel.dequantize(raw, np.empty((4, 32), np.float32))


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 SIMD check")
def test_hot_loops_are_vectorized() -> None:
    """Guard against a change that makes LLVM fall back to scalar code (see NUMBA-NOTES).

    numba cannot show the assembly of cached code, so fresh uncached copies are compiled here.
    """
    packed = ("vpmaddwd", "vpmullw", "vpmulld", "vpdpwssd")
    raw = frozen(quantized(ql.Q4_1, 9, 64, seed=32))
    qs, d, s = ql.quantize_row_q8_1(np.ones((1, 64), np.float32))
    yT, dT, sT = (np.ascontiguousarray(np.repeat(a, 32, 0).T) for a in (qs, d, s))
    ysum = np.zeros(dT.shape, np.int32)
    out1, out32 = np.empty((1, 9), np.float32), np.empty((32, 9), np.float32)
    for fn, args in ((kl._rows_q4_1, (raw, qs, d, s, out1, FP16_TABLE)),
                     (kl._tiles_q4_1, (raw, yT, dT, sT, ysum, out32, FP16_TABLE))):
        fresh = numba.njit(parallel=True, fastmath=True)(fn.py_func)
        fresh(*args)
        asm = fresh.inspect_asm(fresh.signatures[0])
        assert "ymm" in asm or "zmm" in asm, fn.__name__
        assert any(op in asm for op in packed), fn.__name__


# --- cross-check with ggml's own C code, when llama-cpp-python is installed ----------------------


@pytest.fixture(scope="module")
def ggml() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml-base (reference quantizers, dequantizers) and libggml-cpu (vec_dot) from llama-cpp-python."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = [sorted(lib_dir.glob(f"*{name}.*")) for name in ("ggml-base", "ggml-cpu")]
    if not all(found):
        pytest.skip(f"no libggml-base/libggml-cpu under {lib_dir}")
    base, cpu = (ctypes.CDLL(str(paths[0])) for paths in found)
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init()  # fills the fp16 table the CPU backend's vec_dot reads
    return base, cpu


def _c_fn(lib: ctypes.CDLL, name: str, *argtypes: type) -> Callable[..., None]:
    fn = getattr(lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = None
    return fn


def _p(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


def test_activation_quantizers_match_ggml_c(ggml: tuple[ctypes.CDLL, ctypes.CDLL]) -> None:
    base, _ = ggml
    x = np.delete(activation_rows(), 6, axis=0)  # row 6 makes 1/d overflow: undefined behaviour in C
    for act, block, ours in (("q8_0", ql.BLOCK_Q8_0, ql.quantize_row_q8_0),
                             ("q8_1", ql.BLOCK_Q8_1, ql.quantize_row_q8_1)):
        fn = _c_fn(base, f"quantize_row_{act}_ref", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
        blocks = np.zeros((x.shape[0], x.shape[1] // 32), block)
        for t in range(x.shape[0]):
            fn(_p(x[t]), _p(blocks[t]), x.shape[1])
        got = ours(x)
        assert_same_bits(got[0], blocks["qs"].reshape(x.shape))
        assert_same_bits(got[1], blocks["d"].astype(np.float32))
        if act == "q8_1":
            assert_same_bits(got[2], blocks["s"].astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_and_vec_dot_match_ggml_c(ggml: tuple[ctypes.CDLL, ctypes.CDLL],
                                             fmt: type[ql.LegacyFormat]) -> None:
    base, cpu = ggml
    name = fmt.qtype.name.lower()
    raw = frozen(random_blocks(fmt, 12, 256, seed=35))
    c_deq = np.empty((12, 256), np.float32)
    dequantize_row = _c_fn(base, f"dequantize_row_{name}", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    for r in range(12):
        dequantize_row(_p(raw[r]), _p(c_deq[r]), 256)
    assert_same_bits(kernel_dequantize(fmt, raw), c_deq)

    vp, size = ctypes.c_void_p, ctypes.c_size_t
    vec_dot = _c_fn(cpu, f"ggml_vec_dot_{name}_{fmt.activation}", ctypes.c_int, vp, size, vp, size, vp, size,
                    ctypes.c_int)
    quantize = _c_fn(base, f"quantize_row_{fmt.activation}_ref", vp, vp, ctypes.c_int64)
    x = np.random.default_rng(36).standard_normal((3, 256)).astype(np.float32)
    c_out = np.empty((3, 12), np.float32)
    block = ql.BLOCK_Q8_1 if fmt.activation == "q8_1" else ql.BLOCK_Q8_0
    for t in range(3):
        y = np.zeros(8, block)
        quantize(_p(x[t]), _p(y), 256)
        for r in range(12):
            vec_dot(256, _p(c_out[t, r:]), 0, _p(raw[r]), 0, _p(y), 0, 1)
    assert np.all(np.abs(kernel_matmul(fmt, raw, x) - c_out) <= 1e-5 * magnitude(fmt, raw, x))
