"""Compile the kernels a model needs before it runs, in the background where possible, and say so.

numba compiles a kernel the first time it is called and keeps it in the on-disk cache
(``pipx_llama._numba_cache``); later runs load it in milliseconds. The fused forward pass dispatches
on the kinds of its weights, and what it compiles is specialised on the set of kinds the model has
(``kernels.packed.KindSet``), so a first run compiles only its model's types: ``compile_kernels``
writes a tiny synthetic model with the same weight types (``WeightTypes``, read from the GGUF
header) and runs it through load, prompt evaluation and generation, which compiles what the real
model will call, with the same signatures. A marker file per CPU, SIMD tier and set of types then
records that this cache is warm.

``start_compile`` does the same in a separate process (spawn context: macOS and Windows have no
fork), as soon as the types are known, so the compile overlaps whatever comes next (a download, a
load); the on-disk cache is the hand-over, and a lock next to the marker keeps two processes from
compiling the same set at once. ``BackgroundCompile.wait`` reports a failed background compile as a
``compile`` event, and the foreground then compiles what is missing itself.

With a second CPU, a helper process shares the compile: the main one walks the fused pass's callees
forward (``kernels.fused.compile_stages``) and then compiles the pass itself, the helper walks them
backward and then compiles the sampler's and the embedding's kernels; each finds in the cache what the
other has finished, so one compile's wall time is shorter by about what the helper did.

Used by the CLI as::

    from pipx_llama.engine import warm_up
    warm_up(lambda message: print(message, file=sys.stderr), model_path)
"""

from __future__ import annotations

import hashlib
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from pipx_llama.events import EventCallback, ProgressEvent

COMPILING = "compiling kernels, first run only (about 20 s)..."  # SmolLM2 14.6-15.4 s, 2 cores, bench_startup
_LABEL = "kernels"
Q = GGMLQuantizationType


@dataclass(frozen=True)
class WeightTypes:
    """What a model's kernels are compiled for: its token-embedding type and its matrices' types."""

    embedding: GGMLQuantizationType
    matrices: tuple[GGMLQuantizationType, ...]  # distinct, sorted; the output matrix included

    @property
    def key(self) -> str:
        return "-".join([self.embedding.name] + [q.name for q in self.matrices])


def weight_types(path: str | Path, full_size: int | None = None) -> WeightTypes:
    """The weight types of the GGUF model at ``path`` (from its header; raises ModelFileError).

    With ``full_size``, ``path`` is a download under way that will have that size: only its header
    must have arrived (``formats.gguf.read_header``).
    """
    from pipx_llama.formats.gguf import open_gguf, read_header

    if full_size is not None:
        _, infos = read_header(path, full_size)
        tensors = [(t.name, t.shape, t.qtype) for t in infos.values()]
    else:
        g = open_gguf(path)
        try:
            tensors = [(t.name, t.shape, t.qtype) for t in g.tensors.values()]
        finally:
            g.close()
    if not any(name == "token_embd.weight" for name, _, _ in tensors):
        from pipx_llama.engine.arch.base import bad_file

        raise bad_file(Path(path), "tensor 'token_embd.weight' is missing")
    return types_of_tensors(tensors)


def types_of_tensors(tensors: Iterable[tuple[str, tuple[int, ...], GGMLQuantizationType]]) -> WeightTypes:
    """The weight types of a model of tensors ``(name, ggml shape, type)``: what a quantizer will
    write, say, before it has (the model must have a ``token_embd.weight``)."""
    by_name = {name: (tuple(shape), qtype) for name, shape, qtype in tensors}
    embd = by_name["token_embd.weight"][1]
    mats = {qtype for name, (shape, qtype) in by_name.items()
            if len(shape) == 2 and shape[1] > 1 and name != "token_embd.weight"}
    if "output.weight" not in by_name:
        mats.add(embd)  # tied: the embedding is also the output matrix
    return WeightTypes(embd, tuple(sorted(mats)))


def _marker(types: WeightTypes | None = None) -> Path:
    from pipx_llama._numba_cache import CACHE_DIR
    from pipx_llama.engine.kernels import simd
    from pipx_llama.system import compile_target

    target = compile_target()
    features = ",".join(sorted(f"{'+' if on else '-'}{name}" for name, on in target.features.items()))
    cpu = hashlib.sha1(f"{target.name} {features}".encode()).hexdigest()[:12]
    which = "" if types is None else "-" + hashlib.sha1(types.key.encode()).hexdigest()[:10]
    return Path(CACHE_DIR) / f"pipx-llama-warm-{simd.TIER or 'portable'}-{cpu}{which}"


