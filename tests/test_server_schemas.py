"""Request validation and response shapes of the server, without a model (fast unit tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from pipx_llama.cli.serve_cmd import _size, is_loopback
from pipx_llama.engine.generate import GenerationStats
from pipx_llama.engine.sampler import SamplerConfig
from pipx_llama.errors import UsageError
from pipx_llama.server import ModelRegistry, ModelSpec, ServerSettings, create_app, schemas
from pipx_llama.server.errors import APIError
from pipx_llama.server.tools import ToolCall

MSG = [{"role": "user", "content": "hi"}]


def _fails(fn, body, param=None, status=400) -> APIError:
    with pytest.raises(APIError) as info:
        fn(body)
    assert info.value.status == status
    if param is not None:
        assert info.value.param == param
    return info.value


def test_chat_fields() -> None:
    r = schemas.parse_chat({"model": "m", "messages": MSG, "temperature": 0, "top_p": 0.5, "max_tokens": 9,
                            "stop": "END", "seed": -1, "stream": True,
                            "stream_options": {"include_usage": True},
                            "presence_penalty": 0.5, "frequency_penalty": -0.5, "user": "ignored", "n": 1,
                            "logprobs": False, "tools": [], "response_format": {"type": "text"}})
    assert (r.model, r.max_tokens, r.stop, r.stream, r.include_usage) == ("m", 9, ("END",), True, True)
    assert r.sampling == {"temperature": 0.0, "top_p": 0.5, "presence_penalty": 0.5,
                          "frequency_penalty": -0.5, "seed": 2 ** 64 - 1}
    assert schemas.parse_chat({"messages": MSG, "max_completion_tokens": 3, "max_tokens": 5}).max_tokens == 3
    assert schemas.parse_chat({"messages": MSG}).max_tokens is None  # until the context is full


def test_chat_messages() -> None:
    r = schemas.parse_chat({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]})
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                          {"role": "assistant", "content": ""}]
    _fails(schemas.parse_chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
           "messages[0].content[0].type")
    _fails(schemas.parse_chat, {"messages": [{"content": "x"}]}, "messages[0].role")
    _fails(schemas.parse_chat, {"messages": ["hi"]})
    _fails(schemas.parse_chat, {"messages": "hi"}, "messages")


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", float("inf")), ("temperature", True), ("top_p", 2),
    ("max_tokens", -5),
    ("max_tokens", "9"), ("stop", ["a"] * 17), ("stop", [1]), ("seed", 1.5), ("n", 3), ("best_of", 2),
    ("logit_bias", {"x": 5}), ("logit_bias", {"1": 101}), ("logit_bias", {"1": "5"}), ("logit_bias", [1]),
    ("logit_bias", {"-1": 5}), ("logit_bias", {str(i): 1 for i in range(1025)}), ("logprobs", True),
    ("top_logprobs", 2), ("tools", [{"type": "function"}]),
    ("response_format", {"type": "xml"}),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": 5}}),
    ("tool_choice", "required"), ("tool_choice", {"type": "function", "function": {"name": "nope"}}),
    ("parallel_tool_calls", "yes"), ("functions", [{"name": "f"}]),
    ("stream_options", "yes"), ("frequency_penalty", -3),
])
def test_chat_rejects(field: str, value: object) -> None:
    err = _fails(schemas.parse_chat, {"messages": MSG, field: value})
    assert err.param.startswith(field)


def test_logit_bias_becomes_sorted_pairs() -> None:
    r = schemas.parse_chat({"messages": MSG, "logit_bias": {"17": -100, "2": 3.5}})
    assert r.sampler(SamplerConfig()).logit_bias == ((2, 3.5), (17, -100.0))
    assert "logit_bias" not in schemas.parse_chat({"messages": MSG, "logit_bias": {}}).sampling
    r = schemas.parse_completion({"prompt": "x", "logit_bias": {"0": 0}})
    assert r.sampling["logit_bias"] == ((0, 0.0),)


def test_completion_prompts() -> None:
    assert schemas.parse_completion({"prompt": "x"}).prompt == "x"
    assert schemas.parse_completion({"prompt": ["x"]}).prompt == "x"
    assert schemas.parse_completion({"prompt": [1, 2]}).prompt == [1, 2]
    assert schemas.parse_completion({"prompt": [[1, 2]]}).prompt == [1, 2]
    assert schemas.parse_completion({"prompt": "x"}).max_tokens == schemas.COMPLETIONS_DEFAULT_MAX_TOKENS
    assert schemas.parse_completion({"prompt": "x", "echo": True}).echo
    _fails(schemas.parse_completion, {"prompt": ["a", "b"]}, "prompt")
    _fails(schemas.parse_completion, {"prompt": None}, "prompt")
    _fails(schemas.parse_completion, {"prompt": [True]}, "prompt")
    _fails(schemas.parse_completion, {"prompt": "x", "suffix": "y"}, "suffix")
    _fails(schemas.parse_completion, [], None)


def test_sampler_merge() -> None:
    base = SamplerConfig(temperature=0.8, top_k=40)
    cfg = schemas.parse_chat({"messages": MSG, "temperature": 0.2}).sampler(base)
    assert (cfg.temperature, cfg.top_k) == (0.2, 40)
    greedy = schemas.parse_chat({"messages": MSG, "top_p": 0}).sampler(base)
    assert (greedy.top_p, greedy.top_k) == (1.0, 1)
    bad = schemas.GenRequest(model=None, sampling={"repeat_penalty": 0.0})
    with pytest.raises(APIError):
        bad.sampler(base)


def test_ollama_requests() -> None:
    r = schemas.parse_ollama_generate({"model": "m", "prompt": "p", "system": "s",
                                       "options": {"num_predict": 5, "temperature": 0, "top_k": 3,
                                                   "stop": ["x"], "seed": 4, "num_ctx": 2048}})
    assert r.stream and r.max_tokens == 5 and r.stop == ("x",)
    assert r.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}]
    assert r.sampling == {"temperature": 0.0, "top_k": 3, "seed": 4}
    raw = schemas.parse_ollama_generate({"prompt": "p", "raw": True, "stream": False, "context": [1, 2],
                                         "options": {"num_predict": -1}})
    assert ((raw.prompt, raw.messages, raw.stream, raw.context, raw.max_tokens)
            == ("p", None, False, [1, 2], None))
    load_only = schemas.parse_ollama_chat({"model": "m", "messages": []})
    assert load_only.messages is None and load_only.prompt is None
    _fails(schemas.parse_ollama_generate, {"prompt": "p", "format": "yaml"}, "format")
    _fails(schemas.parse_ollama_generate, {"prompt": "p", "context": ["a"]}, "context")
    _fails(schemas.parse_ollama_chat, {"messages": [{"role": "user", "content": "x", "images": ["AA=="]}]})


def test_response_shapes() -> None:
    stats = GenerationStats(n_prompt=10, n_prompt_evaluated=4, n_generated=3, finish_reason="length")
    c = schemas.chat_completion("chatcmpl-1", 5, "m", "hey", stats)
    assert c["choices"][0]["message"]["content"] == "hey" and c["choices"][0]["finish_reason"] == "length"
    assert c["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                          "prompt_tokens_details": {"cached_tokens": 6}}
    chunk = schemas.chat_chunk("chatcmpl-1", 5, "m", {"content": "x"}, None, include_usage=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert "usage" not in schemas.completion_chunk("cmpl-1", 5, "m", "x", None, include_usage=False)
    assert schemas.usage_chunk("cmpl-1", 5, "m", "text_completion", stats)["choices"] == []
    stop = GenerationStats(finish_reason="stop")
    assert schemas.completion("cmpl-1", 5, "m", "x", stop)["choices"][0]["finish_reason"] == "stop"
    final = schemas.ollama_final(stats, 1.5, 0.25)
    assert final["done"] and final["total_duration"] == 1_500_000_000 and final["eval_count"] == 3
    assert schemas.ollama_time(0) == "1970-01-01T00:00:00Z"


def test_registry_names(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    reg = ModelRegistry([ModelSpec("Alpha", a, aliases=("a.gguf",)), ModelSpec("beta", b)])
    assert reg.find("alpha").name == "Alpha" and reg.find("a.gguf").name == "Alpha"
    assert reg.find("beta:latest").name == "beta"
    assert _fails(reg.find, "gamma", "model", status=404).code == "model_not_found"
    _fails(reg.find, None, "model")  # several models: the request must name one
    assert ModelRegistry([ModelSpec("one", a)]).find(None).name == "one"
    with pytest.raises(UsageError):
        ModelRegistry([ModelSpec("x", a), ModelSpec("y", b, aliases=("X",))])
    with pytest.raises(UsageError):
        ModelRegistry([])


def test_guards_without_a_model(tmp_path: Path) -> None:
    """Auth, Host check, body limit and JSON errors answer before any model is touched."""
    reg = ModelRegistry([ModelSpec("m", tmp_path / "missing.gguf")])
    app = create_app(reg, ServerSettings(api_key="k", max_body_bytes=100, allowed_hosts=["testserver"]))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/api/tags").json() == {"error": "You didn't provide an API key. Send it as "
                                                      "'Authorization: Bearer KEY'."}
        auth = {"Authorization": "Bearer k"}
        json_auth = {**auth, "Content-Type": "application/json"}
        assert c.post("/v1/chat/completions", content=b"x" * 101, headers=json_auth).status_code == 413
        assert c.post("/v1/chat/completions", content=b"{", headers=json_auth).status_code == 400
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": MSG}, headers=auth)
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 403
        page = c.get("/")  # the chat page needs no key: it asks for one when the API answers 401
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_cli_helpers() -> None:
    assert _size("4Mi") == 4 << 20 and _size("512Ki") == 512 << 10 and _size("100") == 100
    assert _size("4M") == 4_000_000 and _size("1GiB") == 1 << 30  # the units every command uses
    for bad in ("x", "0", "-1K"):
        with pytest.raises(argparse.ArgumentTypeError):
            _size(bad)
    assert (is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
            and is_loopback("[::1]"))
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


# -- hostile values: every numeric field of every route ------------------------------------------------------

HUGE = 10 ** 400  # json.loads makes an int of it; float() of it overflows
NUMERIC = {  # parser -> fields holding a number, as (param, body)
    "chat": [(k, {"messages": MSG, k: HUGE}) for k in
             ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "top_k",
              "repeat_last_n", "repeat_penalty", "seed", "max_tokens", "max_completion_tokens")],
    "completion": [(k, {"prompt": "x", k: HUGE}) for k in ("temperature", "top_k", "seed", "max_tokens")],
    "ollama_generate": [(f"options.{k}", {"prompt": "p", "options": {k: HUGE}}) for k in
                        ("temperature", "top_p", "min_p", "top_k", "repeat_penalty", "repeat_last_n",
                         "presence_penalty", "frequency_penalty", "seed", "num_predict")],
    "ollama_chat": [(f"options.{k}", {"messages": MSG, "options": {k: HUGE}}) for k in
                    ("temperature", "top_k", "seed", "num_predict", "repeat_last_n")],
}
PARSERS = {"chat": schemas.parse_chat, "completion": schemas.parse_completion,
           "ollama_generate": schemas.parse_ollama_generate, "ollama_chat": schemas.parse_ollama_chat}


@pytest.mark.parametrize("kind,param,body", [(kind, param, body) for kind, cases in NUMERIC.items()
                                             for param, body in cases])
@pytest.mark.parametrize("sign", [1, -1])
def test_huge_numbers_are_400s_naming_the_field(kind: str, param: str, body: dict, sign: int) -> None:
    if sign < 0:
        body = {k: ({kk: -vv for kk, vv in v.items()} if k == "options" else -v if v is HUGE else v)
                for k, v in body.items()}
    err = _fails(PARSERS[kind], body, param)
    assert len(err.message) < 200, err.message  # the value is quoted cut short, not 400 digits


def test_int64_is_the_largest_number() -> None:
    assert schemas.parse_chat({"messages": MSG, "seed": 2 ** 63 - 1}).sampling["seed"] == 2 ** 63 - 1
    assert schemas.parse_chat({"messages": MSG, "seed": -(2 ** 63)}).sampling["seed"] == 2 ** 63
    _fails(schemas.parse_chat, {"messages": MSG, "seed": 2 ** 63}, "seed")
    _fails(schemas.parse_chat, {"messages": MSG, "top_k": 1e300}, "top_k")
    assert schemas.parse_chat({"messages": MSG, "top_k": 5.0}).sampling["top_k"] == 5


def test_quoted_values_stay_short() -> None:
    deep: list = []
    inner = deep
    for _ in range(5000):  # repr() of this would exceed the recursion limit
        inner.append([])
        inner = inner[0]
    for body in ({"messages": MSG, "temperature": deep}, {"messages": MSG, "stream": "x" * 100_000},
                 {"messages": [{"role": "r" * 100_000, "content": "x"}]},
                 {"messages": [{"role": "user", "content": [{"type": "t" * 100_000}]}]}):
        err = _fails(schemas.parse_chat, body)
        assert len(err.message) < 300, err.message[:400]


def _guarded_client(tmp_path: Path, **settings) -> TestClient:
    reg = ModelRegistry([ModelSpec("m", tmp_path / "missing.gguf")])
    return TestClient(create_app(reg, ServerSettings(**settings)))


JSON = {"Content-Type": "application/json"}


def test_deeply_nested_json_is_a_400(tmp_path: Path) -> None:
    with _guarded_client(tmp_path) as c:
        for body in (b"[" * 100_000, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                     b'{"a": ' * 20_000 + b"1" + b"}" * 20_000):
            r = c.post("/v1/chat/completions", content=body, headers=JSON)
            assert r.status_code == 400 and "deeply" in r.json()["error"]["message"], r.text[:300]
            r = c.post("/api/chat", content=body, headers=JSON)
            assert r.status_code == 400 and "deeply" in r.json()["error"], r.text[:300]


def test_huge_content_length_is_a_413(tmp_path: Path) -> None:
    with _guarded_client(tmp_path) as c:
        r = c.post("/v1/chat/completions", content=b"{}", headers={**JSON, "Content-Length": "9" * 5000})
        assert r.status_code == 413
        r = c.post("/v1/chat/completions", content=b"{}",
                   headers={**JSON, "Content-Length": "\u00b2".encode("latin-1")})
        assert r.status_code == 400


# -- requests from web pages -------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_post_needs_json_content_type(tmp_path: Path, content_type: str | None) -> None:
    """The content types a page may POST without a CORS preflight never reach the model."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    with _guarded_client(tmp_path) as c:
        r = c.post("/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = c.post("/api/generate", content=body, headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"]  # Ollama's shape
        ok = c.post("/v1/chat/completions", content=body,
                    headers={"Content-Type": "Application/JSON; charset=utf-8"})
        # got past the guard
        assert ok.status_code == 500 and ok.json()["error"]["code"] == "model_load_failed"


