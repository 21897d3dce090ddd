"""``pipx-llama quantize IN.gguf OUT.gguf TYPE``: llama.cpp-identical quantization of a GGUF model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pipx_llama.cli.progress import renderer_for
from pipx_llama.errors import PipxLlamaError

if TYPE_CHECKING:
    from pipx_llama.events import ProgressEvent

# quant.rules.FILE_TYPES, named here so that `quantize --help` does not import gguf and numpy (test_cli.py
# checks the two agree)
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a GGUF model, byte for byte as llama-quantize does",
        description="Quantize a GGUF model to one of llama.cpp's file types with llama.cpp's per-tensor "
                    "rules. The output equals llama-quantize's byte for byte. Memory stays bounded; the "
                    "output appears under its name only once complete.",
    )
    p.add_argument("input", type=Path, metavar="IN.gguf", help="model to quantize (F32, F16 or BF16 weights)")
    p.add_argument("output", type=Path, metavar="OUT.gguf", help="file to write")
    p.add_argument("type", metavar="TYPE", help=f"file type: {', '.join(QUANT_TYPES)}")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="allow re-quantizing tensors that are already quantized (quality suffers)")
    p.add_argument("--json", action="store_true", help="print progress and the result as JSON lines")


def run(args: argparse.Namespace) -> int:
    from pipx_llama.quant.file import quantize_model

    with renderer_for(args.json) as out:

        def on_event(ev: ProgressEvent) -> None:
            out(ev)
            if out.mode == "plain" and ev.kind in ("progress", "done") and ev.message:
                out.say(ev.message)

        try:
            result = quantize_model(args.input, args.output, args.type, threads=args.threads,
                                    allow_requantize=args.allow_requantize, on_event=on_event)
        except PipxLlamaError as err:
            if args.json:
                out.emit_json(
                    {"kind": "error", "file": str(args.output), "message": err.message, "hint": err.hint}
                )
            raise
        if args.json:
            out.emit_json(
                {
                    "kind": "result",
                    "path": str(result.path),
                    "type": result.file_type,
                    "tensors": result.n_tensors,
                    "bytes_in": result.bytes_in,
                    "bytes_out": result.bytes_out,
                    "seconds": round(result.seconds, 3),
                    "fallbacks": result.n_fallback,
                }
            )
        elif out.mode == "bars":
            out.say(f"wrote {result.path} ({result.file_type}, {result.bytes_out / 2**20:.1f} MiB, "
                    f"{result.seconds:.1f} s)")
        if result.n_fallback:
            out.say(
                f"note: {result.n_fallback} of {result.n_tensors} tensors used a fallback type because their "
                "rows do not fit the chosen type's block size (as llama.cpp does)"
            )
    return 0
