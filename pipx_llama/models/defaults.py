"""A model's own defaults: sampling settings, stop strings, system prompt and prompt template, as ollama's
``params``, ``system`` and ``template`` layers carry them.

ollama's library models ship these beside the GGUF (a ``params`` JSON such as
``{"stop": ["<|im_end|>"], "temperature": 0.7}``, a ``system`` text, a Go ``template``), and users
expect ``run`` and ``serve`` to use them; a value given on the command line or in a request wins.
They travel in our manifest as its ``defaults`` table (so the lock of an OCI reference, ``--offline``
and hand-written manifests carry them too), read here from either shape.

A registry's layers are hostile input: every value is type- and range-checked, the texts are bounded,
keys we do not use (``mirostat``, ``num_gpu``, ...) are ignored, and each refusal is one line naming the
field and the value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipx_llama.errors import ModelFileError

MAX_PARAMS_BYTES = 64 << 10
MAX_TEXT_BYTES = 256 << 10      # a system prompt or a template
MAX_STOPS = 16
MAX_STOP_CHARS = 256

# ollama's params key -> (our name, kind, low, high); kinds: "f" number, "i" integer.
_NUMBERS: dict[str, tuple[str, str, float, float]] = {
    "temperature": ("temperature", "f", 0.0, 100.0),
    "top_k": ("top_k", "i", 0, 1 << 20),
    "top_p": ("top_p", "f", 0.0, 1.0),
    "min_p": ("min_p", "f", 0.0, 1.0),
    "repeat_penalty": ("repeat_penalty", "f", 0.0, 100.0),
    "repeat_last_n": ("repeat_last_n", "i", -1, 1 << 24),
    "seed": ("seed", "i", -(1 << 63), (1 << 63) - 1),
    "num_ctx": ("n_ctx", "i", 16, 1 << 24),
    "num_predict": ("n_predict", "i", -2, 1 << 24),
}
# the manifest's table uses our names; both spellings of these are read
_TABLE_KEYS = {v[0] for v in _NUMBERS.values()} | {"stop", "system", "template"}


@dataclass(frozen=True)
class ModelDefaults:
    """What a model asks for when the command line or the request does not say. None: not set."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None
    n_ctx: int | None = None
    n_predict: int | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None
    template: str | None = None

    @property
    def sampling(self) -> dict[str, Any]:
        """The ``SamplerConfig`` fields this model sets."""
        names = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def table(self) -> dict[str, Any]:
        """The manifest's ``defaults`` table (what :func:`defaults_from_table` reads back)."""
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if v is not None and k != "stop"}
        if self.stop:
            out["stop"] = list(self.stop)
        return out

    def __bool__(self) -> bool:
        return bool(self.table())


NONE = ModelDefaults()


def _bad(where: str, problem: str) -> ModelFileError:
    return ModelFileError(f"{where}: {problem}", "the model's defaults cannot be used; fix or remove them "
                          "where the model is published")


def _number(where: str, key: str, value: Any, kind: str, low: float, high: float) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "i" and not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer()))):
        want = "an integer" if kind == "i" else "a number"
        raise _bad(where, f"{key} must be {want}, got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high:
        raise _bad(where, f"{key} must be between {low:g} and {high:g}, got {_shown(value)}")
    return int(value) if kind == "i" else float(value)


def _shown(value: Any) -> str:
    s = json.dumps(value, ensure_ascii=True) if not isinstance(value, float) else repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _text(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(where, f"{key} must be text, got {_shown(value)}")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        raise _bad(where, f"{key} is longer than {MAX_TEXT_BYTES >> 10} KiB")
    if "\x00" in value:
        raise _bad(where, f"{key} holds a NUL character")
    return value


def _stops(where: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _bad(where, f"stop must be a list of non-empty strings, got {_shown(value)}")
    if len(items) > MAX_STOPS:
        raise _bad(where, f"stop has {len(items)} strings; at most {MAX_STOPS} are used")
    if any(len(s) > MAX_STOP_CHARS or "\x00" in s for s in items):
        raise _bad(where, f"a stop string is longer than {MAX_STOP_CHARS} characters or holds a NUL")
    return tuple(dict.fromkeys(items))


def _build(where: str, values: Mapping[str, Any], names: Mapping[str, tuple[str, str, float, float]],
           ignore_unknown: bool) -> ModelDefaults:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in names:
            field, kind, low, high = names[key]
            number = _number(where, key, value, kind, low, high)
            if field == "seed" and number < 0:      # ollama's -1: a random seed, which is ours when unset
                continue
            if field == "n_predict" and number < -1:  # ollama's -2 (fill the context) is our -1
                number = -1
            if field == "top_p" and number == 0:
                raise _bad(where, "top_p must be above 0 (1.0 turns it off), got 0")
            if field == "repeat_penalty" and number == 0:
                raise _bad(where, "repeat_penalty must be above 0 (1.0 turns it off), got 0")
            out[field] = number
        elif key == "stop":
            out["stop"] = _stops(where, value)
        elif key in ("system", "template"):
            out[key] = _text(where, key, value)
        elif not ignore_unknown:
            raise _bad(where, f"unknown key {key!r} (known: {', '.join(sorted(_TABLE_KEYS))})")
    return ModelDefaults(**out)


def from_ollama(params: str | None = None, system: str | None = None, template: str | None = None, *,
                where: str = "the model") -> ModelDefaults:
    """Defaults from ollama's text layers: the ``params`` JSON (keys ollama knows and we do not use are
    ignored), the ``system`` prompt and the ``template``."""
    values: dict[str, Any] = {}
    if params is not None and params.strip():
        if len(params.encode()) > MAX_PARAMS_BYTES:
            raise _bad(f"{where} params", f"the layer is larger than {MAX_PARAMS_BYTES >> 10} KiB")
        try:
            data = json.loads(params, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise _bad(f"{where} params", "the layer is not JSON") from None
        if not isinstance(data, dict):
            raise _bad(f"{where} params", f"the layer is not a JSON object, got {_shown(data)}")
        values.update(_build(f"{where} params", data, _NUMBERS, ignore_unknown=True).table())
    if system is not None and system.strip():
        values["system"] = _text(f"{where} system", "the system layer", system)
    if template is not None and template.strip():
        values["template"] = _text(f"{where} template", "the template layer", template)
    return defaults_from_table(values, where)


def _no_constant(name: str) -> None:
    raise ValueError(name)


def defaults_from_table(table: Any, where: str) -> ModelDefaults:
    """A manifest's ``defaults`` table (our names), checked: unknown keys are refused there, since a
    manifest is written for this tool."""
    if table is None:
        return NONE
    if not isinstance(table, Mapping):
        raise _bad(where, "defaults must be a table")
    ours = {v[0]: v for v in _NUMBERS.values()}
    return _build(where, table, ours, ignore_unknown=False)
