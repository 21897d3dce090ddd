"""What the user named: a model reference, parsed once, the same way by every command.

A reference has a ``kind``, and each kind has one parser here and one resolver in
:mod:`pipx_llama.models.resolve`:

- ``name``: a model name or alias of the known manifests (bundled, the user's, ``--manifest``) or of a
  configured mirror's manifest index: planned, fetched, converted and quantized as needed;
- ``file``: a GGUF file on this machine (``-m FILE``, or a path given where a name goes): run as it is,
  its header checked, nothing planned.

A new kind (a Hugging Face repository ``hf.co/org/repo:Q4_K_M``, an OCI reference) is one more
parser in ``_PARSERS`` (before ``_file``, which takes any text that looks like a path) and one more
resolver in :mod:`pipx_llama.models.resolve` that turns it into a ``Manifest``; planning and
preparing are the same for every kind that has a manifest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"

# What a manifest name or alias may be (pipx_llama.models.manifest validates both with these characters).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class Reference:
    """A model as the user named it. ``text`` is what they wrote; ``path`` is set for ``file``."""

    kind: str
    text: str
    path: Path | None = None

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    def __str__(self) -> str:
        return self.text


def _file(text: str) -> Reference | None:
    """A path: ends in .gguf, starts like a path (``/``, ``./``, ``~``, ``C:\\``), or names a file here.

    A bare ``org/repo`` is left to the kinds listed before this one (registry references)."""
    looks_like_path = (
        text.lower().endswith(".gguf")
        or text.startswith(("/", "./", "../", "~", ".\\", "..\\", "\\"))
        or bool(_DRIVE.match(text))
    )
    if looks_like_path or (not _NAME.fullmatch(text) and Path(text).is_file()):
        return Reference("file", text, Path(text).expanduser())
    return None


# Tried in order; the first that takes the text decides its kind, and a text none takes is a ``name``.
# A kind whose texts could read as a path (``hf.co/org/repo``) goes before ``_file``.
_PARSERS: tuple[Callable[[str], Reference | None], ...] = (_file,)


def parse_reference(text: str | None) -> Reference:
    """The reference ``text`` means (None or empty: the default model)."""
    text = (text or "").strip() or DEFAULT_MODEL
    for parse in _PARSERS:
        ref = parse(text)
        if ref is not None:
            return ref
    return Reference("name", text)


def file_reference(path: str | Path) -> Reference:
    """``-m FILE``: a file, whatever its name looks like."""
    return Reference("file", str(path), Path(path).expanduser())
