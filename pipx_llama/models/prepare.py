"""Running a plan: fetch -> convert -> quantize, each stage atomic and resumable; and ``ready``, the one
road every command that takes a model follows.

``ready(reference, request, on_event)`` plans (:func:`pipx_llama.models.plan.plan_for`) and prepares,
and returns a ``Runnable``: the GGUF file and the plan that made it. A file reference is its file,
its header checked. ``prepare(plan)`` runs a plan's stages. For a ready GGUF it is a pull (``fetch``,
the stage alone, is what ``pipx-llama pull`` runs). For original weights:

    fetch      pull(): every file verified against the manifest into the store
    convert    pipx_llama.convert -> models/<name>/<variant>/intermediate-f16.gguf
    quantize   pipx_llama.quant -> models/<name>/<variant>/<quant>.gguf
               + <quant>.gguf.provenance.json (source hashes -> derived file hash)

then the F16 intermediate is deleted. A split GGUF's parts, once fetched, are merged
(:mod:`pipx_llama.formats.gguf_split`) into one GGUF with a provenance record like a quantization's
(``merge`` stage), so every other command sees one ordinary file.

Every output is written under a temporary name and renamed
when complete; each stage's completion is recorded in ``models/<name>/<variant>/.pipeline.json``
(written atomically), so a run killed at any moment resumes at the stage it was in: fetched blobs
and partial downloads stay, a finished conversion is reused. One process at a time works on a
variant (a lock); another waits and then finds the work done. A store this user cannot write is only
read: a model already prepared in it runs (no lock, no state written), anything else is refused.

Progress goes to ``on_event(ProgressEvent)``: the pull's, converter's and quantizer's own events,
plus ``stage`` (a stage starts; ``file`` is the stage name), ``stage-done``, ``stage-skipped``
(already done; ``message`` says why) and ``ready`` (``file`` is the runnable GGUF's path).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipx_llama import __version__
from pipx_llama.errors import PipxLlamaError, UsageError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.files import atomic_write_json
from pipx_llama.models.defaults import NONE, ModelDefaults
from pipx_llama.models.manifest import Manifest, Variant
from pipx_llama.models.plan import Request, RunPlan, plan_for
from pipx_llama.models.pull import PullResult, pull
from pipx_llama.models.reference import Reference
from pipx_llama.models.runnable import (
    INTERMEDIATE,
    STAGES,
    STATE_FILE,
    check_installed,
    convert_done,
    derived_ready,
    final_path,
    gguf_ready,
    merged_ready,
    provenance_path,
    read_state,
    source_hashes,
    split_parts,
)
from pipx_llama.models.sources import PullOptions
from pipx_llama.models.store import Store, gguf_header_digest, now_iso, sha256_file
from pipx_llama.units import human_bytes


def _noop(_ev: ProgressEvent) -> None:
    pass


class _Pipeline:
    def __init__(
        self, plan: RunPlan, store: Store, manifest: Manifest, variant: Variant, emit: EventCallback,
        compile_ahead: bool = False,
    ) -> None:
        self.plan = plan
        self.compile_ahead = compile_ahead
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
                     "sources": source_hashes(self.variant), "current": None, "stages": {}}
        state.setdefault("stages", {})
        return state

    def save(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.folder / STATE_FILE, state)

    def clean_temporaries(self) -> None:
        """Leftovers of a killed conversion or quantization (we hold the variant's lock: nobody else
        writes)."""
        for p in self.folder.glob(".*.gguf.*.tmp"):  # pipx_llama.files.temp_path's names
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
        if derived_ready(final, self.variant, quant):
            for s in STAGES:
                self.stage("stage-skipped", s, f"{final.name} is already in the store")
            return final
        state = self.fetch(pull_options)
        self.clean_temporaries()

        inter = self.folder / INTERMEDIATE
        if convert_done(self.store, self.manifest, self.variant, state):
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
        state["stages"]["convert"] = {
            "status": "done",
            "at": now_iso(),
            "path": INTERMEDIATE,
            "outtype": "F16",
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "seconds": round(result.seconds, 2),
            "tensors": result.n_tensors,
            "source_format": result.source_format,
        }
        self.save(state)
        self.stage(
            "stage-done", "convert", f"{inter.name}: {human_bytes(st.st_size)} in {result.seconds:.1f} s"
        )

    def quantize(self, state: dict[str, Any], inter: Path, final: Path, quant: str) -> None:
        from pipx_llama.quant.file import quantize_model

        provenance_path(final).unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        state["current"] = "quantize"
        quants = state["stages"].setdefault("quantize", {})
        quants[quant] = {"status": "running", "started_at": now_iso(), "pid": os.getpid()}
        self.save(state)
        self.stage("stage", "quantize", f"quantizing to {quant} with {self.plan.threads} thread(s)")
        if self.compile_ahead:
            _compile_ahead(lambda: _quantized_types(inter, quant), self.emit)
        q = quantize_model(inter, final, quant, threads=self.plan.threads, on_event=self.emit)
        size = final.stat().st_size
        self.emit(ProgressEvent("start", final.name, 0, size, message="hashing"))
        digest = sha256_file(final)
        self.emit(ProgressEvent("done", final.name, size, size, message=f"sha256 {digest}"))
        record = {**self.provenance(state, q, digest, size), **gguf_header_digest(final)}
        atomic_write_json(provenance_path(final), record)
        state["current"] = None
        quants[quant] = {
            "status": "done",
            "at": now_iso(),
            "path": final.name,
            "sha256": digest,
            "size": size,
            "seconds": round(q.seconds, 2),
        }
        self.save(state)
        self.stage("stage-done", "quantize", f"{final.name}: {human_bytes(size)} in {q.seconds:.1f} s")

    def provenance(self, state: dict[str, Any], q: Any, digest: str, size: int) -> dict[str, Any]:
        pulled = self.store.read_provenance(self.manifest.name, self.variant.name) or {}
        sizes = {f.get("path"): f.get("size") for f in pulled.get("files", [])}
        conv = state["stages"].get("convert", {})
        return {
            "format": 1,
            "kind": "derived",
            "model": self.manifest.name,
            "variant": self.variant.name,
            "quantization": self.plan.quant,
            "path": self.plan.final_path.name,
            "sha256": digest,
            "size": size,
            "created_at": now_iso(),
            "created_by": f"pipx-llama {__version__}",
            "manifest": {"origin": self.manifest.origin, "sha256": self.manifest.text_sha256},
            "sources": [
                {"path": f.path, "sha256": f.sha256, "size": sizes.get(f.path, f.size)}
                for f in self.variant.files
            ],
            "steps": [
                {
                    "stage": "convert",
                    "from": self.variant.format,
                    "to": "F16",
                    "seconds": conv.get("seconds"),
                    "tensors": conv.get("tensors"),
                },
                {
                    "stage": "quantize",
                    "from": "F16",
                    "to": self.plan.quant,
                    "threads": self.plan.threads,
                    "seconds": round(q.seconds, 2),
                    "tensors": q.n_tensors,
                    "fallbacks": q.n_fallback,
                },
            ],
        }


def _compile_ahead(types_of: Callable[[], Any], emit: EventCallback) -> bool:
    """Start the background compile of the kernels for the types ``types_of()`` gives (engine.start_compile);
    a file it cannot read is left for the run itself to report. False when there were no types to read."""
    from pipx_llama.engine import start_compile

    try:
        types = types_of()
    except PipxLlamaError:
        return False
    start_compile(types, emit)
    return True


class _HeaderWatch:
    """Relays a pull's events; while a one-file GGUF downloads, looks for its whole header in the
    partial file and then starts the background compile for the weight types it names.

    The compile (20 s for a 7B's kernels here) then runs while the rest of the file downloads
    (minutes), not after it. The header is looked for when the download has 1 MiB, then each time it
    has doubled: parallel parts fill the file out of order, so the count of bytes received does not
    say when the header is complete, and a few failed reads of a partial header cost milliseconds.
    """

    FIRST_TRY = 1 << 20

    def __init__(self, store: Store, variant: Variant, emit: EventCallback) -> None:
        self.mf = variant.files[0]
        self.path = store.partial_path(self.mf.sha256)
        self.emit = emit
        self.next_try = self.FIRST_TRY
        self.started = False

    @classmethod
    def wanted(cls, variant: Variant) -> bool:
        return variant.format == "gguf" and len(variant.files) == 1 and variant.files[0].size is not None

    def __call__(self, ev: ProgressEvent) -> None:
        self.emit(ev)
        if self.started or ev.kind not in ("start", "progress") or ev.file != self.mf.path:
            return
        if ev.done < self.next_try:
            return
        self.next_try = 2 * ev.done
        self.started = _compile_ahead(lambda: _partial_types(self.path, self.mf.size), self.emit)


def _declared_types(variant: Variant) -> Any:
    """The weight types the manifest says the variant's GGUF has (``weight_types``)."""
    from gguf import GGMLQuantizationType as Q

    from pipx_llama.engine import WeightTypes

    embedding, matrices = variant.weight_types or ("", ())
    return WeightTypes(Q[embedding], tuple(sorted({Q[m] for m in matrices})))


def _partial_types(path: Path, size: int) -> Any:
    from pipx_llama.engine import weight_types

    return weight_types(path, full_size=size)


def _file_types(path: Path) -> Any:
    from pipx_llama.engine import weight_types

    return weight_types(path)


def _quantized_types(inter: Path, quant: str) -> Any:
    """The weight types quantizing ``inter`` to ``quant`` will write (the quantizer's own choice)."""
    from pipx_llama.engine import types_of_tensors
    from pipx_llama.formats.gguf import open_gguf
    from pipx_llama.quant.file import plan_quantization
    from pipx_llama.quant.rules import file_type

    g = open_gguf(inter)
    try:
        choices = plan_quantization(g, file_type(quant))
    finally:
        g.close()
    return types_of_tensors((c.name, c.shape, c.target) for c in choices)


def _merge_split(plan: RunPlan, store: Store, manifest: Manifest, variant: Variant,
                 emit: EventCallback) -> None:
    """Merge a split variant's verified parts into its runnable GGUF (once; under the variant's lock)."""
    final, label = plan.final_path, f"{manifest.name} ({variant.name})"
    if merged_ready(final, variant):
        emit(ProgressEvent("stage-skipped", "merge", source=label, message=f"{final.name} is already merged"))
        return
    read_only = store.read_only_reason()
    if read_only is not None:
        raise store.read_only_error(f"merge the split parts of {label}", read_only)
    lock = store.lock(f"pipeline-{manifest.name}-{variant.name}")
    if not lock.try_acquire():
        emit(ProgressEvent("waiting-lock", label, source=label,
                           message=f"{lock.holder()} is preparing this model; waiting for it"))
        lock.acquire()
    try:
        with store.shared():
            if merged_ready(final, variant):
                return
            _merge_now(plan, store, manifest, variant, emit)
    finally:
        lock.release()


def _merge_now(plan: RunPlan, store: Store, manifest: Manifest, variant: Variant,
               emit: EventCallback) -> None:
    from pipx_llama.formats.gguf_split import merge_parts

    final, label = plan.final_path, f"{manifest.name} ({variant.name})"
    folder = store.variant_dir(manifest.name, variant.name)
    parts = split_parts(variant) or []
    provenance_path(final).unlink(missing_ok=True)
    emit(ProgressEvent("stage", "merge", source=label, message=f"merging {len(parts)} split parts into "
                                                                f"{final.name}"))

    def on_bytes(done: int, total: int) -> None:
        emit(ProgressEvent("progress", final.name, done, total, source=label, message="merging"))

    emit(ProgressEvent("start", final.name, 0, sum(f.size for f in variant.files), source=label,
                       message="merging"))
    result = merge_parts([folder / p for p in parts], final, on_bytes)
    emit(ProgressEvent("start", final.name, 0, result.size, source=label, message="hashing"))
    digest = sha256_file(final)
    emit(ProgressEvent("done", final.name, result.size, result.size, source=label,
                       message=f"sha256 {digest}"))
    record = {
        "format": 1, "kind": "derived", "model": manifest.name, "variant": variant.name,
        "quantization": plan.quant, "path": final.name, "sha256": digest, "size": result.size,
        "created_at": now_iso(), "created_by": f"pipx-llama {__version__}",
        "manifest": {"origin": manifest.origin, "sha256": manifest.text_sha256},
        "sources": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in variant.files],
        "steps": [{"stage": "merge", "from": "split GGUF", "parts": result.parts, "tensors": result.tensors}],
        **gguf_header_digest(final),
    }
    atomic_write_json(provenance_path(final), record)
    emit(ProgressEvent("stage-done", "merge", source=label,
                       message=f"{final.name}: {human_bytes(result.size)} from {result.parts} parts"))


