"""What this machine has: OS, CPU model and SIMD features, cores, RAM, free disk where the store lives.

The one place that asks: the CPU numba compiles for (``compile_target``, which the engine's kernels
choose their SIMD code and fp16 conversion from), the default thread count (``default_threads``,
container-aware: the process's CPU affinity and a cgroup CPU quota), RAM and disk.

``detect_hardware(store_path)`` returns a ``HardwareProfile``. Every probe has fallbacks, and a probe
that fails leaves its field at a safe default instead of raising:

- Linux: ``/proc/cpuinfo`` (model name, flags / Features, physical cores from core ids),
  ``/proc/meminfo`` (MemTotal, MemAvailable), cgroup limits (memory.max, cpu.max) in containers;
- macOS: ``sysctl`` (machdep.cpu.brand_string, hw.physicalcpu, hw.optional.arm64 / neon / avx2_0 ...,
  hw.memsize) and ``vm_stat`` for the memory available now;
- Windows: the registry for the CPU name, ``IsProcessorFeaturePresent`` and ``GlobalMemoryStatusEx``
  (no wmic, which new Windows releases lack);
- everywhere: psutil for RAM and cores where it is installed, and LLVM's own view of the host CPU
  (through llvmlite, which numba uses to compile the kernels) for SIMD features nothing else reported.

Free disk is measured with ``shutil.disk_usage`` on the store folder, or its nearest existing parent.

Test and what-if overrides (environment): ``PIPX_LLAMA_FAKE_RAM`` (bytes, or a size: ``512M``,
``8G``, ``16GiB``; see :mod:`pipx_llama.units`) pretends the machine has that much RAM, all of it
available; ``PIPX_LLAMA_FREE_BYTES`` pretends the disk has that many bytes free (every disk check
honours it: the planner's, the store's, the converter's and the quantizer's).

Also the resource arithmetic the planner uses: the f16 KV cache size, the RAM a model needs to run,
and whether that fits comfortably.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipx_llama.units import parse_size

FAKE_RAM_ENV = "PIPX_LLAMA_FAKE_RAM"
FREE_BYTES_ENV = "PIPX_LLAMA_FREE_BYTES"  # testing hook: pretend the store's disk has this many free bytes
# Where a Linux container's cgroup limits are read (a variable so tests can point it at a fake tree).
CGROUP_ROOT = "/sys/fs/cgroup"

# Runtime memory besides the weights and the KV cache: Python, numpy/numba, scratch buffers, logits.
RUNTIME_OVERHEAD = 300 << 20
# "Fits comfortably": the model may use at most this share of the memory available now.
RAM_HEADROOM = 0.9

# SIMD features worth reporting, in display order (names as /proc/cpuinfo and LLVM spell them).
SIMD_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                 "avx_vnni", "neon", "dotprod", "fp16", "sve")
_LINUX_ARM_FLAGS = {"asimd": "neon", "neon": "neon", "asimddp": "dotprod", "asimdhp": "fp16", "sve": "sve"}
_LLVM_NAMES = {"sse4.2": "sse4_2", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "fullfp16": "fp16"}
_MAC_KEYS = {
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx1_0": "avx",
    "hw.optional.fma": "fma",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.avx512bw": "avx512bw",
    "hw.optional.avx512vl": "avx512vl",
    "hw.optional.sse4_2": "sse4_2",
    "hw.optional.neon": "neon",
    "hw.optional.arm64": "neon",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.neon_fp16": "fp16",
}
_MAC_CPU_FEATURES = {"fma": "fma", "f16c": "f16c", "avx1.0": "avx", "avx2": "avx2", "avx512f": "avx512f",
                     "avx512bw": "avx512bw", "avx512vl": "avx512vl", "sse4.2": "sse4_2"}
# IsProcessorFeaturePresent ids (winnt.h)
_WIN_FEATURES = {39: "avx", 40: "avx2", 41: "avx512f", 19: "neon", 43: "dotprod"}


@dataclass(frozen=True)
class HardwareProfile:
    """The machine as the planner sees it. Sizes are bytes; ``notes`` say where a figure came from when it
    is not the plain OS figure (a container limit, an override)."""

    os: str
    os_version: str
    arch: str
    cpu_model: str
    physical_cores: int
    logical_cores: int
    simd: tuple[str, ...]
    ram_total: int
    ram_available: int
    store_path: Path
    disk_free: int
    usable_cores: int = 0
    notes: tuple[str, ...] = ()

    @property
    def threads(self) -> int:
        """The default thread count: physical cores, within what this process may use."""
        return threads_for(self.physical_cores, self.usable_cores or self.logical_cores)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["store_path"] = str(self.store_path)
        out["simd"] = list(self.simd)
        out["notes"] = list(self.notes)
        out["threads"] = self.threads
        return out


# --- parsing helpers (pure; tested with recorded outputs) ---------------------------------------------------


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model name, SIMD features and physical core count from Linux's ``/proc/cpuinfo``."""
    model = ""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    phys, core = "0", None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not key:
            if core is not None:
                cores.add((phys, core))
            phys, core = "0", None
            continue
        if key in ("model name", "hardware", "cpu model") and value and not model:
            model = value
        elif key == "flags":
            flags |= set(value.split())
        elif key == "features":  # ARM
            flags |= {_LINUX_ARM_FLAGS[f] for f in value.split() if f in _LINUX_ARM_FLAGS}
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
    if "avx512vnni" in flags:
        flags.add("avx512_vnni")
    if "avx_vnni" in flags or "avxvnni" in flags:
        flags.add("avx_vnni")
    return {"model": model, "simd": tuple(f for f in SIMD_FEATURES if f in flags),
            "physical_cores": len(cores) or None}


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """(total, available) bytes from ``/proc/meminfo``; old kernels without MemAvailable: free + caches."""
    kb: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            kb[key.strip()] = int(parts[0]) * 1024
    total = kb.get("MemTotal")
    avail = kb.get("MemAvailable")
    if avail is None and "MemFree" in kb:
        avail = kb["MemFree"] + kb.get("Buffers", 0) + kb.get("Cached", 0)
    return total, avail


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl key1 key2 ...`` output (``key: value`` lines) as a dict."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_vm_stat(text: str) -> int | None:
    """Memory available now from macOS ``vm_stat``: free + inactive + speculative + purgeable pages."""
    m = re.search(r"page size of (\d+) bytes", text)
    page = int(m.group(1)) if m else 4096
    pages: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip().rstrip(".")
        if value.isdigit():
            pages[key.strip().lower()] = int(value)
    if "pages free" not in pages:
        return None
    keep = ("pages free", "pages inactive", "pages speculative", "pages purgeable")
    return page * sum(pages.get(k, 0) for k in keep)


