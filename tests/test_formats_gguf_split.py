from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from splitgguf import split_gguf

from pipx_llama.engine.model import load_model
from pipx_llama.engine.warmup import write_tiny_model
from pipx_llama.errors import ModelFileError
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.formats.gguf_split import merge_parts, split_name

TOOL = Path("/work/llama-build/bin/llama-gguf-split")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_model(path)
    return path


def _tool() -> str:
    found = shutil.which("llama-gguf-split") or (str(TOOL) if TOOL.is_file() else None)
    if found is None:
        pytest.skip("llama-gguf-split is not built (cmake target llama-gguf-split)")
    return found


def test_split_names():
    s = split_name("Qwen-Q4_K_M-00002-of-00003.gguf")
    assert (s.prefix, s.number, s.count) == ("Qwen-Q4_K_M", 2, 3)
    assert s.part(1) == "Qwen-Q4_K_M-00001-of-00003.gguf" and s.merged == "Qwen-Q4_K_M.gguf"
    assert split_name("model.gguf") is None
    assert split_name("m-00004-of-00003.gguf") is None
    assert split_name("m-00000-of-00003.gguf") is None


def test_merge_is_byte_identical_to_llama_gguf_split(tiny, tmp_path):
    tool = _tool()
    split = [tool, "--split", "--split-max-tensors", "5", str(tiny), str(tmp_path / "t")]
    subprocess.run(split, check=True, capture_output=True)  # safe: an argv list, no shell
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([tool, "--merge", str(tmp_path / "t-00001-of-00003.gguf"), str(theirs)],  # safe: no shell
                   check=True, capture_output=True)
    parts = [tmp_path / f"t-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    ours = merge_parts(parts, tmp_path / "ours.gguf")
    assert (ours.parts, ours.tensors) == (3, 12)
    assert (tmp_path / "ours.gguf").read_bytes() == theirs.read_bytes()
    # the tests' own splitter writes what the tool writes
    (tmp_path / "py").mkdir()
    for ours_part, tool_part in zip(split_gguf(tiny, tmp_path / "py" / "t", 5), parts, strict=True):
        assert ours_part.read_bytes() == tool_part.read_bytes()


def _logits(path: Path) -> np.ndarray:
    m = load_model(path, threads=1)
    try:
        return m.new_context(64).eval([1, 5, 9, 3, 7], all_logits=True)
    finally:
        m.close()


@pytest.mark.parametrize("per_part", [6, 5])
def test_merged_model_runs_like_the_unsplit_file(tiny, tmp_path, per_part):
    parts = split_gguf(tiny, tmp_path / "t", per_part)
    merged = merge_parts(parts, tmp_path / "merged.gguf").path
    a, b = open_gguf(tiny), open_gguf(merged)
    assert list(a.tensors) == list(b.tensors)
    assert b.metadata["split.count"] == 0
    assert {k: v for k, v in a.metadata.items() if not isinstance(v, np.ndarray)} == \
        {k: v for k, v in b.metadata.items() if not k.startswith("split.") and not isinstance(v, np.ndarray)}
    for name in a.tensors:
        assert bytes(a.tensor_bytes(name)) == bytes(b.tensor_bytes(name))
    a.close()
    b.close()
    np.testing.assert_array_equal(_logits(tiny), _logits(merged))


def _refused(parts: list[Path], out: Path, *words: str) -> str:
    with pytest.raises(ModelFileError) as info:
        merge_parts(parts, out)
    message = str(info.value)
    assert "\n" not in message.split(" (")[0]
    for w in words:
        assert w in message
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))
    return message


def test_a_missing_part_is_refused(tiny, tmp_path):
    parts = split_gguf(tiny, tmp_path / "t", 5)
    _refused(parts[:2], tmp_path / "m.gguf", parts[0].name, "split.count is 3", "2 part(s)")


def test_parts_out_of_order_are_refused(tiny, tmp_path):
    p = split_gguf(tiny, tmp_path / "t", 5)
    _refused([p[0], p[2], p[1]], tmp_path / "m.gguf", p[2].name, "split.no is 2, expected 1")


def test_a_part_of_another_split_set_is_refused(tiny, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mine = split_gguf(tiny, tmp_path / "a" / "t", 5)
    other = split_gguf(tiny, tmp_path / "b" / "t", 5, total=13)
    _refused([mine[0], other[1], mine[2]], tmp_path / "m.gguf", other[1].name, "split.tensors.count")


def test_duplicate_tensor_names_are_refused(tiny, tmp_path):
    p = split_gguf(tiny, tmp_path / "t", 5)
    _refused([p[0], p[0], p[2]], tmp_path / "m.gguf", "split.no is 0, expected 1")
    (tmp_path / "b").mkdir()
    # a crafted second part re-numbered: its tensors are the first part's
    q = split_gguf(tiny, tmp_path / "b" / "t", 5, numbers=[1, 0, 2])
    _refused([p[0], q[0], p[2]], tmp_path / "m.gguf", q[0].name, "is also in", p[0].name)


def test_a_file_that_is_not_a_part_is_refused(tiny, tmp_path):
    _refused([tiny], tmp_path / "m.gguf", str(tiny), "no split.")
