"""From a model name to a runnable GGUF in the store: plan for this machine, then fetch -> convert -> quantize.

``make_plan(name)`` resolves the name or alias, looks at the hardware and the store, and decides the
variant, the quantization, the thread count and the context size. It refuses *before any download*
(``InsufficientResourcesError``) when the RAM or the disk is short, naming what would fit instead,
and (``SourceUnavailableError``) when no source can provide a missing file.

Estimates:

- RAM = the runnable GGUF (weights are mmap'd and every page is read per token) + the f16 KV cache
  (``2 * n_layers * n_ctx * n_kv_heads * head_dim * 2`` bytes) + a fixed runtime overhead. The layer and
  head counts come from the model's own files when they are in the store, else from a table of
  well-known models (by parameter count), else from a rough estimate that errs on the high side.
- Disk (peak) = what is left to download + the F16 intermediate of a conversion (2 bytes/parameter)
  + the quantized file.

Quantization: without ``quant``, the manifest's default when it fits comfortably, else the largest
option that does. A ready GGUF variant has a fixed quantization; original weights (Meta ``.pth``,
Hugging Face safetensors) can be quantized to any type pipx-llama writes: by default Q4_0 for Meta's
checkpoints (what llama.cpp did in March 2023) and Q4_K_M for others, unless the variant's
``quantization`` in the manifest names a type to produce.

``prepare(plan)`` runs the stages. For a ready GGUF it is a pull. For original weights:

    fetch      pull(): every file verified against the manifest into the store
    convert    pipx_llama.convert -> models/<name>/<variant>/intermediate-f16.gguf
    quantize   pipx_llama.quantize -> models/<name>/<variant>/<quant>.gguf
               + <quant>.gguf.provenance.json (source hashes -> derived file hash)

then the F16 intermediate is deleted. Every output is written under a temporary name and renamed
when complete; each stage's completion is recorded in ``models/<name>/<variant>/.pipeline.json``
(written atomically), so a run killed at any moment resumes at the stage it was in: fetched blobs
and partial downloads stay, a finished conversion is reused. One process at a time works on a
variant (a lock); another waits and then finds the work done. A store this user cannot write is only
read: a model already prepared in it runs (no lock, no state written), anything else is refused.

Before a prepared GGUF is handed out, its size and the digest of its header and tensor table are
compared with what was recorded when it was verified or made (``check_installed``): a file changed
since is refused with a ``ModelFileError`` instead of being run.

Progress goes to ``on_event(ProgressEvent)``: the pull's, converter's and quantizer's own events,
plus ``stage`` (a stage starts; ``file`` is the stage name), ``stage-done``, ``stage-skipped``
(already done; ``message`` says why) and ``ready`` (``file`` is the runnable GGUF's path).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipx_llama import __version__
from pipx_llama.errors import ModelFileError, PipxLlamaError, UsageError
from pipx_llama.fetch.errors import FetchError, OfflineError
from pipx_llama.fetch.events import ProgressEvent
from pipx_llama.hardware import (
    RUNTIME_OVERHEAD,
    HardwareProfile,
    detect_hardware,
    kv_cache_bytes,
    ram_budget,
    ram_needed,
)
from pipx_llama.manifest import Catalog, Manifest, Variant
from pipx_llama.pull import PullOptions, estimate_gguf_bytes, estimated_file_size, manifest_from_mirrors, pull
from pipx_llama.store import (
    DERIVED_PROVENANCE_SUFFIX,
    Store,
    atomic_write_json,
    gguf_header_digest,
    human_bytes,
    now_iso,
    recorded_file_problem,
    sha256_file,
)

if TYPE_CHECKING:
    from pipx_llama.config import Config

EventCallback = Callable[[ProgressEvent], None]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CTX = 4096  # the engine's default context (pipx_llama.engine.model.DEFAULT_CTX)
STAGES = ("fetch", "convert", "quantize")
CONVERTIBLE = ("meta-pth", "hf-safetensors")
# What original weights can be quantized to, largest first (pipx_llama.quant.rules.FILE_TYPES).
QUANT_LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0")
STATE_FILE = ".pipeline.json"
INTERMEDIATE = "intermediate-f16.gguf"
PROVENANCE_SUFFIX = DERIVED_PROVENANCE_SUFFIX
# Alternatives offered when the chosen context does not fit.
_SMALLER_CONTEXTS = (2048, 1024, 512)


class InsufficientResourcesError(PipxLlamaError):
    """The machine lacks the RAM or the disk for the model; raised before anything is downloaded.

    ``resource`` is "ram" or "disk"; ``alternatives`` lists what would fit (dicts with model, variant,
    quant, n_ctx, ram_bytes, peak_disk_bytes, args).
    """

    exit_code = 5

    def __init__(self, message: str, hint: str, *, resource: str, needed: int, available: int,
                 alternatives: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message, hint)
        self.resource = resource
        self.needed = needed
        self.available = available
        self.alternatives = list(alternatives)


class SourceUnavailableError(FetchError):
    """No configured source can provide a file the model needs (no URL given, offline, no source)."""


# --- model shapes (for the KV cache) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache size depends on. ``exact`` is False for an estimate from the parameter count."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    exact: bool = True

    def kv_bytes(self, n_ctx: int, cache_types: tuple[str, str] = ("f16", "f16")) -> int:
        return kv_cache_bytes(self.n_layers, n_ctx, self.n_kv_heads, self.head_dim, cache_types)


# Well-known models by exact parameter count (from their config.json / params.json).
KNOWN_SHAPES = {
    134515008: ModelShape(30, 3, 64),       # SmolLM2-135M
    1100048384: ModelShape(22, 4, 64),      # TinyLlama 1.1B
    6738415616: ModelShape(32, 32, 128),    # LLaMA 7B, Llama 2 7B
    7241732096: ModelShape(32, 8, 128),     # Mistral 7B
    13015864320: ModelShape(40, 40, 128),   # LLaMA 13B, Llama 2 13B
    32528943616: ModelShape(60, 52, 128),   # LLaMA 30B
}


def estimated_shape(parameters: int) -> ModelShape:
    """A LLaMA-like shape for ``parameters`` weights without grouped-query attention, plus 25%.

    With dim d and d/128 layers of 12*d^2 weights each, parameters ~ 12 d^3 / 128.
    """
    dim = max(64.0, (parameters * 128 / 12) ** (1 / 3))
    layers = max(1, math.ceil(dim / 128 * 1.25))
    return ModelShape(layers, max(1, round(dim / 128)), 128, exact=False)


def _shape_from_files(folder: Path, variant: Variant) -> ModelShape | None:
    """The exact shape from the model's own files, when they are in the store."""
    names = {f.path.rsplit("/", 1)[-1]: folder / f.path for f in variant.files}
    try:
        if variant.format == "gguf":
            path = next((p for n, p in names.items() if n.endswith(".gguf") and p.is_file()), None)
            if path is None:
                return None
            from pipx_llama.engine.gguf_reader import open_gguf

            g = open_gguf(path)
            try:
                md = g.metadata
                arch = str(md.get("general.architecture", "llama"))
                heads = int(md[f"{arch}.attention.head_count"])
                kv = int(md.get(f"{arch}.attention.head_count_kv", heads))
                head_dim = int(md.get(f"{arch}.attention.key_length", int(md[f"{arch}.embedding_length"]) // heads))
                return ModelShape(int(md[f"{arch}.block_count"]), kv, head_dim)
            finally:
                g.close()
        if "config.json" in names and names["config.json"].is_file():
            c = json.loads(names["config.json"].read_text())
            heads = int(c["num_attention_heads"])
            return ModelShape(int(c["num_hidden_layers"]), int(c.get("num_key_value_heads") or heads),
                              int(c.get("head_dim") or int(c["hidden_size"]) // heads))
        if "params.json" in names and names["params.json"].is_file():
            p = json.loads(names["params.json"].read_text())
            heads = int(p["n_heads"])
            return ModelShape(int(p["n_layers"]), int(p.get("n_kv_heads") or heads), int(p["dim"]) // heads)
    except (OSError, ValueError, KeyError, TypeError, PipxLlamaError):
        return None
    return None


def model_shape(store: Store, manifest: Manifest, variant: Variant) -> ModelShape:
    """The model's shape: from its files in the store, else the table of known models, else an estimate."""
    local = _shape_from_files(store.variant_dir(manifest.name, variant.name), variant)
    if local is not None:
        return local
    return KNOWN_SHAPES.get(manifest.parameters) or estimated_shape(manifest.parameters)


# --- where things live ------------------------------------------------------------------------------------------


def default_quant(variant: Variant) -> str:
    """The quantization a variant runs in: a GGUF's own, or the target for converting original weights."""
    if variant.format == "gguf":
        return (variant.quantization or "unknown").upper()
    if variant.quantization and variant.quantization.upper() in QUANT_LADDER:
        return variant.quantization.upper()
    return "Q4_0" if variant.format == "meta-pth" else "Q4_K_M"


def final_path(store: Store, manifest: Manifest, variant: Variant, quant: str) -> Path:
    """The runnable GGUF: a GGUF variant's file, or ``<quant>.gguf`` derived from original weights."""
    folder = store.variant_dir(manifest.name, variant.name)
    if variant.format == "gguf":
        ggufs = [f.path for f in variant.files if f.path.endswith(".gguf")] or [variant.files[0].path]
        return folder / ggufs[0]
    return folder / f"{quant.lower()}.gguf"


def provenance_path(final: Path) -> Path:
    return final.with_name(final.name + PROVENANCE_SUFFIX)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _source_hashes(variant: Variant) -> dict[str, str]:
    return {f.path: f.sha256 for f in variant.files}


def _derived_ready(final: Path, variant: Variant, quant: str) -> bool:
    """A derived GGUF is usable when its provenance matches the file and the manifest's sources."""
    record = _read_json(provenance_path(final))
    if record is None or not final.is_file():
        return False
    sources = {s.get("path"): s.get("sha256") for s in record.get("sources", []) if isinstance(s, dict)}
    return (record.get("size") == final.stat().st_size and str(record.get("quantization", "")).upper() == quant
            and sources == _source_hashes(variant))


def _gguf_ready(store: Store, manifest: Manifest, variant: Variant) -> bool:
    folder = store.variant_dir(manifest.name, variant.name)
    record = store.read_provenance(manifest.name, variant.name) or {}
    recorded = {f.get("path"): f.get("sha256") for f in record.get("files", [])}
    return recorded == _source_hashes(variant) and all(
        store.has_blob(f.sha256, f.size) and (folder / f.path).is_file() for f in variant.files)


def check_installed(store: Store, manifest: Manifest, variant: Variant, final: Path) -> None:
    """Raise ``ModelFileError`` when the runnable GGUF ``final``, as it is now, is not the file that was
    verified (a pulled GGUF) or made (a derived one): its size, or the digest of its header and tensor
    table, differs from the record. Cheap (no full hash); a missing file is left to the pipeline."""
    if not os.path.lexists(final):
        return
    if variant.format == "gguf":
        record = store.read_provenance(manifest.name, variant.name) or {}
        rel = final.relative_to(store.variant_dir(manifest.name, variant.name)).as_posix()
        entry = next((f for f in record.get("files", []) if isinstance(f, dict) and f.get("path") == rel),
                     None)
        what, again = "verified when it was installed", "then run again to fetch it"
    else:
        entry = _read_json(provenance_path(final))
        what, again = "recorded when it was made", "the next run makes it again"
    problem = recorded_file_problem(final, entry) if entry else None
    if problem is not None:
        raise ModelFileError(f"{final} is not the file {what}: {problem}",
                             f"`pipx-llama verify {manifest.name}` re-hashes it and removes it if it is "
                             f"damaged; {again}")


def is_ready(store: Store, manifest: Manifest, variant: Variant, quant: str) -> bool:
    """The runnable GGUF for (variant, quant) is in the store, complete and recorded."""
    if variant.format == "gguf":
        return _gguf_ready(store, manifest, variant)
    return _derived_ready(final_path(store, manifest, variant, quant), variant, quant)


def _state_path(store: Store, manifest: Manifest, variant: Variant) -> Path:
    return store.variant_dir(manifest.name, variant.name) / STATE_FILE


def read_state(store: Store, manifest: Manifest, variant: Variant) -> dict[str, Any]:
    """The variant's stage record (empty when missing, unreadable or for other source files)."""
    state = _read_json(_state_path(store, manifest, variant)) or {}
    if state.get("sources") != _source_hashes(variant):
        return {}
    return state


def _convert_done(store: Store, manifest: Manifest, variant: Variant, state: dict[str, Any] | None = None) -> bool:
    state = read_state(store, manifest, variant) if state is None else state
    conv = state.get("stages", {}).get("convert", {})
    inter = store.variant_dir(manifest.name, variant.name) / INTERMEDIATE
    try:
        st = inter.stat()
    except OSError:
        return False
    return conv.get("status") == "done" and conv.get("size") == st.st_size and conv.get("mtime_ns") == st.st_mtime_ns


# --- options and their costs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One way to run a model -- a variant in a quantization -- and what it costs on this machine now."""

    variant: Variant
    quant: str
    weights_bytes: int      # the runnable GGUF
    kv_bytes: int
    ram_bytes: int
    download_bytes: int     # still to download
    intermediate_bytes: int  # the F16 conversion output, if it must still be written
    final_bytes: int        # the quantized file, if it must still be written
    stages: tuple[str, ...]
    ready: bool
    fits_ram: bool
    fits_disk: bool

    @property
    def converts(self) -> bool:
        return self.variant.format in CONVERTIBLE

    @property
    def peak_disk_bytes(self) -> int:
        return self.download_bytes + self.intermediate_bytes + self.final_bytes

    @property
    def fits(self) -> bool:
        return self.fits_ram and self.fits_disk


def _missing_download(store: Store, manifest: Manifest, variant: Variant, options: PullOptions) -> tuple[int, bool]:
    """(bytes still to download, whether any file is missing from the store)."""
    total, missing = 0, False
    for mf in variant.files:
        if store.has_blob(mf.sha256, mf.size):
            continue
        missing = True
        if mf.sha256 in options.local_files:
            continue
        local = [d / p for d in map(Path, options.from_dirs) for p in (mf.path, mf.path.rsplit("/", 1)[-1])]
        if any(p.is_file() for p in local):
            continue
        total += max(0, estimated_file_size(manifest, variant, mf) - store.partial_size(mf.sha256))
    return total, missing


def _option(store: Store, manifest: Manifest, variant: Variant, quant: str, shape: ModelShape, n_ctx: int,
            hw: HardwareProfile, options: PullOptions, cache_types: tuple[str, str] = ("f16", "f16")) -> Option:
    converts = variant.format in CONVERTIBLE
    final = final_path(store, manifest, variant, quant)
    ready = is_ready(store, manifest, variant, quant)
    if ready:
        weights = final.stat().st_size
    elif not converts:
        weights = variant.known_size if variant.sizes_complete else estimate_gguf_bytes(manifest.parameters, quant)
    else:
        weights = estimate_gguf_bytes(manifest.parameters, quant)
    download = intermediate = final_new = 0
    stages: list[str] = []
    if not ready:
        download, missing = _missing_download(store, manifest, variant, options)
        if missing:
            stages.append("fetch")
        if converts:
            if not _convert_done(store, manifest, variant):
                intermediate = estimate_gguf_bytes(manifest.parameters, "F16")
                stages.append("convert")
            stages.append("quantize")
            final_new = weights
    kv = shape.kv_bytes(n_ctx, cache_types)
    ram = ram_needed(weights, kv)
    return Option(variant, quant, weights, kv, ram, download, intermediate, final_new, tuple(stages), ready,
                  fits_ram=ram <= ram_budget(hw), fits_disk=download + intermediate + final_new <= hw.disk_free)


def options_for(store: Store, manifest: Manifest, hw: HardwareProfile, n_ctx: int,
                pull_options: PullOptions | None = None, *, variant: str | None = None,
                cache_types: tuple[str, str] = ("f16", "f16")) -> list[Option]:
    """Every (variant, quantization) the model can run in, with its costs; the default comes first."""
    opts = pull_options or PullOptions()
    variants = [manifest.variant(variant)] if variant is not None else list(manifest.variants)
    default_v = manifest.variant(variant)
    out: list[Option] = []
    for v in variants:
        shape = model_shape(store, manifest, v)
        quants = [default_quant(v)] + ([q for q in QUANT_LADDER if q != default_quant(v)] if v.format in CONVERTIBLE
                                       else [])
        for q in quants:
            out.append(_option(store, manifest, v, q, shape, n_ctx, hw, opts, cache_types))
    out.sort(key=lambda o: 0 if (o.variant == default_v and o.quant == default_quant(default_v)) else 1)
    return out


def choose(options: Sequence[Option], quant: str | None = None, *, check_ram: bool = True) -> Option | None:
    """The option to use: the default (first) if it fits, else the largest that fits; None if none does.

    With ``quant``, only options of that quantization count, a ready GGUF before a conversion.
    """
    def ok(o: Option) -> bool:
        return o.fits_disk and (o.fits_ram or not check_ram)

    if quant is not None:
        same = sorted((o for o in options if o.quant == quant), key=lambda o: (not o.ready, o.converts))
        return next((o for o in same if ok(o)), None)
    if options and ok(options[0]):
        return options[0]
    # fall back downwards only: a bigger option than the default needs at least as much RAM
    fitting = [o for o in options if ok(o) and o.weights_bytes <= options[0].weights_bytes]
    if not fitting:
        return None
    return max(fitting, key=lambda o: (o.weights_bytes, o.ready, not o.converts))


# --- the plan ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """What running a model will take on this machine, decided before anything is downloaded."""

    model: str
    variant: str
    source_format: str          # gguf | hf-safetensors | meta-pth
    quant: str
    download_bytes: int
    peak_disk_bytes: int
    ram_bytes: int
    threads: int
    n_ctx: int
    stages: list[str]           # of "fetch", "convert", "quantize" still to run; [] = ready
    final_path: Path
    store_root: Path = Path()
    parameters: int = 0
    weights_bytes: int = 0
    kv_bytes: int = 0
    intermediate_bytes: int = 0
    final_bytes: int = 0
    reason: str = ""            # why this variant and quantization
    manifest: Manifest | None = field(default=None, repr=False, compare=False)
    pull_options: PullOptions | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("manifest", "pull_options")}
        out["final_path"] = str(self.final_path)
        out["store_root"] = str(self.store_root)
        out["stages"] = list(self.stages)
        return out


def pull_options_from_config(config: Config, **overrides: Any) -> PullOptions:
    """PullOptions from the user's configuration (mirrors, offline, URL, tokens, parallel parts)."""
    from pipx_llama.fetch.http import FetchOptions

    fetch = FetchOptions()
    if config.parallel_parts:
        fetch.parallel_parts = config.parallel_parts
    if config.part_threshold:
        fetch.part_threshold = config.part_threshold
    if config.give_up_after:
        fetch.give_up_after = config.give_up_after
    base = PullOptions(mirrors=list(config.mirrors), url=config.url, offline=config.offline,
                       allow_http=config.allow_http, token=config.token, hf_token=config.hf_token, fetch=fetch)
    return dataclasses.replace(base, **overrides)


def resolve_model(name: str, catalog: Catalog, options: PullOptions) -> Manifest:
    """A model by name or alias: the known manifests, else a configured mirror's manifest index."""
    found = catalog.get(name)
    if found is not None:
        return found
    remote = manifest_from_mirrors(name, options.mirrors, allow_http=options.allow_http, offline=options.offline,
                                   token=options.token, catalog=catalog)
    return remote or catalog.resolve(name)


def _canonical_quant(quant: str) -> str:
    return quant.strip().upper()


def _context(manifest: Manifest, n_ctx: int | None) -> int:
    if n_ctx is None:
        return min(manifest.context_length, DEFAULT_CTX)
    if n_ctx < 1:
        raise UsageError(f"context size must be at least 1, got {n_ctx}", "pass --ctx 512 or more")
    if n_ctx > manifest.context_length:
        raise UsageError(f"context size {n_ctx} exceeds the {manifest.context_length} tokens {manifest.name} "
                         "was trained on", f"pass --ctx {manifest.context_length} or less")
    return n_ctx


def unavailable_reason(store: Store, manifest: Manifest, variant: Variant, options: PullOptions) -> str | None:
    """Why the variant's missing files cannot be fetched with these options, in a few words (None: some
    source may work)."""
    missing = [f for f in variant.files if not store.has_blob(f.sha256, f.size)]
    if not missing or options.from_dirs or options.local_files or options.mirrors:
        return None
    kinds = {s.type for s in variant.sources}
    if not kinds:
        return "no download source (needs --from-dir or a mirror)"
    if options.offline:
        return "offline, and not in the store"
    if kinds == {"url-template"} and not options.url:
        return "no public download URL (needs --url or --from-dir)"
    return None


def make_plan(name: str | None = None, *, variant: str | None = None, quant: str | None = None,
              threads: int | None = None, n_ctx: int | None = None, hardware: HardwareProfile | None = None,
              config: Config | None = None, catalog: Catalog | None = None,
              pull_options: PullOptions | None = None, check_ram: bool = True,
              cache_types: tuple[str, str] = ("f16", "f16")) -> RunPlan:
    """Plan running model ``name`` (default ``DEFAULT_MODEL``) here; see the module docstring.

    ``pull_options`` are the fetch options ``prepare`` will use (``--url``, ``--from-dir``, mirrors,
    offline); given, the plan also checks that some source can provide the missing files, else the
    user's configuration is assumed and the pull itself reports a missing source. ``check_ram=False``
    plans for another machine (provisioning a shared store): only the disk counts. Raises
    ``InsufficientResourcesError`` or ``SourceUnavailableError`` before any download.
    """
    from pipx_llama.config import load_config
    from pipx_llama.manifest import load_catalog

    cfg = config or load_config()
    cat = catalog or load_catalog(user_dirs=cfg.user_manifest_dirs, allow_http=cfg.allow_http)
    opts = pull_options or pull_options_from_config(cfg)
    manifest = resolve_model(name or DEFAULT_MODEL, cat, opts)
    store = Store(cfg.home)
    hw = hardware or detect_hardware(cfg.home)
    ctx = _context(manifest, n_ctx)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}", "pass a positive thread count")
    wanted = _canonical_quant(quant) if quant else None
    options = options_for(store, manifest, hw, ctx, opts, variant=variant, cache_types=cache_types)
    if wanted is not None and not any(o.quant == wanted for o in options):
        have = sorted({o.quant for o in options}, key=lambda q: QUANT_LADDER.index(q) if q in QUANT_LADDER else -1)
        raise UsageError(f"{manifest.name} cannot run in {wanted}", "available: " + ", ".join(have))
    chosen = choose(options, wanted, check_ram=check_ram)
    if chosen is None:
        target = options[0] if wanted is None else min(
            (o for o in options if o.quant == wanted), key=lambda o: (not o.ready, o.converts))
        raise _refusal(manifest, target, options, hw, ctx, cat, store, opts, variant=variant, quant=wanted,
                       check_ram=check_ram)
    v = chosen.variant
    if not chosen.ready and pull_options is not None:
        why = unavailable_reason(store, manifest, v, opts)
        if why is not None:
            raise _unavailable(manifest, v, why, hw, ctx, cat, store, opts)
    reason = _reason(chosen, options, wanted, variant)
    return RunPlan(
        model=manifest.name, variant=v.name, source_format=v.format, quant=chosen.quant,
        download_bytes=chosen.download_bytes, peak_disk_bytes=chosen.peak_disk_bytes, ram_bytes=chosen.ram_bytes,
        threads=threads or hw.threads, n_ctx=ctx, stages=list(chosen.stages),
        final_path=final_path(store, manifest, v, chosen.quant), store_root=store.root,
        parameters=manifest.parameters, weights_bytes=chosen.weights_bytes, kv_bytes=chosen.kv_bytes,
        intermediate_bytes=chosen.intermediate_bytes, final_bytes=chosen.final_bytes, reason=reason,
        manifest=manifest, pull_options=opts,
    )


def _reason(chosen: Option, options: Sequence[Option], wanted: str | None, variant: str | None) -> str:
    if wanted is not None:
        return f"{wanted} as asked"
    if chosen is options[0]:
        return "the manifest's default" if variant is None else f"the default of variant {chosen.variant.name}"
    d = options[0]
    short = "RAM" if not d.fits_ram else "disk space"
    return f"the default ({d.variant.name}, {d.quant}) needs more {short} than this machine has; " \
           f"{chosen.quant} is the largest that fits"


def _label(manifest: Manifest, o: Option) -> str:
    return f"{manifest.name} ({o.variant.name}, {o.quant})"


def _alt(manifest: Manifest, o: Option, n_ctx: int, args: list[str]) -> dict[str, Any]:
    return {"model": manifest.name, "variant": o.variant.name, "quant": o.quant, "n_ctx": n_ctx,
            "ram_bytes": o.ram_bytes, "peak_disk_bytes": o.peak_disk_bytes, "args": args}


def _other_models(current: Manifest, hw: HardwareProfile, n_ctx: int, catalog: Catalog, store: Store,
                  opts: PullOptions, check_ram: bool) -> list[dict[str, Any]]:
    """Other known models that would fit, largest first (those needing a URL or a folder left out)."""
    found = []
    for m in catalog:
        if m.name == current.name:
            continue
        ctx = min(m.context_length, n_ctx)
        try:
            options = options_for(store, m, hw, ctx, opts)
        except PipxLlamaError:
            continue
        o = choose(options, check_ram=check_ram)
        if o is None or (not o.ready and unavailable_reason(store, m, o.variant, opts)):
            continue
        found.append((m.parameters, _alt(m, o, ctx, [m.name])))
    return [a for _, a in sorted(found, key=lambda t: -t[0])]


def _refusal(manifest: Manifest, target: Option, options: Sequence[Option], hw: HardwareProfile, n_ctx: int,
             catalog: Catalog, store: Store, opts: PullOptions, *, variant: str | None, quant: str | None,
             check_ram: bool) -> InsufficientResourcesError:
    alternatives: list[dict[str, Any]] = []

    def args_for(o: Option, default: Option, extra: list[str]) -> list[str]:
        out = [manifest.name, *extra]
        if variant is not None or (o.variant != default.variant and len(manifest.variants) > 1):
            out += ["--variant", o.variant.name]
        if quant is not None or o.quant != default.quant:
            out += ["--quant", o.quant]
        return out

    if quant is not None or variant is not None:
        o = choose(options, check_ram=check_ram)
        if o is not None:
            alternatives.append(_alt(manifest, o, n_ctx, args_for(o, options[0], [])))
    ram_short = check_ram and not target.fits_ram
    if ram_short and target.fits_disk:
        for ctx in (c for c in _SMALLER_CONTEXTS if c < n_ctx):
            smaller = options_for(store, manifest, hw, ctx, opts, variant=variant)
            o = choose(smaller, quant, check_ram=check_ram)
            if o is not None:
                alternatives.append(_alt(manifest, o, ctx, args_for(o, smaller[0], ["--ctx", str(ctx)])))
                break
    alternatives += _other_models(manifest, hw, n_ctx, catalog, store, opts, check_ram)[:2]
    what = _label(manifest, target)
    if ram_short:
        message = (f"not enough memory for {what}: it needs {human_bytes(target.ram_bytes)} of RAM (weights "
                   f"{human_bytes(target.weights_bytes)} + KV cache {human_bytes(target.kv_bytes)} for {n_ctx} tokens + "
                   f"{human_bytes(RUNTIME_OVERHEAD)} runtime); {human_bytes(hw.ram_available)} is available "
                   f"(at most {human_bytes(ram_budget(hw))} may be used comfortably)")
        resource, needed, available = "ram", target.ram_bytes, hw.ram_available
        last = "or close other programs to free memory"
    else:
        parts = [f"download {human_bytes(target.download_bytes)}"]
        if target.intermediate_bytes:
            parts.append(f"F16 conversion {human_bytes(target.intermediate_bytes)}")
        if target.final_bytes:
            parts.append(f"{target.quant} file {human_bytes(target.final_bytes)}")
        message = (f"not enough disk space for {what} in {store.root}: it needs {human_bytes(target.peak_disk_bytes)} "
                   f"at peak ({' + '.join(parts)}); {human_bytes(hw.disk_free)} is free")
        resource, needed, available = "disk", target.peak_disk_bytes, hw.disk_free
        last = "or free disk space (pipx-llama gc removes unused files) or point PIPX_LLAMA_HOME at a bigger disk"
    hint = _alternatives_hint(alternatives, last)
    return InsufficientResourcesError(message, hint, resource=resource, needed=needed, available=available,
                                      alternatives=alternatives)


def _alternatives_hint(alternatives: Sequence[dict[str, Any]], last: str) -> str:
    if not alternatives:
        return "nothing known fits; " + last
    shown = [f"`pipx-llama run {' '.join(a['args'])}` ({a['quant']}, {human_bytes(a['ram_bytes'])} of RAM, "
             f"{human_bytes(a['peak_disk_bytes'])} of disk)" for a in alternatives[:3]]
    return "what would fit: " + "; ".join(shown) + "; " + last


def _unavailable(manifest: Manifest, variant: Variant, why: str, hw: HardwareProfile, n_ctx: int, catalog: Catalog,
                 store: Store, opts: PullOptions) -> PipxLlamaError:
    other = _other_models(manifest, hw, n_ctx, catalog, store, opts, True)
    instead = f"; or run a model that downloads by itself: `pipx-llama run {other[0]['model']}`" if other else ""
    message = f"cannot obtain {manifest.name} ({variant.name}): {why}"
    if opts.offline:
        return OfflineError(message, "run without --offline / PIPX_LLAMA_OFFLINE, or give the files with "
                                     "--from-dir DIR" + instead)
    notes = [s.note for s in variant.sources if s.type == "url-template" and s.note]
    url = f"--url URL ({notes[0]}; a '*' in it stands for each file's path)" if notes else \
        "--url URL (a '*' in it stands for each file's path)"
    return SourceUnavailableError(message, f"pass {url}, or --from-dir DIR with the files you already have"
                                  + instead)


# --- running the stages -----------------------------------------------------------------------------------------


def _noop(_ev: ProgressEvent) -> None:
    pass


class _Pipeline:
    def __init__(self, plan: RunPlan, store: Store, manifest: Manifest, variant: Variant, emit: EventCallback) -> None:
        self.plan = plan
        self.store = store
        self.manifest = manifest
        self.variant = variant
        self.emit = emit
        self.folder = store.variant_dir(manifest.name, variant.name)
        self.label = f"{manifest.name} ({variant.name})"

    def stage(self, kind: str, name: str, message: str) -> None:
        self.emit(ProgressEvent(kind, name, source=self.label, message=message))

    # the state file
    def load(self) -> dict[str, Any]:
        state = read_state(self.store, self.manifest, self.variant)
        if not state:
            state = {"format": 1, "model": self.manifest.name, "variant": self.variant.name,
                     "sources": _source_hashes(self.variant), "current": None, "stages": {}}
        state.setdefault("stages", {})
        return state

    def save(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.folder / STATE_FILE, state)

    def clean_temporaries(self) -> None:
        """Leftovers of a killed conversion or quantization (we hold the variant's lock: nobody else writes)."""
        patterns = (f".{INTERMEDIATE}.*.partial", ".*.gguf.*.tmp")
        for pattern in patterns:
            for p in self.folder.glob(pattern):
                p.unlink(missing_ok=True)

    def source_dir(self) -> Path:
        """The folder the converter reads: where config.json (HF) or params.json (Meta) is."""
        key = "params.json" if self.variant.format == "meta-pth" else "config.json"
        for f in self.variant.files:
            if f.path.rsplit("/", 1)[-1] == key:
                return (self.folder / f.path).parent
        return self.folder

    def run(self, pull_options: PullOptions, keep_intermediate: bool) -> Path:
        final, quant = self.plan.final_path, self.plan.quant
        check_installed(self.store, self.manifest, self.variant, final)
        if _derived_ready(final, self.variant, quant):
            for s in STAGES:
                self.stage("stage-skipped", s, f"{final.name} is already in the store")
            return final
        state = self.fetch(pull_options)
        self.clean_temporaries()

        inter = self.folder / INTERMEDIATE
        if _convert_done(self.store, self.manifest, self.variant, state):
            self.stage("stage-skipped", "convert", f"reusing the finished conversion {inter.name}")
        else:
            self.convert(state, inter)
        self.quantize(state, inter, final, quant)
        if not keep_intermediate:
            inter.unlink(missing_ok=True)
            state["stages"]["convert"] = {**state["stages"].get("convert", {}), "status": "removed",
                                          "removed_at": now_iso()}
            self.save(state)
        return final

    def fetch(self, pull_options: PullOptions) -> dict[str, Any]:
        """Pull the variant (a no-op for files already in the store); returns the updated state."""
        missing = any(not self.store.has_blob(f.sha256, f.size) for f in self.variant.files)
        if missing:
            self.stage("stage", "fetch", f"fetching and verifying {len(self.variant.files)} file(s)")
        else:
            self.stage("stage-skipped", "fetch", "every file is already in the store, verified")

        def pulled(ev: ProgressEvent) -> None:
            # pull's "installed" would read as "ready" while conversion is still to come; stage-done says it
            if ev.kind != "installed":
                self.emit(ev)

        result = pull(self.store, self.manifest, pull_options, pulled)
        state = self.load()
        state["stages"]["fetch"] = {"status": "done", "at": now_iso(), "fetched": result.fetched}
        self.save(state)
        if missing:
            self.stage("stage-done", "fetch", "all files verified")
        return state

    def convert(self, state: dict[str, Any], inter: Path) -> None:
        from pipx_llama.convert import convert

        inter.unlink(missing_ok=True)
        state["current"] = "convert"
        state["stages"]["convert"] = {"status": "running", "started_at": now_iso(), "pid": os.getpid()}
        self.save(state)
        self.stage("stage", "convert", f"converting the {self.variant.format} weights to an F16 GGUF")
        result = convert(self.source_dir(), inter, "f16", on_event=self.emit)
        st = inter.stat()
        state["current"] = None
        state["stages"]["convert"] = {"status": "done", "at": now_iso(), "path": INTERMEDIATE, "outtype": "F16",
                                      "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                      "seconds": round(result.seconds, 2), "tensors": result.n_tensors,
                                      "source_format": result.source_format}
        self.save(state)
        self.stage("stage-done", "convert", f"{inter.name}: {human_bytes(st.st_size)} in {result.seconds:.1f} s")

    def quantize(self, state: dict[str, Any], inter: Path, final: Path, quant: str) -> None:
        from pipx_llama.quantize import quantize_model

        provenance_path(final).unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        state["current"] = "quantize"
        quants = state["stages"].setdefault("quantize", {})
        quants[quant] = {"status": "running", "started_at": now_iso(), "pid": os.getpid()}
        self.save(state)
        self.stage("stage", "quantize", f"quantizing to {quant} with {self.plan.threads} thread(s)")
        q = quantize_model(inter, final, quant, threads=self.plan.threads, on_event=self.emit)
        size = final.stat().st_size
        self.emit(ProgressEvent("start", final.name, 0, size, message="hashing"))
        digest = sha256_file(final)
        self.emit(ProgressEvent("done", final.name, size, size, message=f"sha256 {digest}"))
        record = {**self.provenance(state, q, digest, size), **gguf_header_digest(final)}
        atomic_write_json(provenance_path(final), record)
        state["current"] = None
        quants[quant] = {"status": "done", "at": now_iso(), "path": final.name, "sha256": digest, "size": size,
                         "seconds": round(q.seconds, 2)}
        self.save(state)
        self.stage("stage-done", "quantize", f"{final.name}: {human_bytes(size)} in {q.seconds:.1f} s")

    def provenance(self, state: dict[str, Any], q: Any, digest: str, size: int) -> dict[str, Any]:
        pulled = self.store.read_provenance(self.manifest.name, self.variant.name) or {}
        sizes = {f.get("path"): f.get("size") for f in pulled.get("files", [])}
        conv = state["stages"].get("convert", {})
        return {
            "format": 1, "kind": "derived", "model": self.manifest.name, "variant": self.variant.name,
            "quantization": self.plan.quant, "path": self.plan.final_path.name, "sha256": digest, "size": size,
            "created_at": now_iso(), "created_by": f"pipx-llama {__version__}",
            "manifest": {"origin": self.manifest.origin, "sha256": self.manifest.text_sha256},
            "sources": [{"path": f.path, "sha256": f.sha256, "size": sizes.get(f.path, f.size)}
                        for f in self.variant.files],
            "steps": [
                {"stage": "convert", "from": self.variant.format, "to": "F16", "seconds": conv.get("seconds"),
                 "tensors": conv.get("tensors")},
                {"stage": "quantize", "from": "F16", "to": self.plan.quant, "threads": self.plan.threads,
                 "seconds": round(q.seconds, 2), "tensors": q.n_tensors, "fallbacks": q.n_fallback},
            ],
        }


def prepare(plan: RunPlan, *, pull_options: PullOptions | None = None, on_event: EventCallback | None = None,
            keep_intermediate: bool = False) -> Path:
    """Run the plan's stages and return the runnable GGUF's path in the store.

    ``pull_options`` default to those the plan was made with. ``keep_intermediate`` keeps the F16
    conversion (for quantizing the same weights again).
    """
    emit = on_event or _noop
    if plan.manifest is None:
        raise UsageError("this plan carries no manifest", "make plans with make_plan()")
    manifest = plan.manifest
    variant = manifest.variant(plan.variant)
    store = Store(plan.store_root)
    options = dataclasses.replace(pull_options or plan.pull_options or PullOptions(), variant=variant.name,
                                  extra_bytes=plan.intermediate_bytes + plan.final_bytes)
    label = f"{manifest.name} ({variant.name})"
    read_only = store.read_only_reason()
    if variant.format == "gguf":
        path = final_path(store, manifest, variant, plan.quant)
        check_installed(store, manifest, variant, path)
        if _gguf_ready(store, manifest, variant):
            emit(ProgressEvent("stage-skipped", "fetch", source=label, message="already in the store, verified"))
        else:
            emit(ProgressEvent("stage", "fetch", source=label, message=f"fetching {len(variant.files)} file(s)"))
            pull(store, manifest, options, emit)
            emit(ProgressEvent("stage-done", "fetch", source=label, message="all files verified"))
    elif read_only is not None:
        # nothing can be written, so nothing can change: the file is used as it is, without locks
        path = final_path(store, manifest, variant, plan.quant)
        if not _derived_ready(path, variant, plan.quant):
            raise store.read_only_error(f"prepare {label} {plan.quant}", read_only)
        check_installed(store, manifest, variant, path)
        for stage in STAGES:
            emit(ProgressEvent("stage-skipped", stage, source=label,
                               message=f"{path.name} is already in the store"))
    else:
        store.ensure()
        lock = store.lock(f"pipeline-{manifest.name}-{variant.name}")
        if not lock.try_acquire():
            emit(ProgressEvent("waiting-lock", label, source=label,
                               message=f"{lock.holder()} is preparing this model; waiting for it"))
            lock.acquire()
        try:
            with store.shared():
                path = _Pipeline(plan, store, manifest, variant, emit).run(options, keep_intermediate)
        finally:
            lock.release()
    emit(ProgressEvent("ready", str(path), path.stat().st_size, path.stat().st_size, source=label,
                       message=f"{label} {plan.quant} is ready"))
    return path


def plan_and_prepare(name: str | None = None, *, on_event: EventCallback | None = None, **kwargs: Any) -> Path:
    """``make_plan`` then ``prepare`` with the user's configuration (the one call a script needs)."""
    return prepare(make_plan(name, **kwargs), on_event=on_event)

