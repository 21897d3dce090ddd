"""Read PyTorch's zip checkpoints (``torch.save`` since 1.6) without torch and without trusting them.

A ``.pth`` file is a zip archive: ``<prefix>/data.pkl`` is a pickle of the state dict whose tensors
reduce to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``; each storage is a
persistent id ``('storage', torch.HalfStorage, key, location, numel)`` whose bytes are the stored
(uncompressed) member ``<prefix>/data/<key>``.

Unpickling runs code named by the file, so the pickle goes through ``_RestrictedUnpickler``: its
``find_class`` knows exactly the globals a state dict of float tensors needs -- the two tensor-rebuild
functions, the half/bfloat16/float storage types and ``collections.OrderedDict`` -- and answers them
with stand-ins defined here; any other global (``os.system``, ``builtins.eval``, ``posix.system``,
``subprocess.Popen``, ...) raises ``ConvertSecurityError`` before it is even imported. Extension-registry
opcodes (which could fetch an object without ``find_class``) are refused by a scan of the opcodes
before unpickling starts. Stand-ins are fresh per file and refuse ``__setstate__``, so a crafted
pickle cannot alter them or leave state behind.

Tensor bytes are not read while unpickling: each tensor records where its bytes lie in the file
(zip offsets) and ``TorchTensor.read`` fetches them on demand with plain reads, so a caller holds
only the tensors it is working on -- and no file mapping keeps touched pages in its resident set.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipx_llama.errors import ModelFileError, UnsupportedModelError


class ConvertSecurityError(ModelFileError):
    """A checkpoint's pickle asks for something other than tensor data; nothing of it was run."""


# torch storage class -> (our dtype name, numpy dtype of the raw elements; bfloat16 is kept as uint16)
_STORAGE_TYPES: dict[str, tuple[str, np.dtype]] = {
    "HalfStorage": ("F16", np.dtype("<f2")),
    "BFloat16Storage": ("BF16", np.dtype("<u2")),
    "FloatStorage": ("F32", np.dtype("<f4")),
}
_SECURITY_HINT = (
    "the file may be malicious; nothing from it was run. Get the checkpoint from its original source"
)
_REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4"}
_MAX_PICKLE_BYTES = 256 << 20


