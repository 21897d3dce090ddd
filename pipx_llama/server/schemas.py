"""Request validation and response shapes for the OpenAI and Ollama APIs.

Requests are checked field by field into a ``GenRequest`` (what the engine needs, nothing more); a bad
field becomes a 400 naming the field. Fields this server does not implement are refused when they
would change the answer (``n`` > 1, ``logprobs``) and ignored when they would not
(``user``, ``store``, ``metadata``, unknown keys), so clients written for other servers still work.
Structured output (``response_format``, Ollama's ``format``) becomes the JSON schema the answer is
constrained to; ``tools`` are normalized to OpenAI's function shape, assistant tool calls carry their
arguments as objects (the form chat templates render).

Response builders produce OpenAI's exact objects (``chat.completion``, ``chat.completion.chunk``,
``text_completion``) and Ollama's NDJSON lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipx_llama import __version__
from pipx_llama.engine import GenerationStats, SamplerConfig
from pipx_llama.errors import UsageError
from pipx_llama.server.errors import APIError, bad_request, quote, unsupported
from pipx_llama.server.tools import ToolCall, ToolChoice

MAX_STOP = 16
MAX_LOGIT_BIAS = 1024  # entries per request; OpenAI documents no limit, this bounds the per-token cost
LOGIT_BIAS = (-100.0, 100.0)  # OpenAI's range; -100 bans a token in practice, +100 forces it
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
FINGERPRINT = f"pipx-llama-{__version__}"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
# the sampler divides logits by these: beyond them float32/float64 overflow to inf, and inf - inf is NaN
MIN_TEMPERATURE = 1e-6  # above 0: anything smaller is greedy in effect
REPEAT_PENALTY = (0.01, 100.0)
MAX_TOOLS = 128  # OpenAI's limit
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI: letters, digits, '_' and '-', up to 64 (and '.')
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # JSON mode: any JSON object
# numbers are int64 in OpenAI's and Ollama's APIs; larger ones are refused, never rounded
NUMBER_LIMIT = 1 << 63


@dataclass
class GenRequest:
    """One validated generation request, whichever API it came through."""

    model: str | None
    messages: list[dict[str, Any]] | None = None  # chat: rendered with the model's template
    prompt: str | list[int] | None = None  # completion: text or token ids
    max_tokens: int | None = None  # None: until end of text or the context is full
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplerConfig fields the client set
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    context: list[int] = field(default_factory=list)  # Ollama /api/generate: ids of the previous turn
    tools: list[dict[str, Any]] | None = None  # function tools, OpenAI's shape
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    response_schema: Any = None  # the JSON schema the answer must match; None: free text
    response_param: str | None = None  # the field it came from, named in errors

    def sampler(self, defaults: SamplerConfig) -> SamplerConfig:
        s = dict(self.sampling)
        if s.get("top_p") == 0.0:  # OpenAI accepts top_p 0: only the most likely token
            s["top_p"], s["top_k"] = 1.0, 1
        cfg = dataclasses.replace(defaults, **s)
        try:
            cfg.validate()
        except UsageError as err:
            raise bad_request(err.message) from None
        return cfg


class _Body:
    """Typed access to the fields of a JSON object, with 400s that name the field."""

    def __init__(self, body: Any, where: str = "") -> None:
        if not isinstance(body, dict):
            raise bad_request(f"'{where}' must be a JSON object" if where
                              else "the request body must be a JSON object", where or None)
        self.body = body
        self.where = where

    def _param(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def present(self, key: str) -> bool:
        return self.body.get(key) is not None

    def number(self, key: str, lo: float | None = None, hi: float | None = None, *,
               integer: bool = False) -> Any:
        v = self.body.get(key)
        if v is None:
            return None
        param = self._param(key)
        kind = "an integer" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_request(f"'{param}' must be {kind}, got {quote(v)}", param)
        if isinstance(v, float) and not math.isfinite(v):
            raise bad_request(f"'{param}' must be finite, got {quote(v)}", param)
        if integer and isinstance(v, float) and not v.is_integer():
            raise bad_request(f"'{param}' must be {kind}, got {quote(v)}", param)
        # int/float comparisons are exact in Python, so a 400-digit integer is compared, never converted
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise bad_request(f"'{param}' must be {bounds}, got {quote(v)}", param)
        if not -NUMBER_LIMIT <= v < NUMBER_LIMIT:
            raise bad_request(f"'{param}' is out of range: {quote(v)} (the limit is ±2**63)", param)
        return int(v) if integer else float(v)

    def boolean(self, key: str) -> bool | None:
        v = self.body.get(key)
        if v is None:
            return None
        if not isinstance(v, bool):
            raise bad_request(f"'{self._param(key)}' must be true or false, got {quote(v)}", self._param(key))
        return v

    def string(self, key: str, *, required: bool = False) -> str | None:
        v = self.body.get(key)
        if v is None:
            if required:
                raise bad_request(f"'{self._param(key)}' is required", self._param(key))
            return None
        if not isinstance(v, str):
            raise bad_request(f"'{self._param(key)}' must be a string, got {type(v).__name__}",
                              self._param(key))
        return v

    def stop(self, key: str = "stop") -> tuple[str, ...]:
        v = self.body.get(key)
        if v is None:
            return ()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise bad_request(f"'{self._param(key)}' must be a string or a list of strings", self._param(key))
        if len(items) > MAX_STOP:
            raise bad_request(f"'{self._param(key)}' has {len(items)} entries; at most {MAX_STOP} are "
                              "allowed",
                              self._param(key))
        if any(not s for s in items):
            raise bad_request(f"'{self._param(key)}' must not contain an empty string", self._param(key))
        return tuple(items)

    def refuse_if(self, key: str, what: str, allowed: tuple[Any, ...]) -> None:
        """400 unless the field is absent, null, or one of the values that leave the answer unchanged."""
        v = self.body.get(key)
        if v is None:
            return
        if not any(type(v) is type(a) and v == a for a in allowed):
            raise unsupported(self._param(key), what)


def _openai_common(b: _Body) -> GenRequest:
    req = GenRequest(model=b.string("model"))
    s = req.sampling
    for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("presence_penalty", -2.0, 2.0),
                        ("frequency_penalty", -2.0, 2.0), ("min_p", 0.0, 1.0)):
        v = b.number(key, lo, hi)
        if v is not None:
            s[key] = v
    # llama.cpp-server extensions some clients send
    for key, lo in (("top_k", 0), ("repeat_last_n", -1)):
        v = b.number(key, lo, integer=True)
        if v is not None:
            s[key] = v
    v = b.number("repeat_penalty", *REPEAT_PENALTY)
    if v is not None:
        s["repeat_penalty"] = v
    _check_temperature(s, "temperature")
    seed = b.number("seed", integer=True)
    if seed is not None:
        s["seed"] = seed & 0xFFFFFFFFFFFFFFFF  # numpy seeds must be >= 0; OpenAI allows negatives
    req.stop = b.stop()
    req.stream = bool(b.boolean("stream"))
    opts = b.body.get("stream_options")
    if opts is not None:
        ob = _Body(opts, "stream_options")
        req.include_usage = bool(ob.boolean("include_usage"))
    b.refuse_if("n", "n other than 1 (several choices)", allowed=(1,))
    b.refuse_if("best_of", "best_of other than 1", allowed=(1,))
    bias = _logit_bias(b.body.get("logit_bias"))
    if bias:
        s["logit_bias"] = bias
    b.refuse_if("logprobs", "logprobs", allowed=(False, 0))
    b.refuse_if("top_logprobs", "top_logprobs", allowed=(0,))
    b.refuse_if("functions", "the deprecated functions (use tools)", allowed=([],))
    b.refuse_if("function_call", "the deprecated function_call (use tool_choice)", allowed=("none", "auto"))
    req.response_schema, req.response_param = _response_format(b.body.get("response_format"))
    return req


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: token ids as decimal strings mapped to a number in [-100, 100].

    The ids are checked against the model's vocabulary once the model is known."""
    if value is None:
        return ()
    b = _Body(value, "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad_request(f"'logit_bias' has {len(value)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                          "logit_bias")
    out = []
    for key in value:
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise bad_request(f"'logit_bias' keys must be token ids (decimal strings), got {quote(key)}",
                              "logit_bias")
        out.append((int(key), b.number(key, *LOGIT_BIAS)))
    return tuple(sorted(out))


def _response_format(value: Any) -> tuple[Any, str | None]:
    """OpenAI's ``response_format``: the schema the answer is held to (None for text) and its field."""
    if value is None:
        return None, None
    b = _Body(value, "response_format")
    kind = b.string("type", required=True)
    if kind == "text":
        return None, None
    if kind == "json_object":
        return ANY_OBJECT, "response_format"
    if kind != "json_schema":
        raise bad_request("'response_format.type' must be text, json_object or json_schema, "
                          f"got {quote(kind)}",
                          "response_format.type")
    jb = _Body(b.body.get("json_schema"), "response_format.json_schema")
    jb.string("name")
    jb.boolean("strict")  # the schema is always enforced
    schema = jb.body.get("schema")
    if schema is None:
        return ANY_OBJECT, "response_format.json_schema"
    if not isinstance(schema, (dict, bool)):
        raise bad_request("'response_format.json_schema.schema' must be a JSON schema object",
                          "response_format.json_schema.schema")
    return schema, "response_format.json_schema.schema"


def _tools(value: Any, param: str = "tools") -> list[dict[str, Any]] | None:
    """Function tools in OpenAI's shape; Ollama sends the same (its ``type`` may be missing)."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise bad_request(f"'{param}' must be a list of tools", param)
    if len(value) > MAX_TOOLS:
        raise bad_request(f"'{param}' has {len(value)} tools; at most {MAX_TOOLS} are allowed", param)
    out, seen = [], set()
    for i, tool in enumerate(value):
        where = f"{param}[{i}]"
        tb = _Body(tool, where)
        kind = tb.string("type") or "function"
        if kind != "function":
            raise unsupported(f"{where}.type", f"tools of type {quote(kind)} (function tools only)")
        fb = _Body(tb.body.get("function"), f"{where}.function")
        name = fb.string("name", required=True)
        if not TOOL_NAME.fullmatch(name):
            raise bad_request(f"'{where}.function.name' must be 1 to 64 letters, digits, '_', '-' or '.', "
                              f"got {quote(name)}", f"{where}.function.name")
        if name in seen:
            raise bad_request(f"'{where}.function.name': two tools are named {quote(name)}",
                              f"{where}.function.name")
        seen.add(name)
        fn: dict[str, Any] = {"name": name}
        description = fb.string("description")
        if description:
            fn["description"] = description
        params = fb.body.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(f"'{where}.function.parameters' must be a JSON schema object",
                              f"{where}.function.parameters")
        fb.boolean("strict")
        fn["parameters"] = params if params is not None else {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> ToolChoice:
    if value is None:
        return ToolChoice("auto")
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise bad_request(f"'tool_choice' must be none, auto, required or a function, got {quote(value)}",
                              "tool_choice")
        if value == "required" and not tools:
            raise bad_request("'tool_choice' is required, but the request has no 'tools'", "tool_choice")
        return ToolChoice(value)
    b = _Body(value, "tool_choice")
    if b.string("type", required=True) != "function":
        raise bad_request("'tool_choice.type' must be function", "tool_choice.type")
    name = _Body(b.body.get("function"), "tool_choice.function").string("name", required=True)
    if name not in {t["function"]["name"] for t in tools or []}:
        raise bad_request(f"'tool_choice.function.name' is {quote(name)}, which is not one of the 'tools'",
                          "tool_choice.function.name")
    return ToolChoice("function", name)


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    """An assistant message's calls, arguments as objects (OpenAI sends them as JSON text, Ollama as
    objects)."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise bad_request(f"'{param}' must be a list of at most {MAX_TOOLS} tool calls", param)
    out = []
    for i, call in enumerate(value):
        where = f"{param}[{i}]"
        cb = _Body(call, where)
        call_id = cb.string("id") or f"call_{i}"
        fb = _Body(cb.body.get("function"), f"{where}.function")
        name = fb.string("name", required=True)
        args = fb.body.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                args = None
        if not isinstance(args, dict):
            raise bad_request(f"'{where}.function.arguments' must be a JSON object (or its JSON text)",
                              f"{where}.function.arguments")
        out.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
    return out


