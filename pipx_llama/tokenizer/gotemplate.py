"""ollama's prompt templates (Go ``text/template``), rendered exactly for a small, well-defined subset.

A model pulled from an ollama registry may carry a ``template`` layer. When its GGUF has its own
``tokenizer.chat_template`` (ollama's library models do) that one is used; only a GGUF without one falls
back to the layer. Go's template language is large, so rather than guess we render the part that
ollama's simple templates use and refuse anything else by name:

- text, with ``{{-`` and ``-}}`` trimming the whitespace beside them; ``{{/* comments */}}``;
- ``{{ .System }}``, ``{{ .Prompt }}``, ``{{ .Response }}``, and in ``{{ range .Messages }}`` the
  message's ``{{ .Role }}`` and ``{{ .Content }}`` (``$.System`` and the like reach the top level);
- ``{{ if X }}``, ``{{ else if X }}``, ``{{ else }}``, ``{{ end }}`` where X is one of those fields or
  ``eq FIELD "text"``.

The values are those ollama's ``template.Execute`` passes (ollama's template/template.go): a template
that names ``.Messages`` is run once with the system messages joined (``System``), the conversation
with consecutive messages of one role merged (``Messages``) and an empty ``Response``; any other is run
once per turn with ``System``/``Prompt``/``Response``, the last turn cut just after ``{{ .Response }}``
(a template without one gets it appended), so the prompt ends where the answer begins. As in Go with
``missingkey=zero``, a top-level field that is not passed prints ``<no value>`` and is false.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from pipx_llama.errors import ChatTemplateError

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_EQ = re.compile(r"eq\s+(\S+)\s+(\S.*)", re.S)
_WS = " \t\r\n"
_FIELD = re.compile(r"(\$)?\.([A-Za-z_][A-Za-z0-9_]*)")
_STRING = re.compile(r'"((?:[^"\\\n]|\\["\\nt])*)"')
_TOP_FIELDS = ("System", "Prompt", "Response", "Messages")
_MESSAGE_FIELDS = ("Role", "Content")
_HINT = ("use a GGUF that carries tokenizer.chat_template (ollama's library models do), or run it as a raw "
         "completion (without --chat)")
MAX_TEMPLATE = 64 << 10
MAX_DEPTH = 32            # nested if/range blocks (real templates use 3 or 4; rendering recurses)
NO_VALUE = "<no value>"


def _unsupported(construct: str) -> ChatTemplateError:
    shown = construct if len(construct) <= 60 else construct[:57] + "..."
    return ChatTemplateError(f"the model's ollama template uses {shown!r}, which pipx-llama does not render "
                             "(it renders .System, .Prompt, .Response, range .Messages with .Role and "
                             ".Content, if/else if/else with eq, and trimming)", _HINT)


@dataclass(frozen=True)
class _Field:
    name: str
    root: bool        # $.Name: the top level, also inside range


@dataclass(frozen=True)
class _Eq:
    left: _Field | str
    right: _Field | str


_Pipe = Union[_Field, _Eq]


@dataclass
class _Text:
    text: str


@dataclass
class _Print:
    value: _Field


@dataclass
class _If:
    cond: _Pipe
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] | None = None   # an ``else if`` is an else holding one _If, as Go parses it


@dataclass
class _Range:
    over: _Field
    body: list[_Node] = field(default_factory=list)


_Node = Union[_Text, _Print, _If, _Range]


def _arg(text: str, in_range: bool) -> _Field | str:
    m = _STRING.fullmatch(text)
    if m:
        return m.group(1).replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")
    m = _FIELD.fullmatch(text)
    if not m:
        raise _unsupported(text)
    f = _Field(m.group(2), bool(m.group(1)))
    allowed = _MESSAGE_FIELDS if in_range and not f.root else _TOP_FIELDS
    if f.name not in allowed:
        raise _unsupported(text)
    return f


def _pipe(text: str, in_range: bool) -> _Pipe:
    words = text.split()
    m = _EQ.fullmatch(text)
    if m and '"' not in m.group(1):
        return _Eq(_arg(m.group(1), in_range), _arg(m.group(2).strip(), in_range))
    if len(words) == 1:
        value = _arg(words[0], in_range)
        if isinstance(value, _Field):
            return value
    raise _unsupported(text)


def _tokens(source: str) -> Iterator[tuple[str, str]]:
    """("text", s) and ("action", s) in order, with Go's trim markers applied to the texts beside them."""
    pos, pending_trim = 0, False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if pending_trim:
            text = text.lstrip(_WS)
        if m.group(1):
            text = text.rstrip(_WS)
        if text:
            yield "text", text
        body = m.group(2)
        if m.group(1) is None and body.startswith("-") or m.group(3) is None and body.endswith("-") and \
                not body.strip().startswith("/*"):
            raise _unsupported("{{" + body + "}}")  # a dash without its space is Go's negative number
        yield "action", body.strip()
        pending_trim = bool(m.group(3))
        pos = m.end()
    tail = source[pos:]
    if "{{" in tail:
        raise _unsupported(tail[tail.index("{{"):])
    tail = tail.lstrip(_WS) if pending_trim else tail
    if tail:
        yield "text", tail


