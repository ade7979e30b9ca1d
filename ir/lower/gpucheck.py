"""GPU access checks in groups: one branch for a run of loads (and the store that ends it).

Every access of a checked GPU kernel is checked before it is performed (docs/ir-lowering.md §7).
Emitting the check right before each access puts a branch between every two loads, so a
thread issues its loads one at a time. Here the lowering checks a whole *group* at its first
access instead: the group is that access and the accesses that follow it in the same IR block
— loads, then at most one store or atomic, which ends it — up to the first barrier, or the
first access whose pointer is not yet computed at the group's start. Their checks are
evaluated there and joined with ``and``: one branch. Its cold side re-tests them *in program
order* and records the first that fails (the last one needs no test: something failed), so
the fault reported is the one the access-by-access order would report. Moving a check above
*loads* changes nothing observable: a load has no effect, and a violation stops the thread
before any later access. No check moves above a store, an atomic or a barrier.

Each check has the cheapest exact form its pointer allows:

* ``offset (shared_addr|local_addr), i`` with element size = access size and ``i`` at most
  32 bits: ``(u32) i <u count`` (arrays are 16-aligned and far smaller than 2^31 bytes);
* ``offset P, i`` with ``P`` a pointer parameter and element size ``s`` = access size, when
  the kernel has at least :attr:`~.gpu.GpuHooks.param_form_uses` such accesses; the kernel
  computes per parameter and size, once at entry, either (``param_form = "dq"``, the default,
  for indices of at most 32 bits) ``d = (P - base) >>s log2 s`` (arithmetic) and
  ``q = length >> log2 s`` (0 if ``P - base`` is not a multiple of ``s``), and the check is
  ``sext(i) + d <u q`` (u64) — equal to the general check for every ``P`` and ``i`` while
  ``length <= 2^62``, which hosts enforce: for ``s = 1`` it is the general check itself
  (``d = P - base``, ``q = length``, both mod 2^64); for ``s >= 2`` and aligned ``P - base``
  the general check accepts exactly when ``(d + i) mod 2^(64-log2 s) < q``, and ``d + i`` in
  i64 (``|d| <= 2^62``) neither wraps nor reaches ``[0, q)`` from outside it; or (``"dl"``) ``D = P - base`` and
  ``L = length - (s - 1)`` (0 if ``length < s - 1`` or ``D`` is misaligned), and the check is
  ``off = D + s*i <u L`` — the general check's own ``off``, whose alignment is ``D``'s;
* anything else (a pointer with several possible buffers, an element size other than the
  access size, an ``offset`` into
  a value that is not a parameter): the general check of :func:`~.bounds.check_access`.

The cold side computes the fault's code and offset from the same values, exactly as the
general check would report them (misaligned before out of bounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llvmlite import ir
from vxpu.ir.lower.bounds import (
    FAULT_LOCAL,
    FAULT_MISALIGNED,
    FAULT_SHARED,
    aligned,
    i32,
    in_bounds,
    space_fault,
)
from vxpu.ir.model import Block, Op, OpResult, Param, Value

if TYPE_CHECKING:
    from vxpu.ir.lower.common import KernelLowering
    from vxpu.ir.lower.gpu import GpuHooks

I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)

__all__ = ["WINDOW_PARAM_BYTES", "WINDOW_SIZES", "CheckGroups", "access_of", "windows_fit"]

#: The element sizes with a host-filled window per pointer parameter, in hidden-argument order
#: (``vxpu.accel.gpu_checked.WINDOW_SIZES``).
WINDOW_SIZES = (1, 2, 4, 8)
#: A checked kernel takes element windows only while all its parameters then fit these bytes
#: (PTX before ISA 8.1 allows 4352 bytes of kernel parameters; AMD's kernarg segment 4096);
#: a kernel with more (~75 pointer parameters and up) keeps the other forms.
WINDOW_PARAM_BYTES = 4096


def windows_fit(args_size: int, pointers: int) -> bool:
    """Does a checked kernel with ``args_size`` bytes of IR parameters and ``pointers`` pointer
    parameters take element windows (``vxpu.accel.gpu_checked.windows_fit`` is the same rule)?"""
    start = (args_size + 7) & ~7
    end = start + 16 * pointers + 8 * len(WINDOW_SIZES) * (pointers + 1) + 12
    return pointers > 0 and end <= WINDOW_PARAM_BYTES

def access_of(op: Op) -> tuple[Value, int] | None:
    """``(pointer, size)`` of a load, store or atomic; None for other ops."""
    if op.opcode == "load" or op.opcode.startswith("atomic_"):
        assert op.type is not None
        return op.operands[0], op.type.size
    if op.opcode == "store":
        return op.operands[1], op.operands[0].type.size
    return None


@dataclass
class _Member:
    """One access's check: ``ok`` (hot side) and how to report it (cold side)."""

    ok: ir.Value
    code: int                     # the out-of-bounds code (misaligned is derived from off)
    origin: ir.Value
    off: ir.Value                 # offset from the buffer's start (i64)
    size: int
    may_misalign: bool            # report misaligned when off is not a multiple of the size
    #: the window form's (parameter, IR index, its i32 value): joins a common-window test
    window: tuple[int, Value, ir.Value] | None = None


