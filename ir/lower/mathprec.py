"""Extra-precision building blocks of the math library (:mod:`vxpu.ir.lower.math`), as LLVM IR.

Two functions need more than f64 precision internally to give f64 results within a few ulp:

* ``pow`` computes exp(y·log|x|); an error ε in log|x| becomes a relative error |y|·ε in the
  result, up to 745·ε. :func:`log_dd` therefore returns log|x| as a *double-double* (hi + lo,
  about 2^-100 relative), so that y·log|x| can be formed with its rounding error (fma) and the
  exponential applied to both parts.
* ``sin``/``cos`` reduce x modulo π/2. Cody-Waite with three 33-bit parts of π/2 is exact only
  while k·part is exact (|x| < 2^20·π/2); beyond that :func:`reduce_pio2_large` does a
  Payne–Hanek reduction: x = M·2^E (53-bit integer M) is multiplied in integer arithmetic by a
  192-bit window of the bits of 2/π starting at bit E, which gives x·2/π modulo 4 with at least
  64 correct bits after the worst-case cancellation of any f64 (about 2^-61), for every finite x.

The 1216 bits of 2/π are computed when this module is imported (Machin's formula in Python
integers), and the 64-bit words are selected by a chain of ``select`` (no tables in memory, so the
same code runs unchanged on NVPTX and AMDGPU). Only integer ops up to ``i128`` multiplication,
``llvm.fshl.i64`` and plain f64 arithmetic are emitted; no libcalls.
"""

from __future__ import annotations

from llvmlite import ir

F64 = ir.DoubleType()
I64 = ir.IntType(64)
I128 = ir.IntType(128)

LN2_HI = 6.93147180369123816490e-01  # 32 significant bits: k·LN2_HI is exact for |k| < 2^21
LN2_LO = 1.90821492927058770002e-10
PIO2_HI = 1.5707963267948966  # π/2 = PIO2_HI + PIO2_LO to about 2^-107
PIO2_LO = 6.123233995736766e-17
#: 2/3 = TWO_THIRDS_HI + TWO_THIRDS_LO (double-double)
TWO_THIRDS_HI = 0.6666666666666666
TWO_THIRDS_LO = 3.700743415417188e-17

_PAD_BITS = 64  # zero bits in front of 2/π, so a window may start before its first bit
_TABLE_WORDS = 20  # 64 + 1216 bits: enough for the largest f64 exponent (window end 1034 + 192)


