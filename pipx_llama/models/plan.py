"""Planning: what running a model takes on this machine, decided before anything is downloaded.

``make_plan(name)`` resolves the name or alias, looks at the hardware and the store, and decides the
variant, the quantization, the thread count and the context size. It refuses *before any download*
(``InsufficientResourcesError``; ``DiskFullError`` for the disk) when the RAM or the disk is short,
naming what would fit instead, and (``SourceUnavailableError``) when no source can provide a missing
file. :mod:`pipx_llama.models.prepare` then runs the plan.

Estimates:

- RAM = the runnable GGUF (weights are mmap'd and every page is read per token) + the f16 KV cache
  (``2 * n_layers * n_ctx * n_kv_heads * head_dim * 2`` bytes) + a fixed runtime overhead. The layer
  and head counts come from :mod:`pipx_llama.models.estimates`.
- Disk (peak) = what is left to download + the F16 intermediate of a conversion (2 bytes/parameter)
  + the quantized file.

Quantization: without ``quant``, the manifest's default when it fits comfortably, else the largest
option that does. A ready GGUF variant has a fixed quantization; original weights (Meta ``.pth``,
Hugging Face safetensors) can be quantized to any type pipx-llama writes: by default Q4_0 for Meta's
checkpoints (what llama.cpp did in March 2023) and Q4_K_M for others, unless the variant's
``quantization`` in the manifest names a type to produce.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipx_llama.engine import family_of
from pipx_llama.errors import (
    DiskFullError,
    FetchError,
    InsufficientResourcesError,
    PipxLlamaError,
    UsageError,
)
from pipx_llama.fetch.errors import OfflineError
from pipx_llama.models.estimates import ModelShape, estimate_gguf_bytes, estimated_file_size, model_shape
from pipx_llama.models.manifest import Catalog, Manifest, Variant
from pipx_llama.models.mirror import manifest_from_mirrors
from pipx_llama.models.runnable import (
    CONVERTIBLE,
    QUANT_LADDER,
    convert_done,
    default_quant,
    final_path,
    is_ready,
)
from pipx_llama.models.sources import PullOptions
from pipx_llama.models.store import Store
from pipx_llama.system import RUNTIME_OVERHEAD, HardwareProfile, detect_hardware, ram_budget, ram_needed
from pipx_llama.units import human_bytes

if TYPE_CHECKING:
    from pipx_llama.config import Config


DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CTX = 4096  # the engine's default context (pipx_llama.engine.model.DEFAULT_CTX)
# Alternatives offered when the chosen context does not fit.
_SMALLER_CONTEXTS = (2048, 1024, 512)


class SourceUnavailableError(FetchError):
    """No configured source can provide a file the model needs (no URL given, offline, no source)."""




# --- options and their costs --------------------------------------------------------------------------------


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


def _missing_download(
    store: Store, manifest: Manifest, variant: Variant, options: PullOptions
) -> tuple[int, bool]:
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
            hw: HardwareProfile, options: PullOptions,
            cache_types: tuple[str, str] = ("f16", "f16")) -> Option:
    converts = variant.format in CONVERTIBLE
    final = final_path(store, manifest, variant, quant)
    ready = is_ready(store, manifest, variant, quant)
    if ready:
        weights = final.stat().st_size
    elif not converts:
        weights = (
            variant.known_size if variant.sizes_complete else estimate_gguf_bytes(manifest.parameters, quant)
        )
    else:
        weights = estimate_gguf_bytes(manifest.parameters, quant)
    download = intermediate = final_new = 0
    stages: list[str] = []
    if not ready:
        download, missing = _missing_download(store, manifest, variant, options)
        if missing:
            stages.append("fetch")
        if converts:
            if not convert_done(store, manifest, variant):
                intermediate = estimate_gguf_bytes(manifest.parameters, "F16")
                stages.append("convert")
            stages.append("quantize")
            final_new = weights
    kv = shape.kv_bytes(n_ctx, cache_types)
    ram = ram_needed(weights, kv)
    return Option(
        variant,
        quant,
        weights,
        kv,
        ram,
        download,
        intermediate,
        final_new,
        tuple(stages),
        ready,
        fits_ram=ram <= ram_budget(hw),
        fits_disk=download + intermediate + final_new <= hw.disk_free,
    )


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
        quants = [default_quant(v)] + (
            [q for q in QUANT_LADDER if q != default_quant(v)] if v.format in CONVERTIBLE else []
        )
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


# --- the plan -----------------------------------------------------------------------------------------------


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
    base = PullOptions(
        mirrors=list(config.mirrors),
        url=config.url,
        offline=config.offline,
        allow_http=config.allow_http,
        token=config.token,
        hf_token=config.hf_token,
        fetch=fetch,
    )
    return dataclasses.replace(base, **overrides)


def resolve_model(name: str, catalog: Catalog, options: PullOptions) -> Manifest:
    """A model by name or alias: the known manifests, else a configured mirror's manifest index."""
    found = catalog.get(name)
    if found is not None:
        return found
    remote = manifest_from_mirrors(
        name,
        options.mirrors,
        allow_http=options.allow_http,
        offline=options.offline,
        token=options.token,
        catalog=catalog,
    )
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


