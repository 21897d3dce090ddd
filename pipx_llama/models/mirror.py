"""Mirrors: model manifests served by a mirror (``manifests/index.json``), and exporting the store's
verified files as a static mirror tree any HTTP server can serve (``blobs/sha256/<hex>`` and
``manifests/``). Blobs from mirrors are fetched by :mod:`pipx_llama.models.sources`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from pipx_llama.errors import FetchError, ModelFileError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.fetch.document import fetch_document
from pipx_llama.fetch.errors import AccessDenied, NetworkError, SourceNotFound
from pipx_llama.fetch.http import redact_url
from pipx_llama.files import atomic_write_bytes, atomic_write_json
from pipx_llama.models.manifest import (
    Catalog,
    Manifest,
    ManifestFile,
    parse_manifest,
    unsafe_path_reason,
    url_problem,
)
from pipx_llama.models.sources import FetchContext, PullOptions, checksum_error, is_url, mirror_dir
from pipx_llama.models.store import InstalledVariant, Store, copy_hashing, link_or_copy

MAX_INDEX_BYTES = 8 << 20      # a mirror's manifests/index.json (tens of thousands of models)
MAX_MANIFEST_BYTES = 1 << 20   # one manifest (a few KB in practice)


class MirrorError(ModelFileError):
    """A mirror's manifest index, or a manifest it lists, is unusable; the message names the mirror."""

    def __init__(self, mirror: str, problem: str) -> None:
        super().__init__(
            f"mirror {mirror}: {problem}",
            "fix the mirror, or stop using it (--mirror, PIPX_LLAMA_MIRROR, mirrors in the config)",
        )
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
        remote = is_url(base)
        if remote and (offline or url_problem(base, allow_http=allow_http)):
            continue
        shown = redact_url(base) if remote else str(mirror_dir(base))
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
    if is_url(base):
        return fetch_document(
            f"{base.rstrip('/')}/manifests/{quote(rel, safe='/')}",
            max_bytes=limit,
            token=token,
            allow_http=allow_http,
        )
    path = mirror_dir(base) / "manifests" / rel
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
            reason = (
                unsafe_path_reason(file) if isinstance(file, str) and file else "must be a non-empty string"
            )
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
        raise MirrorError(
            shown, f"its index lists manifests/{entry.file} for {name!r}, but the file is missing"
        ) from None
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
    origin = f"{base.rstrip('/')}/manifests/{entry.file}" if is_url(base) else \
        str(mirror_dir(base) / "manifests" / entry.file)
    m = parse_manifest(text, redact_url(origin) if is_url(base) else origin, allow_http=allow_http)
    keys = (m.name, *m.aliases)
    if name.lower() not in (k.lower() for k in keys):
        raise MirrorError(
            shown,
            f"manifests/{entry.file}, listed for {name!r}, is the manifest of {m.name!r} "
            f"(aliases: {', '.join(m.aliases) or 'none'})",
        )
    if catalog is not None:
        for key in keys:
            known = catalog.get(key)
            if known is not None:
                raise MirrorError(
                    shown,
                    f"manifests/{entry.file} names {key!r}, which is already the model "
                    f"{known.name!r} ({known.origin}); a mirror cannot replace a known model",
                )
    return m


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."




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
    ctx = FetchContext(store, PullOptions(), emit)
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
                report.skipped.append(
                    f"{iv.model} ({iv.variant}) {f['path']}: blob missing (run verify/pull)"
                )
                continue
            emit(
                ProgressEvent(
                    "start", str(f["path"]), 0, size, source=iv.model, message=f"exporting {sha[:12]}"
                )
            )
            if link and link_or_copy(src, out) == "link":
                pass
            else:
                actual, _ = copy_hashing(
                    src, out, ctx.progress(ManifestFile(str(f["path"]), sha, size), iv.model, size)
                )
                if actual != sha:
                    out.unlink(missing_ok=True)
                    raise checksum_error(
                        ManifestFile(str(f["path"]), sha, size), f"the store's blob {src}", actual
                    )
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
    atomic_write_json(
        index_path, {"format": 1, "manifests": sorted(entries.values(), key=lambda e: e["name"])}
    )
    return report
