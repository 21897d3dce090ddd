"""A validating, zero-copy GGUF (v2, v3) reader.

gguf-py's ``GGUFReader`` trusts the file: a bogus array length or string size in a damaged
download makes it loop for a very long time or allocate gigabytes. This reader checks every count,
length, dimension and offset against the file's size before acting on it, so a damaged file gives a
one-line ``ModelFileError`` naming the file and the problem. Format facts (type codes, block sizes)
come from the ``gguf`` package's tables.

Tensor data is never copied: ``GGUFFile.tensor_bytes`` returns a uint8 view of the file's mmap.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pipx_llama.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Generous upper bounds that no real model reaches; they stop a damaged count from driving a loop.
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 20
MAX_NAME = 1 << 16
# Far above any real vocabulary (256k tokens) or merge list; stops a damaged array count from copying
# gigabytes out of a large file.
MAX_ARRAY = 1 << 24

_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. ``shape`` is in ggml order: ``shape[0]`` is the row length."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    """An open GGUF file: metadata, tensor directory and the mmap the tensor views point into."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    _buffer: np.ndarray | None = field(default=None, repr=False)

    @property
    def data(self) -> np.ndarray:
        """The whole mapped file as a read-only uint8 array (tensor offsets index into it)."""
        if self._buffer is None:
            raise ValueError(f"{self.path} is closed")
        return self._buffer

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of tensor ``name`` as a read-only uint8 view of the mapped file."""
        info = self.tensors[name]
        return self._buffer[info.offset : info.offset + info.nbytes]

    def close(self) -> None:
        # numpy views keep the mmap alive; dropping our references lets it unmap when they go
        self._buffer = None
        self._mmap = None


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(
            f"{self.path}: {problem} (at byte {self.pos})",
            "the file is damaged or not a GGUF model; download it again",
        )

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(
                f"truncated file: {what} needs {n} bytes but only {len(self.buf) - self.pos} remain"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long, more than the {limit} allowed")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Some vocabularies hold byte sequences that are not valid UTF-8 on their own.
            return raw.decode("utf-8", errors="surrogateescape")

    def strings(self, count: int, what: str) -> list[str]:
        """An array of ``count`` strings: ``string`` inlined, as a vocabulary holds 50k-260k of them
        (SmolLM2's 98k strings took 0.3 s through ``string``, 0.05 s here)."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail(f"truncated file: length of {what}[{i}] needs 8 bytes but only {end - pos} "
                                "remain")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                self.pos = pos
                raise self.fail(f"truncated file: {what}[{i}] needs {n} bytes but only {end - pos} remain")
            raw = bytes(buf[pos : pos + n])
            pos += n
            try:
                append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                append(raw.decode("utf-8", errors="surrogateescape"))
        self.pos = pos
        return out

    def value(self, vtype: int, what: str) -> Any:
        try:
            t = GGUFValueType(vtype)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {vtype}") from None
        if t == GGUFValueType.STRING:
            return self.string(what)
        if t == GGUFValueType.ARRAY:
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"element count of {what}")
            try:
                et = GGUFValueType(etype)
            except ValueError:
                raise self.fail(f"{what} is an array of unknown value type {etype}") from None
            if et == GGUFValueType.ARRAY:
                # llama.cpp rejects nested arrays too; refusing them also bounds the recursion depth
                raise self.fail(f"{what} is an array of arrays, which GGUF readers do not support")
            if count > MAX_ARRAY:
                raise self.fail(f"{what} claims {count} elements, more than the {MAX_ARRAY} allowed")
            if et in _NUMPY:
                itemsize = np.dtype(_NUMPY[et]).itemsize
                self.need(count * itemsize, f"{count} elements of {what}")
                arr = np.frombuffer(self.buf, dtype=np.dtype(_NUMPY[et]).newbyteorder("<"), count=count,
                                    offset=self.pos).copy()
                self.pos += count * itemsize
                return arr
            # every string needs at least its 8-byte length: this bounds the loop by the file size
            self.need(count * 8, f"{count} elements of {what}")
            if et == GGUFValueType.STRING:
                return self.strings(count, what)
            return [self.value(et, f"{what}[{i}]") for i in range(count)]
        return self.scalar(_SCALAR[t], what)


