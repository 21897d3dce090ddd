"""What the user named: a model reference, parsed once, the same way by every command.

A reference has a ``kind``, and each kind has one parser here and one resolver in
:mod:`pipx_llama.models.resolve`:

- ``name``: a model name or alias of the known manifests (bundled, the user's, ``--manifest``) or of a
  configured mirror's manifest index: planned, fetched, converted and quantized as needed;
- ``file``: a GGUF file on this machine (``-m FILE``, or a path given where a name goes): run as it is,
  its header checked, nothing planned;
- ``hf``: a Hugging Face repository, ``hf.co/OWNER/REPO[:QUANT][@REV]`` (the GGUF for QUANT picked as
  llama.cpp's ``-hf`` does) or one file of it, ``hf.co/OWNER/REPO/PATH.gguf[@REV]``;
- ``oci``: a model in an OCI registry in ollama's layout, ``[REGISTRY/]NAMESPACE/NAME[:TAG|@sha256:HEX]``
  (the registry defaults to the configured one; ``ollama.com/library/NAME`` is ollama's library).

A new kind is one more parser in ``_PARSERS`` (before ``_file``, which takes any text that looks like a
path) and one more resolver in :mod:`pipx_llama.models.resolve` that turns it into a ``Manifest``;
planning and preparing are the same for every kind that has a manifest. Parsing is strict: a text
that is plainly meant as a registry reference but breaks its grammar is refused here, in one line,
before anything is looked up.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipx_llama.errors import UsageError

DEFAULT_MODEL = "smollm2-135m-instruct"

# What a manifest name or alias may be (pipx_llama.models.manifest validates both with these characters).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")

HF_HOSTS = ("hf.co", "huggingface.co")
# ollama's public library answers the registry API at this host (ollama's types/model/name.go default)
OLLAMA_REGISTRY = "registry.ollama.ai"
_OLLAMA_ALIASES = ("ollama.com", "www.ollama.com", "ollama.ai", OLLAMA_REGISTRY)
DEFAULT_TAG = "latest"
# The OCI distribution spec's grammar: path components, tags and sha256 digests.
_OCI_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_OCI_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_OCI_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_OCI_HOST = re.compile(r"(?:[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*|\[[0-9a-fA-F:]{2,39}\])"
                       r"(?::[0-9]{1,5})?")
_OCI_MAX_NAME = 255
# Hugging Face repository ids, revisions and quantization names.
_HF_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_HF_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,255}")
_HF_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_HF_FILE_PART = re.compile(r"[A-Za-z0-9._+-]{1,255}")


@dataclass(frozen=True)
class OciName:
    """An OCI reference taken apart. ``registry`` None: the configured default registry."""

    registry: str | None
    repository: str           # NAMESPACE/NAME (more path components allowed by the spec)
    tag: str | None
    digest: str | None        # sha256:HEX, pins the manifest

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/`` in the API: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG


@dataclass(frozen=True)
class HfName:
    """A Hugging Face reference taken apart: a repository and either a quantization or a file."""

    repo: str                 # OWNER/REPO
    quant: str | None = None
    file: str | None = None   # a path in the repository, ending in .gguf
    revision: str | None = None


@dataclass(frozen=True)
class Reference:
    """A model as the user named it. ``text`` is what they wrote; ``path`` is set for ``file``."""

    kind: str
    text: str
    path: Path | None = None
    oci: OciName | None = None
    hf: HfName | None = None

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    def describe(self) -> str:
        """Which kind of reference this was read as, in words, for the command line to show."""
        if self.oci is not None:
            o = self.oci
            where = o.registry or "the default registry"
            pin = f"digest {o.digest}" if o.digest else f"tag {o.tag or DEFAULT_TAG}"
            return f"OCI reference: repository {o.repository} at {where}, {pin}"
        if self.hf is not None:
            h = self.hf
            what = f"file {h.file}" if h.file else (f"quantization {h.quant}" if h.quant else "default GGUF")
            return f"Hugging Face reference: repository {h.repo}, {what}, revision {h.revision or 'main'}"
        if self.kind == "file":
            return f"file: {self.path}"
        return f"model name: {self.text}"

    def __str__(self) -> str:
        return self.text


def _file(text: str) -> Reference | None:
    """A path: ends in .gguf, starts like a path (``/``, ``./``, ``~``, ``C:\\``), or names a file here.

    A bare ``org/repo`` is left to the kinds listed before this one (registry references)."""
    if _looks_like_path(text) or (not _NAME.fullmatch(text) and _exists(text, file=True)):
        return Reference("file", text, Path(text).expanduser())
    return None


def _exists(text: str, *, file: bool = False) -> bool:
    """Whether ``text`` names something here; a text no file system could hold (too long, NUL) does not."""
    try:
        p = Path(text)
        return p.is_file() if file else p.exists()
    except (OSError, ValueError):
        return False


def _looks_like_path(text: str) -> bool:
    return (text.lower().endswith(".gguf") or text.startswith(("/", "./", "../", "~", ".\\", "..\\", "\\"))
            or bool(_DRIVE.match(text)))


def _bad(text: str, kind: str, problem: str, hint: str) -> UsageError:
    return UsageError(f"{text!r} is not a valid {kind}: {problem}", hint)


_HF_HINT = "write hf.co/OWNER/REPO[:QUANT][@REVISION] or hf.co/OWNER/REPO/FILE.gguf[@REVISION]"


def _hf(text: str) -> Reference | None:
    """``hf.co/OWNER/REPO[:QUANT][@REV]`` or ``hf.co/OWNER/REPO/PATH.gguf[@REV]`` (also huggingface.co/)."""
    bare = text.removeprefix("https://")
    host, _, rest = bare.partition("/")
    if host.lower() not in HF_HOSTS or not rest:
        return None
    rest, at, revision = rest.partition("@")
    if at and not (_HF_REVISION.fullmatch(revision) and ".." not in revision):
        raise _bad(text, "Hugging Face reference", f"bad revision {revision!r}",
                   "a revision is a branch, tag or commit hash, e.g. @main or @0123abcd")
    parts = rest.split("/")
    if len(parts) < 2:
        raise _bad(text, "Hugging Face reference", "no repository", _HF_HINT)
    owner, repo = parts[0], parts[1]
    quant = None
    if len(parts) == 2 and ":" in repo:
        repo, _, quant = repo.partition(":")
        if not _HF_QUANT.fullmatch(quant):
            raise _bad(text, "Hugging Face reference", f"bad quantization {quant!r}",
                       "name a quantization like Q4_K_M or Q8_0")
    for part in (owner, repo):
        if not _HF_PART.fullmatch(part) or "--" in part or ".." in part:
            raise _bad(text, "Hugging Face reference", f"bad repository name part {part!r}", _HF_HINT)
    file = None
    if len(parts) > 2:
        segs = parts[2:]
        if not all(_HF_FILE_PART.fullmatch(p) and p not in (".", "..") for p in segs):
            raise _bad(text, "Hugging Face reference", f"bad file path {'/'.join(segs)!r}", _HF_HINT)
        file = "/".join(segs)
        if not file.lower().endswith(".gguf"):
            raise _bad(text, "Hugging Face reference", f"{file} is not a .gguf file",
                       "name a GGUF file of the repository, or give :QUANT to pick one")
    hf = HfName(f"{owner}/{repo}", quant=quant, file=file, revision=revision or None)
    return Reference("hf", text, hf=hf)


_OCI_HINT = ("write [REGISTRY/]NAMESPACE/NAME[:TAG] or [REGISTRY/]NAMESPACE/NAME@sha256:HEX, "
             "e.g. library/qwen2.5:0.5b")


def _oci(text: str) -> Reference | None:
    """``[REGISTRY/]NAMESPACE/NAME[:TAG|@sha256:HEX]``; a bare ``NAME:TAG`` is refused with a hint.

    As in Docker, the first component is a registry when it has a ``.`` or a ``:`` or is ``localhost``.
    A text that names an existing path, or starts like one, is left to ``_file``."""
    if _looks_like_path(text) or _exists(text):
        return None
    if "/" not in text:
        if ":" in text and not _DRIVE.match(text):
            name = text.split(":", 1)[0]
            raise _bad(text, "model reference",
                       "a model name has no ':' and an OCI reference needs a namespace",
                       f"for ollama's library write library/{name}:TAG (or ollama.com/library/{name}:TAG)")
        return None
    rest, at, digest = text.partition("@")
    if at and not _OCI_DIGEST.fullmatch(digest):
        raise _bad(text, "OCI reference", f"bad digest {digest[:80]!r}",
                   "a digest is sha256: and 64 lowercase hex digits")
    first, _, remainder = rest.partition("/")
    registry = None
    if "." in first or ":" in first or first == "localhost":
        if len(first) > 255 or not _OCI_HOST.fullmatch(first):
            raise _bad(text, "OCI reference", f"bad registry host {first!r}", _OCI_HINT)
        registry = OLLAMA_REGISTRY if first.lower() in _OLLAMA_ALIASES else first.lower()
        rest = remainder
    repository, colon, tag = rest.partition(":")
    if colon and not _OCI_TAG.fullmatch(tag):
        raise _bad(text, "OCI reference", f"bad tag {tag[:80]!r}", "a tag is letters, digits, '_', '.', '-'")
    comps = repository.split("/")
    if len(comps) < 2:
        raise _bad(text, "OCI reference", "a namespace and a name are needed", _OCI_HINT)
    for comp in comps:
        if not _OCI_COMPONENT.fullmatch(comp):
            raise _bad(text, "OCI reference", f"bad path component {comp[:80]!r} (lowercase letters, digits, "
                       "'.', '_', '-' between them)", _OCI_HINT)
    if len(repository) > _OCI_MAX_NAME:
        raise _bad(text, "OCI reference", f"the repository name is longer than {_OCI_MAX_NAME} characters",
                   _OCI_HINT)
    oci = OciName(registry, repository, tag or None, digest or None)
    return Reference("oci", text, oci=oci)


# Tried in order; the first that takes the text decides its kind, and a text none takes is a ``name``.
# A kind whose texts could read as a path (``hf.co/org/repo``) goes before ``_file``.
_PARSERS: tuple[Callable[[str], Reference | None], ...] = (_hf, _oci, _file)


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