@pytest.mark.parametrize("origin,cors,allowed", [
    ("https://evil.example", [], False),
    ("null", [], False),
    ("http://localhost.evil.example", [], False),
    ("http://127.0.0.1.evil.example:8080", [], False),
    ("http://localhost:5173", [], True),
    ("http://127.0.0.1", [], True),
    ("http://[::1]:3000", [], True),
    ("http://testserver", [], True),  # the server's own page (same origin as Host)
    ("https://testserver", [], False),  # another scheme is another origin
    ("http://testserver:81", [], False),
    ("https://app.example", ["https://app.example"], True),
    ("https://app.example", ["https://other.example"], False),
    ("https://evil.example", ["*"], True),
])
def test_foreign_origins_are_refused(tmp_path: Path, origin: str, cors: list[str], allowed: bool) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with _guarded_client(tmp_path, cors_origins=cors) as c:
        r = c.post("/v1/chat/completions", json=body, headers={"Origin": origin})
        if allowed:
            assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
        else:
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
            assert "--cors-origin" in r.json()["error"]["message"]
            r = c.post("/api/chat", json=body, headers={"Origin": origin})
            assert r.status_code == 403 and isinstance(r.json()["error"], str)
        assert c.post("/v1/chat/completions", json=body).status_code == 500  # no Origin: not a web page


