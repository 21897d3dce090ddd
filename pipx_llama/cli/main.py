"""The ``pipx-llama`` command: argument parsing, and the one place errors become messages and exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipx_llama import __version__
from pipx_llama.cli import (
    gc_cmd,
    import_cmd,
    list_cmd,
    mirror_cmd,
    perplexity_cmd,
    pull_cmd,
    rm_cmd,
    run_cmd,
    tokenize_cmd,
    verify_cmd,
)
from pipx_llama.errors import PipxLlamaError

EXIT_INTERRUPTED = 130

COMMANDS = {
    "run": run_cmd,
    "tokenize": tokenize_cmd,
    "perplexity": perplexity_cmd,
    "pull": pull_cmd,
    "list": list_cmd,
    "rm": rm_cmd,
    "verify": verify_cmd,
    "gc": gc_cmd,
    "mirror": mirror_cmd,
    "import": import_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipx-llama",
        description="Run LLaMA-family models locally with a bundled numba engine.",
    )
    parser.add_argument("--version", action="version", version=f"pipx-llama {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def _print_error(err: PipxLlamaError) -> None:
    from rich.console import Console

    console = Console(stderr=True, highlight=False, no_color="NO_COLOR" in os.environ)
    console.print(f"[bold red]error:[/] {err.message}", markup=True, soft_wrap=True)
    if err.hint:
        console.print(f"[dim]hint:[/] {err.hint}", markup=True, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    try:
        code = COMMANDS[args.command].run(args)
    except PipxLlamaError as err:
        if args.debug:
            raise
        _print_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # the reader (e.g. `| head`) went away; nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code or 0)
