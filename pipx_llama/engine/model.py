"""Models of every supported family: weights from an mmap'd GGUF file, and the forward pass.

``load_model`` validates the file once (architecture, hyper-parameters against tensor shapes, tensor
types the kernels support) so that nothing later can fail on a malformed file. Weights stay in the
mapped file: every ``Weight`` is a uint8 view of it, handed to the kernel of its ggml type.

A ``Model`` is immutable and shareable; a ``Context`` holds one conversation's KV cache and scratch
buffers. ``Context.eval`` is the forward pass: the fused pass (``kernels/fused.py``) where every
weight has a packed kernel, else ``Context._forward`` below, written top to bottom in the style of
llama2.c. Both read the same ``Layer`` records, whose optional parts (biases, q/k norms, post norms,
a sliding window) are what the families differ in (``engine/arch``).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pipx_llama.engine.arch import ACT_GELU, ROPE_NEOX, Family, HyperParams, family_of
from pipx_llama.engine.arch.base import architecture, bad_file, read_hparams
from pipx_llama.engine.kernels import WEIGHT_KERNELS, WeightKernel, attention, ops, packed
from pipx_llama.engine.kernels import floats as _floats  # noqa: F401  (registers kernels)
from pipx_llama.engine.kernels import fused as fused_kernels
from pipx_llama.engine.kernels import kquants as _kquants  # noqa: F401
from pipx_llama.engine.kernels import legacy as _legacy  # noqa: F401
from pipx_llama.engine.kv_cache import KVCache, check_shift
from pipx_llama.errors import ContextFullError, UnsupportedModelError, UsageError
from pipx_llama.formats.fp16 import FP16_TABLE as _FP16_TABLE
from pipx_llama.formats.gguf import GGUFFile, TensorInfo, open_gguf
from pipx_llama.system import default_threads, detected_performance_cores
from pipx_llama.tokenizer.tokenizer import Tokenizer

DEFAULT_CTX = 4096
DEFAULT_BATCH = 256
# batches at most this long take the fused pass with plain-kind weights (no SIMD tier): generation
_FUSED_PLAIN_MAX_T = 2
# Plain-kind models take the fused pass only up to this size. Its portable loops run ~20% slower
# per byte than the per-op kernels, which pays only while the per-op path's parallel regions (~40 us,
# hundreds per token) weigh more: SmolLM2 Q5_0 (0.1 GB) 85 vs 56 tok/s, 7B Q5_K_M (4.8 GB) 3.7 vs 4.6.
_PLAIN_FUSED_MAX_BYTES = 512 << 20

# Weights are repacked this many source bytes at a time, each slice's file pages dropped before the
# next: one big tensor (Gemma 3 270M's tied 262k x 640 Q8_0 output, 178 MB, 70% of the file) no longer
# sits twice in memory while it is copied (peak RSS of load + a 190-token prompt: 666 -> 532 MB).
_REPACK_SLICE_BYTES = 16 << 20
# Tensors some files of these families carry that the engine does not apply: refused rather than ignored.
_UNSUPPORTED_TENSORS = ("output.bias", "attn_output.bias", "attn_qkv.bias", "ffn_up.bias", "ffn_down.bias",
                        "ffn_gate.bias", "attn_norm.bias", "ffn_norm.bias", "output_norm.bias")


@dataclass(frozen=True)
class Weight:
    """A 2-D weight [rows, cols] (torch order: rows = outputs) as raw ggml blocks in the mapped file."""

    name: str
    qtype: GGMLQuantizationType
    rows: int
    cols: int
    data: np.ndarray  # uint8 [rows, row_bytes]
    kernel: WeightKernel
    offset: int  # absolute byte offset of data[0, 0] in the file

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def matmul(self, x: np.ndarray, out: np.ndarray) -> None:
        """out[T, rows] = x[T, cols] @ W.T"""
        self.kernel.matmul(self.data, x, out)


@dataclass(frozen=True)
class Layer:
    """One block's weights; the optional parts are None where the family has none."""

    attn_norm: np.ndarray  # f32 [dim]
    wq: Weight  # [n_heads*head_dim, dim]
    wk: Weight  # [n_kv_heads*head_dim, dim]
    wv: Weight  # [n_kv_heads*head_dim, dim]
    wo: Weight  # [dim, n_heads*head_dim]
    ffn_norm: np.ndarray  # f32 [dim]
    w_gate: Weight  # [ffn_dim, dim]
    w_up: Weight  # [ffn_dim, dim]
    w_down: Weight  # [dim, ffn_dim]
    bq: np.ndarray | None = None  # f32 [n_heads*head_dim] (Qwen2)
    bk: np.ndarray | None = None  # f32 [n_kv_heads*head_dim]
    bv: np.ndarray | None = None  # f32 [n_kv_heads*head_dim]
    q_norm: np.ndarray | None = None  # f32 [head_dim], per head before RoPE (Qwen3, Gemma 3)
    k_norm: np.ndarray | None = None  # f32 [head_dim]
    attn_post_norm: np.ndarray | None = None  # f32 [dim], on the attention output (Gemma)
    ffn_post_norm: np.ndarray | None = None  # f32 [dim], on the feed-forward output (Gemma)
    window: int = 0  # sliding window in positions (0: every earlier position)

    def matrices(self) -> tuple[Weight, ...]:
        return (self.wq, self.wk, self.wv, self.wo, self.w_gate, self.w_up, self.w_down)


