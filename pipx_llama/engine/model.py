"""LLaMA-family model: hyper-parameters and weights from an mmap'd GGUF file, and the forward pass.

``load_model`` validates the file once (architecture, hyper-parameters against tensor shapes, tensor
types the kernels support) so that nothing later can fail on a malformed file. Weights stay in the
mapped file: every ``Weight`` is a uint8 view of it, handed to the kernel of its ggml type.

A ``Model`` is immutable and shareable; a ``Context`` holds one conversation's KV cache and scratch
buffers. ``Context.eval`` is the forward pass, written top to bottom in the style of llama2.c.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pipx_llama.engine.gguf_reader import GGUFFile, TensorInfo, open_gguf
from pipx_llama.engine.kernels import WEIGHT_KERNELS, WeightKernel, ops, packed
from pipx_llama.engine.kernels import floats as _floats  # noqa: F401  (registers kernels)
from pipx_llama.engine.kernels import fused as fused_kernels
from pipx_llama.engine.kernels import kquants as _kquants  # noqa: F401
from pipx_llama.engine.kernels import legacy as _legacy  # noqa: F401
from pipx_llama.engine.kernels.floats import FP16_TABLE as _FP16_TABLE
from pipx_llama.errors import ContextFullError, ModelFileError, UnsupportedModelError, UsageError
from pipx_llama.tokenizer.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
DEFAULT_CTX = 4096
DEFAULT_BATCH = 256
# batches at most this long take the fused pass even with plain-kind (Q5_*) weights: generation
_FUSED_PLAIN_MAX_T = 2
# Models with Q5 weights take the fused pass only up to this size. Its portable loops run ~20% slower
# per byte than the per-op kernels, which pays only while the per-op path's parallel regions (~40 us,
# hundreds per token) weigh more: SmolLM2 Q5_0 (0.1 GB) 85 vs 56 tok/s, 7B Q5_K_M (4.8 GB) 3.7 vs 4.6.
_PLAIN_FUSED_MAX_BYTES = 512 << 20


@dataclass(frozen=True)
class HyperParams:
    n_vocab: int
    dim: int  # embedding length
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    n_ctx_train: int
    rope_base: float
    rope_freq_scale: float
    n_rot: int  # leading dims of each head that RoPE rotates
    norm_eps: float
    # Llama 3.1+ RoPE: pair i's angle is divided by rope_factors[i] (the file's rope_freqs.weight)
    rope_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Weight:
    """A 2-D weight [rows, cols] (torch order: rows = outputs) as raw ggml blocks in the mapped file."""

    name: str
    qtype: GGMLQuantizationType
    rows: int
    cols: int
    data: np.ndarray  # uint8 [rows, row_bytes]
    kernel: WeightKernel

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def matmul(self, x: np.ndarray, out: np.ndarray) -> None:
        """out[T, rows] = x[T, cols] @ W.T"""
        self.kernel.matmul(self.data, x, out)


@dataclass(frozen=True)
class Layer:
    attn_norm: np.ndarray  # f32 [dim]
    wq: Weight  # [n_heads*head_dim, dim]
    wk: Weight  # [n_kv_heads*head_dim, dim]
    wv: Weight  # [n_kv_heads*head_dim, dim]
    wo: Weight  # [dim, n_heads*head_dim]
    ffn_norm: np.ndarray  # f32 [dim]
    w_gate: Weight  # [ffn_dim, dim]
    w_up: Weight  # [ffn_dim, dim]
    w_down: Weight  # [dim, ffn_dim]


@dataclass
class Model:
    path: Path
    hparams: HyperParams
    tokenizer: Tokenizer
    metadata: dict[str, Any]
    tok_embd: Weight  # [n_vocab, dim]
    layers: list[Layer]
    output_norm: np.ndarray  # f32 [dim]
    output: Weight  # [n_vocab, dim]; token_embd when the file ties them
    threads: int
    gguf: GGUFFile
    packed: PackedWeights | None = field(default=None, repr=False)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one generated token reads (every matrix once, the embedding row aside)."""
        total = self.output.nbytes
        for layer in self.layers:
            total += sum(w.nbytes for w in (layer.wq, layer.wk, layer.wv, layer.wo,
                                            layer.w_gate, layer.w_up, layer.w_down))
        return total

    def new_context(self, n_ctx: int | None = None, n_batch: int = DEFAULT_BATCH, *, fused: bool = True) -> Context:
        """A fresh context; ``fused=False`` forces the per-op path (same logits, slower; for tests)."""
        return Context(self, n_ctx, n_batch, fused=fused)

    def close(self) -> None:
        self.gguf.close()


