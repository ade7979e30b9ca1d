"""f32 math computed in f32: ``exp exp2 log log2 sin cos tanh`` as short as CUDA's own.

The other math functions (:mod:`vxpu.ir.lower.math`) widen f32 to f64, which costs a GPU 3-10
times the instructions of CUDA's f32 versions (f64 division subroutines included). These are
the ones kernels call per element (softmax, log-softmax, activations, rotary embeddings).

**exp, exp2.** Both write x·log2(e) = n + f with n an integer and return 2^f · 2^n.

* *With an ex2 unit* (:class:`Ex2Unit`; NVIDIA's ``ex2.approx``), the same 8 instructions as
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
* *Without one* (x86, AMDGPU): k = rint(x·log2 e) by the same 1.5·2^23 trick, a Cody-Waite
  reduction by ln 2 in fma, a degree-6 Chebyshev polynomial for e^r (|r| ≤ ln2/2), and an exact
  two-step 2^k scaling (so subnormal results round once); NaN is put back by a select.

**log, log2** (every target): x = m·2^e, m ∈ [2/3, 4/3), from the bits; log1p(m − 1) by a
degree-8 polynomial; one fma adds e·ln 2 (log2: a compensated e + f·log2 e). **sin, cos**:
|x| < 105615 (CUDA's bound) in f32: three-part Cody-Waite π/2 reduction in fma, degree-3
polynomials in r²; beyond, and for inf/NaN, the f64 function in a branch of its own.
**tanh**: a degree-5 odd polynomial below 0.75, 1 − 2/(e^(2|x|) + 1) above (with the ex2 unit:
``ex2.approx.ftz`` and ``rcp.approx.ftz``, as CUDA's ``tanhf``; without: the polynomial exp and
an IEEE division). Without an ex2 unit every one of these is plain IEEE f32 arithmetic (fma,
no fast-math): the same bits on x86, AMDGPU and NVIDIA, measured over all 2^32 inputs on x86
(``benchmarks/sweep_math_cpu.py``); NVIDIA's unit-based exp, exp2 and tanh are measured there
(``benchmarks/bench_math_gpu.py``). docs/ir-lowering.md §3 has the numbers.
"""

from __future__ import annotations

import math
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

#: (log1p(f) − f) / f² on |f| ≤ 1/3, degree 8, f32 coefficients (relative error of log1p 2^-26.4)
_LOG1P_P = (-0.5000000596046448, 0.33333203196525574, -0.2499910444021225, 0.20011448860168457,
            -0.16704179346561432, 0.13983820378780365, -0.11894933879375458, 0.14113087952136993,
            -0.1404706835746765)
LN2_F32 = 0.6931471824645996  # ln 2 rounded to f32 (relative error 2.8e-9: 0.05 ulp)
_TWO_THIRDS_BITS = 0x3F2AAAAB  # f32 bits of 2/3: x = m·2^e with m ∈ [2/3, 4/3)

#: π/2 = PIO2_1 + PIO2_2 + PIO2_3 (+ 1.1e-23), each rounded to f32
PIO2_1, PIO2_2, PIO2_3 = 1.5707963705062866, -4.371138828673793e-08, -1.7151245100058819e-15
TWO_OVER_PI_F32 = 0.6366197466850281
#: The fast sin/cos reduction's limit (CUDA's too); beyond it, and for inf/NaN, the f64 path.
SINCOS_FAST_LIMIT = 105615.0
#: (sin r − r) / r³ and (cos r − 1 + r²/2) / r⁴ as polynomials in r² on |r| ≤ π/4, degree 3, f32
#: coefficients (relative error of sin r and cos r 2^-28.2 and 2^-30.9)
_SIN_S = (-0.1666666716337204, 0.008333329111337662, -0.00019839327433146536, 2.7182370558875846e-06)
_COS_C = (0.0416666679084301, -0.0013888883404433727, 2.479951217537746e-05, -2.720954341839388e-07)

#: (tanh x − x) / x³ as a polynomial in x² on |x| ≤ 0.75, degree 5, f32 coefficients (2^-28.9)
_TANH_T = (-0.3333331346511841, 0.133326455950737, -0.05388803780078888, 0.02143276110291481,
           -0.007622024975717068, 0.0017133556539192796)
TANH_SMALL = 0.75

Core = Callable[[ir.IRBuilder, ir.Value], ir.Value]


