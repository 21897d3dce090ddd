"""The one error table: every error of every package belongs to one concern with one exit code, and the
README lists the same table."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from test_fetch_diskfull import small_fs  # noqa: F401  (fixture)

import pipx_llama
from pipx_llama import errors


def _all_errors() -> set[type[errors.PipxLlamaError]]:
    for m in pkgutil.walk_packages(pipx_llama.__path__, "pipx_llama."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    found: set[type[errors.PipxLlamaError]] = set()
    todo = [errors.PipxLlamaError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return found


def _concern(cls: type) -> type:
    return next(c for c in cls.__mro__ if c in errors.CONCERNS)


def test_every_error_keeps_its_concerns_exit_code():
    found = _all_errors()
    assert len(found) > 25  # the walk did find the packages' errors
    for cls in found:
        concern = _concern(cls)
        assert concern.__module__ == "pipx_llama.errors", cls
        assert cls.exit_code == concern.exit_code, f"{cls.__module__}.{cls.__name__} changes its exit code"


def test_a_full_disk_is_one_class_everywhere():
    from pipx_llama.fetch import http
    from pipx_llama.files import disk_full_error
    from pipx_llama.models import store

    assert http.DiskFullError is store.DiskFullError is errors.DiskFullError
    err = disk_full_error(Path("/"), "a test", 10)
    assert (
        isinstance(err, errors.InsufficientResourcesError) and err.exit_code == 5 and err.resource == "disk"
    )
    names = {c.__name__ for c in _all_errors()}
    assert not {n for n in names if "disk" in n.lower()} - {"DiskFullError"}


def test_readme_lists_the_table():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Errors and exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", section, re.MULTILINE))
    for concern in errors.CONCERNS:
        assert f"`{concern.__name__}`" in rows[str(concern.exit_code)], concern
    assert set(rows) == {"0", "130"} | {str(c.exit_code) for c in errors.CONCERNS}


# --- a disk that fills up: one error and one exit code, whatever was writing -------------------------------


def _fill(folder: Path) -> None:
    """Write until the filesystem has not a byte left (big blocks, then smaller ones)."""
    import errno

    with open(folder / "hog", "wb", buffering=0) as f:
        for block in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


def test_a_disk_filling_up_is_exit_code_5_from_fetch_convert_and_quantize(small_fs, tmp_path):  # noqa: F811
    """Once three error classes and exit codes 1, 2 and 3. The checks before writing are told there is
    room (PIPX_LLAMA_FREE_BYTES), so each command meets the full disk while writing, as when another
    program fills it meanwhile; through the CLI, as a user meets it."""
    import hashlib
    import os
    import subprocess
    import sys

    from httpserver import FileServer
    from tinymodel import write_tiny_llama

    f16 = tmp_path / "tiny-f16.gguf"
    write_tiny_llama(f16)
    hf = tmp_path / "hf"
    from hf_families import llama_models_dir, write_family_folder

    write_family_folder(hf, "gemma3", llama_models_dir(), shards=1)
    blob = os.urandom(300_000)
    manifest = tmp_path / "full.toml"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIPX_LLAMA_") or k == "PIPX_LLAMA_TEST_DATA"}
    env.update(PIPX_LLAMA_HOME=str(small_fs / "home"), PIPX_LLAMA_CONFIG_DIR=str(tmp_path / "config"),
               PIPX_LLAMA_FREE_BYTES=str(10**11), NO_COLOR="1")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipx_llama.cli", *args], capture_output=True, text=True,
                              timeout=600, check=False, env=env)

    with FileServer() as srv:
        srv.put("/m/full.gguf", blob)
        manifest.write_text(
            'format = 1\nname = "full"\ndescription = "t"\nlicense = "t"\narchitecture = "llama"\n'
            'parameters = 1000\ncontext_length = 64\n\n[[variants]]\nname = "q8_0"\nformat = "gguf"\n'
            'quantization = "Q8_0"\n\n[[variants.files]]\npath = "full.gguf"\n'
            f'size = {len(blob)}\nsha256 = "{hashlib.sha256(blob).hexdigest()}"\n\n'
            f'[[variants.sources]]\ntype = "url"\nbase = "{srv.url("/m/")}"\n')
        (small_fs / "home").mkdir()
        _fill(small_fs)
        runs = {
            "fetch": cli("pull", "full", "--manifest", str(manifest)),
            "convert": cli("convert", str(hf), str(small_fs / "c.gguf"), "--outtype", "f16"),
            "quantize": cli("quantize", str(f16), str(small_fs / "q.gguf"), "Q8_0"),
        }
    for stage, r in runs.items():
        assert r.returncode == 5, (stage, r.returncode, r.stderr)
        assert "disk" in r.stderr and "unexpected" not in r.stderr, (stage, r.stderr)
