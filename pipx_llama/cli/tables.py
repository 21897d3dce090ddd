"""Plain-text tables that fit the terminal (80 columns when the output is not one).

A table first leaves out its least needed columns, in the order the caller gives, until the rest fits
with room for the one column that wraps (a status, a licence); rich then wraps that column's text at word
boundaries. The caller says which columns were left out (``--json`` always has everything).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

GAP = 2  # spaces between two columns
MIN_WRAP = 20  # the least room the wrapping column gets before another column is left out


@dataclass
class Rendered:
    text: str
    dropped: list[str]  # the headers of the columns left out


def output_width() -> int:
    """The terminal's width (``COLUMNS`` when set), 80 when the output is not a terminal."""
    return shutil.get_terminal_size((80, 24)).columns


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, wrap: int,
                 drop: Sequence[int] = (), width: int | None = None) -> Rendered:
    """``rows`` under ``header`` in at most ``width`` columns: column ``wrap`` wraps, the columns in
    ``drop`` are left out in that order while the rest does not fit, every other column stays whole."""
    from rich.console import Console
    from rich.table import Table

    width = width or output_width()
    natural = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    keep = list(range(len(header)))
    pending = list(drop)

    def fixed() -> int:
        return sum(natural[i] for i in keep if i != wrap) + GAP * (len(keep) - 1)

    while pending and fixed() + min(MIN_WRAP, natural[wrap]) > width:
        keep.remove(pending.pop(0))
    table = Table(box=None, pad_edge=False, padding=(0, GAP, 0, 0), show_header=True, header_style=None,
                  expand=False)
    for i in keep:
        table.add_column(header[i], no_wrap=i != wrap)
    for row in rows:
        table.add_row(*(str(row[i]) for i in keep))
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False, emoji=False, markup=False).print(table)
    text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines())
    return Rendered(text, [header[i] for i in range(len(header)) if i not in keep])


def dropped_note(dropped: Sequence[str], width: int | None = None) -> str:
    """The line that says which columns a narrow terminal left out, and where to see them."""
    if not dropped:
        return ""
    return (f"({', '.join(dropped)} left out to fit {width or output_width()} columns; a wider terminal or "
            "--json shows them)")