@dataclass(frozen=True)
class Ex2Unit:
    """A target's hardware f32 2^x (NVIDIA: ``ex2.approx``, ≤ 2 ulp by the PTX ISA).

    Attributes:
        ftz: 2^x for every f32 x, results below 2^-126 flushed to +0 (``ex2.approx.ftz.f32``:
            one ``MUFU.EX2``). The core of ``exp``.
        full: 2^x with subnormal results (``ex2.approx.f32``; ptxas scales the input by ½ and
            squares the result below −126). The whole of ``exp2``.
        rcp: the same unit's 1/x, subnormal results flushed (``rcp.approx.ftz.f32``, ≤ 1 ulp):
            ``tanh`` divides by it, as CUDA's ``tanhf`` does.
    """

    ftz: Core
    full: Core
    rcp: Core


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


def _horner(b: ir.IRBuilder, x: ir.Value, coeffs: tuple[float, ...]) -> ir.Value:
    """coeffs[0] + x·(coeffs[1] + x·(…)) in fma, highest degree last."""
    acc: ir.Value = _c(coeffs[-1])
    for co in reversed(coeffs[:-1]):
        acc = _call(b, "llvm.fma.f32", [acc, x, _c(co)])
    return acc


def log_f32(b: ir.IRBuilder, x: ir.Value, base2: bool) -> ir.Value:
    """``log(x)`` (``base2``: ``log2(x)``) of an f32 ``x`` in f32 arithmetic (no f64, no division).

    x = m·2^e with m ∈ [2/3, 4/3) from the bits (subnormal x scaled by 2^23 first), f = m − 1
    (exact), log1p(f) = f + f²·P(f) with a degree-8 polynomial, then e·ln2 + log1p(f) in one fma
    (log2: e + f·log2(e) as a rounded sum and its error, plus the rest). x ≥ inf, NaN and negative x (bits ≥
    0x7F800000 unsigned) give x·inf + inf (inf, NaN, NaN); ±0 gives −inf."""
    tiny = b.fcmp_ordered("<", x, _c(1.1754943508222875e-38))
    xs = b.select(tiny, b.fmul(x, _c(8388608.0)), x)
    ib = b.bitcast(xs, I32)
    eb = b.and_(b.sub(ib, ir.Constant(I32, _TWO_THIRDS_BITS)), ir.Constant(I32, -(1 << 23)))  # e << 23
    m = b.bitcast(b.sub(ib, eb), F32)
    e = _call(b, "llvm.fma.f32", [b.sitofp(eb, F32), _c(2.0 ** -23), b.select(tiny, _c(-23.0), _c(0.0))])
    f = b.fsub(m, _c(1.0))  # exact (Sterbenz)
    fp = b.fmul(f, _horner(b, f, _LOG1P_P))  # log1p(f) = f + f·fp
    if base2:
        # hi = e + f·log2e rounded once; its rounding error is exact-ish because e − hi is
        # exact (Sterbenz: |f·log2e| < ½ and e an integer); the rest, f·fp·log2e + f·(log2e's
        # low part), is added last. Without the error term e + log1p(f)·log2e lost 1.6 ulp
        # where it cancels (e = ±1, f near ∓⅓).
        hi = _call(b, "llvm.fma.f32", [f, _c(LOG2E_HI), e])
        err = _call(b, "llvm.fma.f32", [f, _c(LOG2E_HI), b.fsub(e, hi)])
        rest = _call(b, "llvm.fma.f32", [b.fmul(f, fp), _c(LOG2E_HI), _call(b, "llvm.fma.f32", [f, _c(LOG2E_LO), err])])
        res = b.fadd(hi, rest)
    else:
        res = _call(b, "llvm.fma.f32", [e, _c(LN2_F32), _call(b, "llvm.fma.f32", [f, fp, f])])
    big = b.icmp_unsigned(">=", b.bitcast(x, I32), ir.Constant(I32, 0x7F800000))
    res = b.select(big, _call(b, "llvm.fma.f32", [x, _c(math.inf), _c(math.inf)]), res)
    return b.select(b.fcmp_ordered("==", x, _c(0.0)), _c(-math.inf), res)


def sincos_f32(b: ir.IRBuilder, x: ir.Value, cosine: bool, slow: Core) -> ir.Value:
    """``sin(x)`` or ``cos(x)`` of an f32 ``x``: f32 arithmetic for |x| < 105615, else ``slow(b, x)``.

    The fast path: k = rint(x·2/π) by the 1.5·2^23 trick (its low bits are k mod 4), r = x − k·π/2
    in three fmas (the first exact), then sin r = r + r³·S(r²) or cos r = 1 − r²/2 + r⁴·C(r²),
    picked and negated by the quadrant. ``slow`` (the f64 function: Payne–Hanek beyond 2^20)
    runs in a branch of its own that only threads with large |x|, inf or NaN take. Emitted as an
    internal function ``vxpu.math.{sin,cos}.f32`` that LLVM inlines."""
    name = f"vxpu.math.{'cos' if cosine else 'sin'}.f32"
    fn = b.module.globals.get(name)
    if fn is None:
        fn = ir.Function(b.module, ir.FunctionType(F32, [F32]), name=name)
        fn.linkage = "internal"
        _sincos_body(fn, cosine, slow)
    return b.call(fn, [x])


