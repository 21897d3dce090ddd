"""Progress events: the one way fetching, pulling and converting report what they are doing.

Library code never prints; it calls an ``on_event(ProgressEvent)`` callback. The CLI turns events
into rich progress bars on a terminal, or into newline-delimited JSON with ``--json``.

Kinds used by the downloader (others may add their own, e.g. ``source-failed``, ``waiting-lock``):

- ``start``     a download begins or resumes; ``done`` is what is already on disk
- ``progress``  periodic: ``done``/``total`` bytes, ``speed`` (bytes/s), ``eta`` (s)
- ``retry``     a request failed and will be retried; ``message`` says why and after how long
- ``restart``   the partial download was discarded (the source's file changed, or Range was ignored)
- ``notice``    something worth knowing that changes nothing for the caller (e.g. validators dropped)
- ``verified``  size and sha256 matched
- ``done``      the file is complete and verified
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """One thing that happened to one file; ``file`` is the manifest-relative path (or a label)."""

    kind: str
    file: str
    done: int = 0
    total: int | None = None
    speed: float | None = None
    eta: float | None = None
    source: str | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field (absent values as ``None``), speed/eta rounded."""
        out = asdict(self)
        if out["speed"] is not None:
            out["speed"] = round(out["speed"], 1)
        if out["eta"] is not None:
            out["eta"] = round(out["eta"], 1)
        return out


EventCallback = Callable[[ProgressEvent], None]
