"""Chat templates: render a conversation with the model's ``tokenizer.chat_template`` like transformers.

The Jinja environment is the one ``transformers`` builds in ``_compile_jinja_template``: an
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, a ``{% generation %}`` block that just renders its body, a ``tojson`` filter that does not
HTML-escape (``json.dumps`` with ``ensure_ascii=False`` and the same optional arguments), and the
globals ``raise_exception`` and ``strftime_now``. Templates get ``messages``, ``add_generation_prompt``,
``bos_token`` and ``eos_token``; ``tools`` and ``documents`` stay undefined, as llama.cpp leaves them
without tools (templates such as Hermes-2-Pro and Command-R+ loop over ``tools`` unconditionally).

Like llama.cpp (common/chat.cpp), a first system message that the template does not use -- Gemma's
templates raise on one -- is merged into the next message (``system + "\n" + content``).

With tools, ``tools`` is defined (OpenAI's list of ``{"type": "function", "function": {...}}``), and
``tool_caps`` tells, as llama.cpp's capability probes do (jinja/caps.cpp), whether the template shows
the tools, an assistant message's tool calls and a tool message's content -- the server describes in
a system message what the template leaves out.

A model without a template gets ChatML when its vocabulary has ``<|im_start|>``, else Llama-2's
``[INST]`` format.

A template comes from a model file, so it is hostile input: it is rendered by ``sandbox.py``'s
``BudgetedEnvironment`` (the same immutable sandbox, with every render bounded in time, output size,
work and call depth: ``RENDER_LIMITS``), and a template longer than ``MAX_TEMPLATE_CHARS`` is refused.
"""

from __future__ import annotations

import json
from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes

from pipx_llama.errors import ChatTemplateError
from pipx_llama.tokenizer.sandbox import BudgetedEnvironment, BudgetExceeded, Limits, render

