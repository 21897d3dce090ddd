"""``pipx-llama show MODEL``: what a model is, as ``ollama show`` tells it.

For a name or alias: the manifest (architecture, parameters, context, licence, each variant's files with
their sizes and sha256) and what the store holds of it; for an installed GGUF, or a GGUF file given by its
path, what the file itself says (architecture, parameters counted from its tensors, quantization, trained
context, chat template). Only the header and tensor table of a GGUF are read.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from pipx_llama.cli import store_common as common
from pipx_llama.cli.tables import output_width
from pipx_llama.units import human_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show", help="a model's architecture, quantization, template, licence, files",
        description="Show a model by name or alias (from its manifest and the store) or a GGUF file by its "
                    "path: architecture, parameters, quantization, context length, chat template, licence, "
                    "and its files with their sizes and sha256.",
    )
    p.add_argument("model", help="model name or alias, or a GGUF file's path")
    p.add_argument("--template", action="store_true", help="print only the chat template")
    p.add_argument("--license", action="store_true", help="print only the licence")
    common.add_manifest_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def run(args: argparse.Namespace) -> int:
    from pipx_llama.models.reference import parse_reference

    ref = parse_reference(args.model)
    info = _file_info(ref.path) if ref.is_file and ref.path is not None else _named_info(args)
    if args.template:
        template = (info.get("gguf") or {}).get("chat_template")
        if template is None:
            from pipx_llama.errors import UsageError

            raise UsageError(f"no chat template known for {args.model}",
                             "the template is read from the GGUF: pull the model first (pipx-llama pull "
                             f"{args.model})" if ref.kind != "file" else "this GGUF has no chat template")
        sys.stdout.write(template.rstrip("\n") + "\n")
        return 0
    if args.license:
        print(info.get("license") or "the GGUF does not name its licence")
        if info.get("license_url"):
            print(info["license_url"])
        return 0
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(_text(info))
    return 0


def _named_info(args: argparse.Namespace) -> dict[str, Any]:
    s = common.open_session(args)
    m = s.catalog.resolve(args.model)
    installed = [iv for iv in s.store.installed(m.name) if iv.complete]
    info: dict[str, Any] = {
        "model": m.name, "aliases": list(m.aliases), "description": m.description,
        "architecture": m.architecture, "parameters": m.parameters, "context_length": m.context_length,
        "license": m.license, "license_url": m.license_url, "homepage": m.homepage,
        "manifest": m.origin,
        "variants": [
            {"name": v.name, "format": v.format, "quantization": v.quantization,
             "default": v is m.variant(),
             "installed": any(iv.variant == v.name for iv in installed),
             "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in v.files]}
            for v in m.variants
        ],
        "installed": [
            {"variant": iv.variant, "path": str(iv.path), "installed_at": iv.record.get("installed_at"),
             "verified_at": iv.record.get("verified_at"),
             "files": [{"path": f.get("path"), "size": f.get("size"), "sha256": f.get("sha256")}
                       for f in iv.files]}
            for iv in installed
        ],
    }
    ggufs = [p for iv in installed for p in sorted(iv.path.glob("*.gguf"))]
    if ggufs:
        info["gguf"] = _gguf_info(ggufs[0])
    return info


def _file_info(path: Path) -> dict[str, Any]:
    from pipx_llama.models.store import sha256_file

    gguf = _gguf_info(path)
    return {
        "model": gguf.get("name") or path.stem, "file": str(path),
        "architecture": gguf["architecture"], "parameters": gguf["parameters"],
        "context_length": gguf["context_length"], "license": gguf.get("license"),
        "files": [{"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}],
        "gguf": gguf,
    }


def _gguf_info(path: Path) -> dict[str, Any]:
    """What a GGUF's header says about the model (its tensor data is not read)."""
    from gguf import LlamaFileType

    from pipx_llama.formats.gguf import open_gguf

    g = open_gguf(path)
    try:
        meta = g.metadata
        arch = str(meta.get("general.architecture", "?"))
        ft = meta.get("general.file_type")
        try:
            quant = LlamaFileType(int(ft)).name.removeprefix("MOSTLY_") if ft is not None else None
        except ValueError:
            quant = None
        return {
            "file": str(path),
            "name": meta.get("general.name"),
            "architecture": arch,
            "parameters": sum(t.n_elements for t in g.tensors.values()),
            "quantization": quant,
            "context_length": meta.get(f"{arch}.context_length"),
            "embedding_length": meta.get(f"{arch}.embedding_length"),
            "layers": meta.get(f"{arch}.block_count"),
            "vocab_size": len(meta.get("tokenizer.ggml.tokens") or []),
            "license": meta.get("general.license"),
            "chat_template": meta.get("tokenizer.chat_template"),
        }
    finally:
        g.close()


def _count(n: int | None) -> str:
    if not n:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _text(info: dict[str, Any]) -> str:
    width = output_width()
    gguf = info.get("gguf") or {}
    rows = [("model", info["model"] + (f" ({', '.join(info['aliases'])})" if info.get("aliases") else ""))]
    if info.get("description"):
        rows.append(("about", info["description"]))
    rows += [
        ("architecture", info["architecture"]),
        ("parameters", _count(gguf.get("parameters") or info.get("parameters"))),
        ("quantization", gguf.get("quantization") or ", ".join(
            v["quantization"] or v["format"] for v in info.get("variants", []) if v["default"]) or "?"),
        ("context", f"{gguf.get('context_length') or info.get('context_length') or '?'} tokens"),
    ]
    if gguf.get("layers"):
        rows.append(("layers", f"{gguf['layers']} (embedding {gguf['embedding_length']}, vocabulary "
                               f"{gguf['vocab_size']})"))
    template = gguf.get("chat_template")
    rows.append(("template", (f"{len(template)} characters (show --template prints it)" if template
                              else "none in the GGUF" if gguf else "read from the GGUF once pulled")))
    rows.append(("licence", (info.get("license") or "not stated")
                 + (f" ({info['license_url']})" if info.get("license_url") else "")))
    if info.get("file"):
        rows.append(("file", info["file"]))
    lines = [_pair(k, v, width) for k, v in rows]
    if "variants" in info:
        for v in info["variants"]:
            marks = [m for m, on in (("default", v["default"]), ("installed", v["installed"])) if on]
            lines.append(f"\nvariant {v['name']} ({v['quantization'] or v['format']})"
                         + (f", {', '.join(marks)}" if marks else ""))
            lines += _files(v["files"], width)
        for iv in info["installed"]:
            verified = iv["verified_at"] or "never"
            lines.append(f"\ninstalled {iv['variant']} in {iv['path']}, verified {verified}")
    else:
        lines.append("")
        lines += _files(info["files"], width)
    return "\n".join(lines)


def _pair(key: str, value: str, width: int) -> str:
    return textwrap.fill(value, width, initial_indent=f"{key:<14}", subsequent_indent=" " * 14,
                         break_long_words=False, break_on_hyphens=False)


def _files(files: list[dict[str, Any]], width: int) -> list[str]:
    out = []
    for f in files:
        size = human_bytes(f["size"]) if f.get("size") is not None else "size unknown"
        out.append(f"  {f['path']}  {size}")
        out.append(f"    sha256 {f.get('sha256') or 'not published'}")
    return out
