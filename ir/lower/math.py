"""Our own math functions, emitted as LLVM IR: the same code and accuracy on every target.

NVPTX and AMDGPU have no libm, and libdevice/ocml would make results differ between vendors,
so every transcendental op of the IR is expanded here into plain LLVM arithmetic (``fadd``,
``fmul``, ``fdiv``, ``llvm.rint``, bit operations). f64 functions are computed in **f64**; so
are f16 ones and f32 ``pow``: the operands are widened, computed in f64 and rounded once at the
end, within 1 ulp (in practice correctly rounded except in rare double-rounding cases). f32
``exp exp2 log log2 sin cos tanh`` are computed in f32 (:mod:`.math_f32`), as short as CUDA's
own: within 1.5 ulp as plain IEEE f32 arithmetic, within 2.4 ulp where NVIDIA's ex2 unit is
used, as in CUDA (measured over all 2^32 inputs: docs/ir-lowering.md §3). The f64 results are
within a few ulp:

===========  ===============================================  ======================================
function     method                                           f64 error bound (f16: ≤ 1 ulp)
===========  ===============================================  ======================================
exp, exp2    Cody-Waite reduction by ln 2, degree-13 Taylor   ≤ 1 ulp
log          fdlibm-style: 2·atanh(s) series, 10 terms        ≤ 1 ulp
log2         exponent + log(m)·log2(e)                        ≤ 2 ulp
sin, cos     |x| < 2^20: 4-part Cody-Waite π/2 reduction      ≤ 1.5 ulp over the whole finite range
             (r + rl, exact sums); beyond: Payne–Hanek        (measured 1.43)
             (:mod:`.mathprec`); degree-17/18 Taylor
tanh         expm1(2|x|) / (expm1(2|x|) + 2)                  ≤ 3 ulp
pow          exp(y·log|a|), log|a| as a double-double         ≤ 1.5 ulp (measured 1.35)
             (:func:`.mathprec.log_dd`), the rounding error
             of y·log|a| added to exp's reduced argument;
             C99 special cases
===========  ===============================================  ======================================

Special values follow C99 Annex F (exp(-inf)=0, log(0)=-inf, log(<0)=NaN, sin(inf)=NaN,
pow(x, 0)=1, pow(1, y)=1, pow(-8, 1/3)=NaN ...). No fast-math flags are used anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from llvmlite import ir
from vxpu.ir.lower.math_f32 import Ex2Unit, exp_f32, log_f32, sincos_f32, tanh_f32
from vxpu.ir.lower.mathprec import fast_two_sum, fma, log_dd, reduce_pio2_large, split_mantissa, two_sum

F64 = ir.DoubleType()
I64 = ir.IntType(64)
I1 = ir.IntType(1)

LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
LOG2E = 1.4426950408889634
PIO2_1 = 1.57079632673412561417e+00
PIO2_2 = 6.07710050630396597660e-11
PIO2_3 = 2.02226624871116645580e-21
PIO2_3T = 8.47842766036889956997e-32
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


def _exp_core(b: ir.IRBuilder, x: ir.Value, k: ir.Value, r: ir.Value, lo: bool = False) -> ir.Value:
    """e**r * 2**k, with the overflow/underflow/NaN cases of exp(x) applied."""
    p = _horner(b, r, [1.0 / math.factorial(i) for i in range(10 if lo else 14)])
    n = b.fptosi(k, I64)
    # For f32/f16 results |k| <= 160, so one exact power of two suffices.
    res = b.fmul(p, _pow2i(b, n)) if lo else _scale(b, p, n)
    res = b.select(b.fcmp_ordered(">", x, _c(709.782712893384)), _c(math.inf), res)
    res = b.select(b.fcmp_ordered("<", x, _c(-745.2)), _c(0.0), res)
    return b.select(b.fcmp_unordered("uno", x, x), x, res)


def _def(mod: ir.Module, name: str, nargs: int, body: Callable[..., ir.Value], lo: bool) -> ir.Function:
    fn = mod.globals.get(name)
    if fn is not None:
        return fn
    fn = ir.Function(mod, ir.FunctionType(F64, [F64] * nargs), name=name)
    fn.linkage = "internal"
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.ret(body(b, list(fn.args), lo))
    return fn


def _exp(b: ir.IRBuilder, a: list[ir.Value], lo: bool = False) -> ir.Value:
    x = a[0]
    xc = _clamp(b, x, -110.0, 100.0) if lo else _clamp(b, x, -746.0, 710.0)
    k = _intrinsic(b, "llvm.rint.f64", [b.fmul(xc, _c(LOG2E))])
    r = b.fsub(b.fsub(xc, b.fmul(k, _c(LN2_HI))), b.fmul(k, _c(LN2_LO)))
    return _exp_core(b, x, k, r, lo)


def _exp_dd(b: ir.IRBuilder, x: ir.Value, x_lo: ir.Value) -> ir.Value:
    """exp(x + x_lo) for |x_lo| ≤ 2^-40·|x| (x_lo = 0 where |x| ≥ 1000 or x is not finite)."""
    xc = _clamp(b, x, -746.0, 710.0)
    k = _intrinsic(b, "llvm.rint.f64", [b.fmul(xc, _c(LOG2E))])
    r = b.fadd(b.fsub(b.fsub(xc, b.fmul(k, _c(LN2_HI))), b.fmul(k, _c(LN2_LO))), x_lo)
    return _exp_core(b, x, k, r)


def _exp2(b: ir.IRBuilder, a: list[ir.Value], lo: bool = False) -> ir.Value:
    x = a[0]
    xc = _clamp(b, x, -160.0, 140.0) if lo else _clamp(b, x, -1080.0, 1030.0)
    k = _intrinsic(b, "llvm.rint.f64", [xc])
    r = b.fmul(b.fsub(xc, k), _c(math.log(2.0)))
    res = _exp_core(b, b.fmul(xc, _c(math.log(2.0))), k, r, lo)
    res = b.select(b.fcmp_ordered(">=", x, _c(1024.0)), _c(math.inf), res)
    return b.select(b.fcmp_unordered("uno", x, x), x, res)


def _clamp(b: ir.IRBuilder, x: ir.Value, lo: float, hi: float) -> ir.Value:
    x = b.select(b.fcmp_ordered("<", x, _c(lo)), _c(lo), x)
    x = b.select(b.fcmp_ordered(">", x, _c(hi)), _c(hi), x)
    return b.select(b.fcmp_unordered("uno", x, x), _c(0.0), x)


def _log_parts(b: ir.IRBuilder, x: ir.Value, lo: bool = False) -> tuple[ir.Value, ir.Value]:
    """(k as f64, log(m)) with x = m * 2**k, m in [sqrt(1/2), sqrt(2)); x finite and > 0."""
    k, m = split_mantissa(b, x)
    f = b.fsub(m, _c(1.0))
    s = b.fdiv(f, b.fadd(_c(2.0), f))
    z = b.fmul(s, s)
    r = b.fmul(z, _horner(b, z, [2.0 / (2 * i + 3) for i in range(7 if lo else 11)]))
    hfsq = b.fmul(_c(0.5), b.fmul(f, f))
    logm = b.fsub(f, b.fsub(hfsq, b.fmul(s, b.fadd(hfsq, r))))
    return b.sitofp(k, F64), logm


def _log_special(b: ir.IRBuilder, x: ir.Value, res: ir.Value) -> ir.Value:
    res = b.select(b.fcmp_ordered("==", x, _c(math.inf)), x, res)
    res = b.select(b.fcmp_ordered("==", x, _c(0.0)), _c(-math.inf), res)
    res = b.select(b.fcmp_ordered("<", x, _c(0.0)), _c(math.nan), res)
    return b.select(b.fcmp_unordered("uno", x, x), x, res)


def _log(b: ir.IRBuilder, a: list[ir.Value], lo: bool = False) -> ir.Value:
    x = a[0]
    k, logm = _log_parts(b, x, lo)
    res = b.fadd(b.fmul(k, _c(LN2_HI)), b.fadd(logm, b.fmul(k, _c(LN2_LO))))
    return _log_special(b, x, res)


def _log2(b: ir.IRBuilder, a: list[ir.Value], lo: bool = False) -> ir.Value:
    x = a[0]
    k, logm = _log_parts(b, x, lo)
    return _log_special(b, x, b.fadd(k, b.fmul(logm, _c(LOG2E))))


def _sincos_reduce(b: ir.IRBuilder, x: ir.Value, lo: bool = False) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(sin(r), cos(r), quadrant) with x = r + q*pi/2, |r| <= pi/4.

    |x| < 2^20: 3-part Cody-Waite (k·PIO2_1 exact); otherwise, and for inf/NaN (→ NaN), Payne–Hanek
    (:func:`~vxpu.ir.lower.mathprec.reduce_pio2_large`) in a branch of its own."""
    fn = b.function
    small_blk, large_blk, join = (fn.append_basic_block(n) for n in ("cw", "payne_hanek", "reduced"))
    ax = _intrinsic(b, "llvm.fabs.f64", [x])
    b.cbranch(b.fcmp_ordered("<", ax, _c(2.0 ** 20)), small_blk, large_blk)
    b.position_at_end(small_blk)
    k = _intrinsic(b, "llvm.rint.f64", [b.fmul(x, _c(TWO_OVER_PI))])
    # PIO2_1..3 have 33 bits: their products with k are exact, and so is x − k·PIO2_1; the sums
    # are exact (two_sum) up to PIO2_3T, so r + rl keeps its accuracy near multiples of π/2.
    r_cw, e1 = two_sum(b, b.fsub(x, b.fmul(k, _c(PIO2_1))), b.fneg(b.fmul(k, _c(PIO2_2))))
    r_cw, e2 = two_sum(b, r_cw, b.fneg(b.fmul(k, _c(PIO2_3))))
    r_cw, rl_cw = fast_two_sum(b, r_cw, b.fsub(b.fadd(e1, e2), b.fmul(k, _c(PIO2_3T))))
    q_cw = b.and_(b.fptosi(k, I64), ir.Constant(I64, 3))
    b.branch(join)
    b.position_at_end(large_blk)
    r_ph, rl_ph, q_ph = reduce_pio2_large(b, ax)
    neg = b.fcmp_ordered("<", x, _c(0.0))
    finite = b.fcmp_ordered("<", ax, _c(math.inf))
    r_ph = b.select(finite, b.select(neg, b.fneg(r_ph), r_ph), _c(math.nan))
    rl_ph = b.select(neg, b.fneg(rl_ph), rl_ph)
    q_ph = b.select(neg, b.and_(b.sub(ir.Constant(I64, 0), q_ph), ir.Constant(I64, 3)), q_ph)
    b.branch(join)
    b.position_at_end(join)
    r, rl, q = b.phi(F64), b.phi(F64), b.phi(I64)
    for phi, small_val, large_val in ((r, r_cw, r_ph), (rl, rl_cw, rl_ph), (q, q_cw, q_ph)):
        phi.add_incoming(small_val, small_blk)
        phi.add_incoming(large_val, large_blk)
    z = b.fmul(r, r)
    sin_c = [(-1.0) ** i / math.factorial(2 * i + 1) for i in range(7 if lo else 9)]
    cos_c = [(-1.0) ** i / math.factorial(2 * i) for i in range(8 if lo else 10)]
    s = b.fmul(r, _horner(b, z, sin_c))
    c = _horner(b, z, cos_c)
    # sin(r + rl) = sin r + rl·cos r, cos(r + rl) = cos r − rl·sin r (|rl| ≤ ulp(r)).
    return fma(b, rl, c, s), fma(b, b.fneg(rl), s, c), q