def parse_cgroup_memory(limit_text: str | None, usage_text: str | None) -> tuple[int | None, int | None]:
    """(limit, usage) from cgroup files; "max" or an absurd v1 value means no limit."""
    limit = usage = None
    if limit_text is not None:
        v = limit_text.strip()
        if v.isdigit() and int(v) < (1 << 60):
            limit = int(v)
    if usage_text is not None and usage_text.strip().isdigit():
        usage = int(usage_text.strip())
    return limit, usage


def parse_cgroup_cpus(text: str | None) -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` quota ("200000 100000" -> 2), None when unlimited."""
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2:
        return None
    return _quota_cpus(parts[0], parts[1])


def parse_cgroup_v1_cpus(quota_text: str | None, period_text: str | None) -> int | None:
    """CPUs allowed by cgroup v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: unlimited)."""
    if not quota_text or not period_text:
        return None
    return _quota_cpus(quota_text.strip(), period_text.strip())


def _quota_cpus(quota: str, period: str) -> int | None:
    if not quota.isdigit() or not period.isdigit() or not int(period) or not int(quota):
        return None  # "max", "-1" or garbage: no quota
    return max(1, -(-int(quota) // int(period)))


# --- probes -------------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _run(cmd: list[str]) -> str:
    """A probe command's stdout ('' when it is missing, fails to start or hangs)."""
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout


def _psutil() -> Any:
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@dataclass(frozen=True)
class CpuTarget:
    """The CPU numba compiles for: LLVM's name for it and its features (LLVM's spelling, e.g. "avx2")."""

    name: str
    features: Mapping[str, bool]

    def has(self, *names: str) -> bool:
        return all(self.features.get(n, False) for n in names)


def compile_target() -> CpuTarget:
    """The one CPU-feature probe: what numba compiles for. That is the host as LLVM sees it, or the CPU named
    by ``NUMBA_CPU_NAME`` with the features ``NUMBA_CPU_FEATURES`` lists (only those count, as numba
    compiles for exactly those) -- or, when that is unset, with the host's features, which numba then
    uses under the name (``NUMBA_CPU_NAME=haswell`` alone on an AVX-512 machine still compiles AVX-512
    code; taking it for "no features" sent the engine to its portable kernels, a 7B-shaped Q4_K_M at
    0.45x llama.cpp)."""
    import numba
    from llvmlite import binding as llvm_binding

    name = numba.config.CPU_NAME
    host = dict(llvm_binding.get_host_cpu_features())
    if name and name != "host":
        listed = numba.config.CPU_FEATURES
        if listed is None:
            return CpuTarget(str(name), host)
        return CpuTarget(str(name), {f[1:]: f[0] == "+" for f in listed.split(",") if f})
    return CpuTarget(llvm_binding.get_host_cpu_name(), host)


def host_is_amd() -> bool:
    """Whether this machine's CPU is AMD's (it has SSE4a, which no other x86 CPU has), whatever CPU numba is
    told to compile for: hardware behaviour such as its prefetchers' belongs to the host."""
    if not is_x86():
        return False
    from llvmlite import binding as llvm_binding

    return bool(dict(llvm_binding.get_host_cpu_features()).get("sse4a", False))


def target_features() -> dict[str, bool]:
    """``compile_target().features`` as a plain dict."""
    return dict(compile_target().features)


def target_has_f16c() -> bool:
    """Whether numba compiles for an x86 CPU with F16C (one instruction for fp16 <-> float32).

    LLVM lowers a ``half`` -> ``float`` extension to that instruction with F16C, but to a runtime
    library call without it, which numba's JIT cannot resolve (the process crashes).
    """
    return is_x86() and compile_target().has("f16c")


def llvm_simd() -> tuple[str, ...]:
    """The SIMD features of the CPU numba compiles for; () when llvmlite is unavailable."""
    try:
        features = compile_target().features
    except Exception:  # noqa: BLE001 - any failure here only means "no extra information"
        return ()
    names = {_LLVM_NAMES.get(k, k) for k, on in features.items() if on}
    if "neon" in names or platform.machine().lower() in ("arm64", "aarch64"):
        names.add("neon")
    return tuple(f for f in SIMD_FEATURES if f in names)


def _linux(info: dict[str, Any]) -> None:
    cpu = parse_cpuinfo(_read("/proc/cpuinfo") or "")
    info["cpu_model"] = cpu["model"]
    info["simd"] = cpu["simd"]
    info["physical_cores"] = cpu["physical_cores"]
    total, avail = parse_meminfo(_read("/proc/meminfo") or "")
    info["ram_total"], info["ram_available"] = total, avail
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            info["os_version"] = f"{line.split('=', 1)[1].strip(chr(34))} (kernel {platform.release()})"
    # containers: the cgroup's limits are what this process really gets
    root = CGROUP_ROOT
    limit, usage = parse_cgroup_memory(_read(f"{root}/memory.max"), _read(f"{root}/memory.current"))
    if limit is None:
        limit, usage = parse_cgroup_memory(_read(f"{root}/memory/memory.limit_in_bytes"),
                                           _read(f"{root}/memory/memory.usage_in_bytes"))
    info["cgroup_memory"] = (limit, usage)
    info["cgroup_cpus"] = cgroup_cpus()


def _macos(info: dict[str, Any], run: Callable[[list[str]], str]) -> None:
    keys = ["machdep.cpu.brand_string", "hw.physicalcpu", "hw.logicalcpu", "hw.memsize", *_MAC_KEYS]
    values = parse_sysctl(run(["sysctl", *keys]))
    info["cpu_model"] = values.get("machdep.cpu.brand_string", "")
    for key, field in (("hw.physicalcpu", "physical_cores"), ("hw.logicalcpu", "logical_cores"),
                       ("hw.memsize", "ram_total")):
        if values.get(key, "").isdigit():
            info[field] = int(values[key])
    simd = {name for key, name in _MAC_KEYS.items() if values.get(key) == "1"}
    features = (
        (run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"]) or "").lower().split()
    )
    simd |= {_MAC_CPU_FEATURES[f] for f in features if f in _MAC_CPU_FEATURES}
    info["simd"] = tuple(f for f in SIMD_FEATURES if f in simd)
    info["ram_available"] = parse_vm_stat(run(["vm_stat"]))
    info["os_version"] = platform.mac_ver()[0] or platform.release()


def _windows(info: dict[str, Any]) -> None:  # pragma: no cover - exercised on Windows only
    import ctypes

    with contextlib.suppress(OSError, ImportError):
        import winreg

        key = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0")
        info["cpu_model"] = str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip()
    with contextlib.suppress(OSError, AttributeError):
        present = ctypes.windll.kernel32.IsProcessorFeaturePresent
        found = {name for pf, name in _WIN_FEATURES.items() if present(pf)}
        if "avx2" in found:
            found |= {"fma", "f16c"}  # every AVX2 CPU Windows runs on has them; Windows has no flag for them
        info["simd"] = tuple(f for f in SIMD_FEATURES if f in found)

    class _MemStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    with contextlib.suppress(OSError, AttributeError):
        st = _MemStatus()
        st.dwLength = ctypes.sizeof(_MemStatus)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):
            info["ram_total"], info["ram_available"] = int(st.ullTotalPhys), int(st.ullAvailPhys)
    info["os_version"] = platform.version()


def cgroup_cpus() -> int | None:
    """The CPUs a Linux container's cgroup CPU quota allows (v2 ``cpu.max``, else v1 CFS), None if none."""
    root = CGROUP_ROOT
    v2 = parse_cgroup_cpus(_read(f"{root}/cpu.max"))
    if v2 is not None:
        return v2
    for folder in ("cpu", "cpu,cpuacct"):
        v1 = parse_cgroup_v1_cpus(_read(f"{root}/{folder}/cpu.cfs_quota_us"),
                                  _read(f"{root}/{folder}/cpu.cfs_period_us"))
        if v1 is not None:
            return v1
    return None


def _affinity_cpus() -> int:
    """The logical CPUs this process may run on (its affinity mask where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_cores() -> int:
    """The logical CPUs this process may use: its affinity, lowered by a container's CPU quota."""
    usable = _affinity_cpus()
    quota = cgroup_cpus() if platform.system() == "Linux" else None
    return min(usable, quota) if quota else usable


def performance_cores(read: Callable[[str], int | None] | None = None) -> int | None:
    """The performance cores of a CPU that has two kinds, or None where the cores are alike or the OS does not
    say: Apple Silicon's ``hw.perflevel0.physicalcpu`` (where ``hw.nperflevels`` > 1), an Intel hybrid CPU's
    on Linux (``linux_performance_cores``) and on Windows (``windows_performance_cores``). A thread on an
    efficiency core runs its share of every stage slower, and the others wait for it; llama.cpp counts the
    same cores on Linux and macOS (on Windows it takes every core)."""
    if read is None:
        system = platform.system()
        if system == "Linux":
            return linux_performance_cores()
        if system == "Windows":
            return windows_performance_cores()
        if system != "Darwin":
            return None
        values = parse_sysctl(_run(["sysctl", "hw.nperflevels", "hw.perflevel0.physicalcpu"]))

        def read(name: str) -> int | None:
            text = values.get(name, "")
            return int(text) if text.isdigit() else None
    levels = read("hw.nperflevels")
    if not levels or levels < 2:
        return None
    n = read("hw.perflevel0.physicalcpu")
    return n if n and n > 0 else None


def parse_cpu_list(text: str) -> list[int]:
    """A sysfs CPU list ("0-3,8,10-11") as the CPU numbers."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def linux_performance_cores(root: str = "/sys/devices") -> int | None:
    """The physical cores of a hybrid CPU's performance kind: Linux lists an Intel hybrid's under the
    ``cpu_core`` PMU when a ``cpu_atom`` one (the efficiency cores) is beside it, SMT siblings sharing a
    core id; an ARM big.LITTLE's big cores have the highest ``cpu_capacity``. None on a CPU with one kind
    of core."""
    core, atom = _read(f"{root}/cpu_core/cpus"), _read(f"{root}/cpu_atom/cpus")
    if not core or not atom or not atom.strip():
        return _big_cores(root)
    try:
        cpus = parse_cpu_list(core)
    except ValueError:
        return None
    physical = set()
    for n in cpus:
        topo = f"{root}/system/cpu/cpu{n}/topology"
        package, core_id = _read(f"{topo}/physical_package_id"), _read(f"{topo}/core_id")
        physical.add((package or "").strip() + ":" + (core_id.strip() if core_id else f"cpu{n}"))
    return len(physical) or None


def _big_cores(root: str) -> int | None:
    """The CPUs of the highest ``cpu_capacity`` (ARM big.LITTLE, where the kernel rates its cores), or None
    when every CPU has the same or none says."""
    folder = Path(root) / "system" / "cpu"
    capacities = []
    for cpu in folder.glob("cpu[0-9]*"):
        text = _read(str(cpu / "cpu_capacity"))
        if text is None or not text.strip().isdigit():
            return None
        capacities.append(int(text))
    if len(set(capacities)) < 2:
        return None
    return capacities.count(max(capacities))


def parse_processor_cores(buf: bytes) -> int | None:
    """The cores of the highest efficiency class in the records of Windows'
    ``GetLogicalProcessorInformationEx(RelationProcessorCore)``, or None when every core has the same class.
    A record: Relationship (u32), Size (u32), then PROCESSOR_RELATIONSHIP: Flags (u8), EfficiencyClass (u8;
    higher is faster), ..."""
    classes = []
    off = 0
    while off + 10 <= len(buf):
        relationship = int.from_bytes(buf[off : off + 4], "little")
        size = int.from_bytes(buf[off + 4 : off + 8], "little")
        if size < 10:
            return None
        if relationship == 0:  # RelationProcessorCore
            classes.append(buf[off + 9])
        off += size
    if len(set(classes)) < 2:
        return None
    return classes.count(max(classes))


def windows_performance_cores() -> int | None:  # pragma: no cover - Windows only
    """An Intel hybrid CPU's performance cores on Windows (those of the highest EfficiencyClass), or None."""
    import ctypes

    try:
        kernel32 = ctypes.WinDLL("kernel32")
        size = ctypes.c_uint32(0)
        kernel32.GetLogicalProcessorInformationEx(0, None, ctypes.byref(size))
        if not size.value:
            return None
        buf = ctypes.create_string_buffer(size.value)
        if not kernel32.GetLogicalProcessorInformationEx(0, buf, ctypes.byref(size)):
            return None
        return parse_processor_cores(buf.raw[: size.value])
    except (OSError, AttributeError, ValueError):
        return None


@functools.cache
def detected_performance_cores() -> int | None:
    """``performance_cores()`` of this machine, read once."""
    return performance_cores()


def physical_cores() -> int:
    """Physical cores where they can be counted (psutil, /proc/cpuinfo), else half the logical ones; on a
    CPU with two kinds of cores, its performance cores."""
    perf = detected_performance_cores()
    if perf:
        return perf
    ps = _psutil()
    if ps is not None:
        with contextlib.suppress(Exception):
            n = ps.cpu_count(logical=False)
            if n:
                return int(n)
    counted = parse_cpuinfo(_read("/proc/cpuinfo") or "")["physical_cores"]
    return counted or max(1, (os.cpu_count() or 2) // 2)


def threads_for(physical: int, usable: int) -> int:
    """The default thread count: one per physical core (SMT siblings share the vector units), within
    what the process may use."""
    return max(1, min(physical, usable))


@functools.cache
def default_threads() -> int:
    """The default thread count of this process (the engine's and the quantizer's; ``doctor`` shows it)."""
    return threads_for(physical_cores(), usable_cores())


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (the store may not exist yet)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def disk_free(path: Path, env: Mapping[str, str] | None = None) -> int:
    """Free bytes on the disk that holds (or will hold) ``path``; ``PIPX_LLAMA_FREE_BYTES`` overrides."""
    env = os.environ if env is None else env
    override = env.get(FREE_BYTES_ENV)
    if override:
        return parse_size(override, FREE_BYTES_ENV)
    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return 0


def detect_hardware(store_path: Path, *, env: Mapping[str, str] | None = None,
                    system: str | None = None, run: Callable[[list[str]], str] = _run) -> HardwareProfile:
    """Probe the machine (``system``/``run`` replace ``platform.system()`` and the command runner in
    tests)."""
    env = os.environ if env is None else env
    system = system or platform.system()
    notes: list[str] = []
    logical = os.cpu_count() or 1
    info: dict[str, Any] = {"cpu_model": "", "simd": (), "physical_cores": None, "logical_cores": logical,
                            "ram_total": None, "ram_available": None, "os_version": platform.release()}
    if system == "Linux":
        _linux(info)
    elif system == "Darwin":
        _macos(info, run)
    elif system == "Windows":  # pragma: no cover
        _windows(info)
    ps = _psutil()
    if ps is not None:
        with contextlib.suppress(Exception):
            vm = ps.virtual_memory()
            info["ram_total"] = info["ram_total"] or int(vm.total)
            info["ram_available"] = (
                int(vm.available) if info["ram_available"] is None else info["ram_available"]
            )
        with contextlib.suppress(Exception):
            info["physical_cores"] = info["physical_cores"] or ps.cpu_count(logical=False)
    if not info["simd"]:
        info["simd"] = llvm_simd()
    if not info["cpu_model"]:
        info["cpu_model"] = platform.processor() or platform.machine() or "unknown CPU"
    logical = int(info["logical_cores"] or logical)
    physical = int(info["physical_cores"] or max(1, logical // 2))
    usable = _affinity_cpus()
    cg_cpus = info.get("cgroup_cpus")
    if cg_cpus and cg_cpus < usable:
        usable = cg_cpus
        notes.append(f"CPU quota of the container: {cg_cpus} cores")
    total = int(info["ram_total"] or 0)
    avail = int(info["ram_available"] if info["ram_available"] is not None else total)
    limit, usage = info.get("cgroup_memory") or (None, None)
    if limit is not None and limit < total:
        total = limit
        avail = min(avail, max(0, limit - (usage or 0)))
        notes.append(f"memory limit of the container: {limit} bytes")
    fake = env.get(FAKE_RAM_ENV)
    if fake:
        total = avail = parse_size(fake, FAKE_RAM_ENV)
        notes.append(f"{FAKE_RAM_ENV}={fake}: RAM figures overridden")
    if env.get(FREE_BYTES_ENV):
        notes.append(f"{FREE_BYTES_ENV}={env[FREE_BYTES_ENV]}: free disk overridden")
    machine = platform.machine() or "unknown"
    return HardwareProfile(
        os={"Darwin": "macOS"}.get(system, system), os_version=str(info["os_version"] or ""),
        arch={"AMD64": "x86_64", "arm64": "aarch64"}.get(machine, machine),
        cpu_model=" ".join(str(info["cpu_model"]).split()), physical_cores=physical, logical_cores=logical,
        simd=tuple(info["simd"]), ram_total=total, ram_available=avail, store_path=Path(store_path),
        disk_free=disk_free(store_path, env), usable_cores=usable, notes=tuple(notes),
    )


# --- resource arithmetic ------------------------------------------------------------------------------------


def kv_cache_bytes(n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int,
                   cache_types: tuple[str, str] = ("f16", "f16")) -> int:
    """The engine's KV cache: keys and values (each f16, or q8_0: 34 bytes per 32), every layer, position."""
    per = sum(head_dim // 32 * 34 if t == "q8_0" else 2 * head_dim for t in cache_types)
    return n_layers * n_ctx * n_kv_heads * per


def ram_needed(weights_bytes: int, kv_bytes: int) -> int:
    """RAM to run a model: its GGUF (mmap'd, every page touched per token) + KV cache + runtime overhead."""
    return weights_bytes + kv_bytes + RUNTIME_OVERHEAD


def ram_budget(hw: HardwareProfile) -> int:
    """The most a model may use and still fit comfortably."""
    return int(hw.ram_available * RAM_HEADROOM)


def simd_summary(hw: HardwareProfile) -> str:
    """What the SIMD features mean for the engine's speed, in one line."""
    s = set(hw.simd)
    if "avx512f" in s and "avx2" in s:
        return "AVX-512 and AVX2: the kernels use the widest vectors available"
    if "avx2" in s and "fma" in s:
        return "AVX2 + FMA: the kernels are vectorized"
    if "neon" in s:
        return "NEON: the kernels are vectorized" + (
            " (with dot-product instructions)" if "dotprod" in s else ""
        )
    if "avx" in s:
        return "AVX without AVX2: the kernels run, about half as fast as on an AVX2 machine"
    return "no AVX2 or NEON detected: the kernels run, but expect slow generation"
