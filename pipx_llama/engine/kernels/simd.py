"""Explicit SIMD building blocks for the packed weight kernels, emitted as LLVM IR from numba.

numba's loop vectorizer does not find the code that quantized dot products need (8-bit products
summed four to a 32-bit lane, one horizontal sum per row, several tokens per weight load), so the
inner loops of :mod:`pipx_llama.engine.kernels.packed` are written here as LLVM vector IR through
``numba.extending.intrinsic``. Each intrinsic runs a whole loop over the blocks of one group of 16
weight rows for 1 to 4 tokens and stores 16 float32 results per token; numba code around it does
the rest (row groups, threads, tails).

Tiers, chosen once from the CPU numba compiles for (``TIER``):

- ``"vnni512"``: AVX512-VNNI ``vpdpbusd`` on 512-bit vectors (Zen 4/5, Ice Lake and later Xeons);
- ``"vnni256"``: AVX-VNNI ``vpdpbusd`` on 256-bit halves (Alder Lake and later cores);
- ``"avx2"``: ``vpmaddubsw`` products summed in int16 chunks, then ``vpmaddwd`` (by ones, or by the
  block scales), on 256-bit halves (Haswell, Zen 1-3);
- ``None``: no packed kernels (not x86, or no AVX2/FMA/F16C); the engine uses the portable tier
  (the plain kinds of :mod:`~pipx_llama.engine.kernels.packed` and the per-op kernels).

All tiers compute the same integers and the same float32 operations in the same order, so their
results are bit-identical; ``PIPX_LLAMA_SIMD`` (one of the tier names, or ``off``) forces a lower
tier, which is how the tests run every tier on one machine.

Weight bytes multiplied by activations are unsigned (``vpdpbusd``/``vpmaddubsw`` take u8 x s8):
4- and 5-bit quants are stored as 0..15 / 0..31 and the offset (-8 / -16) comes off through the
activations' block sums; Q8_0 weights are stored as ``q + 128`` and ``128 * sum(x)`` comes off the
same way. On the ``avx2`` tier ``vpmaddubsw`` saturates int16 pairs, which quants of up to 6 bits
(2 * 63 * 127) never reach, nor the int16 chunk sums (see ``_Emit.acc_zero``); 8-bit weights take
the sign trick (``|q| * sign(x, q)``, at most 2 * 128 * 127) instead.
"""

from __future__ import annotations

import os
import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from pipx_llama.system import host_is_amd
from pipx_llama.system import target_features as _host_features

LANES = 16  # weight rows per group: the int32 lanes of one 512-bit vector
# Software prefetch: each kernel asks for the record it will read next time round -- the same record of the
# next group of rows, ``pf`` bytes on -- into L2 (``prefetcht1``) while it computes this one. A kernel for
# several tokens computes long enough per record to hide the memory's latency behind it, and its second and
# later passes over a group (tokens 4-7 of a batch of 8) read only cached lines, so without hints nothing
# asks the memory for the next group until the first pass reaches it: the hardware prefetchers follow
# demand misses and stop with them. On a 2-core Xeon VM (Sapphire Rapids class, AVX-512 VNNI), one thread,
# a 66 MB Q4_1 tensor of 576 columns read from DRAM, microseconds for 4 / 8 tokens without -> with:
# 6170 -> 3188 / 9648 -> 6002; SmolLM2 Q4_1, a server's step of 8 decode tokens at 2 threads 13.4-13.6 ->
# 10.8-11.2 ms.
# One token: the same hints helped that Xeon too -- one thread streamed the 66 MB tensor at 12-13 GB/s
# without, 21.7 with; SmolLM2 Q4_1 generation at 2 / 1 threads 183-193 -> 284-287 / 103-107 -> 150 tok/s;
# 7B-shaped Q4_K_M 5.15 -> 5.73 tok/s at 2 threads -- but on AMD's Zen 4 EPYC hints 8 KiB ahead measured
# slower, one thread, 260-271 MB tensors, GB/s without -> with: Q4_K 27.3 -> 18.1, Q6_K 26.3 -> 23.0,
# Q5_1 31.1 -> 26.7, Q8_0 26.0 -> 23.0 (avx2 tier's code: Q4_K 24.4 -> 17.1): its own prefetchers
# already keep up there, and each software prefetch holds one of the core's miss buffers. So a one-token
# legacy kernel asks only on CPUs that are not AMD's (the K-quant kernels: ``KQUANT_ONE_TOKEN_AHEAD``).
PREFETCH_ONE_TOKEN = not host_is_amd()

# One token's K-quant kernels on AMD ask for the record two records on instead (4.7-6.7 KB ahead in the same
# stream). On a Zen 5 EPYC (family 26), 1 GB of random records read from DRAM, GB/s without hints / with the
# next group's / two records ahead, four runs (two 4096 and two 11008 columns wide):
#   avx2 tier, 2 threads  Q4_K 27.5-35.6 / 33.1-34.8 / 36.2-52.0   Q6_K 21.5-28.0 / 42.5-55.6 / 44.4-49.0
#             1 thread    Q4_K 14.7-23.2 / 28.8-31.1 / 26.5-27.7   Q6_K 12.5-16.0 / 27.3-31.3 / 25.4-27.3
#   VNNI-512, 1 thread    Q4_K 24.9-25.4 / 26.3-27.2 / 32.0-33.6   Q6_K 22.3-25.9 / 19.8-20.4 / 28.1-30.0
#             2 threads   Q4_K 36.5-49.0 / 36.8-52.4 / 36.5-45.9   Q6_K 33.0-42.6 / 30.9-32.4 / 37.1-39.5
# (three runs of 4096 columns; two threads read 47-52 GB/s here, at times ~80). Without hints, compute and
# memory barely overlap on the avx2 tier: its code computes a Q4_K record in ~830 instructions (128
# vpmaddubsw, 136 broadcasts, 192 to unpack nibbles), so the reorder buffer reaches less than a record
# ahead. Why the next group's record (38-100 KB on) serves worse here than on the Xeon was not found out
# (AMD documents ``prefetcht1`` as filling L2 since Zen 4; a study of Zen 4 saw it dropped at times). The
# legacy kinds, one token, measured the same with the next group's hints as without on this Zen 5, on both
# tiers.
KQUANT_ONE_TOKEN_AHEAD = 2 if host_is_amd() else None

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_HALF = ir.HalfType()


