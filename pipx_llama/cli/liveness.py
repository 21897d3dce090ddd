"""Signs of life while something takes a while (loading a model, evaluating a long prompt).

Anything over :data:`SHOW_AFTER` seconds gets a sign on a terminal: a rich spinner with what is happening,
how far it is (``412/1600 tokens``) and the elapsed time, erased when done. Elsewhere (a pipe, a CI log)
a plain line says the same every :data:`LINE_EVERY` seconds, the first after as long, so that a log
does not fill with lines for steps of a second or two. What finishes sooner shows nothing at all.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, TextIO

SHOW_AFTER = 1.0  # seconds before a sign appears
LINE_EVERY = 5.0  # seconds between two plain lines


class Activity:
    """``with Activity(stream, "loading smollm2") as a: ... a.update(done, total)``; ``stop()`` early ends
    it (before the answer's first word, say)."""

    def __init__(self, stream: TextIO, what: str, *, unit: str = "tokens", show_after: float | None = None,
                 line_every: float = LINE_EVERY, terminal: bool | None = None) -> None:
        self.stream = stream
        self.what = what
        self.unit = unit
        self.terminal = stream.isatty() and os.environ.get("TERM") != "dumb" if terminal is None else terminal
        if show_after is None:
            show_after = SHOW_AFTER if self.terminal else line_every
        self.show_after = show_after
        self.line_every = line_every
        self.done: int | None = None
        self.total: int | None = None
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> Activity:  # noqa: PYI034
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="pipx-llama-activity")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def text(self) -> str:
        elapsed = time.monotonic() - self.t0
        progress = f": {self.done}/{self.total} {self.unit}" if self.total else ""
        return f"{self.what}{progress} ({elapsed:.0f} s)"

    def stop(self) -> None:
        """End the sign (idempotent); on a terminal the spinner line is erased."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None

    def _watch(self) -> None:
        if self._stop.wait(self.show_after):
            return
        if self.terminal:
            self._spin()
            return
        while True:
            self.stream.write(self.text() + "\n")
            self.stream.flush()
            if self._stop.wait(self.line_every):
                return

    def _spin(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner

        activity = self
        no_color = bool(os.environ.get("NO_COLOR"))
        spinner = Spinner("dots", "", style=None if no_color else "dim")

        class _Line:
            def __rich__(self) -> Spinner:
                spinner.update(text=activity.text())
                return spinner

        # no_color leaves dim and bold on: under NO_COLOR the spinner has no style at all
        console = Console(file=self.stream, highlight=False, no_color=no_color)
        with self._lock:
            if self._stop.is_set():
                return
            self._live = Live(_Line(), console=console, transient=True, refresh_per_second=8)
            self._live.start()
