"""The one road from a model on the command line to a runnable GGUF, as every command shows it.

``run`` (and its chat), ``serve``, ``bench``, ``tokenize`` and ``perplexity`` call ``ready`` here, which
reads the reference (``-m FILE`` or a name, alias or path), asks :func:`pipx_llama.models.prepare.ready`
for a runnable file, and shows on stderr the plan (when something is left to do) and each stage's
progress. ``pull`` and ``provision`` follow the same planner and stages with output of their own. The
options the road reads (``--variant``, ``--quant``, ``--from-dir``, the network and manifest options)
are added by ``add_road_options``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pipx_llama.cli import store_common as common
from pipx_llama.errors import UsageError
from pipx_llama.models.reference import DEFAULT_MODEL, Reference, file_reference, parse_reference

# References to a registry: the command line says how it read them before anything is fetched.
REGISTRY_KINDS = ("oci", "hf")

if TYPE_CHECKING:
    from pipx_llama.models.manifest import Manifest
    from pipx_llama.models.plan import Request
    from pipx_llama.models.prepare import Runnable


def add_road_options(p: argparse.ArgumentParser, *, quant: bool = True) -> None:
    """``--variant``, ``--quant``, ``--from-dir``, and the network and manifest options."""
    p.add_argument("--variant", default=None,
                   help="variant of a model by name, e.g. original (default: the planner's choice, the "
                        "cheapest way to the manifest's default quantization)")
    if quant:
        p.add_argument("--quant", default=None, metavar="TYPE",
                       help="quantization to run, e.g. Q4_0 or Q4_K_M (default: the planner's choice)")
    p.add_argument("--from-dir", action="append", default=[], type=Path, metavar="DIR",
                   help="when fetching, use files you already have in DIR (verified against the manifest)")
    common.add_network_options(p)
    common.add_manifest_option(p)


def color_enabled(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org) or TERM=dumb."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


def reference(args: argparse.Namespace, text: str | None) -> Reference:
    """The model the command line names: ``-m FILE``, else ``text`` (None: the default model)."""
    file = getattr(args, "model_file", None)
    if file is not None:
        if text is not None:
            raise UsageError(f"both a model name ({text}) and -m {file} were given", "pass one of them")
        return file_reference(file)
    return parse_reference(text or DEFAULT_MODEL)


def _session(args: argparse.Namespace) -> common.Session:
    """The configuration and catalog, read once per command."""
    s = getattr(args, "_road_session", None)
    if s is None:
        s = common.open_session(args)
        args._road_session = s
    return s


def resolve(args: argparse.Namespace, ref: Reference) -> Manifest:
    """The manifest of a reference by name (raises with suggestions for an unknown name)."""
    from pipx_llama.models.resolve import resolve_manifest

    s = _session(args)
    return resolve_manifest(ref, s.catalog, common.pull_options(args, s))


def request(args: argparse.Namespace, ref: Reference, *, n_ctx: int | None = None,
            by_name_only: bool = False) -> Request:
    """What the command line asks of the road. ``by_name_only``: ``--variant`` and ``--quant`` apply to the
    models named, not to the files given (``serve NAME -m FILE --quant Q8_0``)."""
    from pipx_llama.models.plan import Request

    variant, quant = getattr(args, "variant", None), getattr(args, "quant", None)
    threads = getattr(args, "threads", None)
    cache_types = (getattr(args, "cache_type_k", "f16"), getattr(args, "cache_type_v", "f16"))
    slots = getattr(args, "slots", None) or 1  # serve --slots; without it the server fits what RAM holds
    if ref.is_file:
        if by_name_only:
            variant = quant = None
        return Request(variant=variant, quant=quant, threads=threads, n_ctx=n_ctx, cache_types=cache_types,
                       slots=slots)
    s = _session(args)
    return Request(variant=variant, quant=quant, threads=threads, n_ctx=n_ctx, cache_types=cache_types,
                   slots=slots, pull_options=common.pull_options(args, s), config=s.config, catalog=s.catalog)


def ready(args: argparse.Namespace, ref: Reference, *, n_ctx: int | None = None, color: bool = False,
          by_name_only: bool = False, compile_ahead: bool = False) -> Runnable:
    """Plan and prepare ``ref`` (fetch, verify, convert, quantize: whatever is still to do); the plan
    and the stages' progress go to stderr, and nothing at all when the model is ready. ``compile_ahead``
    (commands that run the model) compiles the engine's kernels for its weight types in the background
    as soon as they are known, behind the download and the quantizer."""
    from pipx_llama.models.prepare import ready as road_ready

    rq = request(args, ref, n_ctx=n_ctx, by_name_only=by_name_only)
    if ref.kind in REGISTRY_KINDS:
        sys.stderr.write(f"pipx-llama: {ref.describe()}\n")
    with StageRenderer(sys.stderr, quiet=True) as on_event:
        def on_plan(plan: Any) -> None:
            if plan.stages:
                show_plan(plan, sys.stderr, color)
                on_event.quiet = False

        return road_ready(ref, rq, on_event, on_plan=on_plan, compile_ahead=compile_ahead)


class StageRenderer:
    """Progress of ``prepare`` on ``stream``: bars on a terminal, plain lines otherwise, and a
    line as each stage starts and ends. ``quiet`` (nothing left to do) shows only why a run waits.

    The bars start with the first event shown, so what is printed before (the plan) stays above them."""

    def __init__(self, stream: TextIO, *, quiet: bool = False) -> None:
        from pipx_llama.cli.progress import EventRenderer

        self.quiet = quiet
        self.inner = EventRenderer("bars" if stream.isatty() else "plain", stream)
        self._started = False

    def __enter__(self) -> StageRenderer:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self.inner.__exit__(*exc)

    def _shown(self) -> Any:
        if not self._started:
            self.inner.__enter__()
            self._started = True
        return self.inner

    def __call__(self, ev: Any) -> None:
        if ev.kind in ("stage-skipped", "ready"):
            return
        if ev.kind == "compile":  # worth a line even when nothing else is left to do: it takes a while
            self._shown().say(f"{ev.file}: {ev.message}")
            return
        if self.quiet:
            if ev.kind == "waiting-lock":
                self._shown().say(f"{ev.file}: {ev.message or 'waiting for another pipx-llama process'}")
            return
        if ev.kind in ("stage", "stage-done"):
            self._shown().say(f"{ev.file}: {ev.message}" if ev.message else ev.file)
            return
        self._shown()(ev)


def show_plan(plan: Any, stream: TextIO, color: bool) -> None:
    """The plan on ``stream``, a line per fact: what will be fetched, built and needed."""
    from rich.console import Console
    from rich.text import Text

    from pipx_llama.units import human_bytes

    rows = [
        ("model", f"{plan.model} ({plan.variant}, {plan.source_format})"),
        ("quantization", str(plan.quant)),
        ("download", human_bytes(plan.download_bytes) if plan.download_bytes else "nothing"),
        ("peak disk", human_bytes(plan.peak_disk_bytes)),
        ("RAM needed", human_bytes(plan.ram_bytes)),
        ("threads", str(plan.threads)),
        ("context", f"{plan.n_ctx} tokens"),
        ("steps", " → ".join(plan.stages)),
    ]
    if getattr(plan, "reason", ""):
        rows.append(("why", plan.reason))
    console = Console(file=stream, highlight=False, no_color=not color, soft_wrap=True, force_terminal=color)
    console.print(f"pipx-llama will prepare {plan.model}:", style="bold", markup=False)
    for label, value in rows:
        console.print(Text.assemble(("  " + label.ljust(14), "dim"), value))