@dataclass
class Model:
    path: Path
    family: Family
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
        return self.output.nbytes + sum(w.nbytes for layer in self.layers for w in layer.matrices())

    def new_context(self, n_ctx: int | None = None, n_batch: int = DEFAULT_BATCH, *, fused: bool = True,
                    type_k: str = "f16", type_v: str = "f16",
                    kv_buffers: tuple[np.ndarray, np.ndarray] | None = None) -> Context:
        """A fresh context; ``fused=False`` forces the per-op path (same logits, slower; for tests).

        ``type_k``/``type_v``: the KV cache's types, "f16" or "q8_0" (llama.cpp's --cache-type-k/-v).
        ``kv_buffers``: where its KV cache lives (a slot of a pool; engine/batch.py), else its own memory.
        """
        return Context(self, n_ctx, n_batch, fused=fused, type_k=type_k, type_v=type_v, kv_buffers=kv_buffers)

    def close(self) -> None:
        self.gguf.close()


@dataclass(frozen=True)
class PackedWeights:
    """Every matmul weight repacked for the SIMD kernels, in one read-only buffer (see kernels.packed),
    and the model's layer table for the fused pass.

    ``wdesc[i]`` = (kind, rows, cols, byte offset) of weight i: 7 per layer (q, k, v, o, gate, up,
    down), then the output matrix. ``vecs`` holds every norm and bias; ``ldesc`` says where each
    layer's are (fused_kernels.LD_*; the KV columns are filled per context).
    """

    arena: np.ndarray  # uint8, read-only
    wdesc: np.ndarray  # int64 [7 * n_layers + 1, 4]
    need: np.ndarray  # int64 [4 * n_layers + 1]: activation formats of each matmul input (fused_kernels.IN_*)
    vecs: np.ndarray  # float32 [*]
    ldesc: np.ndarray  # int64 [n_layers, LD_SIZE]
    out_norm: int  # offset of the output norm in vecs
    plain: bool = False  # some weights are plain kinds (read from the mapped file; see kernels.packed)


