"""``pipx-llama list``: installed models (size, quantization, source, verification time) and partial
downloads;
``--available`` lists every model the manifests describe."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from pipx_llama.cli import store_common as common
from pipx_llama.cli.tables import dropped_note, output_width, render_table
from pipx_llama.models.estimates import estimated_file_size
from pipx_llama.units import human_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list installed models and partial downloads")
    p.add_argument("--available", action="store_true", help="list the models the manifests describe instead")
    common.add_manifest_option(p)
    common.add_json(p)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def run(args: argparse.Namespace) -> int:
    s = common.open_session(args)
    if args.available:
        return _available(s, args.json)
    installed = s.store.installed()
    partials = []
    for p in s.store.partials():
        hits = s.catalog.find_sha256(p.sha256)
        m, v, f = hits[0] if hits else (None, None, None)
        partials.append({"sha256": p.sha256, "size": p.size, "total": f.size if f else None,
                         "model": m.name if m else None, "variant": v.name if v else None,
                         "file": f.path if f else None, "path": str(p.path)})
    if args.json:
        json.dump({"store": str(s.store.root), "models": [
            {"model": iv.model, "variant": iv.variant, "complete": iv.complete, "size": iv.size,
             "format": iv.record.get("variant_format"), "quantization": iv.record.get("quantization"),
             "sources": iv.sources, "installed_at": iv.record.get("installed_at"),
             "verified_at": iv.record.get("verified_at"), "path": str(iv.path), "files": iv.files}
            for iv in installed], "partials": partials}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"store: {s.store.root}")
    if not installed:
        print("no models installed (pipx-llama pull MODEL; pipx-llama list --available)")
    else:
        rows = []
        for iv in installed:
            rec = iv.record
            quant = rec.get("quantization") or rec.get("variant_format") or "?"
            rows.append([iv.model, iv.variant, quant, human_bytes(iv.size) if iv.complete else "incomplete",
                         ", ".join(iv.sources) if iv.complete else "-",
                         str(rec.get("verified_at") or "never")])
        print(_table(rows, ["MODEL", "VARIANT", "QUANT", "SIZE", "SOURCE", "VERIFIED"]))
    if partials:
        print("\npartial downloads (resume with pull; remove with gc or rm):")
        rows = [[(f"{p['model']} ({p['variant']}) {p['file']}" if p["model"] else p["sha256"][:16] + "…"),
                 human_bytes(p["size"]) + (f" of {human_bytes(p['total'])}" if p["total"] else "")]
                for p in partials]
        print(_table(rows, ["FILE", "DOWNLOADED"]))
    return 0


def _available(s: common.Session, as_json: bool) -> int:
    installed = {(iv.model, iv.variant) for iv in s.store.installed() if iv.complete}
    rows, data = [], []
    for m in s.catalog:
        for v in m.variants:
            size = human_bytes(v.known_size) if v.sizes_complete else "~" + human_bytes(
                sum(estimated_file_size(m, v, f) for f in v.files))
            rows.append([m.name, ", ".join(m.aliases), v.name, v.quantization or v.format, size,
                         "yes" if (m.name, v.name) in installed else "", m.license])
            data.append({"model": m.name, "aliases": list(m.aliases), "variant": v.name, "format": v.format,
                         "quantization": v.quantization, "size": v.known_size if v.sizes_complete else None,
                         "installed": (m.name, v.name) in installed, "license": m.license,
                         "license_url": m.license_url, "license_notice": m.license_notice,
                         "description": m.description, "manifest": m.origin})
    if as_json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        shown = render_table(["MODEL", "ALIASES", "VARIANT", "QUANT", "SIZE", "INSTALLED", "LICENSE"], rows,
                             wrap=6, drop=[1, 6])
        print(shown.text)
        if shown.dropped:
            print(textwrap.fill(dropped_note(shown.dropped), output_width()))
        for m in s.catalog:
            if m.license_notice:
                print()
                print(textwrap.fill(f"{m.name}: {m.license_notice}", output_width(), break_long_words=False,
                                    break_on_hyphens=False))
    return 0