@dataclass(frozen=True)
class GoTemplate:
    """A parsed template of the subset; ``render(messages)`` gives the prompt as ollama builds it."""

    nodes: tuple[_Node, ...]
    names: frozenset[str]     # the identifiers used, lowercase (ollama's Template.Vars)

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        system, collated = _collate(messages)
        if "messages" in self.names:
            return _run(list(self.nodes), {"System": system, "Messages": collated, "Response": ""})
        nodes = list(self.nodes)
        if "response" not in self.names:
            nodes.append(_Print(_Field("Response", False)))
        out: list[str] = []
        turn = {"System": "", "Prompt": "", "Response": ""}

        def execute() -> None:
            out.append(_run(nodes, turn))
            turn.update(System="", Prompt="", Response="")

        for m in collated:
            if m["Role"] == "system":
                if turn["Prompt"] or turn["Response"]:
                    execute()
                turn["System"] = m["Content"]
            elif m["Role"] == "user":
                if turn["Response"]:
                    execute()
                turn["Prompt"] = m["Content"]
            elif m["Role"] == "assistant":
                turn["Response"] = m["Content"]
        out.append(_run(_cut(nodes, [False]), turn))
        return "".join(out)


def parse_go_template(source: str) -> GoTemplate:
    """Parse ``source``; ``ChatTemplateError`` names the first construct outside the subset."""
    if len(source) > MAX_TEMPLATE:
        raise ChatTemplateError(f"the model's ollama template is longer than {MAX_TEMPLATE >> 10} KiB", _HINT)
    root: list[_Node] = []
    stack: list[tuple[_If | _Range, list[_Node]]] = []   # open blocks, and the list being filled
    current = root
    names: set[str] = set()
    for kind, body in _tokens(source.replace("\r\n", "\n")):
        if kind == "text":
            current.append(_Text(body))
            continue
        if body.startswith("/*") and body.endswith("*/"):
            continue
        in_range = any(isinstance(b, _Range) for b, _ in stack)
        for m in _FIELD.finditer(body):
            names.add(m.group(2).lower())
        word, _, rest = body.partition(" ")
        rest = rest.strip()
        if len(stack) >= MAX_DEPTH and word in ("if", "range"):
            raise _unsupported(f"blocks nested deeper than {MAX_DEPTH}")
        if word == "if":
            node = _If(_pipe(rest, in_range))
            current.append(node)
            stack.append((node, current))
            current = node.body
        elif word == "range":
            over = _arg(rest, in_range) if _FIELD.fullmatch(rest) else None
            if not isinstance(over, _Field) or over.name != "Messages" or in_range:
                raise _unsupported(body)
            node_r = _Range(over)
            current.append(node_r)
            stack.append((node_r, current))
            current = node_r.body
        elif word == "else":
            block = stack[-1][0] if stack else None
            if not isinstance(block, _If) or block.orelse is not None:
                raise _unsupported(body)
            block.orelse = []
            if rest:
                sub, _, cond = rest.partition(" ")
                if sub != "if":
                    raise _unsupported(body)
                inner = _If(_pipe(cond.strip(), in_range))
                block.orelse.append(inner)
                # an else-if chain closes with the one {{ end }} of its first if
                stack[-1] = (inner, stack[-1][1])
                current = inner.body
            else:
                current = block.orelse
        elif word == "end" and not rest:
            if not stack:
                raise _unsupported(body)
            current = stack.pop()[1]
        elif word in ("with", "template", "define", "block", "break", "continue") or ":=" in body or \
                "=" in body.split('"')[0] or "|" in body:
            raise _unsupported(body)
        else:
            value = _pipe(body, in_range)
            if not isinstance(value, _Field):
                raise _unsupported(body)
            if value.name == "Messages" and not in_range:
                raise _unsupported(body)
            current.append(_Print(value))
    if stack:
        raise _unsupported("an {{ if }} or {{ range }} without its {{ end }}")
    return GoTemplate(tuple(root), frozenset(names))


