"""``pipx-llama import PATH``: bring files you already have into the store, verified.

A folder: the files of a known model (``--model``, or every known variant found complete in it), e.g.
an existing LLaMA download. A GGUF file: recognised by its sha256 if a manifest lists it, otherwise
registered as a new model under ``--name``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pipx_llama.cli import store_common as common
from pipx_llama.cli.progress import renderer_for
from pipx_llama.errors import UsageError

if TYPE_CHECKING:
    from pipx_llama.models.pull import PullResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="add a model folder or a GGUF file you already have to the store")
    p.add_argument("path", type=Path, help="a folder holding a model's files, or a .gguf file")
    p.add_argument("--model", default=None, help="the model the folder holds (default: detect)")
    p.add_argument("--variant", default=None, help="the variant the folder holds (default: detect)")
    p.add_argument("--name", default=None, help="register a GGUF file as a new model with this name")
    p.add_argument("--copy", action="store_true", help="copy instead of hard-linking (keeps the store "
                   "independent of your files)")
    common.add_manifest_option(p)
    common.add_json(p)


def run(args: argparse.Namespace) -> int:
    from pipx_llama.models.imports import match_folder
    from pipx_llama.models.pull import pull

    s = common.open_session(args)
    path: Path = args.path
    if not path.exists():
        raise UsageError(f"{path} does not exist", "give a folder or a .gguf file")
    results: list[PullResult] = []
    with renderer_for(args.json) as out:
        if path.is_file():
            results.append(_import_file(s, args, path, out))
        else:
            if args.name:
                raise UsageError("--name registers a single GGUF file, not a folder", "give the .gguf file")
            if args.model:
                m = s.catalog.resolve(args.model)
                pairs = (
                    [(m, m.variant(args.variant))]
                    if args.variant
                    else (
                        [(mm, v) for mm, v in match_folder(s.catalog, path) if mm.name == m.name]
                        or [(m, m.variant())]
                    )
                )
            else:
                pairs = match_folder(s.catalog, path)
                if not pairs:
                    raise UsageError(
                        f"{path} holds no complete set of files of any known model",
                        "name the model with --model (files are matched by path or name and size)",
                    )
            for m, v in pairs:
                opts = common.pull_options(args, s)
                opts.variant, opts.from_dirs, opts.offline, opts.mirrors = v.name, [path], True, []
                results.append(pull(s.store, m, opts, out))
        for r in results:
            if args.json:
                out.emit_json({"kind": "result", "model": r.model, "variant": r.variant, "path": str(r.path),
                               "files": r.files, "fetched": r.fetched})
            else:
                out.say(f"imported {r.model} ({r.variant}) into {r.path}")
    return 0


def _import_file(s: common.Session, args: argparse.Namespace, path: Path, out) -> PullResult:
    from pipx_llama.models.imports import import_gguf
    from pipx_llama.models.pull import pull
    from pipx_llama.models.store import sha256_file

    if args.name:
        return import_gguf(s.store, s.catalog, path, args.name, copy=args.copy, on_event=out)
    out.say(f"hashing {path} to recognise it")
    sha = sha256_file(path)
    hits = [(m, v, f) for m, v, f in s.catalog.find_sha256(sha) if len(v.files) == 1]
    if not hits:
        raise UsageError(f"{path.name} is not a file any known manifest lists (sha256 {sha})",
                         "register it under a name of your choice: pipx-llama import FILE --name NAME")
    m, v, _ = hits[0]
    opts = common.pull_options(args, s)
    opts.variant, opts.local_files, opts.offline, opts.mirrors = v.name, {sha: path}, True, []
    return pull(s.store, m, opts, out)
