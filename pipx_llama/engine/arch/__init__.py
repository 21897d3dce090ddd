"""The model families the engine runs, one small module each; ``family_of`` finds a file's.

Adding a family: a module with a ``Family`` (its switches, and a hook for metadata of its own)
and one line in ``FAMILIES``. Both forward passes read the switches; no pass is written per family.
"""

from __future__ import annotations

from pathlib import Path

from pipx_llama.engine.arch.base import ACT_GELU, ACT_SILU, ROPE_NEOX, ROPE_NORM, Family, HyperParams
from pipx_llama.engine.arch.gemma import GEMMA2, GEMMA3
from pipx_llama.engine.arch.llama import LLAMA
from pipx_llama.engine.arch.phi3 import PHI3
from pipx_llama.engine.arch.qwen2 import QWEN2
from pipx_llama.engine.arch.qwen3 import QWEN3
from pipx_llama.errors import UnsupportedModelError

FAMILIES: dict[str, Family] = {
    name: f for f in (LLAMA, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3) for name in f.names
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family_of(arch: str, where: str | Path = "") -> Family:
    """The family of GGUF architecture ``arch``; an UnsupportedModelError names the supported ones."""
    family = FAMILIES.get(arch)
    if family is None:
        place = f"{where}: " if where else ""
        raise UnsupportedModelError(
            f"{place}architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})",
            "use a model of a supported family: "
            + "; ".join(f.examples for f in dict.fromkeys(FAMILIES.values())),
        )
    return family


__all__ = ["ACT_GELU", "ACT_SILU", "FAMILIES", "ROPE_NEOX", "ROPE_NORM", "SUPPORTED_ARCHITECTURES", "Family",
           "HyperParams", "family_of"]