# Real templates are a few KB (the longest, with tool calling, tens of KB).
MAX_TEMPLATE_CHARS = 1 << 20
RENDER_LIMITS = Limits()
_BROKEN = "the model's tokenizer.chat_template is broken; supply a working template"
_STOPPED = (
    "a chat template renders a conversation in well under a millisecond: this one loops, recurses or "
    "grows without bound (check the model's tokenizer.chat_template), or the conversation is far too long"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2-chat: an optional system prompt folded into the first user turn, strict user/assistant turns.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template | ChatTemplateError:
    """The compiled template, or the error it gives (cached too: a bad template is not parsed per request)."""
    if len(template) > MAX_TEMPLATE_CHARS:
        return ChatTemplateError(f"the chat template is {len(template)} characters long (at most "
                                 f"{MAX_TEMPLATE_CHARS})", _BROKEN)
    env = BudgetedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.compile_template(template)
    except jinja2.TemplateSyntaxError as err:
        return ChatTemplateError(f"the chat template does not parse (line {err.lineno}): {_cut(err.message)}",
                                 _BROKEN)
    except jinja2.TemplateError as err:
        return ChatTemplateError(f"the chat template does not compile: {_cut(err)}", _BROKEN)
    except (RecursionError, SyntaxError):  # the parser's recursion, or Python's limits on the generated code
        return ChatTemplateError("the chat template does not parse: it is nested too deeply", _BROKEN)


def _cut(text: object, limit: int = 300) -> str:
    """An error text short enough for one line of a message (a template chooses what it says)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def builtin_template(vocab: Container[str] | None) -> str:
    """The fallback for a model without ``tokenizer.chat_template``."""
    if vocab is not None and "<|im_start|>" in vocab:
        return CHATML_TEMPLATE
    return LLAMA2_TEMPLATE


def _validate(messages: Any) -> list[dict[str, Any]]:
    hint = 'pass a list of {"role": "user" | "assistant" | "system" | ..., "content": str} dicts'
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"chat messages must be a list, got {type(messages).__name__}", hint)
    if not messages:
        raise ChatTemplateError("chat messages are empty", hint)
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat message {i} is a {type(message).__name__}, not a dict", hint)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"chat message {i} has no role (a non-empty string)", hint)
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise ChatTemplateError(f"chat message {i} ({role}) has no content", hint)
        if content is not None and not isinstance(content, (str, list)):
            raise ChatTemplateError(
                f"chat message {i} ({role}) has content of type {type(content).__name__}; expected a string",
                hint,
            )
        checked.append(dict(message))
    return checked


_SYSTEM_PROBE = "System message 7f3a"
_TEMPLATE_FAILURES = (
    jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError,
)  # fmt: skip


@lru_cache(maxsize=16)
def supports_system_role(template: str) -> bool:
    """Whether the template puts a first system message in its output.

    llama.cpp's capability probe renders [system, user] and checks that the system content was read
    (jinja/caps.cpp); reading it here means it shows up in the output, which also covers templates that
    raise on a system message before touching it (Gemma) or silently skip it.
    """
    probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "User message"}]
    compiled = _compile(template)
    if isinstance(compiled, ChatTemplateError):
        return False
    context = {"messages": probe, "add_generation_prompt": True, "bos_token": "", "eos_token": ""}
    try:
        text = render(compiled, context, RENDER_LIMITS)
    except (*_TEMPLATE_FAILURES, BudgetExceeded, RecursionError):
        return False
    return _SYSTEM_PROBE in text


@dataclass(frozen=True)
class ToolCaps:
    """What of a tool conversation a template puts in its output."""

    tools: bool  # the tools it is given
    tool_calls: bool  # an assistant message's tool calls
    tool_responses: bool  # a tool message's content


_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_tool_7f3a", "description": "Probe tool 7f3a",
    "parameters": {"type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]}}}
_PROBE_CALL = {"role": "assistant", "content": "", "tool_calls": [{
    "id": "call7f3a0", "type": "function",
    "function": {"name": "probe_call_7f3a", "arguments": {"arg": "x"}}}]}
_PROBE_RESPONSE = {"role": "tool", "tool_call_id": "call7f3a0", "name": "probe_call_7f3a",
                   "content": "Tool response 7f3a"}


def _probe(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    compiled = _compile(template)
    if isinstance(compiled, ChatTemplateError):
        return ""
    context: dict[str, Any] = {"messages": messages, "add_generation_prompt": True, "bos_token": "",
                               "eos_token": ""}
    if tools is not None:
        context["tools"] = tools
    try:
        return render(compiled, context, RENDER_LIMITS)
    except (*_TEMPLATE_FAILURES, BudgetExceeded, RecursionError):
        return ""


@lru_cache(maxsize=16)
def tool_caps(template: str) -> ToolCaps:
    """Which parts of a tool conversation the template shows (each probed on its own, as llama.cpp does)."""
    user = {"role": "user", "content": "User message"}
    tools = [_PROBE_TOOL]
    return ToolCaps(
        tools="probe_tool_7f3a" in _probe(template, [user], tools),
        tool_calls="probe_call_7f3a" in _probe(template, [user, _PROBE_CALL], tools),
        tool_responses="Tool response 7f3a" in _probe(
            template, [user, _PROBE_CALL, _PROBE_RESPONSE], tools),
    )


def _merge_system_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """llama.cpp's ``system_message_not_supported``: system content + "\n" + the next message's content."""
    system, rest = messages[0], messages[1:]
    if not rest:
        # llama.cpp drops it and renders no messages at all, which templates indexing messages[0] fail on.
        raise ChatTemplateError(
            "the chat template has no system role and the conversation is only a system message",
            "add a user message after the system message",
        )
    first, second = system["content"], rest[0].get("content")
    if not isinstance(first, str) or not isinstance(second, str):
        raise ChatTemplateError(
            "the chat template has no system role and the system message cannot be merged into the next "
            "one (content parts instead of text)",
            "send the system message and the first user message as plain strings",
        )
    return [{**rest[0], "content": first + "\n" + second}, *rest[1:]]


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    vocab: Container[str] | None = None,
    limits: Limits | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render ``messages`` with ``template`` (None: ChatML if ``vocab`` has ``<|im_start|>``, else Llama-2).

    ``tools`` (None: no tools, and ``tools`` stays undefined) is the OpenAI list of function tools.

    The render runs within ``limits`` (default ``RENDER_LIMITS``); a template that exceeds them raises
    ``ChatTemplateError`` saying which limit it hit.
    """
    checked = _validate(messages)
    text = template if template else builtin_template(vocab)
    hint = "the model's chat template cannot handle this conversation; check roles and their order"
    compiled = _compile(text)
    if isinstance(compiled, ChatTemplateError):
        raise compiled
    if checked[0]["role"] == "system" and not supports_system_role(text):
        checked = _merge_system_message(checked)
    # like llama.cpp, no `tools` or `documents` without tools: templates test `tools is defined`
    context: dict[str, Any] = {"messages": checked, "add_generation_prompt": add_generation_prompt,
                               "bos_token": bos_token, "eos_token": eos_token}
    if tools is not None:
        context["tools"] = tools
    try:
        return render(compiled, context, limits or RENDER_LIMITS)
    except BudgetExceeded as err:
        raise ChatTemplateError(f"the chat template was stopped: {err}", _STOPPED) from None
    except RecursionError:
        raise ChatTemplateError("the chat template was stopped: it recursed too deeply", _STOPPED) from None
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template error: {_cut(err.message or err)}", hint) from err
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError) as err:
        raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {_cut(err)}", hint) from err
