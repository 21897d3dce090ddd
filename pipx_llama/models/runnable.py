"""The runnable GGUF of a variant in the store: where it lives, whether it is there and intact, and the
record of the stages that made it.

A GGUF variant's runnable file is its pulled file; original weights become ``<quant>.gguf`` beside
them, with ``<quant>.gguf.provenance.json`` (source hashes -> derived file hash). A split GGUF
(``NAME-00001-of-0000N.gguf`` and the rest of its parts) is merged into ``NAME.gguf``, a derived file
with the same kind of record (the parts' hashes -> the merged file's hash). Each stage's
completion is recorded in ``models/<name>/<variant>/.pipeline.json``. Before a prepared GGUF is handed
out, its size and the digest of its header and tensor table are compared with what was recorded when
it was verified or made (``check_installed``): a file changed since is refused with a
``ModelFileError`` instead of being run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipx_llama.errors import ModelFileError
from pipx_llama.formats.gguf_split import split_name
from pipx_llama.models.manifest import Manifest, Variant
from pipx_llama.models.store import DERIVED_PROVENANCE_SUFFIX, Store, recorded_file_problem

STAGES = ("fetch", "convert", "quantize")
CONVERTIBLE = ("meta-pth", "hf-safetensors")
# What original weights can be quantized to, largest first (pipx_llama.quant.rules.FILE_TYPES).
QUANT_LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0")
STATE_FILE = ".pipeline.json"
INTERMEDIATE = "intermediate-f16.gguf"
PROVENANCE_SUFFIX = DERIVED_PROVENANCE_SUFFIX


def default_quant(variant: Variant) -> str:
    """The quantization a variant runs in: a GGUF's own, or the target for converting original weights."""
    if variant.format == "gguf":
        return (variant.quantization or "unknown").upper()
    if variant.quantization and variant.quantization.upper() in QUANT_LADDER:
        return variant.quantization.upper()
    return "Q4_0" if variant.format == "meta-pth" else "Q4_K_M"


def split_parts(variant: Variant) -> list[str] | None:
    """The paths of a GGUF variant's split parts in order, when its GGUFs are exactly the N parts of one
    split set (``NAME-0000i-of-0000N.gguf``, same folder); None for an ordinary GGUF variant."""
    if variant.format != "gguf":
        return None
    ggufs = [f.path for f in variant.files if f.path.lower().endswith(".gguf")]
    names = [split_name(p.rsplit("/", 1)[-1]) for p in ggufs]
    first = names[0] if names else None
    if first is None or len(ggufs) != first.count or len({p.rsplit("/", 1)[0] if "/" in p else ""
                                                           for p in ggufs}) != 1:
        return None
    folder = ggufs[0][:len(ggufs[0]) - len(ggufs[0].rsplit("/", 1)[-1])]
    wanted = [folder + first.part(n) for n in range(1, first.count + 1)]
    return wanted if sorted(wanted) == sorted(ggufs) else None


def final_path(store: Store, manifest: Manifest, variant: Variant, quant: str) -> Path:
    """The runnable GGUF: a GGUF variant's file (a split one's merged file), or ``<quant>.gguf`` derived
    from original weights."""
    folder = store.variant_dir(manifest.name, variant.name)
    parts = split_parts(variant)
    if parts is not None:
        name = split_name(parts[0].rsplit("/", 1)[-1])
        return folder / name.merged if name is not None else folder / parts[0]
    if variant.format == "gguf":
        ggufs = [f.path for f in variant.files if f.path.endswith(".gguf")] or [variant.files[0].path]
        return folder / ggufs[0]
    return folder / f"{quant.lower()}.gguf"


def provenance_path(final: Path) -> Path:
    return final.with_name(final.name + PROVENANCE_SUFFIX)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def source_hashes(variant: Variant) -> dict[str, str]:
    return {f.path: f.sha256 for f in variant.files}