def _manifest(plan: RunPlan) -> Manifest:
    if plan.manifest is None:
        raise UsageError("this plan carries no manifest", "make plans of models by name with plan_for()")
    return plan.manifest


def _pull_options(plan: RunPlan, pull_options: PullOptions | None) -> PullOptions:
    """The pull's options: the plan's variant, and the later stages' bytes in the disk check (the same
    computation as the plan's peak disk: ``pull.plan_space``)."""
    return dataclasses.replace(pull_options or plan.pull_options or PullOptions(), variant=plan.variant,
                               extra_bytes=plan.intermediate_bytes + plan.final_bytes)


def fetch(plan: RunPlan, *, pull_options: PullOptions | None = None,
          on_event: EventCallback | None = None) -> PullResult:
    """The fetch stage alone: every file of the plan's variant verified into the store (``pull``); a split
    GGUF's parts are then merged, so what was pulled runs offline as it is."""
    store, manifest = Store(plan.store_root), _manifest(plan)
    variant = manifest.variant(plan.variant)
    if split_parts(variant) is None:
        return pull(store, manifest, _pull_options(plan, pull_options), on_event)
    emit = on_event or _noop
    held: list[ProgressEvent] = []

    def parts_pulled(ev: ProgressEvent) -> None:
        # the pull's "installed" would read as "ready" while the merge is still to come
        (held.append if ev.kind == "installed" else emit)(ev)

    result = pull(store, manifest, _pull_options(plan, pull_options), parts_pulled)
    _merge_split(plan, store, manifest, variant, emit)
    for ev in held:
        emit(ev)
    return result


