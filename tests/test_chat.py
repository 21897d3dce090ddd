"""Chat templates rendered as transformers renders them, and the built-in fallbacks."""

from __future__ import annotations

import datetime
import tracemalloc
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipx_llama.errors import ChatTemplateError
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.tokenizer.chat import (
    CHATML_TEMPLATE,
    LLAMA2_TEMPLATE,
    _GenerationBlock,
    _raise_exception,
    _tojson,
    builtin_template,
    render_chat,
    tool_caps,
)
from pipx_llama.tokenizer.sandbox import Limits
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
    template = ("{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif "
                "%}\n{% endfor %}")
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


# --- hostile templates: bounded in time, size, work and nesting ---------------------------------------------

# Small limits keep each case quick and make it stop on the same limit on every machine.
SMALL = Limits(seconds=60.0, max_steps=20_000, max_chars=1 << 20, max_work=1 << 24, max_depth=32)
NEST = "{% set a = 'x' * 100000 %}{% set b = [a,a,a,a,a,a,a,a,a,a] %}{% set c = [b,b,b,b,b,b,b,b,b,b] %}"
HOSTILE = [
    (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "more than 20000 steps",
    ),
    (
        "{% set L = range(100000) %}{% for a in L %}{% for b in L %}{% endfor %}{% endfor %}",
        "more than 20000 steps",
    ),
    (
        "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% else %}x{% endif %}{% endmacro %}{{ f(30) }}",
        "more than 20000 steps",
    ),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nest more than 32 deep"),
    ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "nest more than 32 deep"),
    ("{{ 'x' * 10**10 }}", "a repeated value would be 10000000000 characters"),
    ("{{ [1] * 10**9 }}", "a repeated value would be"),
    ("{{ 2 ** (10**9) }}", "a power of integers would exceed 65536 bits"),
    (
        "{% set ns = namespace(v=3) %}{% for i in range(40) %}{% set ns.v = ns.v * ns.v %}{% endfor %}{{ "
        "ns.v > 0 }}",
        "a product of integers would exceed 65536 bits",
    ),
    (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "a concatenation would be 2097152 characters",
    ),
    (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "a '~' concatenation would be",
    ),
    (
        "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "a concatenation would be",
    ),
    ("{{ 'x'|center(10**10) }}", "a padded string would be 10000000000"),
    ("{{ 'x'.center(10**10) }}", "a padded string would be 10000000000"),
    ("{{ 'x'.zfill(10**10) }}", "a padded string"),
    ("{{ ['x']|map('center', 10**10)|list }}", "a padded string"),
    ("{{ '{:>10000000000}'.format(1) }}", "a formatted field would be 10000000000"),
    ("{{ '{:>{w}}'.format(1, w=10**10) }}", "nested replacement fields"),
    ("{{ '%010000000000d' % 1 }}", "a '%' formatted field would be 10000000000"),
    ("{{ '%*d' % (10**9, 1) }}", "with a '*' width"),
    ("{{ '%010000000000d'|format(1) }}", "a '%' formatted field"),
    ("{{ 'x\nx'|indent(10**9) }}", "an indented string would be 2000000003"),
    ("{{ [1]|batch(10**9, 0)|list }}", "linecount 1000000000 is more than 65536"),
    ("{{ [1]|slice(10**7)|list }}", "slices 10000000 is more than 65536"),
    ("{{ ('x' * 100000).replace('x', 'y' * 100000) }}", "a string after replace would be 10000000000"),
    ("{{ ('x' * 100000)|replace('x', 'y' * 100000) }}", "a string after replace"),
    ("{{ range(1000)|join('x' * 100000) }}", "a joined string would be"),
    ("{{ ('x' * 100000).join(['a'] * 1000) }}", "a joined string would be"),
    (
        "{{ ('x' * 100).wordwrap }}{{ ('x ' * 100000)|wordwrap(1, wrapstring='y' * 1000) }}",
        "a wrapped string",
    ),
    ("{{ ('\t' * 100000).expandtabs(100000) }}", "a string with expanded tabs"),
    ("{{ ('x' * 100000).translate({120: 'y' * 100000}) }}", "a translated string"),
    ("{{ ([[1]] * 30000)|sum(start=[]) }}", "more than 20000 steps"),  # sums of lists: a step per item
    ("{{ messages|tojson(indent=1000000) }}", "tojson indent 1000000 is more than 64"),
    # a value built from repeated references: its text is checked before str() writes it
    (NEST + "{{ c }}", "an output value would be"),
    (NEST + "{{ c|string }}", "the input of the string filter would be"),
    (NEST + "{{ c ~ '' }}", "a '~' concatenation would be"),
    (NEST + "{{ c|tojson }}", "the input of the tojson filter"),
    (NEST + "{{ c|pprint }}", "the input of the pprint filter"),
    (NEST + "{{ '%s' % [c] }}", "the values of a '%' format"),
    (NEST + "{{ '{}'.format(c) }}", "the values of str.format"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "its output would be more than 1048576"),
    (
        "{% set big = 'x' * 1000000 %}{% set x %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endset "
        "%}",
        "more than 16777216 characters",
    ),
    (
        "{% macro m() %}{% for i in range(100000) %}" + "A" * 1000 + "{% endfor %}{% endmacro %}{{ m() }}",
        "more than 16777216 characters",
    ),
]


