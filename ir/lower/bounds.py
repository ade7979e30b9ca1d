"""Per-buffer bounds ("fat pointers"): every access is checked against its *own* buffer.

IR pointers are register values only (never stored, never made from integers), so every pointer
of a kernel derives from a kernel parameter, a shared array or a local array through
``offset``, ``byte_offset``, ``select`` and block parameters (phis). :func:`pointer_origins`
computes, for each pointer value, the set of buffers it may point into (its *origins*):

* parameter ``i`` (``ptr<global>``/``ptr<constant>``): origin ``i`` — its bounds are the
  ``(base, length)`` pair the host passes at launch (hidden arguments, filled from the
  allocation behind the address; the guest cannot forge them);
* shared array ``j``: origin ``ORIGIN_SHARED + j``; local array ``j``: ``ORIGIN_LOCAL + j`` —
  their bounds are the array's place and declared size, known at compile time.

A value with one origin needs nothing at run time: its bounds are that buffer's. A value with
several (a phi or select of pointers into different buffers) carries an ``i32`` *tag* (the
origin number) beside it, through the same offsets, selects and phis; the bounds are then
picked by comparing the tag with each candidate. Every load, store and atomic of ``size``
bytes computes ``off = addr - base`` (mod 2^64) and checks

    ``off & (size - 1) == 0  &&  off + (size - 1) <u length``

Every base is a multiple of 8 (the host refuses others; arrays are 16-aligned), so the first
test is natural alignment of the address itself; and given it, ``off`` is a multiple of
``size`` no larger than ``2^64 - size``, so ``off + size - 1`` cannot wrap and the second test
is exactly ``off + size <= length`` (a zero length admits nothing). One subtraction, one mask
test, one add-and-compare: a violation jumps to the target's fault exit with the fault code
(misaligned takes precedence over out of bounds), the origin and ``off`` (see
:func:`check_access`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from llvmlite import ir
from vxpu.ir.model import Kernel, Value
from vxpu.ir.types import AddressSpace

I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)

#: Origin numbers: parameter index, or these bases plus the array index.
ORIGIN_SHARED = 0x100
ORIGIN_LOCAL = 0x200
#: No buffer (a trap, a barrier fault, a cancel): the fault record's ``param`` field.
ORIGIN_NONE = 0xFFFFFFFF

#: Fault codes, the same on every target (x86 ``KernelFault.code``, the GPU fault record).
FAULT_GLOBAL = 1        # outside its global/constant buffer (or, unchecked x86: the arena)
FAULT_SHARED = 2        # outside its shared array
FAULT_LOCAL = 3         # outside its local array
FAULT_MISALIGNED = 4
FAULT_TRAP = 5
FAULT_BARRIER = 6
FAULT_CANCELLED = 7

_SPACE_FAULT = {AddressSpace.GLOBAL: FAULT_GLOBAL, AddressSpace.CONSTANT: FAULT_GLOBAL,
                AddressSpace.SHARED: FAULT_SHARED, AddressSpace.LOCAL: FAULT_LOCAL}


def space_fault(space: AddressSpace) -> int:
    """The out-of-bounds fault code of an access in ``space``."""
    return _SPACE_FAULT[space]


def describe_origin(origin: int) -> str:
    """``"parameter 2"``, ``"shared array 0"``, ``"local array 1"`` or ``"no buffer"``."""
    if origin == ORIGIN_NONE:
        return "no buffer"
    if origin >= ORIGIN_LOCAL:
        return f"local array {origin - ORIGIN_LOCAL}"
    if origin >= ORIGIN_SHARED:
        return f"shared array {origin - ORIGIN_SHARED}"
    return f"parameter {origin}"


def pointer_params(kernel: Kernel) -> tuple[int, ...]:
    """Indices of the kernel's pointer parameters (each gets a hidden ``(base, length)``)."""
    return tuple(i for i, p in enumerate(kernel.params) if p.type.is_ptr)


def pointer_origins(kernel: Kernel) -> dict[Value, frozenset[int]]:
    """The possible origins of every pointer value of ``kernel`` (a forward fixpoint over
    offsets, selects and block arguments; each set only grows, so it terminates)."""
    out: dict[Value, frozenset[int]] = {}
    for i, p in enumerate(kernel.params):
        if p.type.is_ptr:
            out[p] = frozenset((i,))
    shared = {id(a): ORIGIN_SHARED + j for j, a in enumerate(kernel.shared)}
    local = {id(a): ORIGIN_LOCAL + j for j, a in enumerate(kernel.local)}
    empty: frozenset[int] = frozenset()
    changed = True
    while changed:
        changed = False
        for blk in kernel.blocks:
            for op in blk.ops:
                res = op.result
                if res is not None and res.type.is_ptr:
                    if op.opcode == "shared_addr":
                        new = frozenset((shared[id(op.array)],))
                    elif op.opcode == "local_addr":
                        new = frozenset((local[id(op.array)],))
                    elif op.opcode == "select":
                        new = out.get(op.operands[1], empty) | out.get(op.operands[2], empty)
                    else:                                   # offset, byte_offset
                        new = out.get(op.operands[0], empty)
                    if new != out.get(res, empty):
                        out[res] = new
                        changed = True
                for succ in op.successors:
                    for param, arg in zip(succ.block.params, succ.args):
                        if param.type.is_ptr:
                            have = out.get(param, empty)
                            new = have | out.get(arg, empty)
                            if new != have:
                                out[param] = new
                                changed = True
    return out


