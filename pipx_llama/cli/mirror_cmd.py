"""``pipx-llama mirror export DIR``: write installed models as a static mirror tree any HTTP server can
serve."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipx_llama.cli import store_common as common
from pipx_llama.cli.progress import renderer_for
from pipx_llama.errors import UsageError
from pipx_llama.units import human_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mirror", help="share the store with other machines (mirror export DIR)")
    msub = p.add_subparsers(dest="mirror_command", metavar="ACTION", required=True)
    e = msub.add_parser("export", help="write blobs/sha256/<hex> and manifests/ under DIR",
                        description="Write the verified files of installed models and their manifests as a "
                                    "static tree. Serve DIR with any HTTP server (nginx, S3, "
                                    "`python -m http.server`) and pull elsewhere with --mirror URL.")
    e.add_argument("dir", type=Path, help="destination folder (created; existing blobs are kept)")
    e.add_argument("models", nargs="*", help="models to export (default: every installed model)")
    e.add_argument("--link", action="store_true", help="hard-link blobs instead of copying (same disk only)")
    common.add_manifest_option(e)
    common.add_json(e)


def run(args: argparse.Namespace) -> int:
    from pipx_llama.models.mirror import export_mirror

    s = common.open_session(args)
    names = []
    for wanted in args.models:
        m = s.catalog.get(wanted)
        names.append(m.name if m else wanted)
    variants = [iv for iv in s.store.installed() if not names or iv.model in names]
    missing = sorted(set(names) - {iv.model for iv in variants})
    if missing or not variants:
        raise UsageError(
            f"not installed: {', '.join(missing)}" if missing else "no installed models to export",
            "`pipx-llama list` shows what is installed",
        )
    with renderer_for(args.json) as out:
        with s.store.shared(read_only_ok=True):
            report = export_mirror(s.store, args.dir, variants, link=args.link, on_event=out)
        if args.json:
            out.emit_json({"kind": "exported", "dir": str(args.dir), "blobs": report.blobs,
                           "manifests": report.manifests, "bytes_written": report.bytes_written,
                           "skipped": report.skipped})
        else:
            for sk in report.skipped:
                out.say(f"skipped {sk}")
            out.say(
                f"exported {len(report.blobs)} new blob(s) ({human_bytes(report.bytes_written)} written) and "
                f"{len(report.manifests)} manifest(s) to {args.dir}"
            )
            out.say(f"serve it, e.g. `python -m http.server -d {args.dir} 8000`, and on other machines: "
                    "pipx-llama pull MODEL --mirror http://HOST:8000/ (or PIPX_LLAMA_MIRROR)")
    return 0
