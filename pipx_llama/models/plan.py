"""Planning: what running a model takes on this machine, decided before anything is downloaded.

``plan_for(reference, request)`` resolves the reference (:mod:`pipx_llama.models.resolve`), looks at
the hardware and the store, and decides the variant, the quantization, the thread count and the
context size. It refuses *before any download* (``InsufficientResourcesError``; ``DiskFullError`` for
the disk) when the RAM or the disk is short, naming what would fit instead, and
(``SourceUnavailableError``) when no source can provide a missing file.
:mod:`pipx_llama.models.prepare` then runs the plan. A file reference (``-m FILE.gguf``) is not
planned: its plan is the file as it is, once its header is checked. ``make_plan(name, **request)`` is
the same call with keywords.

The road: among the ways to run the quantization asked for (or the manifest's default), the cheapest
wins -- a file already prepared in the store, then a ready GGUF to download, then original weights to
convert and quantize -- unless the user asks for a variant (``--variant original``), or the cheaper
way cannot be fetched or does not fit. The plan's ``reason`` says why.

Estimates:

- RAM = the runnable GGUF (weights are mmap'd and every page is read per token) + the f16 KV cache
  (``2 * n_layers * n_ctx * n_kv_heads * head_dim * 2`` bytes) + a fixed runtime overhead. The layer
  and head counts come from :mod:`pipx_llama.models.estimates`.
- Disk (peak) = :func:`pipx_llama.models.pull.plan_space`, the computation the pull checks before it
  writes: what is left to download (or to copy from ``--from-dir``) + the larger of the pip wheels
  that lie beside their files while they are extracted and the F16 intermediate of a conversion
  (2 bytes/parameter) + the quantized file.

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
from pipx_llama.models.estimates import ModelShape, estimate_gguf_bytes, model_shape
from pipx_llama.models.manifest import Catalog, Manifest, Variant
from pipx_llama.models.pull import plan_space
from pipx_llama.models.reference import DEFAULT_MODEL, Reference, parse_reference
from pipx_llama.models.resolve import check_file, resolve_manifest
from pipx_llama.models.runnable import (
    CONVERTIBLE,
    QUANT_LADDER,
    convert_done,
    default_quant,
    final_path,
    gguf_ready,
    is_ready,
    split_parts,
)
from pipx_llama.models.sources import PullOptions, find_local, pull_options_from_config
from pipx_llama.models.store import Store
from pipx_llama.system import RUNTIME_OVERHEAD, HardwareProfile, detect_hardware, ram_budget, ram_needed
from pipx_llama.units import human_bytes

if TYPE_CHECKING:
    from pipx_llama.config import Config


__all__ = ["DEFAULT_MODEL", "Option", "Request", "RunPlan", "SourceUnavailableError", "choose", "make_plan",
           "options_for", "plan_for", "road_cost", "unavailable_reason"]

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
    peak_disk_bytes: int    # the most the store's disk holds more than now (pull.plan_space)
    stages: tuple[str, ...]
    ready: bool
    fits_ram: bool
    fits_disk: bool
    unavailable: str | None = None  # why the missing files cannot be fetched (None: some source may work)
    fetch_only: bool = False

    @property
    def converts(self) -> bool:
        return self.variant.format in CONVERTIBLE and not self.fetch_only

    @property
    def fits(self) -> bool:
        return self.fits_ram and self.fits_disk


def road_cost(o: Option) -> tuple[bool, bool, bool, int]:
    """Cheaper first: prepared already, then fetchable, then without a conversion, then less disk."""
    return (not o.ready, o.unavailable is not None, o.converts, o.peak_disk_bytes)


def _missing(store: Store, variant: Variant) -> bool:
    return any(not store.has_blob(f.sha256, f.size) for f in variant.files)


def _option(store: Store, manifest: Manifest, variant: Variant, quant: str, shape: ModelShape, n_ctx: int,
            hw: HardwareProfile, options: PullOptions, fetch_only: bool = False,
            cache_types: tuple[str, str] = ("f16", "f16"), slots: int = 1) -> Option:
    converts = variant.format in CONVERTIBLE and not fetch_only
    final = final_path(store, manifest, variant, quant)
    ready = gguf_ready(store, manifest, variant) if fetch_only and variant.format != "gguf" \
        else is_ready(store, manifest, variant, quant)
    if ready and not converts and variant.format != "gguf":
        weights = estimate_gguf_bytes(manifest.parameters, quant)  # fetched only: nothing runnable yet
    elif ready:
        weights = final.stat().st_size
    elif not converts and variant.format == "gguf":
        weights = (
            variant.known_size if variant.sizes_complete else estimate_gguf_bytes(manifest.parameters, quant)
        )
    else:
        weights = estimate_gguf_bytes(manifest.parameters, quant)
    download = intermediate = final_new = peak = 0
    stages: list[str] = []
    if not ready:
        if _missing(store, variant):
            stages.append("fetch")
        if converts:
            if not convert_done(store, manifest, variant):
                intermediate = estimate_gguf_bytes(manifest.parameters, "F16")
                stages.append("convert")
            stages.append("quantize")
            final_new = weights
        elif split_parts(variant) is not None:
            stages.append("merge")  # the parts' merged GGUF is written beside them
            final_new = weights
        space = plan_space(store, manifest, variant,
                           dataclasses.replace(options, extra_bytes=intermediate + final_new))
        download, peak = space.download, space.needed
    kv = shape.kv_bytes(n_ctx, cache_types) * slots
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
        peak,
        tuple(stages),
        ready,
        fits_ram=ram <= ram_budget(hw),
        fits_disk=peak <= hw.disk_free,
        unavailable=None if ready else unavailable_reason(store, manifest, variant, options),
        fetch_only=fetch_only,
    )


def options_for(store: Store, manifest: Manifest, hw: HardwareProfile, n_ctx: int,
                pull_options: PullOptions | None = None, *, variant: str | None = None,
                fetch_only: bool = False, cache_types: tuple[str, str] = ("f16", "f16"),
                slots: int = 1) -> list[Option]:
    """Every (variant, quantization) the model can run in, with its costs; the default comes first.

    ``fetch_only``: the files of each variant as they are (what ``pull`` brings), one option per variant.
    ``slots``: sequences served in parallel, each with a KV cache of its own.
    """
    opts = pull_options or PullOptions()
    variants = [manifest.variant(variant)] if variant is not None else list(manifest.variants)
    default_v = manifest.variant(variant)
    out: list[Option] = []
    for v in variants:
        shape = model_shape(store, manifest, v)
        quants = [default_quant(v)] + (
            [q for q in QUANT_LADDER if q != default_quant(v)]
            if v.format in CONVERTIBLE and not fetch_only else []
        )
        for q in quants:
            out.append(_option(store, manifest, v, q, shape, n_ctx, hw, opts, fetch_only, cache_types, slots))
    out.sort(key=lambda o: 0 if (o.variant == default_v and o.quant == default_quant(default_v)) else 1)
    return out


def choose(options: Sequence[Option], quant: str | None = None, *, check_ram: bool = True) -> Option | None:
    """The option to use, None if none fits.

    The cheapest road (``road_cost``) to the quantization asked for -- without ``quant``, the default's
    (the first option's) -- that fits; with ``quant``, nothing else. Without ``quant``, when no road to
    the default's quantization fits, the largest option that does.
    """
    def ok(o: Option) -> bool:
        return o.fits_disk and (o.fits_ram or not check_ram)

    target = quant if quant is not None else (options[0].quant if options else None)
    same = sorted((o for o in options if o.quant == target), key=road_cost)
    found = next((o for o in same if ok(o)), None)
    if found is not None or quant is not None:
        return found
    # fall back downwards only: a bigger option than the default needs at least as much RAM
    fitting = [o for o in options if ok(o) and o.weights_bytes <= options[0].weights_bytes]
    if not fitting:
        return None
    return max(fitting, key=lambda o: (o.weights_bytes, o.ready, o.unavailable is None, not o.converts))


# --- the plan -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """What running a model will take on this machine, decided before anything is downloaded.

    A file reference's plan has no stages, variant ``file``, and the threads and context the user gave
    (None: the engine's defaults)."""

    model: str
    variant: str
    source_format: str          # gguf | hf-safetensors | meta-pth
    quant: str
    download_bytes: int
    peak_disk_bytes: int
    ram_bytes: int
    threads: int | None
    n_ctx: int | None
    stages: list[str]           # of "fetch", "convert", "quantize" still to run; [] = ready
    final_path: Path            # the runnable GGUF (fetch-only plans: the fetched variant's folder or GGUF)
    store_root: Path = Path()
    parameters: int = 0
    weights_bytes: int = 0
    kv_bytes: int = 0
    intermediate_bytes: int = 0
    final_bytes: int = 0
    reason: str = ""            # why this variant and quantization
    fetch_only: bool = False    # the files only, as ``pull`` brings them (no conversion)
    manifest: Manifest | None = field(default=None, repr=False, compare=False)
    pull_options: PullOptions | None = field(default=None, repr=False, compare=False)
    reference: Reference | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("manifest", "pull_options", "reference", "fetch_only")}
        out["final_path"] = str(self.final_path)
        out["store_root"] = str(self.store_root)
        out["stages"] = list(self.stages)
        return out


@dataclass(frozen=True)
class Request:
    """What a command asks of the road, and where (None: the user's configuration, catalog, hardware).

    ``pull_options`` are the fetch options ``prepare`` will use (``--url``, ``--from-dir``, mirrors,
    offline); given, the plan also checks that some source can provide the missing files, else the
    user's configuration is assumed and the pull itself reports a missing source. ``check_ram=False``
    plans for another machine (provisioning a shared store): only the disk counts. ``fetch_only``
    plans bringing the chosen variant's files into the store and nothing after (``pull``). ``cache_types``
    are the KV cache's key and value types the RAM estimate counts; ``slots`` how many sequences a server
    keeps at once (``serve --slots``), each with a KV cache of its own, which the RAM estimate counts too.
    """

    variant: str | None = None
    quant: str | None = None
    threads: int | None = None
    n_ctx: int | None = None
    check_ram: bool = True
    fetch_only: bool = False
    cache_types: tuple[str, str] = ("f16", "f16")
    slots: int = 1
    pull_options: PullOptions | None = None
    config: Config | None = None
    catalog: Catalog | None = None
    hardware: HardwareProfile | None = None


def _canonical_quant(quant: str) -> str:
    return quant.strip().upper()


def _context(manifest: Manifest, n_ctx: int | None) -> int:
    if n_ctx is None:  # the model's own num_ctx (ollama's params layer), else ours, within its training
        return min(manifest.context_length, manifest.defaults.n_ctx or DEFAULT_CTX)
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
    source may work). A file in the user's folders is not missing (``sources.find_local``, where the
    pull looks); a mirror may hold anything."""
    missing = [f for f in variant.files if not store.has_blob(f.sha256, f.size)
               and f.sha256 not in options.local_files and find_local(f, options.from_dirs) is None]
    if not missing or options.mirrors:
        return None
    where = ""
    if options.from_dirs:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        where = f"{missing[0].path}{more} not in {', '.join(str(d) for d in options.from_dirs)}; "
    kinds = {s.type for s in variant.sources}
    if not kinds:
        return where + "no download source (needs --from-dir or a mirror)"
    if options.offline:
        return where + "offline, and not in the store"
    if kinds == {"url-template"} and not options.url:
        return where + "no public download URL (needs --url or --from-dir)"
    return None


def plan_for(ref: Reference | str | None, request: Request | None = None) -> RunPlan:
    """Plan ``ref`` (a reference, or its text; None: ``DEFAULT_MODEL``) for ``request``, here.

    See the module docstring. Raises ``UsageError`` (unknown name, bad request),
    ``UnsupportedModelError``, ``InsufficientResourcesError`` or ``SourceUnavailableError``, all before
    any download.
    """
    from pipx_llama.config import load_config
    from pipx_llama.models.manifest import load_catalog

    rq = request or Request()
    ref = ref if isinstance(ref, Reference) else parse_reference(ref)
    if rq.threads is not None and rq.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {rq.threads}", "pass a positive thread count")
    if ref.is_file:
        return _file_plan(ref, rq)
    cfg = rq.config or load_config()
    cat = rq.catalog or load_catalog(user_dirs=cfg.user_manifest_dirs, allow_http=cfg.allow_http)
    opts = rq.pull_options or pull_options_from_config(cfg)
    manifest = resolve_manifest(ref, cat, opts)
    family_of(manifest.architecture, manifest.origin)  # refused by name before anything is downloaded
    store = Store(cfg.home)
    hw = rq.hardware or detect_hardware(cfg.home)
    ctx = _context(manifest, rq.n_ctx)
    wanted = _canonical_quant(rq.quant) if rq.quant else None
    options = options_for(store, manifest, hw, ctx, opts, variant=rq.variant, fetch_only=rq.fetch_only,
                          cache_types=rq.cache_types, slots=rq.slots)
    if wanted is not None and not any(o.quant == wanted for o in options):
        have = sorted(
            {o.quant for o in options}, key=lambda q: QUANT_LADDER.index(q) if q in QUANT_LADDER else -1
        )
        raise UsageError(f"{manifest.name} cannot run in {wanted}", "available: " + ", ".join(have))
    chosen = choose(options, wanted, check_ram=rq.check_ram)
    if chosen is None:
        target = min((o for o in options if o.quant == (wanted or options[0].quant)), key=road_cost)
        raise _refusal(manifest, target, options, hw, ctx, cat, store, opts, variant=rq.variant, quant=wanted,
                       check_ram=rq.check_ram, slots=rq.slots)
    v = chosen.variant
    if chosen.unavailable is not None and rq.pull_options is not None:
        raise _unavailable(manifest, v, chosen.unavailable, hw, ctx, cat, store, opts)
    return RunPlan(
        model=manifest.name,
        variant=v.name,
        source_format=v.format,
        quant=chosen.quant,
        download_bytes=chosen.download_bytes,
        peak_disk_bytes=chosen.peak_disk_bytes,
        ram_bytes=chosen.ram_bytes,
        threads=rq.threads or hw.threads,
        n_ctx=ctx,
        stages=list(chosen.stages),
        final_path=store.variant_dir(manifest.name, v.name) if rq.fetch_only and v.format != "gguf"
        else final_path(store, manifest, v, chosen.quant),
        store_root=store.root,
        parameters=manifest.parameters,
        weights_bytes=chosen.weights_bytes,
        kv_bytes=chosen.kv_bytes,
        intermediate_bytes=chosen.intermediate_bytes,
        final_bytes=chosen.final_bytes,
        reason=_reason(chosen, options, wanted, rq.variant),
        fetch_only=rq.fetch_only,
        manifest=manifest,
        pull_options=opts,
        reference=ref,
    )


def make_plan(name: str | None = None, **request: Any) -> RunPlan:
    """``plan_for(name, Request(**request))``: the same plan, asked with keywords."""
    return plan_for(name, Request(**request))


def _file_plan(ref: Reference, rq: Request) -> RunPlan:
    """A GGUF file given by path: used as it is, once its header is checked; nothing to plan."""
    if rq.quant is not None:
        raise UsageError("--quant applies to a model by name, not to -m FILE",
                         f"run `pipx-llama quantize {ref.text} OUT.gguf {rq.quant}` first")
    if rq.variant is not None:
        raise UsageError("--variant applies to a model by name, not to -m FILE", "leave it out")
    f = check_file(ref)
    if rq.n_ctx is not None and rq.n_ctx < 1:
        raise UsageError(f"context size must be at least 1, got {rq.n_ctx}", "pass --ctx 512 or more")
    return RunPlan(model=f.name, variant="file", source_format="gguf", quant=f.quant, download_bytes=0,
                   peak_disk_bytes=0, ram_bytes=0, threads=rq.threads, n_ctx=rq.n_ctx, stages=[],
                   final_path=f.path, weights_bytes=f.size, reason="the file as given", reference=ref)


def _reason(chosen: Option, options: Sequence[Option], wanted: str | None, variant: str | None) -> str:
    default = options[0]
    if wanted is not None:
        why = f"{wanted} as asked"
    elif chosen.quant != default.quant:
        short = "RAM" if not default.fits_ram else "disk space"
        return (f"the default ({default.variant.name}, {default.quant}) needs more {short} than this "
                f"machine has; {chosen.quant} is the largest that fits")
    elif chosen.variant == default.variant:
        return "the manifest's default" if variant is None else \
            f"the default of variant {chosen.variant.name}"
    else:
        why = f"{chosen.quant}, the manifest's default"
    return why + _road_note(chosen, [o for o in options if o.quant == chosen.quant and o is not chosen])


def _road_note(chosen: Option, others: Sequence[Option]) -> str:
    """Why this road to the quantization and not another (empty when there is no other)."""
    other = min(others, key=road_cost, default=None)
    if other is None:
        return ""
    if chosen.ready:
        return f": already prepared in the store (variant {chosen.variant.name})"
    if not chosen.converts and other.converts:
        return (f": a ready GGUF (variant {chosen.variant.name}, {human_bytes(chosen.download_bytes)} to "
                f"download) instead of converting the {other.variant.format} weights (variant "
                f"{other.variant.name}: {human_bytes(other.download_bytes)} to download, "
                f"{human_bytes(other.peak_disk_bytes)} of disk at peak; --variant {other.variant.name} "
                f"converts them)")
    if other.unavailable is not None:
        return f": variant {other.variant.name} cannot be fetched ({other.unavailable})"
    if not other.fits:
        return f": variant {other.variant.name} does not fit"
    return f": variant {chosen.variant.name} is the cheapest way to it"


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
             check_ram: bool, slots: int = 1) -> InsufficientResourcesError:
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
            smaller = options_for(store, manifest, hw, ctx, opts, variant=variant, slots=slots)
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
            f"tokens{f' in each of {slots} slots' if slots > 1 else ''} + "
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
