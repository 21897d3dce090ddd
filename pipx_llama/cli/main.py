"""The ``pipx-llama`` command: argument parsing, and the one place errors become messages and exit codes.

``pipx-llama MODEL …`` (a first argument that is not a command) means ``pipx-llama run MODEL …``.
``pipx-llama`` alone chats with the default model when stdin and stdout are a terminal, and prints the
help (exit code 2) otherwise. ``--debug`` (anywhere before ``--``, or ``PIPX_LLAMA_DEBUG=1``) shows the
traceback of an error instead of its one-line message.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from pipx_llama import __version__
from pipx_llama.errors import PipxLlamaError, UsageError

EXIT_INTERRUPTED = 130

# Each command's module (imported only when that command runs or shows its help, so that `--help`
# starts in a blink) and the one line the top-level help shows for it; test_cli.py checks that each
# module's parser says the same.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run_cmd", "chat with a model, or answer one prompt (-p, -f or stdin)"),
    "tokenize": ("tokenize_cmd", "print the token ids of a text as JSON"),
    "perplexity": ("perplexity_cmd", "perplexity of a model over a text file (llama.cpp's method)"),
    "pull": ("pull_cmd", "download and verify a model into the store"),
    "push": ("push_cmd", "push a model to an OCI registry (ollama's layout)"),
    "list": ("list_cmd", "list installed models and partial downloads"),
    "show": ("show_cmd", "a model's architecture, quantization, template, licence, files"),
    "rm": ("rm_cmd", "remove a model (and its partial downloads) from the store"),
    "verify": ("verify_cmd", "re-hash installed models and report any damage"),
    "gc": ("gc_cmd", "remove unreferenced blobs and partial downloads"),
    "mirror": ("mirror_cmd", "share the store with other machines (mirror export DIR)"),
    "import": ("import_cmd", "add a model folder or a GGUF file you already have to the store"),
    "serve": ("serve_cmd", "serve models over an OpenAI- and Ollama-compatible HTTP API"),
    "ps": ("ps_cmd", "the models a running `pipx-llama serve` has loaded"),
    "convert": ("convert_cmd", "convert a Meta or Hugging Face model folder to GGUF"),
    "quantize": ("quantize_cmd", "quantize a GGUF model, byte for byte as llama-quantize does"),
    "doctor": ("doctor_cmd", "the hardware, and which models fit it in which quantization"),
    "provision": ("provision_cmd", "prepare the models a TOML file lists, unattended (labs, CI)"),
    "bench": ("bench_cmd", "prompt and generation speed of a model (like llama-bench)"),
}


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (``add_parser(sub)`` and ``run(args)``)."""
    return importlib.import_module(f"pipx_llama.cli.{COMMANDS[name][0]}")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the same two-line shape as every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\nhint: see `{self.prog} --help`\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, that command's options in full and the others as their names and
    one-line descriptions (enough for the top-level help), so that only that command's module is
    imported."""
    parser = _Parser(
        prog="pipx-llama",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=18),
        description="Run LLaMA-family models locally with a bundled numba engine.",
        epilog="`pipx-llama MODEL [options]` is short for `pipx-llama run MODEL [options]`; `pipx-llama` "
               "alone chats with the default model in a terminal. `pipx-llama COMMAND --help` tells more.",
    )
    parser.add_argument("--version", action="version", version=f"pipx-llama {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        if only is None or name == only:
            command_module(name).add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
    parser.subcommands = sub.choices  # type: ignore[attr-defined]
    return parser


def _print_error(err: PipxLlamaError, as_json: bool = False) -> None:
    """The error on stderr: two lines (message, hint), or with ``--json`` one JSON object."""
    if as_json:
        import json

        record = {"kind": "error", "message": err.message, "hint": err.hint, "exit_code": err.exit_code}
        sys.stderr.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
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


def _is_path(word: str) -> bool:
    return word.endswith(".gguf") or os.sep in word or "/" in word


def _unknown_command(word: str) -> UsageError:
    close = difflib.get_close_matches(word, list(COMMANDS), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(f'`pipx-llama {c}`' for c in close)}? " if close else ""
    return UsageError(f"no command named '{word}'",
                      f"{hint}`pipx-llama --help` lists the commands; a model name comes alone "
                      "(`pipx-llama MODEL [options]`)")


def utf8_streams() -> None:
    """Read and write UTF-8 through pipes and files whatever the locale, and never fail on a character a
    terminal cannot show. Windows gives a redirected stream the ANSI code page (cp1252, strict): an
    answer with "→" or CJK text raised UnicodeEncodeError halfway, and a piped prompt was misread.
    ``PYTHONIOENCODING`` and UTF-8 mode, where set, are left alone."""
    if os.environ.get("PYTHONIOENCODING") or sys.flags.utf8_mode:
        return
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None:
            continue
        try:
            tty = stream.isatty()
        except (OSError, ValueError):
            continue
        if not tty:
            reconfigure(encoding="utf-8", errors="replace")
        elif stream is not sys.stdin:
            reconfigure(errors="replace")


def main(argv: Sequence[str] | None = None) -> None:
    utf8_streams()
    raw = list(sys.argv[1:] if argv is None else argv)
    args_list, debug, implicit = _normalize(raw)
    parser = build_parser(args_list[0] if args_list and args_list[0] in COMMANDS else "")
    args, extra = parser.parse_known_args(args_list)
    if implicit and extra and not extra[0].startswith("-") and args.model and not _is_path(args.model):
        _print_error(_unknown_command(args.model))  # `pipx-llama shwo smollm2`: not a model and a word
        sys.exit(2)
    if extra:  # reported by the command's own parser, so the hint names its --help
        owner = parser.subcommands.get(args.command, parser)  # type: ignore[attr-defined]
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = debug
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    try:
        code = command_module(args.command).run(args)
    except PipxLlamaError as err:
        if debug:
            raise
        if implicit and raw:
            _suggest_command(err, args_list[1])
        _print_error(err, as_json=getattr(args, "json", False))
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
                                    "run again with --debug to see the traceback, and please report it"),
                     as_json=getattr(args, "json", False))
        sys.exit(1)
    sys.exit(code or 0)