def test_preflight_from_a_foreign_origin_is_still_answered_by_cors(tmp_path: Path) -> None:
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with _guarded_client(tmp_path) as c:
        ok = c.options("/v1/chat/completions", headers={"Origin": "http://localhost:5173", **pre})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:5173"
        bad = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **pre})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers


@pytest.mark.parametrize("field,value",
                         [("temperature", 5e-324), ("temperature", 1e-300), ("repeat_penalty", 5e-324),
                          ("repeat_penalty", 1e300), ("repeat_penalty", 0)])
def test_sampling_values_that_overflow_the_sampler_are_refused(field: str, value: float) -> None:
    """Logits divided by these overflow to inf, and inf - inf made the sampler's probabilities NaN (a 500)."""
    _fails(schemas.parse_chat, {"messages": MSG, field: value}, field)
    _fails(schemas.parse_ollama_chat, {"messages": MSG, "options": {field: value}}, f"options.{field}")
    ok = schemas.parse_chat({"messages": MSG, "temperature": 1e-6, "repeat_penalty": 1.1})
    assert ok.sampler(SamplerConfig()).temperature == 1e-6


# -- structured output and tools --------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def test_response_formats() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = schemas.parse_chat({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "A", "schema": schema, "strict": True}}})
    assert (r.response_schema, r.response_param) == (schema, "response_format.json_schema.schema")
    r = schemas.parse_chat({"messages": MSG, "response_format": {"type": "json_object"}})
    assert (r.response_schema, r.response_param) == ({"type": "object"}, "response_format")
    assert schemas.parse_chat({"messages": MSG, "response_format": {"type": "text"}}).response_schema is None
    assert schemas.parse_completion({"prompt": "x",
                                     "response_format": {"type": "json_object"}}).response_schema
    r = schemas.parse_ollama_chat({"messages": MSG, "format": "json"})
    assert (r.response_schema, r.response_param) == ({"type": "object"}, "format")
    assert schemas.parse_ollama_generate({"prompt": "p", "format": schema}).response_schema == schema
    assert schemas.parse_ollama_generate({"prompt": "p", "format": ""}).response_schema is None
    _fails(schemas.parse_chat,
           {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": "x"}},
           "response_format.json_schema")
    _fails(schemas.parse_chat, {"messages": MSG, "response_format": {}}, "response_format.type")


def test_tools_and_tool_choice() -> None:
    r = schemas.parse_chat({"messages": MSG,
                            "tools": [WEATHER, {"type": "function", "function": {"name": "now"}}],
                            "tool_choice": {"type": "function", "function": {"name": "now"}},
                            "parallel_tool_calls": False})
    assert [t["function"]["name"] for t in r.tools] == ["get_weather", "now"]
    assert r.tools[1]["function"]["parameters"] == {"type": "object",
                                                    "properties": {}}  # none given: no arguments
    assert (r.tool_choice.mode, r.tool_choice.name, r.parallel_tool_calls) == ("function", "now", False)
    r = schemas.parse_chat({"messages": MSG, "tools": [WEATHER]})
    assert (r.tool_choice.mode, r.parallel_tool_calls) == ("auto", True)
    assert schemas.parse_chat({"messages": MSG, "tools": [WEATHER],
                               "tool_choice": "required"}).tool_choice.mode \
        == "required"
    assert schemas.parse_chat({"messages": MSG, "tools": []}).tools is None
    ollama = schemas.parse_ollama_chat({"messages": MSG, "tools": [{"function": WEATHER["function"]}]})
    assert ollama.tools == [WEATHER]  # Ollama clients may leave out "type"
    bad_name = {"type": "function", "function": {"name": "no spaces"}}
    _fails(schemas.parse_chat, {"messages": MSG, "tools": [bad_name]}, "tools[0].function.name")
    _fails(schemas.parse_chat, {"messages": MSG, "tools": [WEATHER, WEATHER]}, "tools[1].function.name")
    _fails(schemas.parse_chat, {"messages": MSG, "tools": [WEATHER] * 129}, "tools")
    _fails(schemas.parse_chat, {"messages": MSG, "tools": [{"type": "code_interpreter"}]}, "tools[0].type")
    _fails(schemas.parse_chat, {"messages": MSG, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "x"}}]}, "tools[0].function.parameters")
    _fails(schemas.parse_chat, {"messages": MSG, "tools": [WEATHER], "tool_choice": "sometimes"},
           "tool_choice")
    # a response format applies to the answer; with tools the answer may be a call
    err = _fails(schemas.parse_chat,
                 {"messages": MSG, "tools": [WEATHER], "response_format": {"type": "json_object"}},
                 "response_format")
    assert err.code == "unsupported_parameter"
    assert schemas.parse_chat({"messages": MSG, "tools": [WEATHER], "tool_choice": "none",
                               "response_format": {"type": "json_object"}}).response_schema
    _fails(schemas.parse_ollama_chat, {"messages": MSG, "tools": [WEATHER], "format": "json"}, "format")