def _tensor_nbytes(path: Path, name: str, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[0] % block:
        raise ModelFileError(
            f"{path}: tensor {name!r} has rows of {shape[0]} values, not a multiple of {qtype.name}'s "
            f"block of {block}",
            "the file is damaged; download it again",
        )
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def open_gguf(path: str | Path) -> GGUFFile:
    """Map ``path`` and parse its header, validating every field against the file size."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file", "check the path to the model file") from None
    except OSError as err:
        raise ModelFileError(
            f"{path}: cannot open: {err.strerror}", "check the path and its permissions"
        ) from None
    if stat.S_ISDIR(mode):
        raise ModelFileError(f"{path}: is a folder, not a GGUF file", "pass the path of a .gguf file")
    if not stat.S_ISREG(mode):
        # a pipe or device would block or have no size to check against
        raise ModelFileError(f"{path}: is not a regular file", "pass the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelFileError(f"{path}: only {size} bytes, too small to be a GGUF file",
                                     "the download is incomplete or this is not a model file")
            st = os.fstat(f.fileno())
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise ModelFileError(f"{path}: cannot open or map: {err.strerror or err}",
                             "check the file's permissions and that it is on a local disk") from None
    key = (st.st_dev, st.st_ino, st.st_size)
    buf = memoryview(mm)
    try:
        kept = _HEADERS.get(key)
        if kept is not None and hashlib.blake2b(buf[: kept[0][3]]).digest() == kept[1]:
            parsed = kept[0]
        else:
            parsed = _parse(path, buf, size)
            _HEADERS[key] = (parsed, hashlib.blake2b(buf[: parsed[3]]).digest())
            while len(_HEADERS) > _HEADERS_KEPT:
                del _HEADERS[next(iter(_HEADERS))]
    finally:
        buf.release()
    version, metadata, tensors, data_offset = parsed
    return GGUFFile(path, version, dict(metadata), dict(tensors), data_offset, mm,
                    np.frombuffer(mm, np.uint8))


# Headers larger than this are not looked for in a download still under way (Gemma-3's 262k-token
# vocabulary makes a 6 MB header; the tensor table adds under 100 KB).
HEADER_READ_LIMIT = 64 << 20


def read_header(path: str | Path, full_size: int) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """(metadata, tensors) of a GGUF file of which only the first bytes may be at ``path`` yet: a
    download under way, which will have ``full_size`` bytes.

    Every field is validated against ``full_size``, as ``open_gguf`` validates against the file's
    size. Raises ModelFileError while the header has not all arrived (bytes not yet written read as
    zeros in a sparse file, which fail to parse), or when it is damaged. Used to learn a model's
    weight types while the rest of it downloads.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(min(full_size, HEADER_READ_LIMIT))
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read: {err.strerror or err}",
                             "check the path and its permissions") from None
    if len(head) < 24:
        raise ModelFileError(f"{path}: only {len(head)} bytes so far, too few for a GGUF header",
                             "wait for more of the download")
    _, metadata, tensors, _ = _parse(path, memoryview(head), full_size)
    return metadata, tensors


# Parsed headers by file (device, inode, size), with a digest of the header bytes they came from: one
# run opens its model up to four times (plan, compile-ahead, warm-up, load), and a 50k-260k-token
# vocabulary takes 50-150 ms to parse each time, 2-6 ms to hash. A header rewritten in place does not
# match its digest and is parsed again (modification times are too coarse to tell).
_Header = tuple[int, dict[str, Any], dict[str, TensorInfo], int]
_HEADERS: dict[tuple[int, int, int], tuple[_Header, bytes]] = {}
_HEADERS_KEPT = 4


def _parse(path: Path, buf: memoryview, size: int) -> _Header:
    """(version, metadata, tensors, data offset) of the header in ``buf``, validated against ``size``."""
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')",
                             "pass a .gguf model file; older GGML/GGJT files must be converted first")
    cur.pos = 4
    version = cur.u32("version")
    if (
        version not in SUPPORTED_VERSIONS
        and int.from_bytes(struct.pack("<I", version), "big") in SUPPORTED_VERSIONS
    ):
        raise ModelFileError(f"{path}: a big-endian GGUF file, which pipx-llama cannot read",
                             "use the little-endian (ordinary) version of this model")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)",
                             "re-convert the model with a current llama.cpp or pipx-llama")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_tensors > MAX_TENSORS or n_tensors * 24 > size:
        raise cur.fail(f"implausible tensor count {n_tensors} for a {size}-byte file")
    if n_kv > MAX_KV or n_kv * 13 > size:
        raise cur.fail(f"implausible metadata count {n_kv} for a {size}-byte file")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", MAX_NAME)
        vtype = cur.u32(f"value type of {key!r}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")

    raw_tensors = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", MAX_NAME)
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        if any(d == 0 or d > 1 << 40 for d in shape):
            raise cur.fail(f"tensor {name!r} has an impossible shape {list(shape)}")
        code = cur.u32(f"type of tensor {name!r}")
        rel = cur.u64(f"data offset of tensor {name!r}")
        raw_tensors.append((name, shape, code, rel))

    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, code, rel in raw_tensors:
        try:
            qtype = GGMLQuantizationType(code)
        except ValueError:
            raise ModelFileError(
                f"{path}: tensor {name!r} has unknown ggml type {code}",
                "the file is damaged or made by a newer tool; download or convert it again",
            ) from None
        if name in tensors:
            raise ModelFileError(
                f"{path}: tensor {name!r} appears twice", "the file is damaged; download it again"
            )
        if rel % alignment:
            raise ModelFileError(f"{path}: tensor {name!r} data offset {rel} is not aligned to {alignment}",
                                 "the file is damaged; download it again")
        nbytes = _tensor_nbytes(path, name, qtype, shape)
        start = data_offset + rel
        if start + nbytes > size:
            raise ModelFileError(
                f"{path}: tensor {name!r} ends at byte {start + nbytes}, past the end of the {size}-byte "
                f"file",
                "the file is truncated; download it again (pipx-llama resumes partial downloads)",
            )
        tensors[name] = TensorInfo(name, qtype, shape, start, nbytes)

    return version, metadata, tensors, data_offset
