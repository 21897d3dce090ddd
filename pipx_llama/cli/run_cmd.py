"""``pipx-llama [run] MODEL``: plan, prepare (fetch, verify, convert, quantize), load, then chat or answer
once.

The mode follows the input: ``-p TEXT`` (or ``-p -``, or ``-f FILE``) or text piped on stdin is a one-shot
run; otherwise, with a terminal on stdin, the interactive chat of ``cli/chat.py``. A one-shot run on a
model with a chat template is one chat turn (the system prompt applied, the answer only), as ``ollama run
MODEL PROMPT`` and llama.cpp answer; ``--raw`` (or a model without a template) is a plain completion that
reads on from its prompt. ``--json`` prints one record whose ``mode`` says which. The model comes by the
road every command takes (``cli/road.py``); ``-m FILE.gguf`` runs a file as it is. The plan, progress
and notices go to stderr; stdout carries only the model's text (or JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipx_llama.cli import road
from pipx_llama.cli.options import (
    add_cache_type_options,
    add_model_options,
    add_sampling_options,
    sampler_config,
)
from pipx_llama.cli.road import color_enabled
from pipx_llama.errors import UsageError

if TYPE_CHECKING:
    from pipx_llama.cli.liveness import Activity
    from pipx_llama.engine import Generation, Model
    from pipx_llama.models.defaults import ModelDefaults
    from pipx_llama.models.prepare import Runnable

ONE_SHOT_TOKENS = 256


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="chat with a model, or answer one prompt (-p, -f or stdin)",
        description="Run a model by name or alias (fetched, converted and quantized on first use) or a "
                    "GGUF file (-m). With a terminal on stdin and no prompt, starts a chat; with -p TEXT or "
                    "text piped on stdin, completes it once and exits.",
    )
    add_model_options(p, by_name=True)
    add_cache_type_options(p)
    p.add_argument(
        "--ctx", dest="ctx_size", type=int, default=None, metavar="N", help="same as -c/--ctx-size"
    )
    road.add_road_options(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", default=None,
                        help="prompt text, answered once ('-': read it from stdin)")
    prompt.add_argument("-f", "--file", dest="prompt_file", type=Path, default=None, metavar="FILE",
                        help="read the prompt from FILE, answered once")
    p.add_argument("-n", "--n-predict", type=int, default=None,
                   help=f"tokens to generate: -1 = until end of text or full context, or a number >= 0 "
                        f"(default {ONE_SHOT_TOKENS} for a prompt, -1 in a chat)")
    add_sampling_options(p)
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true",
                      help="use the model's chat template (the default for a prompt on a model that has "
                           "one); without a prompt, a chat even without a terminal (a message per line of "
                           "stdin)")
    mode.add_argument("--raw", action="store_true",
                      help="one-shot: a plain completion of the prompt, without the chat template")
    p.add_argument("-sys", "--system-prompt", "--system", dest="system", default=None, metavar="TEXT",
                   help="system prompt of a chat (or of the one chat turn of a prompt)")
    p.add_argument("--no-display-prompt", action="store_true",
                   help="--raw: print only the completion, not the prompt before it")
    p.add_argument("--json", action="store_true",
                   help="one-shot: print one JSON object (text, token counts, timings) instead of the text")
    p.add_argument(
        "--context-shift",
        action="store_true",
        help="one-shot: when the context fills, drop the older half of it and go on (llama.cpp style)",
    )
    p.add_argument("--verbose", action="store_true",
                   help="print prompt and generation speed to stderr (after each answer in a chat)")


def run(args: argparse.Namespace) -> int:
    with _start_up():
        return _run(args)


@contextlib.contextmanager
def _start_up() -> Iterator[None]:
    """No cycle collection until the model is loaded, and what was made until then frozen out of it.

    Start-up makes ~1M objects that live as long as the process (numba's type system, the engine's
    modules, a 49k-262k-token vocabulary); the collector's passes over them took 150 ms of a 1.3 s
    warm start (SmolLM2, 337 collections), and later passes over them would slow every chat turn.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _started() -> None:
    """The long-lived objects exist: leave them out of later collections and collect as usual."""
    gc.freeze()
    gc.enable()


