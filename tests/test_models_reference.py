"""Reference parsing: every kind, the strict grammar of registry references, one-line errors with hints."""

from __future__ import annotations

import pytest

from pipx_llama.errors import UsageError
from pipx_llama.models.reference import OLLAMA_REGISTRY, HfName, OciName, parse_reference

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(("text", "oci"), [
    ("library/qwen2.5:0.5b", OciName(None, "library/qwen2.5", "0.5b", None)),
    ("library/qwen2.5", OciName(None, "library/qwen2.5", None, None)),
    ("ollama.com/library/qwen2.5:0.5b", OciName(OLLAMA_REGISTRY, "library/qwen2.5", "0.5b", None)),
    ("registry.ollama.ai/library/smollm2:135m", OciName(OLLAMA_REGISTRY, "library/smollm2", "135m", None)),
    ("127.0.0.1:5000/lab/smol:v1", OciName("127.0.0.1:5000", "lab/smol", "v1", None)),
    ("localhost/lab/smol", OciName("localhost", "lab/smol", None, None)),
    ("ghcr.io/org/team/model@sha256:" + HEX, OciName("ghcr.io", "org/team/model", None, "sha256:" + HEX)),
    ("harbor.example.invalid/ns/m:v1@sha256:" + HEX,
     OciName("harbor.example.invalid", "ns/m", "v1", "sha256:" + HEX)),
])
def test_oci_references(text: str, oci: OciName) -> None:
    ref = parse_reference(text)
    assert (ref.kind, ref.oci, ref.hf) == ("oci", oci, None)
    assert ref.describe().startswith("OCI reference: repository " + oci.repository)
    assert oci.reference == (oci.digest or oci.tag or "latest")


@pytest.mark.parametrize(("text", "hf"), [
    ("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF", HfName("bartowski/SmolLM2-135M-Instruct-GGUF")),
    ("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
     HfName("bartowski/SmolLM2-135M-Instruct-GGUF", quant="Q4_K_M")),
    ("huggingface.co/o/r:q8_0@v1.0", HfName("o/r", quant="q8_0", revision="v1.0")),
    ("hf.co/o/r/sub/model-Q4_0.gguf", HfName("o/r", file="sub/model-Q4_0.gguf")),
    ("hf.co/o/r/model.gguf@" + HEX[:40], HfName("o/r", file="model.gguf", revision=HEX[:40])),
    ("https://hf.co/o/r:Q8_0", HfName("o/r", quant="Q8_0")),
])
def test_hf_references(text: str, hf: HfName) -> None:
    ref = parse_reference(text)
    assert (ref.kind, ref.hf, ref.oci) == ("hf", hf, None)
    assert ref.describe().startswith("Hugging Face reference: repository " + hf.repo)


@pytest.mark.parametrize(("text", "kind"), [
    ("smollm2-135m-instruct", "name"), ("7B", "name"), ("", "name"), ("model.gguf", "file"),
    ("./models/x.gguf", "file"), ("/abs/x", "file"), ("C:\\models\\x.gguf", "file"),
])
def test_names_and_files_unchanged(text: str, kind: str) -> None:
    assert parse_reference(text).kind == kind


def test_an_existing_relative_path_is_a_file_not_a_registry_reference(tmp_path, monkeypatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert parse_reference("models/weights").kind == "file"


@pytest.mark.parametrize(("text", "says", "hint"), [
    ("qwen2.5:7b", "needs a namespace", "library/qwen2.5:TAG"),
    ("Library/qwen", "bad path component 'Library'", "NAMESPACE/NAME"),
    ("ns/a..b", "bad path component 'a..b'", "NAMESPACE/NAME"),
    ("ns/m:bad tag", "bad tag", "letters"),
    ("ns/m:" + "t" * 129, "bad tag", "letters"),
    ("ns/m@sha256:abc", "bad digest", "64 lowercase hex"),
    ("ns/m@md5:" + HEX, "bad digest", "64 lowercase hex"),
    ("registry.example.invalid/onlyname", "a namespace and a name are needed", "NAMESPACE/NAME"),
    ("bad_host.example.invalid/ns/m", "bad registry host", "NAMESPACE/NAME"),
    ("ns/" + "a" * 300, "longer than 255", "NAMESPACE/NAME"),
    ("hf.co/owner", "no repository", "hf.co/OWNER/REPO"),
    ("hf.co/o/r/weights.bin", "is not a .gguf file", ":QUANT"),
    ("hf.co/o/r/../x.gguf", "bad file path", "hf.co/OWNER/REPO"),
    ("hf.co/o/r:Q4 K", "bad quantization", "Q4_K_M"),
    ("hf.co/o--x/r", "bad repository name part", "hf.co/OWNER/REPO"),
    ("hf.co/o/r@../main", "bad revision", "commit"),
])
def test_malformed_references_are_refused_in_one_line(text: str, says: str, hint: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_reference(text)
    assert says in err.value.message and "\n" not in err.value.message
    assert hint in err.value.hint


def test_a_hostile_long_reference_is_refused_quickly() -> None:
    with pytest.raises(UsageError):
        parse_reference("a" * 5000 + "." * 3 + "/x/y!")