def cache_is_warm(types: WeightTypes | None = None) -> bool:
    """Whether the kernels for ``types`` (without: those of ``write_tiny_model``'s types) are compiled in
    this cache for this CPU. Each set of types has its own: the fused pass is compiled per set."""
    try:
        return _marker(types).exists()
    except OSError:
        return False


def warm_up(on_event: Callable[[str], None] | None = None, model_path: str | Path | None = None) -> float:
    """Compile (or find cached) the kernels; returns the seconds spent compiling (0 if already warm).

    ``on_event`` receives two messages when there is work to do: what is compiled before
    (:data:`COMPILING` without a model), and ``"compiled kernels in N s"`` after (and one more when it
    waits for another process). With ``model_path``, only what that model needs is compiled, and
    nothing unless it names a readable GGUF file: a mistyped path or a damaged file is then reported
    at once (by ``load_model``), not after compiling. Without, those of
    ``write_tiny_model``'s types (every weight type's embedding lookup among them).
    """
    from pipx_llama.errors import PipxLlamaError

    types = None
    if model_path is not None:
        types = _types_or_none(model_path)
        if types is None:
            return 0.0

    def relay(ev: ProgressEvent) -> None:
        if on_event is not None and ev.message is not None and ev.kind == "compile":
            on_event(ev.message)

    try:
        return compile_kernels(types, relay)
    except PipxLlamaError:
        if types is None:
            raise
        return 0.0  # types the engine refuses: load_model says so, naming the user's file


def _types_or_none(model_path: str | Path) -> WeightTypes | None:
    from pipx_llama.errors import PipxLlamaError

    if not _looks_like_gguf(model_path):
        return None
    try:
        return weight_types(model_path)
    except PipxLlamaError:
        return None


def compile_kernels(types: WeightTypes | None, on_event: EventCallback | None = None, *,
                    helper: bool = True) -> float:
    """Compile the kernels for ``types`` (None: ``write_tiny_model``'s) unless this cache has them.

    With ``helper`` and a second CPU, a second process compiles part of them at the same time
    (``_helper_child``); ``start_compile`` starts that one itself.

    Emits ``compile`` events (``message``: what happens). Another process compiling the same set
    holds its lock: this one waits for it, then finds the kernels compiled. Returns the seconds
    spent compiling here.
    """
    from filelock import FileLock, Timeout

    emit = on_event or (lambda ev: None)
    job = _RUNNING.pop(_key(types), None)
    if job is not None and not job.done():
        emit(ProgressEvent("compile", _LABEL, message="waiting for the background compile of the kernels"))
    if job is not None:
        job.wait(emit)  # a failure is reported there; what is missing is then compiled here
    if cache_is_warm(types):
        return 0.0
    marker = _marker(types)
    lock = FileLock(str(marker) + ".lock")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        emit(ProgressEvent("compile", _LABEL, message="another process compiles these; waiting for it"))
        lock.acquire(poll_interval=0.2)
    except OSError:
        pass  # a cache folder we cannot write: numba will not cache either; compile without the lock
    try:
        if cache_is_warm(types):
            return 0.0
        emit(ProgressEvent("compile", _LABEL, message=_compiling_message(types)))
        t0 = time.perf_counter()
        # Windows refuses to delete a file still mapped, and the tiny model's mapping lives as long as the
        # arrays viewing it: a folder left in the temp dir must not fail the compile that succeeded
        with tempfile.TemporaryDirectory(prefix="pipx-llama-warmup-", ignore_cleanup_errors=True) as tmp:
            path = Path(tmp) / "tiny.gguf"
            _write_tiny(path, types)
            helper = _start_helper(types) if helper else None
            try:
                _exercise(path)
                _embedding_lookups(None if types is None else types.embedding)
            finally:
                _stop_helper(helper)
        seconds = time.perf_counter() - t0
        try:
            marker.write_text(f"{seconds:.1f}\n")
        except OSError:
            pass
    finally:
        lock.release()
    emit(ProgressEvent("compile", _LABEL, done=1, total=1, message=f"compiled kernels in {seconds:.0f} s"))
    return seconds


def _compiling_message(types: WeightTypes | None) -> str:
    if types is None:
        return COMPILING
    return f"compiling kernels for {', '.join(q.name for q in types.matrices)}, first run only..."