def prepare(plan: RunPlan, *, pull_options: PullOptions | None = None, on_event: EventCallback | None = None,
            keep_intermediate: bool = False, compile_ahead: bool = False) -> Path:
    """Run the plan's stages and return the runnable GGUF's path in the store (a file reference: the file).

    ``pull_options`` default to those the plan was made with. ``keep_intermediate`` keeps the F16
    conversion (for quantizing the same weights again). A fetch-only plan stops after the fetch.
    ``compile_ahead`` starts compiling the engine's kernels for the model's weight types in a
    background process as soon as they are known (``compile`` events): while quantizing, which
    writes them, before a GGUF downloads when its manifest declares them (``weight_types``), once a
    one-file GGUF's header has downloaded, or once the GGUF file is there.
    """
    emit = on_event or _noop
    if plan.reference is not None and plan.reference.is_file:
        if compile_ahead:
            _compile_ahead(lambda: _file_types(plan.final_path), emit)
        size = plan.final_path.stat().st_size
        emit(ProgressEvent("ready", str(plan.final_path), size, size, source=plan.model,
                           message=f"{plan.final_path} as it is"))
        return plan.final_path
    manifest = _manifest(plan)
    variant = manifest.variant(plan.variant)
    store = Store(plan.store_root)
    options = _pull_options(plan, pull_options)
    label = f"{manifest.name} ({variant.name})"
    read_only = store.read_only_reason()
    if variant.format == "gguf" or plan.fetch_only:
        path = plan.final_path
        if variant.format == "gguf":
            check_installed(store, manifest, variant, path)
        if gguf_ready(store, manifest, variant):
            emit(
                ProgressEvent(
                    "stage-skipped", "fetch", source=label, message="already in the store, verified"
                )
            )
        else:
            emit(
                ProgressEvent(
                    "stage", "fetch", source=label, message=f"fetching {len(variant.files)} file(s)"
                )
            )
            if compile_ahead and not plan.fetch_only and variant.weight_types is not None:
                _compile_ahead(lambda: _declared_types(variant), emit)  # a header that differs corrects it
            watch = compile_ahead and not plan.fetch_only and _HeaderWatch.wanted(variant)
            pull(store, manifest, options, _HeaderWatch(store, variant, emit) if watch else emit)
            emit(ProgressEvent("stage-done", "fetch", source=label, message="all files verified"))
        if split_parts(variant) is not None:
            _merge_split(plan, store, manifest, variant, emit)
    elif read_only is not None:
        # nothing can be written, so nothing can change: the file is used as it is, without locks
        path = final_path(store, manifest, variant, plan.quant)
        if not derived_ready(path, variant, plan.quant):
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
                pipeline = _Pipeline(plan, store, manifest, variant, emit, compile_ahead)
                path = pipeline.run(options, keep_intermediate)
        finally:
            lock.release()
    if compile_ahead and path.is_file() and not plan.fetch_only:
        _compile_ahead(lambda: _file_types(path), emit)
    size = path.stat().st_size if path.is_file() else variant.known_size
    what = "files are" if plan.fetch_only and variant.format != "gguf" else f"{plan.quant} is"
    emit(ProgressEvent("ready", str(path), size, size, source=label, message=f"{label} {what} ready"))
    return path


