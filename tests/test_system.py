"""Hardware detection: parsers over recorded /proc, sysctl and vm_stat outputs, fallbacks, overrides, and
the resource arithmetic (the KV cache formula against the engine's real cache)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from pipx_llama import system
from pipx_llama.errors import UsageError
from pipx_llama.system import (
    RAM_HEADROOM,
    RUNTIME_OVERHEAD,
    HardwareProfile,
    detect_hardware,
    disk_free,
    kv_cache_bytes,
    nearest_existing,
    parse_cgroup_cpus,
    parse_cgroup_memory,
    parse_cpuinfo,
    parse_meminfo,
    parse_sysctl,
    parse_vm_stat,
    ram_budget,
    ram_needed,
    simd_summary,
)

X86_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu vme sse4_1 sse4_2 avx avx2 fma f16c bmi2

processor\t: 1
model name\t: Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu vme sse4_1 sse4_2 avx avx2 fma f16c bmi2

processor\t: 2
model name\t: Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu vme sse4_1 sse4_2 avx avx2 fma f16c bmi2

processor\t: 3
model name\t: Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu vme sse4_1 sse4_2 avx avx2 fma f16c bmi2
"""

ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0c

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
"""

MEMINFO = """\
MemTotal:       16303428 kB
MemFree:          734536 kB
MemAvailable:    9874212 kB
Buffers:          412312 kB
Cached:          8201448 kB
"""

VM_STAT = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               12000.
Pages active:                            400000.
Pages inactive:                          300000.
Pages speculative:                         5000.
Pages throttled:                              0.
Pages wired down:                        150000.
Pages purgeable:                           2000.
"""

SYSCTL_ARM = """\
machdep.cpu.brand_string: Apple M2
hw.physicalcpu: 8
hw.logicalcpu: 8
hw.memsize: 17179869184
hw.optional.arm64: 1
hw.optional.neon: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_FP16: 1
"""

SYSCTL_X86 = """\
machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz
hw.physicalcpu: 8
hw.logicalcpu: 16
hw.memsize: 34359738368
hw.optional.avx1_0: 1
hw.optional.avx2_0: 1
hw.optional.avx512f: 0
hw.optional.sse4_2: 1
"""


def test_parse_cpuinfo_x86_counts_physical_cores_and_flags():
    info = parse_cpuinfo(X86_CPUINFO)
    assert info["model"] == "Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz"
    assert info["physical_cores"] == 2  # 4 logical, 2 (physical id, core id) pairs
    assert info["simd"] == ("sse4_2", "avx", "avx2", "fma", "f16c")


def test_parse_cpuinfo_arm_maps_features():
    info = parse_cpuinfo(ARM_CPUINFO)
    assert set(info["simd"]) == {"neon", "dotprod", "fp16"}
    assert info["physical_cores"] is None  # no core ids: the caller falls back
    assert info["model"] == ""


def test_parse_meminfo_and_old_kernel_fallback():
    assert parse_meminfo(MEMINFO) == (16303428 * 1024, 9874212 * 1024)
    old = "\n".join(line for line in MEMINFO.splitlines() if not line.startswith("MemAvailable"))
    assert parse_meminfo(old) == (16303428 * 1024, (734536 + 412312 + 8201448) * 1024)
    assert parse_meminfo("") == (None, None)


def test_parse_vm_stat_and_sysctl():
    assert parse_vm_stat(VM_STAT) == 16384 * (12000 + 300000 + 5000 + 2000)
    assert parse_vm_stat("garbage") is None
    values = parse_sysctl(SYSCTL_ARM)
    assert values["machdep.cpu.brand_string"] == "Apple M2" and values["hw.memsize"] == "17179869184"


def test_parse_cgroup():
    assert parse_cgroup_memory("max\n", "123\n") == (None, 123)
    assert parse_cgroup_memory("9223372036854771712\n", None) == (None, None)  # cgroup v1 "unlimited"
    assert parse_cgroup_memory("4294967296\n", "1073741824\n") == (4 << 30, 1 << 30)
    assert parse_cgroup_cpus("max 100000") is None
    assert parse_cgroup_cpus("150000 100000") == 2
    assert parse_cgroup_cpus(None) is None


def _fake_run(outputs: dict[str, str]):
    def run(cmd: list[str]) -> str:
        return outputs.get(cmd[0] if cmd[0] != "sysctl" or cmd[1] != "-n" else "sysctl -n", "")
    return run