def i32(value: int) -> ir.Constant:
    """An ``i32`` constant of a 32-bit pattern (``ORIGIN_NONE`` prints as -1)."""
    value &= 0xFFFFFFFF
    return ir.Constant(I32, value - (1 << 32) if value >> 31 else value)


#: ``bounds`` handed to ``TargetHooks.address`` for an access proven in bounds before its loop.
PROVEN: tuple[ir.Value, ir.Value, ir.Value] = ()  # type: ignore[assignment]

#: Every buffer base is a multiple of this (the largest access size); hosts check it.
BASE_ALIGN = 8


def aligned(b: ir.IRBuilder, off: ir.Value, size: int) -> ir.Value:
    """``off`` is a multiple of ``size`` (a power of two)."""
    if size <= 1:
        return ir.Constant(I1, 1)
    return b.icmp_unsigned("==", b.and_(off, ir.Constant(I64, size - 1)), ir.Constant(I64, 0))


def in_bounds(b: ir.IRBuilder, off: ir.Value, length: ir.Value, size: int) -> ir.Value:
    """``off + size <= length`` for an ``off`` that is a multiple of ``size`` (so the add
    cannot wrap; see the module docstring)."""
    end = off if size == 1 else b.add(off, ir.Constant(I64, size - 1))
    return b.icmp_unsigned("<", end, length)

class FaultTarget(Protocol):
    """Where a failed check goes: :class:`FaultExit` (x86), or one cold block per check (GPU)."""

    def branch(self, b: ir.IRBuilder, fn: ir.Function, ok: ir.Value, code: ir.Value, origin: ir.Value,
               offset: ir.Value) -> ir.IRBuilder: ...

    def jump(self, b: ir.IRBuilder, code: int, origin: int = ...) -> None: ...


class FaultExit:
    """A function's one fault exit: a block whose phis receive (code, origin, offset).

    ``emit`` is called once with a builder at the end of the new block and the three phis; it
    must terminate the block (record the fault, stop the thread)."""

    def __init__(self, fn: ir.Function, emit: Callable[[ir.IRBuilder, ir.Value, ir.Value, ir.Value], None]) -> None:
        self.block = fn.append_basic_block("fault")
        b = ir.IRBuilder(self.block)
        self.code = b.phi(I32, name="fault.code")
        self.origin = b.phi(I32, name="fault.origin")
        self.offset = b.phi(I64, name="fault.offset")
        emit(b, self.code, self.origin, self.offset)

    def branch(self, b: ir.IRBuilder, fn: ir.Function, ok: ir.Value, code: ir.Value, origin: ir.Value,
               offset: ir.Value) -> ir.IRBuilder:
        """Terminate ``b``'s block: on ``ok`` continue in a new block (returned builder),
        else to the fault exit (the edge marked unlikely)."""
        cont = fn.append_basic_block("ok")
        here = b.block
        self.code.add_incoming(code, here)
        self.origin.add_incoming(origin, here)
        self.offset.add_incoming(offset, here)
        br = b.cbranch(ok, cont, self.block)
        mod = b.module
        br.set_metadata("prof", mod.add_metadata([ir.MetaDataString(mod, "branch_weights"),
                                                  ir.Constant(I32, 1 << 20), ir.Constant(I32, 1)]))
        return ir.IRBuilder(cont)

    def jump(self, b: ir.IRBuilder, code: int, origin: int = ORIGIN_NONE) -> None:
        """Terminate ``b``'s block with an unconditional fault (``trap``)."""
        self.code.add_incoming(ir.Constant(I32, code), b.block)
        self.origin.add_incoming(i32(origin), b.block)
        self.offset.add_incoming(ir.Constant(I64, 0), b.block)
        b.branch(self.block)


def check_access(b: ir.IRBuilder, fn: ir.Function, exit_: FaultTarget, addr: ir.Value,
                 bounds: tuple[ir.Value, ir.Value, ir.Value], size: int, space: AddressSpace) -> ir.IRBuilder:
    """Emit the check of a ``size``-byte access at ``addr`` (i64, in the same frame as the
    bounds' base); returns the builder to continue with. One branch: aligned and in bounds,
    else the fault exit with the right code (misaligned first)."""
    base, length, origin = bounds
    off = b.sub(addr, base)
    inb = in_bounds(b, off, length, size)
    if size > 1:
        al = aligned(b, off, size)
        ok = b.and_(al, inb)
        code = b.select(al, ir.Constant(I32, space_fault(space)), ir.Constant(I32, FAULT_MISALIGNED))
    else:
        ok, code = inb, ir.Constant(I32, space_fault(space))
    return exit_.branch(b, fn, ok, code, origin, off)


__all__ = [
    "BASE_ALIGN",
    "FAULT_BARRIER",
    "FAULT_CANCELLED",
    "FAULT_GLOBAL",
    "FAULT_LOCAL",
    "FAULT_MISALIGNED",
    "FAULT_SHARED",
    "FAULT_TRAP",
    "ORIGIN_LOCAL",
    "ORIGIN_NONE",
    "ORIGIN_SHARED",
    "PROVEN",
    "FaultExit",
    "FaultTarget",
    "aligned",
    "check_access",
    "describe_origin",
    "i32",
    "in_bounds",
    "pointer_origins",
    "pointer_params",
    "space_fault",
]
