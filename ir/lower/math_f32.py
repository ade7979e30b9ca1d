"""f32 ``exp`` and ``exp2`` computed in f32, around a target's hardware 2^x unit where it has one.

Every other math function (:mod:`vxpu.ir.lower.math`) widens f32 to f64; exp is the one that
softmax-like kernels call per element, so its f32 form is kept as short as the vendor's own.

Both forms write x·log2(e) = n + f with n an integer and return 2^f · 2^n:

* **With an ex2 unit** (:class:`Ex2Unit`; NVIDIA's ``ex2.approx``), the same 8 instructions as
  CUDA's ``expf``: a saturated fma clamps (x·log2(e) + 126)/253 to [0, 1] (``minnum``/``maxnum``,
  which ptxas folds into ``FFMA.SAT``; NaN becomes 0), a second fma adds 1.5·2^23 + 1 so that
  the sum rounds to an integer and its low mantissa bits hold n + 127, n ∈ [−126, 127]; one
  ``fsub`` gives −n as a float, two fmas f = x·log2(e) − n with log2(e) split in two f32 parts
  (|f| ≤ ½ while x·log2(e) ∈ [−126.5, 127.5]), the ex2 unit with subnormal results flushed gives
  2^f, and ``shl 23`` of the sum's bits is 2^n: one ``fmul`` scales exactly, and rounds a
  subnormal result once. Outside that interval n stays at its bound and f grows: 2^f overflows
  to inf (x·log2(e) ≥ 128) or becomes small enough for a subnormal or zero result; ±inf and
  NaN come out of the same arithmetic (f = ±inf or NaN), so there is no compare or select.
  f32 ``exp2`` is the unit itself with subnormal results (``ex2.approx.f32``, CUDA's ``exp2f``).
  Measured on an H200 over all 2^32 inputs: see docs/ir-lowering.md §3.
* **Without one** (x86, AMDGPU): k = rint(x·log2 e) by the same 1.5·2^23 trick, a Cody-Waite
  reduction by ln 2 in fma, a degree-6 Chebyshev polynomial for e^r (|r| ≤ ln2/2), and an exact
  two-step 2^k scaling (so subnormal results round once); NaN is put back by a select.
  ≤ 1 ulp (measured ≤ 0.9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llvmlite import ir

F32 = ir.FloatType()
I32 = ir.IntType(32)

LOG2E = 1.4426950408889634
LOG2E_HI = 1.4426950216293335  # log2(e) rounded to f32
LOG2E_LO = 1.925963033500011e-08  # log2(e) − LOG2E_HI rounded to f32 (residual 4e-16)
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: adding it rounds an f32 below 2^22 to an integer
#: 2^n for n ∈ [−126, 127] from t ∈ [0, 1]: n = rint(253·t) − 126, t ≈ (x·log2 e + 126) / 253.
_SPAN = 253.0
_T_SCALE = 0.005702352151274681  # f32(log2(e) / 253)
_T_BIAS = 0.49802371859550476  # f32(126 / 253)

#: Degree-6 Chebyshev interpolants of e^r on |r| <= ln2/2 and of 2^r on |r| <= 1/2, coefficients
#: rounded to f32 (relative error 2.0e-8 and 1.9e-8 in exact arithmetic: 0.17 ulp).
_EXP_F32 = (1.0, 1.0, 0.5, 0.16666415333747864, 0.04166635125875473, 0.00837512593716383,
            0.0013941108481958508)
_EXP2_F32 = (1.0, 0.6931471824645996, 0.24022650718688965, 0.05550327152013779, 0.009618056938052177,
             0.0013400427997112274, 0.00015461444854736328)

Core = Callable[[ir.IRBuilder, ir.Value], ir.Value]


@dataclass(frozen=True)
class Ex2Unit:
    """A target's hardware f32 2^x (NVIDIA: ``ex2.approx``, ≤ 2 ulp by the PTX ISA).

    Attributes:
        ftz: 2^x for every f32 x, results below 2^-126 flushed to +0 (``ex2.approx.ftz.f32``:
            one ``MUFU.EX2``). The core of ``exp``.
        full: 2^x with subnormal results (``ex2.approx.f32``; ptxas scales the input by ½ and
            squares the result below −126). The whole of ``exp2``.
    """

    ftz: Core
    full: Core


def exp_f32(b: ir.IRBuilder, x: ir.Value, base2: bool, unit: Ex2Unit | None = None) -> ir.Value:
    """``exp(x)`` (``base2``: ``exp2(x)``) of an f32 ``x``, in f32 arithmetic, branch-free.

    ``unit``: the target's 2^x unit, or None for the polynomial form."""
    if unit is None:
        return _exp_poly(b, x, base2)
    if base2:
        return unit.full(b, x)
    return _exp_unit(b, x, unit)


