"""Tool calling (server/tools.py): the format read from each family's real chat template, conversations
with calls and results rendered through it, a forced call's grammar accepting exactly what the parser
reads back as the same call, and the streaming parser on every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipx_llama.engine.constrain import Constraint
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.server.tools import (
    Content,
    ToolCall,
    ToolChoice,
    ToolParser,
    detect_format,
    mistral_id,
    plan_chat,
    template_source,
)
from pipx_llama.tokenizer.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, NOW]
NAMES = frozenset({"get_weather", "now"})
ARGS = {"city": "Oslo", "unit": "C"}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]
CALL = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
HISTORY = [*USER, {"role": "assistant", "content": "", "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "call_abc", "content": "-3 C, snow"}]

# each format: (template file, vocabulary, the canonical text of one forced call to get_weather)
FORMATS = {
    "hermes": ("Qwen-Qwen2.5-7B-Instruct.jinja", "qwen",
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
               '</tool_call>'),
    "llama3": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "ggml-vocab-llama-bpe.gguf",
               '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}'),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "ggml-vocab-llama-spm.gguf",
                '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}]'),
    "mistral-args": ("Mistral-Small-3.2-24B-Instruct-2506.jinja", "ggml-vocab-llama-spm.gguf",
                     '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "unit": "C"}'),
    "generic": (None, "smollm2",
                '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}]}'),
}


@pytest.fixture(scope="module")
def tokenizers(vocab_dir: Path, smollm2_path: Path, qwen25_coder_path: Path, chat_templates_dir: Path
               ) -> dict[str, Tokenizer]:
    """Each format's tokenizer, with that family's chat template put into its metadata."""
    out = {}
    for fmt, (template, vocab, _) in FORMATS.items():
        path = {"qwen": qwen25_coder_path, "smollm2": smollm2_path}.get(vocab, vocab_dir / vocab)
        meta = dict(open_gguf(path).metadata)
        if template is not None:
            meta["tokenizer.chat_template"] = (chat_templates_dir / template).read_text()
        # the texts below are what a model generates after its prompt: no SentencePiece space in front
        meta["tokenizer.ggml.add_space_prefix"] = False
        out[fmt] = Tokenizer.from_gguf_metadata(meta, f"{fmt}:{path.name}")
    return out


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_is_read_from_the_template(tokenizers: dict[str, Tokenizer], fmt: str) -> None:
    assert detect_format(template_source(tokenizers[fmt])) == fmt


@pytest.mark.parametrize("name",
                         ["NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "Qwen-Qwen3-0.6B.jinja"])
def test_other_hermes_templates(chat_templates_dir: Path, name: str) -> None:
    assert detect_format((chat_templates_dir / name).read_text()) == "hermes"


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("function", "get_weather")])
def test_forced_call_grammar_and_parser_agree(tokenizers: dict[str, Tokenizer], fmt: str,
                                              choice: ToolChoice) -> None:
    tok = tokenizers[fmt]
    plan = plan_chat(tok, USER, TOOLS, choice, parallel=False)
    assert plan.format == fmt and plan.grammar is not None and plan.parse
    text = FORMATS[fmt][2]
    c = Constraint(plan.grammar, tok, param="tools")
    for t in tok.encode(text, add_special=False):
        c.accept(t)
    assert c.accepting
    parser = plan.parser()
    # streamed a character at a time
    events = [e for piece in text for e in parser.feed(piece)] + parser.finish()
    assert [(e.name, json.loads(e.arguments)) for e in events] == [("get_weather", ARGS)]


def test_named_choice_allows_only_that_tool(tokenizers: dict[str, Tokenizer]) -> None:
    tok = tokenizers["hermes"]
    plan = plan_chat(tok, USER, TOOLS, ToolChoice("function", "now"), parallel=False)
    c = Constraint(plan.grammar, tok, param="tools")
    ids = tok.encode(FORMATS["hermes"][2], add_special=False)
    accepted = 0
    with pytest.raises(Exception, match="does not continue"):
        for t in ids:
            c.accept(t)
            accepted += 1
    assert 0 < accepted < len(ids)


def test_no_grammar_unless_forced_or_generic(tokenizers: dict[str, Tokenizer]) -> None:
    assert plan_chat(tokenizers["hermes"], USER, TOOLS, ToolChoice("auto"), True).grammar is None
    none = plan_chat(tokenizers["hermes"], USER, TOOLS, ToolChoice("none"), True)
    assert none.grammar is None and not none.parse and none.tools == TOOLS  # still shown to the model
    generic = plan_chat(tokenizers["generic"], USER, TOOLS, ToolChoice("auto"), True)
    assert generic.grammar is not None  # the generic answer is always the JSON shape
    c = Constraint(generic.grammar, tokenizers["generic"], param="tools")
    for t in tokenizers["generic"].encode('{"response": "It is cold."}', add_special=False):
        c.accept(t)
    assert c.accepting


def test_native_templates_render_calls_and_results(tokenizers: dict[str, Tokenizer]) -> None:
    qwen = tokenizers["hermes"]
    plan = plan_chat(qwen, HISTORY, TOOLS, ToolChoice("auto"), True)
    text = qwen.chat_prompt(plan.messages, tools=plan.tools)
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # the tools, in the system turn
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
            '</tool_call>') in text
    assert "<tool_response>\n-3 C, snow\n</tool_response>" in text
    llama = tokenizers["llama3"]
    plan = plan_chat(llama, HISTORY, TOOLS, ToolChoice("auto"), True)
    text = llama.chat_prompt(plan.messages, tools=plan.tools)
    assert '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}' in text
    assert "<|start_header_id|>ipython<|end_header_id|>" in text
    for fmt in ("mistral", "mistral-args"):  # their templates insist on 9-character ids: ours are mapped
        tok = tokenizers[fmt]
        plan = plan_chat(tok, HISTORY, TOOLS, ToolChoice("auto"), True)
        text = tok.chat_prompt(plan.messages, tools=plan.tools)
        assert mistral_id("call_abc") in text and "-3 C, snow" in text and "[AVAILABLE_TOOLS]" in text
    assert mistral_id("call_abc") == mistral_id("call_abc") and len(mistral_id("call_abc")) == 9
    assert mistral_id("abcDEF123") == "abcDEF123"


def test_generic_template_gets_tools_and_calls_written_out(tokenizers: dict[str, Tokenizer]) -> None:
    tok = tokenizers["generic"]  # SmolLM2: its ChatML template shows no tools and no calls
    plan = plan_chat(tok, HISTORY, TOOLS, ToolChoice("auto"), True)
    assert plan.tools is None
    text = tok.chat_prompt(plan.messages, tools=plan.tools)
    system = text.split("<|im_start|>user")[0]
    assert json.dumps(WEATHER["function"]) in system and '{"response": ' in system
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}]}' in text
    assert "<|im_start|>tool\n-3 C, snow<|im_end|>" in text
    none = plan_chat(tok, HISTORY, TOOLS, ToolChoice("none"), True)  # no tool instructions when calls are off
    assert "You can call" not in tok.chat_prompt(none.messages)


def test_template_without_a_tool_role(chat_templates_dir: Path, smollm2_path: Path) -> None:
    meta = dict(open_gguf(smollm2_path).metadata)
    meta["tokenizer.chat_template"] = (chat_templates_dir / "google-gemma-2-2b-it.jinja").read_text()
    tok = Tokenizer.from_gguf_metadata(meta, "gemma-template")
    plan = plan_chat(tok, HISTORY, TOOLS, ToolChoice("auto"), True)
    text = tok.chat_prompt(plan.messages)  # roles alternate: the result became a user turn
    assert '{"tool_response": {"tool": "get_weather", "content": "-3 C, snow"}}' in text


def _run(parser: ToolParser, pieces: list[str]) -> tuple[list[list], list]:
    fed = [parser.feed(p) for p in pieces]
    return fed, parser.finish()


def test_hermes_parser_streams_text_and_calls() -> None:
    call = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    fed, end = _run(ToolParser("hermes", NAMES), ["Let me ", "check.<tool", "_call>", call[11:], "\n", call])
    assert fed[0] == [Content("Let me ")]
    assert fed[1] == [Content("check.")]  # "<tool" is held back: it may begin a marker
    assert fed[2] == [] and [e.name for e in fed[3]] == ["now"] and fed[4] == [Content("\n")]
    assert [e.name for e in fed[5]] == ["now"] and end == []
    ids = {e.id for f in fed for e in f if isinstance(e, ToolCall)}
    assert len(ids) == 2 and all(i.startswith("call_") for i in ids)


def test_hermes_parser_keeps_what_is_not_a_call() -> None:
    p = ToolParser("hermes", NAMES)
    bad = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'  # not one of the tools
    assert p.feed(bad) == [Content(bad)]
    assert p.feed("<tool_call>{broken") == [] and p.finish() == [Content("<tool_call>{broken")]
    p = ToolParser("hermes", NAMES)
    unclosed = p.feed('<tool_call>\n{"name": "now", "arguments": {}}') + p.finish()  # ended before the close
    assert [e.name for e in unclosed] == ["now"]
    assert ToolParser("hermes", NAMES).feed("a < b") == [Content("a < b")]


def test_llama3_parser() -> None:
    p = ToolParser("llama3", NAMES)
    assert p.feed("  The weather") == [Content("  The weather")]  # plain text streams at once
    p = ToolParser("llama3", NAMES)
    fed, end = _run(p, ["<|python_tag|>", '{"name": "get_weather", ', '"parameters": {"city": "Oslo"}}'])
    assert fed == [[], [], []] and [(e.name, json.loads(e.arguments)) for e in end] == [("get_weather",
                                                                                          {"city": "Oslo"})]
    p = ToolParser("llama3", NAMES)
    assert _run(p, ['{"a": 1}'])[1] == [Content('{"a": 1}')]  # JSON, but not a call


def test_mistral_parsers() -> None:
    p = ToolParser("mistral", NAMES)
    fed, end = _run(p, ["Sure. [TOOL", "_CALLS][", '{"name": "now", "arguments": {}}, ',
                        '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'])
    assert fed[0] == [Content("Sure. ")] and [e.name for e in end] == ["now", "get_weather"]
    assert all(len(e.id) == 9 and e.id.isalnum() for e in end)
    p = ToolParser("mistral-args", NAMES)
    _, end = _run(p,
                  ['[TOOL_CALLS]now[ARGS]{}[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Oslo"}'])
    assert [(e.name, json.loads(e.arguments)) for e in end] == [("now", {}),
                                                                ("get_weather", {"city": "Oslo"})]


def test_generic_parser() -> None:
    p = ToolParser("generic", NAMES)
    fed, end = _run(p, ['{"tool_calls": [{"name": "now", ', '"arguments": {}}]}'])
    assert fed == [[], []] and [e.name for e in end] == ["now"]
    assert _run(ToolParser("generic", NAMES), ['{"response": "It is -3 C."}'])[1] == [Content("It is -3 C.")]
    assert _run(ToolParser("generic", NAMES), ["plain"])[1] == [Content("plain")]