def _layer_table(layers: list[Layer], output_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(vecs, ldesc, output norm offset): every layer's vectors in one f32 array, and where they are."""
    chunks: list[np.ndarray] = []
    size = 0

    def put(v: np.ndarray | None) -> int:
        nonlocal size
        if v is None:
            return -1
        chunks.append(np.asarray(v, np.float32))
        size += v.shape[0]
        return size - v.shape[0]

    ldesc = np.full((len(layers), fused_kernels.LD_SIZE), -1, np.int64)
    for li, ly in enumerate(layers):
        row = ldesc[li]
        row[fused_kernels.LD_ATTN_NORM] = put(ly.attn_norm)
        row[fused_kernels.LD_BQ] = put(ly.bq)
        row[fused_kernels.LD_BK] = put(ly.bk)
        row[fused_kernels.LD_BV] = put(ly.bv)
        row[fused_kernels.LD_Q_NORM] = put(ly.q_norm)
        row[fused_kernels.LD_K_NORM] = put(ly.k_norm)
        row[fused_kernels.LD_POST_ATTN] = put(ly.attn_post_norm)
        row[fused_kernels.LD_FFN_NORM] = put(ly.ffn_norm)
        row[fused_kernels.LD_POST_FFN] = put(ly.ffn_post_norm)
        row[fused_kernels.LD_ROPE] = 1 if ly.window else 0
        row[fused_kernels.LD_WINDOW] = ly.window
    out = put(output_norm)
    return np.concatenate(chunks), ldesc, out


def _pack(g: GGUFFile, layers: list[Layer], output: Weight, output_norm: np.ndarray,
          threads: int) -> PackedWeights | None:
    """Repack the weights when every matmul has a packed kernel here; None means the per-op path.

    Each source tensor is dropped from the process's resident memory once copied (madvise), so
    the peak stays near one copy of the weights; the token embedding stays in the mapped file.
    """
    weights = [w for layer in layers for w in layer.matrices()]
    weights.append(output)
    # without a SIMD tier every weight is plain: read in place from the file, so the per-op path
    # that runs such a model's prompts maps the same pages (one copy in RAM)
    plain = not packed.SIMD
    if not all(packed.supported(w.qtype, plain) for w in weights):
        return None
    wdesc = np.zeros((len(weights), 4), np.int64)
    total = 0
    if plain and sum(w.nbytes for w in weights) > _PLAIN_FUSED_MAX_BYTES:
        return None
    for i, w in enumerate(weights):
        if plain:
            wdesc[i] = (packed.PLAIN_OF_QTYPE[w.qtype], w.rows, w.cols, w.offset)  # in the file
            continue
        kind = packed.KIND_OF_QTYPE[w.qtype]
        wdesc[i] = (kind, w.rows, w.cols, total)
        total += (packed.packed_bytes(kind, w.rows, w.cols) + 63) // 64 * 64
    arena = _huge_page_buffer(total)

    def one(i: int) -> None:
        # packed records are group-major (LANES rows per group), so whole groups of rows map to one
        # contiguous piece of the arena
        w = weights[i]
        kind, rows, cols, off = (int(v) for v in wdesc[i])
        row_bytes = w.data.shape[1]
        step = max(1, _REPACK_SLICE_BYTES // (row_bytes * packed.LANES)) * packed.LANES
        group_bytes = packed.packed_bytes(kind, packed.LANES, cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            at = off + r0 // packed.LANES * group_bytes
            packed.repack(kind, w.data[r0:r1], arena[at : at + packed.packed_bytes(kind, r1 - r0, cols)])
            _drop_pages(g, w.offset + r0 * row_bytes, (r1 - r0) * row_bytes)

    to_copy = [] if plain else list(range(len(weights)))
    if threads > 1 and total > (64 << 20):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, to_copy))
    else:
        for i in to_copy:
            one(i)
    arena.flags.writeable = False
    act = [packed.ACTIVATIONS[int(k)] for k in wdesc[:, 0]]
    need = np.zeros(4 * len(layers) + 1, np.int64)
    for li in range(len(layers)):
        a = act[7 * li : 7 * li + 7]
        need[4 * li + fused_kernels.IN_QKV] = (a[fused_kernels.W_Q] | a[fused_kernels.W_K]
                                               | a[fused_kernels.W_V])
        need[4 * li + fused_kernels.IN_O] = a[fused_kernels.W_O]
        need[4 * li + fused_kernels.IN_FFN] = a[fused_kernels.W_GATE] | a[fused_kernels.W_UP]
        need[4 * li + fused_kernels.IN_DOWN] = a[fused_kernels.W_DOWN]
    need[4 * len(layers)] = act[-1]
    vecs, ldesc, out_norm = _layer_table(layers, output_norm)
    return PackedWeights(arena, wdesc, need, vecs, ldesc, out_norm, plain)


def _kernel_cache(flat: np.ndarray) -> np.ndarray:
    """A KV buffer as the numba kernels take it: F16 as its bits (uint16), q8_0 blocks as they are (uint8)."""
    return flat.view(np.uint16) if flat.dtype == np.float16 else flat


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


def _drop_pages(g: GGUFFile, offset: int, nbytes: int) -> None:
    """Tell the kernel we are done with a tensor's pages (they stay in the page cache, not in our RSS)."""
    mm = g._mmap
    if mm is None or not hasattr(mm, "madvise"):
        return
    page = mmap.PAGESIZE
    start = (offset + page - 1) // page * page
    end = (offset + nbytes) // page * page
    if end > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError, AttributeError):
            pass


