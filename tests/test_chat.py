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
    assert render("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}", msgs) == "<s>|</s>|True"
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


# -- llama.cpp's adjustments: a system message the template ignores, no tools ----------------------

# Gemma's templates raise on a system message before reading it.
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


def test_system_message_goes_into_the_first_turn_when_the_template_does_not_take_it() -> None:
    # common/chat.cpp, workaround::system_message_not_supported: content + "\n" + next content.
    assert render(GEMMA_LIKE, CONVERSATION) == (
        "<s><start_of_turn>user\nBe brief.\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    # llama.cpp drops a system message that has nothing to merge into; Jinja cannot render what is left.
    with pytest.raises(ChatTemplateError, match="only a system message"):
        render(GEMMA_LIKE, CONVERSATION[:1])


def test_system_message_merged_when_the_template_ignores_it_and_kept_when_used() -> None:
    ignores = "{% for m in messages if m.role != 'system' %}[{{ m.content }}]{% endfor %}"
    assert render(ignores, CONVERSATION) == "[Be brief.\nHi][Hello][Bye]"
    uses = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert render(uses, CONVERSATION) == "[Be brief.][Hi][Hello][Bye]"
    # Only a first message is a system prompt for llama.cpp; a later one is left to the template.
    assert render(GEMMA_LIKE, [CONVERSATION[1], CONVERSATION[0]], add_generation_prompt=False) == (
        "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>system\nBe brief.<end_of_turn>\n"
    )


def test_system_message_with_content_parts_cannot_be_merged() -> None:
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, CONVERSATION[1]]
    with pytest.raises(ChatTemplateError, match="system message"):
        render(GEMMA_LIKE, parts)


def test_tools_are_undefined_without_tools() -> None:
    # As in llama.cpp (common_chat_template_direct_apply): templates that loop over tools render.
    msgs = [{"role": "user", "content": "Hi"}]
    assert render("{% for t in tools %}{{ t }}{% endfor %}{{ tools is defined }}", msgs) == "False"
    assert render("{{ documents is defined }}", msgs) == "False"


# -- every chat template in llama.cpp's collection, against transformers --------------------------

