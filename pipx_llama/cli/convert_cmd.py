"""``pipx-llama convert SRC_DIR OUT.gguf``: a Meta or Hugging Face checkpoint folder to a GGUF file."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipx_llama.cli.progress import renderer_for
from pipx_llama.cli.store_common import add_json
from pipx_llama.units import human_bytes

# pipx_llama.convert.OUTTYPES, spelled out so the CLI starts without importing the converters
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Meta or Hugging Face model folder to GGUF",
        description="Convert a model folder to GGUF. Meta checkpoints are read without torch through a "
                    "restricted unpickler: a .pth whose pickle asks for anything but tensor data is refused.",
    )
    p.add_argument("src", type=Path, metavar="SRC_DIR",
                   help="folder with consolidated.NN.pth + params.json (+ tokenizer.model here or one level "
                        "up), or with config.json + model.safetensors + tokenizer files")
    p.add_argument(
        "out", type=Path, metavar="OUT.gguf", help="GGUF file to write (replaced atomically when done)"
    )
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="type of the weight matrices; 1-D tensors are always f32 (default: f16)")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from pipx_llama.convert import convert

    with renderer_for(args.json) as out:
        r = convert(args.src, args.out, args.outtype, on_event=out)
        if args.json:
            out.emit_json(
                {
                    "kind": "result",
                    "path": str(r.path),
                    "format": r.source_format,
                    "outtype": r.outtype,
                    "tensors": r.n_tensors,
                    "bytes": r.nbytes,
                    "seconds": round(r.seconds, 2),
                    "tensor_types": r.tensor_types,
                }
            )
        else:
            types = ", ".join(f"{n} {t}" for t, n in sorted(r.tensor_types.items()))
            out.say(f"wrote {r.path} ({human_bytes(r.nbytes)}; {r.n_tensors} tensors: {types}) "
                    f"from a {r.source_format} checkpoint in {r.seconds:.1f}s")
    return 0