@pytest.mark.parametrize(("sysctl", "expect"), [
    (SYSCTL_ARM, {"cpu": "Apple M2", "physical": 8, "logical": 8, "simd": {"neon", "dotprod", "fp16"},
                  "total": 17179869184}),
    (SYSCTL_X86, {"cpu": "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", "physical": 8, "logical": 16,
                  "simd": {"avx", "avx2", "sse4_2", "fma", "f16c"}, "total": 34359738368}),
])
def test_macos_probe(monkeypatch, tmp_path, sysctl, expect):
    monkeypatch.setattr(system, "_psutil", lambda: None)
    run = _fake_run(
        {
            "sysctl": sysctl,
            "sysctl -n": "FPU FMA F16C SSE4.2\nAVX2 BMI2" if "Intel" in sysctl else "",
            "vm_stat": VM_STAT,
        }
    )
    hw = detect_hardware(tmp_path, env={}, system="Darwin", run=run)
    assert hw.os == "macOS"
    assert hw.cpu_model == expect["cpu"]
    assert (hw.physical_cores, hw.logical_cores) == (expect["physical"], expect["logical"])
    assert set(hw.simd) == expect["simd"]
    assert hw.ram_total == expect["total"]
    assert hw.ram_available == parse_vm_stat(VM_STAT)


def test_macos_probe_without_tools_still_returns_a_profile(monkeypatch, tmp_path):
    monkeypatch.setattr(system, "_psutil", lambda: None)
    hw = detect_hardware(tmp_path, env={}, system="Darwin", run=lambda cmd: "")
    assert hw.physical_cores >= 1 and hw.logical_cores >= 1
    assert hw.cpu_model  # platform fallback
    assert hw.ram_total == 0 and hw.ram_available == 0


def test_this_machine(tmp_path):
    hw = detect_hardware(tmp_path / "not" / "yet", env={})
    assert hw.physical_cores >= 1 and hw.logical_cores >= hw.physical_cores
    assert 1 <= hw.threads <= hw.physical_cores
    assert 0 < hw.ram_available <= hw.ram_total
    assert hw.disk_free > 0
    assert hw.cpu_model
    if os.path.exists("/proc/cpuinfo") and " avx2" in Path("/proc/cpuinfo").read_text():
        assert "avx2" in hw.simd
    data = hw.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["store_path"] == str(tmp_path / "not" / "yet") and data["threads"] == hw.threads


def test_linux_without_psutil_reads_proc(monkeypatch, tmp_path):
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("Linux only")
    monkeypatch.setattr(system, "_psutil", lambda: None)
    hw = detect_hardware(tmp_path, env={}, system="Linux")
    total, _ = parse_meminfo(Path("/proc/meminfo").read_text())
    assert hw.ram_total <= total and hw.ram_available > 0
    assert hw.physical_cores >= 1


def test_overrides(tmp_path):
    hw = detect_hardware(tmp_path, env={"PIPX_LLAMA_FAKE_RAM": "2G", "PIPX_LLAMA_FREE_BYTES": "123456"})
    assert hw.ram_total == hw.ram_available == 2_000_000_000
    assert hw.disk_free == 123456
    assert any("PIPX_LLAMA_FAKE_RAM" in n for n in hw.notes) and any("FREE_BYTES" in n for n in hw.notes)
    with pytest.raises(UsageError, match="PIPX_LLAMA_FAKE_RAM"):
        detect_hardware(tmp_path, env={"PIPX_LLAMA_FAKE_RAM": "much"})


