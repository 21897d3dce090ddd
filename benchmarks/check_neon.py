"""Does LLVM vectorize the portable kernels for ARM NEON? Cross-compiles them for aarch64 and counts.

The portable tier (no SIMD tier: not x86, or no AVX2) runs the "plain" kinds of
``pipx_llama.engine.kernels.packed`` -- numba loops with no x86 intrinsic. This script compiles them
here with numba's optimizer off (``NUMBA_OPT=0``, a generic x86 CPU, ``PIPX_LLAMA_SIMD=off``), takes
their LLVM IR, retargets it to ``aarch64-unknown-linux-gnu`` and runs LLVM's -O3 pipeline with the loop
and SLP vectorizers for an ARM CPU (default neoverse-n1: NEON + dot product), which is what numba
does on an ARM machine. It prints, per kernel, how many instructions work on NEON vector registers
and the most common ones (smull/smlal/mla: integer dot products in vector lanes).

It checks code generation only: nothing runs on ARM here, so it says nothing of speed.

    python benchmarks/check_neon.py [cpu]         # re-executes itself with the settings above
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = ["range_p_q4_0", "range_p_q4_1", "range_p_q5_0", "range_p_q5_1", "range_p_q8_0", "range_p_q4_K",
           "range_p_q5_K", "range_p_q6_K"]
_VEC = re.compile(r"\bv\d+\.(16b|8b|8h|4h|4s|2s|2d)")


def _compile_kernels() -> dict[str, str]:
    """Unoptimized LLVM IR of each portable kernel, compiled through PackedMatrix on small random rows."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_formats_legacy import quantized
    from test_kernels_kquants import random_blocks

    from pipx_llama.engine.kernels import packed
    from pipx_llama.formats import kquants as kq
    from pipx_llama.formats import legacy as ql

    rng = np.random.default_rng(0)
    for fmt in (ql.Q4_0, ql.Q4_1, ql.Q5_0, ql.Q5_1, ql.Q8_0):
        raw = quantized(fmt, 32, 512, seed=1)
        pm = packed.PackedMatrix(fmt.qtype, raw, plain=True)
        pm.matmul(rng.standard_normal((2, pm.cols)).astype(np.float32), np.empty((2, 32), np.float32))
    for cls in (kq.Q4_K, kq.Q5_K, kq.Q6_K):
        pm = packed.PackedMatrix(cls.qtype, random_blocks(cls, rng, 32, 2, sane=True), plain=True)
        pm.matmul(rng.standard_normal((2, pm.cols)).astype(np.float32), np.empty((2, 32), np.float32))
    return {name: getattr(packed, name).inspect_llvm(getattr(packed, name).signatures[0]) for name in KERNELS}


def _aarch64_asm(ir: str, cpu: str) -> str:
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    tm = llvm.Target.from_triple("aarch64-unknown-linux-gnu").create_target_machine(cpu=cpu, opt=3)
    ir = re.sub(r"^target triple = .*$", 'target triple = "aarch64-unknown-linux-gnu"', ir,
                flags=re.MULTILINE)
    ir = re.sub(r"^target datalayout = .*$", f'target datalayout = "{tm.target_data}"', ir,
                flags=re.MULTILINE)
    ir = re.sub(r'"target-(cpu|features)"="[^"]*"', "", ir)
    mod = llvm.parse_assembly(ir)
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)


def main() -> None:
    cpu = sys.argv[1] if len(sys.argv) > 1 else "neoverse-n1"
    if os.environ.get("NUMBA_OPT") != "0":
        env = dict(os.environ, NUMBA_OPT="0", NUMBA_CPU_NAME="generic", PIPX_LLAMA_SIMD="off",
                   NUMBA_CACHE_DIR=str(Path(tempfile.gettempdir()) / "pipx-llama-check-neon"))
        raise SystemExit(subprocess.run([sys.executable, __file__, cpu], env=env, check=False).returncode)
    import warnings

    warnings.simplefilter("ignore")
    for name, ir in _compile_kernels().items():
        asm = _aarch64_asm(ir, cpu)
        ins = re.findall(r"^\s+([a-z0-9.]+)\s+([^\n]*)", asm, re.MULTILINE)
        vec = collections.Counter(op for op, args in ins if _VEC.search(args))
        top = ", ".join(f"{op} {n}" for op, n in vec.most_common(6))
        print(f"{name:>14}: {len(ins):5d} instructions, {sum(vec.values()):4d} on NEON vectors ({top})")


if __name__ == "__main__":
    main()