def _quadrant(b: ir.IRBuilder, q: ir.Value, vals: tuple[ir.Value, ir.Value, ir.Value, ir.Value]) -> ir.Value:
    r01 = b.select(b.icmp_unsigned("==", q, ir.Constant(I64, 0)), vals[0], vals[1])
    r23 = b.select(b.icmp_unsigned("==", q, ir.Constant(I64, 2)), vals[2], vals[3])
    return b.select(b.icmp_unsigned("<", q, ir.Constant(I64, 2)), r01, r23)


def _sin(b: ir.IRBuilder, a: list[ir.Value], lo: bool = False) -> ir.Value:
    s, c, q = _sincos_reduce(b, a[0], lo)
    res = _quadrant(b, q, (s, c, b.fneg(s), b.fneg(c)))
    # sin(-0) = -0: r is exact for tiny x, but keep the sign of zero explicitly.
    return b.select(b.fcmp_ordered("==", a[0], _c(0.0)), a[0], res)


def _cos(b: ir.IRBuilder, a: list[ir.Value], lo: bool = False) -> ir.Value:
    s, c, q = _sincos_reduce(b, a[0], lo)
    return _quadrant(b, q, (c, b.fneg(s), b.fneg(c), s))


def _expm1_pos(b: ir.IRBuilder, u: ir.Value, lo: bool = False) -> ir.Value:
    """expm1(u) for u >= 0, accurate near 0."""
    small = _horner(b, u, [1.0 / math.factorial(i) for i in range(1, 12 if lo else 16)])
    small = b.fmul(u, small)
    big = b.fsub(_exp(b, [u], lo), _c(1.0))
    return b.select(b.fcmp_ordered("<", u, _c(0.35)), small, big)


