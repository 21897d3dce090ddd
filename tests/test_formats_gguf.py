"""The validating GGUF reader: agreement with gguf-py on good files, a clear error on every bad one.

Bad files are built byte by byte (``_gguf``) so each test states exactly which field is wrong.
Every refusal must be a one-line ``ModelFileError`` naming the file, and fields that claim huge
sizes must fail at once, without a large allocation or a long loop.
"""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tinymodel import write_tiny_llama

from pipx_llama.errors import ModelFileError
from pipx_llama.formats.gguf import MAX_ARRAY, open_gguf, read_header

T = GGMLQuantizationType
V = GGUFValueType
U64_MAX = (1 << 64) - 1


# --- a byte-level GGUF builder ---------------------------------------------------------------------

def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _kv_u32(key: str, value: int) -> bytes:
    return _kv(key, V.UINT32, struct.pack("<I", value))


def _kv_str(key: str, value: str | bytes) -> bytes:
    return _kv(key, V.STRING, _s(value))


def _array(etype: int, count: int, items: bytes) -> bytes:
    return struct.pack("<IQ", etype, count) + items


def _ti(name: str, shape: tuple[int, ...], qtype: int, offset: int, n_dims: int | None = None) -> bytes:
    n = len(shape) if n_dims is None else n_dims
    return _s(name) + struct.pack("<I", n) + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack(
        "<IQ", qtype, offset)


def _gguf(kvs: list[bytes], tis: list[bytes], data: bytes = b"", *, version: int = 3, n_kv: int | None = None,
          n_tensors: int | None = None, align: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tis) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tis)
    return body + b"\0" * (-len(body) % align) + data


