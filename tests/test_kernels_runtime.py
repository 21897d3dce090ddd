"""The fused pass's waiting calls: the right ones for each platform, and they compile for its CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from numba import njit

from pipx_llama.engine.kernels import runtime


@njit(cache=False)
def _clock() -> int:
    return runtime.monotonic_ns()


@njit(cache=False)
def _wait_a_little() -> int:
    spins = 0
    for _ in range(runtime.SPIN + 10):  # both kinds of waiting: the spin hint, then yielding
        spins = runtime.backoff(spins)
    return spins


def test_the_compiled_clock_measures_time() -> None:
    t0 = _clock()
    time.sleep(0.1)
    elapsed = _clock() - t0
    assert 0.05e9 <= elapsed <= 5e9, elapsed


def test_waiting_runs_here() -> None:
    assert _wait_a_little() == runtime.SPIN + 10


def test_calls_per_platform() -> None:
    linux = runtime.platform_calls("x86_64", "linux", 1)
    assert linux.spin_hint == ("llvm.x86.sse2.pause", ())
    assert (linux.yield_fn, linux.clock_fn, linux.clock_id) == ("sched_yield", "clock_gettime", 1)
    mac = runtime.platform_calls("arm64", "darwin", 6)
    assert mac.spin_hint == ("llvm.aarch64.hint", (1,))
    assert (mac.yield_fn, mac.clock_fn, mac.clock_id) == ("sched_yield", "clock_gettime", 6)
    win = runtime.platform_calls("AMD64", "win32", 0)
    assert win.spin_hint == ("llvm.x86.sse2.pause", ())
    assert (win.yield_fn, win.clock_fn) == ("SwitchToThread", "GetTickCount64")
    assert runtime.platform_calls("riscv64", "linux", 1).spin_hint is None
    here = runtime.PLATFORM_CALLS
    assert here.clock_id == getattr(time, "CLOCK_MONOTONIC", here.clock_id)


# Emits the waiting calls of each platform into a function and compiles it for that platform's CPU with
# LLVM, as numba does there. In a child process: LLVM stops the process on an intrinsic the CPU lacks.
_CROSS = textwrap.dedent("""
    import json, sys
    import llvmlite.binding as llvm
    from llvmlite import ir
    from pipx_llama.engine.kernels import runtime

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    out = {}
    for key, machine, system, clock_id, triple, cpu in json.loads(sys.argv[1]):
        calls = runtime.platform_calls(machine, system, clock_id)
        module = ir.Module(name=key)
        module.triple = triple
        fn = ir.Function(module, ir.FunctionType(ir.IntType(64), []), name="wait_once")
        builder = ir.IRBuilder(fn.append_basic_block())
        runtime.emit_spin_hint(builder, calls)
        runtime.emit_yield(builder, calls)
        builder.ret(runtime.emit_monotonic_ns(builder, calls))
        parsed = llvm.parse_assembly(str(module))
        parsed.verify()
        machine_code = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, opt=2)
        out[key] = machine_code.emit_assembly(parsed)
    print(json.dumps(out))
""")

_TARGETS = [
    ("linux-x86", "x86_64", "linux", 1, "x86_64-unknown-linux-gnu", "x86-64"),
    ("macos-arm", "arm64", "darwin", 6, "arm64-apple-macosx11.0.0", "apple-m1"),
    ("linux-arm", "aarch64", "linux", 1, "aarch64-unknown-linux-gnu", "neoverse-n1"),
    ("windows-x86", "AMD64", "win32", 0, "x86_64-pc-windows-msvc", "x86-64"),
    ("linux-other", "riscv64", "linux", 1, "x86_64-unknown-linux-gnu", "x86-64"),
]


def test_waiting_compiles_for_every_platforms_cpu() -> None:
    proc = subprocess.run([sys.executable, "-c", _CROSS, json.dumps(_TARGETS)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    asm = json.loads(proc.stdout)
    assert "pause" in asm["linux-x86"] and "sched_yield" in asm["linux-x86"]
    assert "clock_gettime" in asm["linux-x86"]
    for key in ("macos-arm", "linux-arm"):
        lines = [line.split("//")[0].split() for line in asm[key].splitlines()]
        assert ["yield"] in lines, asm[key]
        assert "pause" not in asm[key]
        assert "sched_yield" in asm[key] and "clock_gettime" in asm[key]
    assert "#6" in asm["macos-arm"]  # macOS's CLOCK_MONOTONIC
    win = asm["windows-x86"]
    assert "pause" in win and "SwitchToThread" in win and "GetTickCount64" in win
    assert "sched_yield" not in win and "clock_gettime" not in win
    assert "pause" not in asm["linux-other"] and "sched_yield" in asm["linux-other"]
