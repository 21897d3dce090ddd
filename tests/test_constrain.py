"""Constrained decoding (engine/constrain.py): our vocabularies as llguidance sees them, token masks that
follow a JSON schema step by step, generation on the real SmolLM2 that always validates, and hostile
schemas refused with a ``GrammarError`` that names the field."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import numpy as np
import pytest

from pipx_llama.engine.constrain import (
    MAX_GRAMMAR_CHARS,
    Constraint,
    GrammarError,
    json_in_lark,
    json_schema_grammar,
    lark_grammar,
    mask_logits,
    mask_logits_ref,
    token_bytes,
)
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.tokenizer.tokenizer import Tokenizer

pydantic = pytest.importorskip("pydantic")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "age": {"type": "integer", "minimum": 0},
    },
    "required": ["name", "role", "tags", "address"],
    "additionalProperties": False,
}
DOC = {"name": "Ada", "role": "admin", "tags": ["math", "poetry"], "address": {"city": "London", "zip": "W1"},
       "age": 36}


def _tok(path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(open_gguf(path).metadata, path.name)


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> Tokenizer:
    return _tok(smollm2_path)


@pytest.fixture(scope="module")
def qwen(qwen25_coder_path: Path) -> Tokenizer:
    return _tok(qwen25_coder_path)  # 151,936 tokens, with Hermes' <tool_call> markers


@pytest.fixture(scope="module")
def spm(vocab_dir: Path) -> Tokenizer:
    return _tok(vocab_dir / "ggml-vocab-llama-spm.gguf")


def test_token_bytes_mark_control_tokens(spm: Tokenizer, qwen: Tokenizer) -> None:
    pieces = token_bytes(spm)
    assert len(pieces) == spm.n_vocab
    hello = spm.token_id("▁Hello")
    assert pieces[hello] == b" Hello"
    assert pieces[spm.token_id("<0x0A>")] == b"\n"  # byte-fallback tokens are their byte
    assert pieces[spm.bos_id] == b"\xff<s>" and pieces[spm.eos_id] == b"\xff</s>"
    pieces = token_bytes(qwen)
    assert pieces[qwen.token_id("Ġthe")] == b" the"
    assert pieces[qwen.token_id("<|im_end|>")] == b"\xff<|im_end|>"
    assert pieces[qwen.token_id("<tool_call>")] == b"\xff<tool_call>"  # an added token shaped like a tag


@pytest.mark.parametrize("name", ["smol", "qwen"])
def test_mask_follows_a_valid_document(request: pytest.FixtureRequest, name: str) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    c = Constraint(json_schema_grammar(PERSON, param="schema"), tok, param="schema")
    first = np.flatnonzero(c.allowed())
    assert first.size and all(tok.token_to_piece(int(t), special=True).startswith(b"{") for t in first)
    ids = tok.encode(json.dumps(DOC), add_special=False)
    for t in ids:
        allowed = c.allowed()
        assert allowed[t], tok.decode([t])
        assert not allowed[list(tok.stop_ids)].any()  # no end before the document is complete
        c.accept(t)
    assert c.accepting
    assert set(np.flatnonzero(c.allowed()).tolist()) == set(tok.stop_ids)  # then only the end


def test_mask_rejects_what_the_schema_forbids(smol: Tokenizer) -> None:
    c = Constraint(json_schema_grammar(PERSON, param="schema"), smol, param="schema")
    for t in smol.encode('{"name": "Ada", "role": "', add_special=False):
        c.accept(t)
    allowed = c.allowed()
    assert allowed[smol.encode("admin", add_special=False)[0]]
    assert not allowed[smol.encode("wizard", add_special=False)[0]]  # not in the enum
    bad = smol.encode("wizard", add_special=False)[0]
    with pytest.raises(GrammarError, match="does not continue"):
        c.accept(bad)


def test_apply_masks_a_copy(smol: Tokenizer) -> None:
    c = Constraint(json_schema_grammar({"type": "boolean"}, param="f"), smol, param="f")
    logits = np.linspace(-1, 1, smol.n_vocab + 5).astype(np.float32)  # models may pad their output rows
    before = logits.copy()
    out = c.apply(logits)
    assert np.array_equal(logits, before)
    allowed = c.allowed()
    assert np.array_equal(out[: smol.n_vocab][allowed], logits[: smol.n_vocab][allowed])
    assert np.isneginf(out[: smol.n_vocab][~allowed]).all() and np.isneginf(out[smol.n_vocab:]).all()
    texts = {smol.token_to_piece(int(t)) for t in np.flatnonzero(allowed)}
    assert texts and all(b"true".startswith(s) or b"false".startswith(s) for s in texts)


@pytest.mark.parametrize(
    ("n_logits", "n_vocab", "density"), [(1000, 1000, 0.5), (1037, 1000, 0.02), (64, 70, 1.0)]
)
def test_mask_logits_matches_numpy(n_logits: int, n_vocab: int, density: float) -> None:
    rng = np.random.default_rng(n_logits)
    words = np.packbits(rng.random(((n_vocab + 31) // 32) * 32) < density, bitorder="little").view(np.int32)
    logits = rng.standard_normal(n_logits).astype(np.float32)
    out = np.empty(n_logits, np.float32)
    mask_logits(logits, words, n_vocab, out)
    assert np.array_equal(out, mask_logits_ref(logits, words, n_vocab))


def test_lark_grammar_names_special_tokens_by_id(qwen: Tokenizer) -> None:
    open_id, close_id = qwen.token_id("<tool_call>"), qwen.token_id("</tool_call>")
    call = {"type": "object", "properties": {"name": {"const": "f"}}, "required": ["name"]}
    c = Constraint(lark_grammar(f'start: <[{open_id}]> "\\n" {json_in_lark(call)} "\\n" <[{close_id}]>',
                                param="tools"), qwen, param="tools")
    assert np.flatnonzero(c.allowed()).tolist() == [open_id]  # the marker token, not its spelling in bytes
    for t in [open_id, *qwen.encode('\n{"name": "f"}\n', add_special=False), close_id]:
        c.accept(t)
    assert c.accepting


class Role(str, enum.Enum):
    admin = "admin"
    user = "user"


class Address(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # as OpenAI's strict schemas: no other keys
    city: str
    zip_code: str


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str
    role: Role
    tags: list[str] = pydantic.Field(max_length=4)
    address: Address


class Inventory(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    items: list[dict[str, int]] = pydantic.Field(min_length=1, max_length=3)
    complete: bool


@pytest.mark.slow
@pytest.mark.parametrize("model", [Person, Inventory])
def test_generation_always_validates(smollm2_path: Path, model: type[pydantic.BaseModel]) -> None:
    from pipx_llama.engine.generate import generate
    from pipx_llama.engine.model import load_model
    from pipx_llama.engine.sampler import GREEDY, SamplerConfig

    m = load_model(smollm2_path, threads=1)
    ctx = m.new_context(1024)
    ask = f"Give an example {model.__name__} as JSON."
    prompt = m.tokenizer.chat_prompt([{"role": "user", "content": ask}])
    schema = model.model_json_schema()
    for cfg in (GREEDY, SamplerConfig(seed=7, temperature=1.0), SamplerConfig(seed=8, temperature=1.0)):
        c = Constraint(json_schema_grammar(schema, param="schema"), m.tokenizer, param="schema")
        gen = generate(ctx, prompt, max_tokens=400, sampler=cfg, constraint=c)
        text = "".join(p.text for p in gen)
        assert gen.stats.finish_reason == "stop", text  # ended by the grammar, not by the token limit
        model.model_validate_json(text)


def _nest(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(("schema", "message"), [
    (_nest(150), "recursion"),  # llguidance's own nesting limit
    (_nest(600), "nests too deeply"),  # past Python's
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"$ref": "http://example.invalid/schema.json"}, "example.invalid"),
    ({"type": "wizard"}, "wizard"),
    ({"type": "object", "x-guidance": {"lenient": True}}, "x-guidance"),
    (["not", "an", "object"], "schema object"),
    ({"enum": ["v" * 100] * (MAX_GRAMMAR_CHARS // 100)}, "at most"),
    ({"type": "string", "pattern": "(?<=a)b"}, "cannot constrain"),
])
def test_hostile_schemas_are_grammar_errors(smol: Tokenizer, schema: object, message: str) -> None:
    with pytest.raises(GrammarError, match=message) as info:
        Constraint(json_schema_grammar(schema, param="response_format.json_schema.schema"), smol,
                   param="response_format.json_schema.schema")
    assert info.value.param == "response_format.json_schema.schema"
    assert "response_format.json_schema.schema" in info.value.message