def detect_tier() -> str | None:
    """The best tier the compile target supports, lowered by ``PIPX_LLAMA_SIMD`` if set."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    f = _host_features()
    if not (f.get("avx2") and f.get("fma") and f.get("f16c")):
        return None
    best = "avx2"
    if f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")):
        best = "vnni256"
    if f.get("avx512vnni") and f.get("avx512bw") and f.get("avx512f"):
        best = "vnni512"
    order = ["off", "avx2", "vnni256", "vnni512"]
    forced = os.environ.get("PIPX_LLAMA_SIMD", "").strip().lower()
    if forced in order and order.index(forced) < order.index(best):
        best = forced
    return None if best == "off" else best


TIER = detect_tier()


# ----------------------------------------------------------------------------- IR helpers


def vector_width(tier: str | None) -> int:
    """32-bit lanes of one vector on ``tier``: 16 with AVX-512, 8 on the 256-bit tiers."""
    return 16 if tier == "vnni512" else 8


class _Emit:
    """IR helpers bound to one builder and the tier's vector width (``width`` int32 lanes per part)."""

    def __init__(self, builder: ir.IRBuilder, tier: str) -> None:
        self.b = builder
        self.tier = tier
        self.width = vector_width(tier)
        self.parts = LANES // self.width
        w = self.width
        self.vi32 = ir.VectorType(_I32, w)
        self.vf32 = ir.VectorType(_F32, w)
        self.vi8 = ir.VectorType(_I8, 4 * w)
        self.vi16 = ir.VectorType(_I16, 2 * w)
        self.vhalf = ir.VectorType(_HALF, w)
        self.mod = builder.module

    def fn(self, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
        return cgutils.get_or_insert_function(self.mod, ir.FunctionType(ret, args), name)

    def ptr(self, base: ir.Value, offset: ir.Value, ty: ir.Type) -> ir.Value:
        """``ty*`` at byte ``offset`` from the i8* ``base``."""
        return self.b.bitcast(self.b.gep(base, [offset]), ty.as_pointer())

    def load(self, base: ir.Value, offset: ir.Value, ty: ir.Type) -> ir.Value:
        return self.b.load(self.ptr(base, offset, ty), align=1)

    def splat_i32(self, v: ir.Value) -> ir.Value:
        vec = self.b.insert_element(ir.Constant(self.vi32, ir.Undefined), v, _I32(0))
        return self.b.shuffle_vector(vec, ir.Constant(self.vi32, ir.Undefined),
                                     ir.Constant(self.vi32, [0] * self.width))

    def splat_f32(self, v: ir.Value) -> ir.Value:
        vec = self.b.insert_element(ir.Constant(self.vf32, ir.Undefined), v, _I32(0))
        return self.b.shuffle_vector(vec, ir.Constant(self.vf32, ir.Undefined),
                                     ir.Constant(self.vi32, [0] * self.width))

    def const_i32(self, c: int) -> ir.Value:
        return ir.Constant(self.vi32, [c] * self.width)

    def zero_i32(self) -> ir.Value:
        return ir.Constant(self.vi32, [0] * self.width)

    def zero_f32(self) -> ir.Value:
        return ir.Constant(self.vf32, [0.0] * self.width)

    def dpbusd(self, acc: ir.Value, a: ir.Value, x: ir.Value) -> ir.Value:
        """acc[i] += sum_{k<4} u8(a[4i+k]) * s8(x[4i+k]); a's bytes must be < 128 on the avx2 tier."""
        b = self.b
        if self.tier == "vnni512":
            f = self.fn("llvm.x86.avx512.vpdpbusd.512", self.vi32, [self.vi32] * 3)
            return b.call(f, [acc, a, x])
        if self.tier == "vnni256":
            f = self.fn("llvm.x86.avx512.vpdpbusd.256", self.vi32, [self.vi32] * 3)
            return b.call(f, [acc, a, x])
        maddubs = self.fn("llvm.x86.avx2.pmadd.ub.sw", self.vi16, [self.vi8, self.vi8])
        maddwd = self.fn("llvm.x86.avx2.pmadd.wd", self.vi32, [self.vi16, self.vi16])
        p16 = b.call(maddubs, [b.bitcast(a, self.vi8), b.bitcast(x, self.vi8)])
        ones = ir.Constant(self.vi16, [1] * (2 * self.width))
        return b.add(acc, b.call(maddwd, [p16, ones]))

    # Integer dot products accumulated in chunks. On the avx2 tier a chunk's ``vpmaddubsw`` pairs add up
    # in int16 lanes (vpaddw) and one ``vpmaddwd`` per chunk widens them to int32 -- by ones, or by the
    # chunk's scales, which then cost no vpmulld -- instead of one vpmaddwd and one vpaddd per product:
    # vpmaddubsw and vpmaddwd share one multiplier port on Zen 1-3. Callers size chunks so no int16
    # lane can overflow (|activation| <= 127: a chunk of n products of weights < 2^b needs
    # n * 2 * (2^b - 1) * 127 < 2^15). The VNNI tiers accumulate int32 with vpdpbusd as before.
    def acc_zero(self) -> ir.Value:
        if self.tier == "avx2":
            return ir.Constant(self.vi16, [0] * (2 * self.width))
        return self.zero_i32()

    def acc_add(self, acc: ir.Value, a: ir.Value, x: ir.Value) -> ir.Value:
        """acc += products of u8 a and s8 x (int16 pairs on the avx2 tier, int32 quads on VNNI)."""
        if self.tier != "avx2":
            return self.dpbusd(acc, a, x)
        maddubs = self.fn("llvm.x86.avx2.pmadd.ub.sw", self.vi16, [self.vi8, self.vi8])
        return self.b.add(acc,
                          self.b.call(maddubs, [self.b.bitcast(a, self.vi8), self.b.bitcast(x, self.vi8)]))

    def acc_sum(self, acc: ir.Value) -> ir.Value:
        """The chunk's int32 sums per lane."""
        if self.tier != "avx2":
            return acc
        maddwd = self.fn("llvm.x86.avx2.pmadd.wd", self.vi32, [self.vi16, self.vi16])
        return self.b.call(maddwd, [acc, ir.Constant(self.vi16, [1] * (2 * self.width))])

    def acc_scaled(self, acc: ir.Value, sc: ir.Value) -> ir.Value:
        """The chunk's int32 sums per lane times ``sc`` (int32 lanes holding int16-range scales)."""
        if self.tier != "avx2":
            return self.b.mul(acc, sc)
        b = self.b
        sc16 = b.bitcast(b.or_(b.shl(sc, self.const_i32(16)), b.and_(sc, self.const_i32(0xFFFF))), self.vi16)
        maddwd = self.fn("llvm.x86.avx2.pmadd.wd", self.vi32, [self.vi16, self.vi16])
        return b.call(maddwd, [acc, sc16])

    def dpbssd_sign(self, acc: ir.Value, a: ir.Value, x: ir.Value) -> ir.Value:
        """acc[i] += sum_{k<4} s8(a[4i+k]) * s8(x[4i+k]) for the avx2 tier (sign trick, no saturation)."""
        b = self.b
        abs_fn = self.fn("llvm.abs.v32i8", self.vi8, [self.vi8, ir.IntType(1)])
        sign_fn = self.fn("llvm.x86.avx2.psign.b", self.vi8, [self.vi8, self.vi8])
        a8 = b.bitcast(a, self.vi8)
        ua = b.call(abs_fn, [a8, ir.Constant(ir.IntType(1), 0)])
        sx = b.call(sign_fn, [b.bitcast(x, self.vi8), a8])
        maddubs = self.fn("llvm.x86.avx2.pmadd.ub.sw", self.vi16, [self.vi8, self.vi8])
        maddwd = self.fn("llvm.x86.avx2.pmadd.wd", self.vi32, [self.vi16, self.vi16])
        p16 = b.call(maddubs, [ua, sx])
        ones = ir.Constant(self.vi16, [1] * (2 * self.width))
        return b.add(acc, b.call(maddwd, [p16, ones]))

    def half_to_f32(self, base: ir.Value, offset: ir.Value) -> ir.Value:
        """``width`` fp16 values at byte ``offset`` as float32 (one vcvtph2ps)."""
        h = self.load(base, offset, self.vhalf)
        return self.b.fpext(h, self.vf32)

    def prefetch_l2(self, base: ir.Value, offset: ir.Value) -> None:
        """Ask for the cache line at byte ``offset`` of ``base`` into L2 (a hint: never faults)."""
        emit_prefetch(self.b, self.b.gep(base, [offset]), 2)

    def fma(self, a: ir.Value, x: ir.Value, c: ir.Value) -> ir.Value:
        f = self.fn(f"llvm.fma.v{self.width}f32", self.vf32, [self.vf32] * 3)
        return self.b.call(f, [a, x, c])

    def opaque(self, ptr: ir.Value) -> ir.Value:
        """``ptr`` through an empty asm statement: the same address, which LLVM cannot prove equal to
        ``ptr`` (so loads through the two are not merged)."""
        return self.after(ptr, [])

    def after(self, ptr: ir.Value, deps: list[ir.Value]) -> ir.Value:
        """``ptr`` through an empty asm statement that also takes ``deps`` (vector values): the same address,
        but for LLVM a new one that exists only once every value of ``deps`` does, so loads through it stay
        after the code computing ``deps`` (x86 vector registers: ``x`` for ymm, ``v`` for zmm)."""
        ty = ir.FunctionType(ptr.type, [ptr.type] + [d.type for d in deps])
        reg = ",v" if self.width == 16 else ",x"
        asm = ir.InlineAsm(ty, "", "=r,0" + reg * len(deps), side_effect=bool(not deps))
        return self.b.call(asm, [ptr, *deps])


def emit_prefetch(b: ir.IRBuilder, ptr: ir.Value, locality: int) -> None:
    """A read prefetch of the cache line at the i8* ``ptr`` (locality 3: into L1, 2: into L2); any target."""
    i8p = _I8.as_pointer()
    f = cgutils.get_or_insert_function(b.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]),
                                       "llvm.prefetch.p0")
    b.call(f, [ptr, _I32(0), _I32(locality), _I32(1)])