@dataclass(frozen=True)
class Runnable:
    """A runnable GGUF file, and the plan that made it ready."""

    path: Path
    plan: RunPlan

    @property
    def name(self) -> str:
        return self.plan.model

    @property
    def quant(self) -> str:
        return self.plan.quant

    @property
    def threads(self) -> int | None:
        return self.plan.threads

    @property
    def n_ctx(self) -> int | None:
        return self.plan.n_ctx

    @property
    def defaults(self) -> ModelDefaults:
        """The model's own sampling settings, stop strings, system prompt and template (none for a file)."""
        return self.plan.manifest.defaults if self.plan.manifest is not None else NONE


def ready(ref: Reference | str | None, request: Request | None = None, on_event: EventCallback | None = None,
          *, on_plan: Callable[[RunPlan], None] | None = None, keep_intermediate: bool = False,
          compile_ahead: bool = False) -> Runnable:
    """The one road from a model reference to a runnable GGUF: plan (``on_plan`` sees the plan before any
    stage runs), then prepare, with progress to ``on_event``. See ``plan_for`` and ``prepare``."""
    plan = plan_for(ref, request)
    if on_plan is not None:
        on_plan(plan)
    return Runnable(prepare(plan, on_event=on_event, keep_intermediate=keep_intermediate,
                            compile_ahead=compile_ahead), plan)