def _tanh(b: ir.IRBuilder, a: list[ir.Value], lo: bool = False) -> ir.Value:
    x = a[0]
    ax = _intrinsic(b, "llvm.fabs.f64", [x])
    axc = b.select(b.fcmp_ordered(">", ax, _c(40.0)), _c(40.0), ax)
    em1 = _expm1_pos(b, b.fmul(axc, _c(2.0)), lo)
    t = b.fdiv(em1, b.fadd(em1, _c(2.0)))
    t = b.select(b.fcmp_ordered(">", ax, _c(22.0)), _c(1.0), t)
    res = _intrinsic(b, "llvm.copysign.f64", [t, x])
    return b.select(b.fcmp_unordered("uno", x, x), x, res)


def _pow(b: ir.IRBuilder, a: list[ir.Value], lo: bool = False) -> ir.Value:
    x, y = a
    ax = _intrinsic(b, "llvm.fabs.f64", [x])
    # log|x| in double-double and y·log|x| with its rounding error: |y·log x| ≤ 745 amplifies any
    # error of the logarithm, even for f32.
    lg, lg_lo = log_dd(b, ax)
    w = b.fmul(y, lg)
    w_lo = b.fadd(fma(b, y, lg, b.fneg(w)), b.fmul(y, lg_lo))
    w_lo = b.select(b.fcmp_ordered("<", _intrinsic(b, "llvm.fabs.f64", [w]), _c(1000.0)), w_lo, _c(0.0))
    r = _exp_dd(b, w, w_lo)
    fy = _intrinsic(b, "llvm.floor.f64", [y])
    y_int = b.fcmp_ordered("==", fy, y)
    half = b.fmul(y, _c(0.5))
    y_odd = b.and_(y_int, b.fcmp_unordered("!=", _intrinsic(b, "llvm.floor.f64", [half]), half))
    x_neg = b.fcmp_ordered("<", _intrinsic(b, "llvm.copysign.f64", [_c(1.0), x]), _c(0.0))
    r = b.select(b.and_(x_neg, y_odd), b.fneg(r), r)
    x_neg_finite = b.and_(b.fcmp_ordered("<", x, _c(0.0)), b.fcmp_ordered(">", x, _c(-math.inf)))
    y_finite = b.fcmp_ordered("<", _intrinsic(b, "llvm.fabs.f64", [y]), _c(math.inf))
    r = b.select(b.and_(b.and_(x_neg_finite, b.not_(y_int)), y_finite), _c(math.nan), r)
    # pow(-1, ±inf) = 1; pow(1, y) = 1; pow(x, ±0) = 1 (also for NaN x and y).
    r = b.select(b.and_(b.fcmp_ordered("==", x, _c(-1.0)), b.not_(y_finite)),
                 b.select(b.fcmp_unordered("uno", y, y), y, _c(1.0)), r)
    r = b.select(b.fcmp_ordered("==", x, _c(1.0)), _c(1.0), r)
    return b.select(b.fcmp_ordered("==", y, _c(0.0)), _c(1.0), r)