def _shift(b: ir.IRBuilder, v: ir.Value, n: int, e: _Emit) -> ir.Value:
    """v shifted left by n bits (right by -n when n < 0)."""
    if n > 0:
        return b.shl(v, e.const_i32(n))
    if n < 0:
        return b.lshr(v, e.const_i32(-n))
    return v


def _array_data(context, builder, aryty, ary) -> ir.Value:
    """The array's data pointer as i8*."""
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(a.data, _I8.as_pointer())


def _row_stride(context, builder, aryty, ary) -> ir.Value:
    a = context.make_array(aryty)(context, builder, ary)
    return cgutils.unpack_tuple(builder, a.strides, 2)[0]


# ----------------------------------------------------------------------------- legacy block kernels
# A packed legacy tensor stores, for each group of 16 rows and each 32-column block, one record:
#   qs: for each dword step k, 16 lanes x 4 bytes (lane = row of the group)
#       4-bit types, k < 4: byte i of lane r is qs byte 4k+i of row r's block
#           (low nibble: element 4k+i, high nibble: element 16+4k+i)
#       Q8_0, k < 8: byte i of lane r is element 4k+i of row r (signed)
#   d: 16 fp16 scales; m: 16 fp16 mins (Q4_1)
# Records of one group follow each other; groups follow each other.

#   Q5_0/Q5_1 also hold, after qs, 16 lanes x 4 bytes of fifth bits, reordered at repack time so that
#       byte i of lane r has, in bit k, the fifth bit of element 4k+i and in bit 4+k that of element
#       16+4k+i: a constant shift and a mask then put step k's fifth bits at bit 4 of each byte.

LEGACY_RECORD = {"q4_0": 288, "q4_1": 320, "q8_0": 544, "q5_0": 352, "q5_1": 384}
# byte offsets in a record: (fifth bits or -1, d, m or -1)
LEGACY_OFFSETS = {"q4_0": (-1, 256, -1), "q4_1": (-1, 256, 288), "q8_0": (-1, 512, -1),
                  "q5_0": (256, 320, -1), "q5_1": (256, 320, 352)}


