"""engine.warmup: a model's weight types from its header, compiling only those, in the background too.

Compiles run in subprocesses with a fresh ``NUMBA_CACHE_DIR`` each (numba reads it once per process),
so what a compile leaves in the cache, and what a later process loads from it, can be inspected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from filelock import FileLock
from gguf import GGMLQuantizationType as Q

from pipx_llama.engine import warmup
from pipx_llama.engine.warmup import WeightTypes, weight_types, write_tiny_model_of
from pipx_llama.events import ProgressEvent

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cache: Path, *args: str, timeout: float = 1800) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PIPX_LLAMA_KERNELS", None)  # the per-model compile, not the suite's one for all formats
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_weight_types_read_from_the_header(tmp_path: Path) -> None:
    types = WeightTypes(Q.Q8_0, (Q.Q4_0, Q.Q4_1, Q.Q6_K))
    path = tmp_path / "m.gguf"
    write_tiny_model_of(path, types)
    assert weight_types(path) == types


def test_weight_types_of_a_download_under_way(tmp_path: Path) -> None:
    types = WeightTypes(Q.Q8_0, (Q.Q4_K, Q.Q6_K))
    path = tmp_path / "m.gguf"
    write_tiny_model_of(path, types)
    blob = path.read_bytes()
    part = tmp_path / "m.part"
    part.write_bytes(blob[: len(blob) // 2])
    assert weight_types(part, full_size=len(blob)) == types


def test_a_tiny_model_takes_one_to_eight_matrix_types(tmp_path: Path) -> None:
    nine = (Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K)
    with pytest.raises(ValueError, match="1 to 8"):
        write_tiny_model_of(tmp_path / "m.gguf", WeightTypes(Q.Q8_0, nine))


def test_warm_up_of_a_file_that_is_not_gguf_compiles_nothing(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a model")
    seen: list[str] = []
    assert warmup.warm_up(seen.append, path) == 0.0
    assert seen == []


def test_a_second_compile_of_the_same_types_waits_for_the_first(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("pipx_llama._numba_cache.CACHE_DIR", str(tmp_path))
    types = WeightTypes(Q.Q8_0, (Q.Q4_0,))
    marker = warmup._marker(types)
    events: list[ProgressEvent] = []
    result: list[float] = []
    with FileLock(str(marker) + ".lock"):
        thread = threading.Thread(target=lambda: result.append(warmup.compile_kernels(types, events.append)))
        thread.start()
        thread.join(1.0)
        assert thread.is_alive()  # waiting for the lock, not compiling
        marker.write_text("1.0\n")  # what the holder leaves when it is done
    thread.join(30)
    assert result == [0.0]
    assert [e.kind for e in events] == ["compile"] and "waiting" in events[0].message


def test_a_failed_background_compile_is_reported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    nine = (Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K)
    job = warmup.start_compile(WeightTypes(Q.Q8_0, nine))
    assert job is not None
    events: list[ProgressEvent] = []
    result = job.wait(events.append, timeout=300)
    assert not result.ok and "ValueError" in result.error and "1 to 8" in result.error
    assert [e.kind for e in events] == ["compile"]
    assert "background compile failed" in events[0].message and "compiling here instead" in events[0].message


_COMPILE = """
import json, sys
from gguf import GGMLQuantizationType as Q
from pipx_llama.engine.kernels import packed
from pipx_llama.engine.warmup import WeightTypes, compile_kernels, start_compile
types = WeightTypes(Q.Q8_0, (Q.Q4_1, Q.Q8_0))
if sys.argv[-1] == "background":
    result = start_compile(types).wait(timeout=1700)
    print(json.dumps({"ok": result.ok, "error": result.error}))
else:
    seconds = compile_kernels(types, helper=False)  # all in this process, to look at what it compiled
    kinds = sorted({str(sig[1].types[2]) for sig in packed.matmul_range.signatures})
    plain = sorted(n for n in dir(packed) if n.startswith("range_p_") and getattr(packed, n).signatures)
    print(json.dumps({"seconds": seconds, "kinds": kinds, "plain": plain, "simd": packed.SIMD}))
"""

_FOREGROUND = """
import json
from gguf import GGMLQuantizationType as Q
from pipx_llama.engine.kernels import fused
from pipx_llama.engine.warmup import WeightTypes, _exercise, cache_is_warm, write_tiny_model_of
import tempfile, pathlib
types = WeightTypes(Q.Q8_0, (Q.Q4_1, Q.Q8_0))
warm = cache_is_warm(types)
with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "m.gguf"
    write_tiny_model_of(path, types, seed=3)
    _exercise(path)