def _check_temperature(sampling: dict[str, Any], param: str) -> None:
    t = sampling.get("temperature")
    if t is not None and 0.0 < t < MIN_TEMPERATURE:
        raise bad_request(f"'{param}' must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t!r}", param)


def _max_tokens(b: _Body, *keys: str) -> int | None:
    for key in keys:
        v = b.number(key, 1, integer=True)
        if v is not None:
            return v
    return None


def _content_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_request(f"'{param}[{i}]' must be an object with a 'type'", f"{param}[{i}]")
            if part["type"] != "text":
                raise unsupported(f"{param}[{i}].type", f"content of type {quote(part['type'])} (text only)")
            if not isinstance(part.get("text"), str):
                raise bad_request(f"'{param}[{i}].text' must be a string", f"{param}[{i}].text")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"'{param}' must be a string or a list of content parts", param)


def _messages(value: Any, param: str = "messages", *, allow_empty: bool = False) -> list[dict[str, Any]]:
    if value is None and allow_empty:
        return []
    if not isinstance(value, list) or (not value and not allow_empty):
        raise bad_request(f"'{param}' must be a non-empty list of messages", param)
    out = []
    for i, m in enumerate(value):
        where = f"{param}[{i}]"
        mb = _Body(m, where)
        role = mb.string("role", required=True)
        if role not in CHAT_ROLES:
            raise bad_request(f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {quote(role)}",
                              f"{where}.role")
        if m.get("images"):
            raise unsupported(f"{where}.images", "image input")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _content_text(m.get("content"), f"{where}.content")}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            call_id = mb.string("tool_call_id")
            name = mb.string("tool_name") or mb.string("name")  # Ollama names the tool instead
            msg.update({"tool_call_id": call_id} if call_id else {})
            msg.update({"name": name} if name else {})
        out.append(msg)
    return out


