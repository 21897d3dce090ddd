"""Command-line options shared by several commands, named as llama.cpp names them.

Building a parser must not import the engine (numpy, numba): `COMMAND --help` has to answer at once.
So the sampling defaults the help shows are written here, and test_cli.py checks they are the engine's.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from pipx_llama.models.defaults import NONE, ModelDefaults
from pipx_llama.models.reference import DEFAULT_MODEL

if TYPE_CHECKING:
    from pipx_llama.engine import SamplerConfig

# SamplerConfig()'s values, for the help text (see the module's docstring)
SAMPLING_DEFAULTS = SimpleNamespace(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                                    repeat_last_n=64)


def add_model_options(p: argparse.ArgumentParser, *, by_name: bool = False) -> None:
    """The model (a name, alias or path; with ``by_name``), ``-m FILE``, threads and context size.
    ``cli/road.py`` adds the options of the road to a model by name (``add_road_options``)."""
    if by_name:
        p.add_argument("model", nargs="?", default=None,
                       help=f"model name or alias, prepared in the store when missing (default: "
                            f"{DEFAULT_MODEL}), or a GGUF file's path; or use -m FILE")
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
    """The sampler's options. Each defaults to None, so that a value the user gave is told apart from the
    model's own default (an ollama model's params layer) and from the engine's (``sampler_config``)."""
    d = SAMPLING_DEFAULTS
    p.add_argument("--temp", type=float, default=None,
                   help=f"temperature, 0 = greedy (default: the model's, else {d.temperature})")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"top-k, 0 = off (default: the model's, else {d.top_k})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"top-p, 1.0 = off (default: the model's, else {d.top_p})")
    p.add_argument("--min-p", type=float, default=None,
                   help=f"min-p, 0.0 = off (default: the model's, else {d.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=None,
                   help=f"repeat penalty, 1.0 = off (default: the model's, else {d.repeat_penalty})")
    p.add_argument("--repeat-last-n", type=int, default=None,
                   help=f"tokens the repeat penalty looks back on, -1 = context (default: the model's, else "
                        f"{d.repeat_last_n})")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


_FLAGS = {"temperature": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
          "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n", "seed": "seed"}


def sampler_config(args: argparse.Namespace, model: ModelDefaults = NONE) -> SamplerConfig:
    """The sampler: the command line's values, else the model's defaults, else the engine's."""
    given = {field: getattr(args, flag) for field, flag in _FLAGS.items()
             if getattr(args, flag, None) is not None}
    from pipx_llama.engine import SamplerConfig

    cfg = dataclasses.replace(SamplerConfig(), **{**model.sampling, **given})
    cfg.validate()
    return cfg
