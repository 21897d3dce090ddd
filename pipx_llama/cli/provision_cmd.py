"""``pipx-llama provision FILE.toml``: make a store hold a list of models, unattended (labs, images, CI).

The file::

    store = "/srv/pipx-llama"           # optional: the store (default: PIPX_LLAMA_HOME, config, platform dir)
    mirrors = ["https://models.lab.example/pipx-llama"]   # optional: tried before the manifests' sources
    manifests = ["lab-models.toml"]     # optional: more manifests (paths relative to this file)
    offline = false                     # optional: never touch the network
    allow_http = false                  # optional: accept plain-http URLs (loopback is always allowed)
    check_ram = true                    # optional: false when the models will run on other machines
    threads = 4                         # optional: threads for quantization (default: physical cores)

    [[models]]
    name = "smollm2"                    # a name or alias, hf.co/OWNER/REPO[:QUANT], or an OCI reference

    [[models]]
    name = "1B"
    variant = "original"                # optional: which variant
    quant = ["Q4_0", "Q4_K_M"]          # optional: one or more quantizations (default: the planner's choice)

    [[models]]
    name = "llama-7b"
    from_dir = "/data/LLaMA"            # optional: files already at hand (one folder or a list)
    url = "https://...presigned...*..." # optional: the URL for url-template sources

Every model is planned before anything is downloaded; if one cannot be (unknown name, not enough
RAM or disk for it -- or for all of them together --, no source), nothing is downloaded and the
command exits. Then the models are prepared one after the other (fetch, verify, convert, quantize);
a model that fails does not stop the others. Running it again does only what is missing: models
already in the store are not touched, downloads resume, a finished conversion is reused.

With ``--json`` the output is newline-delimited JSON, one event per line, each with a ``kind``:
``provision`` (first), ``model-plan``, ``model-refused``, the pipeline's progress events (``stage``,
``stage-done``, ``stage-skipped``, ``start``, ``progress``, ``stored``, ``ready``, ... with the
``model`` they belong to), ``model-ready``, ``model-failed``, and ``result`` (last).

Exit codes: 0 every model is ready; 1 a model failed while being fetched, converted or quantized, or
none of its sources is available (the others were still prepared); 2 the file or the command line is
invalid (syntax, unknown key, unknown model or quantization); 3 a manifest is invalid; 5 refused before
any download: not enough RAM or disk (the message says what would fit); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipx_llama.cli import store_common as common
from pipx_llama.errors import PipxLlamaError, UsageError
from pipx_llama.units import human_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RESOURCES = 0, 1, 2, 5
_TOP = {
    "store": str,
    "mirrors": list,
    "manifests": list,
    "offline": bool,
    "allow_http": bool,
    "check_ram": bool,
    "threads": int,
    "models": list,
}
_MODEL = {"name": str, "variant": str, "quant": (str, list), "from_dir": (str, list), "url": str}


@dataclass
class Item:
    """One model of the file, in one quantization."""

    index: int
    name: str
    variant: str | None = None
    quant: str | None = None
    from_dirs: list[Path] = field(default_factory=list)
    url: str | None = None


@dataclass
class ProvisionFile:
    path: Path
    store: Path | None = None
    mirrors: list[str] = field(default_factory=list)
    manifests: list[Path] = field(default_factory=list)
    offline: bool = False
    allow_http: bool = False
    check_ram: bool = True
    threads: int | None = None
    items: list[Item] = field(default_factory=list)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "provision", help="prepare the models a TOML file lists, unattended (labs, CI)",
        description="Make the store hold every model a provision file lists, in the quantizations it asks "
                    "for: plan all of them first (refusing before any download when RAM or disk is short), "
                    "then fetch, verify, convert and quantize each. Idempotent: a second run does nothing.",
        epilog="exit codes: 0 all ready; 1 a model failed (others were prepared); 2 invalid file or unknown "
               "model/quantization; 3 invalid manifest; 5 refused before any download (not enough RAM or "
               "disk); 130 interrupted. File format: `pydoc pipx_llama.cli.provision_cmd`.",
    )
    p.add_argument("file", type=Path, metavar="FILE.toml", help="the provision file")
    p.add_argument(
        "--dry-run", action="store_true", help="plan only: show what would be done, change nothing"
    )
    common.add_manifest_option(p)
    p.add_argument("--json", action="store_true", help="newline-delimited JSON events instead of text")


# --- the file -----------------------------------------------------------------------------------------------


def _bad(path: Path, where: str, problem: str) -> UsageError:
    return UsageError(
        f"{path}: {where}: {problem}", "fix the provision file (format: pydoc pipx_llama.cli.provision_cmd)"
    )


def _check_type(path: Path, where: str, value: Any, kind: Any) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (int in kinds and isinstance(value, bool) and bool not in kinds):
        names = " or ".join("list of strings" if k is list else k.__name__ for k in kinds)
        raise _bad(path, where, f"must be a {names}, got {value!r}")
    if isinstance(value, list) and where != "models" and not all(isinstance(v, str) and v for v in value):
        raise _bad(path, where, "must be a list of non-empty strings")


def load_provision_file(path: Path) -> ProvisionFile:
    """Parse and validate a provision file (every problem names the file and the key)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file", "give the path of a provision file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"cannot read the provision file {path}: {err}", "fix its TOML syntax") from None
    base = path.parent
    for key, value in data.items():
        if key not in _TOP:
            raise _bad(path, key, f"unknown key (allowed: {', '.join(sorted(_TOP))})")
        _check_type(path, key, value, _TOP[key])
    out = ProvisionFile(path=path)
    if "store" in data:
        out.store = (base / Path(data["store"]).expanduser()).absolute()
    out.mirrors = list(data.get("mirrors", []))
    out.manifests = [base / Path(m).expanduser() for m in data.get("manifests", [])]
    out.offline = bool(data.get("offline", False))
    out.allow_http = bool(data.get("allow_http", False))
    out.check_ram = bool(data.get("check_ram", True))
    out.threads = data.get("threads")
    if out.threads is not None and out.threads < 1:
        raise _bad(path, "threads", f"must be at least 1, got {out.threads}")
    models = data.get("models", [])
    if not models:
        raise _bad(path, "models", "no models listed (add [[models]] tables with a name)")
    for i, table in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(table, dict):
            raise _bad(path, where, "must be a table")
        for key, value in table.items():
            if key not in _MODEL:
                raise _bad(path, f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(_MODEL))})")
            _check_type(path, f"{where}.{key}", value, _MODEL[key])
        if "name" not in table:
            raise _bad(path, where, "missing name")
        quants = table.get("quant")
        quants = [quants] if isinstance(quants, str) else list(quants or [None])
        dirs = table.get("from_dir", [])
        dirs = [dirs] if isinstance(dirs, str) else dirs
        for q in quants:
            out.items.append(Item(len(out.items), table["name"], table.get("variant"), q,
                                  [base / Path(d).expanduser() for d in dirs], table.get("url")))
    return out


