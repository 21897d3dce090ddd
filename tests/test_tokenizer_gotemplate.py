"""ollama's Go templates, the subset pipx-llama renders: real templates from ollama's repository, the
prompts checked against what Go prints (ollama's own recorded expectations, or derived by hand from
text/template's rules and ollama's template.Execute), and constructs outside the subset refused by name."""

from __future__ import annotations

import pytest

from pipx_llama.errors import ChatTemplateError
from pipx_llama.tokenizer.gotemplate import NO_VALUE, parse_go_template

# ollama/ollama template/phi-3.gotmpl (no .Messages: run once per turn)
PHI3 = ("{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}{{ if .Prompt }}<|user|>\n"
        "{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>")
# ollama/ollama template/falcon-instruct.gotmpl (.Messages: run once)
FALCON = ('{{- if .Messages }}\n{{- if .System }}System: {{ .System }}\n{{ end }}\n{{- range .Messages }}\n'
          '{{- if eq .Role "user" }}User:\n{{ else if eq .Role "assistant" }}Falcon:\n'
          '{{ end }}{{ .Content }}\n{{ end }}Falcon:\n{{ else -}}\n{{ if .System }}System: {{ .System }}\n'
          '{{ end }}{{ if .Prompt }}User:\n{{ .Prompt }}\n{{ end }}Falcon:\n{{ .Response }}\n{{ end -}}')
# ollama/ollama template/alpaca.gotmpl and template/mistral-instruct.gotmpl (first lines): outside the subset
ALPACA = '{{- $system := "" }}\n{{- range .Messages }}\n{{- if eq .Role "system" }}'
MISTRAL = ('{{- if .Messages }}\n{{- range $index, $_ := .Messages }}\n'
           '{{- if eq .Role "user" }}[INST] {{ end }}')

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye?"}]


def test_phi3_runs_once_per_turn_and_the_last_turn_stops_at_the_response():
    got = parse_go_template(PHI3).render(CHAT)
    assert got == ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>"
                   "<|user|>\nBye?<|end|>\n<|assistant|>\n")


def test_falcon_ranges_over_the_messages_with_trimming():
    got = parse_go_template(FALCON).render(CHAT[1:])
    assert got == "User:\nHi\nFalcon:\nHello!\nUser:\nBye?\nFalcon:\n"


def test_consecutive_messages_of_a_role_are_merged_as_ollama_collates_them():
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    got = parse_go_template(FALCON).render(chat)
    assert got == "User:\na\n\nb\nFalcon:\n"


# ollama/ollama template/template_test.go TestExecuteWithMessages: templates and the output Go printed
_MISTRAL_SYS = '[INST] {{ if .System }}{{ .System }}\n\n{{ end }}'
_FRIENDS = [{"role": "user", "content": "Hello friend!"}, {"role": "assistant", "content": "Hello human!"},
            {"role": "user", "content": "What is your name?"}]


@pytest.mark.parametrize("template", [
    _MISTRAL_SYS + "{{ .Prompt }}[/INST] ",
    _MISTRAL_SYS + "{{ .Prompt }}[/INST] {{ .Response }}",
    _MISTRAL_SYS + '\n{{- range .Messages }}\n{{- if eq .Role "user" }}{{ .Content }}[/INST] '
                   '{{ else if eq .Role "assistant" }}{{ .Content }}[INST] {{ end }}\n{{- end }}',
])
@pytest.mark.parametrize(("messages", "expected"), [
    (_FRIENDS, "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "),
    ([{"role": "system", "content": "You are a helpful assistant!"}, *_FRIENDS],
     "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is your name?"
     "[/INST] "),
])
def test_ollamas_recorded_mistral_cases(template, messages, expected):
    assert parse_go_template(template).render(messages) == expected


@pytest.mark.parametrize("template", ["[INST] {{ .Prompt }}[/INST] ",
                                      "[INST] {{ .Prompt }}[/INST] {{ .Response }}"])
def test_ollamas_recorded_case_ending_with_the_assistant(template):
    chat = [*_FRIENDS, {"role": "assistant", "content": "My name is Ollama and I"}]
    assert parse_go_template(template).render(chat) == \
        "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is Ollama and I"


def test_ollamas_recorded_chatml_case():
    template = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}"
                "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}"
                "<|im_end|>\n")
    chat = [{"role": "system", "content": "You are a helpful assistant!"}, *_FRIENDS[:2],
            {"role": "user", "content": "What is your name?"}]
    assert parse_go_template(template).render(chat) == (
        "<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n"
        "<|im_start|>user\nHello friend!<|im_end|>\n"
        "<|im_start|>assistant\nHello human!<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_a_field_ollama_does_not_pass_prints_no_value_as_go_does():
    # .Messages makes it run once, without .Prompt (missingkey=zero on a map[string]any)
    t = parse_go_template("{{ range .Messages }}{{ .Content }}{{ end }}|{{ .Prompt }}|"
                          "{{ if .Prompt }}x{{ end }}")
    assert t.render([{"role": "user", "content": "q"}]) == f"q|{NO_VALUE}|"


@pytest.mark.parametrize(("template", "construct"), [
    (ALPACA, '$system := ""'),
    (MISTRAL, "$index, $_ := .Messages"),
    ("{{ .Tools }}{{ .Prompt }}", ".Tools"),
    ("{{ range .Messages }}{{ .ToolCalls }}{{ end }}", ".ToolCalls"),
    ("{{ with .System }}{{ . }}{{ end }}", "with .System"),
    ('{{ if and .System .Prompt }}x{{ end }}', "and .System .Prompt"),
    ("{{ .Prompt | printf }}", ".Prompt | printf"),
    ("{{ if .System }}x", "without its {{ end }}"),
    ("{{ end }}", "end"),
    ("{{ if .System }}" * 2000 + "{{ end }}" * 2000, "nested deeper than 32"),
    ("{{ if .Prompt }}{{ .Response }}{{ else }}y{{ end }}", "inside an {{ if }} that has an {{ else }}"),
])
def test_constructs_outside_the_subset_are_refused_by_name(template, construct):
    with pytest.raises(ChatTemplateError) as err:
        parse_go_template(template).render([{"role": "user", "content": "q"}])
    assert construct in err.value.message and "\n" not in err.value.message and "GGUF" in err.value.hint


def test_the_ggufs_own_chat_template_wins_and_a_gguf_without_one_uses_the_layer(smollm2_path):
    from pipx_llama.formats.gguf import open_gguf
    from pipx_llama.tokenizer.tokenizer import Tokenizer

    g = open_gguf(smollm2_path)
    try:
        meta = dict(g.metadata)
    finally:
        g.close()
    tok = Tokenizer.from_gguf_metadata(meta, smollm2_path.name)
    own = tok.chat_prompt(CHAT)
    # ollama's library models: the GGUF's own template
    assert tok.use_ollama_template(PHI3) is False and tok.chat_prompt(CHAT) == own

    del meta["tokenizer.chat_template"]
    bare = Tokenizer.from_gguf_metadata(meta, smollm2_path.name)
    assert bare.use_ollama_template(PHI3) is True
    assert bare.chat_prompt(CHAT).endswith("<|user|>\nBye?<|end|>\n<|assistant|>\n")
    assert bare.use_ollama_template(ALPACA) is True     # kept as its error: a raw completion still runs
    with pytest.raises(ChatTemplateError, match=r"\$system"):
        bare.chat_prompt(CHAT)
