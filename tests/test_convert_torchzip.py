"""The torch zip reader: real torch files, our writer's files, and malicious pickles that must never run."""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import bf16, state_dict_pickle, write_torch_zip

from pipx_llama.convert.torchzip import ConvertSecurityError, load_torch_zip
from pipx_llama.errors import ModelFileError, PipxLlamaError, UnsupportedModelError

DATA = Path(__file__).parent / "data"


def as_f32(t) -> np.ndarray:
    a = t.read()
    return (a.astype(np.uint32) << 16).view(np.float32) if t.kind == "BF16" else a.astype(np.float32)


def test_reads_a_file_written_by_torch_2_13():
    # tests/data/torch-2.13-state-dict.pth was written by torch 2.13.0 (see the file list in the report):
    # an nn.Linear state dict (OrderedDict with _metadata) plus views sharing one storage.
    t = load_torch_zip(DATA / "torch-2.13-state-dict.pth")
    big = np.arange(120, dtype=np.float32).reshape(10, 12) / 8
    assert t["weight"].kind == "F16" and t["bias"].kind == "F16"
    np.testing.assert_array_equal(as_f32(t["weight"]), np.arange(12, dtype=np.float32).reshape(3, 4) / 4)
    np.testing.assert_array_equal(as_f32(t["bias"]), [-1.0, 0.5, 2.0])
    np.testing.assert_array_equal(as_f32(t["rows"]), big[2:5])
    assert t["rows"].storage_offset == 24 and t["rows"].storage is t["whole"].storage
    np.testing.assert_array_equal(as_f32(t["transposed"]), big.T)
    np.testing.assert_array_equal(as_f32(t["strided"]), big[:, ::3])
    np.testing.assert_array_equal(as_f32(t["whole"]), big)
    assert t["bf16"].kind == "BF16"
    np.testing.assert_array_equal(as_f32(t["bf16"]), np.arange(16, dtype=np.float32).reshape(4, 4) - 8)


def test_round_trip_of_our_writer(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float16),
        "b": ("BF16", bf16(rng.standard_normal(7))),
        "c": rng.standard_normal((2, 2, 2)).astype(np.float32),
        "empty": np.zeros((0, 4), np.float16),
    }
    path = write_torch_zip(tmp_path / "consolidated.00.pth", tensors)
    got = load_torch_zip(path)
    assert list(got) == list(tensors)
    for name, value in tensors.items():
        expected = value[1] if isinstance(value, tuple) else value
        np.testing.assert_array_equal(got[name].read(), expected)
        assert got[name].storage.offset % 64 == 0  # torch aligns records; so does our writer
    assert got["b"].kind == "BF16" and got["c"].kind == "F32"
    with zipfile.ZipFile(path) as zf:
        assert zf.read("consolidated/version") == b"3\n"
        assert zf.read("consolidated/byteorder") == b"little"


def test_read_into_a_slice_of_a_bigger_array(tmp_path):
    w = np.arange(24, dtype=np.float16).reshape(6, 4)
    t = load_torch_zip(write_torch_zip(tmp_path / "x.pth", {"w": w}))["w"]
    out = np.zeros((10, 4), np.float16)
    t.read(out[2:8])
    np.testing.assert_array_equal(out[2:8], w)
    with pytest.raises(ValueError):
        t.read(np.zeros((6, 4), np.float32))


# ---- refusing malicious pickles -------------------------------------------------------------------------

class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _marker_command(marker: Path) -> str:
    return f"touch {marker}"


def _payloads(marker: Path) -> dict[str, bytes]:
    cmd = _marker_command(marker)
    code = f"__import__('os').system({cmd!r})"
    legit = state_dict_pickle([("w", "F16", "0", 4, (2, 2))])
    return {
        "os.system (pickled as posix.system)": pickle.dumps(_Reduce(os.system, (cmd,)), protocol=2),
        "builtins.eval": pickle.dumps(_Reduce(eval, (code,)), protocol=2),
        "builtins.exec": pickle.dumps(_Reduce(exec, (code,)), protocol=2),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, (["touch", str(marker)],)), protocol=2),
        "STACK_GLOBAL (protocol 4)": pickle.dumps(_Reduce(os.system, (cmd,)), protocol=4),
        "INST (protocol 0)": f"(S'{cmd}'\nios\nsystem\n.".encode(),
        # a valid state dict whose one value is a payload, past the first, allowed globals
        "payload inside a state dict": legit[:-2] + b"X\x01\x00\x00\x00z" + pickle.dumps(
            _Reduce(os.system, (cmd,)), protocol=2)[2:-1] + b"u.",
        # a torch global that is not a tensor-rebuild function
        "torch._utils._rebuild_parameter": b"\x80\x02ctorch._utils\n_rebuild_parameter\n).",
        # BUILD sets state on the tensor stand-in our unpickler returns
        "BUILD on a tensor": legit[:-2].replace(b"tR", b"tR}X\x05\x00\x00\x00shapeK\x07sb", 1) + b"u.",
    }


