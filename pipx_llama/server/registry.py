"""The models a server offers: named at start-up, loaded on first use, then kept.

Each model gets ``parallel`` KV-cache contexts (slots) when it loads: the scheduler runs that many of
its requests at once, batched (server/scheduler.py). A request takes the free slot that shares the
longest prefix with it (``generate()`` reuses that prefix, so a chat's next turn only evaluates what
is new). By default as many slots as the RAM left after the weights holds, at most
``MAX_DEFAULT_PARALLEL``. Names are matched exactly, then case-insensitively, and Ollama's
``name:latest`` means ``name``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipx_llama.engine import Context, Model, SamplerConfig, SlotPool, load_model, new_slots
from pipx_llama.errors import PipxLlamaError, UsageError
from pipx_llama.server.errors import bad_request, model_not_found
from pipx_llama.system import RAM_HEADROOM, detect_hardware
from pipx_llama.tokenizer.tokenizer import ATTR_LSTRIP, ATTR_RSTRIP, Tokenizer

log = logging.getLogger("pipx_llama.server")

MAX_DEFAULT_PARALLEL = 4


@dataclass(frozen=True)
class ModelSpec:
    """A model the server offers: its public name, its GGUF file, other names it answers to."""

    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    digest: str | None = None  # sha256 of the file when the store knows it
    # the model's own defaults (an ollama params/system layer), for what a request leaves out
    sampling: SamplerConfig | None = None  # None: the server's
    stop: tuple[str, ...] = ()
    system: str | None = None  # put first in a chat that has no system message
    max_tokens: int | None = None  # None: until the model stops or the context is full
    n_ctx: int | None = None  # the context size when the command line gives none
    template: str | None = None  # ollama's template layer, for a GGUF without tokenizer.chat_template


@dataclass(frozen=True)
class PieceBound:
    """How much text one token can stand for: a prompt of N bytes has at least N / max_bytes tokens.

    Lets the server refuse a prompt that cannot fit the context without tokenizing it (megabytes of
    text cost seconds of CPU). Special tokens count by their text; a vocabulary whose special tokens
    swallow the spaces next to them (lstrip/rstrip) makes spaces free, so they are not counted there.
    """

    max_bytes: int
    spaces_free: bool

    def min_tokens(self, text: str) -> int:
        data = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes U+FFFD: 3 bytes either way
        n = len(data)
        if self.spaces_free:
            n -= sum(data.count(c) for c in b" \t\n\v\f\r")
        return -(-n // self.max_bytes)


def _text_bytes(piece: bytes) -> int:
    # a SentencePiece piece's spaces are its "▁" markers, and a prompt holding a literal "▁" (U+2581,
    # 3 bytes) is encoded into the same piece: each space may stand for 3 bytes of the prompt
    return len(piece) + 2 * piece.count(b" ")


def piece_bound(tokenizer: Tokenizer) -> PieceBound:
    longest = max(_text_bytes(tokenizer.token_to_piece(i, special=True)) for i in range(tokenizer.n_vocab))
    strips = any(tokenizer.token_attr(i) & (ATTR_LSTRIP | ATTR_RSTRIP) for i in range(tokenizer.n_vocab))
    # at least one UTF-8 character: an unknown character becomes one <unk> token
    return PieceBound(max(longest, 4), strips)


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Model
    context: Context  # the first slot
    load_seconds: float
    pieces: PieceBound
    loaded_at: float = field(default_factory=time.time)  # wall clock, for /api/ps
    slots: list[Context] = field(default_factory=list)  # every slot, ``context`` first
    pool: SlotPool | None = None  # the slots' shared KV cache (batches take the fused pass)

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = [self.context]

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx


@dataclass
class _Slot:
    spec: ModelSpec
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: LoadedModel | None = None
    summary: dict[str, Any] | None = None


class ModelRegistry:
    """Name → model; ``get`` loads on first use (once, even when requests race for it)."""

    def __init__(self, specs: list[ModelSpec], *, threads: int | None = None, ctx_size: int | None = None,
                 cache_types: tuple[str, str] = ("f16", "f16"), parallel: int | None = None) -> None:
        if not specs:
            raise UsageError("no model to serve", "name a model or pass -m FILE.gguf")
        self._slots: dict[str, _Slot] = {}
        self._names: dict[str, str] = {}
        for spec in specs:
            for n in (spec.name, *spec.aliases):
                other = self._names.get(n.lower())
                if other is not None and other != spec.name:
                    raise UsageError(f"two models answer to the name {n!r}: {other} and {spec.name}",
                                     "serve files with different names, or only one of them")
            if spec.name in self._slots:
                continue
            self._slots[spec.name] = _Slot(spec)
            for n in (spec.name, *spec.aliases):
                self._names[n.lower()] = spec.name
        self.threads = threads
        self.ctx_size = ctx_size
        self.cache_types = cache_types  # (K, V): "f16" or "q8_0"
        if parallel is not None and parallel < 1:
            raise UsageError(f"parallel slots must be at least 1, got {parallel}", "pass --slots 1 or more")
        self.parallel = parallel  # slots per model; None: what fits in RAM (default_parallel)

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def specs(self) -> list[ModelSpec]:
        return [s.spec for s in self._slots.values()]

    def find(self, name: str | None) -> ModelSpec:
        """The model a request names; 404 when unknown, 400 when none is named and several are served."""
        if name is None or name == "":
            if len(self._slots) == 1:
                return next(iter(self._slots.values())).spec
            raise bad_request(f"'model' is required: this server has {', '.join(self._slots)}", "model")
        key = name.lower()
        if key not in self._names and key.endswith(":latest"):
            key = key[: -len(":latest")]
        if key not in self._names:
            raise model_not_found(name, self.names)
        return self._slots[self._names[key]].spec

    def is_loaded(self, name: str) -> bool:
        return self._slots[name].loaded is not None

    def loaded(self) -> list[LoadedModel]:
        """The models loaded so far (for ``/api/ps``)."""
        return [s.loaded for s in self._slots.values() if s.loaded is not None]

    def get(self, spec: ModelSpec) -> LoadedModel:
        """The loaded model (blocking: loads it the first time)."""
        slot = self._slots[spec.name]
        if slot.loaded is not None:
            return slot.loaded
        with slot.lock:
            if slot.loaded is None:
                slot.loaded = self._load(spec)
        return slot.loaded

    def _load(self, spec: ModelSpec) -> LoadedModel:
        t0 = time.perf_counter()
        model = load_model(spec.path, threads=self.threads)
        model.tokenizer.use_ollama_template(spec.template)
        n_ctx = self.ctx_size if self.ctx_size is not None else spec.n_ctx
        if n_ctx is not None and n_ctx > model.hparams.n_ctx_train:
            log.warning("%s: context %d exceeds the %d tokens it was trained on; using %d",
                        spec.name, n_ctx, model.hparams.n_ctx_train, model.hparams.n_ctx_train)
            n_ctx = model.hparams.n_ctx_train
        probe = model.new_context(n_ctx, fused=False, type_k=self.cache_types[0], type_v=self.cache_types[1])
        n = self.parallel or default_parallel(probe.kv_bytes, _ram_available())
        if self.parallel is not None and self.parallel > 1:
            check_slots_fit(self.parallel, probe.kv_bytes, _ram_available())
        pool = new_slots(model, n, probe.n_ctx, type_k=self.cache_types[0], type_v=self.cache_types[1])
        del probe
        context, slots = pool.contexts[0], pool.contexts
        pieces = piece_bound(model.tokenizer)
        seconds = time.perf_counter() - t0
        log.info("loaded %s (%s) in %.2f s, context %d tokens, %d parallel slot%s", spec.name, spec.path,
                 seconds, context.n_ctx, n, "" if n == 1 else "s")
        return LoadedModel(spec, model, context, seconds, pieces, slots=slots, pool=pool)

    def summary(self, spec: ModelSpec) -> dict[str, Any]:
        """File facts for listings (size, time, architecture, quantization) without loading the weights."""
        slot = self._slots[spec.name]
        if slot.summary is None:
            slot.summary = _summarize(spec)
        return slot.summary


def default_parallel(kv_bytes: int, ram_available: int | None) -> int:
    """Slots whose KV caches fit in the RAM still available (the first slot's is what the planner
    checked), within the headroom the planner keeps; at least 1, at most ``MAX_DEFAULT_PARALLEL``."""
    if ram_available is None:
        return 1
    extra = (int(ram_available * RAM_HEADROOM) - kv_bytes) // max(1, kv_bytes)
    return max(1, min(MAX_DEFAULT_PARALLEL, 1 + extra))


def check_slots_fit(n: int, kv_bytes: int, ram_available: int | None) -> None:
    """Refuse ``n`` slots whose KV caches beyond the first (the one the planner checked) do not fit."""
    if ram_available is None:
        return
    need, budget = (n - 1) * kv_bytes, int(ram_available * RAM_HEADROOM)
    if need > budget:
        fit = default_parallel(kv_bytes, ram_available)
        raise UsageError(f"{n} parallel slots need {need >> 20} MiB more for their KV caches; "
                         f"{budget >> 20} MiB of RAM is available",
                         f"pass --slots {fit} or fewer, or a smaller -c/--ctx-size")


def _ram_available() -> int | None:
    try:
        return detect_hardware(Path.home()).ram_available
    except (OSError, PipxLlamaError) as err:  # a probe that fails leaves one slot, never a failed load
        log.warning("cannot read the available RAM (%s): one parallel slot", err)
        return None


def _summarize(spec: ModelSpec) -> dict[str, Any]:
    import gguf

    from pipx_llama.formats.gguf import open_gguf

    st = spec.path.stat()
    out: dict[str, Any] = {"size": st.st_size, "mtime": st.st_mtime, "family": "", "parameter_size": "",
                           "quantization_level": ""}
    try:
        g = open_gguf(spec.path)
    except (PipxLlamaError, OSError) as err:  # a listing must not fail on a file the model load reports
        log.warning("%s: cannot read its metadata: %s", spec.path, err)
        return out
    try:
        meta = g.metadata
        out["family"] = str(meta.get("general.architecture", ""))
        out["parameter_size"] = str(meta.get("general.size_label", ""))
        ft = meta.get("general.file_type")
        if ft is not None:
            try:
                out["quantization_level"] = gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
            except ValueError:
                out["quantization_level"] = str(ft)
    finally:
        g.close()
    return out
