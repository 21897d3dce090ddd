"""quantize_model and ``pipx-llama quantize``: llama.cpp-identical files, streaming, clean failures."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from quantize_oracles import llama_quantize
from tinymodel import write_tiny_llama

from pipx_llama.errors import ModelFileError, UnsupportedModelError, UsageError
from pipx_llama.formats.gguf import open_gguf
from pipx_llama.quant.file import (
    QUANTIZERS,
    QuantizeValueError,
    _Writer,
    quantize_model,
    widen_bf16,
    widen_bf16_ref,
    widen_f16,
    widen_f16_ref,
)
from pipx_llama.quant.rules import FILE_TYPES

Q = GGMLQuantizationType
# 8 layers make use_more_bits pick a mix of layers; dim 320 forces every K-quant fallback.
MODELS = {
    "f16-untied": {"dim": 256, "n_layers": 8, "ffn": 256, "n_heads": 4, "n_kv_heads": 2, "vocab": 320,
                   "qtype": Q.F16, "tied": False},
    "f32-tied-320": {"dim": 320, "n_layers": 2, "ffn": 640, "n_heads": 5, "n_kv_heads": 1, "vocab": 300,
                     "qtype": Q.F32, "tied": True},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    out = {}
    for name, cfg in MODELS.items():
        out[name] = d / f"{name}.gguf"
        write_tiny_llama(out[name], **cfg)
    return out


def field_types(path: Path) -> dict[str, list[int]]:
    return {
        k: [int(t) for t in f.types] for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")
    }


@pytest.mark.parametrize("model", list(MODELS))
def test_files_equal_llama_cpp_byte_for_byte(model: str, models: dict[str, Path], tmp_path: Path) -> None:
    src = models[model]
    for name, ft in FILE_TYPES.items():
        ours, theirs = tmp_path / f"{name}.gguf", tmp_path / f"{name}-llama.gguf"
        result = quantize_model(src, ours, name, threads=2)
        llama_quantize(src, theirs, int(ft.ftype), threads=2)
        assert ours.read_bytes() == theirs.read_bytes(), f"{model} {name} differs from llama.cpp"
        assert result.bytes_out == sum(t.nbytes for t in open_gguf(ours).tensors.values())
        theirs.unlink()


def test_metadata_is_copied_with_its_types(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["f16-untied"]
    dst = tmp_path / "q.gguf"
    quantize_model(src, dst, "Q4_K_M")
    a, b = open_gguf(src), open_gguf(dst)
    keys = [k for k in a.metadata if k not in ("general.file_type", "general.quantization_version")]
    assert list(b.metadata) == [*keys, "general.quantization_version", "general.file_type"]
    for k in keys:
        va, vb = a.metadata[k], b.metadata[k]
        assert (np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb), k
    assert b.metadata["general.file_type"] == 15 and b.metadata["general.quantization_version"] == 2
    ta, tb = field_types(src), field_types(dst)
    assert {k: ta[k] for k in keys} == {k: tb[k] for k in keys}
    assert tb["general.file_type"] == [int(GGUFValueType.UINT32)]


def test_odd_metadata_survives(tmp_path: Path) -> None:
    """Non-UTF-8 strings and every scalar type are copied exactly."""
    src = tmp_path / "odd.gguf"
    extra = {"test.u8": (7, GGUFValueType.UINT8), "test.i16": (-3, GGUFValueType.INT16),
             "test.u64": (1 << 40, GGUFValueType.UINT64), "test.f64": (0.1, GGUFValueType.FLOAT64),
             "test.bool": True, "test.name": "caf\u00e9"}
    write_tiny_llama(src, dim=64, extra_metadata=extra)
    raw = bytearray(src.read_bytes())
    i = raw.index("caf\u00e9".encode())
    raw[i + 3 : i + 5] = b"\xff\xfe"  # an invalid UTF-8 sequence of the same length
    src.write_bytes(bytes(raw))
    dst = tmp_path / "odd-q8.gguf"
    quantize_model(src, dst, "Q8_0")
    a, b = open_gguf(src), open_gguf(dst)
    for k in extra:
        va, vb = a.metadata[k], b.metadata[k]
        assert (np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb), k
    ta, tb = field_types(src), field_types(dst)
    assert {k: ta[k] for k in extra} == {k: tb[k] for k in extra}
    assert b"caf\xff\xfe" in dst.read_bytes()


def test_empty_arrays_can_be_written(tmp_path: Path) -> None:
    """gguf-py refuses empty arrays; llama.cpp copies them, so the quantizer's writer must too."""
    path = tmp_path / "empty.gguf"
    w = _Writer(path, "llama")
    w.add_key_value("test.empty", [], GGUFValueType.ARRAY, GGUFValueType.INT32)
    w.add_key_value("test.after", 5, GGUFValueType.UINT32)
    w.add_tensor("t", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    md = open_gguf(path).metadata
    assert md["test.empty"].size == 0 and md["test.empty"].dtype == np.int32 and md["test.after"] == 5
    assert field_types(path)["test.empty"][0] == int(GGUFValueType.ARRAY)


def test_requantizing_needs_the_flag_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "q8.gguf"
    write_tiny_llama(src, dim=64, qtype=Q.Q8_0)
    dst = tmp_path / "out.gguf"
    with pytest.raises(UsageError, match="requantizing") as err:
        quantize_model(src, dst, "Q4_0")
    assert "--allow-requantize" in err.value.hint
    assert os.listdir(tmp_path) == ["q8.gguf"]
    quantize_model(src, dst, "Q4_0", allow_requantize=True)
    # the tied embeddings would be Q6_K, but 64-value rows fall back to Q8_0: copied as they are
    assert {t.qtype for n, t in open_gguf(dst).tensors.items() if "norm" not in n} == {Q.Q4_0, Q.Q8_0}


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_K_M"])
def test_requantized_smollm2_equals_llama_cpp(ftype: str, smollm2_path: Path, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    quantize_model(smollm2_path, ours, ftype, allow_requantize=True, threads=2)
    llama_quantize(smollm2_path, theirs, int(FILE_TYPES[ftype].ftype), allow_requantize=True)
    assert ours.read_bytes() == theirs.read_bytes()


def test_progress_events(models: dict[str, Path], tmp_path: Path) -> None:
    events = []
    src = models["f32-tied-320"]
    result = quantize_model(src, tmp_path / "q.gguf", "Q5_K_M", on_event=events.append)
    n = len(open_gguf(src).tensors)
    assert [e.kind for e in events] == ["start"] + ["progress"] * n + ["done"]
    assert events[1].message.startswith(f"[1/{n}] output_norm.weight")
    assert events[-2].done == events[-2].total == result.bytes_in == events[0].total
    assert all(a.done < b.done for a, b in itertools.pairwise(events[1:-1]))
    assert result.n_fallback == sum("(fallback)" in e.message for e in events if e.kind == "progress") > 0


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_run_leaves_no_file(
    exc: type[BaseException], models: dict[str, Path], tmp_path: Path
) -> None:
    dst = tmp_path / "q.gguf"
    seen = []

    def on_event(ev) -> None:
        seen.append(ev)
        if len(seen) == 10:
            raise exc("stop")

    with pytest.raises(exc):
        quantize_model(models["f16-untied"], dst, "Q4_0", on_event=on_event)
    assert os.listdir(tmp_path) == []


def test_failure_keeps_an_existing_output(models: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "q.gguf"
    dst.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        quantize_model(
            models["f16-untied"], dst, "Q4_0", on_event=lambda ev: (_ for _ in ()).throw(KeyboardInterrupt)
        )
    assert dst.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["q.gguf"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_weights_are_refused_naming_the_tensor(bad: float, tmp_path: Path) -> None:
    src = tmp_path / "nan.gguf"
    write_tiny_llama(src, dim=64, n_layers=1)
    info = open_gguf(src).tensors["blk.0.ffn_up.weight"]
    with open(src, "r+b") as f:
        f.seek(info.offset + 4 * (3 * 64 + 5))
        f.write(np.float32(bad).tobytes())
    dst = tmp_path / "out.gguf"
    with pytest.raises(
        QuantizeValueError, match=r"'blk.0.ffn_up.weight' holds NaN or infinite values \(1 in row 3\)"
    ):
        quantize_model(src, dst, "Q4_0")
    assert sorted(os.listdir(tmp_path)) == ["nan.gguf"]
    assert issubclass(QuantizeValueError, ModelFileError)


def test_bad_arguments(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["f16-untied"]
    with pytest.raises(UsageError, match="unknown quantization type"):
        quantize_model(src, tmp_path / "x.gguf", "Q2_K")
    with pytest.raises(UsageError, match="overwrite the input"):
        quantize_model(src, src, "Q4_0")
    with pytest.raises(UsageError, match="no such folder"):
        quantize_model(src, tmp_path / "nope" / "x.gguf", "Q4_0")
    with pytest.raises(ModelFileError, match="no such file"):
        quantize_model(tmp_path / "missing.gguf", tmp_path / "x.gguf", "Q4_0")
    with pytest.raises(UsageError, match="threads"):
        quantize_model(src, tmp_path / "x.gguf", "Q4_0", threads=0)


def _raw_model(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]]) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(path, "llama")
    w.add_block_count(1)
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_types_it_cannot_convert(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    q2k = rng.integers(0, 256, (2, 84), dtype=np.uint8)  # two rows of one Q2_K super-block each
    ids = np.arange(8, dtype=np.int32)
    src = tmp_path / "odd.gguf"
    _raw_model(src, {"blk.0.attn_q.weight": (q2k, Q.Q2_K), "blk.0.ids": (ids, None),
                     "blk.0.ffn_up.weight": (rng.standard_normal((2, 256)).astype(np.float32), None)})
    with pytest.raises(UnsupportedModelError, match="'blk.0.attn_q.weight' is stored as Q2_K"):
        quantize_model(src, tmp_path / "q.gguf", "Q4_0", allow_requantize=True)
    # tensors that keep their type are copied, whatever the type
    src2 = tmp_path / "ids.gguf"
    up = rng.standard_normal((2, 256)).astype(np.float32)
    _raw_model(src2, {"blk.0.ids": (ids, None), "blk.0.ffn_up.weight": (up, None)})
    quantize_model(src2, tmp_path / "q.gguf", "Q4_0")
    out = open_gguf(tmp_path / "q.gguf")
    assert out.tensors["blk.0.ids"].qtype == Q.I32
    assert np.array_equal(out.tensor_bytes("blk.0.ids").view(np.int32), ids)
    assert out.tensors["blk.0.ffn_up.weight"].qtype == Q.Q4_0


def test_small_chunks_give_the_same_bytes(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["f32-tied-320"]
    quantize_model(src, tmp_path / "a.gguf", "Q4_K_M")
    quantize_model(src, tmp_path / "b.gguf", "Q4_K_M", chunk_elements=2000)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_widening_kernels_match_twins() -> None:
    rng = np.random.default_rng(0)
    h = rng.integers(0, 1 << 16, (7, 300), dtype=np.uint16)
    h[0, :] = np.arange(0x7C00 - 44, 0x7C00 + 256)  # the largest normals, +inf and NaNs
    h[1, :] = np.arange(300)  # zero and subnormals
    h[2, :] = h[1] | 0x8000
    out = np.empty(h.shape, np.int32)
    widen_f16(h, out)
    assert np.array_equal(out.view(np.uint32), widen_f16_ref(h).view(np.uint32))
    every = np.arange(1 << 16, dtype=np.uint16).reshape(16, -1)
    out = np.empty(every.shape, np.int32)
    widen_f16(every, out)
    assert np.array_equal(out.view(np.uint32), widen_f16_ref(every).view(np.uint32))
    bits = np.empty(h.shape, np.uint32)
    widen_bf16(h, bits)
    assert np.array_equal(bits, widen_bf16_ref(h).view(np.uint32))


def test_bf16_source(tmp_path: Path) -> None:
    """A BF16 model quantizes like its exact float32 expansion."""
    src = tmp_path / "bf16.gguf"
    weights = write_tiny_llama(src, dim=256, n_layers=1, ffn=256, qtype=Q.BF16)
    dst = tmp_path / "q.gguf"
    quantize_model(src, dst, "Q4_K_M")
    out = open_gguf(dst)
    for name, t in out.tensors.items():
        if t.qtype in QUANTIZERS:
            rows = weights[name].reshape(-1, t.shape[0])
            expected = QUANTIZERS[t.qtype].reference(rows).reshape(-1)
            assert np.array_equal(out.tensor_bytes(name), expected), name


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_memory_stays_bounded(tmp_path: Path) -> None:
    """Quantizing a 200 MB model raises peak RSS by far less than the model's size."""
    src = tmp_path / "big.gguf"
    write_tiny_llama(src, dim=1024, n_layers=8, ffn=2816, n_heads=8, n_kv_heads=8, vocab=4096, qtype=Q.F16)
    small = tmp_path / "small.gguf"
    write_tiny_llama(small, dim=256, n_layers=1, ffn=256, qtype=Q.F16)
    size = src.stat().st_size
    script = textwrap.dedent(f"""
        import json
        from pipx_llama.quant.file import quantize_model

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

        quantize_model({str(small)!r}, {str(tmp_path / "warm.gguf")!r}, "Q4_0", chunk_elements=1 << 20)
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        quantize_model({str(src)!r}, {str(tmp_path / "q.gguf")!r}, "Q4_0", chunk_elements=1 << 20)
        print(json.dumps({{"base": base, "peak": status("VmHWM")}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr
    mem = json.loads(out.stdout)
    growth = mem["peak"] - mem["base"]
    print(f"\nmodel {size / 2**20:.0f} MiB, base RSS {mem['base'] / 2**20:.0f} MiB, "
          f"growth {growth / 2**20:.1f} MiB")
    assert growth < size / 8


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipx_llama.cli", *args], capture_output=True, text=True,
                          timeout=600, check=False)


def test_cli_quantize(models: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "q.gguf"
    out = cli("quantize", str(models["f16-untied"]), str(dst), "q4_k_m", "--threads", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("blk.0.attn_v.weight [256x128] F16 -> Q6_K" in line for line in lines)
    assert lines[-1].endswith("s") and "MiB ->" in lines[-1]
    assert open_gguf(dst).metadata["general.file_type"] == 15

    out = cli("quantize", str(models["f16-untied"]), str(dst), "Q8_0", "--json")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert records[0]["kind"] == "start" and records[-1]["kind"] == "result"
    assert records[-1]["type"] == "Q8_0" and 0 < records[-1]["bytes_out"] < dst.stat().st_size

    out = cli("quantize", str(models["f16-untied"]), str(dst), "Q9_9")
    assert out.returncode == 2 and "unknown quantization type" in out.stderr and "hint:" in out.stderr


# --- the disk: one error, and the output reaches it before it is renamed ------------------------------------


def test_a_full_disk_is_disk_full_error_before_and_while_writing(models: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch) -> None:
    from pipx_llama.errors import DiskFullError

    dst = tmp_path / "q.gguf"
    monkeypatch.setenv("PIPX_LLAMA_FREE_BYTES", "1000")
    with pytest.raises(
        DiskFullError, match="not enough disk space in .* for the quantized model q.gguf"
    ) as err:
        quantize_model(models["f16-untied"], dst, "Q4_0")
    assert err.value.exit_code == 5 and os.listdir(tmp_path) == []
    monkeypatch.delenv("PIPX_LLAMA_FREE_BYTES")

    def full(self, tensor) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_Writer, "write_tensor_data", full)
    with pytest.raises(DiskFullError, match="No space left on device"):
        quantize_model(models["f16-untied"], dst, "Q4_0")
    assert os.listdir(tmp_path) == []


def test_the_output_is_on_disk_before_it_is_renamed(
    models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """`quantize` used to rename its output without the fsync `convert` did: both now share one writer."""
    from pipx_llama import files

    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = files.fsync_path, os.replace
    monkeypatch.setattr(files, "fsync_path", lambda p: (calls.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: (calls.append(("rename", Path(a).name)), real_replace(a, b))
    )
    quantize_model(models["f16-untied"], tmp_path / "q.gguf", "Q4_0")
    tmp = calls[0][1]
    assert tmp.startswith(".q.gguf.") and tmp.endswith(".tmp")
    assert calls == [("fsync", tmp), ("rename", tmp), ("fsync", tmp_path.name)]


def test_the_quantized_bytes_are_fsynced_before_the_atomic_rename(
    models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """At the lowest level (os.fsync itself): the file renamed into place was fsynced with all its bytes
    before the rename, and the rename is one os.replace of a temporary file in the same folder."""
    import stat

    calls: list[tuple[str, int, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            calls.append(("fsync", st.st_ino, st.st_size))
        real_fsync(fd)

    def replace(src, dst) -> None:
        if Path(dst).parent == tmp_path:  # not numba's cache files
            st = os.stat(src)
            calls.append(("rename", st.st_ino, st.st_size))
            assert Path(src).parent == tmp_path and Path(dst).name == "q.gguf"
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "q.gguf"
    quantize_model(models["f16-untied"], out, "Q4_0")
    renames = [c for c in calls if c[0] == "rename"]
    assert len(renames) == 1 and renames[0][1:] == (out.stat().st_ino, out.stat().st_size)
    at = calls.index(renames[0])
    assert ("fsync", *renames[0][1:]) in calls[:at], calls
    assert os.listdir(tmp_path) == ["q.gguf"]


def test_cli_full_disk_exit_code(models: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "PIPX_LLAMA_FREE_BYTES": "1000"}
    out = subprocess.run([sys.executable, "-m", "pipx_llama.cli", "quantize", str(models["f16-untied"]),
                          str(tmp_path / "q.gguf"), "Q4_0"], capture_output=True, text=True, timeout=600,
                         check=False, env=env)
    assert out.returncode == 5 and "not enough disk space" in out.stderr, out.stderr
