"""Every name a user could have meant: the known manifests' names and aliases, and the OCI and Hugging
Face references pulled here before (their locks under ``<home>/locks``), for "did you mean" hints.

The locks are named by a hash of the reference, so the reference is read back from the manifest each
holds (its description starts with it, as :mod:`pipx_llama.models.oci` and :mod:`pipx_llama.models.hf`
write it). Only a hint is at stake: a lock that cannot be read is left out, and the number and size of
the files read are bounded.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from pipx_llama.models.manifest import Catalog, ManifestError, parse_manifest

MAX_LOCKS = 2000          # per kind; a home holds a few dozen
MAX_LOCK_BYTES = 256 << 10
_OCI_REF = re.compile(r"^(\S+?)(?: \(OCI image sha256:[0-9a-f]{64}\))?$")
_HF_REF = re.compile(r"^(hf\.co/\S+\.gguf) at commit [0-9a-f]+$")


@dataclass(frozen=True)
class KnownName:
    """A text that names a model here: ``kind`` is ``name``, ``alias``, ``oci`` or ``hf``; ``model`` is
    the name of the manifest it leads to."""

    text: str
    kind: str
    model: str


def known_names(catalog: Catalog | None, lock_dir: Path | None) -> list[KnownName]:
    """The manifests' names and aliases, then the references pulled before (newest lock first)."""
    out: list[KnownName] = []
    for m in catalog or ():
        out.append(KnownName(m.name, "name", m.name))
        out += [KnownName(a, "alias", m.name) for a in m.aliases]
    if lock_dir is not None:
        for kind, pattern in (("oci", _OCI_REF), ("hf", _HF_REF)):
            out += _locked(lock_dir / kind, kind, pattern)
    return out


def _locked(folder: Path, kind: str, pattern: re.Pattern[str]) -> list[KnownName]:
    try:
        paths = sorted(folder.glob("*.toml"), key=lambda p: p.stat().st_mtime, reverse=True)[:MAX_LOCKS]
    except OSError:
        return []
    out: list[KnownName] = []
    for path in paths:
        try:
            if path.stat().st_size > MAX_LOCK_BYTES:
                continue
            manifest = parse_manifest(path.read_text(encoding="utf-8"), str(path), allow_http=True)
        except (OSError, UnicodeDecodeError, ManifestError):
            continue  # a damaged lock costs only a hint here; resolving the reference reports it
        m = pattern.match(manifest.description)
        if m and all(k.text != m.group(1) for k in out):
            out.append(KnownName(m.group(1), kind, manifest.name))
    return out


def suggestions(text: str, catalog: Catalog | None, lock_dir: Path | None, n: int = 3) -> list[str]:
    """Up to ``n`` known texts closest to ``text``. A reference is also matched by its last part
    (``smollm2:135m`` finds ``registry.lab:5000/lab/smollm2:135m``)."""
    keys: dict[str, str] = {}
    for k in known_names(catalog, lock_dir):
        keys.setdefault(k.text.lower(), k.text)
        if k.kind in ("oci", "hf"):
            keys.setdefault(k.text.rsplit("/", 1)[-1].lower(), k.text)
    close = difflib.get_close_matches(text.lower(), list(keys), n=n * 2, cutoff=0.5)
    return list(dict.fromkeys(keys[c] for c in close))[:n]
