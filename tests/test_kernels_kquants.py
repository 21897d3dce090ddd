"""numba K-quant kernels against their numpy twins in pipx_llama.formats.kquants.

Weight blocks are random bytes (gguf-py cannot quantize K-quants) with finite fp16 scales. When
llama-cpp-python is installed, one more test checks against its compiled ggml: blocks quantized by
ggml, its Q8_K quantizer and the SIMD dot products llama.cpp runs on this machine.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from pipx_llama.engine.kernels import WEIGHT_KERNELS
from pipx_llama.engine.kernels import kquants as kk
from pipx_llama.formats import kquants as kq

TYPES = [kq.Q4_K, kq.Q5_K, kq.Q6_K]
ids = [c.__name__ for c in TYPES]


def random_blocks(cls: type, rng: np.random.Generator, rows: int, nb: int, sane: bool = False) -> np.ndarray:
    """uint8 [rows, nb*block] of random block bytes with finite d (and dmin); small ones if sane."""
    raw = rng.integers(0, 256, size=(rows, nb * cls.block.itemsize), dtype=np.uint8)
    blocks = raw.view(cls.block)
    for field in ("d", "dmin"):
        if field in cls.block.names:
            shape = blocks[field].shape
            if sane:
                blocks[field] = rng.uniform(-0.02, 0.02, shape).astype(np.float16)
            else:
                bits = rng.integers(0, 0x7C00, size=shape, dtype=np.uint16)
                bits |= rng.integers(0, 2, size=shape, dtype=np.uint16) << 15
                blocks[field] = bits.view(np.float16)
    return raw


def quantize(x: np.ndarray) -> kq.Q8K:
    t, n = x.shape
    q8 = kq.Q8K(
        np.empty((t, n), np.int8), np.empty((t, n // 256), np.float32), np.empty((t, n // 16), np.int16)
    )
    kk.quantize_q8_K(x, q8.qs, q8.d, q8.bsums)
    return q8


def adversarial_rows() -> np.ndarray:
    rng = np.random.default_rng(7)
    rows = [np.zeros(512, np.float32), np.full(512, -0.0, np.float32)]
    r = rng.uniform(-1e-6, 1e-6, 512).astype(np.float32)
    r[17], r[400] = 3.0e4, -7.0e3
    rows.append(r)  # one huge value among tiny ones
    r = rng.standard_normal(512).astype(np.float32)
    r[5], r[6], r[300], r[301] = 9.0, -9.0, -9.0, 9.0
    rows.append(r)  # tied magnitudes: the first one sets the sign
    rows.append(np.arange(512, dtype=np.float32) - 255.5)  # many exact halves
    r = np.full(512, 1e-40, np.float32)
    r[::3] = -2e-39
    rows.append(r.copy())  # subnormals only: iscale overflows, stored as zeros
    r[100], r[511] = 1e-30, -1e-36
    rows.append(r)  # subnormals under a tiny normal max
    rows.append(rng.standard_normal(512).astype(np.float32) * 1e30)
    r = rng.standard_normal(512).astype(np.float32)
    r[::7] = 0.0
    rows.append(r)
    return np.stack(rows)


def test_kernels_are_registered() -> None:
    for qtype in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K):
        assert WEIGHT_KERNELS[qtype].qtype == qtype


# ---------------------------------------------------------------- dequantize


@pytest.mark.parametrize("cls", TYPES, ids=ids)
def test_dequantize_matches_numpy_bit_for_bit(cls: type) -> None:
    rng = np.random.default_rng(10)
    raw = random_blocks(cls, rng, rows=1500, nb=3)
    out = np.empty((1500, 768), np.float32)
    WEIGHT_KERNELS[cls.qtype].dequantize(raw, out)
    assert np.array_equal(out.view(np.uint32), cls.dequantize(raw).view(np.uint32))


def test_dequantize_into_a_view() -> None:
    rng = np.random.default_rng(16)
    raw = random_blocks(kq.Q6_K, rng, rows=4, nb=1)
    buf = np.zeros((4, 300), np.float32)
    WEIGHT_KERNELS[GGMLQuantizationType.Q6_K].dequantize(raw, buf[:, 20:276])
    assert np.array_equal(buf[:, 20:276], kq.Q6_K.dequantize(raw))
    assert not buf[:, :20].any() and not buf[:, 276:].any()


def test_dequantize_rejects_wrong_shapes() -> None:
    k = WEIGHT_KERNELS[GGMLQuantizationType.Q4_K]
    with pytest.raises(ValueError, match="Q4_K"):
        k.dequantize(np.zeros((2, 100), np.uint8), np.empty((2, 256), np.float32))
    with pytest.raises(ValueError, match="out"):
        k.dequantize(np.zeros((2, 144), np.uint8), np.empty((2, 512), np.float32))


# ---------------------------------------------------------------- Q8_K activations


def test_quantize_q8_K_matches_numpy_bit_for_bit() -> None:
    rng = np.random.default_rng(11)
    scales = rng.uniform(-30, 30, (300, 1)).astype(np.float32)
    x = np.concatenate(
        [(rng.standard_normal((300, 512)) * np.exp(scales)).astype(np.float32), adversarial_rows()]
    )
    got = quantize(x)
    want = kq.quantize_row_q8_K_ref(x)
    assert np.array_equal(got.qs, want.qs)
    assert np.array_equal(got.d.view(np.uint32), want.d.view(np.uint32))
    assert np.array_equal(got.bsums, want.bsums)


# ---------------------------------------------------------------- matmul


def kernel_matmul(cls: type, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The kernel's matmul on read-only weights, as the engine passes mmap views."""
    raw = raw.view()
    raw.flags.writeable = False
    out = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)
    WEIGHT_KERNELS[cls.qtype].matmul(raw, x, out)
    return out


