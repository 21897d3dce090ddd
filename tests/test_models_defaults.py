"""A model's defaults from ollama's params/system/template layers and from a manifest's defaults table:
values checked (types, ranges, sizes), unknown params ignored, each refusal one line."""

from __future__ import annotations

import json

import pytest

from pipx_llama.errors import ModelFileError
from pipx_llama.models.defaults import MAX_TEXT_BYTES, ModelDefaults, defaults_from_table, from_ollama
from pipx_llama.models.manifest import ManifestError, parse_manifest, render_manifest

# the params layer of ollama's qwen2.5 library model, as `ollama show --modelfile` prints it back
QWEN_PARAMS = '{"stop":["<|im_start|>","<|im_end|>"],"temperature":0.7,"top_k":20,"top_p":0.8,' \
              '"repeat_penalty":1.05}'


def test_ollama_params_system_and_template_become_defaults():
    d = from_ollama(QWEN_PARAMS, "You are Qwen.", "{{ .Prompt }}")
    assert d.sampling == {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repeat_penalty": 1.05}
    assert d.stop == ("<|im_start|>", "<|im_end|>")
    assert (d.system, d.template) == ("You are Qwen.", "{{ .Prompt }}")


def test_unknown_params_are_ignored_and_ollama_specials_mapped():
    d = from_ollama(json.dumps({"mirostat": 2, "num_gpu": 99, "seed": -1, "num_predict": -2, "num_ctx": 2048,
                                "min_p": 0.1, "stop": "###", "penalize_newline": True}))
    assert d == ModelDefaults(min_p=0.1, n_ctx=2048, n_predict=-1, stop=("###",))
    assert from_ollama(None, "  ", "") == ModelDefaults()


@pytest.mark.parametrize(("params", "says"), [
    ('{"temperature": "hot"}', 'temperature must be a number, got "hot"'),
    ('{"temperature": true}', "temperature must be a number, got true"),
    ('{"temperature": 1e9}', "temperature must be between 0 and 100"),
    ('{"temperature": NaN}', "the layer is not JSON"),
    ('{"top_k": 1.5}', "top_k must be an integer"),
    ('{"top_k": -3}', "top_k must be between 0"),
    ('{"top_p": 0}', "top_p must be above 0"),
    ('{"num_ctx": 99999999999}', "num_ctx must be between 16"),
    ('{"stop": [1, 2]}', "stop must be a list of non-empty strings"),
    ('{"stop": [""]}', "stop must be a list of non-empty strings"),
    ('{"stop": ' + json.dumps(["x"] * 17) + "}", "stop has 17 strings"),
    ('{"stop": ["' + "x" * 300 + '"]}', "a stop string is longer than 256"),
    ("[1, 2]", "the layer is not a JSON object"),
    ("{", "the layer is not JSON"),
    ("[" * 100_000, "larger than 64 KiB"),
    ("[" * 30_000 + "]" * 30_000, "the layer is not JSON"),
])
def test_hostile_params_are_refused_in_one_line(params, says):
    with pytest.raises(ModelFileError) as err:
        from_ollama(params, where="lab/m")
    assert says in err.value.message and "\n" not in err.value.message
    assert err.value.message.startswith("lab/m params: ")


def test_hostile_texts_are_refused():
    with pytest.raises(ModelFileError, match="longer than 256 KiB"):
        from_ollama(None, "x" * (MAX_TEXT_BYTES + 1))
    with pytest.raises(ModelFileError, match="NUL"):
        from_ollama(None, None, "{{ .Prompt }}\x00")


def _manifest(defaults: object) -> str:
    return render_manifest({
        "format": 1, "name": "m", "description": "d", "license": "l", "architecture": "llama",
        "parameters": 1, "context_length": 8, "defaults": defaults,
        "variants": [{"name": "q", "format": "gguf", "quantization": "Q8_0",
                      "files": [{"path": "m.gguf", "size": 1, "sha256": "0" * 64}],
                      "sources": [{"type": "url", "base": "https://example.invalid/"}]}],
    })


def test_defaults_travel_in_the_manifest_and_back():
    d = from_ollama(QWEN_PARAMS, "Be brief 😀 \"é\" \\ \x7f\x01\n", "{{ .System }} {{ .Prompt }}")
    m = parse_manifest(_manifest(d.table()), "m.toml")
    assert m.defaults == d
    assert parse_manifest(_manifest(None), "m.toml").defaults == ModelDefaults()


def test_a_manifest_with_bad_defaults_names_the_field():
    with pytest.raises(ManifestError, match=r"m.toml: defaults: temperature must be between 0 and 100"):
        parse_manifest(_manifest({"temperature": -1.0}), "m.toml")
    with pytest.raises(ManifestError, match="unknown key 'mirostat'"):
        parse_manifest(_manifest({"mirostat": 2}), "m.toml")
    with pytest.raises(ModelFileError, match="defaults must be a table"):
        defaults_from_table([1], "m")
