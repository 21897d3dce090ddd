"""Rendering ProgressEvents: rich progress bars on a terminal, plain lines otherwise, or NDJSON
(``--json``).

Plain lines (a pipe, a CI log) show a download's progress every :data:`PLAIN_EVERY` seconds or each tenth
of the file, whichever comes first, so a log never goes quiet for long; a source's (often long) URL is
named once per file, not again on every line about that file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pipx_llama.events import ProgressEvent
from pipx_llama.units import human_bytes

# kinds worth a line of their own ("start" and "waiting-lock" once per file and source)
_LINE_KINDS = {"plan", "start", "retry", "restart", "waiting-lock", "source-failed", "source-missing",
               "verified", "stored", "cached", "installed", "verify-failed", "notice"}
_ONCE_KINDS = {"start", "waiting-lock", "notice"}
PLAIN_EVERY = 5.0  # seconds between two progress lines of one file, at most


class EventRenderer:
    """Callable ``on_event`` for library calls; use as a context manager so bars are closed cleanly."""

    def __init__(self, mode: str, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in ("json", "bars", "plain"):
            raise ValueError(mode)
        self.mode = mode
        self.stream = stream or sys.stdout
        self.clock = clock
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._said: set[tuple[str, str, str | None]] = set()
        self._sources: dict[str, set[str]] = {}  # per file: the sources its lines have named
        self._last: dict[str, tuple[float, int]] = {}  # per file: (time, tenth) of its last progress line
        if mode == "bars":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.console = Console(file=self.stream, highlight=False, no_color="NO_COLOR" in os.environ)
            self._progress = Progress(
                TextColumn("[bold]{task.description}", justify="left"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )

    def __enter__(self) -> EventRenderer:  # noqa: PYI034
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def emit_json(self, obj: dict[str, Any]) -> None:
        """An extra NDJSON record (e.g. the final result) in ``--json`` mode."""
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        """A human-readable line (ignored in ``--json`` mode)."""
        if self.mode == "json":
            return
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def __call__(self, ev: ProgressEvent) -> None:
        if self.mode == "json":
            self.emit_json(ev.to_json())
            return
        if self.mode == "bars":
            self._bar(ev)
        elif ev.kind == "progress":
            self._plain_progress(ev)
        if ev.kind in _LINE_KINDS:
            detail = ev.source if ev.kind == "start" else ev.message if ev.kind == "notice" else None
            key = (ev.kind, ev.file, detail)
            if ev.kind in _ONCE_KINDS and key in self._said:
                return
            self._said.add(key)
            self.say(_line(self._source_once(ev)))

    def _source_once(self, ev: ProgressEvent) -> ProgressEvent:
        """``ev`` without its source when an earlier line about the same file named it already."""
        if not ev.source:
            return ev
        said = self._sources.setdefault(ev.file, set())
        if any(ev.source in s or s in ev.source for s in said):
            return dataclasses.replace(ev, source=None)
        said.add(ev.source)
        return ev

    def _plain_progress(self, ev: ProgressEvent) -> None:
        now = self.clock()
        tenth = ev.done * 10 // ev.total if ev.total else 0
        last = self._last.get(ev.file)
        if last is None:
            self._last[ev.file] = (now, tenth)  # the start line has just been said
            return
        if tenth > last[1] or now - last[0] >= PLAIN_EVERY:
            self._last[ev.file] = (now, tenth)
            self.say(_progress_line(ev))

    def _bar(self, ev: ProgressEvent) -> None:
        p = self._progress
        if ev.kind not in ("start", "progress", "waiting-lock", "verified", "done", "stored"):
            return
        task = self._tasks.get(ev.file)
        if task is None:
            task = self._tasks[ev.file] = p.add_task(_short(ev.file), total=ev.total, completed=ev.done)
        if ev.kind in ("start", "progress"):
            p.update(task, completed=ev.done, total=ev.total, description=_short(ev.file))
        elif ev.kind == "waiting-lock":
            p.update(task, completed=ev.done, total=ev.total, description=f"{_short(ev.file)} (waiting)")
        else:
            total = ev.total if ev.total is not None else ev.done
            p.update(task, completed=total, total=total, description=_short(ev.file))


def _progress_line(ev: ProgressEvent) -> str:
    parts = [f"{human_bytes(ev.done)} of {human_bytes(ev.total)}" if ev.total else human_bytes(ev.done)]
    if ev.speed:
        parts.append(f"{human_bytes(ev.speed)}/s")
    if ev.eta is not None:
        parts.append(f"{ev.eta:.0f} s left")
    share = f"{ev.done * 100 // ev.total}% " if ev.total else ""
    return f"{ev.file}: {share}({', '.join(parts)})"


def _short(path: str, width: int = 36) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1):]


def _line(ev: ProgressEvent) -> str:
    src = f" from {ev.source}" if ev.source else ""
    k = ev.kind
    if k == "plan":
        return f"{ev.file} {ev.message}"
    if k == "start":
        if ev.message:
            return f"{ev.file}: {ev.message}{src}"
        what = f"resuming at {human_bytes(ev.done)}" if ev.done else "downloading"
        size = f" of {human_bytes(ev.total)}" if ev.total else ""
        return f"{ev.file}: {what}{size}{src}"
    if k == "source-failed":
        return f"warning: {ev.file}: source {ev.source} failed: {ev.message}"
    if k == "source-missing":
        return ev.message or f"{ev.file}: not available from {ev.source}"
    if k == "verify-failed":
        return f"BAD {ev.file} ({ev.source}): {ev.message}"
    if k == "verified":
        return (
            f"ok  {ev.file}"
            + (f": {ev.message}" if ev.message else "")
            + (f" ({ev.source})" if ev.source else "")
        )
    if k == "stored":
        return f"{ev.file}: {ev.message or 'stored'}{src}"
    if k == "cached":
        return f"{ev.file}: {ev.message or 'already in the store'}"
    if k == "notice":
        return f"{ev.file}: note: {ev.message}" + (f" ({ev.source})" if ev.source else "")
    if k in ("retry", "restart"):
        return f"{ev.file}: {ev.message or k}"
    return f"{ev.file}: {ev.message or k}"


def renderer_for(json_mode: bool, stream: TextIO | None = None) -> EventRenderer:
    """NDJSON with ``--json``; bars when the output is a terminal; plain lines otherwise."""
    stream = stream or sys.stdout
    if json_mode:
        return EventRenderer("json", stream)
    return EventRenderer("bars" if stream.isatty() else "plain", stream)
