"""Hugging Face references (``hf.co/OWNER/REPO[:QUANT]``, ``hf.co/OWNER/REPO/FILE.gguf``) resolved with
``huggingface_hub``: the repository's file list with each LFS file's sha256 and size, pinned to the
commit the revision points at, and the GGUF for ``:QUANT`` picked as llama.cpp's ``-hf`` does.

The result is a manifest of our own (the commit and hashes in it) whose source is the pinned
``resolve/<commit>/`` URL, so the file comes through the same downloader, sha256 check and store as
every other; the manifest is kept with the files and under ``<home>/locks/hf/`` (the lock), so
``--offline`` (or ``HF_HUB_OFFLINE=1``) runs a resolved reference again without asking the hub.
``HF_TOKEN`` is sent to the hub; ``HF_ENDPOINT`` points at a mirror.

A split GGUF (``NAME-00001-of-0000N.gguf``, llama.cpp's ``llama-gguf-split``; any of its parts may be
named) becomes a manifest listing all N parts, each with its own sha256 and size; the pipeline merges
them into one GGUF once they are verified (:mod:`pipx_llama.models.prepare`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipx_llama.errors import FetchError, UsageError
from pipx_llama.fetch.errors import AccessDenied, OfflineError, SourceNotFound
from pipx_llama.files import atomic_write_bytes
from pipx_llama.formats.gguf_split import split_name
from pipx_llama.models.manifest import Manifest, ManifestError, parse_manifest, render_manifest
from pipx_llama.models.reference import HfName, Reference

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_QUANT = "Q4_K_M"   # llama.cpp's -hf picks this when no tag is given, if the repository has it
_NAME_BAD = re.compile(r"[^a-z0-9._-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
MAX_FILES = 10000


@dataclass(frozen=True)
class HfFile:
    path: str
    size: int
    sha256: str


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def lock_path(lock_dir: Path | None, hf: HfName) -> Path | None:
    if lock_dir is None:
        return None
    key = f"{endpoint()}/{hf.repo}:{hf.quant or ''}:{hf.file or ''}@{hf.revision or 'main'}"
    return lock_dir / "hf" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".toml")


def repo_files(hf: HfName, token: str | None) -> tuple[str, list[HfFile], dict[str, Any]]:
    """The commit ``hf.revision`` points at, the repository's LFS files (path, size, sha256) and the
    hub's GGUF summary, from ``HfApi.model_info(files_metadata=True)``; every field checked."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=endpoint(), token=token or False)
    where = f"hf.co/{hf.repo}@{hf.revision or 'main'}"
    try:
        info = api.model_info(hf.repo, revision=hf.revision, files_metadata=True, timeout=30)
    except GatedRepoError:
        raise AccessDenied(f"{where} is gated", "accept its licence on its page, create a read token and set "
                           "HF_TOKEN to it") from None
    except RepositoryNotFoundError:
        raise SourceNotFound(f"{where} does not exist (or is private)",
                             "check the name; for a private repository set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise SourceNotFound(f"{where}: no such revision", "give a branch, tag or commit of it") from None
    except HfHubHTTPError as err:
        raise FetchError(f"the hub answered {where} with an error: {str(err).splitlines()[0][:200]}",
                         "try again later (HF_ENDPOINT points at a mirror, if set)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # a malformed answer
        raise FetchError(f"cannot read {where} from {endpoint()}: {str(err)[:200]}",
                         "check the network, HF_ENDPOINT, or use --offline with a reference pulled before") \
            from None
    commit = info.sha
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        raise FetchError(f"the hub gave no commit for {where}", "it is not a model repository answer")
    siblings = info.siblings or []
    if len(siblings) > MAX_FILES:
        raise FetchError(f"{where} lists more than {MAX_FILES} files; refused",
                         "this is not a model repository")
    files = []
    for s in siblings:
        lfs = s.lfs
        if lfs is None or not isinstance(s.rfilename, str):
            continue
        sha, size = lfs.get("sha256"), lfs.get("size")
        if isinstance(sha, str) and _SHA256.fullmatch(sha) and isinstance(size, int) and size >= 0:
            files.append(HfFile(s.rfilename, size, sha))
    gguf = info.gguf if isinstance(info.gguf, dict) else {}
    return commit, files, gguf


def pick(hf: HfName, files: list[HfFile]) -> HfFile:
    """The GGUF ``hf`` names: its file, else the one whose name carries ``:QUANT`` (default Q4_K_M, else
    the first GGUF), as llama.cpp's ``-hf`` picks; projectors (``mmproj``) are never picked."""
    ggufs = sorted((f for f in files if f.path.lower().endswith(".gguf")
                    and "mmproj" not in f.path.lower().rsplit("/", 1)[-1]), key=lambda f: f.path)
    where = f"hf.co/{hf.repo}"
    if hf.file:
        for f in files:
            if f.path == hf.file:
                return f
        raise SourceNotFound(f"{where} has no LFS file {hf.file}",
                             "see the repository's files; names are case-sensitive")
    if not ggufs:
        raise UsageError(f"{where} has no GGUF file",
                         "pipx-llama runs GGUF repositories; pick one that has them")
    quant = (hf.quant or DEFAULT_QUANT).lower()
    tag = re.compile(rf"(?:^|[^a-z0-9]){re.escape(quant)}(?:[^a-z0-9]|$)")
    matching = [f for f in ggufs if tag.search(f.path.lower().rsplit("/", 1)[-1])]
    if matching:
        return matching[0]
    if hf.quant:
        have = ", ".join(f.path for f in ggufs[:8])
        raise UsageError(f"{where} has no GGUF for {hf.quant}", f"its GGUFs: {have}")
    return ggufs[0]


def split_set(hf: HfName, chosen: HfFile, files: list[HfFile]) -> list[HfFile]:
    """``chosen`` alone, or, when it is a part of a split GGUF, every part of its set in order (all of
    them must be in the listing, in the same folder)."""
    folder, _, base = chosen.path.rpartition("/")
    name = split_name(base)
    if name is None:
        return [chosen]
    by_path = {f.path: f for f in files}
    parts = []
    for n in range(1, name.count + 1):
        path = f"{folder}/{name.part(n)}" if folder else name.part(n)
        if path not in by_path:
            raise SourceNotFound(f"hf.co/{hf.repo}: part {path} of the split GGUF {name.merged} is not in "
                                 "the repository", "the upload is incomplete; pick another quantization")
        parts.append(by_path[path])
    return parts


def manifest_for(hf: HfName, commit: str, chosen: HfFile, gguf: dict[str, Any],
                 parts: list[HfFile] | None = None) -> Manifest:
    """The manifest for the file ``chosen`` (and, for a split GGUF, all its ``parts``, first included)."""
    parts = parts or [chosen]
    chosen = parts[0]
    quant_match = re.search(r"(?i)(IQ\d\w*|Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?=\.gguf$|[-.])",
                            chosen.path.rsplit("/", 1)[-1])
    quant = quant_match.group(1).upper() if quant_match else None
    repo_name = hf.repo.rsplit("/", 1)[-1].lower()
    name = _NAME_BAD.sub("-", f"{repo_name}-{(quant or 'gguf').lower()}").strip("-._")[:64].rstrip("-._")
    total, ctx = gguf.get("total"), gguf.get("context_length")
    params = total if isinstance(total, int) and not isinstance(total, bool) and total > 0 \
        else max(1, sum(p.size for p in parts) * 8 // 5)
    base = f"{endpoint()}/{hf.repo}/resolve/{commit}/"
    data = {
        "format": 1, "name": name or "hf-model",
        "description": f"hf.co/{hf.repo}/{chosen.path} at commit {commit}",
        "license": "see the repository", "homepage": f"{endpoint()}/{hf.repo}",
        "architecture": str(gguf.get("architecture") or "unknown")[:64],
        "parameters": params,
        "context_length": ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else 4096,
        "variants": [{
            "name": (quant or "gguf").lower(), "format": "gguf",
            "quantization": quant if quant and re.fullmatch(r"[A-Z0-9_]+", quant) else None,
            "files": [{"path": p.path.rsplit("/", 1)[-1], "size": p.size, "sha256": p.sha256} for p in parts],
            "sources": [{"type": "url", "base": base + (chosen.path.rsplit("/", 1)[0] + "/"
                                                         if "/" in chosen.path else "")}],
        }],
    }
    text = f"# generated by pipx-llama from hf.co/{hf.repo} at commit {commit}\n" + render_manifest(data)
    try:
        return parse_manifest(text, f"hf.co/{hf.repo}@{commit}", allow_http=True)
    except ManifestError as err:
        raise FetchError(f"hf.co/{hf.repo}: the hub's answer does not make a usable manifest: "
                         f"{err.problems[0]}", "report the repository to pipx-llama") from None


def resolve_hf(ref: Reference, options: Any) -> Manifest:
    """The manifest for an ``hf`` reference (see the module docstring)."""
    if ref.hf is None:
        raise UsageError(f"{ref.text} is not a Hugging Face reference", "write hf.co/OWNER/REPO[:QUANT]")
    hf = ref.hf
    lock = lock_path(options.lock_dir, hf)
    offline = options.offline or _hub_offline()
    if offline:
        if lock is not None and lock.is_file():
            return parse_manifest(lock.read_text(encoding="utf-8"), f"{lock} (resolved hf.co/{hf.repo})",
                                  allow_http=True)
        raise OfflineError(f"hf.co/{hf.repo} was never resolved here and offline mode is on",
                           "run once without --offline (and without HF_HUB_OFFLINE=1)")
    commit, files, gguf = repo_files(hf, options.hf_token)
    chosen = pick(hf, files)
    manifest = manifest_for(hf, commit, chosen, gguf, split_set(hf, chosen, files))
    if lock is not None:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(lock, manifest.text.encode())
        except OSError:
            pass  # a read-only store: the reference resolves online only, as it just did
    return manifest
