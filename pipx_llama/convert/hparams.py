"""Hyper-parameters read from a checkpoint's JSON (Meta's params.json, Hugging Face's config.json).

Those files come with downloaded weights and decide how much is sized and looped over before any
tensor is read (the expected tensor names of every layer, the shapes they are checked against), so
each value is checked before use: the right JSON type (no strings, booleans or nulls for numbers),
finite, and within bounds far beyond any real model (``LIMITS``). A failure names the file and field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipx_llama.errors import ModelFileError

MAX_JSON_BYTES = 16 << 20
# Upper bounds, generous: the largest published Llama-family models are well inside them.
LIMITS = {
    "layers": 1024,
    "width": 1 << 17,       # embedding / hidden size, FFN size
    "heads": 4096,
    "vocab": 1 << 23,
    "context": 1 << 30,
    "head_dim": 4096,
}
_HINT = "compare the file with the model's published one; it may be damaged or not for this model"


def read_json_object(path: Path) -> dict[str, Any]:
    """``path`` parsed as a JSON object (at most MAX_JSON_BYTES); ModelFileError for anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ModelFileError(
            f"cannot read {path}: {err.strerror or err}", "check that the file is complete"
        ) from None
    if len(data) > MAX_JSON_BYTES:
        raise ModelFileError(
            f"{path} is larger than {MAX_JSON_BYTES} bytes: not a model configuration", _HINT
        )
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ModelFileError(f"cannot read {path}: not UTF-8 text (byte {err.start})", _HINT) from None
    except RecursionError:
        raise ModelFileError(f"cannot read {path}: JSON nested too deeply", _HINT) from None
    except ValueError as err:
        raise ModelFileError(f"cannot read {path}: not valid JSON: {str(err)[:120]}",
                             "check that the file is complete") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} must hold a JSON object, not {type(value).__name__}", _HINT)
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(cfg: dict[str, Any], key: str, path: Path | str, *, maximum: int, minimum: int = 1) -> int:
    """``cfg[key]`` as an int in [minimum, maximum]; a float is accepted only if integral (JSON ``32.0``)."""
    value = cfg.get(key)
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if not ok or not minimum <= value <= maximum:
        raise ModelFileError(
            f"{path}: {key} must be an integer from {minimum} to {maximum}, got {_shown(value)}", _HINT
        )
    return int(value)


def number(cfg: dict[str, Any], key: str, path: Path | str, *, above: float = 0.0,
           below: float = math.inf) -> float:
    """``cfg[key]`` as a finite float with above < value < below (NaN, infinities, strings refused)."""
    value = cfg.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not above < value < below:
        bounds = f"above {above:g}" + (f" and below {below:g}" if math.isfinite(below) else "")
        raise ModelFileError(f"{path}: {key} must be a finite number {bounds}, got {_shown(value)}", _HINT)
    return float(value)


def first_key(cfg: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` that ``cfg`` sets to something other than null."""
    return next((k for k in keys if cfg.get(k) is not None), None)