def unavailable_reason(
    store: Store, manifest: Manifest, variant: Variant, options: PullOptions
) -> str | None:
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
    from pipx_llama.models.manifest import load_catalog

    cfg = config or load_config()
    cat = catalog or load_catalog(user_dirs=cfg.user_manifest_dirs, allow_http=cfg.allow_http)
    opts = pull_options or pull_options_from_config(cfg)
    manifest = resolve_model(name or DEFAULT_MODEL, cat, opts)
    family_of(manifest.architecture, manifest.origin)  # refused by name before anything is downloaded
    store = Store(cfg.home)
    hw = hardware or detect_hardware(cfg.home)
    ctx = _context(manifest, n_ctx)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}", "pass a positive thread count")
    wanted = _canonical_quant(quant) if quant else None
    options = options_for(store, manifest, hw, ctx, opts, variant=variant, cache_types=cache_types)
    if wanted is not None and not any(o.quant == wanted for o in options):
        have = sorted(
            {o.quant for o in options}, key=lambda q: QUANT_LADDER.index(q) if q in QUANT_LADDER else -1
        )
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
        model=manifest.name,
        variant=v.name,
        source_format=v.format,
        quant=chosen.quant,
        download_bytes=chosen.download_bytes,
        peak_disk_bytes=chosen.peak_disk_bytes,
        ram_bytes=chosen.ram_bytes,
        threads=threads or hw.threads,
        n_ctx=ctx,
        stages=list(chosen.stages),
        final_path=final_path(store, manifest, v, chosen.quant),
        store_root=store.root,
        parameters=manifest.parameters,
        weights_bytes=chosen.weights_bytes,
        kv_bytes=chosen.kv_bytes,
        intermediate_bytes=chosen.intermediate_bytes,
        final_bytes=chosen.final_bytes,
        reason=reason,
        manifest=manifest,
        pull_options=opts,
    )


def _reason(chosen: Option, options: Sequence[Option], wanted: str | None, variant: str | None) -> str:
    if wanted is not None:
        return f"{wanted} as asked"
    if chosen is options[0]:
        return (
            "the manifest's default" if variant is None else f"the default of variant {chosen.variant.name}"
        )
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
        message = (
            f"not enough memory for {what}: it needs {human_bytes(target.ram_bytes)} of RAM (weights "
            f"{human_bytes(target.weights_bytes)} + KV cache {human_bytes(target.kv_bytes)} for {n_ctx} "
            f"tokens + "
            f"{human_bytes(RUNTIME_OVERHEAD)} runtime); {human_bytes(hw.ram_available)} is available "
            f"(at most {human_bytes(ram_budget(hw))} may be used comfortably)"
        )
        resource, needed, available = "ram", target.ram_bytes, hw.ram_available
        last = "or close other programs to free memory"
    else:
        parts = [f"download {human_bytes(target.download_bytes)}"]
        if target.intermediate_bytes:
            parts.append(f"F16 conversion {human_bytes(target.intermediate_bytes)}")
        if target.final_bytes:
            parts.append(f"{target.quant} file {human_bytes(target.final_bytes)}")
        message = (
            f"not enough disk space for {what} in {store.root}: it needs "
            f"{human_bytes(target.peak_disk_bytes)} "
            f"at peak ({' + '.join(parts)}); {human_bytes(hw.disk_free)} is free"
        )
        last = ("or free disk space (pipx-llama gc removes unused files) or point PIPX_LLAMA_HOME at a "
                "bigger disk")
        return DiskFullError(message, _alternatives_hint(alternatives, last), folder=str(store.root),
                             needed=target.peak_disk_bytes, free=hw.disk_free, alternatives=alternatives)
    hint = _alternatives_hint(alternatives, last)
    return InsufficientResourcesError(message, hint, resource=resource, needed=needed, available=available,
                                      alternatives=alternatives)


def _alternatives_hint(alternatives: Sequence[dict[str, Any]], last: str) -> str:
    if not alternatives:
        return "nothing known fits; " + last
    shown = [f"`pipx-llama run {' '.join(a['args'])}` ({a['quant']}, {human_bytes(a['ram_bytes'])} of RAM, "
             f"{human_bytes(a['peak_disk_bytes'])} of disk)" for a in alternatives[:3]]
    return "what would fit: " + "; ".join(shown) + "; " + last


def _unavailable(
    manifest: Manifest,
    variant: Variant,
    why: str,
    hw: HardwareProfile,
    n_ctx: int,
    catalog: Catalog,
    store: Store,
    opts: PullOptions,
) -> PipxLlamaError:
    other = _other_models(manifest, hw, n_ctx, catalog, store, opts, True)
    instead = (
        f"; or run a model that downloads by itself: `pipx-llama run {other[0]['model']}`" if other else ""
    )
    message = f"cannot obtain {manifest.name} ({variant.name}): {why}"
    if opts.offline:
        return OfflineError(message, "run without --offline / PIPX_LLAMA_OFFLINE, or give the files with "
                                     "--from-dir DIR" + instead)
    notes = [s.note for s in variant.sources if s.type == "url-template" and s.note]
    url = f"--url URL ({notes[0]}; a '*' in it stands for each file's path)" if notes else \
        "--url URL (a '*' in it stands for each file's path)"
    return SourceUnavailableError(message, f"pass {url}, or --from-dir DIR with the files you already have"
                                  + instead)
