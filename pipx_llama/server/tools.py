"""Tool calling: how a tool conversation reaches the model's template, the grammar of a forced call, and
the parser that turns the answer into OpenAI's ``tool_calls``.

The syntax a model calls tools in is read from its chat template's source, as llama.cpp's
common/chat.cpp did before its automatic parser:

- ``hermes`` (Qwen2.5, Qwen3, Hermes 2/3; the template has ``<tool_call>``): one block per call,
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, after any text.
- ``llama3`` (Llama 3.1-3.3; ``<|start_header_id|>`` and ``ipython``): the whole answer is
  ``{"name": ..., "parameters": {...}}``, maybe after ``<|python_tag|>``.
- ``mistral`` (Mistral Nemo; ``[TOOL_CALLS]``): ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
  ``mistral-args`` (Mistral Small 3.2, Devstral; also ``[ARGS]``): ``[TOOL_CALLS]name[ARGS]{...}`` per call.
- ``generic`` (every other template, e.g. SmolLM2's ChatML): llama.cpp's generic format. A system
  message lists the tools and asks for ``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` or
  ``{"response": "..."}``, and the answer is constrained to exactly that.

``tool_choice``: ``none`` shows the tools (where the template does) but parses nothing; ``auto`` parses
the answer (generic: constrained to the JSON shape); ``required`` and a named function constrain the
answer to one or more valid calls (``parallel_tool_calls`` false: exactly one) in the model's syntax,
arguments valid under the tool's JSON schema.

What a template cannot show (``tool_caps``) is written for it, as llama.cpp's polyfills do: the tools
in a system message, an assistant's calls as the generic JSON, a tool result as a user message.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import uuid
from dataclasses import dataclass
from typing import Any

from pipx_llama.engine import GrammarError, json_in_lark, lark_grammar
from pipx_llama.tokenizer.chat import builtin_template, tool_caps
from pipx_llama.tokenizer.tokenizer import ATTR_CONTROL, ATTR_USER_DEFINED, Tokenizer

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
PYTHON_TAG = "<|python_tag|>"
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # "auto" | "none" | "required" | "function"
    name: str | None = None  # with "function"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class Content:
    text: str


Event = Content | ToolCall


@dataclass
class ToolPlan:
    """What a chat request with tools does on one model."""

    format: str
    messages: list[dict[str, Any]]  # as the template gets them
    tools: list[dict[str, Any]] | None  # handed to the template (None: it cannot show them)
    grammar: str | None  # constrains the answer (a forced call; the generic JSON shape)
    parse: bool  # whether the answer is parsed for calls
    names: frozenset[str]  # the tools a call may name

    def parser(self) -> ToolParser:
        return ToolParser(self.format, self.names)


def template_source(tok: Tokenizer) -> str:
    vocab = {"<|im_start|>"} if tok.token_id("<|im_start|>") is not None else None
    return tok.chat_template or builtin_template(vocab)


def detect_format(template: str) -> str:
    if MISTRAL_OPEN in template:
        return "mistral-args" if MISTRAL_ARGS in template else "mistral"
    if HERMES_OPEN in template:
        return "hermes"
    if "<|start_header_id|>" in template and "ipython" in template:
        return "llama3"
    return "generic"


def plan_chat(tok: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
              choice: ToolChoice, parallel: bool) -> ToolPlan:
    """The messages, tools and grammar for one chat request on ``tok``'s model."""
    template = template_source(tok)
    caps = tool_caps(template)
    fmt = detect_format(template)
    tools = tools or []
    active = bool(tools) and choice.mode != "none"
    msgs = _polyfill(messages, fmt, caps.tool_calls, caps.tool_responses)
    if active and (fmt == "generic" or not caps.tools):
        msgs = _with_system_text(msgs, _tools_text(tools, fmt, choice))
    allowed = [t for t in tools if choice.mode != "function" or t["function"]["name"] == choice.name]
    grammar = None
    if active and (choice.mode in ("required", "function") or fmt == "generic"):
        grammar = lark_grammar(_call_grammar(tok, fmt, allowed, choice, parallel), param="tools")
    return ToolPlan(fmt, msgs, tools if tools and caps.tools else None, grammar, active,
                    frozenset(t["function"]["name"] for t in allowed))


# -- the conversation, as the template can take it ----------------------------------------------------