_MISSING = object()


def _collate(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """ollama's collate: the system messages joined, and consecutive messages of one role merged."""
    system: list[str] = []
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = str(m.get("role", "")), m.get("content") or ""
        if not isinstance(content, str):
            raise ChatTemplateError("an ollama template renders text messages only",
                                    "send each message's content as a string")
        if role == "system":
            system.append(content)
        if out and out[-1]["Role"] == role and role != "tool":
            out[-1]["Content"] += "\n\n" + content
        else:
            out.append({"Role": role, "Content": content})
    return "\n\n".join(system), out


def _value(f: _Field | str, top: Mapping[str, Any], dot: Mapping[str, Any]) -> Any:
    if isinstance(f, str):
        return f
    scope = top if f.root else dot
    return scope.get(f.name, _MISSING)


def _truth(v: Any) -> bool:
    return v is not _MISSING and bool(v)


def _test(cond: _Pipe, top: Mapping[str, Any], dot: Mapping[str, Any]) -> bool:
    if isinstance(cond, _Field):
        return _truth(_value(cond, top, dot))
    left, right = _value(cond.left, top, dot), _value(cond.right, top, dot)
    if not isinstance(left, str) or not isinstance(right, str):
        raise ChatTemplateError("the model's ollama template compares a value that is not text (Go refuses "
                                "it: incompatible types for comparison)", _HINT)
    return left == right


def _run(nodes: list[_Node], top: Mapping[str, Any], dot: Mapping[str, Any] | None = None) -> str:
    dot = top if dot is None else dot
    out: list[str] = []
    for n in nodes:
        if isinstance(n, _Text):
            out.append(n.text)
        elif isinstance(n, _Print):
            v = _value(n.value, top, dot)
            out.append(NO_VALUE if v is _MISSING else str(v))
        elif isinstance(n, _If):
            if _test(n.cond, top, dot):
                out.append(_run(n.body, top, dot))
            elif n.orelse is not None:
                out.append(_run(n.orelse, top, dot))
        else:
            for item in top.get(n.over.name) or ():
                out.append(_run(n.body, top, item))
    return "".join(out)


def _cut(nodes: list[_Node], cut: list[bool]) -> list[_Node]:
    """ollama's deleteNode for the last turn: every node after the first ``.Response`` field (in the
    order Go walks the tree; an if's condition is not walked) is deleted."""
    kept: list[_Node] = []
    for n in nodes:
        if cut[0]:
            continue
        if isinstance(n, _Print):
            if n.value.name == "Response":
                cut[0] = True
            kept.append(n)
        elif isinstance(n, _If):
            body = _cut(n.body, cut)
            if cut[0] and n.orelse is not None:
                # ollama's own code fails on this shape (a nil type assertion); so do we, plainly
                raise _unsupported("{{ .Response }} inside an {{ if }} that has an {{ else }}")
            orelse = _cut(n.orelse, cut) if n.orelse is not None else None
            kept.append(_If(n.cond, body, orelse))
        elif isinstance(n, _Range):
            kept.append(_Range(n.over, _cut(n.body, cut)))
        else:
            kept.append(n)
    return kept
