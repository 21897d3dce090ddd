"""``pipx-llama perplexity``: llama.cpp's chunked perplexity of a model over a text file.

The model comes by the road every command takes (``cli/road.py``): a name is prepared as ``run``
prepares it (planned for the chunk size); ``-m FILE.gguf`` is used as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipx_llama.cli import road
from pipx_llama.cli.options import add_cache_type_options
from pipx_llama.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model over a text file (llama.cpp's method)")
    p.add_argument("model", nargs="?", default=None,
                   help="model name or alias (prepared in the store when missing), or a GGUF file's path; or "
                        "use -m FILE (default: the default model)")
    p.add_argument("textfile", type=Path, help="UTF-8 text to score")
    p.add_argument("-m", "--model-file", type=Path, default=None, metavar="PATH.gguf", help="GGUF model file")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="chunk size in tokens (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_cache_type_options(p)
    road.add_road_options(p)


def run(args: argparse.Namespace) -> int:
    from pipx_llama.engine import load_model, perplexity

    ref = road.reference(args, args.model)
    try:
        text = args.textfile.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {args.textfile}: {err}", "pass a readable UTF-8 text file") from None
    runnable = road.ready(args, ref, n_ctx=args.ctx_size, color=road.color_enabled(sys.stderr))
    model = load_model(runnable.path, threads=runnable.threads)
    tokens = model.tokenizer.encode(text, add_special=True, parse_special=False)

    def progress(i: int, n: int, ppl: float) -> None:
        if not args.json:
            sys.stderr.write(f"[{i}/{n}] {ppl:.4f}\n")

    result = perplexity(model, tokens, args.ctx_size, on_chunk=progress,
                        cache_types=(args.cache_type_k, args.cache_type_v))
    if args.json:
        print(json.dumps({"ppl": result.ppl, "n_ctx": result.n_ctx, "chunks": result.n_chunks,
                          "scored": result.n_scored, "tokens": len(tokens)}))
    else:
        print(f"Final estimate: PPL = {result.ppl:.4f} ({result.n_chunks} chunks of {result.n_ctx} tokens, "
              f"{result.n_scored} scored)")
    return 0
