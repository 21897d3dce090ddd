"""Peak memory and speed of ``pipx-llama convert`` on a 7B-shaped Meta checkpoint it writes itself.

The checkpoint (``consolidated.NN.pth`` in torch's zip format, written without torch by the test
helpers; params.json; a synthetic 32000-piece tokenizer.model) holds seeded random float16 weights
of LLaMA-7B's shapes: dim 4096, 32 layers, FFN 11008, vocabulary 32000 -- 13.5 GB. The conversion
runs in a fresh subprocess so its peak RSS is its own. Both files are deleted afterwards unless
``--keep``. Free disk is checked first (checkpoint + output + 1 GiB).

    python benchmarks/bench_convert.py --layers 4           # 2.1 GB quick check
    python benchmarks/bench_convert.py                      # full 7B shape, 13.5 GB (+13.5 GB output)
    python benchmarks/bench_convert.py --outtype q8_0 --shards 2 --dir /work/tmp
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from convert_helpers import TensorSpec, meta_ffn, write_torch_zip

from pipx_llama.tokenizer.spm import build_model_proto

CHUNK = 1 << 24  # elements generated at a time


def synthetic_tokenizer_model(n_vocab: int) -> bytes:
    """A SentencePiece BPE model with LLaMA's layout: <unk> <s> </s>, 256 byte pieces, then words."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"▁w{i}" for i in range(n_vocab - len(tokens))]
    types += [1] * (n_vocab - len(types))
    scores = np.concatenate([np.zeros(259, np.float32), -np.arange(n_vocab - 259, dtype=np.float32)])
    return build_model_proto(tokens, scores, types, 0, True)


def random_spec(seed: int, shape: tuple[int, ...], std: float) -> TensorSpec:
    def chunks():
        rng = np.random.default_rng(seed)
        left = math.prod(shape)
        while left:
            n = min(CHUNK, left)
            yield (rng.standard_normal(n, dtype=np.float32) * std).astype(np.float16)
            left -= n

    return TensorSpec("F16", shape, chunks)


def write_checkpoint(folder: Path, dim: int, n_layers: int, n_heads: int, n_vocab: int, n_shards: int,
                     multiple_of: int) -> int:
    """consolidated.NN.pth shards of a random model; returns the bytes written."""
    n_ff = meta_ffn(dim, multiple_of)
    shapes: dict[str, tuple[int, int] | tuple[int]] = {
        "tok_embeddings.weight": (n_vocab, dim), "norm.weight": (dim,), "output.weight": (n_vocab, dim),
    }
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (dim, dim), p + "attention.wk.weight": (dim, dim),
            p + "attention.wv.weight": (dim, dim), p + "attention.wo.weight": (dim, dim),
            p + "feed_forward.w1.weight": (n_ff, dim), p + "feed_forward.w2.weight": (dim, n_ff),
            p + "feed_forward.w3.weight": (n_ff, dim), p + "attention_norm.weight": (dim,),
            p + "ffn_norm.weight": (dim,),
        })
    total = 0
    for s in range(n_shards):
        tensors = {}
        for k, (name, shape) in enumerate(shapes.items()):
            if len(shape) == 2:
                cols = name == "tok_embeddings.weight" or name.endswith((".wo.weight", ".w2.weight"))
                shape = (shape[0], shape[1] // n_shards) if cols else (shape[0] // n_shards, shape[1])
            tensors[name] = random_spec(1000 * k + s, shape, 1.0 if len(shape) == 1 else 0.02)
        path = write_torch_zip(folder / f"consolidated.{s:02d}.pth", tensors)
        total += path.stat().st_size
    (folder / "params.json").write_text(json.dumps({
        "dim": dim, "multiple_of": multiple_of, "n_heads": n_heads, "n_layers": n_layers, "norm_eps": 1e-06,
        "vocab_size": -1,
    }))
    (folder / "tokenizer.model").write_bytes(synthetic_tokenizer_model(n_vocab))
    return total


CHILD = """
import json, resource, sys, time
from pipx_llama.convert import convert
t = time.monotonic()
r = convert(sys.argv[1], sys.argv[2], sys.argv[3])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": time.monotonic() - t, "bytes": r.nbytes, "tensors": r.n_tensors,
                  "types": r.tensor_types, "peak_rss_kib": rss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--multiple-of", type=int, default=256)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the GGUF")
    args = ap.parse_args()

    base = args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    n_ff = meta_ffn(args.dim, args.multiple_of)
    params = 2 * args.vocab * args.dim + args.layers * (
        4 * args.dim * args.dim + 3 * n_ff * args.dim + 2 * args.dim
    )
    out_bytes = params * {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}[args.outtype]
    need = params * 2 + out_bytes + (1 << 30)
    free = shutil.disk_usage(base).free
    print(
        f"model: dim {args.dim}, {args.layers} layers, FFN {n_ff}, vocab {args.vocab}, {params / 1e9:.2f}B "
        f"params, "
        f"{args.shards} shard(s); checkpoint {params * 2 / 1e9:.1f} GB, output {out_bytes / 1e9:.1f} GB; "
        f"free disk {free / 1e9:.1f} GB"
    )
    if free < need:
        sys.exit(f"not enough free disk in {base}: need {need / 1e9:.1f} GB")

    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=base))
    try:
        src = work / "7B"
        src.mkdir()
        t = time.monotonic()
        written = write_checkpoint(
            src, args.dim, args.layers, args.heads, args.vocab, args.shards, args.multiple_of
        )
        print(f"wrote the checkpoint ({written / 1e9:.2f} GB) in {time.monotonic() - t:.0f}s")
        out = work / f"model.{args.outtype}.gguf"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), args.outtype],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"convert failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rss_gb = r["peak_rss_kib"] * 1024 / 1e9
        print(f"convert -> {args.outtype}: {r['tensors']} tensors {r['types']}, {r['bytes'] / 1e9:.2f} GB in "
              f"{r['seconds']:.1f}s ({written / 1e9 / r['seconds']:.2f} GB/s read); peak RSS {rss_gb:.2f} GB "
              f"({'within' if rss_gb <= 3.0 else 'OVER'} the 3 GB budget)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
