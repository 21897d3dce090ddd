"""Mutation fuzzing of GGUF loading: damaged files give a clean load or a PipxLlamaError, nothing else.

Each tiny model (BPE and SentencePiece vocabularies, from ``tinymodel``) is damaged in hundreds of
seeded, reproducible ways: truncation, random byte flips, and "interesting" values (0, 1, all ones,
sign bits, the original +-1, doubled) written over the header's structural fields -- counts, string
lengths, value types, hyper-parameters, tensor dims, types and offsets, found by walking the good
file. Every case must finish within a time limit, allocate little, and end either in a clean load or
in a ``PipxLlamaError``. The whole loader is the target (``load_model``: reader, hyper-parameter
checks, tokenizer, KV cache), plus the reader alone with stricter message checks.
"""

from __future__ import annotations

import contextlib
import signal
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from tinymodel import write_tiny_llama

from pipx_llama.errors import ModelFileError, PipxLlamaError
from pipx_llama.formats.gguf import open_gguf

SEED = 20240501
CASE_SECONDS = 2.0  # per case; a clean load of a tiny model takes a few milliseconds
CASE_ALLOC = 16 << 20  # bytes a single case may allocate (tracemalloc peak)
RSS_GROWTH = 128 << 20  # across a whole run
_SCALAR_SIZE = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
                GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4,
                GGUFValueType.FLOAT32: 4, GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8,
                GGUFValueType.FLOAT64: 8}


# --- the targets ---------------------------------------------------------------------------------

def _open_gguf_target(path: Path) -> None:
    g = open_gguf(path)
    try:
        for name in g.tensors:
            g.tensor_bytes(name).sum()  # touch every byte the directory claims
    finally:
        g.close()


def _load_model_target(path: Path) -> None:
    from pipx_llama.engine.model import load_model

    model = load_model(path, threads=1)
    try:
        ctx = model.new_context()
        assert ctx.kv_bytes > 0
        tok = model.tokenizer
        ids = tok.encode("Hello world, <|im_start|>user\nhi<|im_end|> ünïcode 12345 <s></s>")
        tok.decode(ids)
        tok.chat_prompt([{"role": "user", "content": "hi"}])
    finally:
        model.close()


# --- mutations -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    offset: int
    size: int
    what: str


def header_fields(blob: bytes) -> tuple[list[Field], int]:
    """Every structural field of a known-good GGUF header, and where the header ends.

    A deliberately small walker, independent of the reader under test; it trusts the file.
    """
    fields: list[Field] = []
    pos = 0

    def take(size: int, what: str, record: bool = True) -> int:
        nonlocal pos
        value = int.from_bytes(blob[pos : pos + size], "little")
        if record:
            fields.append(Field(pos, size, what))
        pos += size
        return value

    def string(what: str) -> str:
        nonlocal pos
        n = take(8, f"length of {what}")
        text = blob[pos : pos + n].decode("utf-8", "replace")
        pos += n
        return text

    def value(vtype: int, what: str) -> None:
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            string(what)
        elif vtype == GGUFValueType.ARRAY:
            etype = take(4, f"element type of {what}")
            count = take(8, f"count of {what}")
            if etype == GGUFValueType.STRING:
                for i in range(count):
                    string(f"{what}[{i}]")
            else:
                pos += count * _SCALAR_SIZE[GGUFValueType(etype)]
        else:
            take(_SCALAR_SIZE[GGUFValueType(vtype)], f"value of {what}")

    take(4, "magic")
    take(4, "version")
    n_tensors = take(8, "tensor count")
    n_kv = take(8, "metadata count")
    for i in range(n_kv):
        key = string(f"key #{i}")
        value(take(4, f"type of {key}"), key)
    for _ in range(n_tensors):
        name = string("tensor name")
        n_dims = take(4, f"n_dims of {name}")
        for d in range(n_dims):
            take(8, f"dim {d} of {name}")
        take(4, f"type of {name}")
        take(8, f"offset of {name}")
    return fields, pos


def _interesting(original: int, size: int, rng: np.random.Generator) -> int:
    bits = 8 * size
    top = (1 << bits) - 1
    choices = [0, 1, 2, top, top >> 1, 1 << (bits - 1), (original + 1) & top, (original - 1) & top,
               (original * 2) & top, (original << 8) & top, int(rng.integers(0, 1 << min(bits, 63)))]
    if bits > 32:
        choices += [1 << 32, (1 << 31) - 1, 1 << 31, 1 << 40]
    return choices[int(rng.integers(len(choices)))]