LLAMA_CPP_TEMPLATES = [
    "Apertus-8B-Instruct", "Apriel-1.6-15b-Thinker-fixed", "Bielik-11B-v3.0-Instruct", "ByteDance-Seed-OSS",
    "Cohere2MoE", "CohereForAI-c4ai-command-r-plus-tool_use", "CohereForAI-c4ai-command-r7b-12-2024-tool_use",
    "GLM-4.6", "GLM-4.7-Flash", "GigaChat3-10B-A1.8B", "GigaChat3.1-10B-A1.8B", "HuggingFaceTB-SmolLM3-3B",
    "Kimi-K2-Instruct", "Kimi-K2-Thinking", "Kimi-K3", "LFM2-8B-A1B", "LFM2.5-8B-A1B", "LFM2.5-Instruct",
    "MiMo-VL", "MiniMax-M1", "MiniMax-M2", "MiniMax-M3", "Mistral-Small-3.2-24B-Instruct-2506",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "NVIDIA-Nemotron-Nano-v2",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "Qwen-QwQ-32B", "Qwen-Qwen2.5-7B-Instruct",
    "Qwen-Qwen3-0.6B",
    "Qwen3-Coder", "Qwen3.5-4B", "Reka-Edge", "Spark2.5", "StepFun3.5-Flash",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai-DeepSeek-V3.1", "deepseek-ai-DeepSeek-V3.2", "deepseek-ai-DeepSeek-V4-Flash-0731",
    "deepseek-ai-DeepSeek-V4", "fireworks-ai-llama-3-firefunction-v2", "google-gemma-2-2b-it",
    "google-gemma-4-31B-it-interleaved", "google-gemma-4-31B-it", "ibm-granite-granite-3.3-2B-Instruct",
    "ibm-granite-granite-4.0", "ibm-granite-granite-4.1", "inclusionai-ling-3.0-flash",
    "llama-cpp-deepseek-r1",
    "llama-cpp-rwkv-world", "meetkai-functionary-medium-v3.1", "meetkai-functionary-medium-v3.2",
    "meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct",
    "microsoft-Phi-3.5-mini-instruct", "mistralai-Ministral-3-14B-Reasoning-2512",
    "mistralai-Mistral-Nemo-Instruct-2407", "moonshotai-Kimi-K2", "muse-glimmer", "openai-gpt-oss-120b",
    "openbmb-MiniCPM5-1B", "poolside-Laguna-S-2.1", "poolside-Laguna-XS-2.1", "poolside-Laguna-XS.2",
    "tencent-Hy3",
    "unsloth-Apriel-1.5", "unsloth-mistral-Devstral-Small-2507", "upstage-Solar-Open-100B",
]  # fmt: skip
# The BOS / EOS texts of the models behind the templates that write them; "<s>" / "</s>" otherwise.
SPECIAL_TEXTS = {
    "meta-llama-": ("<|begin_of_text|>", "<|eot_id|>"),
    "NousResearch-": ("<|begin_of_text|>", "<|im_end|>"),
    "fireworks-ai-": ("<|begin_of_text|>", "<|eot_id|>"),
    "meetkai-": ("<|begin_of_text|>", "<|eot_id|>"),
    "deepseek-ai-DeepSeek-R1-Distill-Llama": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "deepseek-ai-": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "llama-cpp-deepseek-r1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "google-gemma-": ("<bos>", "<eos>"),
    "Cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "microsoft-Phi-3.5": ("<s>", "<|endoftext|>"),
    "ByteDance-Seed-OSS": ("<seed:bos>", "<seed:eos>"),
    "LFM2": ("<|startoftext|>", "<|im_end|>"),
    "MiniMax-M3": ("]~!b[", "[e~["),
}
# Templates that loop over `tools` with no check: transformers always defines it (None without tools,
# on which they fail); llama.cpp leaves it undefined, which they render like an empty list.
ITERATE_TOOLS = {
    "CohereForAI-c4ai-command-r-plus-tool_use", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
}  # fmt: skip
# Templates with no system role (llama.cpp's capability check): the system prompt goes into the first turn.
NO_SYSTEM_ROLE = {"google-gemma-2-2b-it"}
CANNOT_RENDER = {
    "fireworks-ai-llama-3-firefunction-v2": "it needs `functions` (the tools as one JSON string), which only "
    "Fireworks' own server supplies; without tools there is nothing to put there",
}
STANDARD_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And 3+3?"},
]


def _special_texts(name: str) -> tuple[str, str]:
    return next((v for k, v in SPECIAL_TEXTS.items() if name.startswith(k)), ("<s>", "</s>"))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=CANNOT_RENDER[n], strict=True))
        if n in CANNOT_RENDER
        else n
        for n in LLAMA_CPP_TEMPLATES
    ],
)
def test_llama_cpp_templates_render_like_transformers(chat_templates_dir: Path, name: str) -> None:
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    template = (chat_templates_dir / (name + ".jinja")).read_text(encoding="utf-8")
    bos, eos = _special_texts(name)
    conversation = STANDARD_CONVERSATION
    if name in NO_SYSTEM_ROLE:
        system, first, *rest = STANDARD_CONVERSATION
        conversation = [{**first, "content": system["content"] + "\n" + first["content"]}, *rest]
    expected = chat_template_utils.render_jinja_template(
        [conversation],
        tools=[] if name in ITERATE_TOOLS else None,
        chat_template=template,
        add_generation_prompt=True,
        bos_token=bos,
        eos_token=eos,
    )[0][0]
    assert render_chat(template, STANDARD_CONVERSATION, bos_token=bos, eos_token=eos) == expected


def test_template_list_is_llama_cpps(chat_templates_dir: Path) -> None:
    assert sorted(p.stem for p in chat_templates_dir.glob("*.jinja")) == sorted(LLAMA_CPP_TEMPLATES)
