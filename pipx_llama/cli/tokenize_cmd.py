"""``pipx-llama tokenize``: print a text's token ids as a JSON list, like llama.cpp's llama-tokenize.

The model comes by the road every command takes (``cli/road.py``): a name is prepared as ``run``
prepares it; ``-m FILE.gguf`` is used as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipx_llama.cli import road


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="print the token ids of a text as JSON")
    p.add_argument("model", nargs="?", default=None,
                   help="model name or alias whose vocabulary to use (prepared in the store when missing), "
                        "or a GGUF file's path; or use -m FILE (default: the default model)")
    p.add_argument("text", help="text to tokenize ('-' reads standard input)")
    p.add_argument("-m", "--model-file", type=Path, default=None, metavar="PATH.gguf",
                   help="GGUF file whose vocabulary to use")
    p.add_argument("--no-special", action="store_true", help="do not add BOS/EOS as the model would")
    p.add_argument("--no-parse-special", action="store_true",
                   help="treat special-token text such as <|im_start|> as plain text")
    p.add_argument("--pieces", action="store_true", help="print [id, piece] pairs instead of ids")
    road.add_road_options(p)


def run(args: argparse.Namespace) -> int:
    ref = road.reference(args, args.model)
    text = sys.stdin.read() if args.text == "-" else args.text
    path = road.ready(args, ref, color=road.color_enabled(sys.stderr)).path
    from pipx_llama.formats.gguf import open_gguf
    from pipx_llama.tokenizer.tokenizer import Tokenizer

    g = open_gguf(path)
    tok = Tokenizer.from_gguf_metadata(g.metadata, source=str(g.path))
    ids = tok.encode(text, add_special=not args.no_special, parse_special=not args.no_parse_special)
    if args.pieces:
        out = [[i, tok.token_to_piece(i).decode("utf-8", errors="replace")] for i in ids]
    else:
        out = ids
    sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    return 0