_BODIES: dict[str, tuple[int, Callable[..., ir.Value]]] = {
    "exp": (1, _exp), "exp2": (1, _exp2), "log": (1, _log), "log2": (1, _log2),
    "sin": (1, _sin), "cos": (1, _cos), "tanh": (1, _tanh), "pow": (2, _pow),
}


def call_math(b: ir.IRBuilder, name: str, args: list[ir.Value], ex2_unit: Ex2Unit | None = None) -> ir.Value:
    """Emit ``name(args)`` (one of :data:`FUNCTIONS`) for f16/f32/f64 operands of one type.

    f32 ``exp exp2 log log2 sin cos tanh`` are computed in f32 (:mod:`.math_f32`); ``ex2_unit``
    is the target's hardware f32 2^x, which f32 exp, exp2 and tanh are built on where given."""
    nargs, body = _BODIES[name]
    ty = args[0].type
    if isinstance(ty, ir.FloatType) and name in _F32_NATIVE:
        return _F32_NATIVE[name](b, args[0], ex2_unit)
    if isinstance(ty, ir.DoubleType):
        return b.call(_def(b.module, f"vxpu.math.{name}.f64", nargs, body, False), args)
    # f32 pow and f16 results: computed in f64 with series cut to ~1e-11 relative error (far
    # below half an f32 ulp), then rounded once.
    return _narrowed(b, name, args)