def derived_ready(final: Path, variant: Variant, quant: str) -> bool:
    """A derived GGUF is usable when its provenance matches the file and the manifest's sources."""
    record = read_json(provenance_path(final))
    if record is None or not final.is_file():
        return False
    sources = {s.get("path"): s.get("sha256") for s in record.get("sources", []) if isinstance(s, dict)}
    return (
        record.get("size") == final.stat().st_size
        and str(record.get("quantization", "")).upper() == quant
        and sources == source_hashes(variant)
    )


def merged_ready(final: Path, variant: Variant) -> bool:
    """A split variant's merged GGUF is usable: its record matches the file and the manifest's parts."""
    record = read_json(provenance_path(final))
    if record is None or not final.is_file():
        return False
    sources = {s.get("path"): s.get("sha256") for s in record.get("sources", []) if isinstance(s, dict)}
    return record.get("size") == final.stat().st_size and sources == source_hashes(variant)


def gguf_ready(store: Store, manifest: Manifest, variant: Variant) -> bool:
    folder = store.variant_dir(manifest.name, variant.name)
    record = store.read_provenance(manifest.name, variant.name) or {}
    recorded = {f.get("path"): f.get("sha256") for f in record.get("files", [])}
    return recorded == source_hashes(variant) and all(
        store.has_blob(f.sha256, f.size) and (folder / f.path).is_file() for f in variant.files)


def check_installed(store: Store, manifest: Manifest, variant: Variant, final: Path) -> None:
    """Raise ``ModelFileError`` when the runnable GGUF ``final``, as it is now, is not the file that was
    verified (a pulled GGUF) or made (a derived one): its size, or the digest of its header and tensor
    table, differs from the record. Cheap (no full hash); a missing file is left to the pipeline."""
    if not os.path.lexists(final):
        return
    if variant.format == "gguf" and split_parts(variant) is None:
        record = store.read_provenance(manifest.name, variant.name) or {}
        rel = final.relative_to(store.variant_dir(manifest.name, variant.name)).as_posix()
        entry = next((f for f in record.get("files", []) if isinstance(f, dict) and f.get("path") == rel),
                     None)
        what, again = "verified when it was installed", "then run again to fetch it"
    else:
        entry = read_json(provenance_path(final))
        what, again = "recorded when it was made", "the next run makes it again"
    problem = recorded_file_problem(final, entry) if entry else None
    if problem is not None:
        raise ModelFileError(f"{final} is not the file {what}: {problem}",
                             f"`pipx-llama verify {manifest.name}` re-hashes it and removes it if it is "
                             f"damaged; {again}")


def is_ready(store: Store, manifest: Manifest, variant: Variant, quant: str) -> bool:
    """The runnable GGUF for (variant, quant) is in the store, complete and recorded."""
    if variant.format == "gguf":
        final = final_path(store, manifest, variant, quant)
        return gguf_ready(store, manifest, variant) and (split_parts(variant) is None
                                                         or merged_ready(final, variant))
    return derived_ready(final_path(store, manifest, variant, quant), variant, quant)


def _state_path(store: Store, manifest: Manifest, variant: Variant) -> Path:
    return store.variant_dir(manifest.name, variant.name) / STATE_FILE


def read_state(store: Store, manifest: Manifest, variant: Variant) -> dict[str, Any]:
    """The variant's stage record (empty when missing, unreadable or for other source files)."""
    state = read_json(_state_path(store, manifest, variant)) or {}
    if state.get("sources") != source_hashes(variant):
        return {}
    return state


def convert_done(
    store: Store, manifest: Manifest, variant: Variant, state: dict[str, Any] | None = None
) -> bool:
    state = read_state(store, manifest, variant) if state is None else state
    conv = state.get("stages", {}).get("convert", {})
    inter = store.variant_dir(manifest.name, variant.name) / INTERMEDIATE
    try:
        st = inter.stat()
    except OSError:
        return False
    return (
        conv.get("status") == "done"
        and conv.get("size") == st.st_size
        and conv.get("mtime_ns") == st.st_mtime_ns
    )
