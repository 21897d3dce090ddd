"""``pipx-llama rm MODEL``: remove an installed model, its partial downloads and the blobs nothing else
uses."""

from __future__ import annotations

import argparse

from pipx_llama.cli import store_common as common
from pipx_llama.cli.progress import renderer_for
from pipx_llama.errors import UsageError
from pipx_llama.units import human_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rm", help="remove a model (and its partial downloads) from the store")
    p.add_argument("model", help="model name or alias")
    p.add_argument("--variant", default=None, help="remove only this variant")
    p.add_argument("--keep-blobs", action="store_true",
                   help="keep the verified files in blobs/ (a later pull re-links them without downloading)")
    common.add_manifest_option(p)
    common.add_json(p)


def run(args: argparse.Namespace) -> int:
    s = common.open_session(args)
    manifest = s.catalog.get(args.model)
    name = manifest.name if manifest else args.model
    hashes: set[str] = set()
    variant = None
    if manifest is not None:
        variant = manifest.variant(args.variant).name if args.variant else None
        hashes = {f.sha256 for v in manifest.variants if variant in (None, v.name) for f in v.files}
    elif args.variant:
        variant = args.variant.lower()
    installed = [iv for iv in s.store.installed(name) if variant in (None, iv.variant)]
    partial = [p for p in s.store.partials() if p.sha256 in hashes]
    if not installed and not partial:
        raise UsageError(f"{args.model!r} is not installed" + (f" (variant {variant})" if variant else ""),
                         "`pipx-llama list` shows what is installed")
    with renderer_for(args.json) as out:
        with s.store.exclusive(on_wait=common.store_waiter(out.say), action=f"remove {name}"):
            report = s.store.remove_model(name, variant, keep_blobs=args.keep_blobs, extra_partials=hashes)
            imported = s.store.manifests_dir / f"{name}.toml"
            if variant is None and imported.exists():
                report.add(imported)  # the registration `import` wrote goes with the model
        if args.json:
            out.emit_json({"kind": "removed", "model": name, "variant": variant,
                           "files": [str(p) for p in report.files], "freed": report.freed,
                           "skipped": report.skipped})
        else:
            what = f"{name}" + (f" ({variant})" if variant else "")
            out.say(f"removed {what}: {len(report.files)} file(s), {human_bytes(report.freed)} freed")
            for sk in report.skipped:
                out.say(f"kept {sk}")
    return 0