def test_tool_messages() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    r = schemas.parse_chat({"messages": [*MSG, {"role": "assistant", "content": None, "tool_calls": [call]},
                                         {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]})
    assert r.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert r.messages[2] == {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"}
    r = schemas.parse_ollama_chat({"messages": [*MSG, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "-3 C"}]})
    assert r.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert r.messages[2]["name"] == "get_weather"
    bad = {**call, "function": {"name": "get_weather", "arguments": "{not json"}}
    _fails(schemas.parse_chat, {"messages": [*MSG, {"role": "assistant", "tool_calls": [bad]}]},
           "messages[1].tool_calls[0].function.arguments")
    _fails(schemas.parse_chat, {"messages": [*MSG, {"role": "assistant", "tool_calls": [{"id": "x"}]}]},
           "messages[1].tool_calls[0].function")


def test_tool_call_responses() -> None:
    call = ToolCall("call_9", "get_weather", '{"city": "Oslo"}')
    c = schemas.chat_completion("chatcmpl-1", 5, "m", "\n", GenerationStats(finish_reason="stop"), [call])
    choice = c["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [{"id": "call_9", "type": "function",
                                                "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Oslo"}'}}]
    first, rest = schemas.tool_call_deltas(2, call)
    assert first["tool_calls"][0] == {"index": 2, "id": "call_9", "type": "function",
                                      "function": {"name": "get_weather", "arguments": ""}}
    assert rest["tool_calls"][0] == {"index": 2, "function": {"arguments": '{"city": "Oslo"}'}}
    assert schemas.ollama_tool_calls([call]) == [{"function": {"name": "get_weather",
                                                               "arguments": {"city": "Oslo"}}}]
