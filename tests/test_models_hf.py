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
    with pytest.raises(PipxLlamaError) as err:
        _resolve(f"hf.co/{REPO}/split/SmolLM2-135M-Instruct-F16-00001-of-00002.gguf")
    assert "part split/SmolLM2-135M-Instruct-F16-00002-of-00002.gguf" in err.value.message
    assert "is not in the repository" in err.value.message
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


SPLIT_REPO = "lab-org/Tiny-Split-GGUF"


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    """A tiny model and its 3 split parts, as llama-gguf-split writes them."""
    from splitgguf import split_gguf

    from pipx_llama.engine.warmup import write_tiny_model

    d = tmp_path_factory.mktemp("split")
    write_tiny_model(d / "tiny.gguf")
    parts = split_gguf(d / "tiny.gguf", d / "Tiny-Q4_K_M", 5)
    return d / "tiny.gguf", {f"Q4_K_M/{p.name}": p.read_bytes() for p in parts}


@pytest.fixture
def split_hub(monkeypatch, split_files):
    _, files = split_files
    with FileServer() as srv:
        info = json.loads(model_info(files))
        info.update(id=SPLIT_REPO, modelId=SPLIT_REPO, gguf={"total": 100000, "architecture": "llama",
                                                             "context_length": 256})
        for path in (f"/api/models/{SPLIT_REPO}", f"/api/models/{SPLIT_REPO}/revision/main"):
            srv.put(path, json.dumps(info).encode(), headers={"Content-Type": "application/json"})
        for name, data in files.items():
            srv.put(f"/{SPLIT_REPO}/resolve/{COMMIT}/{name}", data)
        monkeypatch.setenv("HF_ENDPOINT", srv.url("").rstrip("/"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield srv, files


@pytest.mark.parametrize("named", [":Q4_K_M", "/Q4_K_M/Tiny-Q4_K_M-00002-of-00003.gguf"])
def test_a_split_gguf_lists_every_part_pinned(split_hub, named):
    _, files = split_hub
    variant = _resolve(f"hf.co/{SPLIT_REPO}{named}").variant()
    want = [(k.split("/")[1], hashlib.sha256(v).hexdigest(), len(v)) for k, v in sorted(files.items())]
    assert [(f.path, f.sha256, f.size) for f in variant.files] == want
    assert [s.base for s in variant.sources] == [f"{split_hub[0].url('').rstrip('/')}/{SPLIT_REPO}/resolve/"
                                                 f"{COMMIT}/Q4_K_M/"]


def test_a_split_gguf_is_pulled_verified_merged_and_runs_like_the_whole_file(split_hub, split_files, tmp_path,
                                                                             monkeypatch, capsys):
    import numpy as np

    from pipx_llama.engine.model import load_model
    from pipx_llama.formats.gguf_split import merge_parts
    from pipx_llama.models.verify import verify_installed

    srv, files = split_hub
    whole, _ = split_files
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    for i in range(2):  # the second pull finds the merged file ready
        try:
            main(["pull", f"hf.co/{SPLIT_REPO}:Q4_K_M"])
        except SystemExit as exc:
            assert exc.code == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert ("merging" in out) == (i == 0)
        assert "is ready" in out.split("merging")[-1]  # said once the merged file is there
    store = Store(tmp_path / "home")
    merged = next(store.root.glob("models/*/*/Tiny-Q4_K_M.gguf"))
    folder = merged.parent
    parts = sorted(folder.glob("Tiny-Q4_K_M-0000?-of-00003.gguf"))
    assert [p.read_bytes() for p in parts] == [files[f"Q4_K_M/{p.name}"] for p in parts]
    reference = merge_parts(parts, tmp_path / "reference.gguf").path
    assert merged.read_bytes() == reference.read_bytes()
    record = json.loads((folder / "Tiny-Q4_K_M.gguf.provenance.json").read_text())
    assert record["kind"] == "derived" and record["sha256"] == hashlib.sha256(merged.read_bytes()).hexdigest()
    assert [s["path"] for s in record["sources"]] == [p.name for p in parts]
    iv = next(iter(store.installed()))
    checks = verify_installed(store, iv)
    assert {c.path: c.status for c in checks} == {**{p.name: "ok" for p in parts}, merged.name: "ok"}

    def logits(path):
        m = load_model(path, threads=1)
        try:
            return m.new_context(64).eval([1, 5, 9, 3, 7], all_logits=True)
        finally:
            m.close()

    np.testing.assert_array_equal(logits(merged), logits(whole))


def test_a_split_set_with_a_foreign_part_is_refused_naming_it(split_hub, split_files, tmp_path, monkeypatch,
                                                             capsys):
    from splitgguf import split_gguf

    srv, files = split_hub
    whole, _ = split_files
    (tmp_path / "other").mkdir()
    foreign = split_gguf(whole, tmp_path / "other" / "Tiny-Q4_K_M", 5, total=99)[1].read_bytes()
    forged = {**files, "Q4_K_M/Tiny-Q4_K_M-00002-of-00003.gguf": foreign}
    info = json.loads(model_info(forged))
    info.update(id=SPLIT_REPO, gguf={"architecture": "llama"})
    srv.put(f"/api/models/{SPLIT_REPO}", json.dumps(info).encode(),
            headers={"Content-Type": "application/json"})
    srv.put(f"/{SPLIT_REPO}/resolve/{COMMIT}/Q4_K_M/Tiny-Q4_K_M-00002-of-00003.gguf", foreign)
    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(SystemExit) as exc:
        main(["pull", f"hf.co/{SPLIT_REPO}:Q4_K_M"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "Tiny-Q4_K_M-00002-of-00003.gguf" in err and "split.tensors.count" in err
    assert not list((tmp_path / "home").glob("models/*/*/Tiny-Q4_K_M.gguf"))


def test_run_road_merges_a_split_gguf_once_and_offline_after(split_hub, tmp_path, monkeypatch):
    from pipx_llama.formats.gguf import open_gguf
    from pipx_llama.models.prepare import ready

    monkeypatch.setenv("PIPX_LLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIPX_LLAMA_CONFIG_DIR", str(tmp_path / "config"))
    events = []
    runnable = ready(f"hf.co/{SPLIT_REPO}:Q4_K_M", on_event=events.append)
    assert runnable.path.name == "Tiny-Q4_K_M.gguf"
    assert ("stage-done", "merge") in [(e.kind, e.file) for e in events]
    g = open_gguf(runnable.path)
    assert len(g.tensors) == 12 and g.metadata["split.count"] == 0
    g.close()
    split_hub[0].faults(f"/api/models/{SPLIT_REPO}").status = 500
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    events.clear()
    assert ready(f"hf.co/{SPLIT_REPO}:Q4_K_M", on_event=events.append).path == runnable.path
    assert ("stage-skipped", "merge") in [(e.kind, e.file) for e in events]
    # a merged file changed since it was made is refused before it is run
    with open(runnable.path, "r+b") as f:
        f.seek(40)
        f.write(b"\xff")
    with pytest.raises(PipxLlamaError) as err:
        ready(f"hf.co/{SPLIT_REPO}:Q4_K_M")
    assert "Tiny-Q4_K_M.gguf is not the file recorded when it was made" in err.value.message
