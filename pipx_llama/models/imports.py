"""Bringing files the user already has into the store: a folder matched against the known manifests
(``pull --from-dir``), or any GGUF file registered under a name of the user's (``pipx-llama import``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipx_llama.errors import UsageError
from pipx_llama.events import EventCallback, ProgressEvent
from pipx_llama.files import atomic_write_bytes
from pipx_llama.models.manifest import (
    Catalog,
    Manifest,
    ManifestFile,
    Variant,
    is_valid_model_name,
    parse_manifest,
    render_manifest,
    unsafe_path_reason,
)
from pipx_llama.models.pull import PullResult, pull
from pipx_llama.models.sources import FetchContext, PullOptions, find_local
from pipx_llama.models.store import Store, sha256_file


def match_folder(catalog: Catalog, folder: Path) -> list[tuple[Manifest, Variant]]:
    """Manifest variants whose every file is present in ``folder`` (by path or name, and published size)."""
    found = []
    for m in catalog:
        for v in m.variants:
            if all(find_local(f, [folder]) is not None for f in v.files):
                found.append((m, v))
    return found


def _gguf_summary(path: Path) -> dict[str, Any]:
    from pipx_llama.formats.gguf import open_gguf

    g = open_gguf(path)
    md = g.metadata
    arch = str(md.get("general.architecture", "llama"))
    params = 0
    for t in g.tensors.values():
        n = 1
        for d in t.shape:
            n *= int(d)
        params += n
    quant = None
    ftype = md.get("general.file_type")
    if ftype is not None:
        try:
            import gguf

            quant = gguf.LlamaFileType(int(ftype)).name.replace("MOSTLY_", "")
        except ValueError:
            quant = None
    ctx_len = md.get(f"{arch}.context_length")
    return {"architecture": arch, "parameters": max(1, params), "quantization": quant,
            "context_length": int(ctx_len) if ctx_len else None,
            "name": md.get("general.name"), "license": md.get("general.license")}


def import_gguf(store: Store, catalog: Catalog, file: Path, name: str, *, copy: bool = False,
                on_event: EventCallback | None = None) -> PullResult:
    """Register an arbitrary GGUF file as model ``name``: writes its manifest under the store, then imports
    it."""
    emit: EventCallback = on_event or (lambda e: None)
    file = Path(file)
    if not is_valid_model_name(name):
        raise UsageError(
            f"{name!r} is not a valid model name", "use lowercase letters, digits, '.', '_' and '-'"
        )
    store.check_writable(f"import {file.name}")
    existing = catalog.get(name)
    summary = _gguf_summary(file)
    emit(ProgressEvent("start", file.name, 0, file.stat().st_size, message=f"hashing {file}"))
    ctx = FetchContext(store, PullOptions(), emit)
    sha = sha256_file(file, ctx.progress(ManifestFile(file.name, "0" * 64), "import", file.stat().st_size))
    size = file.stat().st_size
    if existing is not None and not any(f.sha256 == sha for v in existing.variants for f in v.files):
        raise UsageError(f"the name {name!r} is already used by a model ({existing.origin})",
                         "choose another --name, or `pipx-llama rm` the imported model first")
    if existing is not None:
        manifest = existing
    else:
        quant = summary["quantization"]
        rel = file.name if unsafe_path_reason(file.name) is None and file.suffix == ".gguf" else "model.gguf"
        ctx_note = "" if summary["context_length"] else " (context length not in the file; 2048 assumed)"
        data = {
            "format": 1,
            "name": name,
            "description": f"imported from {file.name}"
            + (f" ({summary['name']})" if summary["name"] else "")
            + ctx_note,
            "license": "unknown: imported by the user"
            + (f" (file says: {summary['license']})" if summary["license"] else ""),
            "architecture": summary["architecture"],
            "parameters": summary["parameters"],
            "context_length": summary["context_length"] or 2048,
            "variants": [
                {
                    "name": (quant or "gguf").lower(),
                    "format": "gguf",
                    "quantization": quant or "unknown",
                    "files": [{"path": rel, "size": size, "sha256": sha}],
                }
            ],
        }
        text = "# written by `pipx-llama import`\n" + render_manifest(data)
        dest = store.manifests_dir / f"{name}.toml"
        manifest = parse_manifest(text, str(dest))
        with store.writing(f"import {file.name}"):
            store.manifests_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, text.encode())
    variant = next(v for v in manifest.variants if any(f.sha256 == sha for f in v.files))
    options = PullOptions(variant=variant.name, local_files={sha: file}, offline=True, copy=copy)
    return pull(store, manifest, options, on_event)
