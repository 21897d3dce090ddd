"""``pipx-llama bench``: llama-bench-style speed table and JSON, on the real SmolLM2 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipx_llama.cli.bench_cmd import bench_tokens


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipx_llama.cli", *args], capture_output=True, text=True,
                          timeout=600, check=False)


def test_bench_tokens_are_fixed_and_in_range():
    toks = bench_tokens(49152, 300)
    assert toks == bench_tokens(49152, 300)
    assert min(toks) >= 256 and max(toks) < 49152 and len(set(toks)) > 250
    assert all(0 <= t < 300 for t in bench_tokens(300, 50))


@pytest.mark.slow
def test_bench_json_reports_both_tests(smollm2_path):
    out = cli("bench", "-m", str(smollm2_path), "-p", "32", "-n", "8", "-r", "2", "-t", "1", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert [r["test"] for r in info["results"]] == ["pp32", "tg8"]
    for r in info["results"]:
        assert len(r["runs"]) == 2 and r["tokens_per_second"] > 0 and r["stddev"] >= 0
    assert info["threads"] == 1 and info["size_bytes"] > 0 and info["weight_bytes_per_token"] > 0


@pytest.mark.slow
def test_bench_with_a_q8_0_kv_cache(smollm2_path):
    """llama.cpp's -ctk/-ctv: the q8_0 cache (34 bytes per 32 values) next to the f16 one (64 bytes)."""
    runs = {}
    for cache in ("f16", "q8_0"):
        out = cli("bench", "-m", str(smollm2_path), "-p", "16", "-n", "4", "-r", "1", "-t", "1", "--json",
                  "-ctk", cache, "--cache-type-v", cache)
        assert out.returncode == 0, out.stderr
        runs[cache] = json.loads(out.stdout)
    q8 = runs["q8_0"]
    assert (q8["type_k"], q8["type_v"]) == ("q8_0", "q8_0") and runs["f16"]["type_k"] == "f16"
    assert q8["kv_bytes"] * 64 == runs["f16"]["kv_bytes"] * 34
    assert all(r["tokens_per_second"] > 0 for r in q8["results"])
    bad = cli("bench", "-m", str(smollm2_path), "-ctk", "q4_0")
    assert bad.returncode != 0 and "q4_0" in bad.stderr


@pytest.mark.slow
def test_bench_table(smollm2_path):
    out = cli("bench", "-m", str(smollm2_path), "-p", "16", "-n", "0", "-r", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("| model") and "t/s" in lines[0]
    assert len(lines) == 3 and "pp16" in lines[2] and "±" in lines[2]


def test_bench_usage_errors(tmp_path):
    out = cli("bench", "-m", str(tmp_path / "x.gguf"), "-p", "0", "-n", "0")
    assert out.returncode == 2 and "nothing to measure" in out.stderr and "Traceback" not in out.stderr
    out = cli("bench", "-m", str(tmp_path / "x.gguf"), "-r", "0")
    assert out.returncode == 2 and "-r 0" in out.stderr
    out = cli("bench", "-m", str(tmp_path / "missing.gguf"), "-p", "8", "-n", "0")
    assert out.returncode != 0 and "no such file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_bench_a_name_from_an_empty_store(smollm2_path, tmp_path):
    """`bench smollm2` takes the road `run` takes: an empty store, the model pulled (here from a folder,
    verified against the manifest), then measured; the plan goes to stderr, the JSON to stdout."""
    env = {**os.environ, "PIPX_LLAMA_HOME": str(tmp_path / "home"),
           "PIPX_LLAMA_CONFIG_DIR": str(tmp_path / "c")}
    out = subprocess.run([sys.executable, "-m", "pipx_llama.cli", "bench", "smollm2", "--offline",
                          "--from-dir", str(smollm2_path.parent), "-p", "8", "-n", "2", "-r", "1", "-t", "1",
                          "--json"], capture_output=True, text=True, timeout=600, check=False, env=env)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert [r["test"] for r in info["results"]] == ["pp8", "tg2"]
    assert info["size_bytes"] == smollm2_path.stat().st_size
    stored = list((tmp_path / "home").rglob("*.gguf"))
    assert [p.stat().st_size for p in stored] == [smollm2_path.stat().st_size], stored
    assert "pipx-llama will prepare smollm2" in out.stderr
