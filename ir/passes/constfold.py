"""Constant folding and exact algebraic identities.

**Folding.** A pure op whose operands are all ``const`` results becomes a ``const`` of the
value that :mod:`vxpu.ir.interp_ops` (the executable semantics of docs/ir.md) computes, so
shifts by >= the width, division by zero, ``MIN / -1``, saturating float-to-int conversions,
``fma``'s single rounding and f16/f32 rounding fold exactly as they run. Not folded:

* ops with side effects or memory access (never), geometry ops (they depend on the launch);
* the ops specified only to within a few ulp (``interp_ops.APPROX_OPS``: exp, log, sin, pow,
  rsqrt ...), because a folded result could differ from what the target computes;
* results that are NaN, and bitcasts of a NaN: a ``const`` holds only the canonical NaN, while
  the runtime result may carry another payload or sign (visible through ``bitcast``);
* ``fmin``/``fmax`` of zeros of opposite sign (either zero may be returned) and ``f16``
  ``fma`` (may be computed in f32 and rounded twice): the choice is the target's.

**Identities** (each exact for every input, including NaN and signed zeros): integer
``x+0, x-0, x*1, x&-1, x|0, x^0, x<<0, x>>0, x/1 -> x``; ``x*0, x&0, x-x, x^x, x%1 -> 0``;
``x&x, x|x, min/max(x, x) -> x``; ``icmp p x, x`` -> its constant answer; ``select`` with a
constant condition or equal arms; float ``x*1.0, x/1.0, x+(-0.0), x-(+0.0) -> x`` and
``fneg(fneg x) -> x``.
"""

from __future__ import annotations

import math

from ..interp_ops import EXACT_OPS, evaluator, from_imm, to_imm
from ..model import Kernel, Op, OpResult, Value
from .util import const_value, make_const, replace_uses, resolve

__all__ = ["run"]

_ICMP_SELF = {"eq": 1, "ne": 0, "slt": 0, "sle": 1, "sgt": 0, "sge": 1, "ult": 0, "ule": 1, "ugt": 0, "uge": 1}


def run(kernel: Kernel) -> bool:
    """Fold constants and apply identities in ``kernel``. Returns True if anything changed."""
    mapping: dict[Value, Value] = {}
    changed = False
    for b in kernel.blocks:
        for op in b.ops:
            if op.result is None or not op.defn.pure or op.opcode == "const":
                continue
            operands = [resolve(mapping, v) for v in op.operands]
            if _fold(op, operands):
                changed = True
                continue
            same = _identity(op, operands)
            if same is not None:
                mapping[op.result] = same
            elif op.opcode == "const":     # an identity folded it (x - x, x * 0 ...)
                changed = True
    return replace_uses(kernel, mapping) or changed


def _fold(op: Op, operands: list[Value]) -> bool:
    if op.opcode not in EXACT_OPS or not operands:
        return False
    imms = [const_value(v) for v in operands]
    if any(i is None for i in imms):
        return False
    fn = evaluator(op)
    if fn is None or op.result is None:
        return False
    args = [from_imm(v.type, i) for v, i in zip(operands, imms)]  # type: ignore[arg-type]
    if not _foldable(op, args):
        return False
    value = fn(*args)
    t = op.result.type
    if t.is_float and math.isnan(value):
        return False
    make_const(op, to_imm(t, value))
    return True


def _foldable(op: Op, args: list[int | float]) -> bool:
    """False where the semantics leave a choice that a fold could make differently from the target."""
    name = op.opcode
    if name == "bitcast" and op.operands[0].type.is_float and math.isnan(args[0]):
        return False                          # the NaN's bits are unspecified
    if name in ("fmin", "fmax") and args[0] == 0 and args[1] == 0 \
            and math.copysign(1.0, args[0]) != math.copysign(1.0, args[1]):
        return False                          # either zero may be returned
    # f16 fma may be computed in f32 and rounded twice
    return not (name == "fma" and op.type is not None and op.type.bits == 16)


def _is(v: Value, imm: float) -> bool:
    c = const_value(v)
    if c is None:
        return False
    if isinstance(imm, float):
        return isinstance(c, float) and c == imm and math.copysign(1.0, c) == math.copysign(1.0, imm)
    return c == imm


def _identity(op: Op, ops: list[Value]) -> Value | None:
    """The operand ``op`` always equals, or None; folds self-cancelling ops to consts in place."""
    name = op.opcode
    if name == "select":
        c = const_value(ops[0])
        if c is not None:
            return ops[1] if c else ops[2]
        return ops[1] if ops[1] is ops[2] else None
    if name == "icmp" and ops[0] is ops[1]:
        make_const(op, _ICMP_SELF[op.pred or "eq"])
        return None
    t = op.type
    if t is None or len(ops) != 2:
        if name == "fneg" and isinstance(ops[0], OpResult) and ops[0].op.opcode == "fneg":
            return ops[0].op.operands[0]
        return None
    a, b = ops
    if t.is_int:
        return _int_identity(op, name, a, b, -1 if t.bits > 1 else 1)
    if t.is_float:
        if name == "fmul" and _is(b, 1.0) or name == "fdiv" and _is(b, 1.0):
            return a
        if name == "fmul" and _is(a, 1.0):
            return b
        if name == "fadd" and _is(b, -0.0) or name == "fsub" and _is(b, 0.0):
            return a
        if name == "fadd" and _is(a, -0.0):
            return b
    return None


def _int_identity(op: Op, name: str, a: Value, b: Value, ones: int) -> Value | None:
    if name in ("add", "or", "xor") and _is(a, 0):
        return b
    if name in ("add", "sub", "or", "xor", "shl", "lshr", "ashr") and _is(b, 0):
        return a
    if name == "mul" and _is(a, 1):
        return b
    if name in ("mul", "udiv", "sdiv") and _is(b, 1):
        return a
    if name == "and" and _is(a, ones):
        return b
    if name == "and" and _is(b, ones):
        return a
    if name in ("and", "or", "smin", "smax", "umin", "umax") and a is b:
        return a
    zero = (name in ("mul", "and") and (_is(a, 0) or _is(b, 0))) or (name in ("sub", "xor") and a is b) \
        or (name == "urem" and _is(b, 1))
    if zero:
        make_const(op, 0)
    return None
