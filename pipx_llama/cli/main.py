"""The ``pipx-llama`` command: argument parsing, and the one place errors become messages and exit codes.

``pipx-llama MODEL …`` (a first argument that is not a command) means ``pipx-llama run MODEL …``.
``pipx-llama`` alone chats with the default model when stdin and stdout are a terminal, and prints the
help (exit code 2) otherwise. ``--debug`` (anywhere before ``--``, or ``PIPX_LLAMA_DEBUG=1``) shows the
traceback of an error instead of its one-line message.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence

from pipx_llama import __version__
from pipx_llama.cli import (
    bench_cmd,
    convert_cmd,
    doctor_cmd,
    gc_cmd,
    import_cmd,
    list_cmd,
    mirror_cmd,
    perplexity_cmd,
    provision_cmd,
    pull_cmd,
    push_cmd,
    quantize_cmd,
    rm_cmd,
    run_cmd,
    serve_cmd,
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
    "push": push_cmd,
    "list": list_cmd,
    "rm": rm_cmd,
    "verify": verify_cmd,
    "gc": gc_cmd,
    "mirror": mirror_cmd,
    "import": import_cmd,
    "serve": serve_cmd,
    "convert": convert_cmd,
    "quantize": quantize_cmd,
    "doctor": doctor_cmd,
    "provision": provision_cmd,
    "bench": bench_cmd,
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the same two-line shape as every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\nhint: see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pipx-llama",
        description="Run LLaMA-family models locally with a bundled numba engine.",
        epilog="`pipx-llama MODEL [options]` is short for `pipx-llama run MODEL [options]`; `pipx-llama` "
               "alone chats with the default model in a terminal. `pipx-llama COMMAND --help` tells more.",
    )
    parser.add_argument("--version", action="version", version=f"pipx-llama {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    parser.subcommands = sub.choices  # type: ignore[attr-defined]
    return parser


def _print_error(err: PipxLlamaError) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False, no_color=bool(os.environ.get("NO_COLOR")))
    console.print(f"[bold red]error:[/] {escape(err.message)}", markup=True, soft_wrap=True)
    if err.hint:
        console.print(f"[dim]hint:[/] {escape(err.hint)}", markup=True, soft_wrap=True)


def _normalize(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(arguments, debug, implicit run): --debug lifted out, ``run`` put in front of a model name."""
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut] or os.environ.get("PIPX_LLAMA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    if not argv:
        if sys.stdin.isatty() and sys.stdout.isatty():
            return ["run"], debug, True
        return [], debug, False
    first = argv[0]
    if first == "help":
        return [*argv[1:2], "--help"], debug, False
    if first in COMMANDS or first in ("-h", "--help", "--version"):
        return argv, debug, False
    return ["run", *argv], debug, True


def _suggest_command(err: PipxLlamaError, word: str) -> None:
    """A mistyped command reads as a model name; say which command it may have been."""
    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.75)
    if close and err.message.startswith("no model named"):
        err.hint = f"`{close[0]}` is a command: did you mean `pipx-llama {close[0]}`? {err.hint}".strip()


def main(argv: Sequence[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    args_list, debug, implicit = _normalize(raw)
    parser = build_parser()
    args, extra = parser.parse_known_args(args_list)
    if extra:  # reported by the command's own parser, so the hint names its --help
        owner = parser.subcommands.get(args.command, parser)  # type: ignore[attr-defined]
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = debug
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    try:
        code = COMMANDS[args.command].run(args)
    except PipxLlamaError as err:
        if debug:
            raise
        if implicit and raw:
            _suggest_command(err, args_list[1])
        _print_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # the reader (e.g. `| head`) went away; nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as err:  # a bug or an unforeseen OS condition: still one line, and a way to more
        if debug:
            raise
        _print_error(PipxLlamaError(f"unexpected {type(err).__name__}: {err}",
                                    "run again with --debug to see the traceback, and please report it"))
        sys.exit(1)
    sys.exit(code or 0)