def parse_chat(body: Any) -> GenRequest:
    """``POST /v1/chat/completions``."""
    b = _Body(body)
    req = _openai_common(b)
    req.messages = _messages(b.body.get("messages"))
    req.max_tokens = _max_tokens(b, "max_completion_tokens", "max_tokens")
    req.tools = _tools(b.body.get("tools"))
    req.tool_choice = _tool_choice(b.body.get("tool_choice"), req.tools)
    parallel = b.boolean("parallel_tool_calls")
    req.parallel_tool_calls = True if parallel is None else parallel
    _check_tools_and_format(req)
    return req


def _check_tools_and_format(req: GenRequest) -> None:
    if req.tools and req.tool_choice.mode != "none" and req.response_schema is not None:
        raise unsupported(req.response_param or "format", "a response format together with tools (unless "
                                                          "tool_choice is none)")


def parse_completion(body: Any) -> GenRequest:
    """``POST /v1/completions``: one prompt, as text, a one-element list, or token ids."""
    b = _Body(body)
    req = _openai_common(b)
    p = b.body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        req.prompt = p
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        req.prompt = list(p)
    elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise unsupported("prompt", "several prompts in one request")
    else:
        raise bad_request("'prompt' must be a string, a list with one string, or a list of token ids",
                          "prompt")
    req.max_tokens = _max_tokens(b, "max_tokens")
    if req.max_tokens is None:
        req.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    req.echo = bool(b.boolean("echo"))
    if b.string("suffix"):
        raise unsupported("suffix", "suffix (fill-in-the-middle)")
    return req


