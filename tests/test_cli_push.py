"""``pipx-llama push`` then ``pull``/``run`` of the same OCI reference, against a real registry
(Debian's docker-registry) on 127.0.0.1: the real SmolLM2 goes into the registry in ollama's layout,
comes back into an empty store, verified, and runs."""

from __future__ import annotations

import json

import httpx
import pytest
from oci_registry import Registry

from pipx_llama.cli.main import main
from pipx_llama.models.oci import MANIFEST_TYPES, OLLAMA_CONFIG, OLLAMA_MODEL
from pipx_llama.models.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "registry")
    yield reg
    reg.stop()


def _env(monkeypatch, tmp_path, name: str) -> None:
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / name / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / name / "config"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / name / "docker"))
    for var in ("PIPX_LLAMA_MIRROR", "PIPX_LLAMA_OFFLINE", "PIPX_LLAMA_URL", "PIPX_LLAMA_TOKEN", "HF_TOKEN",
                "PIPX_LLAMA_REGISTRY"):
        monkeypatch.delenv(var, raising=False)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_push_smollm2_then_pull_into_an_empty_store_and_run(registry, smollm2_path, tmp_path, monkeypatch,
                                                             capsys):
    from conftest import SMOLLM2_SHA256

    ref = f"{registry.host}/lab/smollm2:135m-q4_1"
    _env(monkeypatch, tmp_path, "pusher")
    code, out, err = cli(capsys, "push", "-m", str(smollm2_path), ref, "--json")
    assert code == 0, err
    pushed = json.loads(out.strip().splitlines()[-1])
    assert (pushed["uploaded"], pushed["blobs"]) == (2, 2)

    # the registry holds ollama's layout, as any client reads it
    resp = httpx.get(f"http://{registry.host}/v2/lab/smollm2/manifests/135m-q4_1",
                     headers={"Accept": MANIFEST_TYPES[0]})
    assert resp.headers["docker-content-digest"] == pushed["digest"]
    image = resp.json()
    assert image["mediaType"] == MANIFEST_TYPES[0] and image["config"]["mediaType"] == OLLAMA_CONFIG
    layers = [(x["mediaType"], x["digest"]) for x in image["layers"]]
    assert layers == [(OLLAMA_MODEL, "sha256:" + SMOLLM2_SHA256)]
    config = httpx.get(f"http://{registry.host}/v2/lab/smollm2/blobs/{image['config']['digest']}").json()
    assert (config["model_format"], config["model_family"], config["file_type"]) == ("gguf", "llama", "Q4_1")

    code, out, err = cli(capsys, "push", "-m", str(smollm2_path), ref)
    assert code == 0 and "0 of 2 blobs uploaded" in out   # nothing sent twice

    _env(monkeypatch, tmp_path, "puller")
    code, out, err = cli(capsys, "pull", ref)
    assert code == 0, err
    assert "OCI reference: repository lab/smollm2 at " + registry.host in out
    assert Store(tmp_path / "puller" / "home").has_blob(SMOLLM2_SHA256)

    code, out, err = cli(capsys, "run", ref, "-p", "The capital of France is", "-n", "4", "--temp", "0")
    assert code == 0, err
    assert "OCI reference" in err and out.strip()

    code, out, err = cli(capsys, "verify")
    assert code == 0, err


def test_provision_takes_oci_references(registry, smollm2_path, tmp_path, monkeypatch, capsys):
    from conftest import SMOLLM2_SHA256

    ref = f"{registry.host}/lab/smollm2:q4_1"
    _env(monkeypatch, tmp_path, "pusher")
    assert cli(capsys, "push", "-m", str(smollm2_path), ref)[0] == 0
    _env(monkeypatch, tmp_path, "lab")
    lab = tmp_path / "lab.toml"
    lab.write_text(f'check_ram = false\n\n[[models]]\nname = "{ref}"\n')
    code, out, err = cli(capsys, "provision", str(lab), "--json")
    assert code == 0, err + out
    evs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [e["model"] for e in evs if e["kind"] == "model-ready"] == ["lab-smollm2-q4_1"]
    assert Store(tmp_path / "lab" / "home").has_blob(SMOLLM2_SHA256)