def _legacy_codegen(kind: str, nt: int, tier: str):
    """IR body for ``kind`` and ``nt`` tokens; see ``_make_legacy_intrinsic``.

    Its ``codegen`` is one function of ~110 lines on purpose: it emits one straight-line LLVM block per
    record (load, unpack, multiply-add for every token, scale), and its IR values (the row pointers, the
    unpacked quants, the accumulators) flow from one step into the next; split into helpers, each would
    take and return most of them, and the order of the emitted instructions is what the reader checks
    against the record layout above."""
    rec = LEGACY_RECORD[kind]

    def codegen(context, builder, sig, args):
        w_ty, _, _, xq_ty, xd_ty, xs_ty, xsum_ty, _, _, res_ty = sig.args
        w, woff, nb, xq, xd, xs, xsum, t0, pf, res = args
        e = _Emit(builder, tier)
        b = builder
        wbase = b.gep(_array_data(context, builder, w_ty, w), [woff])
        xq_base = _array_data(context, builder, xq_ty, xq)
        xq_stride = _row_stride(context, builder, xq_ty, xq)
        xd_base = _array_data(context, builder, xd_ty, xd)
        xd_stride = _row_stride(context, builder, xd_ty, xd)
        xs_base = _array_data(context, builder, xs_ty, xs)
        xsum_base = _array_data(context, builder, xsum_ty, xsum)
        xsum_stride = _row_stride(context, builder, xsum_ty, xsum)
        res_base = _array_data(context, builder, res_ty, res)
        rows_q = [b.gep(xq_base, [b.mul(b.add(t0, _I64(t)), xq_stride)]) for t in range(nt)]
        rows_d = [b.gep(xd_base, [b.mul(b.add(t0, _I64(t)), xd_stride)]) for t in range(nt)]
        rows_s = [b.gep(xs_base, [b.mul(b.add(t0, _I64(t)), xd_stride)]) for t in range(nt)]
        rows_sum = [b.gep(xsum_base, [b.mul(b.add(t0, _I64(t)), xsum_stride)]) for t in range(nt)]

        accs = [[cgutils.alloca_once_value(b, e.zero_f32()) for _ in range(e.parts)] for _ in range(nt)]
        with cgutils.for_range(b, nb) as loop:
            blk = loop.index
            rb = b.mul(blk, _I64(rec))
            if nt > 1 or PREFETCH_ONE_TOKEN:  # the same record of the next group (see PREFETCH_ONE_TOKEN)
                for line in range(0, rec, 64):
                    e.prefetch_l2(wbase, b.add(b.add(rb, pf), _I64(line)))
            isum = [[e.zero_i32() for _ in range(e.parts)] for _ in range(nt)]
            n_steps = 8 if kind == "q8_0" else 4
            xoff = b.mul(blk, _I64(32))
            boff4 = b.mul(blk, _I64(4))
            qh_off, d_at, m_at = LEGACY_OFFSETS[kind]
            # 4-bit: the block's 8 products per lane fit one int16 chunk; 5-bit: its low and high halves
            n_acc = 2 if qh_off >= 0 else 1
            # several tokens take one part (8 rows on the avx2 tier) at a time, its loads after the previous
            # part's sums (as the K-quant kernels' units: see _kquant_codegen)
            units = [[p] for p in range(e.parts)] if nt > 1 else [list(range(e.parts))]
            wb, xr = wbase, [rows_q] * e.parts
            for parts in units:
                qhv = {p: e.load(wb, b.add(rb, _I64(qh_off + p * 4 * e.width)), e.vi32)
                       for p in parts if qh_off >= 0}
                acc16 = {(t, p): [e.acc_zero() for _ in range(n_acc)] for t in range(nt) for p in parts}
                for k in range(n_steps):
                    for p in parts:
                        v = e.load(wb, b.add(rb, _I64(k * 64 + p * 4 * e.width)), e.vi32)
                        if kind == "q8_0":
                            if tier == "avx2":
                                lo = v
                            else:
                                lo = b.xor(v, e.const_i32(-0x7F7F7F80))  # 0x80808080: q + 128
                            for t in range(nt):
                                xa = e.splat_i32(e.load(xr[p][t], b.add(xoff, _I64(4 * k)), _I32))
                                if tier == "avx2":
                                    isum[t][p] = e.dpbssd_sign(isum[t][p], lo, xa)
                                else:
                                    isum[t][p] = e.dpbusd(isum[t][p], lo, xa)
                        else:
                            lo = b.and_(v, e.const_i32(0x0F0F0F0F))
                            hi = b.and_(b.lshr(v, e.const_i32(4)), e.const_i32(0x0F0F0F0F))
                            if qh_off >= 0:
                                m10 = e.const_i32(0x10101010)
                                lo = b.or_(lo, b.and_(b.shl(qhv[p], e.const_i32(4 - k)), m10))
                                hi = b.or_(hi, b.and_(b.lshr(qhv[p], e.const_i32(k)), m10))
                            for t in range(nt):
                                xa = e.splat_i32(e.load(xr[p][t], b.add(xoff, _I64(4 * k)), _I32))
                                xb = e.splat_i32(e.load(xr[p][t], b.add(xoff, _I64(16 + 4 * k)), _I32))
                                acc16[t, p][0] = e.acc_add(acc16[t, p][0], lo, xa)
                                acc16[t, p][n_acc - 1] = e.acc_add(acc16[t, p][n_acc - 1], hi, xb)
                if kind != "q8_0":
                    for (t, p), accs16 in acc16.items():
                        for a in accs16:
                            isum[t][p] = b.add(isum[t][p], e.acc_sum(a))
                done = []
                for p in parts:
                    dw = e.half_to_f32(wb, b.add(rb, _I64(d_at + p * 2 * e.width)))
                    mw = None
                    if m_at >= 0:
                        mw = e.half_to_f32(wb, b.add(rb, _I64(m_at + p * 2 * e.width)))
                    for t in range(nt):
                        dx = e.splat_f32(e.load(rows_d[t], boff4, _F32))
                        s = isum[t][p]
                        if kind == "q4_0":
                            s = b.sub(s, e.splat_i32(b.shl(e.load(rows_sum[t], boff4, _I32), _I32(3))))
                        elif kind == "q5_0":
                            s = b.sub(s, e.splat_i32(b.shl(e.load(rows_sum[t], boff4, _I32), _I32(4))))
                        elif kind == "q8_0" and tier != "avx2":
                            s = b.sub(s, e.splat_i32(b.shl(e.load(rows_sum[t], boff4, _I32), _I32(7))))
                        acc = b.load(accs[t][p])
                        acc = e.fma(b.sitofp(s, e.vf32), b.fmul(dw, dx), acc)
                        if mw is not None:
                            acc = e.fma(mw, e.splat_f32(e.load(rows_s[t], boff4, _F32)), acc)
                        b.store(acc, accs[t][p])
                        done.append(acc)
                if nt > 1:
                    wb = e.after(wbase, done)
                    first = [e.after(r, done) for r in rows_q]
                    xr = [first] * e.parts
        for t in range(nt):
            for p in range(e.parts):
                off = _I64((t * LANES + p * e.width) * 4)
                b.store(b.load(accs[t][p]), e.ptr(res_base, off, e.vf32), align=4)
        return context.get_dummy_value()

    return codegen