def _atan_inv_fixed(n: int, bits: int) -> int:
    """atan(1/n) · 2^bits, truncated (error < a few units), by its Taylor series in integers."""
    total, term, k, sign = 0, (1 << bits) // n, 1, 1
    n2 = n * n
    while term:
        total += sign * (term // k)
        term //= n2
        k += 2
        sign = -sign
    return total


def _two_over_pi_words() -> tuple[int, ...]:
    """The bits of 2/π after the binary point, preceded by 64 zero bits, as 64-bit words."""
    guard = 64
    bits = _TABLE_WORDS * 64 - _PAD_BITS
    pi_fixed = 16 * _atan_inv_fixed(5, bits + guard + 8) - 4 * _atan_inv_fixed(239, bits + guard + 8)
    frac = (1 << (2 * (bits + guard + 8) + 1)) // pi_fixed  # 2/π · 2^(bits + guard + 8)
    frac >>= guard + 8  # 2/π · 2^bits, truncated; the guard bits absorb the series' error
    return tuple((frac >> (64 * (_TABLE_WORDS - 1 - i))) & ((1 << 64) - 1) for i in range(_TABLE_WORDS))


TWO_OVER_PI_WORDS = _two_over_pi_words()


def _c(v: float) -> ir.Constant:
    return ir.Constant(F64, v)


def _i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def _call(b: ir.IRBuilder, name: str, ty: ir.Type, args: list[ir.Value]) -> ir.Value:
    fn = b.module.globals.get(name)
    if fn is None:
        fn = ir.Function(b.module, ir.FunctionType(ty, [a.type for a in args]), name=name)
    return b.call(fn, args)


def fma(b: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    """x·y + z with one rounding (``llvm.fma.f64``; every target has it in hardware)."""
    return _call(b, "llvm.fma.f64", F64, [x, y, z])


def two_sum(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(s, e) with s = fl(x + y) and s + e = x + y exactly (Knuth; any magnitudes)."""
    s = b.fadd(x, y)
    bb = b.fsub(s, x)
    e = b.fadd(b.fsub(x, b.fsub(s, bb)), b.fsub(y, bb))
    return s, e


def fast_two_sum(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(s, e) with s + e = x + y exactly, for |x| ≥ |y| (Dekker)."""
    s = b.fadd(x, y)
    return s, b.fsub(y, b.fsub(s, x))


def split_mantissa(b: ir.IRBuilder, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(k as i64, m) with x = m·2^k and m in [√½, √2), for finite x > 0 (subnormals too)."""
    tiny = b.fcmp_ordered("<", x, _c(2.2250738585072014e-308))
    xs = b.select(tiny, b.fmul(x, _c(2.0 ** 54)), x)
    bits = b.bitcast(xs, I64)
    # Bias the mantissa so that m lands in [√½, √2) (0x3FE6A09E667F3BCD is the bit pattern of √½).
    hx = b.add(bits, _i64(0x3FF0000000000000 - 0x3FE6A09E667F3BCD))
    k = b.sub(b.lshr(hx, _i64(52)), _i64(1023))
    k = b.sub(k, b.select(tiny, _i64(54), _i64(0)))
    mbits = b.add(b.and_(hx, _i64(0x000FFFFFFFFFFFFF)), _i64(0x3FE6A09E667F3BCD))
    return k, b.bitcast(mbits, F64)


def log_dd(b: ir.IRBuilder, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """log(x) as hi + lo (relative error about 2^-100) for x ≥ 0; x = 0, inf, NaN give (log x, 0).

    log x = k·ln2 + 2·atanh(s), s = f/(2+f), f = m − 1 (exact). s is formed as a double-double
    (division residual by fma), the series' first two terms 2s + 2s³/3 in double-double, the rest
    (≤ 2^-14) in f64."""
    k, m = split_mantissa(b, x)
    f = b.fsub(m, _c(1.0))
    d, dl = fast_two_sum(b, _c(2.0), f)
    s = b.fdiv(f, d)
    sl = b.fdiv(b.fsub(fma(b, b.fneg(s), d, f), b.fmul(s, dl)), d)
    z = b.fmul(s, s)
    zl = b.fadd(fma(b, s, s, b.fneg(z)), b.fmul(b.fmul(_c(2.0), s), sl))
    cube = b.fmul(z, s)
    cube_l = b.fadd(b.fadd(fma(b, z, s, b.fneg(cube)), b.fmul(zl, s)), b.fmul(z, sl))
    t = b.fmul(cube, _c(TWO_THIRDS_HI))
    tl = b.fadd(b.fadd(fma(b, cube, _c(TWO_THIRDS_HI), b.fneg(t)), b.fmul(cube, _c(TWO_THIRDS_LO))),
                b.fmul(cube_l, _c(TWO_THIRDS_HI)))
    acc: ir.Value = _c(2.0 / 23)
    for i in range(10, 1, -1):
        acc = fma(b, acc, z, _c(2.0 / (2 * i + 1)))
    rest = b.fmul(b.fmul(cube, z), acc)  # 2s^5/5 + 2s^7/7 + ... (s^23 term ≤ 2^-60 relative)
    h, e = two_sum(b, b.fmul(_c(2.0), s), t)
    low = b.fadd(b.fadd(b.fadd(e, tl), b.fmul(_c(2.0), sl)), rest)
    kf = b.sitofp(k, F64)
    hi, e2 = two_sum(b, b.fmul(kf, _c(LN2_HI)), h)
    low = b.fadd(b.fadd(low, e2), b.fmul(kf, _c(LN2_LO)))
    hi, lo = fast_two_sum(b, hi, low)
    special = b.not_(b.and_(b.fcmp_ordered(">", x, _c(0.0)), b.fcmp_ordered("<", x, _c(float("inf")))))
    hi = b.select(special, _log_special(b, x), hi)
    return hi, b.select(special, _c(0.0), lo)


def _log_special(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """log of 0, +inf, NaN and negative x (C99: -inf, inf, NaN, NaN)."""
    res = b.select(b.fcmp_ordered("==", x, _c(0.0)), _c(float("-inf")), _c(float("nan")))
    res = b.select(b.fcmp_ordered("==", x, _c(float("inf"))), x, res)
    return b.select(b.fcmp_unordered("uno", x, x), x, res)


def _select_word(b: ir.IRBuilder, index: ir.Value, first: int) -> ir.Value:
    """TWO_OVER_PI_WORDS[index + first] (index an i64 in range), by a select chain."""
    acc: ir.Value = _i64(0)
    for i in range(_TABLE_WORDS - 1 - first, -1, -1):
        acc = b.select(b.icmp_unsigned("==", index, _i64(i)), _i64(TWO_OVER_PI_WORDS[i + first]), acc)
    return acc


def reduce_pio2_large(b: ir.IRBuilder, ax: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(r, rl, q) with ax = q'·π/2 + (r + rl), q = q' mod 4 (i64), |r| ≤ π/4, for finite ax ≥ 2^20.

    ax = M·2^E with M < 2^53 and E ≥ -32; the window of 192 bits of 2/π starting at bit E − 1 (bits
    before it only add multiples of 4) times M, modulo 2^192, is x·2/π mod 4 in units of 2^-190."""
    bits = b.bitcast(ax, I64)
    mant = b.or_(b.and_(bits, _i64((1 << 52) - 1)), _i64(1 << 52))
    e = b.sub(b.lshr(bits, _i64(52)), _i64(1075))
    p0 = b.add(e, _i64(_PAD_BITS - 2))  # bit i of 2/π is table bit i + 63; p0 ≥ 30 for ax ≥ 2^20
    word, shift = b.lshr(p0, _i64(6)), b.and_(p0, _i64(63))
    w = [_select_word(b, word, j) for j in range(4)]
    fshl = "llvm.fshl.i64"
    hi = _call(b, fshl, I64, [w[0], w[1], shift])
    mid = _call(b, fshl, I64, [w[1], w[2], shift])
    low = _call(b, fshl, I64, [w[2], w[3], shift])
    m128 = b.zext(mant, I128)
    p_low = b.mul(m128, b.zext(low, I128))
    p_mid = b.mul(m128, b.zext(mid, I128))
    top = b.add(b.shl(b.zext(b.mul(mant, hi), I128), ir.Constant(I128, 64)), p_mid)
    frac = b.add(top, b.lshr(p_low, ir.Constant(I128, 64)))  # bits 2^-126 .. 2^1 of x·2/π mod 4
    rounded = b.add(frac, ir.Constant(I128, 1 << 125))
    q = b.trunc(b.lshr(rounded, ir.Constant(I128, 126)), I64)
    q = b.and_(q, _i64(3))
    f = b.sub(b.and_(rounded, ir.Constant(I128, (1 << 126) - 1)), ir.Constant(I128, 1 << 125))
    f_hi = b.trunc(b.ashr(f, ir.Constant(I128, 64)), I64)  # |f_hi| < 2^61, units 2^-62
    f_lo = b.trunc(f, I64)  # unsigned, units 2^-126
    h = b.sitofp(f_hi, F64)
    rem = b.sub(f_hi, b.fptosi(h, I64))  # exact: h is f_hi rounded, |h| ≤ 2^61
    scale_hi, scale_lo = _c(2.0 ** -62), _c(2.0 ** -126)
    fh = b.fmul(h, scale_hi)
    fl = b.fadd(b.fmul(b.sitofp(rem, F64), scale_hi), b.fmul(b.uitofp(f_lo, F64), scale_lo))
    r = b.fmul(fh, _c(PIO2_HI))
    rl = b.fadd(b.fadd(fma(b, fh, _c(PIO2_HI), b.fneg(r)), b.fmul(fh, _c(PIO2_LO))), b.fmul(fl, _c(PIO2_HI)))
    r, rl = fast_two_sum(b, r, rl)
    return r, rl, q
