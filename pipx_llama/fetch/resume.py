"""The resume state of a partial download: the file a later run continues from.

Next to ``dest`` lives ``dest + '.json'``: the URL, the expected sha256 and size, the server's
validators (ETag / Last-Modified), the total size and the list of parts ``[start, end, done]`` (byte
offsets, ``end`` inclusive). It is rewritten atomically (temp file, fsync, rename), always after an
``fdatasync`` of the data (the download's supervisor decides when), so the state never claims bytes
that are not on disk, even after a power cut. It is written before the data file is created, so a
data file without a state file is always a finished download (re-hashed before it is trusted).

When the disk fills, that save fails too (a new file needs a block). So each attempt first makes
``dest + '.json.spare'``, 64 KiB of spaces written and synced while there is room; a save that fails
for lack of space writes the state into it in place instead, which needs no new block on filesystems
that overwrite in place (ext4, XFS, NTFS, APFS, tmpfs; a copy-on-write one such as btrfs may still
refuse). Of the two, the newer (``updated``) that reads back whole and valid is used: a spare torn by
a crash is not valid JSON, and the older state then counts fewer bytes, never more.

A state is read back only if it describes this very file (same sha256 and size) and agrees with the
data on disk. Resuming with a different URL keeps the bytes (the expected sha256 is the same) but
keeps the validators only for the same scheme, host and path (a renewed presigned link); the final
hash check is the last line of defence and the error then names every source that contributed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipx_llama.fetch.parts import Part, Parts
from pipx_llama.fetch.source import Source

STATE_VERSION = 1


# Room for a state with a few dozen parts and long presigned URLs (a 16-part state with two 1 KiB URLs is
# ~3 KiB); a state that does not fit is not saved there.
SPARE_BYTES = 64 << 10


def state_path(dest: Path) -> Path:
    """Where the resume state of the partial download ``dest`` lives."""
    return Path(str(dest) + ".json")


def spare_path(dest: Path) -> Path:
    """The preallocated file a state save falls back to when the disk is full."""
    return Path(str(dest) + ".json.spare")


def _records(dest: Path) -> list[dict]:
    """The states saved for ``dest`` that parse (the state file, the spare), newest first."""
    out = []
    for path in (state_path(dest), spare_path(dest)):
        try:
            state = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and isinstance(state.get("updated"), (int, float)):
            out.append(state)
    return sorted(out, key=lambda st: st["updated"], reverse=True)


def partial_progress(dest: Path) -> tuple[int, int | None] | None:
    """(bytes a next call resumes from, total or None) of a partial download at ``dest``, or None if
    there is none. A download from a server that cannot resume counts 0 bytes: the next call starts over.

    Reads only the saved states (the newest); for listings of unfinished downloads.
    """
    records = _records(dest)
    if not records:
        return None
    state = records[0]
    try:
        if not state["ranges"] or state.get("decode"):
            return 0, state.get("total")
        return sum(int(p[2]) for p in state["parts"]), state.get("total")
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


@dataclass
class SavedState:
    """A resume state read back: the file's record, and its parts checked against the data on disk."""

    record: dict
    parts: list[Part]


def load_state(dest: Path, sha256: str, size: int | None) -> SavedState | None:
    """The newest saved state that belongs to this file and is consistent with the data on disk."""
    for state in _records(dest):
        saved = _checked(state, dest, sha256, size)
        if saved is not None:
            return saved
    return None


def _checked(state: dict, dest: Path, sha256: str, size: int | None) -> SavedState | None:
    try:
        if (state["version"] != STATE_VERSION or state["sha256"] != sha256
                or state["size"] != size or not state["ranges"] or state.get("decode")):
            return None
        total = state["total"]
        parts = [Part(int(s), None if e is None else int(e), int(d)) for s, e, d in state["parts"]]
        pos = 0
        for i, p in enumerate(parts):
            if (
                p.start != pos
                or p.done < 0
                or (p.end is None and (i != len(parts) - 1 or total is not None))
            ):
                return None
            if p.end is not None:
                if p.done > p.end + 1 - p.start:
                    return None
                pos = p.end + 1
        if total is not None and pos != total:
            return None
        on_disk = dest.stat().st_size
    except (KeyError, TypeError, ValueError, OSError):
        return None
    if on_disk < max((p.pos for p in parts), default=0):
        return None
    return SavedState(state, parts)


def adopt_state(saved: SavedState, parts: Parts, source: Source) -> None:
    """Continue from ``saved``: its parts, and its validators if ``source`` is the same URL path."""
    state = saved.record
    parts.adopt(state["total"], saved.parts)
    source.sources = [s for s in state.get("sources", []) if isinstance(s, str)]
    old, new = urlsplit(state["url"]), urlsplit(source.url)
    if (old.scheme, old.netloc, old.path) == (new.scheme, new.netloc, new.path):
        source.etag, source.last_modified = state.get("etag"), state.get("last_modified")
        mode, changes = state.get("validators"), state.get("changes")
        source.validators = mode if mode in ("any", "last-modified", "none") else "any"
        source.changes = changes if isinstance(changes, int) and changes >= 0 else 0
    else:
        source.etag = source.last_modified = None


def state_snapshot(source: Source, parts: Parts, sha256: str, size: int | None) -> dict:
    """The resume state as it is now (the caller holds the lock, or no other thread runs)."""
    return {
        "version": STATE_VERSION, "url": source.url, "sources": list(source.sources), "file": source.name,
        "sha256": sha256, "size": size, "total": parts.total, "etag": source.etag,
        "last_modified": source.last_modified, "validators": source.validators, "changes": source.changes,
        "ranges": parts.ranges, "decode": parts.decode,
        "parts": [[p.start, p.end, p.done] for p in parts.items], "updated": time.time(),
    }


def save_state(path: Path, snap: dict) -> None:
    """Write ``snap`` to ``path`` atomically (temp file, fsync, rename); raises OSError."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(snap, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def reserve_spare(dest: Path) -> None:
    """Make the spare state file of ``dest`` while the disk has room (best effort: without one, a full
    disk costs the bytes written since the last save)."""
    path = spare_path(dest)
    if path.exists():  # an earlier attempt's: it may hold the newest state, and a short one still serves
        return
    try:
        with open(path, "wb") as f:
            f.write(b" " * SPARE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass


def save_spare(dest: Path, snap: dict) -> bool:
    """Write ``snap`` over the spare state file in place, never growing it; False if it cannot."""
    data = json.dumps(snap).encode()
    try:
        with open(spare_path(dest), "r+b") as f:
            room = os.fstat(f.fileno()).st_size
            if len(data) > room:
                return False
            f.write(data + b" " * (room - len(data)))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return False
    return True


def forget_state(dest: Path) -> None:
    """Delete the resume state of ``dest`` (a finished download keeps its data)."""
    path = state_path(dest)
    for p in (path, Path(str(path) + ".tmp"), spare_path(dest)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def discard_partial(dest: Path) -> None:
    """Delete a partial download: its data and its resume state."""
    try:
        dest.unlink()
    except FileNotFoundError:
        pass
    forget_state(dest)

