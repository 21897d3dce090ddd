"""``pipx-llama pull MODEL``: fetch and verify a model variant into the store."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipx_llama.cli import store_common as common
from pipx_llama.cli.progress import renderer_for
from pipx_llama.errors import PipxLlamaError
from pipx_llama.models.pull import pull


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="download and verify a model into the store",
        description="Fetch every file of a model variant, verify its sha256, and keep it in the "
        "store. Interrupted downloads resume; sources are tried in order.",
    )
    p.add_argument("model", help="model name or alias (see `pipx-llama list --available`)")
    p.add_argument("--variant", default=None, help="variant name or quantization (default: the manifest's)")
    p.add_argument("--from-dir", action="append", default=[], type=Path, metavar="DIR",
                   help="use files you already have in DIR (verified; hard-linked, or copied across disks)")
    p.add_argument(
        "--copy", action="store_true", help="copy files from --from-dir instead of hard-linking them"
    )
    common.add_network_options(p)
    common.add_manifest_option(p)
    common.add_json(p)


def run(args: argparse.Namespace) -> int:
    s = common.open_session(args)
    manifest = common.resolve(s, args.model, args)
    options = common.pull_options(args, s)
    with renderer_for(args.json) as out:
        try:
            result = pull(s.store, manifest, options, out)
        except PipxLlamaError as err:
            if args.json:
                out.emit_json(
                    {"kind": "error", "file": manifest.name, "message": err.message, "hint": err.hint}
                )
            raise
        bad = [f for f in result.failures if f.kind == "checksum"]
        if args.json:
            out.emit_json(
                {
                    "kind": "result",
                    "model": result.model,
                    "variant": result.variant,
                    "path": str(result.path),
                    "files": result.files,
                    "fetched": result.fetched,
                    "bad_sources": [{"file": f.file, "source": f.source, "message": f.message} for f in bad],
                }
            )
            return 0
        for f in bad:
            out.say(f"warning: {f.source} served a corrupt {f.file} (checksum mismatch); it was not used")
    return 0