def _make_legacy_intrinsic(kind: str, nt: int):
    tier = TIER

    @intrinsic
    def _kernel(typingctx, w, woff, nb, xq, xd, xs, xsum, t0, pf, res):
        """res[0:nt, 0:16] = the 16 rows of the group at w[woff:] times tokens t0..t0+nt-1.

        pf: bytes from this group's records to the next group's, which the kernel asks the cache for (a hint
        that never faults, so past the tensor's end too); see PREFETCH_ONE_TOKEN.
        w: uint8 packed records; xq int8 [T, n]; xd, xs float32 [T, n/32] (Q8 scale, Q8_1 sum term);
        xsum int32 [T, n/32] (sums of xq per block); res float32 [>= nt, 16].
        """
        sig = types.void(w, woff, nb, xq, xd, xs, xsum, t0, pf, res)
        return sig, _legacy_codegen(kind, nt, tier)

    return _kernel


if TIER is not None:
    q4_0_x1 = _make_legacy_intrinsic("q4_0", 1)
    q4_0_x4 = _make_legacy_intrinsic("q4_0", 4)
    q4_1_x1 = _make_legacy_intrinsic("q4_1", 1)
    q4_1_x4 = _make_legacy_intrinsic("q4_1", 4)
    q8_0_x1 = _make_legacy_intrinsic("q8_0", 1)
    q8_0_x4 = _make_legacy_intrinsic("q8_0", 4)
    q5_0_x1 = _make_legacy_intrinsic("q5_0", 1)
    q5_0_x4 = _make_legacy_intrinsic("q5_0", 4)
    q5_1_x1 = _make_legacy_intrinsic("q5_1", 1)
    q5_1_x4 = _make_legacy_intrinsic("q5_1", 4)


# ----------------------------------------------------------------------------- K-quant kernels
# Records per group of 16 rows and super-block of 256 columns:
#   Q4_K (2368 bytes): qs steps k < 32 as [k][lane][4 bytes] (qs bytes 4k..4k+3: sub-block 2(k//8) in
#       the low nibbles, 2(k//8)+1 in the high ones); sc [8][lane] u8; m [8][lane] u8; d, dmin fp16 [lane]
#   Q5_K (2880 bytes): for each step kk < 8, the qs steps 8 * pair + kk of the four sub-block pairs
#       [pair][lane][4] (as Q4_K's), then qh step kk [lane][4] (qh bytes 4kk..4kk+3: bit j is the fifth
#       bit of that position of sub-block j): a single token's kernel reads the record front to back;
#       then sc, m, d, dmin as Q4_K, 512 bytes later
#   Q6_K (3360 bytes): four groups (half h of the super-block, g = which sub-block of each pair), each
#       4 steps kq of [ql step 16h + 4g + kq][ql step 16h + 4g + kq + 8][qh step 8h + 4g + kq] (each
#       [lane][4]) followed by the group's four scales [qi][lane] i8 (sub-block 8h + 2qi + g), 832 bytes
#       a group; then d fp16 [lane]. The kernels read it front to back.
# Activations are Q8_K: xq int8 [T, n], xd float32 [T, n/256], and the sums of 16 and of 32
# consecutive xq as int32 (xb16 [T, n/16], xb32 [T, n/32]).

KQUANT_RECORD = {"q4_K": 2368, "q5_K": 2880, "q6_K": 3360}


def k5_qs(pair: int, kk: int) -> int:
    """Byte offset in a Q5_K record of quant step kk of sub-block pair ``pair`` (see the layout above)."""
    return (5 * kk + pair) * 64


def k5_qh(kk: int) -> int:
    """Byte offset in a Q5_K record of fifth-bit step kk."""
    return (5 * kk + 4) * 64


def q6_group(h: int, g: int) -> int:
    """Byte offset in a Q6_K record of half h's sub-block group g (see the layout above)."""
    return (2 * h + g) * 13 * 64


