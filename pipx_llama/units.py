"""Sizes in bytes, written and read the one way every command uses.

Decimal units are powers of 1000 and binary units powers of 1024, as the SI and IEC define them and
as ``ls -h --si``, ollama and Hugging Face show file sizes: ``4M`` and ``4MB`` are 4,000,000 bytes,
``4Mi`` and ``4MiB`` are 4,194,304. Case does not matter (``4m`` = ``4M``; ``k`` and ``K`` are both
1000). ``human_bytes`` writes decimal units, so a size it prints can be typed back.
"""

from __future__ import annotations

import re

from pipx_llama.errors import UsageError

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)
_UNITS = ("B", "KB", "MB", "GB", "TB")


def parse_size(text: str, what: str = "size") -> int:
    """``"123"``, ``"512M"``, ``"8G"``, ``"16GiB"``, ``"1.5 GB"`` -> bytes (see the module docstring).

    Raises ``UsageError`` naming ``what`` for anything else ("KiB" without a number, "4X", "-1").
    """
    m = _SIZE.fullmatch(text)
    if m is None or (m.group(3) and not m.group(2)):
        raise UsageError(f"{what}: {text!r} is not a size",
                         "write bytes, or a number with K, M, G or T (powers of 1000) or Ki, Mi, Gi, Ti "
                         "(powers of 1024), e.g. 8G or 512Mi")
    value, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
    power = " kmgt".index(unit) if unit else 0
    return round(value * (1024 if binary else 1000) ** power)


def human_bytes(n: float | None) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, one decimal; ``"?"`` for an unknown size)."""
    if n is None:
        return "?"
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1000 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} {_UNITS[-1]}"
