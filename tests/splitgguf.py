"""Split a GGUF into parts the way llama.cpp's ``llama-gguf-split --split --split-max-tensors K`` does
(checked byte for byte against the tool in tests/test_formats_gguf_split.py when it is built), so tests
have real split sets without the tool."""

from __future__ import annotations

import struct
from pathlib import Path

from gguf import GGUFValueType

from pipx_llama.formats.gguf import open_gguf
from pipx_llama.formats.gguf_split import _kv_records

ALIGN = 32


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def split_gguf(src: Path, prefix: Path, per_part: int, *, count: int | None = None,
               total: int | None = None, numbers: list[int] | None = None) -> list[Path]:
    """Write ``<prefix>-0000i-of-0000N.gguf`` with ``per_part`` tensors each; ``count``, ``total`` and
    ``numbers`` override the split keys written (for hostile sets)."""
    gf = open_gguf(src)
    kvs = [raw for _key, raw in _kv_records(gf)]
    tensors = list(gf.tensors.values())
    groups = [tensors[i:i + per_part] for i in range(0, len(tensors), per_part)]
    n = len(groups)
    paths = []
    for i, group in enumerate(groups):
        no = numbers[i] if numbers else i
        split_kvs = [_s("split.no") + struct.pack("<IH", GGUFValueType.UINT16, no),
                     _s("split.tensors.count") + struct.pack("<Ii", GGUFValueType.INT32,
                                                              len(tensors) if total is None else total),
                     _s("split.count") + struct.pack("<IH", GGUFValueType.UINT16,
                                                      n if count is None else count)]
        all_kvs = (kvs if i == 0 else []) + split_kvs
        infos, offset = [], 0
        for t in group:
            shape = list(t.shape)
            while len(shape) > 1 and shape[-1] == 1:
                shape.pop()
            infos.append(_s(t.name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, t.qtype, offset))
            offset += _pad(t.nbytes)
        head = struct.pack("<4sIQQ", b"GGUF", gf.version, len(group), len(all_kvs))
        head += b"".join(all_kvs + infos)
        body = bytearray(head + bytes(_pad(len(head)) - len(head)))
        for t in group:
            body += bytes(gf.tensor_bytes(t.name)) + bytes(_pad(t.nbytes) - t.nbytes)
        path = prefix.parent / f"{prefix.name}-{i + 1:05d}-of-{n:05d}.gguf"
        path.write_bytes(bytes(body))
        paths.append(path)
    gf.close()
    return paths