# --- running ------------------------------------------------------------------------------------------------


class _Output:
    """Events as NDJSON (``--json``) or as lines / progress bars for people."""

    def __init__(self, json_mode: bool) -> None:
        from pipx_llama.cli.progress import renderer_for

        self.json = json_mode
        self.renderer = renderer_for(json_mode)
        self.model: str | None = None

    def __enter__(self) -> _Output:  # noqa: PYI034
        self.renderer.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.renderer.__exit__(*exc)

    def record(self, kind: str, text: str | None = None, **fields: Any) -> None:
        if self.json:
            self.renderer.emit_json({"kind": kind, **fields})
        elif text and kind in ("model-refused", "model-failed"):
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        elif text:
            self.renderer.say(text)

    def __call__(self, ev: Any) -> None:
        if self.json:
            self.renderer.emit_json({**ev.to_json(), "model": self.model})
            return
        self.renderer(ev)
        if ev.kind in ("stage", "stage-done"):
            self.renderer.say(f"{ev.source}: {ev.file}: {ev.message}")


def _pull_options(pf: ProvisionFile, item: Item, cfg: Any) -> Any:
    from pipx_llama.models.sources import pull_options_from_config

    return pull_options_from_config(cfg, from_dirs=item.from_dirs, url=item.url or cfg.url)


def _plan_all(pf: ProvisionFile, cfg: Any, catalog: Any, out: _Output) -> tuple[list[tuple[Item, Any]], int]:
    """Plan every item on the road every command takes (``plan_for``); (plans, exit code of the first
    refusal or 0)."""
    from pipx_llama.models.plan import Request, plan_for
    from pipx_llama.models.reference import parse_reference
    from pipx_llama.system import detect_hardware

    hw = detect_hardware(cfg.home)
    plans: list[tuple[Item, Any]] = []
    code = EXIT_OK
    for item in pf.items:
        request = Request(variant=item.variant, quant=item.quant, threads=pf.threads, check_ram=pf.check_ram,
                          pull_options=_pull_options(pf, item, cfg), config=cfg, catalog=catalog, hardware=hw)
        try:
            plan = plan_for(parse_reference(item.name), request)
        except PipxLlamaError as err:
            out.record(
                "model-refused",
                f"refused: {item.name}{' ' + item.quant if item.quant else ''}: {err.message}"
                + (f"\n  hint: {err.hint}" if err.hint else ""),
                index=item.index,
                model=item.name,
                quant=item.quant,
                message=err.message,
                hint=err.hint,
                exit_code=err.exit_code,
                alternatives=getattr(err, "alternatives", []),
            )
            code = code or err.exit_code
            continue
        plans.append((item, plan))
        steps = " -> ".join(plan.stages) or "nothing to do (ready)"
        out.record(
            "model-plan",
            f"[{item.index + 1}/{len(pf.items)}] {plan.model} ({plan.variant}, {plan.quant}): "
            f"{steps}; download {human_bytes(plan.download_bytes)}, peak disk "
            f"{human_bytes(plan.peak_disk_bytes)}, RAM {human_bytes(plan.ram_bytes)}",
            index=item.index,
            **plan.to_json(),
        )
    if code == EXIT_OK and len(plans) > 1:
        code = _check_total_disk(plans, hw, out)
    return plans, code


