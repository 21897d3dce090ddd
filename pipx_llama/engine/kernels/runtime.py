"""Threads for the fused forward pass: atomics, waiting, and work sharing without barriers.

numba's ``prange`` ends every parallel region with a barrier that waits for every thread of the
team. On a machine whose cores are busy with other work, a thread the OS has not scheduled holds
the whole region up for a time slice (milliseconds), and the OpenMP threads that spin while they
wait make it worse: measured on a shared 2-core machine, 2 threads ran 7-17x slower than 1.
numba's ``workqueue`` layer costs ~80 us per region and OpenMP with ``OMP_WAIT_POLICY=PASSIVE``
~40 us, against ~3 us for spinning OpenMP on idle cores; a token of a small model has hundreds.

So the forward pass shares work itself. Every thread (the caller, and ``threads - 1`` workers)
walks the same sequence of stages. A stage is a number of items; a thread takes the next item by
compare-and-swap on the stage's counter, and when none is left waits until every taken item is
done. Nobody waits for a thread that has not started: a late worker finds the items of past stages
gone and catches up; the caller alone can do every item. The only wait on another thread is for
an item it is computing. Counters carry the evaluation's number in their high 32 bits, so a worker
still walking an earlier evaluation can never take (or count) an item of the current one.

Waiting spins briefly (``pause``), then yields the CPU (``sched_yield``), so a waiting thread gives
its core to whoever needs it.

What waiting calls differs by platform (``PLATFORM_CALLS``): the CPU's spin-loop hint (x86 ``pause``,
ARM ``yield``, none elsewhere), the call that gives the core away (``sched_yield``; Windows has
``SwitchToThread``) and the monotonic clock (``clock_gettime`` with the platform's own
``CLOCK_MONOTONIC``, 1 on Linux but 6 on macOS; Windows has ``GetTickCount64``, whose milliseconds
are enough to tell a 20 ms idle wait). An x86 intrinsic in code compiled on Apple Silicon stops the
process ("LLVM ERROR: Cannot select: intrinsic %llvm.x86.sse2.pause").
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)

# layout of the int64 control array: 128 bytes (16 int64) per counter, so that no two counters share a
# cache line: Apple's M-series cores have 128-byte lines, and x86 cores fetch 64-byte lines in pairs
LINE = 16
CTL_JOB = 0  # evaluation number the caller has published
CTL_STOP = 1  # workers leave when set
CTL_ACTIVE = 2  # workers currently inside an evaluation (for tests/diagnostics)
CTL_STAGES = 3  # first stage line; stage s uses lines CTL_STAGES + 2s (taken) and + 2s + 1 (done)

SPIN = 2000  # pause iterations before yielding (a few microseconds)

# the CPU's spin-loop hint, per ``platform.machine()``: (LLVM intrinsic, its i32 arguments)
SPIN_HINTS = {
    "x86_64": ("llvm.x86.sse2.pause", ()),
    "amd64": ("llvm.x86.sse2.pause", ()),
    "aarch64": ("llvm.aarch64.hint", (1,)),  # HINT #1 is YIELD
    "arm64": ("llvm.aarch64.hint", (1,)),
}


@dataclass(frozen=True)
class PlatformCalls:
    """What the waiting loops call on one platform."""

    spin_hint: tuple[str, tuple[int, ...]] | None  # (intrinsic, i32 arguments); None: no hint
    yield_fn: str  # int32 (void): give the core to another runnable thread
    clock_fn: str  # "clock_gettime" (int32 (clock id, timespec *)) or "GetTickCount64" (uint64 (void), ms)
    clock_id: int  # CLOCK_MONOTONIC for clock_gettime


def platform_calls(machine: str, system: str, clock_id: int) -> PlatformCalls:
    """The calls for ``machine`` (``platform.machine()``) and ``system`` (``sys.platform``)."""
    hint = SPIN_HINTS.get(machine.lower())
    if system == "win32":
        return PlatformCalls(hint, "SwitchToThread", "GetTickCount64", 0)
    return PlatformCalls(hint, "sched_yield", "clock_gettime", clock_id)


PLATFORM_CALLS = platform_calls(platform.machine(), sys.platform, getattr(time, "CLOCK_MONOTONIC", 1))


def _register_windows_symbols() -> None:
    """kernel32's functions by address, so that the JIT resolves them whatever it searches."""
    import ctypes

    import llvmlite.binding as llvm

    kernel32 = ctypes.WinDLL("kernel32")
    for name in (PLATFORM_CALLS.yield_fn, PLATFORM_CALLS.clock_fn):
        llvm.add_symbol(name, ctypes.cast(getattr(kernel32, name), ctypes.c_void_p).value)


if sys.platform == "win32":
    _register_windows_symbols()


def emit_spin_hint(builder: ir.IRBuilder, calls: PlatformCalls) -> None:
    if calls.spin_hint is None:
        return
    name, args = calls.spin_hint
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_I32] * len(args)),
                                        name)
    builder.call(fn, [_I32(a) for a in args])


def emit_yield(builder: ir.IRBuilder, calls: PlatformCalls) -> None:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, []), calls.yield_fn)
    builder.call(fn, [])