def q6_ql(k: int) -> int:
    """Byte offset in a Q6_K record of ql step k (< 32): half k // 16, step kk = k % 8 of group kk // 4."""
    kk = k % 8
    return q6_group(k // 16, kk // 4) + (3 * (kk % 4) + (k % 16) // 8) * 64


def q6_qh(j: int) -> int:
    """Byte offset in a Q6_K record of qh step j (< 16): half j // 8, step kk = j % 8 of group kk // 4."""
    kk = j % 8
    return q6_group(j // 8, kk // 4) + (3 * (kk % 4) + 2) * 64


def q6_scale(s: int) -> int:
    """Byte offset in a Q6_K record of the scales [lane] of sub-block s = 8h + 2qi + g."""
    return q6_group(s // 8, s % 2) + 12 * 64 + (s % 8) // 2 * LANES


def _kquant_codegen(kind: str, nt: int, tier: str):
    """IR body for a K-quant ``kind`` and ``nt`` tokens. Its ``codegen`` runs to ~190 lines for the reason
    ``_legacy_codegen``'s does: one super-block's straight-line IR whose values flow from step to step."""
    rec = KQUANT_RECORD[kind]

    def codegen(context, builder, sig, args):
        w_ty, _, _, xq_ty, xd_ty, xb16_ty, xb32_ty, _, _, res_ty = sig.args
        w, woff, nb, xq, xd, xb16, xb32, t0, pf, res = args
        e = _Emit(builder, tier)
        b = builder
        W = e.width
        vi8w = ir.VectorType(_I8, W)
        wbase = b.gep(_array_data(context, builder, w_ty, w), [woff])

        def rows(aty, a):
            base = _array_data(context, builder, aty, a)
            stride = _row_stride(context, builder, aty, a)
            return [b.gep(base, [b.mul(b.add(t0, _I64(t)), stride)]) for t in range(nt)]

        rq, rd, r16, r32 = rows(xq_ty, xq), rows(xd_ty, xd), rows(xb16_ty, xb16), rows(xb32_ty, xb32)

        def chained(ptrs, done):
            """``ptrs`` through ``e.after(done)``, once for each part; parts after the first through another
            asm statement each, so that no two parts read activations through pointers LLVM sees equal."""
            first = [e.after(r, done) for r in ptrs] if done else ptrs
            return [first] + [[e.opaque(r) for r in first] for _ in range(1, e.parts)]

        rqp = chained(rq, [])
        res_base = _array_data(context, builder, res_ty, res)
        m0f = e.const_i32(0x0F0F0F0F)
        accs = [[cgutils.alloca_once_value(b, e.zero_f32()) for _ in range(e.parts)] for _ in range(nt)]

        def bytes_i32(wb, rb, off, p, signed):
            v = e.load(wb, b.add(rb, _I64(off + p * W)), vi8w)
            return b.sext(v, e.vi32) if signed else b.zext(v, e.vi32)

        lines = range(0, rec, 64)

        # how far ahead the hints ask: the next group's record, ``pf`` bytes on, or one token's kernels on AMD
        # a few records on (see KQUANT_ONE_TOKEN_AHEAD)
        ahead = pf if nt > 1 or KQUANT_ONE_TOKEN_AHEAD is None else _I64(KQUANT_ONE_TOKEN_AHEAD * rec)

        def prefetch_slice(rb, i, n):
            """Slice i of n of the record ``ahead`` bytes on, spread over the super-block's steps."""
            for line in lines[i * len(lines) // n : (i + 1) * len(lines) // n]:
                e.prefetch_l2(wbase, b.add(b.add(rb, ahead), _I64(line)))

        with cgutils.for_range(b, nb) as loop:
            blk = loop.index
            rb = b.mul(blk, _I64(rec))
            xo = b.mul(blk, _I64(256))
            isum = [[e.zero_i32() for _ in range(e.parts)] for _ in range(nt)]
            if kind in ("q4_K", "q5_K"):
                extra = 512 if kind == "q5_K" else 0  # scales and mins sit after the fifth bits
                m10 = e.const_i32(0x10101010)
                # int16 chunks on avx2: 8 products of 4-bit quants (30480 at most), 4 of 5-bit ones (31496)
                chunk = 4 if (extra and tier == "avx2") else 8
                # Q5_K's record holds each step kk's fifth bits after that step's quants of the four
                # sub-block pairs, so a single token reads it front to back: all four pairs per step,
                # each qh vector loaded once (see the layout above); several tokens take the pairs one by
                # one, whose accumulators then fit the registers
                by_step = bool(extra) and nt == 1
                batches = ([[(pair, c0) for pair in range(4)] for c0 in range(0, 8, chunk)] if by_step
                           else [[(pair, c0)] for pair in range(4) for c0 in range(0, 8, chunk)])
                # Several tokens take one unit at a time: a batch's products for one part (8 rows on the
                # avx2 tier), whose accumulators then fit the registers. Left to itself LLVM interleaves
                # the units and spills: the activations broadcast once for every part, the unpacked quants
                # once for every token. Each unit reads through pointers that depend on the previous
                # unit's sums (``e.after``), so its loads cannot move above them. One token interleaves
                # the parts step by step, each part reading its activations through its own pointer
                # (``rqp``) so they are broadcast again rather than kept for the next part
                units = [[p] for p in range(e.parts)] if nt > 1 else [list(range(e.parts))]
                wb, xr = wbase, rqp
                for bi, batch in enumerate(batches):
                    prefetch_slice(rb, bi, len(batches))
                    c0 = batch[0][1]
                    for parts in units:
                        keys = [(pair, p) for pair, _ in batch for p in parts]
                        alo = {k: [e.acc_zero() for _ in range(nt)] for k in keys}
                        ahi = {k: [e.acc_zero() for _ in range(nt)] for k in keys}
                        for kk in range(c0, c0 + chunk):
                            for p in parts:
                                po = p * 4 * W
                                if extra:
                                    qh = e.load(wb, b.add(rb, _I64(k5_qh(kk) + po)), e.vi32)
                                for pair, _ in batch:
                                    at = k5_qs(pair, kk) if extra else (8 * pair + kk) * 64
                                    v = e.load(wb, b.add(rb, _I64(at + po)), e.vi32)
                                    lo = b.and_(v, m0f)
                                    hi = b.and_(b.lshr(v, e.const_i32(4)), m0f)
                                    if extra:
                                        lo = b.or_(lo, b.and_(_shift(b, qh, 4 - 2 * pair, e), m10))
                                        hi = b.or_(hi, b.and_(_shift(b, qh, 3 - 2 * pair, e), m10))
                                    xo_a = b.add(xo, _I64(64 * pair + 4 * kk))
                                    xo_b = b.add(xo_a, _I64(32))
                                    for t in range(nt):
                                        xa = e.splat_i32(e.load(xr[p][t], xo_a, _I32))
                                        xb = e.splat_i32(e.load(xr[p][t], xo_b, _I32))
                                        alo[pair, p][t] = e.acc_add(alo[pair, p][t], lo, xa)
                                        ahi[pair, p][t] = e.acc_add(ahi[pair, p][t], hi, xb)
                        sums = [v for acc in (alo, ahi) for vs in acc.values() for v in vs]
                        # several tokens read the scales once the products are (as Q6_K's); one token's
                        # kernel spilled more that way (Q5_K 45 -> 116 stack stores a record)
                        wsc = e.after(wbase, sums) if nt > 1 else wb
                        for pair, _ in batch:
                            for p in parts:
                                sc_lo = bytes_i32(wsc, rb, extra + 2048 + (2 * pair) * 16, p, False)
                                sc_hi = bytes_i32(wsc, rb, extra + 2048 + (2 * pair + 1) * 16, p, False)
                                for t in range(nt):
                                    isum[t][p] = b.add(isum[t][p],
                                                       b.add(e.acc_scaled(alo[pair, p][t], sc_lo),
                                                             e.acc_scaled(ahi[pair, p][t], sc_hi)))
                        if nt > 1:
                            done = [isum[t][p] for t in range(nt) for p in parts]
                            wb, xr = e.after(wbase, done), chained(rq, done)
                xo32 = b.mul(blk, _I64(8 * 4))
                # min terms: one min vector live at a time (four tokens' sums would spill otherwise)
                summs = [[e.zero_i32() for _ in range(e.parts)] for _ in range(nt)]
                for j in range(8):
                    for p in range(e.parts):
                        mj = bytes_i32(wbase, rb, extra + 2176 + j * 16, p, False)
                        for t in range(nt):
                            bj = e.splat_i32(e.load(r32[t], b.add(xo32, _I64(4 * j)), _I32))
                            summs[t][p] = b.add(summs[t][p], b.mul(mj, bj))
                for p in range(e.parts):
                    dw = e.half_to_f32(wbase, b.add(rb, _I64(extra + 2304 + p * 2 * W)))
                    dmw = e.half_to_f32(wbase, b.add(rb, _I64(extra + 2336 + p * 2 * W)))
                    for t in range(nt):
                        dy = e.splat_f32(e.load(rd[t], b.mul(blk, _I64(4)), _F32))
                        acc = b.load(accs[t][p])
                        acc = e.fma(b.fmul(dw, dy), b.sitofp(isum[t][p], e.vf32), acc)
                        acc = e.fma(b.fneg(b.fmul(dmw, dy)), b.sitofp(summs[t][p], e.vf32), acc)
                        b.store(acc, accs[t][p])
            else:
                m30 = e.const_i32(0x30303030)
                # per step kk, one load each of ql (two steps) and qh gives all four quarters q1..q4 of
                # both row halves (parts); each quarter's accumulator covers one 16-element sub-block, so
                # its scale, loaded once, also weighs the sub-block's activation sum (the -32 offset).
                # Units as Q4_K's: several tokens take one part and the two quarters of one ql load at a
                # time, one token a whole group; a unit's scales weigh its activation sums before the next
                # unit starts, so no scale stays live to the record's end
                xo16 = b.mul(blk, _I64(16 * 4))
                units = ([([p], qs) for p in range(e.parts) for qs in ((0, 2), (1, 3))] if nt > 1
                         else [(list(range(e.parts)), (0, 1, 2, 3))])
                wb, xr = wbase, rqp
                for h in range(2):
                    for g in range(2):
                        prefetch_slice(rb, 2 * h + g, 4)
                        for parts, qs in units:
                            a = {(p, qi): [e.acc_zero() for _ in range(nt)] for p in parts for qi in qs}

                            def flush(last, a=a, parts=parts, qs=qs, h=h, g=g):
                                # scales and sums read only once the products are (else LLVM loads
                                # them at the unit's start and spills them)
                                sums = [v for p in parts for qi in qs for v in a[p, qi]]
                                wb = e.after(wbase, sums)
                                x16 = [e.after(r, sums) for r in r16] if last else []
                                for p in parts:
                                    for qi in qs:
                                        sb = 8 * h + 2 * qi + g
                                        sc = bytes_i32(wb, rb, q6_scale(sb), p, True)
                                        for t in range(nt):
                                            isum[t][p] = b.add(isum[t][p], e.acc_scaled(a[p, qi][t], sc))
                                            a[p, qi][t] = e.acc_zero()
                                            if last:  # the -32 offset: 32 * scale * activation sum
                                                bs = e.load(x16[t], b.add(xo16, _I64(4 * sb)), _I32)
                                                bs32 = e.splat_i32(b.shl(bs, _I32(5)))
                                                isum[t][p] = b.sub(isum[t][p], b.mul(sc, bs32))

                            for kq in range(4):
                                kk = 4 * g + kq
                                if kq == 2 and tier == "avx2":  # int16 chunks of 4 products < 64 (32004)
                                    flush(False)
                                for p in parts:
                                    po = p * 4 * W
                                    qh = e.load(wb, b.add(rb, _I64(q6_qh(8 * h + kk) + po)), e.vi32)
                                    ql = {}
                                    for qi in qs:
                                        if qi % 2 not in ql:
                                            at = q6_ql(16 * h + kk + 8 * (qi % 2)) + po
                                            ql[qi % 2] = e.load(wb, b.add(rb, _I64(at)), e.vi32)
                                        low = ql[qi % 2] if qi < 2 else b.lshr(ql[qi % 2], e.const_i32(4))
                                        q = b.or_(b.and_(low, m0f), b.and_(_shift(b, qh, 4 - 2 * qi, e), m30))
                                        xo_q = b.add(xo, _I64(128 * h + 4 * kk + 32 * qi))
                                        for t in range(nt):
                                            xa = e.splat_i32(e.load(xr[p][t], xo_q, _I32))
                                            a[p, qi][t] = e.acc_add(a[p, qi][t], q, xa)
                            flush(True)
                            done = [isum[t][p] for t in range(nt) for p in parts]
                            wb, xr = e.after(wbase, done), chained(rq, done)
                for p in range(e.parts):
                    dw = e.half_to_f32(wbase, b.add(rb, _I64(3328 + p * 2 * W)))
                    for t in range(nt):
                        dy = e.splat_f32(e.load(rd[t], b.mul(blk, _I64(4)), _F32))
                        acc = b.load(accs[t][p])
                        acc = e.fma(b.fmul(dw, dy), b.sitofp(isum[t][p], e.vf32), acc)
                        b.store(acc, accs[t][p])
        for t in range(nt):
            for p in range(e.parts):
                off = _I64((t * LANES + p * W) * 4)
                b.store(b.load(accs[t][p]), e.ptr(res_base, off, e.vf32), align=4)
        return context.get_dummy_value()

    return codegen


def _make_kquant_intrinsic(kind: str, nt: int):
    tier = TIER

    @intrinsic
    def _kernel(typingctx, w, woff, nb, xq, xd, xb16, xb32, t0, pf, res):
        """res[0:nt, 0:16] = the group of 16 rows at w[woff:] times tokens t0..t0+nt-1 (Q8_K activations);
        pf as the legacy kernels'."""
        sig = types.void(w, woff, nb, xq, xd, xb16, xb32, t0, pf, res)
        return sig, _kquant_codegen(kind, nt, tier)

    return _kernel


# Tokens per weight load of the K-quant kernels that several tokens (a prompt, a server's batch) use, per
# tier. More tokens share each record loaded, but their accumulators outgrow the registers (16 on the avx2
# and AVX-VNNI tiers, each 16-lane value taking two) and spill. Since the kernels take one unit at a time
# (see ``_kquant_codegen``), four tokens spill little: stack stores a record, kernels of 2 / 4 tokens,
# before -> after: avx2 (haswell code) Q4_K 320 / 449 -> 38 / 146, Q6_K 379 / 532 -> 43 / 188; VNNI-512
# Q4_K 4 tokens 85 -> 7, Q6_K 55 / 100 -> 0 / 0.
# Per token on a 512 x 2048 matrix held in L2 (benchmarks/bench_kquant_tokens.py), us, kernels of
# 1 / 2 / 3 / 4 tokens, a 2-core Xeon VM (Sapphire Rapids class), two runs' medians:
#   avx2 (haswell code)  Q4_K 16.3, 16.1 / 14.6, 13.2 / 12.2, 12.2 / 13.7, 12.8
#                        Q5_K 29.1, 28.6 / 20.4, 18.0 / 18.2, 17.0 / 16.1, 15.6
#                        Q6_K 34.4, 30.9 / 24.1, 23.2 / 20.7, 21.9 / 21.5, 22.3
#   vnni256 (alderlake code: 16 registers)  Q4_K 13.3 / 10.7 / 10.3 / 9.4   Q5_K 23.8 / 14.4 / 13.1 / 11.4
#                        Q6_K 24.8 / 15.8 / 15.6 / 14.2
#   vnni512              Q4_K 10.6, 11.1 / 7.6, 7.5 / 7.2, 7.8 / 7.1, 6.5
#                        Q5_K 15.1, 14.6 / 9.9, 10.1 / 8.6, 7.8 / 8.0, 8.3
#                        Q6_K 16.0, 15.4 / 10.5, 10.1 / 10.0, 9.4 / 8.9, 8.3
# The same runs' figures before the units, two tokens and more: avx2 Q4_K 16.0-21.4 / 15.5-21.1 /
# 16.8-19.5, vnni256 Q6_K 21.7 / 20.6 / 21.3, vnni512 Q6_K 11.9-12.5 / 12.2-13.2 / 11.2-12.8. Zen 4
# measured before the units (choices then: avx2 Q4_K 1, Q5_K 3, Q6_K 4; VNNI Q6_K 2), and its avx2 figures
# fell into two groups by process (address randomization), the kernels that spilled more slowing down more:
#   vnni512       Q4_K 8.3-8.6 / 6.4-6.5 / 6.3-6.5 / 6.1-6.3   Q5_K 13.2-17.1 / 8.7-9.2 / 7.2-7.6 / 10.1-14.5
#                 Q6_K 13.9-16.0 / 9.6-10.9 / 10.4-13.8 / 10.1-13.6
#   avx2, faster  Q4_K 13.6-13.8 / 15.0-15.2 / 13.8-14.1 / 17.0-18.4   Q5_K 22.0-23.3 / 17.3-17.4 /
#                 18.6-19.1 / 18.9-19.9   Q6_K 24.2-26.3 / 20.3-20.7 / 19.8-21.4 / 23.1-25.4
# Zen 4 was not measured since. A Zen 5 EPYC (family 26), medians of 5 (range), one process each:
#   avx2 (haswell code)  Q4_K 9.8 / 8.2 / 9.1 / 9.5   Q5_K 16.4 / 12.6 / 13.7 / 13.1
#                        Q6_K 26.7 / 17.1 / 21.0 (15.6-21.7) / 16.3
#   vnni512              Q4_K 5.4 / 4.1 / 3.5 / 3.3   Q5_K 6.0 / 4.7 / 4.0 / 3.9   Q6_K 7.2 / 5.5 / 5.0 / 4.4
# There the avx2 choices are 4-29% off the fastest (Q4_K x2, Q5_K x2, Q6_K x4) where on the Xeon those were
# 2-27% off its fastest: no choice is best on both, and neither is the AVX2-only CPU this tier is for, so
# they stay as measured on the Xeon. The results do not depend on the choice: each token's row is the same
# integers and float32 operations whatever its neighbours.
KQUANT_TOKENS = {"vnni512": {"q4_K": 4, "q5_K": 3, "q6_K": 4},
                 "vnni256": {"q4_K": 4, "q5_K": 4, "q6_K": 4},
                 "avx2": {"q4_K": 3, "q5_K": 4, "q6_K": 3}}

if TIER is not None:
    q4_K_x1 = _make_kquant_intrinsic("q4_K", 1)
    q5_K_x1 = _make_kquant_intrinsic("q5_K", 1)
    q6_K_x1 = _make_kquant_intrinsic("q6_K", 1)
    _one = {"q4_K": q4_K_x1, "q5_K": q5_K_x1, "q6_K": q6_K_x1}
    # kind -> (kernel, tokens) for several tokens; one token's kernel where one is best (no second compile)
    kquant_multi = {kind: (_one[kind] if nt == 1 else _make_kquant_intrinsic(kind, nt), nt)
                    for kind, nt in KQUANT_TOKENS[TIER].items()}