def _check_total_disk(plans: list[tuple[Item, Any]], hw: Any, out: _Output) -> int:
    """All models together: unique downloads + new quantized files + the largest conversion at a time."""
    downloads = {(p.model, p.variant): p.download_bytes for _, p in plans}
    finals = {(p.model, p.variant, p.quant): p.final_bytes for _, p in plans}
    intermediates = {(p.model, p.variant): p.intermediate_bytes for _, p in plans}
    total = sum(downloads.values()) + sum(finals.values()) + max(intermediates.values(), default=0)
    if total <= hw.disk_free:
        return EXIT_OK
    message = (f"not enough disk space for all {len(plans)} models together in {hw.store_path}: they need "
               f"{human_bytes(total)} at peak, {human_bytes(hw.disk_free)} is free")
    hint = ("provision fewer models or quantizations at once, free disk space (pipx-llama gc), or use a "
            "bigger disk")
    out.record("model-refused", f"refused: {message}\n  hint: {hint}", index=None, model=None, quant=None,
               message=message, hint=hint, exit_code=EXIT_RESOURCES, alternatives=[])
    return EXIT_RESOURCES


def run(args: argparse.Namespace) -> int:
    from pipx_llama.config import load_config
    from pipx_llama.models.manifest import load_catalog
    from pipx_llama.models.prepare import prepare

    pf = load_provision_file(args.file)
    cfg = load_config()
    cfg = dataclasses.replace(
        cfg, home=pf.store or cfg.home, mirrors=list(dict.fromkeys([*pf.mirrors, *cfg.mirrors])),
        offline=pf.offline or cfg.offline, allow_http=pf.allow_http or args.allow_http or cfg.allow_http)
    catalog = load_catalog([*pf.manifests, *args.manifest], user_dirs=cfg.user_manifest_dirs,
                           allow_http=cfg.allow_http)
    with _Output(args.json) as out:
        out.record("provision", f"provisioning {len(pf.items)} model(s) from {pf.path} into {cfg.home}",
                   file=str(pf.path), store=str(cfg.home), models=len(pf.items), dry_run=args.dry_run)
        plans, code = _plan_all(pf, cfg, catalog, out)
        if code != EXIT_OK or args.dry_run:
            ok = code == EXIT_OK
            out.record(
                "result",
                "nothing was downloaded" + ("" if ok else ": fix the problems above and run again"),
                ok=ok,
                exit_code=code,
                ready=[],
                failed=[],
                dry_run=args.dry_run,
            )
            return code
        ready: list[str] = []
        failed: list[str] = []
        last_use = {(p.model, p.variant): i for i, (_, p) in enumerate(plans)}
        for i, (item, plan) in enumerate(plans):
            out.model = plan.model
            started = time.monotonic()
            keep = last_use[(plan.model, plan.variant)] > i  # a later item quantizes the same conversion
            try:
                path = prepare(plan, on_event=out, keep_intermediate=keep)
            except PipxLlamaError as err:
                failed.append(plan.model)
                code = code or EXIT_FAILED
                out.record(
                    "model-failed",
                    f"FAILED {plan.model} ({plan.variant}, {plan.quant}): {err.message}"
                    + (f"\n  hint: {err.hint}" if err.hint else ""),
                    index=item.index,
                    model=plan.model,
                    variant=plan.variant,
                    quant=plan.quant,
                    message=err.message,
                    hint=err.hint,
                    exit_code=err.exit_code,
                )
                continue
            ready.append(str(path))
            seconds = time.monotonic() - started
            out.record(
                "model-ready",
                f"ready: {plan.model} ({plan.variant}, {plan.quant}) at {path}",
                index=item.index,
                model=plan.model,
                variant=plan.variant,
                quant=plan.quant,
                path=str(path),
                size=path.stat().st_size,
                stages=list(plan.stages),
                seconds=round(seconds, 2),
            )
        out.model = None
        summary = f"{len(ready)} of {len(plans)} model(s) ready" + (
            f"; failed: {', '.join(failed)}" if failed else ""
        )
        out.record(
            "result", summary, ok=not failed, exit_code=code, ready=ready, failed=failed, dry_run=False
        )
    return code