def _narrowed(b: ir.IRBuilder, name: str, args: list[ir.Value]) -> ir.Value:
    """``name(args)`` for f16/f32 operands through the f64 function with shortened series."""
    nargs, body = _BODIES[name]
    ty = args[0].type
    fn = _def(b.module, f"vxpu.math.{name}.f64lo", nargs, body, True)
    res = b.call(fn, [b.fpext(v, F64) for v in args])
    return fptrunc_f64_to_f16(b, res) if isinstance(ty, ir.HalfType) else b.fptrunc(res, ty)


_F32_NATIVE: dict[str, Callable[[ir.IRBuilder, ir.Value, Ex2Unit | None], ir.Value]] = {
    "exp": lambda b, x, unit: exp_f32(b, x, False, unit),
    "exp2": lambda b, x, unit: exp_f32(b, x, True, unit),
    "log": lambda b, x, unit: log_f32(b, x, False),
    "log2": lambda b, x, unit: log_f32(b, x, True),
    "sin": lambda b, x, unit: sincos_f32(b, x, False, lambda b2, v: _narrowed(b2, "sin", [v])),
    "cos": lambda b, x, unit: sincos_f32(b, x, True, lambda b2, v: _narrowed(b2, "cos", [v])),
    "tanh": tanh_f32,
}


def _fmod_fn(mod: ir.Module, ft: ir.Type) -> ir.Function:
    """Exact C ``fmod`` on the bit patterns (musl's algorithm; no division, no libcall).

    At most (exponent range) loop iterations: 277 for f32, 2098 for f64.
    """
    name = f"vxpu.math.fmod.{'f64' if isinstance(ft, ir.DoubleType) else 'f32'}"
    fn = mod.globals.get(name)
    if fn is None:
        fn = _Fmod(mod, ft, name).fn
    return fn


