"""``pipx-llama [run] MODEL``: plan, prepare (fetch, verify, convert, quantize), load, then chat or answer
once.

The mode follows the input: ``-p TEXT`` (or ``-p -``) or text piped on stdin is a one-shot run (a raw
completion; a single chat turn with ``--chat``; JSON with ``--json``); otherwise, with a terminal on
stdin, the interactive chat of ``cli/chat.py``. ``-m FILE.gguf`` runs a file as it is, skipping the
plan. The plan, progress and notices go to stderr; stdout carries only the model's text (or JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipx_llama.cli import store_common as common
from pipx_llama.cli.options import (
    DEFAULT_MODEL,
    add_cache_type_options,
    add_model_options,
    add_sampling_options,
    sampler_config,
)
from pipx_llama.engine import Generation, Model, generate, load_model
from pipx_llama.errors import UsageError

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
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help="quantization to run, e.g. Q4_0 or Q4_K_M (default: the planner's choice)")
    p.add_argument("--from-dir", action="append", default=[], type=Path, metavar="DIR",
                   help="when fetching, use files you already have in DIR (verified against the manifest)")
    common.add_network_options(p)
    common.add_manifest_option(p)
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


@dataclass
class Prepared:
    """A runnable GGUF and what the run needs to know about it."""

    path: Path
    name: str
    threads: int | None
    n_ctx: int | None
    quant: str | None = None


def run(args: argparse.Namespace) -> int:
    sampling = sampler_config(args)
    chat_repl = _wants_repl(args)
    if args.json and chat_repl:
        raise UsageError(
            "--json answers one prompt; there is none", "pass -p TEXT, or pipe the prompt on stdin"
        )
    if args.model_file is None:
        check_name(args)  # an unknown name is worth hearing about before anything else
    if not chat_repl and (args.prompt is None or args.prompt == "-"):
        args.prompt = sys.stdin.read()
        if not args.prompt.strip():
            raise UsageError("the prompt read from stdin is empty", "pipe some text, or pass -p TEXT")
    color = color_enabled(sys.stderr)
    prepared = prepare_model(args, color=color)
    from pipx_llama.engine import warm_up
    warm_up(lambda message: print(message, file=sys.stderr), prepared.path)
    t0 = time.perf_counter()
    model = load_model(prepared.path, threads=prepared.threads)
    ctx = model.new_context(prepared.n_ctx, type_k=args.cache_type_k, type_v=args.cache_type_v)
    load_seconds = time.perf_counter() - t0
    if chat_repl:
        return _chat(model, ctx, args, sampling, prepared, color)
    return _one_shot(model, ctx, args, sampling, prepared, load_seconds)


def _wants_repl(args: argparse.Namespace) -> bool:
    """An interactive (or line-by-line) chat: no prompt given, and a terminal on stdin or --chat."""
    if args.prompt is not None:
        return False
    return sys.stdin.isatty() or args.chat


def color_enabled(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org) or TERM=dumb."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


# --- model: name -> plan -> prepared file -------------------------------------------------------------------


def prepare_model(args: argparse.Namespace, *, color: bool = False) -> Prepared:
    """``-m FILE`` as given; else the named model (default: the small default model) planned for this
    machine and prepared in the store (fetch, verify, convert, quantize: whatever is still to do)."""
    if args.model_file is not None:
        if args.model is not None:
            raise UsageError(f"both a model name ({args.model}) and -m {args.model_file} were given",
                             "pass one of them")
        if args.quant is not None:
            raise UsageError("--quant applies to a model by name, not to -m FILE",
                             f"run `pipx-llama quantize {args.model_file} OUT.gguf {args.quant}` first")
        return Prepared(args.model_file, args.model_file.stem, args.threads, args.ctx_size)

    from pipx_llama.models.plan import make_plan
    from pipx_llama.models.prepare import prepare

    s = common.open_session(args)
    options = common.pull_options(args, s)
    plan = make_plan(args.model or DEFAULT_MODEL, variant=args.variant, quant=args.quant,
                     threads=args.threads, n_ctx=args.ctx_size, config=s.config, catalog=s.catalog,
                     pull_options=options, cache_types=(args.cache_type_k, args.cache_type_v))
    if plan.stages:
        show_plan(plan, sys.stderr, color)
    with StageRenderer(sys.stderr, quiet=not plan.stages) as on_event:
        path = prepare(plan, pull_options=options, on_event=on_event)
    return Prepared(Path(path), plan.model, plan.threads, plan.n_ctx, plan.quant)


def check_name(args: argparse.Namespace) -> None:
    """Raise (with suggestions) when the model name is known neither here nor to a configured mirror."""
    common.resolve(common.open_session(args), args.model or DEFAULT_MODEL, args)


class StageRenderer:
    """Progress of ``prepare`` on ``stream``: bars on a terminal, plain lines otherwise, and a
    line as each stage starts and ends. ``quiet`` (nothing left to do) shows only why a run waits."""

    def __init__(self, stream: TextIO, *, quiet: bool = False) -> None:
        from pipx_llama.cli.progress import EventRenderer

        self.quiet = quiet
        self.inner = EventRenderer("bars" if stream.isatty() else "plain", stream)

    def __enter__(self) -> StageRenderer:  # noqa: PYI034
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)

    def __call__(self, ev: Any) -> None:
        if ev.kind in ("stage-skipped", "ready"):
            return
        if self.quiet:
            if ev.kind == "waiting-lock":
                self.inner.say(f"{ev.file}: {ev.message or 'waiting for another pipx-llama process'}")
            return
        if ev.kind in ("stage", "stage-done"):
            self.inner.say(f"{ev.file}: {ev.message}" if ev.message else ev.file)
            return
        self.inner(ev)


def show_plan(plan: Any, stream: TextIO, color: bool) -> None:
    """The plan on ``stream``, a line per fact: what will be fetched, built and needed."""
    from rich.console import Console
    from rich.text import Text

    from pipx_llama.units import human_bytes

    rows = [
        ("model", f"{plan.model} ({plan.variant}, {plan.source_format})"),
        ("quantization", str(plan.quant)),
        ("download", human_bytes(plan.download_bytes) if plan.download_bytes else "nothing"),
        ("peak disk", human_bytes(plan.peak_disk_bytes)),
        ("RAM needed", human_bytes(plan.ram_bytes)),
        ("threads", str(plan.threads)),
        ("context", f"{plan.n_ctx} tokens"),
        ("steps", " → ".join(plan.stages)),
    ]
    if getattr(plan, "reason", ""):
        rows.append(("why", plan.reason))
    console = Console(file=stream, highlight=False, no_color=not color, soft_wrap=True, force_terminal=color)
    console.print(f"pipx-llama will prepare {plan.model}:", style="bold", markup=False)
    for label, value in rows:
        console.print(Text.assemble(("  " + label.ljust(14), "dim"), value))


# --- chat ---------------------------------------------------------------------------------------------------


def _chat(
    model: Model, ctx: Any, args: argparse.Namespace, sampling: Any, prepared: Prepared, color: bool
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


def _one_shot(model: Model, ctx: Any, args: argparse.Namespace, sampling: Any, prepared: Prepared,
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


def result_json(gen: Generation, prepared: Prepared, args: argparse.Namespace, load_seconds: float) -> dict:
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