def _f32_tensor_file(shape: tuple[int, ...] = (32, 2), qtype: int = T.F32, offset: int = 0,
                     extra_kvs: list[bytes] | None = None, data: bytes | None = None) -> bytes:
    """One tensor ``w`` of ``shape``; ``data`` defaults to exactly the bytes the shape needs."""
    if data is None:
        block, size = GGML_QUANT_SIZES[T(qtype)]
        data = bytes(int(np.prod(shape)) // block * size)
    return _gguf([_kv_str("general.architecture", "llama"), *(extra_kvs or [])],
                 [_ti("w", shape, qtype, offset)], data)


def _write(tmp_path: Path, blob: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def _refused(path: Path, *words: str, max_seconds: float = 0.5, max_alloc: int | None = 4 << 20) -> str:
    """open_gguf(path) must raise a one-line ModelFileError naming the file and containing ``words``,
    quickly and (unless ``max_alloc`` is None: tracing is slow) without allocating much.
    Returns the message."""
    if max_alloc is not None:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelFileError) as info:
            open_gguf(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if max_alloc is not None else 0
    finally:
        tracemalloc.stop()
    err = info.value
    msg = str(err)
    assert str(path) in msg, msg
    assert "\n" not in msg and err.hint and "\n" not in err.hint, (msg, err.hint)
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"
    assert elapsed < max_seconds, f"took {elapsed:.2f} s to refuse: {msg}"
    assert max_alloc is None or peak < max_alloc, f"allocated {peak / 1e6:.1f} MB to refuse: {msg}"
    return msg


# --- good files --------------------------------------------------------------------------------------

def _metadata_agrees(ours: dict, reader: GGUFReader) -> None:
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours) == list(fields)
    for key, field in fields.items():
        mine, theirs = ours[key], field.contents()
        if field.types[0] == V.ARRAY and field.types[-1] != V.STRING:
            assert isinstance(mine, np.ndarray), key
            assert mine.dtype == np.dtype(reader.gguf_scalar_to_np[field.types[-1]]), key
            np.testing.assert_array_equal(mine, np.asarray(theirs, dtype=mine.dtype), err_msg=key)
        else:
            assert type(mine) is type(theirs), key
            assert mine == theirs, key


def _tensors_agree(g, reader: GGUFReader) -> None:
    assert list(g.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = g.tensors[t.name]
        assert info.qtype == t.tensor_type, t.name
        assert info.shape == tuple(int(d) for d in t.shape), t.name
        assert info.n_elements == t.n_elements, t.name
        assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes), t.name
        view = g.tensor_bytes(t.name)
        assert view.dtype == np.uint8 and not view.flags.writeable
        assert np.array_equal(view, np.asarray(reader.data[t.data_offset : t.data_offset + t.n_bytes])), (
            t.name
        )


def test_smollm2_agrees_with_gguf_py(smollm2_path: Path) -> None:
    g = open_gguf(smollm2_path)
    reader = GGUFReader(smollm2_path)
    assert g.version == 3 and g.version == reader.fields["GGUF.version"].contents()
    assert len(g.tensors) == 272
    assert g.data_offset == reader.data_offset
    _metadata_agrees(g.metadata, reader)
    _tensors_agree(g, reader)
    embd = g.tensors["token_embd.weight"]
    assert (embd.qtype, embd.shape) == (T.Q8_0, (576, 49152))
    assert g.metadata["tokenizer.ggml.token_type"].dtype == np.int32
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152
    g.close()


@pytest.mark.parametrize(
    "qtype,tokenizer",
    [
        (T.F32, "spm"),
        (T.F16, "bpe"),
        (T.BF16, "spm"),
        (T.Q4_0, "bpe"),
        (T.Q4_1, "spm"),
        (T.Q5_0, "bpe"),
        (T.Q5_1, "spm"),
        (T.Q8_0, "bpe"),
    ],
)
def test_tiny_model_agrees_with_gguf_py_and_its_weights(tmp_path: Path, qtype: T, tokenizer: str) -> None:
    path = tmp_path / "tiny.gguf"
    weights = write_tiny_llama(path, qtype=qtype, tokenizer=tokenizer, tied=tokenizer == "spm")
    g = open_gguf(path)
    reader = GGUFReader(path)
    _metadata_agrees(g.metadata, reader)
    _tensors_agree(g, reader)
    assert set(g.tensors) == set(weights)
    assert ("output.weight" in g.tensors) == (tokenizer == "bpe")
    for name, info in g.tensors.items():
        expected = weights[name]
        assert info.shape == expected.shape[::-1]
        assert info.qtype == (qtype if expected.ndim == 2 else T.F32)
        rows = g.tensor_bytes(name).reshape(expected.shape[0] if expected.ndim == 2 else 1, -1)
        np.testing.assert_array_equal(
            dequantize(rows, info.qtype).reshape(expected.shape), expected, err_msg=name
        )


def test_tiny_model_metadata(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(
        path,
        vocab=400,
        tokenizer="spm",
        extra_metadata={"llama.context_length": 64, "general.name": None, "x.f": (1.5, V.FLOAT64)},
    )
    md = open_gguf(path).metadata
    assert md["general.architecture"] == "llama" and "general.name" not in md
    assert md["llama.context_length"] == 64 and md["x.f"] == 1.5
    assert len(md["tokenizer.ggml.tokens"]) == md["llama.vocab_size"] == 400
    assert md["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert md["tokenizer.ggml.tokens"][3 + 0x41] == "<0x41>"
    assert md["tokenizer.ggml.scores"].dtype == np.float32 and md["tokenizer.ggml.token_type"][-1] == 5


def test_v2_file_reads_like_v3(tmp_path: Path) -> None:
    # v2 and v3 share one layout (64-bit counts and lengths; v3 only added big-endian files)
    v3 = tmp_path / "v3.gguf"
    write_tiny_llama(v3, qtype=T.Q8_0)
    blob = bytearray(v3.read_bytes())
    assert struct.unpack_from("<I", blob, 4)[0] == 3
    struct.pack_into("<I", blob, 4, 2)
    v2 = _write(tmp_path, bytes(blob), "v2.gguf")
    a, b = open_gguf(v3), open_gguf(v2)
    assert (a.version, b.version) == (3, 2)
    assert a.tensors == b.tensors and a.data_offset == b.data_offset
    assert a.metadata.keys() == b.metadata.keys()
    for key in a.metadata:
        assert np.array_equal(a.metadata[key], b.metadata[key]) if isinstance(a.metadata[key], np.ndarray) \
            else a.metadata[key] == b.metadata[key]


def test_handmade_file_with_every_value_type(tmp_path: Path) -> None:
    scalars = [
        (V.UINT8, "<B", 200), (V.INT8, "<b", -5), (V.UINT16, "<H", 60000), (V.INT16, "<h", -300),
        (V.UINT32, "<I", 4_000_000_000), (V.INT32, "<i", -7), (V.FLOAT32, "<f", 0.5), (V.BOOL, "<?", True),
        (V.UINT64, "<Q", 1 << 60), (V.INT64, "<q", -(1 << 60)), (V.FLOAT64, "<d", 0.1),
    ]
    kvs = [_kv(f"k.{t.name}", t, struct.pack(fmt, v)) for t, fmt, v in scalars]
    kvs.append(_kv("a.i16", V.ARRAY, _array(V.INT16, 3, struct.pack("<3h", 1, -2, 3))))
    kvs.append(_kv("a.str", V.ARRAY, _array(V.STRING, 2, _s("x") + _s(""))))
    kvs.append(_kv("a.empty", V.ARRAY, _array(V.FLOAT32, 0, b"")))
    # not valid UTF-8 on its own (half a character): still readable
    kvs.append(_kv_str("s.bytes", b"\xe2\x96"))
    md = open_gguf(_write(tmp_path, _gguf(kvs, []))).metadata
    for t, _, v in scalars:
        assert md[f"k.{t.name}"] == v
    assert md["a.i16"].tolist() == [1, -2, 3] and md["a.i16"].dtype == np.int16
    assert md["a.str"] == ["x", ""] and md["a.empty"].size == 0
    assert md["s.bytes"].encode("utf-8", "surrogateescape") == b"\xe2\x96"


def test_custom_alignment(tmp_path: Path) -> None:
    blob = _gguf([_kv_u32("general.alignment", 64)], [_ti("a", (32,), T.F32, 0), _ti("b", (32,), T.F32, 128)],
                 bytes(256), align=64)
    g = open_gguf(_write(tmp_path, blob))
    assert g.data_offset % 64 == 0 and g.tensors["b"].offset == g.data_offset + 128


# --- not a GGUF file ---------------------------------------------------------------------------------

def test_not_gguf(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _refused(
        _write(tmp_path, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "random.gguf"), "not a GGUF"
    )
    _refused(_write(tmp_path, b"Hello, this is a README, not a model.\n" * 20, "text.gguf"), "not a GGUF")
    _refused(_write(tmp_path, b"ggjt" + bytes(100), "old.bin"), "not a GGUF", "b'ggjt'")
    _refused(_write(tmp_path, b"", "empty.gguf"), "0 bytes")
    _refused(_write(tmp_path, b"GGUF\3\0\0\0", "short.gguf"), "8 bytes")
    _refused(tmp_path / "missing.gguf", "no such file")
    _refused(tmp_path, "folder")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    _refused(fifo, "not a regular file")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFF, U64_MAX >> 32])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    _refused(_write(tmp_path, _gguf([], [], version=version)), f"version {version} is not supported")


def test_big_endian_file(tmp_path: Path) -> None:
    blob = b"GGUF" + struct.pack(">IQQ", 3, 0, 0) + bytes(16)
    _refused(_write(tmp_path, blob), "big-endian")


# --- truncation --------------------------------------------------------------------------------------

def test_truncated_at_many_points(tmp_path: Path) -> None:
    full = tmp_path / "full.gguf"
    write_tiny_llama(full, qtype=T.Q4_0, tokenizer="spm")
    blob = full.read_bytes()
    g = open_gguf(full)
    data_end = max(t.offset + t.nbytes for t in g.tensors.values())
    rng = np.random.default_rng(2)
    cuts = set(range(160)) | set(range(160, g.data_offset, 11)) | {g.data_offset - 1, g.data_offset}
    cuts |= {int(c) for c in rng.integers(g.data_offset, data_end, 40)} | {data_end - 1}
    path = tmp_path / "cut.gguf"
    kinds = set()
    for cut in sorted(cuts):
        path.write_bytes(blob[:cut])
        msg = _refused(path, max_alloc=None)
        kinds.add(msg.split(": ")[1].split()[0])
    assert {"truncated", "tensor"} <= kinds, kinds
    # the padding after the last tensor is not needed
    path.write_bytes(blob[:data_end])
    assert open_gguf(path).tensors.keys() == g.tensors.keys()


def test_the_header_of_a_download_under_way(tmp_path: Path) -> None:
    """read_header finds the tensor table once the header has arrived, validated against the size the
    file will have; before that, a cut or a sparse file's zeros are a ModelFileError, never a guess."""
    full = tmp_path / "full.gguf"
    write_tiny_llama(full, qtype=T.Q4_0, tokenizer="spm")
    blob = full.read_bytes()
    g = open_gguf(full)
    part = tmp_path / "m.part"
    part.write_bytes(blob[: g.data_offset])
    metadata, tensors = read_header(part, len(blob))
    assert tensors == g.tensors and metadata.keys() == g.metadata.keys()
    with pytest.raises(ModelFileError, match="past the end"):
        read_header(part, g.data_offset + 1)  # the size it will have is too small for its tensors
    for cut in (0, 10, 100, g.data_offset // 2, g.data_offset - 200):  # (the last 1-31 bytes are padding)
        part.write_bytes(blob[:cut])
        with pytest.raises(ModelFileError):
            read_header(part, len(blob))
        with open(part, "r+b") as f:  # as a parallel download leaves it: the full size, zeros not yet written
            f.truncate(len(blob))
        with pytest.raises(ModelFileError):
            read_header(part, len(blob))
    g.close()


# --- counts, lengths and sizes that do not fit the file -------------------------------------------

@pytest.mark.parametrize(
    "n_tensors,n_kv", [(U64_MAX, 1), (1 << 20, 1), (1, U64_MAX), (1, 1 << 19), (2, 1), (1, 2)]
)
def test_bogus_header_counts(tmp_path: Path, n_tensors: int, n_kv: int) -> None:
    blob = _gguf([_kv_str("general.architecture", "llama")], [_ti("w", (32,), T.F32, 0)], bytes(128),
                 n_tensors=n_tensors, n_kv=n_kv)
    _refused(_write(tmp_path, blob))


@pytest.mark.parametrize("length", [U64_MAX, 1 << 62, 1 << 40, 1 << 20, 500])
def test_bogus_string_lengths(tmp_path: Path, length: int) -> None:
    key = struct.pack("<Q", length) + b"general.architecture" + struct.pack("<I", V.STRING) + _s("llama")
    _refused(_write(tmp_path, _gguf([key], []) + bytes(64), "key.gguf"))
    value = _s("general.architecture") + struct.pack("<IQ", V.STRING, length) + b"llama"
    _refused(_write(tmp_path, _gguf([value], []) + bytes(64), "value.gguf"))
    name = _ti("w", (32,), T.F32, 0).replace(_s("w"), struct.pack("<Q", length) + b"w", 1)
    _refused(_write(tmp_path, _gguf([], [name], bytes(128)), "name.gguf"))


@pytest.mark.parametrize("etype", [V.STRING, V.INT32, V.UINT8, V.FLOAT64])
@pytest.mark.parametrize("count", [U64_MAX, 1 << 62, 1 << 33, MAX_ARRAY + 1, 1000])
def test_bogus_array_counts(tmp_path: Path, etype: int, count: int) -> None:
    items = _s("a") * 4 if etype == V.STRING else bytes(32)
    blob = _gguf([_kv("tokenizer.ggml.tokens", V.ARRAY, _array(etype, count, items))], []) + bytes(64)
    msg = _refused(_write(tmp_path, blob), "tokenizer.ggml.tokens")
    if count > MAX_ARRAY:
        assert "more than the" in msg or "truncated" in msg, msg


def test_nested_arrays_are_refused(tmp_path: Path) -> None:
    inner = _array(V.INT32, 1, struct.pack("<i", 7))
    _refused(_write(tmp_path, _gguf([_kv("n", V.ARRAY, _array(V.ARRAY, 1, inner))],
                                    [])), "array of arrays")
    # deep nesting must not reach Python's recursion limit
    deep = b"".join(struct.pack("<IQ", V.ARRAY, 1) for _ in range(5000)) + bytes(64)
    _refused(_write(tmp_path, _gguf([_kv("d", V.ARRAY, deep)], []), "deep.gguf"), "array of arrays")


@pytest.mark.parametrize("vtype", [13, 1000, 0xFFFFFFFF])
def test_unknown_value_type(tmp_path: Path, vtype: int) -> None:
    _refused(_write(tmp_path, _gguf([_kv("k", vtype, bytes(16))], [])), "unknown value type")
    _refused(_write(tmp_path, _gguf([_kv("k", V.ARRAY, _array(vtype, 1, bytes(16)))], []), "arr.gguf"),
             "unknown value type")


def test_duplicate_key(tmp_path: Path) -> None:
    blob = _gguf([_kv_str("general.architecture", "llama"), _kv_str("general.architecture", "gpt2")], [])
    _refused(_write(tmp_path, blob), "'general.architecture' appears twice")


# --- tensor directory --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "shape", [(0, 4), (32, 0), (1 << 41, 1), (32, U64_MAX), (32, 1 << 30, 1 << 30, 1 << 30)]
)
def test_impossible_dims(tmp_path: Path, shape: tuple[int, ...]) -> None:
    _refused(_write(tmp_path, _gguf([], [_ti("w", shape, T.F32, 0)], bytes(256))), "'w'")


@pytest.mark.parametrize("n_dims", [0, 5, 1 << 31])
def test_bad_dimension_count(tmp_path: Path, n_dims: int) -> None:
    blob = _gguf([], [_ti("w", (32, 1, 1, 1, 1), T.F32, 0, n_dims=n_dims)], bytes(256))
    _refused(_write(tmp_path, blob), "dimensions")


@pytest.mark.parametrize("offset", [32, 1 << 40, U64_MAX - 31])
def test_tensor_data_past_the_end(tmp_path: Path, offset: int) -> None:
    _refused(_write(tmp_path, _f32_tensor_file(offset=offset)), "past the end")


def test_tensor_data_one_byte_short(tmp_path: Path) -> None:
    blob = _f32_tensor_file()
    assert open_gguf(_write(tmp_path, blob, "ok.gguf")).tensors["w"].nbytes == 256
    _refused(_write(tmp_path, blob[:-1]), "past the end")


@pytest.mark.parametrize("code", [4, 5, 31, 42, 1000, 0xFFFFFFFF])
def test_unknown_ggml_type(tmp_path: Path, code: int) -> None:
    _refused(_write(tmp_path, _f32_tensor_file(qtype=code, data=bytes(1024))), f"unknown ggml type {code}")


def test_row_not_a_multiple_of_the_block(tmp_path: Path) -> None:
    _refused(_write(tmp_path, _f32_tensor_file(shape=(48, 2), qtype=T.Q4_0, data=bytes(1024))), "block of 32")


@pytest.mark.parametrize("offset", [1, 4, 16, 33])
def test_misaligned_offset(tmp_path: Path, offset: int) -> None:
    _refused(_write(tmp_path, _f32_tensor_file(offset=offset, data=bytes(1024))), "not aligned to 32")


def test_misaligned_for_custom_alignment(tmp_path: Path) -> None:
    blob = _gguf([_kv_u32("general.alignment", 64)], [_ti("w", (32,), T.F32, 32)], bytes(256), align=64)
    _refused(_write(tmp_path, blob), "not aligned to 64")


@pytest.mark.parametrize("payload", [_kv_u32("general.alignment", 0), _kv_u32("general.alignment", 24),
                                     _kv_u32("general.alignment", 1 << 31),
                                     _kv_str("general.alignment", "32")])
def test_bad_alignment(tmp_path: Path, payload: bytes) -> None:
    _refused(_write(tmp_path, _gguf([payload], [_ti("w", (32,), T.F32, 0)], bytes(256))), "general.alignment")


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    blob = _gguf([], [_ti("w", (32,), T.F32, 0), _ti("w", (32,), T.F32, 128)], bytes(256))
    _refused(_write(tmp_path, blob), "'w' appears twice")


def test_error_has_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError) as info:
        open_gguf(_write(tmp_path, b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("k")))
    assert "download" in info.value.hint
    assert info.value.exit_code == 3


def test_a_header_rewritten_in_place_is_parsed_again(tmp_path: Path) -> None:
    """Headers are kept per file between opens; an in-place rewrite of the same size (same inode, and
    within the file system's timestamp granularity) must not return the old header."""
    path = _write(tmp_path, _f32_tensor_file(extra_kvs=[_kv_str("general.name", "first")]), "same.gguf")
    assert open_gguf(path).metadata["general.name"] == "first"
    with open(path, "r+b") as f:
        f.write(_f32_tensor_file(extra_kvs=[_kv_str("general.name", "other")]))
    assert open_gguf(path).metadata["general.name"] == "other"
    copy = _write(tmp_path, path.read_bytes(), "copy.gguf")
    g = open_gguf(copy)
    assert g.path == copy and g.metadata["general.name"] == "other"
    g.metadata["general.name"] = "changed by a caller"
    assert open_gguf(copy).metadata["general.name"] == "other"


def test_a_string_array_cut_short_names_the_element(tmp_path: Path) -> None:
    items = _s("a") + _s("bb") + struct.pack("<Q", 50) + b"cc"
    blob = _gguf([_kv("tokenizer.ggml.tokens", V.ARRAY, _array(V.STRING, 3, items))], [])
    _refused(_write(tmp_path, blob), "'tokenizer.ggml.tokens'[2]", "needs 50 bytes")
    items = _s("a") + _s("\u00e9") + _s(b"\xff")
    good = _gguf([_kv("tokenizer.ggml.tokens", V.ARRAY, _array(V.STRING, 3, items))], [])
    tokens = open_gguf(_write(tmp_path, good, "good.gguf")).metadata["tokenizer.ggml.tokens"]
    assert tokens == ["a", "\u00e9", b"\xff".decode("utf-8", errors="surrogateescape")]
