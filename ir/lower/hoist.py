"""Checks the lowering proves or narrows instead of emitting one per access (docs/ir-lowering.md §7).

* :func:`proven_accesses` / :func:`range_ok`: in a counted loop (:mod:`vxpu.ir.lower.versioning`),
  accesses at ``offset P, c*j + d`` are checked once, in the loop's version test, for the first
  and the last counter value; the fast copy runs them unchecked.
* :func:`check_array_index`: ``offset (shared_addr|local_addr), i`` with a narrow index is one
  ``0 <= i < count`` compare instead of the general address check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llvmlite import ir
from vxpu.ir.lower.bounds import FAULT_LOCAL, FAULT_SHARED, aligned, i32, in_bounds
from vxpu.ir.lower.versioning import CountedLoop
from vxpu.ir.model import OpResult, Value

if TYPE_CHECKING:
    from vxpu.ir.lower.common import KernelLowering

I1 = ir.IntType(1)
I64 = ir.IntType(64)

__all__ = ["affine_in", "check_array_index", "const_int", "proven_accesses", "range_ok"]


def proven_accesses(cl: CountedLoop) -> dict[int, tuple[Value, int, int, Value | None]]:
    """Accesses of ``cl`` at ``offset P, c*j + d`` (``j`` the counter, ``c >= 0`` a
    constant, ``P`` and ``d`` defined before the loop, element size = access size). Over
    ``j0 <= j < n`` their offsets grow monotonically, as long as the index arithmetic does
    not wrap — which the version test also checks — so checking the first and the last
    element before the loop checks them all. Signed counters narrower than 64 bits only."""
    if not cl.signed or cl.iv.type.bits >= 64:
        return {}
    inside: set[Value] = set()
    for blk in cl.blocks:
        inside.update(blk.params)
        inside.update(op.result for op in blk.ops if op.result is not None)
    out: dict[int, tuple[Value, int, int, Value | None]] = {}
    for blk in cl.blocks:
        for op in blk.ops:
            if op.opcode == "load" or op.opcode.startswith("atomic_"):
                pv, size = op.operands[0], op.type.size if op.type is not None else 0
            elif op.opcode == "store":
                pv, size = op.operands[1], op.operands[0].type.size
            else:
                continue
            if not (isinstance(pv, OpResult) and pv.op.opcode == "offset" and pv.op.type is not None
                    and pv.op.type.size == size and pv.op.operands[0] not in inside):
                continue
            affine = affine_in(pv.op.operands[1], cl.iv, inside)
            if affine is not None:
                out[id(op)] = (pv.op.operands[0], size, *affine)
    return out


def range_ok(kl: KernelLowering, db: ir.IRBuilder, cl: CountedLoop, j0: ir.Value,
             proven: dict[int, tuple[Value, int, int, Value | None]]) -> ir.Value:
    """In the version test: the loop runs no iteration, or for every proven access the
    index ``c*j + d`` (computed in i64) fits its type and the element is in bounds and
    aligned, at the first and the last counter value (bounds of each base pointer are
    computed before the branch into the test block)."""
    n = kl.get(cl.bound)
    last = db.sub(n, ir.Constant(n.type, 1))
    bits = cl.iv.type.bits
    lo, hi = ir.Constant(I64, -(1 << (bits - 1))), ir.Constant(I64, (1 << (bits - 1)) - 1)
    ok: ir.Value = ir.Constant(I1, 1)
    for p, size, c, d in dict.fromkeys(proven.values()):
        base, length, _ = kl.bounds_of(p)
        pi = kl.hooks.pointer_int(kl, kl.get(p))
        dv = None if d is None else db.sext(kl.get(d), I64)
        for j in (j0, last):
            e = db.mul(db.sext(j, I64), ir.Constant(I64, c))
            if dv is not None:
                e = db.add(e, dv)
            fits = db.and_(db.icmp_signed(">=", e, lo), db.icmp_signed("<=", e, hi))
            off = db.sub(db.add(pi, db.mul(e, ir.Constant(I64, size))), base)
            ok = db.and_(ok, db.and_(fits, db.and_(aligned(db, off, size), in_bounds(db, off, length, size))))
    return db.or_(db.icmp_signed(">=", j0, n), ok)


def const_int(v: Value) -> int | None:
    return int(v.op.imm) if isinstance(v, OpResult) and v.op.opcode == "const" else None  # type: ignore[arg-type]


def affine_in(idx: Value, iv: Value, inside: set[Value]) -> tuple[int, Value | None] | None:
    """``(c, d)`` when ``idx`` is ``c*iv + d`` (``c >= 0`` constant; ``d`` None or a value
    defined outside the loop, ``inside``), in ``iv``'s type; else None."""
    def scaled(v: Value) -> int | None:
        if v is iv:
            return 1
        if isinstance(v, OpResult) and v.op.opcode == "mul" and iv in v.op.operands:
            a, b = v.op.operands
            c = const_int(b if a is iv else a)
            return c if c is not None and c >= 0 else None
        return None

    if idx.type is not iv.type:
        return None
    c = scaled(idx)
    if c is not None:
        return c, None
    if isinstance(idx, OpResult) and idx.op.opcode == "add":
        a, b = idx.op.operands
        for x, y in ((a, b), (b, a)):
            c = scaled(x)
            if c is not None and y not in inside:
                return c, y
    return None


def check_array_index(kl: KernelLowering, pv: Value, size: int) -> bool:
    """``offset (shared_addr|local_addr @a), i : T`` with ``sizeof(T)`` = the access size and
    ``i`` at most 32 bits wide: in bounds and aligned exactly when ``0 <= i < a.size / size``
    (arrays are 16-aligned; ``i * size`` cannot wrap), so emit that one compare (an i32 index
    keeps GPU address arithmetic narrow) and branch to the fault exit. False if not this form."""
    if not (isinstance(pv, OpResult) and pv.op.opcode == "offset" and pv.op.type is not None
            and pv.op.type.size == size and isinstance(pv.op.operands[0], OpResult)
            and pv.op.operands[0].op.opcode in ("shared_addr", "local_addr")
            and pv.op.operands[1].type.bits <= 32 and pv not in kl.spill):
        return False        # (a spilled pointer was made before a barrier: its index may be gone)
    arr = pv.op.operands[0].op.array
    assert arr is not None
    (origin,) = kl.origins[pv]
    b = kl.b
    idx = b.sext(kl.get(pv.op.operands[1]), I64)
    ok = b.icmp_unsigned("<", idx, ir.Constant(I64, arr.size // size))
    code = FAULT_SHARED if pv.op.operands[0].op.opcode == "shared_addr" else FAULT_LOCAL
    kl.b = kl.hooks.fault_exit(kl).branch(b, kl.fn, ok, i32(code), i32(origin), b.mul(idx, ir.Constant(I64, size)))
    return True
