"""OCI registries in ollama's layout, against a real registry (Debian's docker-registry) on 127.0.0.1:
push, resolve, pull through the store, digests checked, auth from the config and from Docker's
config.json, and every refusal in one line naming what it refused."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from oci_registry import Registry, TokenGate

from pipx_llama.errors import PipxLlamaError, UsageError
from pipx_llama.fetch.errors import AccessDenied
from pipx_llama.fetch.http import partial_progress
from pipx_llama.models import oci
from pipx_llama.models.pull import PullError, pull
from pipx_llama.models.reference import parse_reference
from pipx_llama.models.resolve import resolve_manifest
from pipx_llama.models.sources import PullOptions
from pipx_llama.models.store import Store


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "registry")
    yield reg
    reg.stop()


@pytest.fixture
def no_docker_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))


def _bytes_layer(data: bytes, media: str = oci.OLLAMA_MODEL) -> oci.PushLayer:
    return oci.PushLayer(media, hashlib.sha256(data).hexdigest(), len(data), data=data)


def _push(host: str, repo: str, tag: str, model: bytes, *, extra: list[oci.PushLayer] | None = None,
          credentials=None) -> tuple[oci.PushLayer, oci.PushResult]:
    layer = _bytes_layer(model)
    others = list(extra or [])
    config = oci.ollama_config(layer, others, family="llama", file_type="Q4_1", parameters=134_515_008,
                               context_length=8192)
    return layer, oci.push_image(host, repo, tag, config, [layer, *others], credentials=credentials)


def _options(**kw) -> PullOptions:
    return PullOptions(**kw)


def test_push_resolve_pull_roundtrip_pins_the_image_digest(registry, tmp_path, no_docker_config):
    data = b"GGUF" + bytes(range(256)) * 64
    template = oci.text_layer("template", "{{ .Prompt }}")
    layer, pushed = _push(registry.host, "lab/tiny", "v1", data, extra=[template])
    assert pushed.uploaded == pushed.blobs == 3

    ref = parse_reference(f"{registry.host}/lab/tiny:v1")
    manifest = resolve_manifest(ref, None, _options())  # type: ignore[arg-type]
    assert manifest.name == "lab-tiny-v1"
    assert pushed.digest in manifest.text and pushed.digest in manifest.description
    facts = (manifest.architecture, manifest.parameters, manifest.context_length)
    assert facts == ("llama", 134_515_008, 8192)
    variant = manifest.variant()
    assert (variant.quantization, variant.files[0].sha256, variant.files[0].size) == ("Q4_1", layer.sha256,
                                                                                     len(data))

    store = Store(tmp_path / "store")
    result = pull(store, manifest, _options())
    assert result.file_path().read_bytes() == data
    record = store.read_provenance(manifest.name, variant.name)
    assert pushed.digest in record["manifest_text"]

    again = oci.push_image(registry.host, "lab/tiny", "v1",
                           oci.ollama_config(layer, [template], family="llama", file_type="Q4_1",
                                             parameters=134_515_008, context_length=8192), [layer, template])
    assert (again.uploaded, again.digest) == (0, pushed.digest)  # blobs were there: nothing re-sent

    pinned = resolve_manifest(parse_reference(f"{registry.host}/lab/tiny@{pushed.digest}"), None,  # type: ignore[arg-type]
                              _options())
    assert [(f.sha256, f.size) for f in pinned.variant().files] == [(layer.sha256, len(data))]


def test_a_tampered_blob_is_refused_naming_its_digest(registry, tmp_path, no_docker_config):
    data = b"GGUF" + b"\x01" * 5000
    layer, _ = _push(registry.host, "lab/tamper", "latest", data)
    manifest = resolve_manifest(parse_reference(f"{registry.host}/lab/tamper"), None, _options())  # type: ignore[arg-type]
    blob = registry.blob_path(layer.digest)
    damaged = bytearray(blob.read_bytes())
    damaged[100] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    store = Store(tmp_path / "store")
    with pytest.raises(PullError) as err:
        pull(store, manifest, _options())
    assert "checksum mismatch" in err.value.message and f"sha256:{layer.sha256}" in err.value.message
    assert [f.kind for f in err.value.failures] == ["checksum"]
    assert not store.has_blob(layer.sha256)


def test_a_wrong_pinned_digest_and_missing_tags_are_refused(registry, no_docker_config):
    _push(registry.host, "lab/pin", "v1", b"GGUF-pin")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(PipxLlamaError) as err:
        resolve_manifest(parse_reference(f"{registry.host}/lab/pin@{wrong}"), None, _options())  # type: ignore[arg-type]
    assert "lab/pin" in err.value.message
    with pytest.raises(PipxLlamaError) as err:
        resolve_manifest(parse_reference(f"{registry.host}/lab/pin:v2"), None, _options())  # type: ignore[arg-type]
    assert "404" in err.value.message and "\n" not in err.value.message


@pytest.mark.parametrize(("media", "named"), [
    ("application/vnd.ollama.image.projector", "vision projector"),
    ("application/vnd.ollama.image.adapter", "LoRA adapter"),
])
def test_layers_we_cannot_run_are_refused_by_name(registry, no_docker_config, media, named):
    _push(registry.host, "lab/vision", "v1", b"GGUF-model", extra=[_bytes_layer(b"GGUF-extra", media)])
    with pytest.raises(UsageError) as err:
        resolve_manifest(parse_reference(f"{registry.host}/lab/vision:v1"), None, _options())  # type: ignore[arg-type]
    assert named in err.value.message and media in err.value.message


def test_params_and_system_layers_become_the_models_defaults_and_stay_in_the_lock(registry, tmp_path,
                                                                                 no_docker_config):
    params = oci.text_layer("params", '{"stop":["<|im_end|>"],"temperature":0.25,"top_k":7,"num_ctx":512,'
                                      '"num_predict":9,"mirostat":2}')
    system = oci.text_layer("system", "You answer in French.")
    _push(registry.host, "lab/chatty", "v1", b"GGUF" + bytes(64), extra=[params, system])
    ref = parse_reference(f"{registry.host}/lab/chatty:v1")
    locks = tmp_path / "locks"
    online = resolve_manifest(ref, None, _options(lock_dir=locks))  # type: ignore[arg-type]
    d = online.defaults
    assert d.sampling == {"temperature": 0.25, "top_k": 7} and d.stop == ("<|im_end|>",)
    assert (d.n_ctx, d.n_predict, d.system, d.template) == (512, 9, "You answer in French.", None)
    offline = resolve_manifest(ref, None, _options(offline=True, lock_dir=locks))  # type: ignore[arg-type]
    assert offline.defaults == d


def test_a_hostile_params_layer_is_refused_in_one_line(registry, no_docker_config):
    params = oci.text_layer("params", '{"temperature": "very hot"}')
    _push(registry.host, "lab/hot", "v1", b"GGUF" + bytes(64), extra=[params])
    with pytest.raises(oci.RegistryError) as err:
        resolve_manifest(parse_reference(f"{registry.host}/lab/hot:v1"), None, _options())  # type: ignore[arg-type]
    assert "lab/hot@sha256:" in err.value.message and 'temperature must be a number, got "very hot"' in \
        err.value.message and "\n" not in err.value.message


def test_unknown_names_are_matched_against_references_pulled_before(registry, tmp_path, no_docker_config):
    from pipx_llama.models.known import known_names, suggestions
    from pipx_llama.models.manifest import load_catalog

    _push(registry.host, "lab/smollm2", "135m", b"GGUF" + bytes(64))
    locks = tmp_path / "locks"
    resolve_manifest(parse_reference(f"{registry.host}/lab/smollm2:135m"), None,  # type: ignore[arg-type]
                     _options(lock_dir=locks))
    catalog = load_catalog()
    known = known_names(catalog, locks)
    pulled = f"{registry.host}/lab/smollm2:135m"
    assert [(k.kind, k.model) for k in known if k.text == pulled] == [("oci", "lab-smollm2-135m")]
    assert {"name", "alias"} <= {k.kind for k in known}
    assert pulled in suggestions("smollm2:135", catalog, locks)
    with pytest.raises(UsageError) as err:
        resolve_manifest(parse_reference("smolm2-135"), catalog, _options(lock_dir=locks))
    assert "no model named 'smolm2-135'" in err.value.message and pulled in err.value.hint
    (locks / "oci" / "junk.toml").write_text("not toml [")   # a damaged lock costs only its hint
    assert pulled in suggestions("smollm2:135", catalog, locks)


def test_offline_uses_the_last_resolution_and_never_asks_the_registry(registry, tmp_path, no_docker_config):
    layer, pushed = _push(registry.host, "lab/off", "v1", b"GGUF-off")
    ref = parse_reference(f"{registry.host}/lab/off:v1")
    locks = tmp_path / "locks"
    with pytest.raises(PipxLlamaError) as err:
        resolve_manifest(ref, None, _options(offline=True, lock_dir=locks))  # type: ignore[arg-type]
    assert "offline" in err.value.message
    online = resolve_manifest(ref, None, _options(lock_dir=locks))  # type: ignore[arg-type]
    registry.stop()
    offline = resolve_manifest(ref, None, _options(offline=True, lock_dir=locks))  # type: ignore[arg-type]
    assert offline.text == online.text and pushed.digest in offline.text
    assert offline.variant().files[0].sha256 == layer.sha256


@pytest.fixture
def auth_registry(tmp_path):
    reg = Registry(tmp_path / "registry", users={"alice": "s3cret"})
    yield reg
    reg.stop()


def test_basic_auth_from_the_config_and_from_docker_config_json(auth_registry, tmp_path, monkeypatch):
    host = auth_registry.host
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    with pytest.raises(AccessDenied) as err:
        _push(host, "lab/private", "v1", b"GGUF-private")
    assert "no credentials were found" in err.value.message and "docker login" in err.value.hint

    layer, _ = _push(host, "lab/private", "v1", b"GGUF-private", credentials=("alice", "s3cret"))
    ref = parse_reference(f"{host}/lab/private:v1")
    with pytest.raises(AccessDenied):
        resolve_manifest(ref, None, _options())  # type: ignore[arg-type]
    with pytest.raises(AccessDenied) as err:
        resolve_manifest(ref, None, _options(registry_credentials={host: "alice:wrong"}))  # type: ignore[arg-type]
    assert "credentials were sent" in err.value.message

    configured = _options(registry_credentials={host: "alice:s3cret"})
    manifest = resolve_manifest(ref, None, configured)  # type: ignore[arg-type]
    assert pull(Store(tmp_path / "s1"), manifest, configured).file_path().read_bytes() == b"GGUF-private"

    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps(
        {"auths": {host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    manifest = resolve_manifest(ref, None, _options())  # type: ignore[arg-type]
    assert pull(Store(tmp_path / "s2"), manifest, _options()).file_path().read_bytes() == b"GGUF-private"


@pytest.fixture
def token_gate(registry):
    gate = TokenGate(registry, users={"alice": "s3cret"})
    yield gate
    gate.stop()


def test_bearer_tokens_anonymous_for_pull_and_credentialed_for_push(token_gate, tmp_path, monkeypatch):
    host = token_gate.host
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    with pytest.raises(AccessDenied):   # an anonymous token does not allow a push
        _push(host, "lab/gated", "v1", b"GGUF-gated")
    layer, pushed = _push(host, "lab/gated", "v1", b"GGUF-gated", credentials=("alice", "s3cret"))
    assert ("alice", "repository:lab/gated:pull,push") in token_gate.issued

    token_gate.issued.clear()
    manifest = resolve_manifest(parse_reference(f"{host}/lab/gated:v1"), None, _options())  # type: ignore[arg-type]
    assert pull(Store(tmp_path / "store"), manifest, _options()).file_path().read_bytes() == b"GGUF-gated"
    assert token_gate.issued and all(user is None and scope == "repository:lab/gated:pull"
                                     for user, scope in token_gate.issued)


def test_an_independent_client_reads_what_we_push_with_the_same_digests(registry, tmp_path, no_docker_config):
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        msg = "skopeo is not installed (apt-get install skopeo)"
        if os.environ.get("PIPX_LLAMA_REQUIRE_TEST_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    data = b"GGUF" + bytes(range(256)) * 32
    template = oci.text_layer("template", "{{ .Prompt }}")
    layer, pushed = _push(registry.host, "lab/skopeo", "v1", data, extra=[template])
    src = f"docker://{registry.host}/lab/skopeo:v1"
    raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", src],
                         capture_output=True, check=True, timeout=120).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == pushed.digest
    # skopeo 1.9 reads the manifest as it is, but will not copy or inspect an image whose layers have
    # ollama's media types (unknown docker v2s2 layer types): the digests are compared on the manifest
    assert [x["digest"] for x in json.loads(raw)["layers"]] == [layer.digest, template.digest]
    manifest = resolve_manifest(parse_reference(f"{registry.host}/lab/skopeo:v1"), None, _options())  # type: ignore[arg-type]
    assert manifest.variant().files[0].sha256 == layer.sha256


# gemma:2b as registry.ollama.ai served it (recorded in ollama users' stores:
# ~/.ollama/models/manifests/registry.ollama.ai/library/gemma/2b), byte for byte.
GEMMA_2B = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":'
    b'{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:887433b89a901c156f7e69444'
    b'42f3c9e57f3c55d6ed52042cbb7303aea994290","size":483},"layers":[{"mediaType":"application/vnd.ollama.image'
    b'.model","digest":"sha256:c1864a5eb19305c40519da12cc543519e48a0697ecd30e15d5ac228644957d12","size":'
    b'1678447520},{"mediaType":"application/vnd.ollama.image.license","digest":"sha256:097a36493f718248845233'
    b'af1d3fefe7a303f864fae13bc31a3a9704229378ca","size":8433},{"mediaType":"application/vnd.ollama.image.'
    b'template","digest":"sha256:109037bec39c0becc8221222ae23557559bc594290945a2c4221ab4f303b8871","size":136},'
    b'{"mediaType":"application/vnd.ollama.image.params","digest":"sha256:22a838ceb7fb22755a3b0ae9b4eadde629d19'
    b'be1f651f73efb8c6b4e2cd0eea0","size":84}]}'
)


def test_a_recorded_ollama_library_manifest_reads_as_ollama_does():
    image = oci.parse_image_manifest(GEMMA_2B, "sha256:" + hashlib.sha256(GEMMA_2B).hexdigest(), "gemma:2b")
    assert image.media_type == oci.MANIFEST_TYPES[0] and image.config.media_type == oci.OLLAMA_CONFIG
    kinds = [oci.OLLAMA_TEXT.get(x.media_type, x.media_type) for x in image.layers]
    assert kinds == [oci.OLLAMA_MODEL, "license", "template", "params"]
    assert image.layers[0].sha256 == "c1864a5eb19305c40519da12cc543519e48a0697ecd30e15d5ac228644957d12"
    assert image.layers[0].size == 1678447520


@pytest.mark.parametrize(("raw", "says"), [
    (b"[]", "schemaVersion"),
    (b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","layers":[]}', "media type"),
    (GEMMA_2B.replace(b'"size":136', b'"size":-1'), "size"),
    (GEMMA_2B.replace(b"sha256:109037bec39c", b"sha256:XYZ"), "digest"),
    (b"\xff" * 10, "not JSON"),
])
def test_hostile_manifests_are_refused_in_one_line(raw, says):
    with pytest.raises(PipxLlamaError) as err:
        oci.parse_image_manifest(raw, "sha256:" + "0" * 64, "lab/x:v1")
    assert says in err.value.message and "lab/x:v1" in err.value.message and "\n" not in err.value.message


def test_an_unreachable_registry_is_one_line(tmp_path, no_docker_config):
    from oci_registry import _free_port

    ref = parse_reference(f"127.0.0.1:{_free_port()}/lab/none:v1")
    with pytest.raises(PipxLlamaError) as err:
        resolve_manifest(ref, None, _options())  # type: ignore[arg-type]
    assert "cannot reach the registry 127.0.0.1:" in err.value.message and "\n" not in err.value.message
    with pytest.raises(PipxLlamaError) as err:
        _push(ref.oci.registry or "", "lab/none", "v1", b"GGUF")
    assert "cannot reach the registry 127.0.0.1:" in err.value.message


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")
def test_sigkill_mid_blob_then_pull_again_resumes(registry, tmp_path):
    data = os.urandom(3 << 20)
    layer, _ = _push(registry.host, "lab/big", "v1", data)
    gate = TokenGate(registry, users={}, rate=512 << 10)
    env = {**os.environ, "PIPX_LLAMA_HOME": str(tmp_path / "home"), "DOCKER_CONFIG": str(tmp_path / "none"),
           "PIPX_LLAMA_CONFIG_DIR": str(tmp_path / "config")}
    cmd = [sys.executable, "-m", "pipx_llama.cli", "pull", f"{gate.host}/lab/big:v1"]
    store = Store(tmp_path / "home")
    part = store.partial_path(layer.sha256)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while (partial_progress(part) or (0, None))[0] < (1 << 20):
            assert proc.poll() is None and time.monotonic() < deadline, "the pull ended before the kill"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kept = (partial_progress(part) or (0, None))[0]
        assert 0 < kept < len(data)
        # the gate may still be pushing a chunk into the killed pull's closing socket: count once it is still
        before = -1
        while before != gate.blob_bytes[layer.digest]:
            before = gate.blob_bytes[layer.digest]
            time.sleep(0.5)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert gate.blob_bytes[layer.digest] - before == len(data) - kept   # only the rest was fetched
        assert store.blob_path(layer.sha256).read_bytes() == data
    finally:
        gate.stop()


@pytest.mark.parametrize(("text", "name"), [
    ("library/qwen2.5:0.5b", "qwen2.5-0.5b"),
    ("ollama.com/library/smollm2", "smollm2-latest"),
    ("127.0.0.1:5000/lab/team/smollm2:135M", "lab-team-smollm2-135m"),
    ("ghcr.io/org/m@sha256:" + "ab" * 32, "org-m-abababababab"),
])
def test_store_names_keep_the_namespace(text, name):
    ref = parse_reference(text)
    assert ref.oci is not None and oci.model_name(ref.oci) == name