def _polyfill(messages: list[dict[str, Any]], fmt: str, shows_calls: bool, shows_results: bool
              ) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool_call_id -> function name, for results that only carry the id
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            for c in calls:
                names[c.get("id", "")] = c["function"]["name"]
            if shows_calls and fmt != "generic":
                if fmt.startswith("mistral"):
                    calls = [{**c, "id": mistral_id(c.get("id", ""))} for c in calls]
                m["tool_calls"] = calls
                m["content"] = m.get("content") or ""
            else:
                m.pop("tool_calls")
                m["content"] = json.dumps({"tool_calls": [{"name": c["function"]["name"],
                                                           "arguments": c["function"]["arguments"]}
                                                          for c in calls]}, ensure_ascii=False)
        elif m["role"] == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id", ""), "")
            if shows_results:
                m["name"] = name
                if fmt.startswith("mistral"):
                    m["tool_call_id"] = mistral_id(m.get("tool_call_id", ""))
            else:
                m = {"role": "user",
                     "content": json.dumps({"tool_response": {"tool": name, "content": m["content"]}},
                                           ensure_ascii=False)}
        out.append(m)
    return out


def _with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _tools_text(tools: list[dict[str, Any]], fmt: str, choice: ToolChoice) -> str:
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    text = f"You can call these tools:\n{listed}"
    if fmt != "generic":
        return text
    call = '{"tool_calls": [{"name": "<tool name>", "arguments": {<its arguments>}}]}'
    if choice.mode == "auto":
        return (f"{text}\n\nAnswer with a JSON object: {call} to call tools, or "
                '{"response": "<your answer>"} to answer the user directly.')
    return f"{text}\n\nAnswer with a JSON object that calls the tools: {call}"


def mistral_id(call_id: str) -> str:
    """Mistral's templates take only 9-letter alphanumeric ids: any other id maps to one, the same every
    time."""
    if _MISTRAL_ID.fullmatch(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).digest()
    return "".join(_ALNUM[b % len(_ALNUM)] for b in digest[:9])


def new_call_id(fmt: str) -> str:
    if fmt.startswith("mistral"):
        return "".join(_ALNUM[b % len(_ALNUM)] for b in uuid.uuid4().bytes[:9])
    return f"call_{uuid.uuid4().hex[:24]}"


# -- the grammar of a call --------------------------------------------------------------------------------