@dataclass(frozen=True)
class PackedWeights:
    """Every matmul weight repacked for the SIMD kernels, in one read-only buffer (see kernels.packed).

    ``wdesc[i]`` = (kind, rows, cols, byte offset) of weight i: 7 per layer (q, k, v, o, gate, up,
    down), then the output matrix. ``norms``: attention and feed-forward norm of each layer, then
    the output norm.
    """

    arena: np.ndarray  # uint8, read-only
    wdesc: np.ndarray  # int64 [7 * n_layers + 1, 4]
    need: np.ndarray  # int64 [4 * n_layers + 1]: activation formats of each matmul input (fused_kernels.IN_*)
    norms: np.ndarray  # float32 [2 * n_layers + 1, dim]
    plain: bool = False  # some weights are plain kinds (read from the mapped file; see kernels.packed)


def _pack(g: GGUFFile, layers: list[Layer], output: Weight, output_norm: np.ndarray,
          threads: int) -> PackedWeights | None:
    """Repack the weights when every matmul has a packed kernel here; None means the per-op path.

    Each source tensor is dropped from the process's resident memory once copied (madvise), so
    the peak stays near one copy of the weights; the token embedding stays in the mapped file.
    """
    weights = [w for layer in layers for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up,
                                               layer.w_down)]
    weights.append(output)
    if not all(packed.supported(w.qtype) for w in weights):
        return None
    wdesc = np.zeros((len(weights), 4), np.int64)
    total = 0
    # one Q5 weight (no packed layout) makes every weight plain: all read in place from the file, so
    # the per-op path that runs such a model's prompts maps the same pages (one copy in RAM)
    plain = any(packed.KIND_OF_QTYPE[w.qtype] in packed.PLAIN_KINDS for w in weights)
    if plain and sum(w.nbytes for w in weights) > _PLAIN_FUSED_MAX_BYTES:
        return None
    for i, w in enumerate(weights):
        if plain:
            wdesc[i] = (packed.PLAIN_OF_QTYPE[w.qtype], w.rows, w.cols, g.tensors[w.name].offset)  # in the file
            continue
        kind = packed.KIND_OF_QTYPE[w.qtype]
        wdesc[i] = (kind, w.rows, w.cols, total)
        total += (packed.packed_bytes(kind, w.rows, w.cols) + 63) // 64 * 64
    arena = _huge_page_buffer(total)
    tied = output.name == "token_embd.weight"

    def one(i: int) -> None:
        w = weights[i]
        kind, rows, cols, off = (int(v) for v in wdesc[i])
        packed.repack(kind, w.data, arena[off : off + packed.packed_bytes(kind, rows, cols)])
        if not (tied and w is output):
            _drop_pages(g, w.name)

    to_copy = [] if plain else list(range(len(weights)))
    if threads > 1 and total > (64 << 20):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, to_copy))
    else:
        for i in to_copy:
            one(i)
    arena.flags.writeable = False
    norms = np.stack([n for layer in layers for n in (layer.attn_norm, layer.ffn_norm)] + [output_norm])
    act = [packed.ACTIVATIONS[int(k)] for k in wdesc[:, 0]]
    need = np.zeros(4 * len(layers) + 1, np.int64)
    for li in range(len(layers)):
        a = act[7 * li : 7 * li + 7]
        need[4 * li + fused_kernels.IN_QKV] = a[fused_kernels.W_Q] | a[fused_kernels.W_K] | a[fused_kernels.W_V]
        need[4 * li + fused_kernels.IN_O] = a[fused_kernels.W_O]
        need[4 * li + fused_kernels.IN_FFN] = a[fused_kernels.W_GATE] | a[fused_kernels.W_UP]
        need[4 * li + fused_kernels.IN_DOWN] = a[fused_kernels.W_DOWN]
    need[4 * len(layers)] = act[-1]
    return PackedWeights(arena, wdesc, need, norms.astype(np.float32), plain)