@pytest.mark.parametrize("cls", TYPES, ids=ids)
@pytest.mark.parametrize(("t_count", "rows", "nb"), [(1, 37, 4), (2, 5, 2), (5, 37, 3), (64, 100, 2)])
def test_matmul_matches_integer_twin(cls: type, t_count: int, rows: int, nb: int) -> None:
    """Both paths (mat-vec for few tokens, expanded rows for many) against ggml's integer arithmetic.

    Row counts are not multiples of the kernels' row block; T = 5 and 64 use the many-token path.
    """
    rng = np.random.default_rng(12 + t_count)
    raw = random_blocks(cls, rng, rows, nb, sane=True)
    x = (rng.standard_normal((t_count, nb * 256)) * rng.uniform(0.1, 10, (t_count, 1))).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero activation block
    got = kernel_matmul(cls, raw, x)
    q8 = kq.quantize_row_q8_K_ref(x)
    want = cls.dot_q8_K(raw, q8)
    magnitude = (
        np.abs(kq.dequantize_q8_K(q8).astype(np.float64)) @ np.abs(cls.dequantize(raw).astype(np.float64)).T
    )
    # rtol 1e-5 relative to sum |w*x| rather than to the result, which can nearly cancel
    assert np.all(np.abs(got - want) <= 1e-5 * magnitude)


@pytest.mark.parametrize("cls", TYPES, ids=ids)
@pytest.mark.parametrize("t_count", [1, 7])
def test_matmul_approximates_float_product(cls: type, t_count: int) -> None:
    """Against float64 dequantized weights @ x: the only error is the activations' 8-bit rounding."""
    rng = np.random.default_rng(13)
    raw = random_blocks(cls, rng, rows=50, nb=4, sane=True)
    x = rng.standard_normal((t_count, 1024)).astype(np.float32)
    got = kernel_matmul(cls, raw, x)
    w = cls.dequantize(raw).astype(np.float64)
    want = x.astype(np.float64) @ w.T
    x_err = np.abs(x - kq.dequantize_q8_K(kq.quantize_row_q8_K_ref(x))).astype(np.float64)
    bound = x_err @ np.abs(w).T + 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert np.all(np.abs(got - want) <= bound)
    # and the activation error itself is at most half a quantization step per block
    steps = np.repeat(np.abs(kq.quantize_row_q8_K_ref(x).d), 256, axis=1)
    assert np.all(x_err <= 0.5 * steps * (1 + 1e-5))


@pytest.mark.parametrize("cls", TYPES, ids=ids)
def test_matmul_same_bits_for_any_thread_count(cls: type) -> None:
    """Each output is summed by one thread in a fixed order, so threads never change results."""
    rng = np.random.default_rng(14)
    raw = random_blocks(cls, rng, rows=70, nb=2, sane=True)
    xs = [rng.standard_normal((t, 512)).astype(np.float32) for t in (1, 9)]
    before = numba.get_num_threads()
    try:
        results = []
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results.append([kernel_matmul(cls, raw, x) for x in xs])
    finally:
        numba.set_num_threads(before)
    for a, b in zip(results[0], results[-1]):
        assert np.array_equal(a, b)


