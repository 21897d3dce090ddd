"""``pipx-llama show``: a model by name (manifest, store, its installed GGUF) or a GGUF file by path."""

from __future__ import annotations

import json

import pytest
from conftest import SMOLLM2_SHA256

from pipx_llama.cli.main import main


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "80")
    return tmp_path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_model_by_alias_from_its_manifest(env, capsys):
    code, out, err = cli(capsys, "show", "7B")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "model         llama2-7b-chat (7B)"
    assert "architecture  llama" in lines and "parameters    6.7B" in lines
    assert "quantization  Q4_K_M" in lines and "context       4096 tokens" in lines
    assert any(line.startswith("licence       Llama 2 Community License") for line in lines)
    assert "variant q4_k_m (Q4_K_M), default" in out and "    sha256 " in out
    assert max(map(len, lines)) <= 80


def test_an_installed_model_shows_what_its_gguf_says(env, capsys, smollm2_path):
    code, _, err = cli(capsys, "pull", "smollm2", "--from-dir", str(smollm2_path.parent), "--offline")
    assert code == 0, err
    code, out, err = cli(capsys, "show", "smollm2")
    assert code == 0, err
    assert "layers        30 (embedding 576, vocabulary 49152)" in out
    assert "variant q4_1 (Q4_1), default, installed" in out and f"sha256 {SMOLLM2_SHA256}" in out
    code, out, _ = cli(capsys, "show", "smollm2", "--template")
    assert code == 0 and out.startswith("{% for message in messages %}")
    code, out, _ = cli(capsys, "show", "smollm2", "--json")
    info = json.loads(out)
    assert info["gguf"]["parameters"] == 134515008 == info["parameters"]  # the file agrees with the manifest
    assert info["gguf"]["quantization"] == "Q4_1" and info["installed"][0]["variant"] == "q4_1"


def test_a_gguf_file_by_path(env, capsys, smollm2_path):
    code, out, err = cli(capsys, "show", str(smollm2_path), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["files"] == [{"path": str(smollm2_path), "size": 98362432, "sha256": SMOLLM2_SHA256}]
    assert info["architecture"] == "llama" and info["context_length"] == 8192
    code, out, _ = cli(capsys, "show", str(smollm2_path), "--license")
    assert code == 0 and out == "apache-2.0\n"


def test_an_unknown_name_suggests(env, capsys):
    code, _, err = cli(capsys, "show", "llama2")
    assert code == 2 and "did you mean llama2-7b-chat" in err
    code, _, err = cli(capsys, "show", "7B", "--template")
    assert code == 2 and "pull the model first" in err