def _c(v: float) -> ir.Constant:
    return ir.Constant(F32, v)


def _call(b: ir.IRBuilder, name: str, args: list[ir.Value]) -> ir.Value:
    fn = b.module.globals.get(name) or ir.Function(b.module, ir.FunctionType(F32, [F32] * len(args)), name=name)
    return b.call(fn, args)


def _exp_unit(b: ir.IRBuilder, x: ir.Value, unit: Ex2Unit) -> ir.Value:
    """exp(x) = ex2_ftz(f) · 2^n (the module docstring's 8-instruction form)."""
    t = _call(b, "llvm.fma.f32", [x, _c(_T_SCALE), _c(_T_BIAS)])
    t = _call(b, "llvm.minnum.f32", [_call(b, "llvm.maxnum.f32", [t, _c(0.0)]), _c(1.0)])
    # j = 1.5·2^23 + 1 + rint(253·t): its low 9 mantissa bits are n + 127 ∈ [1, 254].
    j = _call(b, "llvm.fma.f32", [t, _c(_SPAN), _c(_ROUND_MAGIC + 1.0)])
    neg_n = b.fsub(_c(_ROUND_MAGIC + 127.0), j)  # −n, exact
    f = _call(b, "llvm.fma.f32", [x, _c(LOG2E_HI), neg_n])
    f = _call(b, "llvm.fma.f32", [x, _c(LOG2E_LO), f])
    scale = b.bitcast(b.shl(b.bitcast(j, I32), ir.Constant(I32, 23)), F32)  # 2^n, bits above 8 shifted out
    return b.fmul(unit.ftz(b, f), scale)


def _exp_poly(b: ir.IRBuilder, x: ir.Value, base2: bool) -> ir.Value:
    """exp(x) or exp2(x) with a degree-6 polynomial core (the module docstring's second form)."""
    lo, hi = (-152.0, 130.0) if base2 else (-105.0, 90.0)
    # maxnum/minnum return the number for a NaN operand; the NaN is put back at the end.
    xc = _call(b, "llvm.minnum.f32", [_call(b, "llvm.maxnum.f32", [x, _c(lo)]), _c(hi)])
    t = b.fadd(xc, _c(_ROUND_MAGIC)) if base2 else _call(b, "llvm.fma.f32", [xc, _c(LOG2E), _c(_ROUND_MAGIC)])
    k = b.fsub(t, _c(_ROUND_MAGIC))
    n = b.sub(b.bitcast(t, I32), ir.Constant(I32, 0x4B400000))
    if base2:
        r = b.fsub(xc, k)  # exact
    else:
        r = _call(b, "llvm.fma.f32", [k, _c(-6.9314575195e-01), xc])
        r = _call(b, "llvm.fma.f32", [k, _c(-1.4286067653e-06), r])
    coeffs = _EXP2_F32 if base2 else _EXP_F32
    p: ir.Value = _c(coeffs[-1])
    for co in reversed(coeffs[:-1]):
        p = _call(b, "llvm.fma.f32", [p, r, _c(co)])
    n1 = b.ashr(n, ir.Constant(I32, 1))
    n2 = b.sub(n, n1)

    def pow2(e: ir.Value) -> ir.Value:
        return b.bitcast(b.shl(b.add(e, ir.Constant(I32, 127)), ir.Constant(I32, 23)), F32)

    res = b.fmul(b.fmul(p, pow2(n1)), pow2(n2))
    return b.select(b.fcmp_unordered("uno", x, x), x, res)