def _call_schema(tool: dict[str, Any], args_key: str) -> dict[str, Any]:
    f = tool["function"]
    params = dict(f.get("parameters") or {"type": "object", "properties": {}})
    if "x-guidance" in params:  # llguidance's own options (whitespace, leniency) are the server's to set
        raise GrammarError(f"the parameters of tool {f['name']!r} must not contain 'x-guidance'",
                           "remove that key from the schema", param="tools")
    # its own "$id" makes the tool's local references ("#/$defs/...") resolve within its schema
    params.setdefault("$id", f"urn:pipx-llama:tool:{f['name']}")
    return {"type": "object", "properties": {"name": {"const": f["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def _one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _marker(tok: Tokenizer, text: str) -> str:
    """A Lark item for ``text``: its special token by id when the vocabulary has one, else the text."""
    tid = tok.token_id(text)
    if tid is not None and tok.token_attr(tid) & (ATTR_CONTROL | ATTR_USER_DEFINED):
        return f"<[{tid}]>"
    return json.dumps(text)


def _call_grammar(tok: Tokenizer, fmt: str, tools: list[dict[str, Any]], choice: ToolChoice,
                  parallel: bool) -> str:
    repeat = '("\\n" tc)*' if parallel else ""
    if fmt == "hermes":
        call = _one_of([_call_schema(t, "arguments") for t in tools])
        return (f"start: tc {repeat}\n"
                f'tc: {_marker(tok, HERMES_OPEN)} "\\n" {json_in_lark(call)} "\\n" '
                f'{_marker(tok, HERMES_CLOSE)}\n')
    if fmt == "llama3":  # one call per answer: the template refuses several
        return f"start: {json_in_lark(_one_of([_call_schema(t, 'parameters') for t in tools]))}\n"
    if fmt == "mistral":
        calls = {"type": "array", "items": _one_of([_call_schema(t, "arguments") for t in tools]),
                 "minItems": 1}
        if not parallel:
            calls["maxItems"] = 1
        return f"start: {_marker(tok, MISTRAL_OPEN)} {json_in_lark(calls)}\n"
    if fmt == "mistral-args":
        alts = " | ".join(f"{json.dumps(t['function']['name'])} {_marker(tok, MISTRAL_ARGS)} "
                          f"{json_in_lark(_call_schema(t, 'arguments')['properties']['arguments'])}"
                          for t in tools)
        return f"start: tc{'+' if parallel else ''}\ntc: {_marker(tok, MISTRAL_OPEN)} ({alts})\n"
    calls = {"type": "array", "items": _one_of([_call_schema(t, "arguments") for t in tools]), "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    schema: dict[str, Any] = {"type": "object", "properties": {"tool_calls": calls},
                              "required": ["tool_calls"], "additionalProperties": False}
    if choice.mode == "auto":
        answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                  "additionalProperties": False}
        schema = {"anyOf": [schema, answer]}
    return f"start: {json_in_lark(schema)}\n"


# -- the answer -----------------------------------------------------------------------------------------


class ToolParser:
    """Splits an answer, fed as it streams, into text and tool calls.

    Text before a call's marker streams at once (a tail that may begin a marker is held back); a call
    is reported when it is complete. What does not parse as a call of a known tool stays text.
    """

    def __init__(self, fmt: str, names: frozenset[str]) -> None:
        self.format = fmt
        self.names = names
        self._buf = ""
        self._inside = False  # past a call's opening marker (llama3, generic: holding the whole answer)
        self._decided = fmt not in ("llama3", "generic")
        self._open = HERMES_OPEN if fmt == "hermes" else MISTRAL_OPEN

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        if not self._decided:
            head = self._buf.lstrip()
            if not head:
                return out
            self._decided = True
            self._inside = self.format == "generic" or head.startswith(("{", PYTHON_TAG[: len(head)]))
        if self.format in ("llama3", "generic"):
            if not self._inside and self._buf:
                out.append(Content(self._buf))
                self._buf = ""
            return out
        while True:
            if not self._inside:
                i = self._buf.find(self._open)
                if i < 0:
                    keep = _prefix_len(self._buf, self._open)
                    cut = len(self._buf) - keep
                    if cut:
                        out.append(Content(self._buf[:cut]))
                        self._buf = self._buf[cut:]
                    return out
                if i:
                    out.append(Content(self._buf[:i]))
                self._buf = self._buf[i + len(self._open):]
                self._inside = True
            if self.format != "hermes":
                return out  # Mistral's calls run to the end of the answer
            j = self._buf.find(HERMES_CLOSE)
            if j < 0:
                return out
            block, self._buf = self._buf[:j], self._buf[j + len(HERMES_CLOSE):]
            self._inside = False
            out += self._calls(block, HERMES_OPEN + block + HERMES_CLOSE)

    def finish(self) -> list[Event]:
        """What is left at the end of the answer."""
        rest, self._buf = self._buf, ""
        if not self._inside:
            return [Content(rest)] if rest else []
        self._inside = False
        if self.format in ("llama3", "generic"):
            return self._calls(rest, rest)
        return self._calls(rest, self._open + rest)  # a call the model did not close is still a call

    def _calls(self, text: str, raw: str) -> list[Event]:
        found = self._parse(text.strip())
        if found is None:
            return [Content(raw)] if raw else []
        events: list[Event] = []
        for item in found:
            if isinstance(item, str):
                events.append(Content(item))
            else:
                name, args = item
                events.append(ToolCall(new_call_id(self.format), name, args))
        return events

    def _parse(self, text: str) -> list[str | tuple[str, str]] | None:
        """The calls (and text) in a block, or None when it is not a valid call of a known tool."""
        if self.format == "mistral-args":
            calls = [_args_call(part) for part in text.split(MISTRAL_OPEN) if part.strip()]
            return self._known(calls)
        value = _json(text.removeprefix(PYTHON_TAG).strip() if self.format == "llama3" else text)
        if self.format == "generic":
            if isinstance(value, dict) and set(value) == {"response"}:
                answer = value["response"]
                return [answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)]
            if (isinstance(value, dict) and set(value) == {"tool_calls"}
                    and isinstance(value["tool_calls"], list)):
                value = value["tool_calls"]
            elif isinstance(value, dict) and set(value) == {"tool_call"}:
                value = [value["tool_call"]]
            else:
                return None
        if self.format == "mistral" and isinstance(value, dict):
            value = [value]
        items = value if isinstance(value, list) else [value]
        key = "parameters" if self.format == "llama3" else "arguments"
        return self._known([_obj_call(v, key) for v in items])

    def _known(self, calls: list[tuple[str, str] | None]) -> list[str | tuple[str, str]] | None:
        if not calls or any(c is None or c[0] not in self.names for c in calls):
            return None
        return list(calls)  # type: ignore[arg-type]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _obj_call(value: Any, key: str) -> tuple[str, str] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get(key, value.get("arguments", value.get("parameters")))
    if isinstance(args, str) and isinstance(_json(args), dict):
        return value["name"], args
    if not isinstance(args, dict):
        return None
    return value["name"], json.dumps(args, ensure_ascii=False)


def _args_call(part: str) -> tuple[str, str] | None:
    name, sep, args = part.partition(MISTRAL_ARGS)
    name = name.split(MISTRAL_CALL_ID)[0].strip()
    value = _json(args.strip()) if sep else None
    if not name or not isinstance(value, dict):
        return None
    return name, json.dumps(value, ensure_ascii=False)


def _prefix_len(text: str, marker: str) -> int:
    """The longest tail of ``text`` that begins ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