class CheckGroups:
    """The group checks of one GPU kernel (one instance per kernel lowering)."""

    def __init__(self, hooks: GpuHooks) -> None:
        self.hooks = hooks
        #: id() of accesses whose check an earlier access of their group emitted.
        self.covered: set[int] = set()
        #: (param index, size) -> (d, q) computed in the entry block.
        self.limits: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        self.uses: dict[tuple[int, int], int] | None = None

    def check(self, kl: KernelLowering, op: Op) -> bool:
        """Emit the check of access ``op`` (and of the rest of its group), or find it emitted
        by its group; True: ``op`` runs unchecked at its place."""
        if id(op) in self.covered:
            self.covered.discard(id(op))
            return True
        blk = kl.current_block
        assert blk is not None
        members = [op, *self._followers(kl, blk, op)]
        checks = [self._member(kl, m) for m in members]
        parts = self._common(kl, checks)
        ok = parts[0]
        for part in parts[1:]:
            ok = kl.b.and_(ok, part)
        self._branch(kl, ok, checks)
        self.covered.update(id(m) for m in members[1:])
        return True

    def _common(self, kl: KernelLowering, checks: list[_Member]) -> list[ir.Value]:
        """The hot side's tests: the members' own, except that window-form members of one size
        and one IR index whose parameters are *every* pointer parameter of the kernel are
        tested once, against the common window (the intersection of all pointers' windows for
        that size, host-filled): ``i`` is in every member's window iff it is in the
        intersection of those windows, which is the common one. The cold side re-tests each
        member with its own window, as always."""
        common = self.hooks.common_windows
        ptrs = {i for i, p in enumerate(kl.kernel.params) if p.type.is_ptr}
        runs: dict[tuple[int, int], list[_Member]] = {}
        for c in checks:
            if c.window is not None and c.size in common:
                runs.setdefault((c.size, id(c.window[1])), []).append(c)
        joined: set[int] = set()
        parts: list[ir.Value] = []
        for (size, _), run in runs.items():
            if len(run) > 1 and {c.window[0] for c in run if c.window is not None} == ptrs:
                first = run[0].window
                assert first is not None
                lo, hi = common[size]
                i = first[2]
                parts.append(kl.b.and_(kl.b.icmp_signed(">=", i, lo), kl.b.icmp_signed("<=", i, hi)))
                joined.update(id(c) for c in run)
        return parts + [c.ok for c in checks if id(c) not in joined]

    # -- the group ---------------------------------------------------------------------------

    def _followers(self, kl: KernelLowering, blk: Block, first: Op) -> list[Op]:
        """The accesses after ``first`` that join its group (see the module docstring)."""
        if first.opcode != "load":
            return []
        ops = blk.ops
        start = next(i for i, o in enumerate(ops) if o is first)
        later = {id(o) for o in ops[start:]}
        out: list[Op] = []
        for o in ops[start + 1:]:
            if o.opcode == "barrier" or o.defn.terminator:
                break
            acc = access_of(o)
            if acc is None:
                continue
            if id(o) in kl.proven_ops or id(o) in self.hooks.assume_proven:
                if o.opcode != "load":
                    break
                continue
            if not self._ready(acc[0], later):
                break
            out.append(o)
            if o.opcode != "load":
                break
        return out

    @staticmethod
    def _ready(pv: Value, later: set[int]) -> bool:
        """``pv`` (and what its check reads) is computed before the group's first access."""
        if isinstance(pv, OpResult) and id(pv.op) in later:
            return False
        if isinstance(pv, OpResult) and pv.op.opcode == "offset":
            idx = pv.op.operands[1]
            return not (isinstance(idx, OpResult) and id(idx.op) in later)
        return True

    # -- one check ---------------------------------------------------------------------------

    def _member(self, kl: KernelLowering, op: Op) -> _Member:
        acc = access_of(op)
        assert acc is not None
        pv, size = acc
        space = pv.type.space
        assert space is not None
        form = self._array_index(kl, pv, size) or self._param_window(kl, pv, size) \
            or self._param_index(kl, pv, size)
        if form is not None:
            return form
        base, length, origin = kl.bounds_of(pv)
        addr = kl.hooks.pointer_int(kl, kl.get(pv))
        off = kl.b.sub(addr, base)
        ok = in_bounds(kl.b, off, length, size)
        if size > 1:
            ok = kl.b.and_(aligned(kl.b, off, size), ok)
        return _Member(ok, space_fault(space), origin, off, size, size > 1)

    @staticmethod
    def _narrow_offset(pv: Value, size: int) -> tuple[Value, Value] | None:
        """``(base pointer, index)`` of ``offset P, i : T`` with sizeof(T) = ``size`` and
        ``i`` at most 32 bits wide."""
        if not (isinstance(pv, OpResult) and pv.op.opcode == "offset" and pv.op.type is not None
                and pv.op.type.size == size and pv.op.operands[1].type.bits <= 32):
            return None
        return pv.op.operands[0], pv.op.operands[1]

    def _index32(self, kl: KernelLowering, idx: Value) -> ir.Value:
        v = kl.get(idx)
        return v if v.type.width == 32 else kl.b.sext(v, I32)

    def _array_index(self, kl: KernelLowering, pv: Value, size: int) -> _Member | None:
        form = self._narrow_offset(pv, size)
        if form is None or not (isinstance(form[0], OpResult)
                                and form[0].op.opcode in ("shared_addr", "local_addr")):
            return None
        arr = form[0].op.array
        assert arr is not None
        (origin,) = kl.origins[pv]
        i = self._index32(kl, form[1])
        ok = kl.b.icmp_unsigned("<", i, ir.Constant(I32, arr.size // size))
        off = kl.b.mul(kl.b.sext(i, I64), ir.Constant(I64, size))
        code = FAULT_SHARED if form[0].op.opcode == "shared_addr" else FAULT_LOCAL
        return _Member(ok, code, i32(origin), off, size, False)

    def _param_window(self, kl: KernelLowering, pv: Value, size: int) -> _Member | None:
        """``lo <= sext(i) <= hi`` (i32) for ``offset P, i : T``, sizeof(T) = ``size``, ``P`` a
        pointer parameter, ``i`` at most 32 bits: ``(lo, hi)`` is the host-filled element window
        of (P, size), the i32 indices the general check admits (exact, see the module docstring)."""
        if not self.hooks.limits32:
            return None
        form = self._narrow_offset(pv, size)
        if form is None or not isinstance(form[0], Param):
            return None
        window = self.hooks.param_windows.get((form[0].index, size))
        if window is None:
            return None
        lo, hi = window
        i = self._index32(kl, form[1])
        ok = kl.b.and_(kl.b.icmp_signed(">=", i, lo), kl.b.icmp_signed("<=", i, hi))
        space = form[0].type.space
        assert space is not None
        base, _ = self.hooks.param_bounds[form[0].index]
        off = kl.b.sub(kl.b.ptrtoint(kl.get(pv), I64), base)
        return _Member(ok, space_fault(space), i32(form[0].index), off, size, size > 1, (form[0].index, form[1], i))

    def _param_index(self, kl: KernelLowering, pv: Value, size: int) -> _Member | None:
        if not (isinstance(pv, OpResult) and pv.op.opcode == "offset" and pv.op.type is not None
                and pv.op.type.size == size and isinstance(pv.op.operands[0], Param)):
            return None
        param = pv.op.operands[0]
        if self._uses(kl).get((param.index, size), 0) < self.hooks.param_form_uses:
            return None
        space = param.type.space
        assert space is not None
        i = kl.get(pv.op.operands[1])
        if self.hooks.param_form == "dq":
            if i.type.width > 32:
                return None
            d, q = self._element_limits(kl, param, size)
            i = kl.b.sext(i, I64) if i.type.width < 64 else i
            ok = kl.b.icmp_unsigned("<", kl.b.add(i, d), q)
            base, _ = self.hooks.param_bounds[param.index]
            off = kl.b.sub(kl.b.ptrtoint(kl.get(pv), I64), base)
            return _Member(ok, space_fault(space), i32(param.index), off, size, size > 1)
        dist, limit = self._limits(kl, param, size)
        i = i if i.type.width == 64 else kl.b.sext(i, I64)
        off = kl.b.add(dist, kl.b.mul(i, ir.Constant(I64, size)))
        ok = kl.b.icmp_unsigned("<", off, limit)
        return _Member(ok, space_fault(space), i32(param.index), off, size, size > 1)

    def _element_limits(self, kl: KernelLowering, param: Param, size: int) -> tuple[ir.Value, ir.Value]:
        """``(d, q)`` of ``param`` for ``size``-byte elements, computed once in the entry block:
        ``d = (P - base) >>s log2 size``, ``q = length >> log2 size`` (0 if ``P - base`` is not
        a multiple of ``size``)."""
        key = (param.index, -size)
        have = self.limits.get(key)
        if have is not None:
            return have
        b = self._entry_builder(kl)
        base, length = self.hooks.param_bounds[param.index]
        dist = b.sub(b.ptrtoint(kl.values[param], I64), base)
        k = ir.Constant(I64, size.bit_length() - 1)
        q = b.lshr(length, k)
        if size > 1:
            q = b.select(aligned(b, dist, size), q, ir.Constant(I64, 0))
        self.limits[key] = (b.ashr(dist, k), q)
        return self.limits[key]

    @staticmethod
    def _entry_builder(kl: KernelLowering) -> ir.IRBuilder:
        entry = kl.fn.entry_basic_block
        b = ir.IRBuilder(entry)
        assert entry.terminator is not None
        b.position_before(entry.terminator)
        return b

    def _uses(self, kl: KernelLowering) -> dict[tuple[int, int], int]:
        """How many accesses of the kernel have the parameter-offset form, per (param, size)."""
        if self.uses is None:
            self.uses = {}
            for blk in kl.kernel.blocks:
                for op in blk.ops:
                    acc = access_of(op)
                    pv = None if acc is None else acc[0]
                    if acc is not None and isinstance(pv, OpResult) and pv.op.opcode == "offset" \
                            and isinstance(pv.op.operands[0], Param):
                        key = (pv.op.operands[0].index, acc[1])
                        self.uses[key] = self.uses.get(key, 0) + 1
        return self.uses

    def _limits(self, kl: KernelLowering, param: Param, size: int) -> tuple[ir.Value, ir.Value]:
        """``(D, L)`` of ``param`` for ``size``-byte accesses, computed once in the entry block:
        ``D = P - base`` and ``L = length - (size - 1)`` (0 if negative, or if ``D`` is not a
        multiple of ``size``)."""
        key = (param.index, size)
        have = self.limits.get(key)
        if have is not None:
            return have
        b = self._entry_builder(kl)
        base, length = self.hooks.param_bounds[param.index]
        dist = b.sub(b.ptrtoint(kl.values[param], I64), base)
        limit = length
        if size > 1:
            slack = ir.Constant(I64, size - 1)
            room = b.icmp_unsigned(">=", length, slack)
            limit = b.select(b.and_(room, aligned(b, dist, size)), b.sub(length, slack), ir.Constant(I64, 0))
        self.limits[key] = (dist, limit)
        return self.limits[key]

    # -- the branch and its cold side --------------------------------------------------------

    def _branch(self, kl: KernelLowering, ok: ir.Value, checks: list[_Member]) -> None:
        fn = kl.fn
        cont, cold = fn.append_basic_block("ok"), fn.append_basic_block("fault")
        br = kl.b.cbranch(ok, cont, cold)
        mod = kl.module
        br.set_metadata("prof", mod.add_metadata([ir.MetaDataString(mod, "branch_weights"),
                                                  ir.Constant(I32, 1 << 20), ir.Constant(I32, 1)]))
        cb = ir.IRBuilder(cold)
        for n, c in enumerate(checks):
            if n + 1 < len(checks):
                nxt, fail = fn.append_basic_block("fault.next"), fn.append_basic_block("fault.here")
                cb.cbranch(c.ok, nxt, fail)
                self._report(kl, ir.IRBuilder(fail), c)
                cb = ir.IRBuilder(nxt)
            else:
                self._report(kl, cb, c)
        kl.b = ir.IRBuilder(cont)

    def _report(self, kl: KernelLowering, b: ir.IRBuilder, c: _Member) -> None:
        if c.may_misalign:
            code = b.select(aligned(b, c.off, c.size), i32(c.code), i32(FAULT_MISALIGNED))
        else:
            code = i32(c.code)
        self.hooks._record(kl, b, code, c.origin, c.off)

