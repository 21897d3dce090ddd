"""Acceptance tests of ``pipx-llama serve``: a live server on the real SmolLM2 model.

The server runs as a subprocess (``python -m pipx_llama.cli serve``) on a free loopback port, with an
API key, a 512-token context, ``--max-queue 2`` and a 64 KiB body limit so each limit can be hit
cheaply. Clients: the official ``openai`` package (plain and streaming, chat and completions, checked
against the engine's own greedy ``generate()``), and raw httpx for the error cases, the SSE/NDJSON
framing, cancellation on disconnect and the queue limit. The server's log (one line per request,
matched by the ``X-Request-Id`` header) shows what happened to each generation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from greedy import QUESTION

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
N_CTX = 512
MESSAGES = [{"role": "user", "content": QUESTION}]  # no near-tie in its answer (greedy.py)
PROMPT = "The capital of France is"
N = 8  # tokens per checked answer: enough to compare, cheap on a loaded machine


@dataclass
class Live:
    url: str
    proc: subprocess.Popen
    log: list[str] = field(default_factory=list)

    def record(self, request_id: str, timeout: float = 30.0) -> dict[str, str]:
        """The server's log line for a finished request, as key=value pairs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.log):
                if request_id in line and "finish=" in line:
                    return dict(re.findall(r"(\w+)=(\S+)", line))
            time.sleep(0.05)
        raise AssertionError(f"no log line for {request_id}; log tail:\n" + "\n".join(self.log[-20:]))