class _Frozen:
    """Base of the stand-ins: no instance dict, attributes fixed at construction, no unpickle state."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise ConvertSecurityError("its pickle tried to modify a tensor description")

    def __setstate__(self, state: Any) -> None:
        raise ConvertSecurityError("its pickle tried to set state on a tensor description")

    def _init(self, **values: Any) -> None:
        for k, v in values.items():
            object.__setattr__(self, k, v)


class _StorageType(_Frozen):
    """Stands for ``torch.HalfStorage`` etc. inside persistent ids; deliberately not callable."""

    __slots__ = ("dtype", "kind", "name")

    def __init__(self, name: str) -> None:
        kind, dtype = _STORAGE_TYPES[name]
        self._init(name=name, kind=kind, dtype=dtype)


class _Storage(_Frozen):
    """One ``data/<key>`` member: where its bytes start in the file, and how many elements it holds."""

    __slots__ = ("dtype", "key", "kind", "numel", "offset", "path")

    def __init__(self, key: str, kind: str, dtype: np.dtype, numel: int, offset: int, path: Path) -> None:
        self._init(key=key, kind=kind, dtype=dtype, numel=numel, offset=offset, path=path)


class TorchTensor(_Frozen):
    """A tensor of a checkpoint, described but not loaded; ``read()`` fetches its elements."""

    __slots__ = ("dtype", "kind", "shape", "storage", "storage_offset", "stride")

    def __init__(
        self, storage: _Storage, storage_offset: int, shape: tuple[int, ...], stride: tuple[int, ...]
    ):
        self._init(kind=storage.kind, dtype=storage.dtype, shape=shape, stride=stride,
                   storage_offset=storage_offset, storage=storage)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def read(self, out: np.ndarray | None = None) -> np.ndarray:
        """The elements as a C-contiguous array of ``shape`` (bfloat16 as its uint16 bit patterns).

        ``out``, if given, must be a C-contiguous array of the same dtype and size; it is filled in
        place (a merge can read a shard straight into its rows of the merged tensor).
        """
        if out is None:
            out = np.empty(self.shape, self.dtype)
        elif out.dtype != self.dtype or out.size != self.numel or not out.flags.c_contiguous:
            raise ValueError("out must be a C-contiguous array of the tensor's dtype and size")
        st = self.storage
        if self.numel == 0:
            return out.reshape(self.shape)
        if self.is_contiguous():
            read_exact(
                st.path, st.offset + self.storage_offset * st.dtype.itemsize, out.reshape(-1).view(np.uint8)
            )
            return out.reshape(self.shape)
        span = self.storage_offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
        raw = np.empty(span - self.storage_offset, st.dtype)
        read_exact(st.path, st.offset + self.storage_offset * st.dtype.itemsize, raw.view(np.uint8))
        view = np.lib.stride_tricks.as_strided(raw, self.shape, [s * st.dtype.itemsize for s in self.stride])
        out.reshape(self.shape)[...] = view
        return out.reshape(self.shape)


def read_exact(path: Path, offset: int, buf: np.ndarray) -> None:
    """Fill ``buf`` (uint8) from ``path`` at ``offset``; a short read is a truncated file."""
    mv = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            got = 0
            while got < len(mv):
                n = f.readinto(mv[got:])
                if not n:
                    break
                got += n
    except OSError as err:
        raise ModelFileError(f"cannot read {path}: {err}", "check the file and the disk") from err
    if got != len(mv):
        raise ModelFileError(f"{path} is truncated (tensor data ends early)", "download the file again")


def _int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ModelFileError(f"bad {what} in the checkpoint's pickle: {value!r}")
    return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise ModelFileError(f"bad {what} in the checkpoint's pickle: {value!r}")
    return tuple(_int(v, what) for v in value)


class _Rebuild(_Frozen):
    """Stands for ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor``: makes a ``TorchTensor``."""

    __slots__ = ("storages", "v2")

    def __init__(self, storages: dict[str, _Storage], v2: bool) -> None:
        self._init(storages=storages, v2=v2)

    def __call__(self, storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> TorchTensor:
        if not (isinstance(storage, _Storage) and self.storages.get(storage.key) is storage):
            raise ModelFileError("a tensor in the checkpoint's pickle does not refer to one of its storages")
        if self.v2:
            if len(rest) not in (2, 3):
                raise ModelFileError("unexpected arguments to _rebuild_tensor_v2 in the checkpoint")
            metadata = rest[2] if len(rest) == 3 else None
            if metadata and any(bool(v) for v in dict(metadata).values()):
                raise UnsupportedModelError(
                    f"a tensor in the checkpoint has conj/neg flags set: {metadata!r}"
                )
        elif rest:
            raise ModelFileError("unexpected arguments to _rebuild_tensor in the checkpoint")
        offset = _int(storage_offset, "storage offset")
        shape = _int_tuple(size, "tensor size")
        strides = _int_tuple(stride, "tensor stride")
        if len(shape) != len(strides):
            raise ModelFileError("a tensor's size and stride differ in length in the checkpoint")
        if math.prod(shape) > storage.numel:
            raise ModelFileError(
                "a tensor in the checkpoint has more elements than its storage (an expanded view)"
            )
        if math.prod(shape) > 0:
            last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
            if last >= storage.numel:
                raise ModelFileError(
                    f"a tensor reaches past the end of storage {storage.key} in the checkpoint"
                )
        return TorchTensor(storage, offset, shape, strides)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, members: dict[str, tuple[int, int]], path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._members = members  # key -> (file offset, size in bytes)
        self._path = path
        self._storages: dict[str, _Storage] = {}
        self._types = {name: _StorageType(name) for name in _STORAGE_TYPES}
        self._allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): _Rebuild(self._storages, v2=True),
            ("torch._utils", "_rebuild_tensor"): _Rebuild(self._storages, v2=False),
            ("collections", "OrderedDict"): collections.OrderedDict,
            **{("torch", name): t for name, t in self._types.items()},
        }

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise ConvertSecurityError(
                f"{self._path}: refused to load: its pickle asks for '{module}.{name}', which is not tensor "
                f"data",
                _SECURITY_HINT,
            )
        return obj

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ModelFileError(f"{self._path}: unexpected persistent id in the pickle: {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or self._types.get(stype.name) is not stype:
            raise UnsupportedModelError(
                f"{self._path}: unsupported storage type in the checkpoint: {stype!r}",
                "only float16, bfloat16 and float32 tensors are supported",
            )
        if not isinstance(key, str):
            raise ModelFileError(f"{self._path}: bad storage key {key!r} in the pickle")
        numel = _int(numel, "storage size")
        known = self._storages.get(key)
        if known is not None:
            if known.kind != stype.kind or known.numel != numel:
                raise ModelFileError(f"{self._path}: storage {key} is used with different types or sizes")
            return known
        member = self._members.get(key)
        if member is None:
            raise ModelFileError(
                f"{self._path}: the archive has no data/{key} for a tensor", "the file is damaged"
            )
        offset, size = member
        if size != numel * stype.dtype.itemsize:
            raise ModelFileError(f"{self._path}: data/{key} holds {size} bytes, expected {numel} x "
                                 f"{stype.dtype.itemsize}", "the file is damaged")
        storage = _Storage(key, stype.kind, stype.dtype, numel, offset, self._path)
        self._storages[key] = storage
        return storage


def _scan_opcodes(data: bytes, path: Path) -> None:
    """Refuse opcodes that reach objects without ``find_class`` before anything is unpickled."""
    try:
        for op, _arg, _pos in pickletools.genops(data):
            if op.name in _REFUSED_OPCODES:
                raise ConvertSecurityError(
                    f"{path}: refused to load: its pickle uses the extension registry ({op.name})",
                    _SECURITY_HINT,
                )
    except (ValueError, struct.error) as err:
        raise ModelFileError(
            f"{path}: the pickle in the archive is malformed: {err}", "the file is damaged"
        ) from err


def _data_offset(f: io.BufferedReader, info: zipfile.ZipInfo, path: Path) -> int:
    """Where a stored member's bytes begin: after its local header (whose extra field may pad it)."""
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise ModelFileError(f"{path}: bad zip local header for {info.filename}", "the file is damaged")
    flags, method = struct.unpack("<HH", head[6:10])
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if flags & 1:
        raise UnsupportedModelError(f"{path}: {info.filename} is encrypted")
    if method != zipfile.ZIP_STORED:
        raise UnsupportedModelError(
            f"{path}: {info.filename} is compressed; torch stores tensor data uncompressed",
            "re-save the checkpoint with torch.save",
        )
    return info.header_offset + 30 + name_len + extra_len