# --- loading ------------------------------------------------------------------------------------------------


class _Loader:
    """Reads one file's tensors by llama.cpp's names, checking each shape and type."""

    def __init__(self, g: GGUFFile, hp: HyperParams) -> None:
        self.g = g
        self.hp = hp

    def info(self, name: str) -> TensorInfo:
        info = self.g.tensors.get(name)
        if info is None:
            raise bad_file(self.g.path, f"tensor {name!r} is missing")
        return info

    def weight(self, name: str, rows: int, cols: int) -> Weight:
        return self.split(name, cols, rows)[0]

    def split(self, name: str, cols: int, *parts: int) -> list[Weight]:
        """Tensor ``name`` [sum(parts), cols] as consecutive row blocks of ``parts`` rows each."""
        info = self.info(name)
        rows = sum(parts)
        if info.shape != (cols, rows):
            raise bad_file(self.g.path,
                           f"tensor {name!r} has shape {list(info.shape)}, expected {[cols, rows]}")
        kernel = WEIGHT_KERNELS.get(info.qtype)
        if kernel is None:
            supported = ", ".join(t.name for t in WEIGHT_KERNELS)
            raise UnsupportedModelError(f"{self.g.path}: tensor {name!r} has type {info.qtype.name}, "
                                        f"which the engine cannot run (supported: {supported})",
                                        "use a file quantized to one of those types, e.g. Q4_K_M or Q4_0")
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        row_bytes = cols // block * type_size
        data = self.g.tensor_bytes(name).reshape(rows, row_bytes)
        out, r0 = [], 0
        for n in parts:
            out.append(Weight(name if len(parts) == 1 else f"{name}[{r0}:{r0 + n}]", info.qtype, n, cols,
                              data[r0 : r0 + n], kernel, info.offset + r0 * row_bytes))
            r0 += n
        return out

    def vector(self, name: str, n: int) -> np.ndarray:
        info = self.info(name)
        if info.shape != (n,) or info.qtype != GGMLQuantizationType.F32:
            raise bad_file(self.g.path,
                           f"tensor {name!r} should be F32 of shape [{n}], found {info.qtype.name} "
                                        f"{list(info.shape)}")
        return self.g.tensor_bytes(name).view(np.float32)

    def optional(self, name: str, n: int) -> np.ndarray | None:
        return self.vector(name, n) if name in self.g.tensors else None

    def layer(self, i: int, family: Family) -> Layer:
        hp, p = self.hp, f"blk.{i}."
        dim, q_dim, kv_dim, ffn = hp.dim, hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim, hp.ffn_dim
        if family.fused_qkv:
            wq, wk, wv = self.split(p + "attn_qkv.weight", dim, q_dim, kv_dim, kv_dim)
        else:
            wq = self.weight(p + "attn_q.weight", q_dim, dim)
            wk = self.weight(p + "attn_k.weight", kv_dim, dim)
            wv = self.weight(p + "attn_v.weight", kv_dim, dim)
        if family.fused_gate_up:
            w_gate, w_up = self.split(p + "ffn_up.weight", dim, ffn, ffn)
        else:
            w_gate = self.weight(p + "ffn_gate.weight", ffn, dim)
            w_up = self.weight(p + "ffn_up.weight", ffn, dim)
        need = self.vector if family.qk_norm else self.optional
        post = self.vector if family.post_norms else self.optional
        return Layer(
            attn_norm=self.vector(p + "attn_norm.weight", dim), wq=wq, wk=wk, wv=wv,
            wo=self.weight(p + "attn_output.weight", dim, q_dim),
            ffn_norm=self.vector(p + "ffn_norm.weight", dim), w_gate=w_gate, w_up=w_up,
            w_down=self.weight(p + "ffn_down.weight", dim, ffn),
            bq=self.optional(p + "attn_q.bias", q_dim), bk=self.optional(p + "attn_k.bias", kv_dim),
            bv=self.optional(p + "attn_v.bias", kv_dim),
            q_norm=need(p + "attn_q_norm.weight", hp.head_dim),
            k_norm=need(p + "attn_k_norm.weight", hp.head_dim),
            attn_post_norm=post(p + "post_attention_norm.weight", dim),
            ffn_post_norm=post(p + "post_ffw_norm.weight", dim),
            window=hp.swa_window if hp.is_swa(i) else 0,
        )

    def refuse_unsupported(self) -> None:
        for name in self.g.tensors:
            if name.endswith(_UNSUPPORTED_TENSORS):
                raise UnsupportedModelError(f"{self.g.path}: tensor {name!r} is not applied by this engine",
                                            "use a standard model of its family")


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
        family = family_of(architecture(g), g.path)
        hp = read_hparams(g, family)
        tokenizer = Tokenizer.from_gguf_metadata(g.metadata, source=str(g.path))
        if tokenizer.n_vocab != hp.n_vocab:
            raise bad_file(g.path, f"the vocabulary has {tokenizer.n_vocab} tokens but token_embd.weight has "
                                   f"{hp.n_vocab} rows")
        loader = _Loader(g, hp)
        loader.refuse_unsupported()
        layers = [loader.layer(i, family) for i in range(hp.n_layers)]
        tok_embd = loader.weight("token_embd.weight", hp.n_vocab, hp.dim)
        output = (loader.weight("output.weight", hp.n_vocab, hp.dim) if "output.weight" in g.tensors
                  else tok_embd)
        output_norm = loader.vector("output_norm.weight", hp.dim)
        pw = _pack(g, layers, output, output_norm, threads)
    except BaseException:
        g.close()
        raise
    return Model(Path(path), family, hp, tokenizer, g.metadata, tok_embd, layers, output_norm, output,
                 threads, g, pw)


