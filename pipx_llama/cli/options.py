"""Command-line options shared by several commands, named as llama.cpp names them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipx_llama.engine import SamplerConfig

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_model_options(p: argparse.ArgumentParser, *, by_name: bool = False) -> None:
    if by_name:
        p.add_argument("model", nargs="?", default=None,
                       help="model name or alias, pulled into the store when missing "
                            "(default: smollm2-135m-instruct); or use -m FILE")
        p.add_argument(
            "--variant", default=None, help="variant name or quantization (default: the manifest's)"
        )
    p.add_argument("-m", "--model-file", type=Path, required=not by_name, default=None, metavar="PATH.gguf",
                   help="GGUF model file to run")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size in tokens (default: the model's, at most 4096)")


def add_cache_type_options(p: argparse.ArgumentParser) -> None:
    """llama.cpp's -ctk/--cache-type-k and -ctv/--cache-type-v (the types this engine has)."""
    for short, which in (("-ctk", "k"), ("-ctv", "v")):
        p.add_argument(short, f"--cache-type-{which}", dest=f"cache_type_{which}", choices=["f16", "q8_0"],
                       default="f16",
                       help=f"KV cache type for {which.upper()}: f16 (default) or q8_0 (half the memory)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    d = SamplerConfig()
    p.add_argument(
        "--temp", type=float, default=d.temperature, help=f"temperature, 0 = greedy (default {d.temperature})"
    )
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"top-k, 0 = off (default {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"top-p, 1.0 = off (default {d.top_p})")
    p.add_argument("--min-p", type=float, default=d.min_p, help=f"min-p, 0.0 = off (default {d.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                   help=f"repeat penalty, 1.0 = off (default {d.repeat_penalty})")
    p.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n,
                   help=f"tokens the repeat penalty looks back on, -1 = context (default {d.repeat_last_n})")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


def sampler_config(args: argparse.Namespace) -> SamplerConfig:
    cfg = SamplerConfig(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
    )
    cfg.validate()
    return cfg


def model_file(args: argparse.Namespace, name: str | None = None) -> Path:
    """The GGUF file of model ``name`` (default ``DEFAULT_MODEL``) from the store, pulled when missing.

    Progress goes to stderr. ``args`` carries the pull options a command added: ``--variant``,
    ``--from-dir``, ``store_common.add_network_options`` and ``add_manifest_option`` (all optional).
    A model already in the store is used without writing to it (the store may be read-only), once its
    size and header digest match its record.
    """
    from pipx_llama.cli import store_common as common
    from pipx_llama.cli.progress import EventRenderer
    from pipx_llama.errors import UnsupportedModelError
    from pipx_llama.models.pull import pull
    from pipx_llama.models.runnable import check_installed, default_quant, final_path, is_ready

    s = common.open_session(args)
    manifest = common.resolve(s, name or DEFAULT_MODEL, args)
    options = common.pull_options(args, s)
    variant = manifest.variant(options.variant)
    if variant.format != "gguf":
        raise UnsupportedModelError(
            f"{manifest.name} ({variant.name}) holds original weights, not a GGUF file",
            f"run it once with `pipx-llama run {manifest.name}` (which converts and quantizes it), or "
            f"convert it yourself: pipx-llama convert FOLDER {manifest.name}.gguf, then pass -m that file",
        )
    path = final_path(s.store, manifest, variant, default_quant(variant))
    check_installed(s.store, manifest, variant, path)
    if not is_ready(s.store, manifest, variant, default_quant(variant)):
        with EventRenderer("bars" if sys.stderr.isatty() else "plain", sys.stderr) as out:
            pull(s.store, manifest, options, out)
        check_installed(s.store, manifest, variant, path)
    return path
