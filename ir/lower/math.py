"""Our own math functions, emitted as LLVM IR: the same code and accuracy on every target.

NVPTX and AMDGPU have no libm, and libdevice/ocml would make results differ between vendors,
so every transcendental op of the IR is expanded here into plain LLVM arithmetic (``fadd``,
``fmul``, ``fdiv``, ``llvm.rint``, bit operations). All functions are computed in **f64**;
``f32`` and ``f16`` operands are widened, computed in f64 and rounded once at the end, so their
results are within 1 ulp (in practice correctly rounded except in rare double-rounding
cases). The f64 results themselves are within a few ulp:

===========  ===============================================  ======================================
function     method                                           f64 error bound (f32/f16: ≤ 1 ulp)
===========  ===============================================  ======================================
exp, exp2    Cody-Waite reduction by ln 2, degree-13 Taylor    ≤ 1 ulp
log          fdlibm-style: 2·atanh(s) series, 10 terms         ≤ 1 ulp
log2         exponent + log(m)·log2(e)                         ≤ 2 ulp
sin, cos     3-part π/2 reduction, degree-17/18 Taylor        ≤ 2 ulp for |x| < 2^20·π/2; beyond
                                                              that the reduction loses accuracy
                                                              (f32 inputs: ≤ 1 ulp for |x| < 1.6e6)
tanh         expm1(2|x|) / (expm1(2|x|) + 2)                   ≤ 2 ulp
pow          exp(b·log|a|) with C99 special cases              ≤ 1 ulp for f32; f64 error grows with
                                                              |b·log a| (about |b·log a|·2^-53
                                                              relative, ≤ ~2^10 ulp)
===========  ===============================================  ======================================

Special values follow C99 Annex F (exp(-inf)=0, log(0)=-inf, log(<0)=NaN, sin(inf)=NaN,
pow(x, 0)=1, pow(1, y)=1, pow(-8, 1/3)=NaN ...). No fast-math flags are used anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from llvmlite import ir

F64 = ir.DoubleType()
I64 = ir.IntType(64)
I1 = ir.IntType(1)

LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
LOG2E = 1.4426950408889634
PIO2_1 = 1.57079632673412561417e+00
PIO2_2 = 6.07710050630396597660e-11
PIO2_3 = 2.02226624871116645580e-21
TWO_OVER_PI = 6.36619772367581382433e-01

#: Names of the functions this module provides.
FUNCTIONS = ("exp", "exp2", "log", "log2", "sin", "cos", "tanh", "pow")


def _c(v: float) -> ir.Constant:
    return ir.Constant(F64, v)


def _intrinsic(b: ir.IRBuilder, name: str, args: list[ir.Value]) -> ir.Value:
    mod = b.module
    fn = mod.globals.get(name)
    if fn is None:
        fn = ir.Function(mod, ir.FunctionType(F64, [F64] * len(args)), name=name)
    return b.call(fn, args)


def _horner(b: ir.IRBuilder, x: ir.Value, coeffs: list[float]) -> ir.Value:
    """coeffs[0] + x*(coeffs[1] + x*(...)), highest degree last."""
    acc: ir.Value = _c(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = b.fadd(b.fmul(acc, x), _c(c))
    return acc


def _pow2i(b: ir.IRBuilder, n: ir.Value) -> ir.Value:
    """2.0**n for an i64 n in [-1022, 1023], built from the exponent bits."""
    bits = b.shl(b.add(n, ir.Constant(I64, 1023)), ir.Constant(I64, 52))
    return b.bitcast(bits, F64)


def _scale(b: ir.IRBuilder, p: ir.Value, n: ir.Value) -> ir.Value:
    """p * 2**n for i64 n in [-1100, 1100] (two steps, so subnormal results stay exact-ish)."""
    n1 = b.ashr(n, ir.Constant(I64, 1))
    n2 = b.sub(n, n1)
    return b.fmul(b.fmul(p, _pow2i(b, n1)), _pow2i(b, n2))


def _exp_core(b: ir.IRBuilder, x: ir.Value, k: ir.Value, r: ir.Value) -> ir.Value:
    """e**r * 2**k, with the overflow/underflow/NaN cases of exp(x) applied."""
    p = _horner(b, r, [1.0 / math.factorial(i) for i in range(14)])
    n = b.fptosi(k, I64)
    res = _scale(b, p, n)
    res = b.select(b.fcmp_ordered(">", x, _c(709.782712893384)), _c(math.inf), res)
    res = b.select(b.fcmp_ordered("<", x, _c(-745.2)), _c(0.0), res)
    return b.select(b.fcmp_unordered("uno", x, x), x, res)


def _def(mod: ir.Module, name: str, nargs: int,
         body: Callable[[ir.IRBuilder, list[ir.Value]], ir.Value]) -> ir.Function:
    fn = mod.globals.get(name)
    if fn is not None:
        return fn
    fn = ir.Function(mod, ir.FunctionType(F64, [F64] * nargs), name=name)
    fn.linkage = "internal"
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.ret(body(b, list(fn.args)))
    return fn


def _exp(b: ir.IRBuilder, a: list[ir.Value]) -> ir.Value:
    x = a[0]
    xc = _clamp(b, x, -746.0, 710.0)
    k = _intrinsic(b, "llvm.rint.f64", [b.fmul(xc, _c(LOG2E))])
    r = b.fsub(b.fsub(xc, b.fmul(k, _c(LN2_HI))), b.fmul(k, _c(LN2_LO)))
    return _exp_core(b, x, k, r)


def _exp2(b: ir.IRBuilder, a: list[ir.Value]) -> ir.Value:
    x = a[0]
    xc = _clamp(b, x, -1080.0, 1030.0)
    k = _intrinsic(b, "llvm.rint.f64", [xc])
    r = b.fmul(b.fsub(xc, k), _c(math.log(2.0)))
    res = _exp_core(b, b.fmul(xc, _c(math.log(2.0))), k, r)
    res = b.select(b.fcmp_ordered(">=", x, _c(1024.0)), _c(math.inf), res)
    return b.select(b.fcmp_unordered("uno", x, x), x, res)


def _clamp(b: ir.IRBuilder, x: ir.Value, lo: float, hi: float) -> ir.Value:
    x = b.select(b.fcmp_ordered("<", x, _c(lo)), _c(lo), x)
    x = b.select(b.fcmp_ordered(">", x, _c(hi)), _c(hi), x)
    return b.select(b.fcmp_unordered("uno", x, x), _c(0.0), x)


def _log_parts(b: ir.IRBuilder, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(k as f64, log(m)) with x = m * 2**k, m in [sqrt(1/2), sqrt(2)); x finite and > 0."""
    tiny = b.fcmp_ordered("<", x, _c(2.2250738585072014e-308))
    xs = b.select(tiny, b.fmul(x, _c(2.0 ** 54)), x)
    bits = b.bitcast(xs, I64)
    # Bias the mantissa so that m lands in [sqrt(1/2), sqrt(2)): add (0x3ff0000000000000 - 0x3fe6a09e00000000).
    hx = b.add(bits, ir.Constant(I64, 0x3FF0000000000000 - 0x3FE6A09E667F3BCD))
    k = b.sub(b.lshr(hx, ir.Constant(I64, 52)), ir.Constant(I64, 1023))
    k = b.sub(k, b.select(tiny, ir.Constant(I64, 54), ir.Constant(I64, 0)))
    mbits = b.add(b.and_(hx, ir.Constant(I64, 0x000FFFFFFFFFFFFF)), ir.Constant(I64, 0x3FE6A09E667F3BCD))
    m = b.bitcast(mbits, F64)
    f = b.fsub(m, _c(1.0))
    s = b.fdiv(f, b.fadd(_c(2.0), f))
    z = b.fmul(s, s)
    r = b.fmul(z, _horner(b, z, [2.0 / (2 * i + 3) for i in range(11)]))
    hfsq = b.fmul(_c(0.5), b.fmul(f, f))
    logm = b.fsub(f, b.fsub(hfsq, b.fmul(s, b.fadd(hfsq, r))))
    return b.sitofp(k, F64), logm


