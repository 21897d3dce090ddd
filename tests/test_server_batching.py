"""Continuous batching in ``pipx-llama serve``: a live server on the real SmolLM2 with 4 parallel slots.

Concurrent greedy requests must get exactly what each gets alone: the batched pass gives every sequence
the bits of its own pass (tests/test_batch.py), so this compares with the same server's single-request
answers, whatever side of a near-tie this CPU takes. A client that disconnects mid-stream frees its slot
at the next step while the others go on.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_server import AUTH, KEY, Live, _start

pytestmark = pytest.mark.slow

N_CTX = 512
PARALLEL = 4
# different prompts and lengths: prompts of 3 to ~60 tokens, answers of 5 to 24 tokens
PROMPTS = [
    ("The capital of France is", 12),
    ("1, 2, 3, 4, 5,", 24),
    ("Once upon a time", 9),
    ("def fibonacci(n):", 16),
    ("The three primary colors are " * 6, 7),
    ("Water boils at", 20),
    ("Q: What is two plus two?\nA:", 5),
    ("In the beginning " * 10, 14),
]


@pytest.fixture(scope="module")
def live(smollm2_path: Path) -> Iterator[Live]:
    proc = _start(["-m", str(smollm2_path), "--port", "0", "-c", str(N_CTX), "--api-key", KEY,
                   "--max-queue", "8", "--preload", "-t", "2", "--slots", str(PARALLEL)])
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            m = re.search(r"serving .* at (http://\S+)", line)
            if m:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(120):
        proc.kill()
        raise AssertionError("the server did not start:\n" + "\n".join(log))
    yield Live(url[0], proc, log)
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def model_name(smollm2_path: Path) -> str:
    return smollm2_path.name.removesuffix(".gguf")


def _complete(live: Live, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(live.url + "/v1/completions", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "finish": choice["finish_reason"], "id": r.headers["x-request-id"]}


def test_the_server_keeps_parallel_slots(live: Live) -> None:
    assert any(f"{PARALLEL} parallel slots" in line for line in live.log), live.log[-5:]


def test_concurrent_greedy_requests_equal_their_single_answers(live: Live, model_name: str) -> None:
    alone = [_complete(live, model_name, p, n) for p, n in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda pn: _complete(live, model_name, *pn), PROMPTS))
    for (prompt, _), a, b in zip(PROMPTS, alone, together):
        assert (b["text"], b["finish"]) == (a["text"], a["finish"]), prompt
    # they did run together: some job started while another was running (its wait is under the others' run)
    recs = [live.record(b["id"]) for b in together]
    assert sum(float(r["wait"].rstrip("s")) < 0.5 for r in recs) >= 2, recs


def test_a_client_gone_mid_stream_frees_its_slot_and_the_others_finish(live: Live, model_name: str) -> None:
    others = PROMPTS[:3]
    alone = [_complete(live, model_name, p, n) for p, n in others]
    leaver: dict[str, str] = {}

    def leave() -> None:
        body = {"model": model_name, "prompt": "1, 2, 3, 4, 5,", "max_tokens": N_CTX - 100, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, headers=AUTH, timeout=300) as r:
            leaver["id"] = r.headers["x-request-id"]
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    seen += 1
                    if seen == 3:
                        return  # closes the connection mid-stream

    t = threading.Thread(target=leave)
    t.start()
    with ThreadPoolExecutor(len(others)) as pool:
        together = list(pool.map(lambda pn: _complete(live, model_name, *pn), others))
    t.join(120)
    for a, b in zip(alone, together):
        assert (b["text"], b["finish"]) == (a["text"], a["finish"])
    rec = live.record(leaver["id"])
    assert rec["finish"] == "cancelled" and int(rec["generated"].split("/")[0]) < N_CTX - 100
    deadline = time.monotonic() + 30
    while httpx.get(live.url + "/health").json()["queue"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(live.url + "/health").json()["queue"]["running"] == 0


def test_a_slot_keeps_its_prefix_for_the_next_request(live: Live, model_name: str) -> None:
    prompt = "A long shared preamble that a chat's next turn repeats. " * 4
    first = _complete(live, model_name, prompt, 3)
    second = _complete(live, model_name, prompt + first["text"] + " And then", 3)
    rec = live.record(second["id"])
    assert int(rec["cached"]) >= int(live.record(first["id"])["prompt"]) - 1, rec
