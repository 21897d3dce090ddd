"""Signs of life (cli/liveness.py): nothing for what ends within the delay, then a line every few
seconds on a non-terminal, with what is happening, how far and since when."""

from __future__ import annotations

import io
import time

from pipx_llama.cli.liveness import Activity


def test_on_a_non_terminal_the_first_line_waits_as_long_as_between_lines():
    assert Activity(io.StringIO(), "loading", line_every=3.0).show_after == 3.0
    assert Activity(io.StringIO(), "loading", terminal=True).show_after == 1.0


def test_a_quick_step_shows_nothing():
    buf = io.StringIO()
    with Activity(buf, "loading", show_after=0.5, terminal=False):
        time.sleep(0.05)
    assert buf.getvalue() == ""


def test_a_slow_step_prints_lines_with_progress_on_a_non_terminal():
    buf = io.StringIO()
    with Activity(buf, "processing the prompt", show_after=0.05, line_every=0.1, terminal=False) as busy:
        busy.update(256, 1600)
        time.sleep(0.4)
    lines = buf.getvalue().splitlines()
    assert len(lines) >= 2
    assert all(line.startswith("processing the prompt: 256/1600 tokens (") and line.endswith(" s)")
               for line in lines)
    before = buf.getvalue()
    time.sleep(0.2)
    assert buf.getvalue() == before  # stopped for good


def test_stop_before_the_end_of_the_block_is_final():
    buf = io.StringIO()
    with Activity(buf, "loading", show_after=0.05, line_every=0.05, terminal=False) as busy:
        time.sleep(0.12)
        busy.stop()
        said = buf.getvalue()
        time.sleep(0.15)
        assert buf.getvalue() == said and said.startswith("loading (0 s)")
