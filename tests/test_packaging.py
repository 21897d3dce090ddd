"""The wheel: built by ``python -m build``, it holds every package module, the shipped manifests and
the ``pipx-llama`` console script, and works when installed into a fresh environment."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10: build depends on tomli there
    import tomli as tomllib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _req(text: str) -> tuple[str, SpecifierSet, str]:
    req = Requirement(text)
    return canonicalize_name(req.name), req.specifier, str(req.marker or "")


def _source_modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in (REPO / "pipx_llama").rglob("*.py")
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        assert zf.testzip() is None
        return set(zf.namelist())


def _dist_info_file(wheel: Path, names: set[str], leaf: str) -> str:
    matches = [n for n in names if n.endswith(f".dist-info/{leaf}")]
    assert len(matches) == 1, (leaf, matches)
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(matches[0]).decode()


def test_wheel_name_and_metadata(wheel: Path, names: set[str]) -> None:
    project = _pyproject()["project"]
    assert wheel.name == f"pipx_llama-{project['version']}-py3-none-any.whl"
    meta = HeaderParser().parsestr(_dist_info_file(wheel, names, "METADATA"))
    assert meta["Name"] == "pipx-llama" and meta["Version"] == project["version"]
    assert meta["Requires-Python"] == project["requires-python"]
    required = {_req(r) for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert required == {_req(r) for r in project["dependencies"]}


def test_wheel_holds_every_module_and_nothing_else(names: set[str]) -> None:
    modules = {n for n in names if n.endswith(".py")}
    assert modules == _source_modules()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "manifests/"))]


def test_wheel_holds_the_manifests(names: set[str]) -> None:
    shipped = {p.name for p in (REPO / "manifests").glob("*.toml")}
    assert shipped, "the manifests/ folder has no manifest"
    in_wheel = {
        n.removeprefix("pipx_llama/manifests/") for n in names if n.startswith("pipx_llama/manifests/")
    }
    assert shipped <= in_wheel
    assert "smollm2-135m-instruct.toml" in in_wheel


def test_console_script(wheel: Path, names: set[str]) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info_file(wheel, names, "entry_points.txt"))
    scripts = dict(entry_points["console_scripts"])
    assert scripts == {"pipx-llama": "pipx_llama.cli.main:main"}
    module = scripts["pipx-llama"].split(":")[0]
    assert module.replace(".", "/") + ".py" in names


def test_installed_wheel_runs(wheel: Path, names: set[str], tmp_path: Path) -> None:
    """Install without dependencies into a fresh venv that sees this environment's packages (numpy,
    numba, ...) after its own, then run the console script and import every module from outside the
    source tree."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    child_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    # a plain path line: the editable install's own .pth in there is not processed, so the source
    # tree stays out of sys.path
    Path(child_site, "parent_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "--quiet",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    version = _pyproject()["project"]["version"]
    script = bindir / ("pipx-llama.exe" if os.name == "nt" else "pipx-llama")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path,
                          env=clean_env, timeout=300, check=False)
    assert proc.returncode == 0 and version in proc.stdout, (proc.stdout, proc.stderr)

    # __main__ modules run the CLI when imported
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in names
                     if n.endswith(".py") and not n.endswith("__main__.py"))
    probe = (
        "import importlib, importlib.resources, sys, pipx_llama\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(pipx_llama.__file__)\n"
        "print(sorted(p.name for p in (importlib.resources.files('pipx_llama') / 'manifests').iterdir()))\n"
    )
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env=clean_env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, manifests = proc.stdout.strip().splitlines()[-2:]
    assert Path(where).is_relative_to(env_dir), f"imported {where}, not the installed wheel"
    assert "smollm2-135m-instruct.toml" in manifests