# --- a sequence ---------------------------------------------------------------------------------------------


class Context:
    """One sequence's state: the KV cache (float16 as llama.cpp keeps it, or q8_0) and scratch buffers."""

    def __init__(self, model: Model, n_ctx: int | None, n_batch: int, *, fused: bool = True,
                 type_k: str = "f16", type_v: str = "f16",
                 kv_buffers: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        hp = model.hparams
        if n_ctx is None:
            n_ctx = min(hp.n_ctx_train, DEFAULT_CTX)
        if n_ctx < 1:
            raise UsageError(f"context size must be at least 1, got {n_ctx}", "pass -c 512 or more")
        if n_ctx > hp.n_ctx_train:
            raise UsageError(f"context size {n_ctx} exceeds the {hp.n_ctx_train} tokens this model was "
                             "trained on",
                             f"pass -c {hp.n_ctx_train} or less")
        if n_batch < 1:
            raise UsageError(f"batch size must be at least 1, got {n_batch}", "pass a positive batch size")
        self.model = model
        self.n_ctx = n_ctx
        self.n_batch = min(n_batch, n_ctx)
        self.n_past = 0
        self.tokens: list[int] = []  # what the cache holds, position by position
        self.kv = KVCache(hp, n_ctx, self.n_batch, type_k, type_v, kv_buffers)
        # RoPE tables [tables, n_ctx, n_rot/2]: the global layers', then the sliding-window layers'
        tables = [ops.rope_cache(n_ctx, hp.n_rot, hp.rope_base, hp.rope_freq_scale, hp.factors_for(n_ctx),
                                 hp.rope_attn_factor)]
        if hp.swa_window:
            tables.append(ops.rope_cache(n_ctx, hp.n_rot, hp.rope_base_swa, hp.rope_freq_scale_swa, None,
                                         hp.rope_attn_factor))
        self.rope_cos = np.stack([c for c, _ in tables])
        self.rope_sin = np.stack([s for _, s in tables])
        self.kq_scale = np.float32(hp.kq_scale) if hp.kq_scale else attention.attention_scale(hp.head_dim)
        b, q_dim, kv_dim = self.n_batch, hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
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

    def _init_fused(self, kv_pool: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """The fused pass's bundle and thread team; ``kv_pool``: the flat K and V buffers of every slot of a
        pool (tokens of several sequences in one pass: engine/batch.py) instead of this context's cache."""
        self._team = fused_kernels.Team(self.model.threads, self.fused_bundle(kv_pool))

    def fused_bundle(self, kv_pool: tuple[np.ndarray, np.ndarray] | None = None) -> fused_kernels.Bundle:
        """What the fused pass reads and writes for this context (its buffers become the context's)."""
        m, hp, b = self.model, self.model.hparams, self.n_batch
        pw = m.packed
        if pw is None:  # only reachable through a bug: the fused path is chosen only with packed weights
            raise RuntimeError("fused forward pass requested for a model without packed weights")
        widest = max(hp.dim, hp.n_heads * hp.head_dim, hp.ffn_dim)
        self._par = np.zeros(fused_kernels.PAR_SIZE, np.int64)
        self._logits = np.empty((b, hp.n_vocab), np.float32)  # pages appear as rows are written
        hpa = np.zeros(fused_kernels.HP_SIZE, np.int64)
        hpa[[fused_kernels.HP_DIM, fused_kernels.HP_LAYERS, fused_kernels.HP_HEADS, fused_kernels.HP_KV_HEADS,
             fused_kernels.HP_HEAD_DIM, fused_kernels.HP_FFN, fused_kernels.HP_VOCAB, fused_kernels.HP_NEOX,
             fused_kernels.HP_ACT, fused_kernels.HP_OUT_NORM, fused_kernels.HP_ITEMS]] = (
            hp.dim, hp.n_layers, hp.n_heads, hp.n_kv_heads, hp.head_dim, hp.ffn_dim, hp.n_vocab,
            int(hp.rope_type == ROPE_NEOX), int(m.family.activation == ACT_GELU), pw.out_norm,
            fused_kernels.items_per_thread(m.threads, detected_performance_cores()))
        fpa = np.zeros(fused_kernels.FP_SIZE, np.float32)
        fpa[[fused_kernels.FP_EPS, fused_kernels.FP_Q_SCALE, fused_kernels.FP_KQ_SCALE,
             fused_kernels.FP_SOFTCAP]] = (
            hp.norm_eps, hp.q_scale, self.kq_scale, hp.attn_softcap)
        ldesc = pw.ldesc.copy()
        ldesc[:, fused_kernels.LD_KV_OFF] = self.kv.row_offsets[:-1]
        ldesc[:, fused_kernels.LD_KV_ROWS] = self.kv.rows
        k_widest = (widest + 255) // 256 * 256
        a8 = (np.empty(b * widest, np.int8), np.empty(b * widest // 32, np.float32),
              np.empty(b * widest // 32, np.float32), np.empty(b * widest // 32, np.int32))
        ak = (np.empty(b * k_widest, np.int8), np.empty(b * k_widest // 256, np.float32),
              np.empty(b * k_widest // 16, np.int16), np.empty(b * k_widest // 16, np.int32),
              np.empty(b * k_widest // 32, np.int32))
        threads = m.threads
        kc, vc = kv_pool if kv_pool is not None else (self.kv.k, self.kv.v)
        self._tpos = np.zeros(b, np.int64)  # each token's position
        self._tslot = np.zeros(b, np.int64)  # each token's slot in the pool (0: this context's cache)
        return fused_kernels.Bundle(
            hp=hpa, fp=fpa, par=self._par, stages=fused_kernels.stage_table(hp.n_layers),
            arenas=(pw.arena, m.gguf.data, packed.kind_set(pw.wdesc[:, 0])), wdesc=pw.wdesc, need=pw.need,
            ldesc=ldesc, vecs=pw.vecs,
            cos=self.rope_cos, sin=self.rope_sin, kc=_kernel_cache(kc), vc=_kernel_cache(vc),
            x=self._x, xb=self._xb, q=self._q, k=self._k, v=self._v, att=self._att, proj=self._proj,
            gate=self._gate, up=self._up, hidden=self._hidden, logits=self._logits, a8f=a8, akf=ak,
            scratch=np.empty((threads, self.n_ctx + 2 * hp.head_dim), np.float32),
            res_all=np.empty((threads, 4, packed.LANES), np.float32), f16_table=_FP16_TABLE,
            gelu_table=ops.GELU_F16_TABLE, tpos=self._tpos, tslot=self._tslot,
        )

    @property
    def kv_bytes(self) -> int:
        return self.kv.nbytes

    def reset(self) -> None:
        self.n_past = 0
        self.tokens = []

    def reusable(self, n: int) -> int:
        """How many of the first ``n`` cached positions can be kept (``truncate``) and evaluation go on from:
        ``n``, or 0 where a sliding-window layer's ring no longer holds what position n would read."""
        n = max(0, min(n, self.n_past))
        return n if self.kv.keeps(self.n_past, n) else 0

    def truncate(self, n: int) -> None:
        """Forget every position from ``n`` on (a shared prefix stays cached)."""
        if not 0 <= n <= self.n_past:
            raise UsageError(f"cannot keep {n} of {self.n_past} cached positions", "keep 0..n_past")
        if not self.kv.keeps(self.n_past, n):
            raise UsageError(f"cannot keep {n} of {self.n_past} cached positions: the sliding-window "
                             "layers no longer hold the keys they need", "keep reusable(n) positions")
        self.n_past = n
        del self.tokens[n:]

    def shift(self, n_keep: int, n_discard: int) -> None:
        """Drop positions n_keep..n_keep+n_discard-1 and slide the rest down, as llama.cpp's context shift.

        Cached keys carry their position's rotation; moving a key down by ``n_discard`` positions
        rotates it back by the same angle (RoPE rotations compose), so no token is recomputed.
        """
        check_shift(self.n_past, n_keep, n_discard)
        self.kv.shift(self.n_past, n_keep, n_discard)
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
        logits = np.empty((n_out, hp.n_vocab), np.float32)
        pw = self.model.packed
        # plain-kind weights (no SIMD tier) have no fused multi-token kernel: prompts take the per-op path,
        # which decodes each block once for all the batch's tokens (same KV cache, same logits)
        fused = self._team is not None and pw is not None and (ids.size <= _FUSED_PLAIN_MAX_T or not pw.plain)
        if not fused:
            numba.set_num_threads(min(self.model.threads, numba.config.NUMBA_NUM_THREADS))
        for start in range(0, ids.size, self.n_batch):
            chunk = ids[start : start + self.n_batch]
            last = start + chunk.size == ids.size
            if all_logits:
                out = logits[start : start + chunk.size]
            else:
                out = logits if last else None
            if fused:
                self._eval_fused(chunk, out)
            else:
                self._forward(chunk, out)
        if hp.final_softcap:
            ops.softcap(logits, hp.final_softcap)
        return logits

    def _embed(self, ids: np.ndarray) -> None:
        """x[:T] = the tokens' embedding rows (times the family's embedding scale)."""
        m, x = self.model, self._x[: ids.size]
        m.tok_embd.kernel.dequantize(np.ascontiguousarray(m.tok_embd.data[ids]), x)
        if m.hparams.embed_scale != 1.0:
            x *= np.float32(m.hparams.embed_scale)

    def _eval_fused(self, ids: np.ndarray, logits: np.ndarray | None) -> None:
        """The fused pass over one batch; the logits of all its tokens (or of the last) into ``logits``."""
        team, par = self._team, self._par
        if team is None:  # only reachable through a bug: _init_fused creates the team
            raise RuntimeError("fused forward pass used before its thread team was created")
        T = ids.size
        self._embed(ids)
        n_rows = 0 if logits is None else logits.shape[0]
        par[fused_kernels.PAR_T] = T
        par[fused_kernels.PAR_POS0] = self.n_past
        self._tpos[:T] = np.arange(self.n_past, self.n_past + T)
        par[fused_kernels.PAR_LOGIT_ROW0] = T - n_rows
        par[fused_kernels.PAR_LOGIT_ROWS] = n_rows
        par[fused_kernels.PAR_THREADS] = team.threads
        par[fused_kernels.PAR_STAGES] = team.n_stages if n_rows else team.n_stages - 2
        team.run()
        self.n_past += T
        self.tokens.extend(int(t) for t in ids)
        if logits is not None:
            logits[:] = self._logits[:n_rows]

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
        v_heads = v.reshape(T, hp.n_kv_heads, hp.head_dim)
        positions = np.arange(pos0, pos0 + T, dtype=np.int32)
        rope = ops.rope_neox if hp.rope_type == ROPE_NEOX else ops.rope
        act = m.family.activation

        self._embed(ids)
        for li, layer in enumerate(m.layers):
            # attention: x += post(Wo · attn(rope(norm(Wq·norm(x) + bq)), cache(...k...), Wv·norm(x) + bv))
            ops.rmsnorm(x, layer.attn_norm, hp.norm_eps, xb)
            layer.wq.matmul(xb, q)
            layer.wk.matmul(xb, k)
            layer.wv.matmul(xb, v)
            for t, bias in ((q, layer.bq), (k, layer.bk), (v, layer.bv)):
                if bias is not None:
                    t += bias
            if layer.q_norm is not None:
                ops.rmsnorm(q.reshape(-1, hp.head_dim), layer.q_norm, hp.norm_eps, q.reshape(-1, hp.head_dim))
                ops.rmsnorm(k.reshape(-1, hp.head_dim), layer.k_norm, hp.norm_eps, k.reshape(-1, hp.head_dim))
            table = 1 if layer.window else 0
            cos, sin = self.rope_cos[table], self.rope_sin[table]
            rope(q_heads, positions, cos, sin)
            rope(k_heads, positions, cos, sin)
            # [rows, n_kv_heads, head_dim] f16, or q8_0 rows
            kc, vc = self.kv.k_layer(li), self.kv.v_layer(li)
            slots = positions % kc.shape[0]
            for cache, heads in ((kc, k_heads), (vc, v_heads)):
                if cache.dtype == np.uint8:
                    attention.kv_store_rows(cache, slots, heads)
                else:
                    cache[slots] = heads
            attention.attention(q_heads, kc, vc, pos0, att.reshape(T, hp.n_heads, hp.head_dim),
                                window=layer.window, q_scale=hp.q_scale, kq_scale=self.kq_scale,
                                softcap=hp.attn_softcap)
            layer_tail(layer, hp, act, x, att, xb, gate, up, hidden, proj)

        self.n_past += T
        self.tokens.extend(int(t) for t in ids)
        if logits is None:
            return
        rows = x if logits.shape[0] == T else x[T - 1 : T]
        normed = xb[: rows.shape[0]]
        ops.rmsnorm(rows, m.output_norm, hp.norm_eps, normed)
        m.output.matmul(normed, logits)


def layer_tail(layer: Layer, hp: HyperParams, act: int, x: np.ndarray, att: np.ndarray, xb: np.ndarray,
               gate: np.ndarray, up: np.ndarray, hidden: np.ndarray, proj: np.ndarray) -> None:
    """A layer after attention, on the per-op path (one context, or a batch of several):
    x += post(Wo · att); then the feed-forward x += post(W_down · (act(W_gate·norm(x)) * W_up·norm(x)))."""
    layer.wo.matmul(att, proj)
    if layer.attn_post_norm is not None:
        ops.rmsnorm(proj, layer.attn_post_norm, hp.norm_eps, proj)
    ops.add_inplace(x, proj)
    ops.rmsnorm(x, layer.ffn_norm, hp.norm_eps, xb)
    layer.w_gate.matmul(xb, gate)
    layer.w_up.matmul(xb, up)
    if act == ACT_GELU:
        ops.geglu(gate, up, ops.GELU_F16_TABLE, hidden)
    else:
        ops.swiglu(gate, up, hidden)
    layer.w_down.matmul(hidden, proj)
    if layer.ffn_post_norm is not None:
        ops.rmsnorm(proj, layer.ffn_post_norm, hp.norm_eps, proj)
    ops.add_inplace(x, proj)


__all__ = ["DEFAULT_BATCH", "DEFAULT_CTX", "Context", "HyperParams", "Layer", "Model", "Weight",
           "default_threads", "load_model"]