def _run(args: argparse.Namespace) -> int:
    _check_n_predict(args.n_predict)
    sampling = sampler_config(args)
    if args.prompt_file is not None:
        args.prompt = _read_prompt_file(args.prompt_file)
    chat_repl = _wants_repl(args)
    if args.raw and chat_repl:
        raise UsageError("--raw completes one prompt; there is none",
                         "pass -p TEXT, or pipe the prompt on stdin")
    if args.raw and args.system:
        raise _system_without_chat()
    if args.json and chat_repl:
        raise UsageError(
            "--json answers one prompt; there is none", "pass -p TEXT, or pipe the prompt on stdin"
        )
    ref = road.reference(args, args.model)
    if not ref.is_file:
        road.resolve(args, ref)  # an unknown name is worth hearing about before anything else
    if not chat_repl and (args.prompt is None or args.prompt == "-"):
        args.prompt = sys.stdin.read()
        if not args.prompt.strip():
            raise UsageError("the prompt read from stdin is empty", "pipe some text, or pass -p TEXT")
    color = color_enabled(sys.stderr)
    prepared = road.ready(args, ref, n_ctx=args.ctx_size, color=color, compile_ahead=True)
    sampling = sampler_config(args, prepared.defaults)
    take_model_defaults(args, prepared.defaults)
    from pipx_llama.engine import load_model, warm_up

    warm_up(lambda message: print(message, file=sys.stderr), prepared.path)
    from pipx_llama.cli.liveness import Activity

    t0 = time.perf_counter()
    with Activity(sys.stderr, f"loading {prepared.name}"):
        model = load_model(prepared.path, threads=prepared.threads)
        model.tokenizer.use_ollama_template(prepared.defaults.template)  # only for a GGUF without its own
        ctx = model.new_context(prepared.n_ctx, type_k=args.cache_type_k, type_v=args.cache_type_v)
    load_seconds = time.perf_counter() - t0
    _started()
    if chat_repl:
        return _chat(model, ctx, args, sampling, prepared, color)
    return _one_shot(model, ctx, args, sampling, prepared, load_seconds)


def _check_n_predict(n: int | None) -> None:
    """llama.cpp's -n: -1 means no limit; any other negative number is a mistake, not "no limit" too."""
    if n is not None and n < -1:
        raise UsageError(f"-n/--n-predict is {n}; it takes -1 (no limit) or a number of tokens >= 0",
                         "pass -n -1 to generate until the end of the text or a full context")


def _read_prompt_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot read the prompt file {path}: {err.strerror or err}",
                         "check the path given to -f/--file") from err
    except UnicodeDecodeError as err:
        raise UsageError(f"the prompt file {path} is not UTF-8 text", "save it as UTF-8") from err
    if not text.strip():
        raise UsageError(f"the prompt file {path} is empty", "write the prompt into it, or pass -p TEXT")
    return text


def one_shot_mode(args: argparse.Namespace, model: Model) -> str:
    """"chat" (one turn through the chat template) or "completion" (the prompt read on from)."""
    if args.raw:
        return "completion"
    if args.chat or model.tokenizer.chat_template:
        return "chat"
    return "completion"


def _system_without_chat() -> UsageError:
    return UsageError("--system applies to a chat turn; --raw (or a model without a chat template) completes "
                      "the prompt as it is", "drop --system and put the instructions into the prompt, or "
                      "drop --raw (--chat uses a generic template on a model without one)")


def take_model_defaults(args: argparse.Namespace, defaults: ModelDefaults) -> None:
    """The model's stop strings, answer length and system prompt where the command line gave none."""
    if not args.stop:
        args.stop = list(defaults.stop)
    if args.n_predict is None:
        args.n_predict = defaults.n_predict
    if args.system is None and defaults.system:
        # a model's own system prompt applies to chat turns only; a plain completion leaves it out
        args.system = defaults.system
        args.system_from_model = True


def _wants_repl(args: argparse.Namespace) -> bool:
    """An interactive (or line-by-line) chat: no prompt given, and a terminal on stdin or --chat."""
    if args.prompt is not None:
        return False
    return sys.stdin.isatty() or args.chat


# --- chat ---------------------------------------------------------------------------------------------------