@pytest.mark.parametrize("template, reason", HOSTILE)
def test_hostile_templates_are_stopped_with_a_clear_error(template, reason):
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError) as exc:
            render(template, [{"role": "user", "content": "hi"}], limits=SMALL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.message.startswith("the chat template was stopped: ") and reason in exc.value.message
    assert "\n" not in exc.value.message and len(exc.value.message) < 300
    assert peak < 32 << 20, peak  # never more than a few times the 1 MiB size limit


def test_a_template_that_spins_is_stopped_by_the_clock():
    spin = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"stopped: it ran for more than 0\.2 s"):
        render(spin, [{"role": "user", "content": "hi"}], limits=Limits(seconds=0.2, max_steps=10**15))


def test_default_limits_stop_hostile_templates_too():
    for template in ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                     "{{ 'x' * 10**10 }}", NEST + "{% set d = [c,c,c,c,c,c,c,c,c,c] %}{{ d }}"):
        with pytest.raises(ChatTemplateError, match="the chat template was stopped: "):
            render(template, [{"role": "user", "content": "hi"}])


def test_hostile_template_sources_are_refused_once():
    with pytest.raises(ChatTemplateError, match=r"is 2097152 characters long \(at most 1048576\)"):
        render("x" * (2 << 20), [{"role": "user", "content": "hi"}])
    deep = "{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}"
    with pytest.raises(ChatTemplateError, match="does not parse: it is nested too deeply"):
        render(deep, [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="'lipsum' is undefined"):
        render("{{ lipsum(10**6) }}", [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError) as exc:
        render("{{ raise_exception('x' * 1000000) }}", [{"role": "user", "content": "hi"}])
    assert len(exc.value.message) < 400


FEATURES = """{%- set ns = namespace(n=0, sys='') -%}
{%- macro tree(node, depth) -%}{{ node.name }}{% if node.kids %}({% for k in node.kids %}{{ tree(k, depth + 1) }}
{%- if not loop.last %},{% endif %}{% endfor %}){% endif %}{%- endmacro -%}
{%- for m in messages -%}
{%- if m.role == 'system' %}{% set ns.sys = m.content|trim %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
[{{ loop.index }}/{{ loop.length }}{{ ' last' if loop.last }}] {{ m.role|upper }}: {{ m.content.strip()|replace('  ', ' ') }}
{% if m.tool_calls %}{{ m.tool_calls|tojson(indent=2) }}{% endif %}
{%- endfor -%}
{{ '%s messages, %d counted; %05.1f%%' % (messages|length, ns.n, 12.5) }} {{ '{}|{:>6}'.format(ns.sys, 'r') }}
{{ messages|map(attribute='role')|join(', ') }} {{ messages|selectattr('role', 'eq', 'user')|list|length }}
{{ tree({'name': 'a', 'kids': [{'name': 'b', 'kids': [{'name': 'c'}]}, {'name': 'd'}]}, 0) }}
{% for row in [1, 2, 3, 4, 5]|batch(2, 0) %}{{ row|sum }};{% endfor %} {{ 'a,b'.split(',')|reverse|join }}
{% for x in [[1, [2]], [3]] recursive %}<{{ x if x is number else loop(x) }}>{% endfor %}
{%- generation %} gen{% endgeneration %}{{ raise_exception('no') if false }}{{ ([1] * 3 + [2])|string }}
"""  # noqa: E501


def test_real_template_features_render_as_in_the_plain_sandbox():
    """The budgeted environment gives the same text as jinja2's own immutable sandbox."""
    messages = [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Hi  there"},
        {"role": "assistant", "content": "Hello", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]},
        {"role": "user", "content": "Bye"},
    ]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    ctx = {"messages": messages, "tools": None, "documents": None, "add_generation_prompt": True,
           "bos_token": "<s>", "eos_token": "</s>"}
    expected = env.from_string(FEATURES).render(**ctx)
    assert render(FEATURES, messages) == expected
    assert "[2/4] USER: Hi there" in expected and "a(b(c),d)" in expected and "<<1><<2>>><<3>>" in expected


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


TOOLS_PROBE = "{% if tools is defined %}[{{ tools | map(attribute='function.name') | join(',') }}]" \
              "{% endif %}" \
              "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_tools_are_defined_only_with_tools() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert render(TOOLS_PROBE, msgs) == "hi"
    assert render(TOOLS_PROBE, msgs, tools=[tool]) == "[f]hi"


@pytest.mark.parametrize(("name", "caps"), [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", (True, True, True)),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", (True, True, True)),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", (True, True, True)),
    ("google-gemma-2-2b-it.jinja", (False, False, False)),  # no tool role: it raises on one
])
def test_tool_caps(chat_templates_dir: Path, name: str, caps: tuple[bool, bool, bool]) -> None:
    got = tool_caps((chat_templates_dir / name).read_text())
    assert (got.tools, got.tool_calls, got.tool_responses) == caps


def test_tool_caps_of_chatml(smol_meta: dict) -> None:
    # renders any role's content, knows nothing of tools
    got = tool_caps(smol_meta["tokenizer.chat_template"])
    assert (got.tools, got.tool_calls, got.tool_responses) == (False, False, True)
