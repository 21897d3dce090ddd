"""``pipx-llama pull MODEL``: fetch and verify a model variant into the store.

The variant is the one ``run`` would prepare (the same resolver and planner, ``models.plan.plan_for``,
with the RAM left out: a store may be filled for other machines); ``--variant`` picks another. Only
the fetch stage runs (``models.prepare.fetch``): original weights are converted on their first run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipx_llama.cli import store_common as common
from pipx_llama.cli.progress import renderer_for
from pipx_llama.errors import PipxLlamaError, UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="download and verify a model into the store",
        description="Fetch every file of a model variant, verify its sha256, and keep it in the "
        "store. Interrupted downloads resume; sources are tried in order.",
    )
    p.add_argument("model", help="model name or alias (see `pipx-llama list --available`), "
                   "hf.co/OWNER/REPO[:QUANT], or an OCI reference [REGISTRY/]NAMESPACE/NAME[:TAG]")
    p.add_argument("--variant", default=None,
                   help="variant name or quantization (default: what `pipx-llama run MODEL` would use)")
    p.add_argument("--from-dir", action="append", default=[], type=Path, metavar="DIR",
                   help="use files you already have in DIR (verified; hard-linked, or copied across disks)")
    p.add_argument(
        "--copy", action="store_true", help="copy files from --from-dir instead of hard-linking them"
    )
    common.add_network_options(p)
    common.add_manifest_option(p)
    common.add_json(p)


def run(args: argparse.Namespace) -> int:
    from pipx_llama.cli.road import REGISTRY_KINDS
    from pipx_llama.models.plan import Request, plan_for
    from pipx_llama.models.prepare import fetch
    from pipx_llama.models.reference import parse_reference

    s = common.open_session(args)
    options = common.pull_options(args, s)
    ref = parse_reference(args.model)
    if ref.is_file:
        raise UsageError(f"{args.model} is a file, and pull fetches models into the store",
                         f"to keep a copy in the store use `pipx-llama import {args.model}`")
    with renderer_for(args.json) as out:
        if ref.kind in REGISTRY_KINDS and not args.json:
            out.say(ref.describe())
        try:
            plan = plan_for(ref, Request(variant=args.variant, check_ram=False, fetch_only=True,
                                         pull_options=options, config=s.config, catalog=s.catalog))
            result = fetch(plan, pull_options=options, on_event=out)
        except PipxLlamaError as err:
            if args.json:
                out.emit_json({"kind": "error", "file": args.model, "message": err.message, "hint": err.hint})
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