def _start(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PIPX_LLAMA_API_KEY"}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "pipx_llama.cli", "serve", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)


@pytest.fixture(scope="module")
def live(smollm2_path: Path) -> Iterator[Live]:
    # one thread: numba's parallel kernels crawl when another process holds a core (shared CI machines)
    proc = _start(["-m", str(smollm2_path), "--port", "0", "-c", str(N_CTX), "--api-key", KEY,
                   "--max-queue", "2", "--max-body", "64K", "--preload", "-t", "1", "--slots", "1"])
    log: list[str] = []
    found = threading.Event()
    url = []

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
    server = Live(url[0], proc, log)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("the server never answered /health:\n" + "\n".join(log))
        time.sleep(0.1)
    yield server
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(live: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model_name(smollm2_path: Path) -> str:
    return smollm2_path.name.removesuffix(".gguf")


@pytest.fixture(scope="module")
def reference(smollm2_path: Path) -> dict[str, object]:
    """The engine's own greedy answers, computed in this process."""
    from pipx_llama.engine.generate import generate
    from pipx_llama.engine.model import load_model
    from pipx_llama.engine.sampler import GREEDY

    model = load_model(smollm2_path, threads=1)
    ctx = model.new_context(N_CTX)
    chat = generate(ctx, model.tokenizer.chat_prompt(MESSAGES), max_tokens=N, sampler=GREEDY)
    chat_text = "".join(p.text for p in chat)
    comp = generate(ctx, PROMPT, max_tokens=N, sampler=GREEDY)
    comp_text = "".join(p.text for p in comp)
    return {"chat": chat_text, "chat_stats": chat.stats, "completion": comp_text,
            "completion_stats": comp.stats}


# -- the official client -------------------------------------------------------------------------------


def test_models(client: openai.OpenAI, model_name: str) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [model_name]
    assert client.models.retrieve(model_name).owned_by == "pipx-llama"


def test_chat_matches_engine(client: openai.OpenAI, model_name: str, reference: dict) -> None:
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=N, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model_name
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reference["chat"]
    stats = reference["chat_stats"]
    assert choice.finish_reason == ("length" if stats.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == stats.n_prompt
    assert r.usage.completion_tokens == stats.n_generated
    assert r.usage.total_tokens == stats.n_prompt + stats.n_generated


def test_chat_stream_matches_engine(client: openai.OpenAI, model_name: str, reference: dict) -> None:
    stream = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=N, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["chat"]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if reference["chat_stats"].finish_reason == "length" else "stop"]
    assert (chunks[-1].choices == []
            and chunks[-1].usage.completion_tokens == reference["chat_stats"].n_generated)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_matches_engine(client: openai.OpenAI, model_name: str, reference: dict) -> None:
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == reference["completion"]
    assert r.usage.prompt_tokens == reference["completion_stats"].n_prompt
    stream = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=N, temperature=0,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == reference["completion"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    echoed = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=N, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == PROMPT + reference["completion"]


def test_stop_and_seed(client: openai.OpenAI, model_name: str, reference: dict) -> None:
    full = reference["completion"]
    stop = full.strip().split()[1] if len(full.split()) > 1 else None
    if stop:
        r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=N, temperature=0,
                                      stop=[stop])
        assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7,
                                      top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_logit_bias_bans_and_forces_tokens(http: httpx.Client, model_name: str, smollm2_path: Path,
                                          reference: dict) -> None:
    from pipx_llama.engine.generate import generate
    from pipx_llama.engine.model import load_model
    from pipx_llama.engine.sampler import GREEDY

    model = load_model(smollm2_path, threads=1)
    ctx = model.new_context(N_CTX)
    greedy = next(iter(generate(ctx, PROMPT, max_tokens=1, sampler=GREEDY))).token
    zebra = model.tokenizer.encode(" zebra")[0]

    def answer(bias: dict[int, float]) -> str:
        body = {"model": model_name, "prompt": PROMPT, "max_tokens": N, "temperature": 0,
                "logit_bias": {str(k): v for k, v in bias.items()}}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    banned = dataclasses.replace(GREEDY, logit_bias=((greedy, -100.0),))
    expected = "".join(p.text for p in generate(ctx, PROMPT, max_tokens=N, sampler=banned))
    assert answer({greedy: -100}) == expected != reference["completion"]
    assert answer({zebra: 100}) == model.tokenizer.token_to_piece(zebra).decode() * N


# -- raw HTTP: framing -----------------------------------------------------------------------------------


def test_sse_framing(http: httpx.Client, model_name: str) -> None:
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith("data: ")
        json.loads(ev[len("data: "):])


def test_ollama(http: httpx.Client, model_name: str, reference: dict) -> None:
    tags = http.get("/api/tags").json()["models"]
    assert tags[0]["name"] == model_name and tags[0]["details"]["format"] == "gguf"
    options = {"temperature": 0, "num_predict": N}
    r = http.post("/api/chat", json={"model": model_name + ":latest", "messages": MESSAGES, "stream": False,
                                     "options": options})
    assert r.status_code == 200
    out = r.json()
    assert out["message"] == {"role": "assistant", "content": reference["chat"]} and out["done"] is True
    assert out["eval_count"] == reference["chat_stats"].n_generated
    with http.stream("POST", "/api/chat",
                     json={"model": model_name, "messages": MESSAGES, "options": options}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert all(x["done"] is False for x in lines[:-1]) and lines[-1]["done"] is True
    assert "".join(x["message"]["content"] for x in lines) == reference["chat"]
    gen = http.post("/api/generate",
                    json={"model": model_name, "prompt": PROMPT, "raw": True, "stream": False,
                          "options": options}).json()
    assert gen["response"] == reference["completion"] and gen["done_reason"] in ("stop", "length")
    assert isinstance(gen["context"], list)


def test_health_needs_no_key(live: Live) -> None:
    r = httpx.get(live.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_cors(live: Live) -> None:
    pre = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(live.url + "/v1/chat/completions", headers={"Origin": "http://localhost:5173", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:5173"
    bad = httpx.options(live.url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **pre})
    assert "access-control-allow-origin" not in bad.headers


# -- raw HTTP: every error case --------------------------------------------------------------------------


def _error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err["message"]


def test_auth(live: Live, model_name: str) -> None:
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 1}
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    _error(r, 401, code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    _error(httpx.post(live.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer wrong"}),
           401, code="invalid_api_key")
    _error(httpx.get(live.url + "/v1/models"), 401)
    r = httpx.get(live.url + "/api/tags")
    assert r.status_code == 401 and isinstance(r.json()["error"], str)  # Ollama's error shape on /api
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_bad_requests(http: httpx.Client, model_name: str) -> None:
    url = "/v1/chat/completions"
    hdr = {"Content-Type": "application/json"}
    _error(http.post(url, content=b"{not json", headers=hdr), 400)
    _error(http.post(url, content=b"", headers=hdr), 400)
    _error(http.post(url, content=b"[1, 2]", headers=hdr), 400)
    ok = {"model": model_name, "messages": MESSAGES, "max_tokens": 1}
    for field_, value in [("temperature", 3), ("temperature", "hot"), ("top_p", 1.5), ("max_tokens", 0),
                          ("max_tokens", 2.5), ("stop", [""]), ("stop", 5), ("messages", []),
                          ("messages", [{"role": "wizard", "content": "hi"}]), ("n", 2), ("logprobs", True),
                          ("stream", "yes"), ("seed", "x"), ("presence_penalty", 9)]:
        r = http.post(url, json={**ok, field_: value})
        _error(r, 400)
        assert (r.json()["error"]["param"] or "").startswith(field_), (field_, value, r.text)
    _error(http.post(url, json={**ok, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
           400, code="unsupported_parameter")
    _error(http.post(url, json={**ok, "logit_bias": {"49152": -100}}), 400, param="logit_bias")
    _error(http.post("/v1/completions", json={"model": model_name, "prompt": 42}), 400, param="prompt")
    _error(http.post("/v1/completions", json={"model": model_name, "prompt": [10 ** 9]}), 400, param="prompt")


def test_max_tokens_beyond_context(http: httpx.Client, model_name: str) -> None:
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": N_CTX}
    msg = _error(http.post("/v1/chat/completions", json=body), 400, param="max_tokens",
                 code="context_length_exceeded")
    assert str(N_CTX) in msg
    long_prompt = "word " * (N_CTX + 10)
    _error(http.post("/v1/completions", json={"model": model_name, "prompt": long_prompt, "max_tokens": 1}),
           400, code="context_length_exceeded")


def test_unknown_model(http: httpx.Client) -> None:
    _error(http.post("/v1/chat/completions", json={"model": "gpt-17", "messages": MESSAGES}), 404,
           param="model", code="model_not_found")
    _error(http.get("/v1/models/gpt-17"), 404, code="model_not_found")
    r = http.post("/api/chat", json={"model": "gpt-17", "messages": MESSAGES})
    assert r.status_code == 404 and "gpt-17" in r.json()["error"]
    _error(http.post("/v1/embeddings", json={}), 404)


def test_body_limit(http: httpx.Client, model_name: str) -> None:
    big = {"model": model_name, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}
    _error(http.post("/v1/chat/completions", json=big), 413, code="request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}]}'

    _error(http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}),
           413, code="request_too_large")


def test_web_pages_of_other_sites_cannot_make_it_generate(live: Live, model_name: str) -> None:
    """A page may POST text/plain anywhere without asking; the server refuses before touching the model."""
    body = json.dumps({"model": model_name, "messages": MESSAGES, "max_tokens": 1})
    r = httpx.post(live.url + "/v1/chat/completions", content=body,
                   headers={**AUTH, "Content-Type": "text/plain"})
    _error(r, 415, code="unsupported_media_type")
    r = httpx.post(live.url + "/v1/chat/completions", content=body,
                   headers={**AUTH, "Content-Type": "application/json", "Origin": "https://evil.example"})
    _error(r, 403, code="origin_not_allowed")
    r = httpx.post(live.url + "/api/generate", content=body,
                   headers={**AUTH, "Content-Type": "application/json", "Origin": "null"})
    assert r.status_code == 403 and "--cors-origin" in r.json()["error"]


def test_hostile_numbers_and_nesting_are_400s(http: httpx.Client, model_name: str) -> None:
    hdr = {"Content-Type": "application/json"}
    msgs = json.dumps(MESSAGES)
    for route, body, param in [
        ("/v1/chat/completions", f'{{"messages": {msgs}, "temperature": {"9" * 400}}}', "temperature"),
        ("/v1/chat/completions", f'{{"messages": {msgs}, "max_tokens": {"9" * 400}}}', "max_tokens"),
        ("/v1/completions", f'{{"prompt": "x", "seed": -{"9" * 400}}}', "seed"),
    ]:
        msg = _error(http.post(route, content=body.encode(), headers=hdr), 400, param=param)
        assert len(msg) < 200
    r = http.post("/api/chat",
                  content=f'{{"messages": {msgs}, "options": {{"top_k": {"9" * 400}}}}}'.encode(),
                  headers=hdr)
    assert r.status_code == 400 and "options.top_k" in r.json()["error"]
    _error(http.post("/v1/chat/completions", content=b"[" * 50_000, headers=hdr), 400)
    for stream in (False, True):
        r = http.post("/api/generate", json={"model": model_name, "prompt": "hi", "context": [10 ** 6],
                                             "stream": stream})
        assert r.status_code == 400 and "context" in r.json()["error"]


def test_host_check(live: Live) -> None:
    r = httpx.get(live.url + "/health", headers={"Host": "attacker.example"})
    assert r.status_code == 403


# -- cancellation and the queue --------------------------------------------------------------------------


COUNTING = "1, 2, 3, 4, 5,"  # greedy SmolLM2 goes on counting: a long answer that never stops by itself


def _open_stream(http: httpx.Client, model_name: str, max_tokens: int) -> tuple[object, httpx.Response]:
    body = {"model": model_name, "prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    cm = http.stream("POST", "/v1/completions", json=body)
    return cm, cm.__enter__()


def _is_text(line: str) -> bool:
    return line.startswith("data: {") and '"text":"' in line and '"text":""' not in line


def test_disconnect_cancels_generation(live: Live, http: httpx.Client, model_name: str) -> None:
    max_tokens = N_CTX - 64
    cm, r = _open_stream(http, model_name, max_tokens)
    rid = r.headers["x-request-id"]
    got = 0
    lines = r.iter_lines()
    for line in lines:
        if _is_text(line):
            got += 1
            if got == 3:
                break
    cm.__exit__(None, None, None)  # the client goes away mid-answer
    rec = live.record(rid)
    print(f"server record of the disconnected request: {rec}")
    assert rec["finish"] == "cancelled"
    generated = int(rec["generated"].split("/")[0])
    assert 3 <= generated < max_tokens // 4, rec
    assert httpx.get(live.url + "/health").json()["requests"]["cancelled"] >= 1


def test_disconnect_cancels_plain_request(live: Live, model_name: str) -> None:
    """A client that gives up on a non-streamed answer also stops its generation."""
    max_tokens = N_CTX - 65  # unique: finds this request's log line
    body = {"model": model_name, "prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 30
    while not [x for x in live.log if f"/{max_tokens} finish=" in x] and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(x for x in live.log if f"/{max_tokens} finish=" in x)
    rec = dict(re.findall(r"(\w+)=(\S+)", line))
    assert rec["finish"] == "cancelled" and int(rec["generated"].split("/")[0]) < max_tokens // 2, rec


def test_queue_full_503(live: Live, http: httpx.Client, model_name: str) -> None:
    running, r0 = _open_stream(http, model_name, N_CTX - 64)
    lines = r0.iter_lines()  # kept referenced: a collected line iterator would close the stream
    for line in lines:  # wait until it is generating
        if _is_text(line):
            break
    waiting = [_open_stream(http, model_name, 4) for _ in range(2)]  # --max-queue 2
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 4}
    r = http.post("/v1/chat/completions", json=body)
    _error(r, 503, code="server_busy")
    assert int(r.headers["retry-after"]) >= 1
    ids = [w[1].headers["x-request-id"] for w in waiting]
    for cm, _ in waiting:
        cm.__exit__(None, None, None)
    time.sleep(0.5)  # let the server see those two go before the running one frees the engine
    running.__exit__(None, None, None)
    for rid in ids:  # dropped before they started
        rec = live.record(rid)
        assert rec["finish"] == "cancelled" and rec["generated"].startswith("0/")
    health = httpx.get(live.url + "/health").json()
    assert health["requests"]["rejected"] >= 1


# -- the command line ------------------------------------------------------------------------------------


def test_refuses_public_bind_without_key(smollm2_path: Path) -> None:
    proc = _start(["-m", str(smollm2_path), "--host", "0.0.0.0", "--port", "0"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "without an API key" in err


@pytest.mark.parametrize("flag,value", [("--header-timeout", "0"), ("--body-timeout", "-1"),
                                        ("--body-timeout", "nan"), ("--max-connections", "0")])
def test_refuses_bad_limits(smollm2_path: Path, flag: str, value: str) -> None:
    proc = _start(["-m", str(smollm2_path), "--port", "0", flag, value])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"{flag} must be" in err, err


def test_port_in_use(live: Live, smollm2_path: Path) -> None:
    port = live.url.rsplit(":", 1)[1]
    proc = _start(["-m", str(smollm2_path), "--port", port])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "cannot listen" in err


def test_ps_shows_the_loaded_model(live: Live, model_name: str) -> None:
    """`GET /api/ps` (Ollama's shape) lists the preloaded model; `pipx-llama ps` shows it."""
    r = httpx.get(live.url + "/api/ps", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    (m,) = r.json()["models"]
    assert m["name"] == model_name and m["details"]["quantization_level"] == "Q4_1"
    assert m["context_length"] == N_CTX and m["size"] == 98362432 + m["kv_cache_bytes"] > 98362432
    assert m["loaded_at"].endswith("Z")
    env = {**os.environ, "PIPX_LLAMA_API_KEY": KEY, "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "pipx_llama.cli", "ps", "--url", live.url], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == ["NAME", "QUANT", "MEMORY", "CONTEXT", "LOADED"]
    assert row.split()[:2] == [model_name, "Q4_1"] and row.endswith("ago")
    env.pop("PIPX_LLAMA_API_KEY")
    out = subprocess.run([sys.executable, "-m", "pipx_llama.cli", "ps", "--url", live.url], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0 and "wants an API key" in out.stderr
