#!/bin/sh
# pipx-llama bootstrap for Linux and macOS: makes sure pipx is there (installing it for this user if
# not -- never as root, never system-wide), then runs `pipx run pipx-llama ARGS...`.
#
#   sh install.sh                 chat with the default small model
#   sh install.sh 7B              chat with Llama-2-7B-Chat
#   curl -fsSL URL | sh -s -- 7B  the same, with the script from URL
#
# How pipx is found, in order: `pipx` on PATH; `PYTHON -m pipx`; `PYTHON -m pip install --user pipx`;
# and where pip refuses user installs (PEP 668 "externally managed" Pythons, virtual environments), a
# private virtual environment with pipx in it, under ${XDG_DATA_HOME:-~/.local/share}/pipx-llama/bootstrap.
#
# Environment: PYTHON (the Python 3.10+ to use; default: python3, then python), PIPX_LLAMA_SPEC (what
# pipx runs; default: pipx-llama -- e.g. a version pin or a wheel file), PIPX_LLAMA_KEEP_STDIN=1 (see
# below), and pipx's own variables (PIPX_HOME, PIPX_BIN_DIR, ...).
# Exit codes: pipx-llama's own; 1 when no suitable Python or pipx could be found or installed.

set -eu

say() {
    printf 'pipx-llama installer: %s\n' "$1" >&2
}

die() {
    printf 'error: %s\n' "$1" >&2
    if [ -n "${2:-}" ]; then
        printf 'hint: %s\n' "$2" >&2
    fi
    exit 1
}

# A Python 3.10 or newer: $PYTHON, else python3, else python.
find_python() {
    for candidate in "${PYTHON:-}" python3 python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

bootstrap_dir="${XDG_DATA_HOME:-${HOME:?HOME is not set}/.local/share}/pipx-llama/bootstrap"

# Sets pipx_cmd (an executable) or pipx_module_python (run as "$pipx_module_python" -m pipx).
pipx_cmd=""
pipx_module_python=""

find_pipx() {
    if command -v pipx >/dev/null 2>&1; then
        pipx_cmd=pipx
        return 0
    fi
    if [ -x "$bootstrap_dir/bin/pipx" ]; then
        pipx_cmd="$bootstrap_dir/bin/pipx"
        return 0
    fi
    if [ -n "$python" ] && "$python" -m pipx --version >/dev/null 2>&1; then
        pipx_module_python="$python"
        return 0
    fi
    return 1
}

user_install_allowed='
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(1 if managed or sys.prefix != sys.base_prefix else 0)
'

install_pipx() {
    [ -n "$python" ] || die "pipx is not installed and there is no Python 3.10 or newer to install it with" \
        "install Python 3.10+ (python.org, or your system's package manager), or pipx itself, then run this again"
    # pip refuses --user inside a virtual environment and in "externally managed" Pythons (PEP 668):
    # do not ask it there, go straight to a private virtual environment
    if "$python" -c "$user_install_allowed" >/dev/null 2>&1; then
        say "pipx is not installed; installing it for this user: $python -m pip install --user pipx"
        if "$python" -m pip install --user --quiet pipx >&2 && "$python" -m pipx --version >/dev/null 2>&1; then
            pipx_module_python="$python"
            return 0
        fi
    fi
    say "installing pipx in a virtual environment of its own: $bootstrap_dir"
    rm -rf "$bootstrap_dir"
    if "$python" -m venv "$bootstrap_dir" >&2 &&
        "$bootstrap_dir/bin/python" -m pip install --quiet --disable-pip-version-check pipx >&2; then
        pipx_cmd="$bootstrap_dir/bin/pipx"
        return 0
    fi
    rm -rf "$bootstrap_dir"
    die "could not install pipx with $python (it has no working pip or venv module)" \
        "install pipx with your system's package manager (e.g. apt install pipx, dnf install pipx, brew install pipx), then run this again"
}

python="$(find_python || true)"
if ! find_pipx; then
    install_pipx
fi

# Piped into sh (curl ... | sh), this script's stdin is the pipe it came through; pipx-llama should
# read the terminal instead, or its chat would end at once. A script run from a file keeps its stdin.
if [ ! -t 0 ] && [ -z "${PIPX_LLAMA_KEEP_STDIN:-}" ] && [ ! -f "$0" ] && (: </dev/tty) 2>/dev/null; then
    exec </dev/tty
fi

spec="${PIPX_LLAMA_SPEC:-pipx-llama}"
if [ -n "$pipx_cmd" ]; then
    exec "$pipx_cmd" run --spec "$spec" pipx-llama "$@"
fi
exec "$pipx_module_python" -m pipx run --spec "$spec" pipx-llama "$@"