class _Fmod:
    """Emits one ``fmod`` function: special cases, normalisation, shift-subtract loop, repack."""

    def __init__(self, mod: ir.Module, ft: ir.Type, name: str) -> None:
        wide = isinstance(ft, ir.DoubleType)
        self.ft = ft
        self.w, self.m, self.emask = (64, 52, 0x7FF) if wide else (32, 23, 0xFF)
        self.it = ir.IntType(self.w)
        self.ctlz = mod.globals.get(f"llvm.ctlz.i{self.w}") or ir.Function(
            mod, ir.FunctionType(self.it, [self.it, I1]), name=f"llvm.ctlz.i{self.w}")
        self.fn = fn = ir.Function(mod, ir.FunctionType(ft, [ft, ft]), name=name)
        fn.linkage = "internal"
        self.blk = {n: fn.append_basic_block(n) for n in ("entry", "special", "small", "norm", "loop", "step",
                                                          "again", "tail", "exit")}
        self.b = ir.IRBuilder(self.blk["entry"])
        self.result: list[tuple[ir.Value, ir.Block]] = []
        self._emit()

    def c(self, v: int) -> ir.Constant:
        return ir.Constant(self.it, v)

    def _emit(self) -> None:
        b, c, (x, y) = self.b, self.c, self.fn.args
        ux, uy = b.bitcast(x, self.it), b.bitcast(y, self.it)
        ex = b.and_(b.lshr(ux, c(self.m)), c(self.emask))
        ey = b.and_(b.lshr(uy, c(self.m)), c(self.emask))
        ux2, uy2 = b.shl(ux, c(1)), b.shl(uy, c(1))
        sign = b.and_(ux, c(1 << (self.w - 1)))
        special = b.or_(b.or_(b.icmp_unsigned("==", uy2, c(0)), b.fcmp_unordered("uno", y, y)),
                        b.icmp_unsigned("==", ex, c(self.emask)))
        b.cbranch(special, self.blk["special"], self.blk["small"])
        sb = ir.IRBuilder(self.blk["special"])
        xy = sb.fmul(x, y)
        self.result.append((sb.fdiv(xy, xy), self.blk["special"]))  # NaN
        sb.branch(self.blk["exit"])
        b.position_at_end(self.blk["small"])
        zero_x = b.fmul(x, ir.Constant(self.ft, 0.0))  # ±0 with the sign of x
        self.result.append((b.select(b.icmp_unsigned("==", ux2, uy2), zero_x, x), self.blk["small"]))
        b.cbranch(b.icmp_unsigned("<=", ux2, uy2), self.blk["exit"], self.blk["norm"])
        b.position_at_end(self.blk["norm"])
        nx, nex = self._normalize(ux, ex)
        ny, ney = self._normalize(uy, ey)
        kept, cur_e = self._loop(nx, nex, ny, ney, zero_x)
        self._tail(kept, cur_e, sign)
        b.position_at_end(self.blk["exit"])
        res = b.phi(self.ft)
        for val, blk in self.result:
            res.add_incoming(val, blk)
        b.ret(res)

    def _normalize(self, u: ir.Value, e: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(mantissa with its leading 1 at bit m, exponent) also for subnormals."""
        b, c = self.b, self.c
        lz = b.call(self.ctlz, [b.shl(u, c(self.w - self.m)), ir.Constant(I1, 0)])
        amount = b.add(lz, c(1))
        amount = b.select(b.icmp_unsigned(">=", amount, c(self.w)), c(0), amount)  # never a poison shift
        is_sub = b.icmp_unsigned("==", e, c(0))
        norm_u = b.or_(b.and_(u, c((1 << self.m) - 1)), c(1 << self.m))
        return b.select(is_sub, b.shl(u, amount), norm_u), b.select(is_sub, b.sub(c(0), lz), e)

    def _loop(self, nx: ir.Value, nex: ir.Value, ny: ir.Value, ney: ir.Value,
              zero_x: ir.Value) -> tuple[ir.Value, ir.Value]:
        """Shift-subtract from exponent ex down to ey; exits early with ±0 on an exact zero."""
        b, c = self.b, self.c
        pre = b.block
        b.branch(self.blk["loop"])
        b.position_at_end(self.blk["loop"])
        cur_u, cur_e = b.phi(self.it), b.phi(self.it)
        cur_u.add_incoming(nx, pre)
        cur_e.add_incoming(nex, pre)
        diff = b.sub(cur_u, ny)
        nonneg = b.icmp_signed(">=", diff, c(0))
        kept = b.select(nonneg, diff, cur_u)
        self.result.append((zero_x, self.blk["loop"]))
        b.cbranch(b.and_(nonneg, b.icmp_unsigned("==", diff, c(0))), self.blk["exit"], self.blk["step"])
        b.position_at_end(self.blk["step"])
        b.cbranch(b.icmp_signed(">", cur_e, ney), self.blk["again"], self.blk["tail"])
        ab = ir.IRBuilder(self.blk["again"])
        cur_u.add_incoming(ab.shl(kept, c(1)), self.blk["again"])
        cur_e.add_incoming(ab.sub(cur_e, c(1)), self.blk["again"])
        ab.branch(self.blk["loop"])
        return kept, cur_e

    def _tail(self, kept: ir.Value, e0: ir.Value, sign: ir.Value) -> None:
        """Renormalise the remainder and pack it (normal or subnormal) with the sign of x."""
        b, c, w, m = self.b, self.c, self.w, self.m
        b.position_at_end(self.blk["tail"])
        shift = b.sub(b.call(self.ctlz, [kept, ir.Constant(I1, 0)]), c(w - 1 - m))  # kept != 0 here
        u = b.shl(kept, shift)
        e = b.sub(e0, shift)
        normal = b.or_(b.sub(u, c(1 << m)), b.shl(e, c(m)))
        sub_shift = b.sub(c(1), e)
        subn = b.lshr(u, b.select(b.icmp_signed(">", sub_shift, c(w - 1)), c(w - 1), sub_shift))
        bits = b.or_(b.select(b.icmp_signed(">", e, c(0)), normal, subn), sign)
        self.result.append((b.bitcast(bits, self.ft), self.blk["tail"]))
        b.branch(self.blk["exit"])


def call_fmod(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """Exact ``fmod(x, y)`` for f16/f32/f64 (f16 through f32, which is exact)."""
    if isinstance(x.type, ir.HalfType):
        f32t = ir.FloatType()
        r = b.call(_fmod_fn(b.module, f32t), [b.fpext(x, f32t), b.fpext(y, f32t)])
        return b.fptrunc(r, x.type)
    return b.call(_fmod_fn(b.module, x.type), [x, y])


def fptrunc_f64_to_f16(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Correctly rounded f64 → f16 without a libcall: round to f32 *to odd*, then to f16.

    Round-to-odd to a format with at least two more bits than the target makes the second
    rounding correct (f32 has 24 bits, f16 11)."""
    f32t = ir.FloatType()
    i32t = ir.IntType(32)
    r = b.fptrunc(x, f32t)
    back = b.fpext(r, F64)
    inexact = b.fcmp_ordered("!=", back, x)
    # Nearest rounding went away from zero: step one ulp back toward zero (truncation).
    ax = _intrinsic(b, "llvm.fabs.f64", [x])
    aback = _intrinsic(b, "llvm.fabs.f64", [back])
    bits = b.bitcast(r, i32t)
    away = b.and_(inexact, b.fcmp_ordered(">", aback, ax))
    bits = b.select(away, b.sub(bits, ir.Constant(i32t, 1)), bits)
    bits = b.select(inexact, b.or_(bits, ir.Constant(i32t, 1)), bits)
    return b.fptrunc(b.bitcast(bits, f32t), ir.HalfType())


def fma_f16(b: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    """Correctly rounded f16 ``fma`` without a libcall (for CPUs without f16 arithmetic).

    In f64 the product of two f16 values is exact; TwoSum gives the exact error of adding z,
    which turns the f64 sum into its round-to-odd value; rounding that to f16 (through f32, again
    to odd) is then a single correct rounding of x·y + z."""
    i64t = ir.IntType(64)
    xd, yd, zd = (b.fpext(v, F64) for v in (x, y, z))
    p = b.fmul(xd, yd)
    s = b.fadd(p, zd)
    bb = b.fsub(s, p)
    err = b.fadd(b.fsub(p, b.fsub(s, bb)), b.fsub(zd, bb))
    inexact = b.fcmp_ordered("!=", err, _c(0.0))
    away = b.and_(inexact, b.xor(b.fcmp_ordered("<", err, _c(0.0)), b.fcmp_ordered("<", s, _c(0.0))))
    bits = b.bitcast(s, i64t)
    bits = b.select(away, b.sub(bits, ir.Constant(i64t, 1)), bits)
    bits = b.select(inexact, b.or_(bits, ir.Constant(i64t, 1)), bits)
    return fptrunc_f64_to_f16(b, b.bitcast(bits, F64))
