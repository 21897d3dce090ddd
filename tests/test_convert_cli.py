"""``pipx-llama convert`` in a subprocess: output, JSON events, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import llama_tokenizer_model, random_meta_shards, write_meta_folder, write_torch_zip

from pipx_llama.formats.gguf import open_gguf

PARAMS = {"dim": 32, "multiple_of": 32, "n_heads": 2, "n_layers": 1, "norm_eps": 1e-05, "vocab_size": -1}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipx_llama.cli", *args], capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, vocab_dir) -> Path:
    g = open_gguf(vocab_dir / "ggml-vocab-llama-spm.gguf")
    m = g.metadata
    model = llama_tokenizer_model(
        m["tokenizer.ggml.tokens"], m["tokenizer.ggml.scores"], m["tokenizer.ggml.token_type"]
    )
    g.close()
    shards = random_meta_shards(np.random.default_rng(0), 32000, 32, 1, 2, 1)
    return write_meta_folder(tmp_path_factory.mktemp("cli") / "tiny", shards, PARAMS, model)


def test_convert_json(tmp_path, meta_dir):
    out = tmp_path / "tiny.gguf"
    r = cli("convert", str(meta_dir), str(out), "--outtype", "q8_0", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[0]["kind"] == "start" and lines[-1]["kind"] == "result"
    assert lines[-1]["format"] == "meta" and lines[-1]["outtype"] == "Q8_0"
    assert lines[-1]["tensor_types"] == {"F32": 3, "Q8_0": 9}
    assert out.stat().st_size == lines[-1]["bytes"]
    g = open_gguf(out)
    assert g.metadata["llama.context_length"] == 4096  # norm_eps 1e-5: LLaMA 2
    g.close()


def test_convert_plain_output(tmp_path, meta_dir):
    r = cli("convert", str(meta_dir), str(tmp_path / "tiny.gguf"))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "F16" in r.stdout


def test_a_malicious_checkpoint_is_an_error_line(tmp_path, meta_dir):
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in meta_dir.iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    write_torch_zip(
        evil / "consolidated.00.pth", {}, data_pkl=f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    )
    r = cli("convert", str(evil), str(tmp_path / "evil.gguf"))
    assert r.returncode == 3
    assert "error:" in r.stderr and "refused" in r.stderr and "os.system" in r.stderr and "hint:" in r.stderr
    assert not marker.exists() and not (tmp_path / "evil.gguf").exists()


def test_usage_errors(tmp_path):
    assert cli("convert", str(tmp_path), str(tmp_path / "x.gguf"), "--outtype", "q4_0").returncode == 2
    r = cli("convert", str(tmp_path / "missing"), str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "not a folder" in r.stderr


def test_a_full_disk_is_exit_code_5(tmp_path, meta_dir):
    """The same exit code as a full disk while pulling (it was 3 here, 2 in quantize, 1 in pull)."""
    import os

    r = subprocess.run(
        [sys.executable, "-m", "pipx_llama.cli", "convert", str(meta_dir), str(tmp_path / "t.gguf")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PIPX_LLAMA_FREE_BYTES": "1000"},
    )
    assert r.returncode == 5 and "not enough disk space" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
