"""``pipx-llama doctor [--json]``: this machine's hardware, and what it means -- which known models fit, how.

For every model the manifests describe, the line shows what ``pipx-llama run MODEL`` would choose here
(variant and quantization), the RAM it needs, what is left to download and the peak disk use, and
whether it fits; models that need a URL or a folder to be fetched from say so.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from pipx_llama.cli import store_common as common
from pipx_llama.cli.tables import dropped_note, output_width, render_table
from pipx_llama.units import human_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="the hardware, and which models fit it in which quantization",
        description="Detect the OS, CPU (model, cores, SIMD features), RAM and the free disk where "
        "the store lives, and show which known models fit, in which quantization. "
        "PIPX_LLAMA_FAKE_RAM and PIPX_LLAMA_FREE_BYTES pretend other figures (what-if).",
    )
    p.add_argument("-c", "--ctx", type=int, default=None, metavar="N",
                   help="plan for this context size (default: each model's, at most 4096)")
    common.add_network_options(p)
    common.add_manifest_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def _model_rows(s: common.Session, args: argparse.Namespace, hw: Any) -> list[dict[str, Any]]:
    from pipx_llama.errors import PipxLlamaError
    from pipx_llama.models.plan import DEFAULT_CTX, choose, options_for, road_cost
    from pipx_llama.models.runnable import default_quant

    opts = common.pull_options(args, s)
    rows = []
    for m in s.catalog:
        n_ctx = min(m.context_length, args.ctx or DEFAULT_CTX)
        try:
            options = options_for(s.store, m, hw, n_ctx, opts)
        except PipxLlamaError as err:
            rows.append(
                {"model": m.name, "aliases": list(m.aliases), "fits": False, "status": f"error: {err}"}
            )
            continue
        chosen = choose(options)
        # the default quantization by its cheapest road, as `run` would take it
        default = min((o for o in options if o.quant == options[0].quant), key=road_cost)
        shown = chosen or default
        unavailable = shown.unavailable
        if chosen is None:
            short = []
            if not default.fits_ram:
                short.append(f"needs {human_bytes(default.ram_bytes)} of RAM")
            if not default.fits_disk:
                short.append(f"needs {human_bytes(default.peak_disk_bytes)} of disk")
            status = "does not fit: " + ", ".join(short)
        elif chosen.ready:
            status = "installed, fits"
        elif chosen is default:
            status = "fits"
        else:
            status = f"fits as {chosen.quant} (the default {default.quant} does not)"
        if unavailable and chosen is not None:
            status += f"; {unavailable}"
        rows.append(
            {
                "model": m.name,
                "aliases": list(m.aliases),
                "variant": shown.variant.name,
                "format": shown.variant.format,
                "quant": shown.quant,
                "default_quant": default_quant(default.variant),
                "n_ctx": n_ctx,
                "ram_bytes": shown.ram_bytes,
                "download_bytes": shown.download_bytes,
                "peak_disk_bytes": shown.peak_disk_bytes,
                "stages": list(shown.stages),
                "ready": shown.ready,
                "fits": chosen is not None,
                "unavailable": unavailable,
                "status": status,
                "options": [
                    {
                        "variant": o.variant.name,
                        "quant": o.quant,
                        "ram_bytes": o.ram_bytes,
                        "peak_disk_bytes": o.peak_disk_bytes,
                        "fits_ram": o.fits_ram,
                        "fits_disk": o.fits_disk,
                        "ready": o.ready,
                    }
                    for o in options
                ],
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    from pipx_llama.system import detect_hardware, ram_budget, simd_summary

    s = common.open_session(args)
    hw = detect_hardware(s.store.root)
    rows = _model_rows(s, args, hw)
    if args.json:
        json.dump({"hardware": hw.to_json(), "simd_summary": simd_summary(hw), "ram_budget": ram_budget(hw),
                   "models": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    cores = f"{hw.physical_cores} physical core(s), {hw.logical_cores} logical"
    if hw.usable_cores and hw.usable_cores < hw.logical_cores:
        cores += f", {hw.usable_cores} usable by this process"
    lines = [
        f"system   {hw.os} {hw.os_version} ({hw.arch})",
        f"cpu      {hw.cpu_model}: {cores}; default threads: {hw.threads}",
        f"simd     {' '.join(hw.simd) or 'none detected'}: {simd_summary(hw)}",
        (f"memory   {human_bytes(hw.ram_total)} total, {human_bytes(hw.ram_available)} available "
         f"(a model may use {human_bytes(ram_budget(hw))})"),
        f"store    {hw.store_path}: {human_bytes(hw.disk_free)} free",
    ]
    lines += [f"note     {n}" for n in hw.notes]
    width = output_width()
    print("\n".join(textwrap.fill(line, width, subsequent_indent=" " * 9, break_long_words=False,
                                  break_on_hyphens=False) for line in lines))
    print()
    table = []
    for r in rows:
        if "variant" not in r:
            table.append([r["model"], ", ".join(r["aliases"]), "", "", "", "", r["status"]])
            continue
        runs = (
            f"{r['variant']} ({r['quant']})" if r["format"] == "gguf" else f"{r['variant']} -> {r['quant']}"
        )
        table.append([r["model"], ", ".join(r["aliases"]), runs, human_bytes(r["ram_bytes"]),
                      human_bytes(r["download_bytes"]), human_bytes(r["peak_disk_bytes"]), r["status"]])
    shown = render_table(["MODEL", "ALIASES", "RUNS AS", "RAM", "DOWNLOAD", "PEAK DISK", "STATUS"], table,
                         wrap=6, drop=[1, 4, 5])
    print(shown.text)
    if shown.dropped:
        print(textwrap.fill(dropped_note(shown.dropped), width))
    print()
    print(textwrap.fill("RAM = weights + KV cache for the context + runtime; PEAK DISK = download + "
                        "conversion + quantized file. `->` marks original weights that are converted and "
                        "quantized here.", width))
    return 0
