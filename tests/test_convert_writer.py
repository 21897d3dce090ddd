"""The GGUF writer: output-type rules, exact conversions, streaming one tensor at a time, atomic output."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
from convert_helpers import bf16
from gguf import GGMLQuantizationType as QT
from gguf import quants as gguf_quants

from pipx_llama.convert import writer
from pipx_llama.convert.vocab import Vocab
from pipx_llama.convert.writer import (
    LlamaParams,
    SourceTensor,
    convert_tensor,
    outtype_from_name,
    tensor_type,
    write_gguf,
)
from pipx_llama.errors import DiskFullError, ModelFileError, UsageError


def test_output_type_rules():
    assert tensor_type("blk.0.attn_q.weight", (64, 64), QT.F16) == QT.F16
    assert tensor_type("blk.0.attn_norm.weight", (64,), QT.Q8_0) == QT.F32
    assert tensor_type("blk.0.attn_norm.weight", (1, 64), QT.F16) == QT.F32  # a norm by name
    assert tensor_type("token_embd.weight", (100, 64), QT.Q8_0) == QT.Q8_0
    assert tensor_type("token_embd.weight", (100, 48), QT.Q8_0) == QT.F16  # rows not a multiple of 32
    assert tensor_type("token_embd.weight", (100, 48), QT.BF16) == QT.BF16
    assert outtype_from_name("Q8_0") == QT.Q8_0
    with pytest.raises(UsageError, match="q4_0"):
        outtype_from_name("q4_0")


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(writer, "_CHUNK_ELEMENTS", 1000)  # several row blocks even for small tensors


@pytest.mark.parametrize("kind", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0])
def test_conversions_are_exact(small_chunks, kind, qtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((37, 96)) * 3).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 65000.0, 1e-7]
    src = {"F16": x.astype(np.float16), "BF16": bf16(x), "F32": x}[kind]
    f32 = {"F16": src.astype(np.float32), "BF16": (src.astype(np.uint32) << 16).view(np.float32), "F32": src}[
        kind
    ]
    got = convert_tensor(src, kind, qtype)
    if qtype == QT.F32:
        np.testing.assert_array_equal(got, f32)
    elif qtype == QT.F16:
        np.testing.assert_array_equal(got, f32.astype(np.float16))
    elif qtype == QT.BF16:
        np.testing.assert_array_equal(got.view(np.uint16), bf16(f32))
    else:
        np.testing.assert_array_equal(got, gguf_quants.quantize(f32, QT.Q8_0))
    assert got.nbytes == writer.tensor_nbytes(x.shape, qtype)


def _vocab() -> Vocab:
    tokens = ["<unk>", "<s>", "</s>", *[f"t{i}" for i in range(13)]]
    return Vocab(model="llama", pre="default", tokens=tokens, token_types=[2, 3, 3] + [1] * 13,
                 scores=[0.0] * 16, special_ids={"bos": 1, "eos": 2, "unk": 0}, add_special={"bos": True})


def _params() -> LlamaParams:
    return LlamaParams(
        n_vocab=16, n_ctx=128, n_embd=32, n_layer=1, n_ff=64, n_head=2, n_head_kv=2, norm_eps=1e-5
    )


def _tensors(rng: np.random.Generator, on_load=None) -> list[SourceTensor]:
    shapes = {"token_embd.weight": (16, 32), "blk.0.attn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32),
              "blk.0.ffn_down.weight": (32, 64), "output_norm.weight": (32,)}
    out = []
    for name, shape in shapes.items():
        arr = rng.standard_normal(shape).astype(np.float16)

        def load(name=name, arr=arr):
            if on_load is not None:
                on_load(name)
            return arr.copy()

        out.append(SourceTensor(name, shape, "F16", load))
    return out


def test_streams_one_tensor_at_a_time(tmp_path):
    alive: list[weakref.ref] = []
    seen: list[str] = []

    def on_load(name):
        gc.collect()
        assert all(r() is None for r in alive), f"a previous tensor is still alive when {name} is loaded"
        seen.append(name)

    tensors = _tensors(np.random.default_rng(0), on_load)
    wrapped = []
    for t in tensors:
        def load(t=t):
            arr = t.load()
            alive.append(weakref.ref(arr))
            return arr
        wrapped.append(SourceTensor(t.name, t.shape, t.kind, load))
    r = write_gguf(tmp_path / "m.gguf", _params(), _vocab(), wrapped, QT.F16, gguf.Metadata(name="m"))
    assert seen == [t.name for t in tensors]
    reader = gguf.GGUFReader(r.path)  # gguf-py's own reader agrees with what was written
    got = {t.name: t for t in reader.tensors}
    assert got["blk.0.ffn_down.weight"].tensor_type == QT.F16
    assert list(got["blk.0.ffn_down.weight"].shape) == [64, 32]
    assert got["blk.0.attn_norm.weight"].tensor_type == QT.F32
    assert r.tensor_types == {"F16": 3, "F32": 2}


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failure_leaves_no_file_and_keeps_the_old_one(tmp_path, exc):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old model")

    def on_load(name):
        if name == "blk.0.ffn_down.weight":
            raise exc

    with pytest.raises(type(exc)):
        write_gguf(out, _params(), _vocab(), _tensors(np.random.default_rng(0), on_load), QT.F16,
                   gguf.Metadata(name="m"))
    assert out.read_bytes() == b"old model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr("shutil.disk_usage", lambda _p: Usage())
    with pytest.raises(DiskFullError, match="not enough disk space in .* for the converted model m.gguf"):
        write_gguf(tmp_path / "m.gguf", _params(), _vocab(), _tensors(np.random.default_rng(0)), QT.F16,
                   gguf.Metadata(name="m"))
    assert list(tmp_path.iterdir()) == []


def test_bad_destinations(tmp_path):
    args = (_params(), _vocab(), _tensors(np.random.default_rng(0)), QT.F16, gguf.Metadata(name="m"))
    with pytest.raises(UsageError, match="does not exist"):
        write_gguf(tmp_path / "nope" / "m.gguf", *args)
    with pytest.raises(UsageError, match="is a folder"):
        write_gguf(tmp_path, *args)


def test_shape_mismatch_from_a_loader(tmp_path):
    t = SourceTensor("token_embd.weight", (16, 32), "F16", lambda: np.zeros((16, 31), np.float16))
    with pytest.raises(ModelFileError, match="expected shape"):
        write_gguf(tmp_path / "m.gguf", _params(), _vocab(), [t], QT.F16, gguf.Metadata(name="m"))
    assert not (tmp_path / "m.gguf").exists()


def test_metadata_keys(tmp_path):
    p = _params()
    p.rope_theta, p.key_length = 500000.0, 16
    r = write_gguf(tmp_path / "m.gguf", p, _vocab(), _tensors(np.random.default_rng(0)), QT.Q8_0,
                   gguf.Metadata(name="m"))
    fields = gguf.GGUFReader(r.path).fields
    def value(key):
        f = fields[key]
        return f.contents()
    assert value("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert value("llama.rope.freq_base") == 500000.0
    assert value("llama.attention.key_length") == 16
    assert value("llama.rope.dimension_count") == 16
    assert value("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert value("tokenizer.ggml.bos_token_id") == 1
    assert Path(r.path).stat().st_size == r.nbytes


def test_cli_outtypes_match_the_converter():
    from pipx_llama.cli import convert_cmd

    assert tuple(convert_cmd.OUTTYPES) == tuple(writer.OUTTYPES)


def test_a_disk_filling_up_while_writing_is_disk_full_error(tmp_path, monkeypatch):
    def full(self, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    with pytest.raises(DiskFullError, match="No space left on device") as err:
        write_gguf(tmp_path / "m.gguf", _params(), _vocab(), _tensors(np.random.default_rng(0)), QT.F16,
                   gguf.Metadata(name="m"))
    assert err.value.exit_code == 5 and list(tmp_path.iterdir()) == []


def test_the_output_is_on_disk_before_it_is_renamed(tmp_path, monkeypatch):
    from pipx_llama import files

    calls = []
    real_fsync, real_replace = files.fsync_path, files.os.replace
    monkeypatch.setattr(files, "fsync_path", lambda p: (calls.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: (calls.append(("rename", Path(a).name)), real_replace(a, b))
    )
    write_gguf(tmp_path / "m.gguf", _params(), _vocab(), _tensors(np.random.default_rng(0)), QT.F16,
               gguf.Metadata(name="m"))
    tmp = calls[0][1]
    assert calls == [("fsync", tmp), ("rename", tmp), ("fsync", tmp_path.name)]
