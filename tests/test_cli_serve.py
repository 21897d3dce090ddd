"""``pipx-llama serve NAME`` takes the road ``run`` takes: a model whose manifest has only original weights
is fetched, converted and quantized before the server starts, then answers over HTTP (it once pulled the
safetensors and exited with "holds original weights, not a GGUF file")."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hf_families import llama_models_dir, write_family_folder

from pipx_llama.models.manifest import render_manifest


def _manifest(folder: Path, weights: Path) -> Path:
    files = [{"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(weights.iterdir())]
    path = folder / "tiny-gemma3.toml"
    path.write_text(render_manifest({
        "format": 1, "name": "tiny-gemma3", "description": "a tiny Gemma 3 as Hugging Face ships it",
        "license": "Apache-2.0", "architecture": "gemma3", "parameters": 200000, "context_length": 8192,
        "variants": [{"name": "original", "format": "hf-safetensors", "files": files,
                      "sources": [{"type": "url", "base": "https://example.invalid/none/"}]}]}))
    return path


@pytest.mark.slow
def test_serve_a_safetensors_only_manifest_converts_then_serves(tmp_path):
    weights = tmp_path / "weights"
    write_family_folder(weights, "gemma3", llama_models_dir(), shards=1)
    manifest = _manifest(tmp_path, weights)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIPX_LLAMA_") or k == "PIPX_LLAMA_TEST_DATA"}
    env.update(PIPX_LLAMA_HOME=str(tmp_path / "home"), PIPX_LLAMA_CONFIG_DIR=str(tmp_path / "config"),
               NO_COLOR="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipx_llama.cli", "serve", "tiny-gemma3", "--manifest", str(manifest),
         "--from-dir", str(weights), "--offline", "--quant", "Q8_0", "--port", "0", "-t", "1", "-c", "64"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    url: list[str] = []
    found = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            m = re.search(r"serving .* at (http://\S+)", line)
            if m:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 600
        while not found.wait(1):
            assert proc.poll() is None and time.monotonic() < deadline, "\n".join(log)
        r = httpx.post(url[0] + "/v1/completions", timeout=300,
                       json={"model": "tiny-gemma3", "prompt": "hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["finish_reason"] in (
            "length", "stop")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = "\n".join(log)
    assert "pipx-llama will prepare tiny-gemma3" in text and "convert" in text, text
    final = tmp_path / "home" / "models" / "tiny-gemma3" / "original" / "q8_0.gguf"
    assert final.is_file(), text


def test_serve_lets_the_engine_thread_take_the_gil_back_quickly(smollm2_path, tmp_path, monkeypatch):
    """``serve`` shortens how long the event loop's thread may hold the GIL while the engine thread waits for
    it (Python's 5 ms default cost 8 clients 10-20% of their throughput: ``GIL_SWITCH_INTERVAL_S``), before
    the server runs."""
    import uvicorn

    from pipx_llama.cli import serve_cmd
    from pipx_llama.cli.main import build_parser

    seen: list[float] = []

    class Server:
        def __init__(self, config) -> None:
            pass

        def run(self, sockets) -> None:
            seen.append(sys.getswitchinterval())
            for sock in sockets:
                sock.close()

    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    before = sys.getswitchinterval()
    try:
        args = build_parser().parse_args(["serve", "-m", str(smollm2_path), "--port", "0", "--offline"])
        assert serve_cmd.run(args) == 0
    finally:
        sys.setswitchinterval(before)
    assert seen == [serve_cmd.GIL_SWITCH_INTERVAL_S] and serve_cmd.GIL_SWITCH_INTERVAL_S <= 0.001 < before