_OLLAMA_OPTIONS = (("temperature", 0.0, None, False), ("top_p", 0.0, 1.0, False), ("min_p", 0.0, 1.0, False),
                   ("top_k", 0, None, True), ("repeat_penalty", *REPEAT_PENALTY, False),
                   ("repeat_last_n", -1, None, True), ("presence_penalty", -2.0, 2.0, False),
                   ("frequency_penalty", -2.0, 2.0, False))


def _ollama_common(b: _Body) -> GenRequest:
    req = GenRequest(model=b.string("model"))
    stream = b.boolean("stream")
    req.stream = True if stream is None else stream  # Ollama streams unless told not to
    fmt = b.body.get("format")
    if fmt == "json":
        req.response_schema, req.response_param = ANY_OBJECT, "format"
    elif isinstance(fmt, dict):
        req.response_schema, req.response_param = fmt, "format"
    elif fmt not in (None, ""):
        raise bad_request(f"'format' must be \"json\" or a JSON schema object, got {quote(fmt)}", "format")
    opts = b.body.get("options")
    if opts is not None:
        ob = _Body(opts, "options")
        for key, lo, hi, integer in _OLLAMA_OPTIONS:
            v = ob.number(key, lo, hi, integer=integer)
            if v is not None:
                req.sampling[key] = v
        seed = ob.number("seed", integer=True)
        if seed is not None:
            req.sampling["seed"] = seed & 0xFFFFFFFFFFFFFFFF
        _check_temperature(req.sampling, "options.temperature")
        n = ob.number("num_predict", integer=True)
        req.max_tokens = n if n is not None and n > 0 else None  # -1 / -2: until the context is full
        req.stop = ob.stop()
    return req


