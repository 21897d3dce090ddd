"""``pipx-llama [run] MODEL``: plan, prepare (fetch, verify, convert, quantize), load, then chat or answer
once.

The mode follows the input: ``-p TEXT`` (or ``-p -``) or text piped on stdin is a one-shot run (a raw
completion; a single chat turn with ``--chat``; JSON with ``--json``); otherwise, with a terminal on
stdin, the interactive chat of ``cli/chat.py``. The model comes by the road every command takes
(``cli/road.py``); ``-m FILE.gguf`` runs a file as it is. The plan, progress and notices go to
stderr; stdout carries only the model's text (or JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from pipx_llama.cli import road
from pipx_llama.cli.options import (
    add_cache_type_options,
    add_model_options,
    add_sampling_options,
    sampler_config,
)
from pipx_llama.cli.road import color_enabled
from pipx_llama.engine import Generation, Model, generate, load_model
from pipx_llama.errors import UsageError

if TYPE_CHECKING:
    from pipx_llama.models.defaults import ModelDefaults
    from pipx_llama.models.prepare import Runnable

ONE_SHOT_TOKENS = 256


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a model: chat in a terminal, or answer one prompt (-p TEXT or stdin)",
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
    p.add_argument("-p", "--prompt", default=None,
                   help="prompt text, answered once ('-': read it from stdin)")
    p.add_argument("-n", "--n-predict", type=int, default=None,
                   help=f"tokens to generate; -1 = until end of text or full context "
                        f"(default {ONE_SHOT_TOKENS} for a prompt, -1 in a chat)")
    add_sampling_options(p)
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)"
    )
    p.add_argument("--chat", action="store_true",
                   help="use the model's chat template: a chat even without a terminal (a message per line "
                        "of stdin), or one chat turn with -p")
    p.add_argument("--system", default=None, help="system prompt for a chat")
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
    sampling = sampler_config(args)
    chat_repl = _wants_repl(args)
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
    prepared = road.ready(args, ref, n_ctx=args.ctx_size, color=color)
    sampling = sampler_config(args, prepared.defaults)
    take_model_defaults(args, prepared.defaults)
    from pipx_llama.engine import warm_up
    warm_up(lambda message: print(message, file=sys.stderr), prepared.path)
    t0 = time.perf_counter()
    model = load_model(prepared.path, threads=prepared.threads)
    model.tokenizer.use_ollama_template(prepared.defaults.template)  # only for a GGUF without its own
    ctx = model.new_context(prepared.n_ctx, type_k=args.cache_type_k, type_v=args.cache_type_v)
    load_seconds = time.perf_counter() - t0
    if chat_repl:
        return _chat(model, ctx, args, sampling, prepared, color)
    return _one_shot(model, ctx, args, sampling, prepared, load_seconds)


def take_model_defaults(args: argparse.Namespace, defaults: ModelDefaults) -> None:
    """The model's stop strings, answer length and system prompt where the command line gave none."""
    if not args.stop:
        args.stop = list(defaults.stop)
    if args.n_predict is None:
        args.n_predict = defaults.n_predict
    if args.system is None:
        args.system = defaults.system


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
    max_tokens = args.n_predict if args.n_predict is not None else ONE_SHOT_TOKENS
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        text = model.tokenizer.chat_prompt(messages, add_generation_prompt=True)
        gen = generate(ctx, text, max_tokens=max_tokens, sampler=sampling, stop=args.stop,
                       context_shift=args.context_shift)
    else:
        gen = generate(ctx, args.prompt, max_tokens=max_tokens, sampler=sampling, stop=args.stop,
                       context_shift=args.context_shift)
    if args.json:
        for _ in gen:
            pass
        sys.stdout.write(
            json.dumps(result_json(gen, prepared, args, load_seconds), ensure_ascii=False) + "\n"
        )
        return 0
    if not args.chat:
        sys.stdout.write(args.prompt)  # a completion reads on from its prompt, as llama.cpp prints it
    _stream(gen)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        _report(gen, load_seconds)
    return 0


def result_json(gen: Generation, prepared: Runnable, args: argparse.Namespace, load_seconds: float) -> dict:
    """The ``--json`` record of a one-shot run."""
    s = gen.stats
    return {
        "model": prepared.name,
        "file": str(prepared.path),
        "mode": "chat" if args.chat else "completion",
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


def _stream(gen: Generation) -> None:
    for piece in gen:
        if piece.text:
            sys.stdout.write(piece.text)
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