def _log_special(b: ir.IRBuilder, x: ir.Value, res: ir.Value) -> ir.Value:
    res = b.select(b.fcmp_ordered("==", x, _c(math.inf)), x, res)
    res = b.select(b.fcmp_ordered("==", x, _c(0.0)), _c(-math.inf), res)
    res = b.select(b.fcmp_ordered("<", x, _c(0.0)), _c(math.nan), res)
    return b.select(b.fcmp_unordered("uno", x, x), x, res)


def _log(b: ir.IRBuilder, a: list[ir.Value]) -> ir.Value:
    x = a[0]
    k, logm = _log_parts(b, x)
    res = b.fadd(b.fmul(k, _c(LN2_HI)), b.fadd(logm, b.fmul(k, _c(LN2_LO))))
    return _log_special(b, x, res)


def _log2(b: ir.IRBuilder, a: list[ir.Value]) -> ir.Value:
    x = a[0]
    k, logm = _log_parts(b, x)
    return _log_special(b, x, b.fadd(k, b.fmul(logm, _c(LOG2E))))


def _sincos_reduce(b: ir.IRBuilder, x: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(sin(r), cos(r), quadrant) with x = r + q*pi/2, |r| <= pi/4."""
    k = _intrinsic(b, "llvm.rint.f64", [b.fmul(x, _c(TWO_OVER_PI))])
    r = b.fsub(b.fsub(b.fsub(x, b.fmul(k, _c(PIO2_1))), b.fmul(k, _c(PIO2_2))), b.fmul(k, _c(PIO2_3)))
    z = b.fmul(r, r)
    sin_c = [(-1.0) ** i / math.factorial(2 * i + 1) for i in range(9)]
    cos_c = [(-1.0) ** i / math.factorial(2 * i) for i in range(10)]
    s = b.fmul(r, _horner(b, z, sin_c))
    c = _horner(b, z, cos_c)
    ksat = _intrinsic_sat(b, k)
    q = b.and_(ksat, ir.Constant(I64, 3))
    return s, c, q


def _intrinsic_sat(b: ir.IRBuilder, k: ir.Value) -> ir.Value:
    name = "llvm.fptosi.sat.i64.f64"
    fn = b.module.globals.get(name)
    if fn is None:
        fn = ir.Function(b.module, ir.FunctionType(I64, [F64]), name=name)
    return b.call(fn, [k])


def _quadrant(b: ir.IRBuilder, q: ir.Value, vals: tuple[ir.Value, ir.Value, ir.Value, ir.Value]) -> ir.Value:
    r01 = b.select(b.icmp_unsigned("==", q, ir.Constant(I64, 0)), vals[0], vals[1])
    r23 = b.select(b.icmp_unsigned("==", q, ir.Constant(I64, 2)), vals[2], vals[3])
    return b.select(b.icmp_unsigned("<", q, ir.Constant(I64, 2)), r01, r23)


def _sin(b: ir.IRBuilder, a: list[ir.Value]) -> ir.Value:
    s, c, q = _sincos_reduce(b, a[0])
    res = _quadrant(b, q, (s, c, b.fneg(s), b.fneg(c)))
    # sin(-0) = -0: r is exact for tiny x, but keep the sign of zero explicitly.
    return b.select(b.fcmp_ordered("==", a[0], _c(0.0)), a[0], res)


def _cos(b: ir.IRBuilder, a: list[ir.Value]) -> ir.Value:
    s, c, q = _sincos_reduce(b, a[0])
    return _quadrant(b, q, (c, b.fneg(s), b.fneg(c), s))


def _expm1_pos(b: ir.IRBuilder, u: ir.Value) -> ir.Value:
    """expm1(u) for u >= 0, accurate near 0."""
    small = _horner(b, u, [1.0 / math.factorial(i) for i in range(1, 16)])
    small = b.fmul(u, small)
    big = b.fsub(_exp(b, [u]), _c(1.0))
    return b.select(b.fcmp_ordered("<", u, _c(0.35)), small, big)


def _tanh(b: ir.IRBuilder, a: list[ir.Value]) -> ir.Value:
    x = a[0]
    ax = _intrinsic(b, "llvm.fabs.f64", [x])
    axc = b.select(b.fcmp_ordered(">", ax, _c(40.0)), _c(40.0), ax)
    em1 = _expm1_pos(b, b.fmul(axc, _c(2.0)))
    t = b.fdiv(em1, b.fadd(em1, _c(2.0)))
    t = b.select(b.fcmp_ordered(">", ax, _c(22.0)), _c(1.0), t)
    res = _intrinsic(b, "llvm.copysign.f64", [t, x])
    return b.select(b.fcmp_unordered("uno", x, x), x, res)


def _pow(b: ir.IRBuilder, a: list[ir.Value]) -> ir.Value:
    x, y = a
    ax = _intrinsic(b, "llvm.fabs.f64", [x])
    r = _exp(b, [b.fmul(y, _log(b, [ax]))])
    fy = _intrinsic(b, "llvm.floor.f64", [y])
    y_int = b.fcmp_ordered("==", fy, y)
    half = b.fmul(y, _c(0.5))
    y_odd = b.and_(y_int, b.fcmp_unordered("!=", _intrinsic(b, "llvm.floor.f64", [half]), half))
    x_neg = b.fcmp_ordered("<", _intrinsic(b, "llvm.copysign.f64", [_c(1.0), x]), _c(0.0))
    r = b.select(b.and_(x_neg, y_odd), b.fneg(r), r)
    x_neg_finite = b.fcmp_ordered("<", x, _c(0.0))
    y_finite = b.fcmp_ordered("<", _intrinsic(b, "llvm.fabs.f64", [y]), _c(math.inf))
    r = b.select(b.and_(b.and_(x_neg_finite, b.not_(y_int)), y_finite), _c(math.nan), r)
    # pow(-1, ±inf) = 1; pow(1, y) = 1; pow(x, ±0) = 1 (also for NaN x and y).
    r = b.select(b.and_(b.fcmp_ordered("==", x, _c(-1.0)), b.not_(y_finite)),
                 b.select(b.fcmp_unordered("uno", y, y), y, _c(1.0)), r)
    r = b.select(b.fcmp_ordered("==", x, _c(1.0)), _c(1.0), r)
    return b.select(b.fcmp_ordered("==", y, _c(0.0)), _c(1.0), r)


_BODIES: dict[str, tuple[int, Callable[[ir.IRBuilder, list[ir.Value]], ir.Value]]] = {
    "exp": (1, _exp), "exp2": (1, _exp2), "log": (1, _log), "log2": (1, _log2),
    "sin": (1, _sin), "cos": (1, _cos), "tanh": (1, _tanh), "pow": (2, _pow),
}


def call_math(b: ir.IRBuilder, name: str, args: list[ir.Value]) -> ir.Value:
    """Emit ``name(args)`` (one of :data:`FUNCTIONS`) for f16/f32/f64 operands of one type."""
    nargs, body = _BODIES[name]
    fn = _def(b.module, f"vxpu.math.{name}.f64", nargs, body)
    ty = args[0].type
    if isinstance(ty, ir.DoubleType):
        return b.call(fn, args)
    wide = [b.fpext(v, F64) for v in args]
    return b.fptrunc(b.call(fn, wide), ty)
