"""Compile every kernel once, up front, so a first run can say so instead of silently stalling.

numba compiles a kernel the first time it is called and keeps it in the on-disk cache
(``pipx_llama._numba_cache``); later runs load it in milliseconds. ``warm_up`` runs a tiny
synthetic model -- one layer whose matrices use every packed weight type -- through load, prompt
evaluation and generation, which compiles everything the fused forward pass needs, plus the
embedding lookups of every weight type. A marker file then records that this cache is warm for
this CPU.

Used by the CLI as::

    from pipx_llama.engine import warm_up
    warm_up(lambda message: print(message, file=sys.stderr))
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

COMPILING = "compiling kernels, first run only (about half a minute)..."


def _marker() -> Path:
    from pipx_llama._numba_cache import CACHE_DIR
    from pipx_llama.engine.kernels import simd
    from pipx_llama.system import compile_target

    target = compile_target()
    features = ",".join(sorted(f"{'+' if on else '-'}{name}" for name, on in target.features.items()))
    cpu = hashlib.sha1(f"{target.name} {features}".encode()).hexdigest()[:12]
    return Path(CACHE_DIR) / f"pipx-llama-warm-{simd.TIER or 'portable'}-{cpu}"


def cache_is_warm() -> bool:
    """Whether ``warm_up`` has completed with this kernel cache on this CPU."""
    try:
        return _marker().exists()
    except OSError:
        return False


def warm_up(on_event: Callable[[str], None] | None = None, model_path: str | Path | None = None) -> float:
    """Compile (or find cached) every kernel; returns the seconds spent compiling (0 if already warm).

    ``on_event`` receives two messages when there is work to do: :data:`COMPILING` before, and
    ``"compiled kernels in N s"`` after. With ``model_path``, nothing is compiled unless it names
    a GGUF file: a mistyped path is then reported at once (by ``load_model``), not after compiling.
    """
    if cache_is_warm() or (model_path is not None and not _looks_like_gguf(model_path)):
        return 0.0
    if on_event is not None:
        on_event(COMPILING)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pipx-llama-warmup-") as tmp:
        path = Path(tmp) / "tiny.gguf"
        write_tiny_model(path)
        _exercise(path)
    _embedding_lookups()
    seconds = time.perf_counter() - t0
    try:
        marker = _marker()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{seconds:.1f}\n")
    except OSError:
        pass
    if on_event is not None:
        on_event(f"compiled kernels in {seconds:.0f} s")
    return seconds


def _looks_like_gguf(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _exercise(path: Path) -> None:
    from pipx_llama.engine.model import load_model

    model = load_model(path, threads=2)
    try:
        ctx = model.new_context(32)
        ctx.eval([1, 5, 9, 200], all_logits=True)
        ctx.eval([7])
    finally:
        model.close()


def _embedding_lookups() -> None:
    """Dequantize one row of every weight type (the token-embedding lookup compiles per type)."""
    from gguf import GGML_QUANT_SIZES

    from pipx_llama.engine.kernels import WEIGHT_KERNELS

    for qtype, kernel in WEIGHT_KERNELS.items():
        block, size = GGML_QUANT_SIZES[qtype]
        n = max(256, block)
        row = np.zeros((1, n // block * size), np.uint8)
        kernel.dequantize(row, np.empty((1, n), np.float32))


# ----------------------------------------------------------------------------- the tiny model

_DIM, _HEADS, _KV_HEADS, _FFN, _VOCAB = 256, 4, 2, 512, 288


def write_tiny_model(path: Path, seed: int = 0, kquants: bool = True, q5: bool = False) -> None:
    """A 1-layer LLaMA GGUF whose matrices cover every packed type, with random small weights.

    ``kquants=False`` uses legacy types only (Q4_0, Q4_1, Q8_0) for every matrix; ``q5`` puts the
    Q5 types in (Q5_1 and Q5_0 for legacy, Q5_K with K-quants) in place of two of them.
    """
    import gguf
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    hd = _DIM // _HEADS
    k4, k6 = (Q.Q4_K, Q.Q6_K) if kquants else (Q.Q4_1, Q.Q8_0)
    k5 = k4
    if q5:
        k4, k5 = (Q.Q4_K, Q.Q5_K) if kquants else (Q.Q5_1, Q.Q5_0)
    tensors = [
        ("token_embd.weight", Q.Q8_0, _VOCAB, _DIM),
        ("blk.0.attn_norm.weight", Q.F32, 1, _DIM),
        ("blk.0.attn_q.weight", Q.Q4_0, _DIM, _DIM),
        ("blk.0.attn_k.weight", Q.Q4_1, _KV_HEADS * hd, _DIM),
        ("blk.0.attn_v.weight", Q.Q8_0, _KV_HEADS * hd, _DIM),
        ("blk.0.attn_output.weight", k4, _DIM, _DIM),
        ("blk.0.ffn_norm.weight", Q.F32, 1, _DIM),
        ("blk.0.ffn_gate.weight", k6, _FFN, _DIM),
        ("blk.0.ffn_up.weight", k5, _FFN, _DIM),
        ("blk.0.ffn_down.weight", Q.Q4_0, _DIM, _FFN),
        ("output_norm.weight", Q.F32, 1, _DIM),
        ("output.weight", k6, _VOCAB, _DIM),
    ]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(_DIM)
    w.add_block_count(1)
    w.add_feed_forward_length(_FFN)
    w.add_head_count(_HEADS)
    w.add_head_count_kv(_KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581w{i}" for i in range(_VOCAB - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * len(pieces))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (_VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    data = []
    for name, qtype, rows, cols in tensors:
        if qtype == Q.F32:
            arr = np.ones(cols, np.float32)
            w.add_tensor_info(name, (cols,), arr.dtype, arr.nbytes)
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            arr = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
            scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            for off in {Q.Q4_0: (0,), Q.Q8_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
                        Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]:
                arr[:, :, off : off + 2] = scale
            arr = arr.reshape(rows, -1)
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes, raw_dtype=qtype)
        data.append(arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for arr in data:
        w.write_tensor_data(arr)
    w.close()
