"""``pipx-llama verify [MODEL]``: re-hash installed files against their manifests (derived files against
their provenance) and report; works on a read-only store (reports without repairing)."""

from __future__ import annotations

import argparse

from pipx_llama.cli import store_common as common
from pipx_llama.cli.progress import renderer_for
from pipx_llama.errors import ModelFileError, UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-hash installed models and report any damage")
    p.add_argument(
        "model", nargs="?", default=None, help="model name or alias (default: every installed model)"
    )
    p.add_argument("--variant", default=None, help="only this variant")
    p.add_argument("--keep-bad", action="store_true",
                   help="leave damaged files in place (default: remove them so `pull` fetches them again)")
    common.add_manifest_option(p)
    common.add_json(p)


def run(args: argparse.Namespace) -> int:
    from pipx_llama.models.verify import verify_installed

    s = common.open_session(args)
    name = None
    if args.model is not None:
        m = s.catalog.get(args.model)
        name = m.name if m else args.model
    targets = [iv for iv in s.store.installed(name) if args.variant in (None, iv.variant)]
    if not targets and args.model is None:
        # an empty store is not damaged: say so, and succeed
        with renderer_for(args.json) as out:
            out.say(f"nothing to verify: no models are installed in {s.store.root}")
            if args.json:
                out.emit_json({"kind": "result", "verified": 0, "ok": True})
        return 0
    if not targets:
        raise UsageError(f"nothing installed{' for ' + repr(args.model) if args.model else ''} to verify",
                         "`pipx-llama list` shows what is installed")
    bad: list[str] = []
    with renderer_for(args.json) as out:
        for iv in targets:
            label = f"{iv.model} ({iv.variant})"
            if not iv.complete:
                bad.append(f"{label}: incomplete install (no provenance record)")
                out.say(f"BAD {label}: incomplete install; run pull again")
                continue
            with s.store.shared(read_only_ok=True):
                checks = verify_installed(s.store, iv, out, remove_bad=not args.keep_bad,
                                          manifest=s.catalog.get(iv.model))
            failed = [c for c in checks if not c.ok]
            bad += [f"{label} {c.path}: {c.status}" for c in failed]
            if args.json:
                out.emit_json({"kind": "verify", "model": iv.model, "variant": iv.variant,
                               "files": [{**c.__dict__, "ok": c.ok} for c in checks], "ok": not failed})
            else:
                removed = sum(c.removed for c in failed)
                out.say(f"{label}: " + ("all files verified" if not failed else
                                        f"{len(failed)} of {len(checks)} file(s) failed verification"
                                        + (f", {removed} removed" if removed else "")))
    if bad:
        if s.store.read_only_reason() is not None:
            hint = ("the store is read-only: ask whoever manages it to run `pipx-llama verify` (which "
                    "removes damaged files) and then `pipx-llama pull MODEL`")
        else:
            hint = ("run `pipx-llama pull MODEL` to fetch the damaged files again (a run rebuilds derived "
                    "files)" + ("; without --keep-bad, verify removes them first" if args.keep_bad else ""))
        raise ModelFileError(f"verification failed for {len(bad)} file(s): " + "; ".join(bad), hint)
    return 0
