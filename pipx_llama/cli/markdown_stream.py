"""An answer streamed to a terminal as rendered Markdown, word-wrapped to the terminal's width.

rich renders the answer as it grows. Only the block being written (the text after the last blank line
outside a code fence) is redrawn, inside a rich ``Live`` region; a finished block is printed once, above
it, and never redrawn -- so a long answer scrolls like any output and never duplicates when it grows
taller than the screen. Words are never split at the edge: rich wraps at spaces.
"""

from __future__ import annotations

import re
from typing import Any, TextIO

_FENCE = re.compile(r"^\s*(```|~~~)", re.M)


def block_end(text: str, start: int) -> int:
    """Where the finished blocks of ``text`` end (after ``start``): just past its last blank line that is
    not inside a code fence; ``start`` when there is none."""
    pos = len(text)
    while True:
        pos = text.rfind("\n\n", start, pos)
        if pos < 0:
            return start
        if len(_FENCE.findall(text, 0, pos)) % 2 == 0:
            return pos + 2
        pos -= 1
        if pos <= start:
            return start


class MarkdownStream:
    """``write(piece)`` as the answer streams, ``finish()`` at its end (also after Ctrl-C)."""

    def __init__(self, out: TextIO, *, color: bool, width: int | None = None) -> None:
        from rich.console import Console

        self.console = Console(file=out, highlight=False, no_color=not color, width=width, emoji=False)
        self.text = ""
        self.committed = 0  # characters of ``text`` printed for good
        self._live: Any = None

    def _markdown(self, text: str) -> Any:
        from rich.markdown import Markdown

        return Markdown(text, code_theme="monokai", hyperlinks=False)

    def write(self, piece: str) -> None:
        from rich.live import Live

        self.text += piece
        cut = block_end(self.text, self.committed)
        if cut > self.committed:
            block, self.committed = self.text[self.committed : cut], cut
            if self._live is not None:
                self._live.update("", refresh=True)
            self.console.print(self._markdown(block))
        pending = self.text[self.committed :]
        if self._live is None:
            if not pending.strip():
                return
            self._live = Live(self._markdown(pending), console=self.console, auto_refresh=True,
                              refresh_per_second=10, vertical_overflow="visible")
            self._live.start()
        else:
            self._live.update(self._markdown(pending))

    def finish(self) -> None:
        """The last block, rendered for good; the output ends with a newline."""
        pending = self.text[self.committed :]
        self.committed = len(self.text)
        if self._live is not None:
            self._live.update(self._markdown(pending) if pending.strip() else "", refresh=True)
            self._live.stop()  # on a terminal it ends the line itself
            self._live = None
            if not self.console.is_terminal:
                self.console.line()
        elif pending.strip():
            self.console.print(self._markdown(pending))
