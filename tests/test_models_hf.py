"""Hugging Face references resolved through huggingface_hub against a loopback server answering the
hub's API shapes (``GET /api/models/REPO[/revision/REV]?blobs=true``, as ``HfApi.model_info(...,
files_metadata=True)`` asks, and ``/REPO/resolve/COMMIT/FILE``), with HF_ENDPOINT pointed at it."""

from __future__ import annotations

import hashlib
import json

import pytest
from httpserver import FileServer

from pipx_llama.cli.main import main
from pipx_llama.errors import PipxLlamaError, UsageError
from pipx_llama.models.pull import pull
from pipx_llama.models.reference import parse_reference
from pipx_llama.models.resolve import resolve_manifest
from pipx_llama.models.sources import PullOptions
from pipx_llama.models.store import Store

COMMIT = "4f6b6c0a1e2d3c4b5a69788796a5b4c3d2e1f001"
REPO = "lab-org/SmolLM2-135M-Instruct-GGUF"
FILES = {
    "SmolLM2-135M-Instruct-Q4_1.gguf": b"GGUF" + b"\x41" * 3000,
    "SmolLM2-135M-Instruct-Q4_K_M.gguf": b"GGUF" + b"\x4b" * 3100,
    "SmolLM2-135M-Instruct-Q8_0.gguf": b"GGUF" + b"\x80" * 3200,
    "mmproj-SmolLM2-Q4_1.gguf": b"GGUF" + b"\x99" * 100,
    "split/SmolLM2-135M-Instruct-F16-00001-of-00002.gguf": b"GGUF" + b"\x16" * 50,
}


def model_info(files: dict[str, bytes]) -> bytes:
    """The hub's answer to ``GET /api/models/REPO?blobs=true`` (the shape of its documented response;
    small files are not in LFS and carry no sha256)."""
    siblings = [{"rfilename": ".gitattributes", "blobId": "a" * 40, "size": 1519},
                {"rfilename": "README.md", "blobId": "b" * 40, "size": 2100}]
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        siblings.append({"rfilename": name, "blobId": hashlib.sha1(data).hexdigest(), "size": len(data),
                         "lfs": {"sha256": sha, "size": len(data), "pointerSize": 135}})
    return json.dumps({
        "_id": "6720d5a3b1c2d3e4f5a6b7c8", "id": REPO, "modelId": REPO, "author": REPO.split("/")[0],
        "sha": COMMIT, "lastModified": "2024-11-01T12:00:00.000Z", "createdAt": "2024-10-29T12:00:00.000Z",
        "private": False, "disabled": False, "gated": False, "downloads": 1234, "likes": 5,
        "library_name": "gguf", "tags": ["gguf", "llama", "text-generation"],
        "pipeline_tag": "text-generation",
        "gguf": {"total": 134515008, "architecture": "llama", "context_length": 8192,
                 "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
        "siblings": siblings, "spaces": [], "usedStorage": 999999,
    }).encode()


@pytest.fixture
def hub(monkeypatch):
    with FileServer() as srv:
        info = model_info(FILES)
        for path in (f"/api/models/{REPO}", f"/api/models/{REPO}/revision/main",
                     f"/api/models/{REPO}/revision/v1.0"):
            srv.put(path, info, headers={"Content-Type": "application/json"})
        for name, data in FILES.items():
            srv.put(f"/{REPO}/resolve/{COMMIT}/{name}", data)
        monkeypatch.setenv("HF_ENDPOINT", srv.url("").rstrip("/"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield srv


def _resolve(text: str, **kw):
    return resolve_manifest(parse_reference(text), None, PullOptions(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "picked"), [
    (f"hf.co/{REPO}:Q4_1", "SmolLM2-135M-Instruct-Q4_1.gguf"),
    (f"hf.co/{REPO}:q8_0", "SmolLM2-135M-Instruct-Q8_0.gguf"),
    (f"hf.co/{REPO}", "SmolLM2-135M-Instruct-Q4_K_M.gguf"),
    (f"hf.co/{REPO}/SmolLM2-135M-Instruct-Q8_0.gguf@v1.0", "SmolLM2-135M-Instruct-Q8_0.gguf"),
])
def test_resolve_pins_the_commit_and_picks_the_file_for_the_quant(hub, tmp_path, text, picked):
    manifest = _resolve(text)
    f = manifest.variant().files[0]
    data = FILES[picked]
    assert (f.path, f.sha256, f.size) == (picked, hashlib.sha256(data).hexdigest(), len(data))
    assert COMMIT in manifest.text
    facts = (manifest.architecture, manifest.parameters, manifest.context_length)
    assert facts == ("llama", 134515008, 8192)
    result = pull(Store(tmp_path / "store"), manifest, PullOptions())
    assert result.file_path().read_bytes() == data


def test_refusals_are_one_line(hub):
    with pytest.raises(UsageError) as err:
        _resolve(f"hf.co/{REPO}:Q2_K")
    assert "no GGUF for Q2_K" in err.value.message and "Q4_1.gguf" in err.value.hint
    with pytest.raises(UsageError) as err:
        _resolve(f"hf.co/{REPO}/split/SmolLM2-135M-Instruct-F16-00001-of-00002.gguf")
    assert "split GGUF" in err.value.message
    with pytest.raises(PipxLlamaError) as err:
        _resolve("hf.co/lab-org/absent-GGUF:Q4_1")
    assert "hf.co/lab-org/absent-GGUF" in err.value.message and "\n" not in err.value.message


def test_a_tampered_file_is_refused(hub, tmp_path):
    manifest = _resolve(f"hf.co/{REPO}:Q4_1")
    hub.put(f"/{REPO}/resolve/{COMMIT}/SmolLM2-135M-Instruct-Q4_1.gguf", b"GGUF" + b"\x42" * 3000)
    with pytest.raises(PipxLlamaError) as err:
        pull(Store(tmp_path / "store"), manifest, PullOptions())
    assert "checksum mismatch" in err.value.message


def test_hf_token_is_sent_to_the_hub(hub, monkeypatch):
    hub.faults(f"/api/models/{REPO}/revision/main").require_token = "hf_secret"
    with pytest.raises(PipxLlamaError):
        _resolve(f"hf.co/{REPO}:Q4_1@main")
    manifest = _resolve(f"hf.co/{REPO}:Q4_1@main", hf_token="hf_secret")
    assert manifest.variant().files[0].path.endswith("Q4_1.gguf")


def test_offline_uses_the_lock_and_never_asks_the_hub(hub, tmp_path, monkeypatch):
    locks = tmp_path / "locks"
    with pytest.raises(PipxLlamaError) as err:
        _resolve(f"hf.co/{REPO}:Q4_1", offline=True, lock_dir=locks)
    assert "offline" in err.value.message
    online = _resolve(f"hf.co/{REPO}:Q4_1", lock_dir=locks)
    hub.faults(f"/api/models/{REPO}").status = 500
    assert _resolve(f"hf.co/{REPO}:Q4_1", offline=True, lock_dir=locks).text == online.text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _resolve(f"hf.co/{REPO}:Q4_1", lock_dir=locks).text == online.text


def test_cli_pull_says_the_kind_and_stores_the_lock(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    try:
        main(["pull", f"hf.co/{REPO}:Q4_1"])
    except SystemExit as exc:
        assert exc.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"Hugging Face reference: repository {REPO}, quantization Q4_1" in out
    assert list((tmp_path / "home" / "locks" / "hf").glob("*.toml"))
