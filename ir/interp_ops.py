"""Scalar semantics of every pure IR op, shared by the reference interpreter and constant folding.

This module is the executable form of the op semantics in docs/ir.md and the opcode table
(``vxpu.ir.ops``). It works on plain Python values:

* an **integer** of type ``iN`` is its *unsigned* bit pattern, an ``int`` in ``[0, 2**N)``
  (signed ops reinterpret it); ``i1`` is 0 or 1;
* a **float** of type ``f16``/``f32``/``f64`` is a Python ``float`` whose value is exactly
  representable in that type. Every op computes the exact (or f64) result and rounds it once
  to the type, to nearest even: for + - * / sqrt and conversions this is the correctly rounded
  IEEE result (rounding an f64 result of f32/f16 operands again is innocuous because
  53 >= 2 * 24 + 2); ``fma`` and int-to-float conversions round the exact rational value.
  NaN payloads are not modelled (every NaN is ``math.nan``); docs/ir.md leaves them unspecified.

:func:`evaluator` returns a function of the operand values for one op, or None for ops that are
not scalar computations (memory, geometry, control flow). :data:`EXACT_OPS` lists the ops whose
result is fully specified bit for bit; the others (transcendentals and ``rsqrt``) are specified
only to within a few ulp, so constant folding leaves them alone and differential tests compare
them with a tolerance.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from fractions import Fraction

from .model import Op, float_bits, float_from_bits
from .types import Type

__all__ = [
    "APPROX_OPS",
    "EXACT_OPS",
    "evaluator",
    "from_imm",
    "int_to_float",
    "round_float",
    "round_fraction",
    "scalar_fn",
    "to_imm",
    "to_signed",
]

Scalar = int | float
Fn = Callable[..., Scalar]

#: Ops specified only to within a few ulp (implementations may differ; never constant-folded).
APPROX_OPS = frozenset({"rsqrt", "exp", "exp2", "log", "log2", "sin", "cos", "tanh", "pow"})

_INF = math.inf
_isnan = math.isnan
_NAN = math.nan
#: (significand bits incl. the implicit one, minimum normal exponent, maximum exponent)
_FORMATS = {16: (11, -14, 15), 32: (24, -126, 127), 64: (53, -1022, 1023)}
_F32 = struct.Struct("<f")
_F16 = struct.Struct("<e")


def to_signed(v: int, bits: int) -> int:
    """The signed reading of the ``bits``-wide pattern ``v``."""
    return v - (1 << bits) if v >> (bits - 1) else v


def from_imm(t: Type, imm: float) -> Scalar:
    """The interpreter value of a ``const`` immediate (integers become unsigned patterns)."""
    if t.is_int:
        return int(imm) & t.max_unsigned
    return float(imm)


def to_imm(t: Type, value: Scalar) -> int | float:
    """The canonical ``const`` immediate for an interpreter value of type ``t``."""
    if t.is_int:
        return to_signed(int(value), t.bits) if t.bits > 1 else int(value)
    return float(value)


# --- rounding ---------------------------------------------------------------------------------

def _round32(x: float) -> float:
    try:
        return float(_F32.unpack(_F32.pack(x))[0])
    except OverflowError:  # finite x that rounds past the largest f32
        return math.copysign(_INF, x)


def _round16(x: float) -> float:
    try:
        return float(_F16.unpack(_F16.pack(x))[0])
    except OverflowError:
        return math.copysign(_INF, x)


def _round64(x: float) -> float:
    return x


_ROUND = {16: _round16, 32: _round32, 64: _round64}


def round_float(bits: int, x: float) -> float:
    """``x`` (an f64) rounded to the float type of width ``bits`` (nearest even, overflow to inf)."""
    return _ROUND[bits](x)


def round_fraction(x: Fraction, bits: int) -> float:
    """The exact rational ``x`` correctly rounded (nearest even) to the float type of width ``bits``.

    Handles subnormals and overflow to infinity. A zero ``x`` gives +0.0 (the caller decides
    the sign of zero results).
    """
    p, emin, emax = _FORMATS[bits]
    if x == 0:
        return 0.0
    neg = x < 0
    a = -x if neg else x
    num, den = a.numerator, a.denominator
    e = num.bit_length() - den.bit_length()
    if (num << max(0, -e)) < (den << max(0, e)):
        e -= 1                                  # now 2**e <= a < 2**(e+1)
    shift = max(e, emin) - (p - 1)              # the quantum is 2**shift
    if shift >= 0:
        d2 = den << shift
        n, r = divmod(num, d2)
    else:
        d2 = den
        n, r = divmod(num << -shift, den)
    if 2 * r > d2 or (2 * r == d2 and n & 1):
        n += 1
    if n == 0:
        return -0.0 if neg else 0.0
    if n.bit_length() + shift > emax + 1:
        v = _INF
    else:
        v = math.ldexp(float(n), shift)         # n < 2**54: exact
    return -v if neg else v


def int_to_float(v: int, bits: int) -> float:
    """The integer ``v`` (any size, signed) correctly rounded to the float type of width ``bits``."""
    if -(1 << 53) <= v <= (1 << 53):
        return _ROUND[bits](float(v))          # float(v) is exact here: one rounding
    return round_fraction(Fraction(v), bits)


# --- float helpers ----------------------------------------------------------------------------

def _fdiv(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        if _isnan(a) or a == 0:
            return _NAN
        return math.copysign(_INF, math.copysign(1.0, a) * math.copysign(1.0, b))


def _frem(a: float, b: float) -> float:
    if _isnan(a) or _isnan(b) or a in (_INF, -_INF) or b == 0:
        return _NAN
    if b in (_INF, -_INF):
        return a
    return math.fmod(a, b)


def _fmin(a: float, b: float) -> float:
    if _isnan(a):
        return b
    if _isnan(b):
        return a
    if a == b:  # equal, possibly +0 and -0: -0 is the smaller one
        return a if math.copysign(1.0, a) < 0 else b
    return min(b, a)


def _fmax(a: float, b: float) -> float:
    if _isnan(a):
        return b
    if _isnan(b):
        return a
    if a == b:
        return a if math.copysign(1.0, a) > 0 else b
    return max(b, a)


def _is_odd_int(y: float) -> bool:
    return math.isfinite(y) and y == math.floor(y) and math.fmod(y, 2.0) != 0


def _pow(a: float, b: float) -> float:
    try:
        return math.pow(a, b)
    except OverflowError:
        return -_INF if a < 0 and _is_odd_int(b) else _INF
    except ValueError:
        if a == 0:  # zero to a negative power
            return math.copysign(_INF, a) if _is_odd_int(b) else _INF
        return _NAN


def _guard(fn: Callable[[float], float], on_error: Callable[[float], float]) -> Callable[[float], float]:
    def call(x: float) -> float:
        try:
            return fn(x)
        except (ValueError, OverflowError):
            return on_error(x)
    return call


def _log_err(x: float) -> float:
    return -_INF if x == 0 else _NAN


def _exp_err(x: float) -> float:
    return _INF if x > 0 else 0.0


def _rsqrt(x: float) -> float:
    if _isnan(x) or x < 0:
        return _NAN
    if x == 0:
        return math.copysign(_INF, x)
    return 1.0 / math.sqrt(x)


def _floor(x: float) -> float:
    if not math.isfinite(x):
        return x
    r = float(math.floor(x))
    return math.copysign(r, x) if r == 0 else r


def _ceil(x: float) -> float:
    if not math.isfinite(x):
        return x
    r = float(math.ceil(x))
    return math.copysign(r, x) if r == 0 else r


def _rint(x: float) -> float:
    if not math.isfinite(x):
        return x
    r = float(round(x))  # Python's round is half to even, exact for every float
    return math.copysign(r, x) if r == 0 else r


def _fma_exact(bits: int) -> Callable[[float, float, float], float]:
    def fma(a: float, b: float, c: float) -> float:
        if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
            return a * b + c          # infinities and NaN: no rounding question
        if a == 0 or b == 0:
            return (a * b) + c        # exact signed-zero product, one rounding of the sum
        exact = Fraction(a) * Fraction(b) + Fraction(c)
        if exact == 0:
            return 0.0                # nonzero terms cancelling exactly give +0 (nearest even)
        return round_fraction(exact, bits)
    return fma


_UNARY_F: dict[str, Callable[[float], float]] = {
    "fneg": lambda x: -x,
    "fabs": math.fabs,
    "sqrt": _guard(math.sqrt, lambda x: _NAN),
    "rsqrt": _rsqrt,
    "exp": _guard(math.exp, _exp_err),
    "exp2": _guard(math.exp2, _exp_err),
    "log": _guard(math.log, _log_err),
    "log2": _guard(math.log2, _log_err),
    "sin": _guard(math.sin, lambda x: _NAN),
    "cos": _guard(math.cos, lambda x: _NAN),
    "tanh": math.tanh,
    "floor": _floor,
    "ceil": _ceil,
    "rint": _rint,
}

_BINARY_F: dict[str, Callable[[float, float], float]] = {
    "fadd": lambda a, b: a + b,
    "fsub": lambda a, b: a - b,
    "fmul": lambda a, b: a * b,
    "fdiv": _fdiv,
    "frem": _frem,
    "fmin": _fmin,
    "fmax": _fmax,
    "pow": _pow,
}

_FCMP: dict[str, Callable[[float, float], bool]] = {
    "oeq": lambda a, b: a == b,
    "one": lambda a, b: not _isnan(a) and not _isnan(b) and a != b,
    "olt": lambda a, b: a < b,
    "ole": lambda a, b: a <= b,
    "ogt": lambda a, b: a > b,
    "oge": lambda a, b: a >= b,
    "ord": lambda a, b: not _isnan(a) and not _isnan(b),
    "ueq": lambda a, b: not (a < b or a > b),
    "une": lambda a, b: a != b,
    "ult": lambda a, b: not a >= b,
    "ule": lambda a, b: not a > b,
    "ugt": lambda a, b: not a <= b,
    "uge": lambda a, b: not a < b,
    "uno": lambda a, b: _isnan(a) or _isnan(b),
}


def _float_op(name: str, t: Type) -> Fn | None:
    rnd = _ROUND[t.bits]
    if name == "fma":
        return _fma_exact(t.bits)
    if name in ("fneg", "fabs"):
        return _UNARY_F[name]                  # exact in every width
    un = _UNARY_F.get(name)
    if un is not None:
        return lambda x: rnd(un(x))
    bi = _BINARY_F.get(name)
    if bi is not None:
        if name in ("fmin", "fmax"):
            return bi
        return lambda a, b: rnd(bi(a, b))
    return None


# --- integer ops ------------------------------------------------------------------------------

def _int_op(name: str, t: Type) -> Fn | None:
    w = t.bits
    m = t.max_unsigned
    smin = 1 << (w - 1)            # the pattern of the most negative value

    def s(v: int) -> int:
        return v - (1 << w) if v & smin else v

    def sdiv(a: int, b: int) -> int:
        if b == 0:
            return 0
        sa, sb = s(a), s(b)
        q = abs(sa) // abs(sb)
        return (-q if (sa < 0) != (sb < 0) else q) & m

    def srem(a: int, b: int) -> int:
        if b == 0:
            return a
        sa, sb = s(a), s(b)
        r = abs(sa) % abs(sb)
        return (-r if sa < 0 else r) & m

    table: dict[str, Fn] = {
        "add": lambda a, b: (a + b) & m,
        "sub": lambda a, b: (a - b) & m,
        "mul": lambda a, b: (a * b) & m,
        "sdiv": sdiv,
        "udiv": lambda a, b: a // b if b else 0,
        "srem": srem,
        "urem": lambda a, b: a % b if b else a,
        "and": lambda a, b: a & b,
        "or": lambda a, b: a | b,
        "xor": lambda a, b: a ^ b,
        "shl": lambda a, b: (a << b) & m if b < w else 0,
        "lshr": lambda a, b: a >> b if b < w else 0,
        "ashr": lambda a, b: (s(a) >> min(b, w - 1)) & m,
        "smin": lambda a, b: a if s(a) <= s(b) else b,
        "smax": lambda a, b: a if s(a) >= s(b) else b,
        "umin": min,
        "umax": max,
        "neg": lambda a: (-a) & m,
        "not": lambda a: a ^ m,
        "abs": lambda a: (-a) & m if a & smin else a,
    }
    return table.get(name)


def _icmp(pred: str, t: Type) -> Fn:
    w = t.bits

    def s(v: int) -> int:
        return to_signed(v, w)

    table: dict[str, Fn] = {
        "eq": lambda a, b: int(a == b),
        "ne": lambda a, b: int(a != b),
        "ult": lambda a, b: int(a < b),
        "ule": lambda a, b: int(a <= b),
        "ugt": lambda a, b: int(a > b),
        "uge": lambda a, b: int(a >= b),
        "slt": lambda a, b: int(s(a) < s(b)),
        "sle": lambda a, b: int(s(a) <= s(b)),
        "sgt": lambda a, b: int(s(a) > s(b)),
        "sge": lambda a, b: int(s(a) >= s(b)),
    }
    return table[pred]


# --- conversions ------------------------------------------------------------------------------

def _f2i(dst: Type, signed: bool) -> Fn:
    lo, hi = (dst.min_signed, (1 << (dst.bits - 1)) - 1) if signed else (0, dst.max_unsigned)
    m = dst.max_unsigned

    def conv(x: float) -> int:
        if _isnan(x):
            return 0
        if x == _INF:
            v = hi
        elif x == -_INF:
            v = lo
        else:
            v = min(max(math.trunc(x), lo), hi)
        return v & m
    return conv


def _conversion(name: str, src: Type, dst: Type) -> Fn | None:
    if name == "trunc":
        m = dst.max_unsigned
        return lambda v: v & m
    if name == "zext":
        return lambda v: v
    if name == "sext":
        sw, m = src.bits, dst.max_unsigned
        return lambda v: to_signed(v, sw) & m
    if name == "fptrunc":
        return _ROUND[dst.bits]
    if name == "fpext":
        return lambda x: x
    if name in ("fptosi", "fptoui"):
        return _f2i(dst, name == "fptosi")
    if name == "sitofp":
        sw, db = src.bits, dst.bits
        return lambda v: int_to_float(to_signed(v, sw), db)
    if name == "uitofp":
        db = dst.bits
        return lambda v: int_to_float(v, db)
    if name == "bitcast":
        return _bitcast(src, dst)
    return None


def _bitcast(src: Type, dst: Type) -> Fn:
    if src.is_int and dst.is_float:
        return lambda v: float_from_bits(dst, v)
    if src.is_float and dst.is_int:
        return lambda x: float_bits(src, x)
    return lambda v: v


# --- entry point ------------------------------------------------------------------------------

def scalar_fn(name: str, t: Type) -> Fn | None:
    """The function of the integer or float op ``name`` at type ``t`` (e.g. ``"add"``, ``"fmin"``),
    or None if there is no such scalar op. Atomics use it for their read-modify-write step."""
    if t.is_int:
        return _int_op(name, t)
    if t.is_float:
        return _float_op(name, t)
    return None


#: Ops whose results are specified exactly (everything :func:`evaluator` handles but APPROX_OPS).
EXACT_OPS = frozenset(
    {"add", "sub", "mul", "sdiv", "udiv", "srem", "urem", "and", "or", "xor", "shl", "lshr", "ashr",
     "smin", "smax", "umin", "umax", "neg", "not", "abs", "fadd", "fsub", "fmul", "fdiv", "frem",
     "fmin", "fmax", "fneg", "fabs", "sqrt", "floor", "ceil", "rint", "fma", "icmp", "fcmp", "select",
     "trunc", "zext", "sext", "fptrunc", "fpext", "fptosi", "fptoui", "sitofp", "uitofp", "bitcast"})


def evaluator(op: Op) -> Fn | None:
    """A function computing ``op``'s result from its operand values, or None if ``op`` is not a
    scalar computation (const, geometry, pointers, memory, atomics, barrier, terminators).

    The op must be well-typed (verified); the function takes one value per operand.
    """
    name = op.opcode
    if name == "select":
        return lambda c, a, b: a if c else b
    if name == "icmp":
        return _icmp(op.pred or "", op.operands[0].type)
    if name == "fcmp":
        f = _FCMP[op.pred or ""]
        return lambda a, b: int(f(a, b))
    if op.defn.conv is not None:
        if op.type is None:
            return None
        return _conversion(name, op.operands[0].type, op.type)
    t = op.type
    if t is None or not op.defn.pure or name == "const" or op.defn.operands == ():
        return None
    return scalar_fn(name, t)
