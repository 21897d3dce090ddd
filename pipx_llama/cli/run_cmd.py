"""``pipx-llama run --model-file M.gguf``: a raw completion streamed to stdout, or ``--chat`` for a conversation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipx_llama.cli import store_common as common
from pipx_llama.cli.options import (  # noqa: F401  (DEFAULT_MODEL: re-exported)
    DEFAULT_MODEL,
    add_model_options,
    add_sampling_options,
    model_file,
    sampler_config,
)
from pipx_llama.engine.generate import Generation, generate
from pipx_llama.engine.model import Model, load_model
from pipx_llama.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="complete a prompt, or chat (--chat), with a model")
    add_model_options(p, by_name=True)
    p.add_argument("--from-dir", action="append", default=[], type=Path, metavar="DIR",
                   help="when pulling, use files you already have in DIR (verified against the manifest)")
    common.add_network_options(p)
    common.add_manifest_option(p)
    p.add_argument("-p", "--prompt", default=None, help="prompt text ('-' or omitted without --chat: stdin)")
    p.add_argument("-n", "--n-predict", type=int, default=256,
                   help="tokens to generate; -1 = until end of text or full context (default 256)")
    add_sampling_options(p)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--chat", action="store_true", help="interactive chat with the model's chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--context-shift", action="store_true",
                   help="when the context fills, drop the older half of it and go on (llama.cpp style)")
    p.add_argument("--verbose", action="store_true", help="print prompt and generation speed to stderr")


def run(args: argparse.Namespace) -> int:
    sampling = sampler_config(args)
    if not args.chat and args.prompt is None or args.prompt == "-":
        if sys.stdin.isatty() and args.prompt is None:
            raise UsageError("no prompt given", "pass -p TEXT, pipe text on stdin, or use --chat")
        args.prompt = sys.stdin.read()
    model = load_model(_model_path(args), threads=args.threads)
    ctx = model.new_context(args.ctx_size)
    if args.chat:
        return _chat(model, ctx, args, sampling)
    gen = generate(ctx, args.prompt, max_tokens=args.n_predict, sampler=sampling, stop=args.stop,
                   context_shift=args.context_shift)
    sys.stdout.write(args.prompt)
    _stream(gen)
    sys.stdout.write("\n")
    if args.verbose:
        _report(gen)
    return 0


def _model_path(args: argparse.Namespace) -> Path:
    """The GGUF to run: ``-m FILE`` as given, else the named model from the store (pulled when missing)."""
    if args.model_file is not None:
        if args.model is not None:
            raise UsageError(f"both a model name ({args.model}) and -m {args.model_file} were given",
                             "pass one of them")
        return args.model_file
    return model_file(args, args.model)


def _stream(gen: Generation) -> None:
    for piece in gen:
        if piece.text:
            sys.stdout.write(piece.text)
            sys.stdout.flush()


def _report(gen: Generation) -> None:
    s = gen.stats
    sys.stderr.write(
        f"\nprompt eval: {s.n_prompt_evaluated} tokens in {s.prompt_seconds * 1000:.0f} ms "
        f"({s.prompt_tokens_per_second:.1f} tokens/s)\n"
        f"generation:  {s.n_generated} tokens in {s.generation_seconds * 1000:.0f} ms "
        f"({s.generation_tokens_per_second:.1f} tokens/s), finish: {s.finish_reason}\n"
    )


def _chat(model: Model, ctx, args: argparse.Namespace, sampling) -> int:
    tok = model.tokenizer
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    sys.stderr.write("chat: Ctrl-C stops an answer, Ctrl-D or /exit leaves.\n")
    while True:
        try:
            line = input("> ")
        except EOFError:
            sys.stderr.write("\n")
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.chat_prompt(messages, add_generation_prompt=True)
        gen = generate(ctx, prompt, max_tokens=args.n_predict, sampler=sampling, stop=args.stop,
                       add_special=True, parse_special=True, context_shift=False)
        try:
            _stream(gen)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": gen.text})
        if args.verbose:
            _report(gen)
