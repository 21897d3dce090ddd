"""``pipx-llama gc``: remove blobs no installed model uses, partial downloads and stale temporary files."""

from __future__ import annotations

import argparse

from pipx_llama.cli import store_common as common
from pipx_llama.cli.progress import renderer_for
from pipx_llama.config import load_config
from pipx_llama.models.store import Store
from pipx_llama.units import human_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gc", help="remove unreferenced blobs and partial downloads")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    common.add_json(p)


def run(args: argparse.Namespace) -> int:
    store = Store(load_config().home)
    with renderer_for(args.json) as out:
        with store.exclusive(on_wait=common.store_waiter(out.say), action="gc the store"):
            report = store.gc(dry_run=args.dry_run)
        if args.json:
            out.emit_json({"kind": "gc", "dry_run": args.dry_run, "files": [str(p) for p in report.files],
                           "freed": report.freed, "skipped": report.skipped})
        else:
            verb = "would remove" if args.dry_run else "removed"
            for p in report.files:
                out.say(f"{verb} {p}")
            out.say(f"{verb} {len(report.files)} file(s), {human_bytes(report.freed)}")
    return 0