def _sincos_body(fn: ir.Function, cosine: bool, slow: Core) -> None:
    entry, fast, slow_blk, join = (fn.append_basic_block(n) for n in ("entry", "fast", "slow", "join"))
    b = ir.IRBuilder(entry)
    x = fn.args[0]
    b.cbranch(b.fcmp_ordered("<", _call(b, "llvm.fabs.f32", [x]), _c(SINCOS_FAST_LIMIT)), fast, slow_blk)
    b.position_at_end(fast)
    t = _call(b, "llvm.fma.f32", [x, _c(TWO_OVER_PI_F32), _c(_ROUND_MAGIC)])
    neg_k = b.fsub(_c(_ROUND_MAGIC), t)  # −k, exact
    r = _call(b, "llvm.fma.f32", [neg_k, _c(PIO2_1), x])  # exact: |r| < 1 and a multiple of 2^-23·ulp
    r = _call(b, "llvm.fma.f32", [neg_k, _c(PIO2_2), r])
    r = _call(b, "llvm.fma.f32", [neg_k, _c(PIO2_3), r])
    q = b.bitcast(t, I32)  # k mod 4 in the low two bits (the magic constant's are zero)
    if cosine:
        q = b.add(q, ir.Constant(I32, 1))
    z = b.fmul(r, r)
    sin_r = _call(b, "llvm.fma.f32", [b.fmul(r, z), _horner(b, z, _SIN_S), r])
    cos_r = _call(b, "llvm.fma.f32", [z, _call(b, "llvm.fma.f32", [z, _horner(b, z, _COS_C), _c(-0.5)]), _c(1.0)])
    odd = b.trunc(q, ir.IntType(1))
    res = b.select(odd, cos_r, sin_r)
    # quadrants 2 and 3 negate: flip the sign bit
    flip = b.shl(b.and_(q, ir.Constant(I32, 2)), ir.Constant(I32, 30))
    res = b.bitcast(b.xor(b.bitcast(res, I32), flip), F32)
    if not cosine:  # sin(−0) = −0 (the reduction's sums give +0)
        res = b.select(b.fcmp_ordered("==", x, _c(0.0)), x, res)
    b.branch(join)
    b.position_at_end(slow_blk)
    res_slow = slow(b, x)
    b.branch(join)
    b.position_at_end(join)
    phi = b.phi(F32)
    phi.add_incoming(res, fast)
    phi.add_incoming(res_slow, slow_blk)
    b.ret(phi)


def tanh_f32(b: ir.IRBuilder, x: ir.Value, unit: Ex2Unit | None) -> ir.Value:
    """``tanh(x)`` of an f32 ``x`` in f32 arithmetic, branch-free.

    |x| < 0.75: |x| + |x|³·T(x²); otherwise 1 − 2/(e^(2|x|) + 1), then the sign of x (so
    tanh(−0) = −0). With an ex2 unit (CUDA's ``tanhf``): e^(2|x|) = ex2_ftz(2|x|·log2 e) and
    2/(e + 1) by the unit's reciprocal, 2 instructions each; without, :func:`exp_f32`'s polynomial
    form and an IEEE division. e^(2|x|) = inf gives 1; NaN stays NaN (it takes the second form).
    Below 0.75 the second form would lose up to 1.5 ulp to the cancellation in 1 − 2/(e + 1)."""
    ax = _call(b, "llvm.fabs.f32", [x])
    z = b.fmul(x, x)
    small = _call(b, "llvm.fma.f32", [b.fmul(ax, z), _horner(b, z, _TANH_T), ax])
    if unit is None:
        e2 = exp_f32(b, b.fmul(ax, _c(2.0)), False, None)
        large = b.fsub(_c(1.0), b.fdiv(_c(2.0), b.fadd(e2, _c(1.0))))
    else:
        e2 = unit.ftz(b, b.fmul(ax, _c(2.0 * LOG2E)))
        large = _call(b, "llvm.fma.f32", [unit.rcp(b, b.fadd(e2, _c(1.0))), _c(-2.0), _c(1.0)])
    res = b.select(b.fcmp_ordered("<", ax, _c(TANH_SMALL)), small, large)
    return _call(b, "llvm.copysign.f32", [res, x])