stats = {f.__name__: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
         for f in (fused.team_part,)}  # the entry point: its callees come with it
print(json.dumps({"warm": warm, "stats": stats}))
"""


_HELPER = """
import json, pathlib, sys, tempfile
from gguf import GGMLQuantizationType as Q
from pipx_llama.engine import warmup
from pipx_llama.engine.kernels import attention, fused
types = warmup.WeightTypes(Q.Q8_0, (Q.Q4_1, Q.Q4_K, Q.Q6_K))
with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "m.gguf"
    warmup.write_tiny_model_of(path, types, seed=3)
    if sys.argv[1] == "helper":
        warmup._helper_child(types)
    else:
        warmup._exercise(path)
fs = [fused._mm_item, fused._rope_and_cache, attention._attend, fused._quantize_rows, fused._norm_add,
      fused.n_items, fused._acts]
print(json.dumps({f.__name__: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
                  for f in fs}))
"""


@pytest.mark.slow
def test_the_compile_helper_leaves_what_the_fused_pass_calls(tmp_path: Path) -> None:
    """The helper process compiles the fused pass's callees from Python; the main compile must find every
    one of them in the cache, so the argument types must be those the fused pass passes."""
    cache = tmp_path / "cache"
    helper = _python(_HELPER, cache, "helper")
    assert all(misses == 1 for _, misses in helper.values()), helper
    main = _python(_HELPER, cache, "main")
    assert main == {name: [1, 0] for name in helper}, main


@pytest.mark.slow
def test_compiling_for_a_model_compiles_its_kinds_only(tmp_path: Path) -> None:
    from pipx_llama.engine.kernels import packed

    out = _python(_COMPILE, tmp_path / "cache")
    assert out["seconds"] > 0
    kinds = (packed.KIND_Q4_1, packed.KIND_Q8_0) if out["simd"] else (packed.KIND_P_Q4_1, packed.KIND_P_Q8_0)
    assert out["kinds"] == [f"KindSet{kinds}"]  # one signature, for this model's kinds
    assert out["plain"] == ([] if out["simd"] else ["range_p_q4_1", "range_p_q8_0"])


@pytest.mark.slow
def test_a_background_compile_leaves_a_cache_the_foreground_loads(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = _python(_COMPILE, cache, "background")
    assert out == {"ok": True, "error": None}
    fg = _python(_FOREGROUND, cache)
    assert fg["warm"]
    for name, (hits, misses) in fg["stats"].items():
        assert hits >= 1 and misses == 0, (name, hits, misses)


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_1"])
def test_the_types_a_quantization_will_write_are_known_before_it_runs(tmp_path: Path, quant: str) -> None:
    from pipx_llama.models.prepare import _quantized_types
    from pipx_llama.quant.file import quantize_model
    from tests.tinymodel import write_tiny_model

    src, dst = tmp_path / "f16.gguf", tmp_path / "q.gguf"
    write_tiny_model(src, dim=256, ffn=512, qtype=Q.F16, tied=False, vocab=512)
    predicted = _quantized_types(src, quant)
    quantize_model(src, dst, quant, threads=1)
    assert predicted == weight_types(dst)


def test_prepare_starts_compiling_a_file_models_types_ahead(tmp_path: Path, monkeypatch) -> None:
    """The road starts the background compile for the file's own types; a compile killed before it
    ends is reported, not silent (``wait``), and the foreground would compile what is missing."""
    from pipx_llama.models.prepare import ready

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))  # the child's cache
    monkeypatch.setattr("pipx_llama._numba_cache.CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    types = WeightTypes(Q.Q8_0, (Q.Q4_0, Q.Q5_1))
    write_tiny_model_of(path, types)
    events: list[ProgressEvent] = []
    runnable = ready(str(path), on_event=events.append, compile_ahead=True)
    assert runnable.path == path
    job = warmup._RUNNING.pop(types.key)
    try:
        assert job.types == types
        assert [e.message for e in events if e.kind == "compile"] == [
            f"compiling kernels in the background (process {job._process.pid})"]
    finally:
        job._process.terminate()
    result = job.wait(events.append, timeout=60)
    assert not result.ok and "exited with code" in result.error
    assert "background compile failed" in events[-1].message