def _looks_like_gguf(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _exercise(path: Path, *, helper: bool = False) -> None:
    """Compile by running the model at ``path``: the fused pass's callees (the helper walks them from the
    other end), then, in the main compile, the pass itself in two evaluations; the sampler in both."""
    from pipx_llama.engine.kernels import fused
    from pipx_llama.engine.model import load_model
    from pipx_llama.engine.sampler import Sampler, SamplerConfig

    model = load_model(path, threads=2)
    try:
        if model.packed is not None:
            fused.compile_stages(model.new_context(32, fused=False).fused_bundle(), backward=helper)
        if helper:
            logits = np.zeros(model.hparams.n_vocab, np.float32)
        else:
            ctx = model.new_context(32)
            ctx.eval([1, 5, 9, 200], all_logits=True)
            logits = ctx.eval([7])[-1]
        Sampler(SamplerConfig(top_k=2, seed=0)).sample(logits, [7])  # the sampler's top-k kernel
    finally:
        model.close()


# A second process compiling beside the first: the fused pass's callees from the other end of the list,
# then the sampler's and the embedding's kernels; each process finds in the on-disk cache what the
# other has finished. SmolLM2's first compile, 2 cores: see the README's start-up figures.
def _start_helper(types: WeightTypes | None):
    import os

    if (os.cpu_count() or 1) < 2:
        return None
    ctx = multiprocessing.get_context("spawn")
    process = ctx.Process(target=_helper_child, args=(types,), name="pipx-llama-compile-helper", daemon=True)
    try:
        process.start()
    except OSError:
        return None  # no second process (limits, sandboxes): the first compiles everything, as before
    return process


def _stop_helper(process) -> None:
    """Whatever the helper has not finished when the main compile has, the main compile did itself."""
    if process is None:
        return
    process.join(timeout=0.5)
    if process.is_alive():
        process.terminate()  # numba writes each cache file whole (a temporary file, renamed)
        process.join(timeout=5)


def _helper_child(types: WeightTypes | None) -> None:
    with tempfile.TemporaryDirectory(prefix="pipx-llama-warmup-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "tiny.gguf"
        _write_tiny(path, types)
        _exercise(path, helper=True)
    _embedding_lookups(None if types is None else types.embedding)


def _write_tiny(path: Path, types: WeightTypes | None) -> None:
    if types is None:
        write_tiny_model(path)
    else:
        write_tiny_model_of(path, types)


def _embedding_lookups(qtype: GGMLQuantizationType | None = None) -> None:
    """Dequantize one row of every weight type, or of ``qtype`` (the embedding lookup compiles per type)."""
    from gguf import GGML_QUANT_SIZES

    from pipx_llama.engine.kernels import WEIGHT_KERNELS

    for q, kernel in WEIGHT_KERNELS.items():
        if qtype is not None and q != qtype:
            continue
        block, size = GGML_QUANT_SIZES[q]
        n = max(256, block)
        row = np.zeros((1, n // block * size), np.uint8)
        kernel.dequantize(row, np.empty((1, n), np.float32))


# ----------------------------------------------------------------------------- in the background


@dataclass
class CompileResult:
    """How a background compile ended: ``ok``, the seconds it spent, and what failed otherwise."""

    ok: bool
    seconds: float = 0.0
    error: str | None = None


class BackgroundCompile:
    """A compile running in another process (``start_compile``); ``wait`` for its result."""

    def __init__(self, process, conn, types: WeightTypes | None, helper=None) -> None:
        self._process = process
        self._conn = conn
        self._helper = helper
        self.types = types
        self._result: CompileResult | None = None

    def done(self) -> bool:
        return self._result is not None or not self._process.is_alive()

    def wait(self, on_event: EventCallback | None = None, timeout: float | None = None) -> CompileResult:
        """Wait for the process; a failure is emitted as a ``compile`` event and returned, never raised."""
        if self._result is not None:
            return self._result
        self._process.join(timeout)
        if self._process.is_alive():
            return CompileResult(False, error="still compiling")
        _stop_helper(self._helper)
        message = None
        try:
            if self._conn.poll():
                message = self._conn.recv()
        except (EOFError, OSError):
            message = None
        finally:
            self._conn.close()
        if isinstance(message, tuple) and message[0] == "ok" and self._process.exitcode == 0:
            self._result = CompileResult(True, seconds=float(message[1]))
        else:
            why = message[1] if isinstance(message, tuple) and message[0] == "error" else (
                f"the compile process exited with code {self._process.exitcode}")
            self._result = CompileResult(False, error=why)
            if on_event is not None:
                on_event(ProgressEvent("compile", _LABEL, message=(
                    f"background compile failed: {why}; compiling here instead")))
        return self._result


def start_compile(types: WeightTypes | None,
                  on_event: EventCallback | None = None) -> BackgroundCompile | None:
    """Compile the kernels for ``types`` in a new process; None when this cache already has them.

    A compile of the same types this process started and that still runs is returned, not doubled.
    """
    running = _RUNNING.get(_key(types))
    if running is not None and not running.done():
        return running
    if cache_is_warm(types):
        return None
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_compile_child, args=(types, child), name="pipx-llama-compile", daemon=True)
    process.start()
    child.close()
    job = BackgroundCompile(process, parent, types, _start_helper(types))
    _RUNNING[_key(types)] = job
    if on_event is not None:
        on_event(ProgressEvent("compile", _LABEL, message=(
            f"compiling kernels in the background (process {process.pid})")))
    return job


# background compiles this process started, by _key: compile_kernels waits for (and reports) them
_RUNNING: dict[str, BackgroundCompile] = {}


def _key(types: WeightTypes | None) -> str:
    return "all" if types is None else types.key


def _compile_child(types: WeightTypes | None, conn) -> None:
    try:
        seconds = compile_kernels(types, helper=False)  # the parent starts it: a daemon has no children
    except Exception as err:  # noqa: BLE001 (any failure is the parent's to report, not a silent exit)
        conn.send(("error", f"{type(err).__name__}: {err}"))
        raise SystemExit(1) from None
    conn.send(("ok", seconds))
    conn.close()


# ----------------------------------------------------------------------------- the tiny model

_DIM, _HEADS, _KV_HEADS, _FFN, _VOCAB = 256, 4, 2, 512, 288


def write_tiny_model(path: Path, seed: int = 0, kquants: bool = True, q5: bool = False) -> None:
    """A 1-layer LLaMA GGUF whose matrices cover every packed type, with random small weights.

    ``kquants=False`` uses legacy types only (Q4_0, Q4_1, Q8_0) for every matrix; ``q5`` puts the
    Q5 types in (Q5_1 and Q5_0 for legacy, Q5_K with K-quants) in place of two of them.
    """
    rng = np.random.default_rng(seed)
    hd = _DIM // _HEADS
    k4, k6 = (Q.Q4_K, Q.Q6_K) if kquants else (Q.Q4_1, Q.Q8_0)
    k5 = k4
    if q5:
        k4, k5 = (Q.Q4_K, Q.Q5_K) if kquants else (Q.Q5_1, Q.Q5_0)
    _write(path, rng, [
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
    ])


def write_tiny_model_of(path: Path, types: WeightTypes, seed: int = 0) -> None:
    """A 1-layer LLaMA GGUF with ``types``' embedding type and its matrix types spread over the matrices
    (every one of them used, as long as there are no more than eight)."""
    mats = list(types.matrices)
    if not mats or len(mats) > 8:
        raise ValueError(f"a tiny model holds 1 to 8 matrix types, not {len(mats)}")
    hd = _DIM // _HEADS
    shapes = [("attn_q", _DIM, _DIM), ("attn_k", _KV_HEADS * hd, _DIM), ("attn_v", _KV_HEADS * hd, _DIM),
              ("attn_output", _DIM, _DIM), ("ffn_gate", _FFN, _DIM), ("ffn_up", _FFN, _DIM),
              ("ffn_down", _DIM, _FFN)]
    tensors = [("token_embd.weight", types.embedding, _VOCAB, _DIM),
               ("blk.0.attn_norm.weight", Q.F32, 1, _DIM), ("blk.0.ffn_norm.weight", Q.F32, 1, _DIM)]
    tensors += [(f"blk.0.{name}.weight", mats[i % len(mats)], rows, cols)
                for i, (name, rows, cols) in enumerate(shapes)]
    # the output matrix takes the last type; with fewer than eight, every type is already in a layer
    tensors += [("output_norm.weight", Q.F32, 1, _DIM), ("output.weight", mats[7 % len(mats)], _VOCAB, _DIM)]
    _write(path, np.random.default_rng(seed), tensors)


_SCALE_OFFSETS = {Q.Q4_0: (0,), Q.Q8_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
                  Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _write(path: Path, rng: np.random.Generator,
           tensors: list[tuple[str, GGMLQuantizationType, int, int]]) -> None:
    import gguf
    from gguf import GGML_QUANT_SIZES

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
        if qtype == Q.F32 and rows == 1:
            arr = np.ones(cols, np.float32)
            w.add_tensor_info(name, (cols,), arr.dtype, arr.nbytes)
        elif qtype in (Q.F32, Q.F16):
            dtype = np.float32 if qtype == Q.F32 else np.float16
            arr = (rng.standard_normal((rows, cols)) * 0.02).astype(dtype)
            w.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            arr = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
            scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            for off in _SCALE_OFFSETS.get(qtype, ()):
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