def _huge_page_buffer(size: int) -> np.ndarray:
    """uint8 [size] of anonymous memory, asking for transparent huge pages where the OS has them.

    Generation streams every weight once per token; with 4 KiB pages a 7B model's walk through
    ~1M pages costs TLB misses on every one of them.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or size < (8 << 20):
        return np.empty(size, np.uint8)
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(advice)
    except (OSError, ValueError, AttributeError):
        return np.empty(size, np.uint8)
    return np.frombuffer(mm, np.uint8)


def _drop_pages(g: GGUFFile, name: str) -> None:
    """Tell the kernel we are done with a tensor's pages (they stay in the page cache, not in our RSS)."""
    mm = g._mmap
    if mm is None or not hasattr(mm, "madvise"):
        return
    info = g.tensors[name]
    page = mmap.PAGESIZE
    start = (info.offset + page - 1) // page * page
    end = (info.offset + info.nbytes) // page * page
    if end > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError, AttributeError):
            pass


def default_threads() -> int:
    """Physical cores where they can be counted, else half the logical ones (SMT), at least 1."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        if physical:
            return physical
    except ImportError:
        pass
    import os

    return max(1, (os.cpu_count() or 2) // 2)


def _bad(path: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{path}: {problem}", "the file is damaged or not a complete model; download it again")


def _meta(g: GGUFFile, key: str, kind: type, default: Any = None) -> Any:
    if key not in g.metadata:
        if default is not None:
            return default
        raise _bad(g.path, f"metadata {key!r} is missing")
    value = g.metadata[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise _bad(g.path, f"metadata {key!r} should be an integer, found {type(value).__name__}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise _bad(g.path, f"metadata {key!r} should be a number, found {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise _bad(g.path, f"metadata {key!r} is {value}")
        return value
    if not isinstance(value, kind):
        raise _bad(g.path, f"metadata {key!r} should be {kind.__name__}, found {type(value).__name__}")
    return value


def read_hparams(g: GGUFFile) -> HyperParams:
    arch = _meta(g, "general.architecture", str)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{g.path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            "use a LLaMA-family model (Llama, Llama 2, TinyLlama, Mistral, SmolLM2, ...)",
        )
    a = arch
    dim = _meta(g, f"{a}.embedding_length", int)
    n_heads = _meta(g, f"{a}.attention.head_count", int)
    n_layers = _meta(g, f"{a}.block_count", int)
    ffn_dim = _meta(g, f"{a}.feed_forward_length", int)
    n_ctx_train = _meta(g, f"{a}.context_length", int)
    if not (0 < dim <= 1 << 16 and 0 < n_heads <= dim and 0 < n_layers <= 1024 and 0 < ffn_dim <= 1 << 20
            and 0 < n_ctx_train):
        raise _bad(g.path, f"implausible hyper-parameters: dim {dim}, heads {n_heads}, layers {n_layers}, "
                           f"ffn {ffn_dim}, context {n_ctx_train}")
    n_kv_heads = _meta(g, f"{a}.attention.head_count_kv", int, n_heads)
    if not 0 < n_kv_heads <= n_heads or n_heads % n_kv_heads:
        raise _bad(g.path, f"{n_heads} attention heads cannot be grouped over {n_kv_heads} KV heads")
    if dim % n_heads:
        raise _bad(g.path, f"embedding length {dim} is not a multiple of the {n_heads} heads")
    head_dim = _meta(g, f"{a}.attention.key_length", int, dim // n_heads)
    if head_dim != _meta(g, f"{a}.attention.value_length", int, head_dim) or head_dim % 2 or head_dim <= 0:
        raise UnsupportedModelError(f"{g.path}: head size {head_dim} (key/value lengths differ or odd) is not "
                                    "supported", "use a standard LLaMA-family model")
    n_rot = _meta(g, f"{a}.rope.dimension_count", int, head_dim)
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise _bad(g.path, f"RoPE dimension count {n_rot} does not fit the head size {head_dim}")
    rope_base = _meta(g, f"{a}.rope.freq_base", float, 10000.0)
    eps = _meta(g, f"{a}.attention.layer_norm_rms_epsilon", float, 1e-5)
    if not (rope_base > 0 and 0 < eps < 1):
        raise _bad(g.path, f"implausible RoPE base {rope_base} or RMS epsilon {eps}")
    scaling = g.metadata.get(f"{a}.rope.scaling.type", "none")
    freq_scale = 1.0
    if scaling == "linear":
        factor = _meta(g, f"{a}.rope.scaling.factor", float, 1.0)
        if factor <= 0:
            raise _bad(g.path, f"RoPE scaling factor {factor} must be positive")
        freq_scale = 1.0 / factor
    elif scaling not in ("none", None):
        raise UnsupportedModelError(f"{g.path}: RoPE scaling {scaling!r} is not supported (none, linear)",
                                    "use a model without long-context RoPE scaling")
    rope_factors = None
    if "rope_freqs.weight" in g.tensors:
        factors = _vector(g, "rope_freqs.weight", n_rot // 2)
        if not (np.isfinite(factors).all() and (factors > 0).all()):
            raise _bad(g.path, "tensor 'rope_freqs.weight' holds a RoPE factor that is not a positive number")
        rope_factors = tuple(float(f) for f in factors)
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise _bad(g.path, "tensor 'token_embd.weight' is missing")
    n_vocab = embd.shape[1] if len(embd.shape) == 2 else 0
    return HyperParams(n_vocab, dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, n_ctx_train,
                       rope_base, freq_scale, n_rot, eps, rope_factors)


def _weight(g: GGUFFile, name: str, rows: int, cols: int) -> Weight:
    info: TensorInfo | None = g.tensors.get(name)
    if info is None:
        raise _bad(g.path, f"tensor {name!r} is missing")
    if info.shape != (cols, rows):
        raise _bad(g.path, f"tensor {name!r} has shape {list(info.shape)}, expected {[cols, rows]}")
    kernel = WEIGHT_KERNELS.get(info.qtype)
    if kernel is None:
        supported = ", ".join(t.name for t in WEIGHT_KERNELS)
        raise UnsupportedModelError(f"{g.path}: tensor {name!r} has type {info.qtype.name}, which the engine "
                                    f"cannot run (supported: {supported})",
                                    "use a file quantized to one of those types, e.g. Q4_K_M or Q4_0")
    block, type_size = GGML_QUANT_SIZES[info.qtype]
    data = g.tensor_bytes(name).reshape(rows, cols // block * type_size)
    return Weight(name, info.qtype, rows, cols, data, kernel)


def _vector(g: GGUFFile, name: str, n: int) -> np.ndarray:
    info = g.tensors.get(name)
    if info is None:
        raise _bad(g.path, f"tensor {name!r} is missing")
    if info.shape != (n,) or info.qtype != GGMLQuantizationType.F32:
        raise _bad(g.path, f"tensor {name!r} should be F32 of shape [{n}], found {info.qtype.name} "
                           f"{list(info.shape)}")
    return g.tensor_bytes(name).view(np.float32)


def load_model(path: str | Path, *, threads: int | None = None) -> Model:
    """Open and validate a GGUF model.

    Where this CPU has the packed SIMD kernels and every matmul weight has a packed form, the
    weights are repacked once into memory of their own (about the file's size; the file's pages
    are released as each tensor is copied) and evaluation runs the fused forward pass
    (kernels.fused); otherwise the weights stay in the mapped file and the per-op path runs.
    """
    if threads is None:
        threads = default_threads()
    if threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}", "pass -t 1 or more")
    g = open_gguf(path)
    try:
        hp = read_hparams(g)
        tokenizer = Tokenizer.from_gguf_metadata(g.metadata, source=str(g.path))
        if tokenizer.n_vocab != hp.n_vocab:
            raise _bad(g.path, f"the vocabulary has {tokenizer.n_vocab} tokens but token_embd.weight has "
                               f"{hp.n_vocab} rows")
        q_dim, kv_dim = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        layers = []
        for i in range(hp.n_layers):
            p = f"blk.{i}."
            layers.append(Layer(
                attn_norm=_vector(g, p + "attn_norm.weight", hp.dim),
                wq=_weight(g, p + "attn_q.weight", q_dim, hp.dim),
                wk=_weight(g, p + "attn_k.weight", kv_dim, hp.dim),
                wv=_weight(g, p + "attn_v.weight", kv_dim, hp.dim),
                wo=_weight(g, p + "attn_output.weight", hp.dim, q_dim),
                ffn_norm=_vector(g, p + "ffn_norm.weight", hp.dim),
                w_gate=_weight(g, p + "ffn_gate.weight", hp.ffn_dim, hp.dim),
                w_up=_weight(g, p + "ffn_up.weight", hp.ffn_dim, hp.dim),
                w_down=_weight(g, p + "ffn_down.weight", hp.dim, hp.ffn_dim),
            ))
        tok_embd = _weight(g, "token_embd.weight", hp.n_vocab, hp.dim)
        output = _weight(g, "output.weight", hp.n_vocab, hp.dim) if "output.weight" in g.tensors else tok_embd
        output_norm = _vector(g, "output_norm.weight", hp.dim)
        pw = _pack(g, layers, output, output_norm, threads)
    except BaseException:
        g.close()
        raise
    return Model(Path(path), hp, tokenizer, g.metadata, tok_embd, layers, output_norm, output, threads, g, pw)


class Context:
    """One sequence's state: the KV cache (float16, as llama.cpp keeps it) and scratch buffers."""

    def __init__(self, model: Model, n_ctx: int | None, n_batch: int, *, fused: bool = True) -> None:
        hp = model.hparams
        if n_ctx is None:
            n_ctx = min(hp.n_ctx_train, DEFAULT_CTX)
        if n_ctx < 1:
            raise UsageError(f"context size must be at least 1, got {n_ctx}", "pass -c 512 or more")
        if n_ctx > hp.n_ctx_train:
            raise UsageError(f"context size {n_ctx} exceeds the {hp.n_ctx_train} tokens this model was trained on",
                             f"pass -c {hp.n_ctx_train} or less")
        if n_batch < 1:
            raise UsageError(f"batch size must be at least 1, got {n_batch}", "pass a positive batch size")
        self.model = model
        self.n_ctx = n_ctx
        self.n_batch = min(n_batch, n_ctx)
        self.n_past = 0
        self.tokens: list[int] = []  # what the cache holds, position by position
        kv_dim = hp.n_kv_heads * hp.head_dim
        self.k_cache = np.zeros((hp.n_layers, n_ctx, hp.n_kv_heads, hp.head_dim), np.float16)
        self.v_cache = np.zeros((hp.n_layers, n_ctx, hp.n_kv_heads, hp.head_dim), np.float16)
        self.rope_cos, self.rope_sin = ops.rope_cache(n_ctx, hp.n_rot, hp.rope_base, hp.rope_freq_scale,
                                                      hp.rope_factors)
        b, q_dim = self.n_batch, hp.n_heads * hp.head_dim
        self._x = np.empty((b, hp.dim), np.float32)  # residual stream
        self._xb = np.empty((b, hp.dim), np.float32)  # normed input of a sub-layer
        self._q = np.empty((b, q_dim), np.float32)
        self._k = np.empty((b, kv_dim), np.float32)
        self._v = np.empty((b, kv_dim), np.float32)
        self._att = np.empty((b, q_dim), np.float32)  # attention output, heads concatenated
        self._proj = np.empty((b, hp.dim), np.float32)  # a sub-layer's output before the residual add
        self._gate = np.empty((b, hp.ffn_dim), np.float32)
        self._up = np.empty((b, hp.ffn_dim), np.float32)
        self._hidden = np.empty((b, hp.ffn_dim), np.float32)
        self._team: fused_kernels.Team | None = None
        if model.packed is not None and fused:
            self._init_fused()

    def _init_fused(self) -> None:
        m, hp, b = self.model, self.model.hparams, self.n_batch
        pw = m.packed
        if pw is None:  # only reachable through a bug: the fused path is chosen only with packed weights
            raise RuntimeError("fused forward pass requested for a model without packed weights")
        widest = max(hp.dim, hp.n_heads * hp.head_dim, hp.ffn_dim)
        self._par = np.zeros(8, np.int64)
        self._logits = np.empty((b, hp.n_vocab), np.float32)  # pages appear as rows are written
        hpa = np.zeros(8, np.int64)
        hpa[[fused_kernels.HP_DIM, fused_kernels.HP_LAYERS, fused_kernels.HP_HEADS, fused_kernels.HP_KV_HEADS, fused_kernels.HP_HEAD_DIM, fused_kernels.HP_FFN,
             fused_kernels.HP_VOCAB]] = (hp.dim, hp.n_layers, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.ffn_dim, hp.n_vocab)
        threads = m.threads
        k_widest = (widest + 255) // 256 * 256
        a8 = (np.empty(b * widest, np.int8), np.empty(b * widest // 32, np.float32),
              np.empty(b * widest // 32, np.float32), np.empty(b * widest // 32, np.int32))
        ak = (np.empty(b * k_widest, np.int8), np.empty(b * k_widest // 256, np.float32),
              np.empty(b * k_widest // 16, np.int16), np.empty(b * k_widest // 16, np.int32),
              np.empty(b * k_widest // 32, np.int32))
        args = (
            hpa, float(hp.norm_eps), ops.attention_scale(hp.head_dim), self._par, (pw.arena, m.gguf.data), pw.wdesc,
            pw.need,
            pw.norms,
            self.rope_cos, self.rope_sin, self.k_cache.view(np.uint16), self.v_cache.view(np.uint16),
            self._x, self._xb, self._q, self._k, self._v, self._att, self._proj, self._gate, self._up, self._hidden,
            self._logits, a8, ak,
            np.empty((threads, self.n_ctx + 2 * hp.head_dim), np.float32),
            np.empty((threads, 4, packed.LANES), np.float32),
            _FP16_TABLE,
        )
        self._team = fused_kernels.Team(threads, fused_kernels.n_stages(hp.n_layers), args)

    @property
    def kv_bytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes

    def reset(self) -> None:
        self.n_past = 0
        self.tokens = []

    def truncate(self, n: int) -> None:
        """Forget every position from ``n`` on (a shared prefix stays cached)."""
        if not 0 <= n <= self.n_past:
            raise UsageError(f"cannot keep {n} of {self.n_past} cached positions", "keep 0..n_past")
        self.n_past = n
        del self.tokens[n:]

    def shift(self, n_keep: int, n_discard: int) -> None:
        """Drop positions n_keep..n_keep+n_discard-1 and slide the rest down, as llama.cpp's context shift.

        Cached keys carry their position's rotation; moving a key down by ``n_discard`` positions
        rotates it back by the same angle (RoPE rotations compose), so no token is recomputed.
        """
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= self.n_past):
            raise UsageError(f"cannot drop {n_discard} positions after {n_keep} of {self.n_past}",
                             "keep + discard must fit the cached positions")
        hp = self.model.hparams
        src, dst, n_move = n_keep + n_discard, n_keep, self.n_past - n_keep - n_discard
        half = hp.n_rot // 2
        theta = hp.rope_freq_scale * hp.rope_base ** (-2.0 * np.arange(half) / hp.n_rot) * -n_discard
        if hp.rope_factors is not None:
            theta /= np.asarray(hp.rope_factors)
        cos, sin = np.cos(theta), np.sin(theta)  # [half]
        for li in range(hp.n_layers):
            k = self.k_cache[li, src : src + n_move].astype(np.float64)  # [n_move, n_kv_heads, head_dim]
            x0, x1 = k[..., 0 : hp.n_rot : 2].copy(), k[..., 1 : hp.n_rot : 2].copy()
            k[..., 0 : hp.n_rot : 2] = x0 * cos - x1 * sin
            k[..., 1 : hp.n_rot : 2] = x0 * sin + x1 * cos
            self.k_cache[li, dst : dst + n_move] = k
            self.v_cache[li, dst : dst + n_move] = self.v_cache[li, src : src + n_move]
        self.n_past -= n_discard
        del self.tokens[n_keep : n_keep + n_discard]

    def eval(self, tokens: list[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the sequence; return logits f32 [len(tokens) or 1, n_vocab].

        With ``all_logits`` every position's logits are returned (perplexity, fidelity checks),
        otherwise only the last token's (generation).
        """
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        hp = self.model.hparams
        if ids.size == 0:
            raise UsageError("nothing to evaluate: the token list is empty", "pass at least one token")
        if ids.min() < 0 or ids.max() >= hp.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= hp.n_vocab)][0])
            raise UsageError(f"token id {bad} is outside the vocabulary (0..{hp.n_vocab - 1})",
                             "use ids produced by this model's tokenizer")
        if self.n_past + ids.size > self.n_ctx:
            raise ContextFullError(
                f"{self.n_past} cached + {ids.size} new tokens exceed the context of {self.n_ctx}",
                "start a new conversation, shorten the prompt, or raise -c/--ctx-size",
            )
        n_out = ids.size if all_logits else 1
        # plain-kind weights (Q5_*) have no fused multi-token kernel: prompts take the per-op path,
        # which decodes each block once for all the batch's tokens (same KV cache, same logits)
        if self._team is not None and (ids.size <= _FUSED_PLAIN_MAX_T or not self.model.packed.plain):
            return self._eval_fused(ids, all_logits, n_out)
        numba.set_num_threads(min(self.model.threads, numba.config.NUMBA_NUM_THREADS))
        logits = np.empty((n_out, hp.n_vocab), np.float32)
        for start in range(0, ids.size, self.n_batch):
            chunk = ids[start : start + self.n_batch]
            last = start + chunk.size == ids.size
            if all_logits:
                self._forward(chunk, logits[start : start + chunk.size])
            elif last:
                self._forward(chunk, logits)
            else:
                self._forward(chunk, None)
        return logits

    def _eval_fused(self, ids: np.ndarray, all_logits: bool, n_out: int) -> np.ndarray:
        m = self.model
        logits = np.empty((n_out, m.hparams.n_vocab), np.float32)
        team, par = self._team, self._par
        if team is None:  # only reachable through a bug: _init_fused creates the team
            raise RuntimeError("fused forward pass used before its thread team was created")
        for start in range(0, ids.size, self.n_batch):
            chunk = ids[start : start + self.n_batch]
            T = chunk.size
            last = start + T == ids.size
            m.tok_embd.kernel.dequantize(np.ascontiguousarray(m.tok_embd.data[chunk]), self._x[:T])
            par[fused_kernels.PAR_T] = T
            par[fused_kernels.PAR_POS0] = self.n_past
            par[fused_kernels.PAR_LOGIT_ROW0] = 0 if all_logits else T - 1
            par[fused_kernels.PAR_LOGIT_ROWS] = T if all_logits else (1 if last else 0)
            par[fused_kernels.PAR_THREADS] = team.threads
            team.run()
            self.n_past += T
            self.tokens.extend(int(t) for t in chunk)
            if all_logits:
                logits[start : start + T] = self._logits[:T]
            elif last:
                logits[0] = self._logits[0]
        return logits

    def _forward(self, ids: np.ndarray, logits: np.ndarray | None) -> None:
        """Run a batch of T tokens at positions n_past..n_past+T-1; write logits of all T (or the last)."""
        m, hp = self.model, self.model.hparams
        T, pos0 = ids.size, self.n_past
        x, xb = self._x[:T], self._xb[:T]  # [T, dim]
        q, k, v = self._q[:T], self._k[:T], self._v[:T]  # [T, q_dim], [T, kv_dim], [T, kv_dim]
        att, proj = self._att[:T], self._proj[:T]  # [T, q_dim], [T, dim]
        gate, up, hidden = self._gate[:T], self._up[:T], self._hidden[:T]  # [T, ffn_dim]
        q_heads = q.reshape(T, hp.n_heads, hp.head_dim)
        k_heads = k.reshape(T, hp.n_kv_heads, hp.head_dim)
        positions = np.arange(pos0, pos0 + T, dtype=np.int32)

        m.tok_embd.kernel.dequantize(np.ascontiguousarray(m.tok_embd.data[ids]), x)
        for li, layer in enumerate(m.layers):
            # attention: x += Wo · attn(rope(Wq·norm(x)), cache(rope(Wk·norm(x)), Wv·norm(x)))
            ops.rmsnorm(x, layer.attn_norm, hp.norm_eps, xb)
            layer.wq.matmul(xb, q)
            layer.wk.matmul(xb, k)
            layer.wv.matmul(xb, v)
            ops.rope(q_heads, positions, self.rope_cos, self.rope_sin)
            ops.rope(k_heads, positions, self.rope_cos, self.rope_sin)
            kc, vc = self.k_cache[li], self.v_cache[li]  # [n_ctx, n_kv_heads, head_dim] f16
            kc[pos0 : pos0 + T] = k_heads
            vc[pos0 : pos0 + T] = v.reshape(T, hp.n_kv_heads, hp.head_dim)
            ops.attention(q_heads, kc, vc, pos0, att.reshape(T, hp.n_heads, hp.head_dim))
            layer.wo.matmul(att, proj)
            ops.add_inplace(x, proj)
            # feed-forward: x += W_down · (silu(W_gate·norm(x)) * W_up·norm(x))
            ops.rmsnorm(x, layer.ffn_norm, hp.norm_eps, xb)
            layer.w_gate.matmul(xb, gate)
            layer.w_up.matmul(xb, up)
            ops.swiglu(gate, up, hidden)
            layer.w_down.matmul(hidden, proj)
            ops.add_inplace(x, proj)

        self.n_past += T
        self.tokens.extend(int(t) for t in ids)
        if logits is None:
            return
        rows = x if logits.shape[0] == T else x[T - 1 : T]
        normed = xb[: rows.shape[0]]
        ops.rmsnorm(rows, m.output_norm, hp.norm_eps, normed)
        m.output.matmul(normed, logits)