def emit_monotonic_ns(builder: ir.IRBuilder, calls: PlatformCalls) -> ir.Value:
    """An i64 of monotonic nanoseconds (milliseconds' resolution on Windows)."""
    if calls.clock_fn == "GetTickCount64":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []), calls.clock_fn)
        return builder.mul(builder.call(fn, []), _I64(1_000_000))
    ts_ty = ir.LiteralStructType([_I64, _I64])  # struct timespec of a 64-bit platform
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_I32, ts_ty.as_pointer()]),
                                        calls.clock_fn)
    ts = cgutils.alloca_once(builder, ts_ty)
    builder.call(fn, [_I32(calls.clock_id), ts])
    sec = builder.load(builder.gep(ts, [_I32(0), _I32(0)]))
    nsec = builder.load(builder.gep(ts, [_I32(0), _I32(1)]))
    return builder.add(builder.mul(sec, _I64(1_000_000_000)), nsec)


@intrinsic
def atomic_load(typingctx, arr, idx):
    """arr[idx] with acquire ordering (int64 array)."""

    def codegen(context, builder, sig, args):
        a, i = args
        ary = context.make_array(sig.args[0])(context, builder, a)
        return builder.load_atomic(builder.gep(ary.data, [i]), "acquire", 8)

    return types.int64(arr, types.int64), codegen


@intrinsic
def atomic_store(typingctx, arr, idx, val):
    """arr[idx] = val with release ordering (int64 array)."""

    def codegen(context, builder, sig, args):
        a, i, v = args
        ary = context.make_array(sig.args[0])(context, builder, a)
        builder.store_atomic(v, builder.gep(ary.data, [i]), "release", 8)
        return context.get_dummy_value()

    return types.void(arr, types.int64, types.int64), codegen


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """arr[idx] += val atomically; returns the old value (int64 array)."""

    def codegen(context, builder, sig, args):
        a, i, v = args
        ary = context.make_array(sig.args[0])(context, builder, a)
        return builder.atomic_rmw("add", builder.gep(ary.data, [i]), v, "seq_cst")

    return types.int64(arr, types.int64, types.int64), codegen


@intrinsic
def atomic_cas(typingctx, arr, idx, expected, new):
    """If arr[idx] == expected, set it to new; returns whether it did (int64 array)."""

    def codegen(context, builder, sig, args):
        a, i, e, n = args
        ary = context.make_array(sig.args[0])(context, builder, a)
        res = builder.cmpxchg(builder.gep(ary.data, [i]), e, n, "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return types.boolean(arr, types.int64, types.int64, types.int64), codegen


@intrinsic
def cpu_pause(typingctx):
    """The CPU's spin-loop hint (x86 ``pause``, ARM ``yield``): tells the core this is a spin loop."""

    def codegen(context, builder, sig, args):
        emit_spin_hint(builder, PLATFORM_CALLS)
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def sched_yield(typingctx):
    """Give the CPU to another runnable thread, if any (``sched_yield``; ``SwitchToThread`` on Windows)."""

    def codegen(context, builder, sig, args):
        emit_yield(builder, PLATFORM_CALLS)
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def monotonic_ns(typingctx):
    """A monotonic clock in nanoseconds."""

    def codegen(context, builder, sig, args):
        return emit_monotonic_ns(builder, PLATFORM_CALLS)

    return types.int64(), codegen


@njit(cache=True, nogil=True, _nrt=False)
def backoff(spins: int) -> int:
    """One step of waiting: pause while ``spins`` is small, then yield. Returns spins + 1."""
    if spins < SPIN:
        cpu_pause()
    else:
        sched_yield()
    return spins + 1


@njit(cache=True, nogil=True, _nrt=False)
def take(ctl: np.ndarray, stage: int, tag: int, n_items: int) -> int:
    """The next item of ``stage`` for evaluation ``tag``: 0..n_items-1, n_items when none is left,
    or -1 when the evaluation is no longer current."""
    line = (CTL_STAGES + 2 * stage) * LINE
    while True:
        v = atomic_load(ctl, line)
        if (v >> 32) != tag:
            return -1
        i = v & 0xFFFFFFFF
        if i >= n_items:
            return n_items
        if atomic_cas(ctl, line, v, v + 1):
            return i


@njit(cache=True, nogil=True, _nrt=False)
def done(ctl: np.ndarray, stage: int, n: int) -> None:
    """Count ``n`` items of ``stage`` as finished (only items this thread took)."""
    if n > 0:
        atomic_add(ctl, (CTL_STAGES + 2 * stage + 1) * LINE, n)


@njit(cache=True, nogil=True, _nrt=False)
def wait_stage(ctl: np.ndarray, stage: int, tag: int, n_items: int) -> bool:
    """Wait until all items of ``stage`` are done; False when the evaluation is no longer current."""
    line = (CTL_STAGES + 2 * stage + 1) * LINE
    spins = 0
    while True:
        v = atomic_load(ctl, line)
        if (v >> 32) != tag:
            return False
        if (v & 0xFFFFFFFF) >= n_items:
            return True
        spins = backoff(spins)


@njit(cache=True, nogil=True)
def publish(ctl: np.ndarray, n_stages: int, tag: int) -> None:
    """Arm the counters of ``n_stages`` stages for evaluation ``tag``, then announce it to the workers."""
    for s in range(n_stages):
        atomic_store(ctl, (CTL_STAGES + 2 * s) * LINE, tag << 32)
        atomic_store(ctl, (CTL_STAGES + 2 * s + 1) * LINE, tag << 32)
    atomic_store(ctl, CTL_JOB * LINE, tag)


@njit(cache=True, nogil=True)
def store(ctl: np.ndarray, idx: int, value: int) -> None:
    """ctl[idx] = value with release ordering, from Python."""
    atomic_store(ctl, idx, value)


def control_array(n_stages: int) -> np.ndarray:
    return np.zeros((CTL_STAGES + 2 * n_stages) * LINE, np.int64)