def parse_ollama_generate(body: Any) -> GenRequest:
    """``POST /api/generate``: the prompt goes through the chat template unless ``raw``."""
    b = _Body(body)
    req = _ollama_common(b)
    prompt = b.string("prompt") or ""
    system = b.string("system")
    if b.body.get("images"):
        raise unsupported("images", "image input")
    if b.string("suffix"):
        raise unsupported("suffix", "suffix (fill-in-the-middle)")
    ctx = b.body.get("context")
    if ctx is not None:
        if not isinstance(ctx, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ctx):
            raise bad_request("'context' must be a list of token ids", "context")
        req.context = list(ctx)
    if b.boolean("raw"):
        req.prompt = prompt
    elif prompt:
        msgs = (([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": prompt}])
        req.messages = msgs
    return req


def parse_ollama_chat(body: Any) -> GenRequest:
    """``POST /api/chat``; an empty message list only loads the model, as Ollama does."""
    b = _Body(body)
    req = _ollama_common(b)
    req.tools = _tools(b.body.get("tools"))
    _check_tools_and_format(req)
    msgs = _messages(b.body.get("messages"), allow_empty=True)
    req.messages = msgs or None
    return req


# -- OpenAI responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats: GenerationStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.n_prompt,
        "completion_tokens": stats.n_generated,
        "total_tokens": stats.n_prompt + stats.n_generated,
        "prompt_tokens_details": {"cached_tokens": stats.n_prompt - stats.n_prompt_evaluated},
    }


def finish_reason(stats: GenerationStats, called: bool = False) -> str:
    """``called``: the answer holds tool calls (OpenAI says ``tool_calls`` even when the limit was hit)."""
    if called:
        return "tool_calls"
    # a cancelled request has no reader; "stop" keeps the object valid for logs
    return "length" if stats.finish_reason == "length" else "stop"


def tool_call_object(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """A call as streamed deltas: its id and name, then its arguments."""
    return [{"tool_calls": [{"index": index, "id": call.id, "type": "function",
                             "function": {"name": call.name, "arguments": ""}}]},
            {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


def chat_completion(rid: str, created: int, model: str, text: str, stats: GenerationStats,
                    calls: list[ToolCall] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    if calls:
        message["content"] = text if text.strip() else None
        message["tool_calls"] = [tool_call_object(c) for c in calls]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(stats, bool(calls)),
        }],
        "usage": usage(stats),
        "system_fingerprint": FINGERPRINT,
    }


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None,
               include_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def completion(rid: str, created: int, model: str, text: str, stats: GenerationStats) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason(stats)}],
        "usage": usage(stats),
        "system_fingerprint": FINGERPRINT,
    }


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None,
                     include_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, stats: GenerationStats) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": FINGERPRINT,
            "choices": [], "usage": usage(stats)}


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "pipx-llama"}


# -- Ollama responses --------------------------------------------------------------------------------


def ollama_time(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t,
                                  timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Ollama's shape: arguments as an object, no id."""
    return [{"function": {"name": c.name, "arguments": json.loads(c.arguments)}} for c in calls]


def ollama_final(stats: GenerationStats, total_seconds: float, load_seconds: float) -> dict[str, Any]:
    ns = 1_000_000_000
    return {
        "done": True,
        "done_reason": "length" if stats.finish_reason == "length" else "stop",
        "total_duration": int(total_seconds * ns),
        "load_duration": int(load_seconds * ns),
        "prompt_eval_count": stats.n_prompt,
        "prompt_eval_duration": int(stats.prompt_seconds * ns),
        "eval_count": stats.n_generated,
        "eval_duration": int(stats.generation_seconds * ns),
    }


def context_error(n_prompt: int, max_tokens: int | None, n_ctx: int, prompt_param: str, *,
                  at_least: bool = False) -> APIError:
    """``at_least``: ``n_prompt`` is a lower bound (the text was refused before it was tokenized)."""
    has = f"at least {n_prompt}" if at_least else f"{n_prompt}"
    if max_tokens is None or n_prompt >= n_ctx:
        msg = (f"This model's maximum context length is {n_ctx} tokens; the prompt has {has}, "
               f"which leaves no room to generate. Shorten the messages or the prompt.")
        return APIError(400, msg, param=prompt_param, code="context_length_exceeded")
    msg = (f"This model's maximum context length is {n_ctx} tokens. However, you requested "
           f"{'at least ' if at_least else ''}{n_prompt + max_tokens} tokens ({has} in the prompt, "
           f"{max_tokens} for the completion). Please reduce the length of the messages or the completion.")
    return APIError(400, msg, param="max_tokens", code="context_length_exceeded")