def test_matmul_writes_into_a_view() -> None:
    rng = np.random.default_rng(15)
    raw = random_blocks(kq.Q4_K, rng, rows=20, nb=1, sane=True)
    raw.flags.writeable = False
    x = rng.standard_normal((3, 256)).astype(np.float32)
    buf = np.zeros((3, 40), np.float32)
    WEIGHT_KERNELS[GGMLQuantizationType.Q4_K].matmul(raw, x, buf[:, 10:30])
    assert np.all(buf[:, :10] == 0) and np.all(buf[:, 30:] == 0)
    assert np.array_equal(buf[:, 10:30], kernel_matmul(kq.Q4_K, raw, x))


def test_matmul_rejects_mismatched_shapes() -> None:
    k = WEIGHT_KERNELS[GGMLQuantizationType.Q6_K]
    w = np.zeros((4, 210), np.uint8)
    with pytest.raises(ValueError, match="shapes disagree"):
        k.matmul(w, np.zeros((1, 512), np.float32), np.empty((1, 4), np.float32))
    with pytest.raises(ValueError, match="shapes disagree"):
        k.matmul(w, np.zeros((2, 256), np.float32), np.empty((1, 4), np.float32))


# ---------------------------------------------------------------- against llama.cpp's compiled ggml


@pytest.fixture(scope="module")
def ggml() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml-base and libggml-cpu from llama-cpp-python, when installed (it is optional)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    libdir = Path(llama_cpp.__file__).parent / "lib"
    try:
        base = ctypes.CDLL(str(libdir / "libggml-base.so"))
        cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"))
        cpu.ggml_cpu_init()
    except (OSError, AttributeError) as err:
        pytest.skip(f"llama-cpp-python's ggml libraries are not loadable: {err}")
    return base, cpu


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("cls", TYPES, ids=ids)
def test_against_ggml_library(ggml: tuple[ctypes.CDLL, ctypes.CDLL], cls: type) -> None:
    """Blocks quantized by ggml itself: dequantize and Q8_K bit for bit, dot products as its SIMD kernel."""
    base, cpu = ggml
    name = cls.__name__.lower().replace("_k", "_K")
    rng = np.random.default_rng(17)
    rows, n, t_count = 32, 1024, 5
    wf = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    raw = np.zeros((rows, cls.row_bytes(n)), np.uint8)
    getattr(base, f"quantize_{name}")(_ptr(wf), _ptr(raw), ctypes.c_int64(rows), ctypes.c_int64(n), None)
    x = (rng.standard_normal((t_count, n)) * rng.uniform(0.01, 10, (t_count, 1))).astype(np.float32)
    y = np.zeros((t_count, n // 256), kq.BLOCK_Q8_K)
    want = np.empty((t_count, rows), np.float32)
    deq = np.empty((rows, n), np.float32)
    s = ctypes.c_float()
    for r in range(rows):
        getattr(base, f"dequantize_row_{name}")(_ptr(raw[r]), _ptr(deq[r]), ctypes.c_int64(n))
    for t in range(t_count):
        cpu.quantize_row_q8_K(_ptr(x[t]), _ptr(y[t]), ctypes.c_int64(n))
        for r in range(rows):
            getattr(cpu, f"ggml_vec_dot_{name}_q8_K")(
                ctypes.c_int(n), ctypes.byref(s), ctypes.c_size_t(0), _ptr(raw[r]), ctypes.c_size_t(0),
                _ptr(y[t]), ctypes.c_size_t(0), ctypes.c_int(1),
            )  # fmt: skip
            want[t, r] = s.value
    q8 = quantize(x)
    assert np.array_equal(q8.qs, y["qs"].reshape(t_count, n))
    assert np.array_equal(q8.d.view(np.uint32), y["d"].view(np.uint32))
    assert np.array_equal(q8.bsums, y["bsums"].reshape(t_count, -1))
    out = np.empty_like(deq)
    WEIGHT_KERNELS[cls.qtype].dequantize(raw, out)
    assert np.array_equal(out.view(np.uint32), deq.view(np.uint32))
    magnitude = np.abs(kq.dequantize_q8_K(q8).astype(np.float64)) @ np.abs(deq.astype(np.float64)).T
    for t in (1, t_count):
        got = kernel_matmul(cls, raw, x[:t])
        assert np.all(np.abs(got - want[:t]) <= 1e-6 * magnitude[:t])
