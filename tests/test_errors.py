"""The one error table: every error of every package belongs to one concern with one exit code, and the
README lists the same table."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

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