def mutations(blob: bytes, n: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``n`` reproducible damaged copies of ``blob``: (description, bytes)."""
    rng = np.random.default_rng(seed)
    fields, header_end = header_fields(blob)
    # the few hundred lengths of vocabulary strings would otherwise crowd out the few dozen counts,
    # types, hyper-parameters and tensor-directory entries
    items = [f for f in fields if "[" in f.what]
    others = [f for f in fields if "[" not in f.what]
    size = len(blob)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            # most truncations cut the header, where parsing happens; some cut the tensor data
            cut = (
                int(rng.integers(0, header_end))
                if rng.random() < 0.7
                else int(rng.integers(header_end, size))
            )
            yield f"truncate to {cut} bytes", blob[:cut]
        elif kind == 1:
            out = bytearray(blob)
            spots = []
            for _ in range(int(rng.integers(1, 5))):
                pos = int(rng.integers(0, header_end)) if rng.random() < 0.85 else int(rng.integers(0, size))
                out[pos] ^= int(rng.integers(1, 256))
                spots.append(pos)
            yield f"flip bytes at {spots}", bytes(out)
        else:
            out = bytearray(blob)
            pool = items if rng.random() < 0.3 else others
            f = pool[int(rng.integers(len(pool)))]
            original = int.from_bytes(blob[f.offset : f.offset + f.size], "little")
            new = _interesting(original, f.size, rng)
            out[f.offset : f.offset + f.size] = new.to_bytes(f.size, "little")
            yield f"{f.what} (byte {f.offset}) {original} -> {new}", bytes(out)


# --- running cases -----------------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` in the code under test eats it."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    if not hasattr(signal, "setitimer"):
        yield  # no interval timer (Windows): the elapsed-time check after the case still applies
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cases(target: Callable[[Path], None], cases: list[tuple[str, bytes]], folder: Path,
              message_names_file: bool, seconds: float = CASE_SECONDS) -> Counter:
    """Run every case; fail with the full list of misbehaving cases. Returns outcome counts."""
    outcomes: Counter = Counter()
    problems: list[str] = []
    rss_before = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        for i, (what, blob) in enumerate(cases):
            path = folder / f"case{i:04d}.gguf"
            path.write_bytes(blob)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            start = time.perf_counter()
            timed_out = False
            try:
                with time_limit(seconds):
                    target(path)
                outcomes["loaded"] += 1
            except PipxLlamaError as err:
                outcomes[type(err).__name__] += 1
                if message_names_file and str(path) not in str(err):
                    problems.append(f"#{i} {what}: message does not name the file: {err}")
            except CaseTimeout:
                problems.append(f"#{i} {what}: no result within {seconds} s")
                timed_out = True
            except Exception as err:  # noqa: BLE001  (the point: anything else is a bug)
                where = traceback.extract_tb(err.__traceback__)[-1]
                problems.append(f"#{i} {what}: {type(err).__name__}: {err} "
                                f"({Path(where.filename).name}:{where.lineno})")
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] - base
            if elapsed > seconds and not timed_out:
                problems.append(f"#{i} {what}: took {elapsed:.1f} s")
            if peak > CASE_ALLOC:
                problems.append(f"#{i} {what}: allocated {peak / 1e6:.1f} MB")
            path.unlink()
    finally:
        tracemalloc.stop()
    growth = psutil.Process().memory_info().rss - rss_before
    print(f"\n{len(cases)} cases: {dict(outcomes)}; RSS growth {growth / 1e6:.1f} MB")
    assert not problems, f"{len(problems)} of {len(cases)} cases misbehaved:\n" + "\n".join(problems)
    assert growth < RSS_GROWTH, f"RSS grew by {growth / 1e6:.0f} MB over {len(cases)} cases"
    return outcomes


def _engine_type(preferred: GGMLQuantizationType) -> GGMLQuantizationType:
    """``preferred`` if the engine has a kernel for it, else a float type it runs."""
    try:
        from pipx_llama.engine.kernels import WEIGHT_KERNELS
        from pipx_llama.engine.model import load_model  # noqa: F401  (registers the kernels)
    except ImportError:
        return preferred
    for qtype in (preferred, GGMLQuantizationType.F16, GGMLQuantizationType.F32):
        if qtype in WEIGHT_KERNELS:
            return qtype
    return preferred


@pytest.fixture(scope="module")
def tiny_blobs(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("tiny")
    blobs = {}
    for tokenizer, qtype, tied in (("bpe", _engine_type(GGMLQuantizationType.Q4_0), True),
                                   ("spm", _engine_type(GGMLQuantizationType.Q8_0), False)):
        path = folder / f"{tokenizer}.gguf"
        write_tiny_llama(
            path, tokenizer=tokenizer, qtype=qtype, tied=tied, vocab=320 if tokenizer == "bpe" else None
        )
        blobs[tokenizer] = path.read_bytes()
    return blobs


def _replace_once(blob: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and old in blob
    return blob.replace(old, new, 1)


def regressions(blobs: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """Damage found by earlier fuzzing runs, kept as fixed cases."""
    hello = "▁hello".encode()
    return [
        # SentencePiece's proto loader raised UnicodeDecodeError on a byte piece that is not UTF-8
        (
            "spm: byte token '<0x3A>' damaged to b'<0x3\\xc7>'",
            _replace_once(blobs["spm"], b"<0x3A>", b"<0x3\xc7>"),
        ),
        (
            "spm: token '▁hello' with a broken UTF-8 lead byte",
            _replace_once(blobs["spm"], hello, b"\xc7" + hello[1:]),
        ),
        (
            "bpe: token 'hello' with a stray continuation byte",
            _replace_once(blobs["bpe"], b"\x05\0\0\0\0\0\0\0hello", b"\x05\0\0\0\0\0\0\0h\x9allo"),
        ),
    ]


def _all_cases(blobs: dict[str, bytes], per_file: int) -> list[tuple[str, bytes]]:
    return regressions(blobs) + [(f"{name}: {what}", blob)
                                 for k, (name, good) in enumerate(sorted(blobs.items()))
                                 for what, blob in mutations(good, per_file, SEED + k)]


def test_walker_agrees_with_the_reader(tiny_blobs, tmp_path) -> None:
    for name, blob in tiny_blobs.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(blob)
        fields, end = header_fields(blob)
        assert open_gguf(path).data_offset == (end + 31) // 32 * 32
        assert len(fields) > 300


def test_mutations_are_reproducible(tiny_blobs) -> None:
    a = [w for w, _ in mutations(tiny_blobs["bpe"], 30, SEED)]
    assert a == [w for w, _ in mutations(tiny_blobs["bpe"], 30, SEED)]


def test_harness_reports_hangs_and_stray_exceptions(tmp_path) -> None:
    def target(path: Path) -> None:
        kind = path.read_bytes()
        if kind == b"hang":
            time.sleep(5)
        elif kind == b"bug":
            raise KeyError("oops")
        elif kind == b"big":
            np.ones(CASE_ALLOC // 4, np.float64)
        else:
            raise ModelFileError("no file name here")

    cases = [("sleeps", b"hang"), ("raises KeyError", b"bug"), ("allocates", b"big"), ("vague", b"x")]
    with pytest.raises(AssertionError) as info:
        run_cases(target, cases, tmp_path, message_names_file=True, seconds=0.2)
    report = str(info.value)
    assert "4 of 4 cases misbehaved" in report
    for expected in (
        "#0 sleeps: no result within 0.2 s",
        "#1 raises KeyError: KeyError",
        "#2 allocates: allocated",
        "#3 vague: message does not name the file",
    ):
        assert expected in report, report


def test_fuzz_gguf_reader(tiny_blobs, tmp_path) -> None:
    cases = _all_cases(tiny_blobs, 250)
    outcomes = run_cases(_open_gguf_target, cases, tmp_path, message_names_file=True)
    assert outcomes["loaded"] > 10 and outcomes[ModelFileError.__name__] > 100, outcomes


def test_fuzz_load_model(tiny_blobs, tmp_path) -> None:
    for blob in tiny_blobs.values():  # the undamaged files load (and any JIT compiling happens here)
        path = tmp_path / "good.gguf"
        path.write_bytes(blob)
        _load_model_target(path)
    cases = _all_cases(tiny_blobs, 250)
    outcomes = run_cases(_load_model_target, cases, tmp_path, message_names_file=False)
    assert outcomes["loaded"] > 10 and sum(outcomes.values()) - outcomes["loaded"] > 100, outcomes
