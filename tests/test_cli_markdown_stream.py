"""An answer streamed as Markdown (cli/markdown_stream.py): wrapped at spaces within the width, rendered
(lists, bold, code blocks), finished blocks printed once."""

from __future__ import annotations

import io
import re

import pytest

from pipx_llama.cli.markdown_stream import MarkdownStream, block_end

ANSWER = (
    "The **magnificent** dragon flew over the mountains and the valleys, looking for somewhere to rest.\n\n"
    "It found:\n\n"
    "- a cave\n- a river\n- an unbelievably comfortable meadow\n\n"
    "```python\nprint('hello')\n\nprint('world')\n```\n\n"
    "And then it slept."
)


@pytest.mark.parametrize(("text", "start", "end"), [
    ("one\n\ntwo", 0, 5),
    ("one", 0, 0),
    ("a\n\n```\ncode\n\nmore", 0, 3),  # the blank line inside the open fence is no block end
    ("a\n\n```\ncode\n\nmore\n```\n\nafter", 0, 23),
    ("one\n\ntwo\n\nthree", 5, 10),
])
def test_block_end(text, start, end):
    assert block_end(text, start) == end


def test_streamed_markdown_wraps_at_spaces_and_renders():
    buf = io.StringIO()
    md = MarkdownStream(buf, color=False, width=30)
    for i in range(0, len(ANSWER), 3):  # token-sized pieces
        md.write(ANSWER[i : i + 3])
    md.finish()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 30
    words = set(text.split())
    for word in ("magnificent", "mountains", "unbelievably", "comfortable", "print('hello')", "slept."):
        assert word in words, word  # whole, never split at the edge
    assert "**" not in text and "```" not in text  # bold and the fence are rendered, not shown
    assert sum("•" in line for line in lines) == 3  # the list's items
    assert text.count("magnificent") == 1 and text.count("slept") == 1  # each block printed once
    assert text.endswith("\n")


def test_an_interrupted_answer_still_ends_its_line():
    buf = io.StringIO()
    md = MarkdownStream(buf, color=False, width=40)
    md.write("Half a sen")
    md.finish()
    assert buf.getvalue().rstrip(" \n").endswith("Half a sen") and buf.getvalue().endswith("\n")
