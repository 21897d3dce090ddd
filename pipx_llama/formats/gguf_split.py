"""Split GGUFs (``NAME-00001-of-0000N.gguf``, written by llama.cpp's ``llama-gguf-split``) merged into one
file, so every other command (run, quantize, show, push) sees an ordinary GGUF.

The format: every part is a GGUF carrying ``split.no`` (u16, 0-based), ``split.count`` (u16, N) and
``split.tensors.count`` (i32, the tensors of the whole set); the first part also holds all the model's
metadata, and each part holds some of the tensors, in order. The merge does what
``llama-gguf-split --merge`` does, byte for byte: the first part's metadata with ``split.count`` set to
0 (which llama.cpp reads as "not split") and moved to the end, every part's tensor infos in order with
offsets laid out again, each tensor's data copied and padded with zeros to the alignment. The parts
are hostile input: every part's header is validated by :func:`pipx_llama.formats.gguf.open_gguf`, and
a wrong count, number, tensor total, or a tensor name seen twice is refused in one line naming the part.
Data is streamed (never the whole model in memory) into a temporary file renamed when complete.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType

from pipx_llama.errors import ModelFileError
from pipx_llama.files import atomic_output
from pipx_llama.formats.gguf import DEFAULT_ALIGNMENT, GGUFFile, _Cursor, open_gguf

KEY_NO = "split.no"
KEY_COUNT = "split.count"
KEY_TENSORS = "split.tensors.count"
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_CHUNK = 1 << 22


@dataclass(frozen=True)
class SplitName:
    """What a part's file name says: its set's prefix, its 1-based number and the set's size."""

    prefix: str
    number: int
    count: int

    def part(self, number: int) -> str:
        """The file name of part ``number`` (1-based) of this set, as llama.cpp's ``llama_split_path``."""
        return f"{self.prefix}-{number:05d}-of-{self.count:05d}.gguf"

    @property
    def merged(self) -> str:
        return f"{self.prefix}.gguf"


def split_name(name: str) -> SplitName | None:
    """The split set a file name (not a path) belongs to, or None for an ordinary name."""
    m = SPLIT_NAME.match(name)
    if m is None:
        return None
    number, count = int(m["no"]), int(m["count"])
    if not 1 <= number <= count:
        return None
    return SplitName(m["prefix"], number, count)


@dataclass(frozen=True)
class MergeResult:
    path: Path
    parts: int
    tensors: int
    size: int


def _fail(part: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{part}: {problem}", "the split set is damaged or mixed; download its parts again")


def _int_key(gf: GGUFFile, part: Path, key: str) -> int:
    value = gf.metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(part, f"no {key} (not a part of a split GGUF)")
    return value


def _kv_records(gf: GGUFFile) -> list[tuple[str, bytes]]:
    """Each metadata entry's key and its raw bytes (key, type and value) as the file holds them."""
    buf = memoryview(gf.data)
    cur = _Cursor(buf, gf.path)
    cur.pos = 16
    n_kv = cur.u64("metadata count")
    out = []
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"metadata key #{i}")
        cur.value(cur.u32(f"value type of {key!r}"), f"metadata {key!r}")
        out.append((key, bytes(buf[start:cur.pos])))
    return out


def _string(text: str) -> bytes:
    raw = text.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def check_parts(parts: list[Path]) -> list[GGUFFile]:
    """Open and cross-check the parts of one split set, in order (see the module docstring)."""
    if not parts:
        raise ModelFileError("no split parts to merge", "pass the parts of a split GGUF")
    files = [open_gguf(p) for p in parts]
    total = _int_key(files[0], parts[0], KEY_TENSORS)
    seen: dict[str, Path] = {}
    for i, (gf, part) in enumerate(zip(files, parts, strict=True)):
        number, count = _int_key(gf, part, KEY_NO), _int_key(gf, part, KEY_COUNT)
        if count != len(parts):
            raise _fail(part, f"{KEY_COUNT} is {count}, but the set has {len(parts)} part(s)")
        if number != i:
            raise _fail(part, f"{KEY_NO} is {number}, expected {i} (a part of another split set, or out "
                              "of order)")
        if _int_key(gf, part, KEY_TENSORS) != total:
            raise _fail(part, f"{KEY_TENSORS} is {gf.metadata[KEY_TENSORS]}, the first part says {total} "
                              "(a part of another split set)")
        for name in gf.tensors:
            if name in seen:
                raise _fail(part, f"tensor {name!r} is also in {seen[name].name}")
            seen[name] = part
    if len(seen) != total:
        raise _fail(parts[-1], f"the parts hold {len(seen)} tensors, {KEY_TENSORS} says {total}")
    if files[0].metadata.get("general.alignment", DEFAULT_ALIGNMENT) != DEFAULT_ALIGNMENT:
        raise _fail(parts[0], "general.alignment is not 32, which llama-gguf-split never writes")
    return files


def _header(files: list[GGUFFile]) -> bytes:
    first = files[0]
    kvs = [raw for key, raw in _kv_records(first) if key != KEY_COUNT]
    kvs.append(_string(KEY_COUNT) + struct.pack("<IH", GGUFValueType.UINT16, 0))
    infos = []
    offset = 0
    for gf in files:
        for t in gf.tensors.values():
            shape = list(t.shape)
            while len(shape) > 1 and shape[-1] == 1:  # ggml_n_dims: trailing ones are not written
                shape.pop()
            infos.append(_string(t.name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, t.qtype,
                                                       offset))
            offset += _pad(t.nbytes, DEFAULT_ALIGNMENT)
    head = struct.pack("<4sIQQ", b"GGUF", first.version, len(infos), len(kvs)) + b"".join(kvs + infos)
    return head + bytes(_pad(len(head), DEFAULT_ALIGNMENT) - len(head))


def merge_parts(parts: list[Path], out: Path,
                on_bytes: Callable[[int, int], None] | None = None) -> MergeResult:
    """Merge the parts of a split GGUF (in order) into ``out``, atomically; ``on_bytes(written, total)``
    after each chunk of tensor data."""
    files = check_parts(parts)
    try:
        header = _header(files)
        total = len(header) + sum(_pad(t.nbytes, DEFAULT_ALIGNMENT)
                                  for gf in files for t in gf.tensors.values())
        with atomic_output(out, out.name) as tmp, open(tmp, "wb") as f:
            f.write(header)
            for gf in files:
                for t in gf.tensors.values():
                    for start in range(0, t.nbytes, _CHUNK):
                        f.write(gf.data[t.offset + start:t.offset + min(t.nbytes, start + _CHUNK)])
                        if on_bytes is not None:
                            on_bytes(f.tell(), total)
                    f.write(bytes(_pad(t.nbytes, DEFAULT_ALIGNMENT) - t.nbytes))
            size = f.tell()
    finally:
        for gf in files:
            gf.close()
    return MergeResult(out, len(files), sum(len(gf.tensors) for gf in files), size)