@pytest.mark.parametrize("case", list(_payloads(Path("/x"))))
def test_malicious_pickles_are_refused_and_never_run(tmp_path, case):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[case]
    path = write_torch_zip(
        tmp_path / "consolidated.00.pth", {"w": np.ones((2, 2), np.float16)}, data_pkl=payload
    )
    with pytest.raises(ConvertSecurityError) as err:
        load_torch_zip(path)
    assert "refused" in err.value.message or "tried to" in err.value.message
    assert err.value.hint
    assert not marker.exists()


def test_extension_registry_opcodes_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    copyreg.add_extension("posix", "system", 0x7A11)
    try:
        payload = pickle.dumps(_Reduce(os.system, (_marker_command(marker),)), protocol=2)
    finally:
        copyreg.remove_extension("posix", "system", 0x7A11)
    assert b"\x83" in payload  # EXT2
    path = write_torch_zip(tmp_path / "x.pth", {}, data_pkl=payload)
    with pytest.raises(ConvertSecurityError, match="extension registry"):
        load_torch_zip(path)
    assert not marker.exists()


def test_security_error_is_a_pipx_llama_error():
    assert issubclass(ConvertSecurityError, PipxLlamaError)


# ---- damaged and unsupported files ------------------------------------------------------------------------

def test_not_a_zip(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFileError, match="not a zip archive"):
        load_torch_zip(path)


def test_truncated_file(tmp_path):
    path = write_torch_zip(tmp_path / "x.pth", {"w": np.ones((64, 64), np.float16)})
    data = path.read_bytes()
    t = load_torch_zip(path)["w"]
    path.write_bytes(data[: t.storage.offset + 1000])  # cut inside the tensor: no central directory left
    with pytest.raises(ModelFileError):
        load_torch_zip(path)
    with pytest.raises(ModelFileError, match="truncated"):  # a file that shrinks after it was opened
        t.read()


def test_unsupported_storage_type(tmp_path):
    pkl = state_dict_pickle([("w", "F16", "0", 4, (2, 2))]).replace(b"HalfStorage", b"IntStorage")
    path = write_torch_zip(tmp_path / "x.pth", {"w": np.ones((2, 2), np.float16)}, data_pkl=pkl)
    with pytest.raises(ConvertSecurityError, match="torch.IntStorage"):
        load_torch_zip(path)


def test_storage_size_must_match_its_member(tmp_path):
    pkl = state_dict_pickle([("w", "F16", "0", 5, (5,))])
    path = write_torch_zip(tmp_path / "x.pth", {"w": np.ones((2, 2), np.float16)}, data_pkl=pkl)
    with pytest.raises(ModelFileError, match="holds 8 bytes"):
        load_torch_zip(path)


def test_compressed_members_are_refused(tmp_path):
    path = tmp_path / "x.pth"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x/data.pkl", state_dict_pickle([("w", "F16", "0", 4, (2, 2))]))
        zf.writestr("x/data/0", np.ones(4, np.float16).tobytes())
    path.write_bytes(buf.getvalue())
    with pytest.raises(UnsupportedModelError, match="compressed"):
        load_torch_zip(path)


def test_tensor_past_its_storage_is_refused(tmp_path):
    pkl = state_dict_pickle([("w", "F16", "0", 4, (2, 2))]).replace(
        b"K\x00(K\x02K\x02t", b"K\x02(K\x02K\x02t", 1
    )
    path = write_torch_zip(tmp_path / "x.pth", {"w": np.ones((2, 2), np.float16)}, data_pkl=pkl)
    with pytest.raises(ModelFileError, match="past the end"):
        load_torch_zip(path)


@pytest.mark.parametrize(
    "case",
    [
        "os.system (pickled as posix.system)",
        "builtins.eval",
        "STACK_GLOBAL (protocol 4)",
        "INST (protocol 0)",
    ],
)
def test_the_payloads_are_live(tmp_path, case):
    """Unpickled by a plain pickle.loads (in a child process) the payload does run: the refusal is real."""
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[case]
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=payload, check=True, timeout=60)
    assert marker.exists()


def test_expanded_views_are_refused(tmp_path):
    # size (64, 64) with stride (0, 1) over a 4-element storage: a huge tensor from a few bytes
    pkl = state_dict_pickle([("w", "F16", "0", 4, (2, 2))]).replace(
        b"(K\x02K\x02t(K\x02K\x01t", b"(K@K@t(K\x00K\x01t"
    )
    path = write_torch_zip(tmp_path / "x.pth", {"w": np.ones((2, 2), np.float16)}, data_pkl=pkl)
    with pytest.raises(ModelFileError, match="more elements than its storage"):
        load_torch_zip(path)
