"""Chat templates rendered as transformers renders them, and the built-in fallbacks."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from pipx_llama.engine.gguf_reader import open_gguf
from pipx_llama.errors import ChatTemplateError
from pipx_llama.tokenizer.chat import CHATML_TEMPLATE, LLAMA2_TEMPLATE, builtin_template, render_chat
from pipx_llama.tokenizer.tokenizer import Tokenizer

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
USER = "Name three colors of the rainbow."


@pytest.fixture(scope="module")
def smol_meta(smollm2_path: Path) -> dict:
    return open_gguf(smollm2_path).metadata


def render(template: str | None, messages: list, **kw: object) -> str:
    return render_chat(template, messages, bos_token="<s>", eos_token="</s>", **kw)  # type: ignore[arg-type]


def test_smollm2_template_matches_golden_prompt(smol_meta: dict, golden: dict) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    text = render_chat(
        smol_meta["tokenizer.chat_template"], messages, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    assert text == golden["cases"][4]["prompt"]
    # End to end: template, then encode with special tokens parsed, gives llama.cpp's ids.
    tok = Tokenizer.from_gguf_metadata(smol_meta, "smollm2")
    assert tok.encode(tok.chat_prompt(messages)) == golden["cases"][4]["prompt_ids"]


def test_smollm2_template_adds_default_system_and_no_generation_prompt(smol_meta: dict) -> None:
    text = render_chat(
        smol_meta["tokenizer.chat_template"],
        [{"role": "user", "content": "Hi"}],
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        add_generation_prompt=False,
    )
    assert text == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_llama2_two_turns() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": " Hello. "},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert render(None, messages) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>[INST] What is 2+2? [/INST]"
    )
    assert render(None, messages[1:]) == "<s>[INST] Hi! [/INST] Hello. </s><s>[INST] What is 2+2? [/INST]"


def test_builtin_choice() -> None:
    assert builtin_template({"<|im_start|>": 1}) is CHATML_TEMPLATE
    assert builtin_template({"<s>": 1}) is LLAMA2_TEMPLATE
    assert builtin_template(None) is LLAMA2_TEMPLATE
    chatml = render(None, [{"role": "user", "content": "Hi"}], vocab={"<|im_start|>"})
    assert chatml == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_errors_become_chat_template_errors() -> None:
    bad_order = [{"role": "assistant", "content": "first"}, {"role": "user", "content": "second"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render(LLAMA2_TEMPLATE, bad_order)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render("{% for m in messages %}{{ m.content }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="chat template"):
        render("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])  # immutable sandbox
    with pytest.raises(ChatTemplateError, match="chat template"):
        render("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages",
    [
        "not a list",
        [],
        ["not a dict"],
        [{"content": "no role"}],
        [{"role": "", "content": "empty role"}],
        [{"role": "user"}],
        [{"role": "user", "content": 42}],
    ],
)
def test_message_validation(messages: object) -> None:
    with pytest.raises(ChatTemplateError):
        render(CHATML_TEMPLATE, messages)  # type: ignore[arg-type]


def test_transformers_environment() -> None:
    msgs = [{"role": "user", "content": "é <b>&"}]
    # tojson: no HTML escaping, no ASCII escaping, HF's keyword arguments.
    assert render("{{ messages[0] | tojson }}", msgs) == '{"role": "user", "content": "é <b>&"}'
    assert render("{{ {'a': 1} | tojson(indent=2) }}", msgs) == '{\n  "a": 1\n}'
    assert render("{{ strftime_now('%Y') }}", msgs) == str(datetime.datetime.now().year)
    # trim_blocks + lstrip_blocks: block tags leave no newline or indentation behind.
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert render(template, msgs) == "[é <b>&]\n"
    # transformers' {% generation %} marker renders its body; loop controls are enabled.
    assert render("{% generation %}G{% endgeneration %}", msgs) == "G"
    assert (
        render("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}", msgs)
        == "01"
    )
    assert render("{{ bos_token }}|{{ eos_token }}|{{ tools }}|{{ add_generation_prompt }}", msgs) == (
        "<s>|</s>|None|True"
    )
    assert render("{{ raise_exception('nope') if false else 'ok' }}", msgs) == "ok"


def test_chat_prompt_has_one_bos(vocab_dir: Path) -> None:
    path = vocab_dir / "ggml-vocab-llama-spm.gguf"
    tok = Tokenizer.from_gguf_metadata(open_gguf(path).metadata, path.name)
    assert tok.chat_template is None  # the Llama-2 fallback, which writes bos_token itself
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tok.chat_prompt(messages)
    assert prompt == "[INST] Hi [/INST]"
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