def test_cgroup_limit_caps_memory(monkeypatch, tmp_path):
    files = {"/sys/fs/cgroup/memory.max": "1073741824\n", "/sys/fs/cgroup/memory.current": "268435456\n",
             "/sys/fs/cgroup/cpu.max": "100000 100000\n"}
    real = system._read
    monkeypatch.setattr(system, "_read", lambda p: files.get(p, real(p)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    hw = detect_hardware(tmp_path, env={}, system="Linux")
    assert hw.ram_total == 1 << 30
    assert hw.ram_available <= (1 << 30) - (256 << 20)
    assert hw.usable_cores == 1 and hw.threads == 1
    assert any("container" in n for n in hw.notes)


def test_disk_free_nearest_existing_parent(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    assert nearest_existing(deep) == tmp_path
    assert disk_free(deep, env={}) == __import__("shutil").disk_usage(tmp_path).free
    assert disk_free(deep, env={"PIPX_LLAMA_FREE_BYTES": "1M"}) == 1_000_000


def _profile(**kw) -> HardwareProfile:
    base = {"os": "Linux", "os_version": "", "arch": "x86_64", "cpu_model": "test", "physical_cores": 4,
            "logical_cores": 8, "simd": ("avx2", "fma"), "ram_total": 16 << 30, "ram_available": 8 << 30,
            "store_path": Path("/s"), "disk_free": 100 << 30}
    return HardwareProfile(**{**base, **kw})


def test_threads_and_budget_and_summary():
    assert _profile().threads == 4
    assert _profile(usable_cores=2).threads == 2
    assert ram_budget(_profile()) == int((8 << 30) * RAM_HEADROOM)
    assert "AVX2" in simd_summary(_profile())
    assert "NEON" in simd_summary(_profile(simd=("neon", "dotprod")))
    assert "slow" in simd_summary(_profile(simd=()))


def test_kv_cache_formula_matches_the_engine(smollm2_path):
    from pipx_llama.engine.model import load_model

    model = load_model(smollm2_path)
    hp = model.hparams
    for n_ctx in (64, 300):
        ctx = model.new_context(n_ctx)
        assert kv_cache_bytes(hp.n_layers, n_ctx, hp.n_kv_heads, hp.head_dim) == ctx.kv_bytes
    assert kv_cache_bytes(30, 4096, 3, 64) == 94_371_840  # SmolLM2 at 4096 tokens: 90 MiB
    for types in (("q8_0", "q8_0"), ("q8_0", "f16")):
        for n_ctx in (64, 300):
            ctx = model.new_context(n_ctx, type_k=types[0], type_v=types[1])
            assert kv_cache_bytes(hp.n_layers, n_ctx, hp.n_kv_heads, hp.head_dim, types) == ctx.kv_bytes
    # a 7B (32 layers, 32 KV heads of 128) at 4096 tokens: 2.1 GB in f16, 1.1 GB in q8_0
    assert kv_cache_bytes(32, 4096, 32, 128) == 2_147_483_648
    assert kv_cache_bytes(32, 4096, 32, 128, ("q8_0", "q8_0")) == 1_140_850_688
    assert ram_needed(1000, 2000) == 3000 + RUNTIME_OVERHEAD
    model.close()


# --- the one thread default and the one CPU probe -----------------------------------------------------------


def _fake_cgroup(monkeypatch, tmp_path, files: dict[str, str], affinity: int, physical: int) -> None:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(system, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(system.platform, "system", lambda: "Linux")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(system, "physical_cores", lambda: physical)
    system.default_threads.cache_clear()


@pytest.mark.parametrize(("files", "affinity", "physical", "threads"), [
    ({}, 8, 4, 4),                                                        # no container: physical cores
    ({"cpu.max": "150000 100000\n"}, 8, 4, 2),                            # cgroup v2 quota of 1.5 CPUs
    ({"cpu.max": "max 100000\n"}, 8, 4, 4),                               # v2, unlimited
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8, 4, 1),  # v1 quota
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 8, 4, 4),
    ({}, 3, 4, 3),                                                        # taskset to 3 CPUs
])
def test_default_threads_is_container_aware(monkeypatch, tmp_path, files, affinity, physical, threads):
    _fake_cgroup(monkeypatch, tmp_path, files, affinity, physical)
    try:
        assert system.default_threads() == threads
        hw = detect_hardware(tmp_path, env={}, system="Linux")
        assert hw.usable_cores == min(affinity, system.cgroup_cpus() or affinity)
    finally:
        system.default_threads.cache_clear()


def test_the_engine_and_the_planner_use_the_one_thread_default():
    from pipx_llama.engine import model

    assert model.default_threads is system.default_threads
    assert _profile(physical_cores=4, usable_cores=3).threads == system.threads_for(4, 3) == 3


def test_parse_cgroup_v1_cpus():
    assert system.parse_cgroup_v1_cpus("250000", "100000") == 3
    assert system.parse_cgroup_v1_cpus("-1", "100000") is None
    assert (
        system.parse_cgroup_v1_cpus(None, "100000") is None and system.parse_cgroup_v1_cpus("5", "0") is None
    )


def test_compile_target_follows_numba_cpu_name(monkeypatch):
    import numba

    monkeypatch.setattr(numba.config, "CPU_NAME", "haswell")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx,+avx2,+fma,-f16c")
    target = system.compile_target()
    assert target.name == "haswell" and target.has("avx2", "fma") and not target.has("f16c")
    assert target.features == {"avx": True, "avx2": True, "fma": True, "f16c": False}
    assert not system.target_has_f16c()


def test_compile_target_without_a_feature_list_has_the_hosts_features(monkeypatch):
    """NUMBA_CPU_NAME alone: numba compiles for the host's features under that name, and so must the
    probe say (not "no features", which would pick the portable kernels for code that has AVX2)."""
    import numba
    from llvmlite import binding

    monkeypatch.setattr(numba.config, "CPU_NAME", "haswell")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    target = system.compile_target()
    assert target.name == "haswell"
    assert target.features == dict(binding.get_host_cpu_features())
    # numba's own choice, as its JIT codegen makes it
    numba_uses = numba.core.codegen.JITCPUCodegen._get_host_cpu_features(None)
    assert numba_uses == binding.get_host_cpu_features().flatten()
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "")  # numba's default for "generic"
    assert system.compile_target().features == {}


def test_the_kernels_ask_the_one_probe():
    from pipx_llama.engine.kernels import ops, simd

    assert simd._host_features is system.target_features
    assert ops._target_has_f16c is system.target_has_f16c
    assert ops.HAVE_F16C == system.target_has_f16c()


def test_apple_silicon_counts_its_performance_cores(monkeypatch):
    m2 = {"hw.nperflevels": 2, "hw.perflevel0.physicalcpu": 4, "hw.perflevel1.physicalcpu": 4}.get
    assert system.performance_cores(m2) == 4
    assert system.performance_cores({"hw.nperflevels": 1, "hw.perflevel0.physicalcpu": 8}.get) is None
    assert system.performance_cores({}.get) is None  # an Intel Mac: no performance levels
    if platform.system() != "Darwin":
        assert system.performance_cores() is None
    monkeypatch.setattr(system, "detected_performance_cores", lambda: 6)
    assert system.physical_cores() == 6


def test_an_intel_hybrid_cpu_on_linux_counts_its_performance_cores(tmp_path):
    def cpu(n, core_id):
        topo = tmp_path / "system" / "cpu" / f"cpu{n}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(f"{core_id}\n")
        (topo / "physical_package_id").write_text("0\n")

    for n in range(8):  # four performance cores, two threads each
        cpu(n, 4 * (n // 2))
    for n in range(8, 16):  # eight efficiency cores
        cpu(n, 16 + n)
    (tmp_path / "cpu_core").mkdir()
    (tmp_path / "cpu_core" / "cpus").write_text("0-7\n")
    assert system.linux_performance_cores(str(tmp_path)) is None  # no cpu_atom: one kind of core
    (tmp_path / "cpu_atom").mkdir()
    (tmp_path / "cpu_atom" / "cpus").write_text("8-15\n")
    assert system.linux_performance_cores(str(tmp_path)) == 4
    assert system.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]


def test_an_arm_big_little_cpu_on_linux_counts_its_big_cores(tmp_path):
    cpus = tmp_path / "system" / "cpu"
    for n, capacity in enumerate([446, 446, 446, 446, 1024, 1024, 1024, 1024]):  # an RK3588
        (cpus / f"cpu{n}").mkdir(parents=True)
        (cpus / f"cpu{n}" / "cpu_capacity").write_text(f"{capacity}\n")
    (cpus / "cpufreq").mkdir()  # not a CPU
    assert system.linux_performance_cores(str(tmp_path)) == 4
    for n in range(8):
        (cpus / f"cpu{n}" / "cpu_capacity").write_text("1024\n")
    assert system.linux_performance_cores(str(tmp_path)) is None


def test_windows_hybrid_cores_from_their_efficiency_class():
    def core(efficiency_class, size=48):
        record = bytearray(size)
        record[0:4] = (0).to_bytes(4, "little")  # RelationProcessorCore
        record[4:8] = size.to_bytes(4, "little")
        record[9] = efficiency_class
        return bytes(record)

    package = bytearray(80)
    package[0:4] = (3).to_bytes(4, "little")  # RelationProcessorPackage: not a core
    package[4:8] = (80).to_bytes(4, "little")
    package[9] = 7
    hybrid = b"".join([core(1)] * 4 + [core(0)] * 8) + bytes(package)
    assert system.parse_processor_cores(hybrid) == 4
    assert system.parse_processor_cores(b"".join([core(0)] * 6)) is None
    assert system.parse_processor_cores(b"") is None
