"""Packaging proof with the real pipx: the wheel ``python -m build`` makes runs through
``pipx run --spec dist/<wheel> pipx-llama`` from a clean virtual environment -- the help, and one-shot
answers from the default model given as a file (-m) and by name from a folder (--from-dir), in a
private store and kernel cache (so the first run compiles the kernels, as a new user's does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
from greedy import golden_prefix

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


class PipxRun:
    def __init__(self, pipx: Path, wheel: Path, env: dict[str, str], cwd: Path) -> None:
        self.pipx, self.wheel, self.env, self.cwd = pipx, wheel, env, cwd

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.pipx), "run", "--spec", str(self.wheel), "pipx-llama", *args],
                              capture_output=True, text=True, env=self.env, cwd=self.cwd, timeout=1500,
                              stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def pipx_run(tmp_path_factory) -> PipxRun:
    root = tmp_path_factory.mktemp("pipx")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(root / "dist"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (wheel,) = (root / "dist").glob("pipx_llama-*.whl")

    venv.EnvBuilder(with_pip=True).create(root / "venv")
    bindir = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIPX_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "NUMBA_"))}
    env.update({
        "PIPX_HOME": str(root / "pipx-home"), "PIPX_BIN_DIR": str(root / "pipx-bin"),
        "PIPX_LLAMA_HOME": str(root / "store"), "PIPX_LLAMA_CONFIG_DIR": str(root / "config"),
        "NUMBA_CACHE_DIR": str(root / "numba-cache"), "PIPX_LLAMA_HISTORY": "off",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    })
    proc = subprocess.run(
        [str(bindir / "python"), "-m", "pip", "install", "--quiet", "pipx"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipx = bindir / ("pipx.exe" if os.name == "nt" else "pipx")
    print(f"\nwheel built and pipx installed in {time.perf_counter() - t0:.1f} s")
    return PipxRun(pipx, wheel, env, root)


def test_pipx_run_help(pipx_run):
    t0 = time.perf_counter()
    out = pipx_run("--help")
    print(f"\n`pipx run --spec {pipx_run.wheel.name} pipx-llama --help` (creates pipx's venv): "
          f"{time.perf_counter() - t0:.1f} s")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "usage: pipx-llama" in out.stdout
    for command in ("run", "pull", "list", "serve"):
        assert command in out.stdout


def test_pipx_run_one_shot_from_a_file(pipx_run, smollm2_path, golden):
    case = golden["cases"][0]
    ids, text = golden_prefix(case)
    t0 = time.perf_counter()
    out = pipx_run("-m", str(smollm2_path), "--raw", "-p", case["prompt"], "-n", str(len(ids)), "--temp", "0")
    print(f"\none-shot with -m, first run (compiles the kernels): {time.perf_counter() - t0:.1f} s")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == case["prompt"] + text + "\n"


def test_pipx_run_one_shot_by_name_from_a_folder(pipx_run, smollm2_path, golden):
    case = golden["cases"][0]
    ids, text = golden_prefix(case)
    args = (
        "run",
        "smollm2-135m-instruct",
        "--offline",
        "--raw",
        "-p",
        case["prompt"],
        "-n",
        str(len(ids)),
        "--temp",
        "0",
        "--json",
    )
    t0 = time.perf_counter()
    first = pipx_run(*args, "--from-dir", str(smollm2_path.parent))
    print(f"\none-shot by name, first (installs into the store): {time.perf_counter() - t0:.1f} s")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout)["text"] == text
    assert list((Path(pipx_run.env["PIPX_LLAMA_HOME"]) / "models").rglob("*.gguf"))

    t0 = time.perf_counter()
    second = pipx_run(*args)
    print(f"one-shot by name, second run (from the store, kernels cached): {time.perf_counter() - t0:.1f} s")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout)["text"] == json.loads(first.stdout)["text"]
    assert "pipx-llama will prepare" not in second.stderr  # the second run goes straight to the model