def load_torch_zip(path: str | Path) -> dict[str, TorchTensor]:
    """The tensors of a torch zip checkpoint by name, described lazily; nothing but data is unpickled."""
    path = Path(path)
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            pkls = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pkls) != 1:
                raise ModelFileError(
                    f"{path}: expected one <name>/data.pkl in the archive, found {len(pkls)}",
                    "this is not a checkpoint written by torch.save",
                )
            prefix = pkls[0].filename[: -len("data.pkl")]
            byteorder = prefix + "byteorder"
            if byteorder in zf.namelist() and zf.read(byteorder).strip() not in (b"little", b""):
                raise UnsupportedModelError(f"{path}: big-endian checkpoints are not supported")
            if pkls[0].file_size > _MAX_PICKLE_BYTES:
                raise ModelFileError(f"{path}: data.pkl is implausibly large ({pkls[0].file_size} bytes)")
            data = zf.read(pkls[0])
            members: dict[str, tuple[int, int]] = {}
            data_prefix = prefix + "data/"
            for info in infos:
                if info.filename.startswith(data_prefix) and not info.is_dir():
                    members[info.filename[len(data_prefix):]] = (_data_offset(f, info, path), info.file_size)
            file_size = f.seek(0, io.SEEK_END)
    except zipfile.BadZipFile as err:
        raise ModelFileError(
            f"{path} is not a zip archive ({err})",
            "only torch.save's zip format (PyTorch 1.6 and later, incl. Meta's LLaMA files) is supported",
        ) from err
    except OSError as err:
        raise ModelFileError(f"cannot read {path}: {err}", "check the path and permissions") from err
    for key, (offset, size) in members.items():
        if offset + size > file_size:
            raise ModelFileError(f"{path} is truncated (data/{key} ends past the end of the file)",
                                 "download the file again")

    _scan_opcodes(data, path)
    unpickler = _RestrictedUnpickler(data, members, path)
    try:
        obj = unpickler.load()
    except ConvertSecurityError as err:
        if err.hint:
            raise
        raise ConvertSecurityError(f"{path}: refused to load: {err.message}", _SECURITY_HINT) from None
    except (UnsupportedModelError, ModelFileError):
        raise
    except Exception as err:  # anything the pickle machinery raises is a malformed file
        raise ModelFileError(f"{path}: the checkpoint's pickle could not be read: {err}",
                             "the file is damaged or not a state dict") from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, TorchTensor)}
    if not tensors:
        raise ModelFileError(f"{path} holds no tensors")
    return tensors
