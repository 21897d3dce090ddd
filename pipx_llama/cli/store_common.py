"""Options and set-up shared by the store commands (pull, list, rm, verify, gc, mirror, import)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipx_llama.errors import UsageError

if TYPE_CHECKING:
    from pipx_llama.config import Config
    from pipx_llama.models.manifest import Catalog, Manifest
    from pipx_llama.models.sources import PullOptions
    from pipx_llama.models.store import Store

# The heavy modules (httpx, the store, manifests) are imported when a command runs, not when the
# parser is built, so that `pipx-llama run` does not pay for them.


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print newline-delimited JSON instead of text")


def add_manifest_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", action="append", default=[], type=Path, metavar="FILE",
                   help="also read this manifest (repeatable); see docs/manifests.md")
    p.add_argument("--allow-http", action="store_true",
                   help="accept plain-http URLs in manifests and mirrors (default: loopback only)")


def add_network_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mirror", action="append", default=[], metavar="URL|DIR",
                   help="a mirror made by `mirror export` (repeatable; tried before the manifest's sources; "
                        "also PIPX_LLAMA_MIRROR and `mirrors` in the config file)")
    p.add_argument("--url", default=None, metavar="URL",
                   help="the URL for url-template sources, e.g. Meta's presigned URL with a '*' "
                        "(also PIPX_LLAMA_URL)")
    p.add_argument("--offline", action="store_true",
                   help="never touch the network (also PIPX_LLAMA_OFFLINE=1)")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="connections per large file (default 4)")


@dataclass
class Session:
    config: Config
    store: Store
    catalog: Catalog
    allow_http: bool


def open_session(args: argparse.Namespace) -> Session:
    from pipx_llama.config import load_config
    from pipx_llama.models.manifest import load_catalog
    from pipx_llama.models.store import Store

    config = load_config()
    allow_http = bool(getattr(args, "allow_http", False) or config.allow_http)
    catalog = load_catalog(getattr(args, "manifest", []), user_dirs=config.user_manifest_dirs,
                           allow_http=allow_http)
    return Session(config, Store(config.home), catalog, allow_http)


def mirrors(args: argparse.Namespace, config: Config) -> list[str]:
    return list(dict.fromkeys([*getattr(args, "mirror", []), *config.mirrors]))


def offline(args: argparse.Namespace, config: Config) -> bool:
    return bool(getattr(args, "offline", False) or config.offline)


def pull_options(args: argparse.Namespace, s: Session) -> PullOptions:
    """The configuration's pull options, with the command line's on top."""
    from pipx_llama.models.sources import pull_options_from_config

    parallel = getattr(args, "parallel", None)
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel {parallel}: must be at least 1", "use 1 for a single connection")
    options = pull_options_from_config(
        s.config,
        variant=getattr(args, "variant", None),
        from_dirs=[Path(d) for d in getattr(args, "from_dir", [])],
        mirrors=mirrors(args, s.config),
        url=getattr(args, "url", None) or s.config.url,
        offline=offline(args, s.config),
        allow_http=s.allow_http,
        copy=bool(getattr(args, "copy", False)),
    )
    if parallel is not None and options.fetch is not None:
        options.fetch.parallel_parts = parallel
    return options


def resolve(s: Session, name: str, args: argparse.Namespace) -> Manifest:
    """A model by name or alias: the known manifests, else the manifest index of a configured mirror
    (the resolver of every command, ``models.resolve``); raises with suggestions."""
    from pipx_llama.models.reference import Reference
    from pipx_llama.models.resolve import resolve_manifest

    return resolve_manifest(Reference("name", name), s.catalog, pull_options(args, s))


def store_waiter(say: Callable[[str], None]) -> Callable[[str, float], None]:
    """An ``on_wait`` for the store lock that tells the user once (then every 30 s) why nothing happens."""
    last = [-1e9]

    def on_wait(holder: str, waited: float) -> None:
        if waited - last[0] >= 30:
            last[0] = waited
            say("waiting for other pipx-llama processes (a pull, import or export) to finish with the store")
    return on_wait
