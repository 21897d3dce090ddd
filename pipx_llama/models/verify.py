"""Re-hashing what is installed: every file of a variant against its manifest, derived files against
their provenance record. Damage is repaired where the store can be written (a damaged file is removed
with its blob, a damaged blob of an intact file restored from it) and only reported where it cannot.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipx_llama.errors import PipxLlamaError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.models.manifest import Manifest, ManifestFile, parse_manifest
from pipx_llama.models.sources import FetchContext, PullOptions
from pipx_llama.models.store import (
    DERIVED_PROVENANCE_SUFFIX,
    PROVENANCE,
    InstalledVariant,
    Store,
    link_or_copy,
    now_iso,
    sha256_file,
)


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
    ctx = FetchContext(store, PullOptions(), emit)
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
