"""From a reference to what it names: a manifest (kind ``name``), or a GGUF file whose header was checked
(kind ``file``).

Every command resolves through here, so a name means the same model to ``run``, ``serve``, ``pull``
and the rest. A new kind of reference (:mod:`pipx_llama.models.reference`) whose model is described
by a manifest adds its resolver to ``_MANIFEST_RESOLVERS``; the planner needs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipx_llama.errors import ModelFileError, UsageError
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.models.known import suggestions
from pipx_llama.models.manifest import Catalog, Manifest
from pipx_llama.models.mirror import manifest_from_mirrors
from pipx_llama.models.reference import Reference
from pipx_llama.models.sources import PullOptions


def _by_name(ref: Reference, catalog: Catalog, options: PullOptions) -> Manifest:
    """The known manifests, else a configured mirror's manifest index; else an error with suggestions."""
    found = catalog.get(ref.text)
    if found is not None:
        return found
    remote = manifest_from_mirrors(
        ref.text,
        options.mirrors,
        allow_http=options.allow_http,
        offline=options.offline,
        token=options.token,
        catalog=catalog,
    )
    if remote is not None:
        return remote
    close = suggestions(ref.text, catalog, options.lock_dir)
    raise UsageError(f"no model named {ref.text!r}",
                     (f"did you mean {', '.join(close)}? " if close else "")
                     + "`pipx-llama list --available` shows the known models; add your own with "
                     "--manifest FILE")


def _by_oci(ref: Reference, catalog: Catalog, options: PullOptions) -> Manifest:
    """An OCI registry's image, in ollama's layout (:mod:`pipx_llama.models.oci`)."""
    from pipx_llama.models.oci import resolve_oci

    return resolve_oci(ref, options)


def _by_hf(ref: Reference, catalog: Catalog, options: PullOptions) -> Manifest:
    """A Hugging Face repository's GGUF, pinned to a commit (:mod:`pipx_llama.models.hf`)."""
    from pipx_llama.models.hf import resolve_hf

    return resolve_hf(ref, options)


_MANIFEST_RESOLVERS: dict[str, Callable[[Reference, Catalog, PullOptions], Manifest]] = {
    "name": _by_name, "oci": _by_oci, "hf": _by_hf,
}


def resolve_manifest(ref: Reference, catalog: Catalog, options: PullOptions) -> Manifest:
    """The manifest ``ref`` names (raises ``UsageError`` with suggestions for an unknown name)."""
    resolver = _MANIFEST_RESOLVERS.get(ref.kind)
    if resolver is None:
        raise UsageError(f"{ref.text} is a {ref.kind}, not a model described by a manifest",
                         "give a model name or alias (see `pipx-llama list --available`)")
    return resolver(ref, catalog, options)


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file given by path, as its header describes it."""

    path: Path
    name: str
    size: int
    quant: str            # the declared file type (e.g. Q4_1), or "GGUF" when it does not say
    context_length: int | None


def check_file(ref: Reference) -> GGUFFile:
    """Open ``ref``'s file and check its header (every count, length and offset against the file size);
    ``ModelFileError`` says what is wrong (no such file, a folder, not a GGUF, damaged)."""
    if ref.path is None:
        raise UsageError(f"{ref.text} is not a file reference", "pass -m FILE.gguf")
    g = open_gguf(ref.path)
    try:
        md = g.metadata
        arch = str(md.get("general.architecture", ""))
        ctx = md.get(f"{arch}.context_length")
        return GGUFFile(ref.path.resolve(), ref.path.name.removesuffix(".gguf"), ref.path.stat().st_size,
                        _file_type_name(md.get("general.file_type")),
                        int(ctx) if isinstance(ctx, int) else None)
    except OSError as err:
        raise ModelFileError(f"{ref.path}: cannot read: {err.strerror}", "check the file") from None
    finally:
        g.close()


def _file_type_name(value: object) -> str:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "GGUF"