def _chat(
    model: Model, ctx: Any, args: argparse.Namespace, sampling: Any, prepared: Runnable, color: bool
) -> int:
    from pipx_llama.cli.chat import ChatSession, make_reader, run_repl

    max_tokens = args.n_predict if args.n_predict is not None else -1
    session = ChatSession(
        model,
        ctx,
        sampler=sampling,
        max_tokens=max_tokens,
        system=args.system,
        stop=args.stop,
        verbose=args.verbose,
        name=prepared.name,
        color=color,
    )
    if sys.stdin.isatty():
        quant = prepared.quant or file_type_name(model)
        session.notices.info(
            f"{prepared.name} ({quant}, context {ctx.n_ctx} tokens, {model.threads} threads). "
            "/help for commands, Ctrl-C stops an answer, Ctrl-D leaves.")
    return run_repl(session, make_reader(color))


def file_type_name(model: Model) -> str:
    """The GGUF's declared file type (e.g. Q4_1), or 'GGUF' when it does not say."""
    from gguf import LlamaFileType

    ft = model.metadata.get("general.file_type")
    try:
        return LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return "GGUF"


# --- one-shot -----------------------------------------------------------------------------------------------


def _one_shot(model: Model, ctx: Any, args: argparse.Namespace, sampling: Any, prepared: Runnable,
              load_seconds: float) -> int:
    from pipx_llama.engine import generate

    max_tokens = args.n_predict if args.n_predict is not None else ONE_SHOT_TOKENS
    mode = one_shot_mode(args, model)
    if mode == "chat":
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        text = model.tokenizer.chat_prompt(messages, add_generation_prompt=True)
    else:
        if args.system and not getattr(args, "system_from_model", False):
            raise _system_without_chat()
        text = args.prompt
    gen = generate(ctx, text, max_tokens=max_tokens, sampler=sampling, stop=args.stop,
                   context_shift=args.context_shift)
    from pipx_llama.cli.liveness import Activity

    busy = Activity(sys.stderr, "processing the prompt")
    gen.on_prompt = busy.update
    if args.json:
        with busy:
            for _ in gen:
                busy.stop()
        record = result_json(gen, prepared, mode, load_seconds)
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        return 0
    # a completion reads on from its prompt, as llama.cpp prints it
    lead = args.prompt if mode == "completion" and not args.no_display_prompt else ""
    _stream(gen, busy, lead)
    if args.verbose:
        _report(gen, load_seconds)
    return 0


def result_json(gen: Generation, prepared: Runnable, mode: str, load_seconds: float) -> dict:
    """The ``--json`` record of a one-shot run; ``mode`` is "chat" or "completion"."""
    s = gen.stats
    return {
        "model": prepared.name,
        "file": str(prepared.path),
        "mode": mode,
        "text": gen.text,
        "finish_reason": s.finish_reason,
        "tokens": {
            "prompt": s.n_prompt,
            "prompt_evaluated": s.n_prompt_evaluated,
            "generated": s.n_generated,
        },
        "timings": {
            "load_ms": round(load_seconds * 1000, 3),
            "prompt_ms": round(s.prompt_seconds * 1000, 3),
            "generation_ms": round(s.generation_seconds * 1000, 3),
            "prompt_tokens_per_second": round(s.prompt_tokens_per_second, 3),
            "generation_tokens_per_second": round(s.generation_tokens_per_second, 3),
        },
    }


def _stream(gen: Generation, busy: Activity, lead: str = "") -> None:
    """``lead`` then the text to stdout, ending with a newline whatever happens, so that an error (a full
    context, an interruption) goes to stderr on a line of its own and never into the middle of the answer.
    ``lead`` (a completion's prompt) waits for the prompt's evaluation, so a spinner on the same terminal
    never draws over it."""
    try:
        with busy:
            for piece in gen:
                busy.stop()  # the prompt is evaluated: the sign of life goes before the first word
                if lead:
                    sys.stdout.write(lead)
                    lead = ""
                if piece.text:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
        sys.stdout.write(lead)  # nothing was generated
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _report(gen: Generation, load_seconds: float) -> None:
    s = gen.stats
    sys.stderr.write(
        f"\nload:        {load_seconds * 1000:.0f} ms\n"
        f"prompt eval: {s.n_prompt_evaluated} tokens in {s.prompt_seconds * 1000:.0f} ms "
        f"({s.prompt_tokens_per_second:.1f} tokens/s)\n"
        f"generation:  {s.n_generated} tokens in {s.generation_seconds * 1000:.0f} ms "
        f"({s.generation_tokens_per_second:.1f} tokens/s), finish: {s.finish_reason}\n"
    )
