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


def _push_with_defaults(registry: Registry, smollm2_path, repo: str, params: dict, system: str) -> str:
    """SmolLM2 pushed in ollama's layout with a params and a system layer, as `ollama create` writes them."""
    from conftest import SMOLLM2_SHA256

    from pipx_llama.models import oci

    model = oci.PushLayer(OLLAMA_MODEL, SMOLLM2_SHA256, smollm2_path.stat().st_size, path=smollm2_path)
    texts = [oci.text_layer("params", json.dumps(params)), oci.text_layer("system", system)]
    config = oci.ollama_config(model, texts, family="llama", file_type="Q4_1", parameters=134_515_008,
                               context_length=8192)
    oci.push_image(registry.host, repo, "v1", config, [model, *texts])
    return f"{registry.host}/{repo}:v1"


# stop strings no English continuation gets past: its first piece holds one of them
_STOPS = [" ", "e", "a", "o", ",", ".", "\n"]


def test_run_takes_the_params_and_system_layers_and_the_command_line_wins(registry, smollm2_path, tmp_path,
                                                                          monkeypatch, capsys):
    _env(monkeypatch, tmp_path, "lab")
    ref = _push_with_defaults(registry, smollm2_path, "lab/terse",
                              {"stop": _STOPS, "num_predict": 3, "temperature": 0, "mirostat": 2},
                              "You are a pirate. Answer every question in the words of an old pirate.")

    def run(*extra: str) -> dict:
        code, out, err = cli(capsys, "run", ref, "-p", "The capital of France is", "--json", *extra)
        assert code == 0, err
        return json.loads(out)

    # a plain completion of the prompt (the model's system prompt is for chat turns, below)
    by_model = run("--raw")
    assert by_model["finish_reason"] == "stop" and by_model["tokens"]["generated"] <= 3
    own_stop = run("--raw", "--stop", "QQQQ")        # the command line's stop strings replace the model's
    assert (own_stop["finish_reason"], own_stop["tokens"]["generated"]) == ("length", 3)  # its num_predict
    own_length = run("--raw", "--stop", "QQQQ", "-n", "5")
    assert (own_length["finish_reason"], own_length["tokens"]["generated"]) == ("length", 5)

    with_system = run("--chat", "--stop", "QQQQ")
    own_system = run("--chat", "--stop", "QQQQ", "--system", "Hi.")
    assert with_system["tokens"]["prompt"] > own_system["tokens"]["prompt"] + 10


def test_serve_takes_the_params_and_system_layers_and_requests_win(registry, smollm2_path, tmp_path,
                                                                   monkeypatch, capsys):
    from starlette.testclient import TestClient

    from pipx_llama.cli.main import build_parser
    from pipx_llama.cli.serve_cmd import _specs
    from pipx_llama.server import ModelRegistry, ModelSpec, ServerSettings, create_app

    _env(monkeypatch, tmp_path, "lab")
    system = "You are a pirate. Answer every question in the words of an old pirate captain."
    ref = _push_with_defaults(registry, smollm2_path, "lab/pirate",
                              {"stop": _STOPS, "num_predict": 3, "temperature": 0.25, "top_k": 7}, system)
    (spec,) = _specs(build_parser().parse_args(["serve", ref, "--top-k", "3"]), ModelSpec)
    assert (spec.sampling.temperature, spec.sampling.top_k) == (0.25, 3)   # the command line's top-k wins
    assert (spec.stop, spec.system, spec.max_tokens) == (tuple(_STOPS), system, 3)

    app = create_app(ModelRegistry([spec]), ServerSettings(allowed_hosts=["testserver"]))
    user = {"role": "user", "content": "What is the capital of France?"}
    with TestClient(app) as http:
        def chat(*messages: dict, **body: object) -> dict:
            r = http.post("/v1/chat/completions", json={"model": ref, "messages": list(messages), **body})
            assert r.status_code == 200, r.text
            return {**r.json()["usage"], "finish": r.json()["choices"][0]["finish_reason"]}

        assert chat(user)["finish"] == "stop"
        mine = chat(user, stop=["QQQQ"], temperature=0)
        assert (mine["finish"], mine["completion_tokens"]) == ("length", 3)
        assert chat(user, stop=["QQQQ"], max_tokens=5, temperature=0)["completion_tokens"] == 5
        own_system = chat({"role": "system", "content": "Hi."}, user, max_tokens=1)
        assert mine["prompt_tokens"] > own_system["prompt_tokens"] + 10
