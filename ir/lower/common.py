"""IR → LLVM IR (``llvmlite.ir``): the lowering shared by every target.

:class:`KernelLowering` turns one verified :class:`~vxpu.ir.model.Kernel` into the body of an
LLVM function. It owns everything that is the same on all targets — the exact IR semantics
(see docs/ir.md), so **no undefined behaviour reaches LLVM**:

* integer division and remainder are guarded with selects (``x / 0 = 0``, ``x % 0 = x``,
  ``MIN / -1 = MIN``, ``MIN % -1 = 0``); shift amounts are masked and ``>= width`` selected
  to ``0`` (or the sign fill for ``ashr``); no ``nsw``/``nuw``/``exact``/fast-math flags;
* float → int conversions use ``llvm.fpto[su]i.sat`` (saturating, NaN → 0);
* ``fmin``/``fmax`` are ``llvm.minnum``/``maxnum``; transcendental functions come from
  :mod:`vxpu.ir.lower.math` (identical code on every target);
* block parameters become phi nodes; blocks are emitted in reverse post-order so every
  definition is emitted before its uses; unreachable blocks are dropped.

What differs per target lives behind :class:`TargetHooks` (pointer representation, thread
geometry, memory addressing and sandbox checks, barriers, traps, kernel marking), implemented in
``nvptx.py``, ``amdgpu.py`` and ``x86.py``. Pointers are byte pointers (``i8 addrspace(N)*``)
on GPUs and arena offsets (``i64``) on x86; loads and stores ask the hooks for a typed address.

**Checked lowering** (``hooks.checked``, the default for every guest module): each pointer value
also carries its buffer's bounds (see :mod:`vxpu.ir.lower.bounds`): this class tracks the tag of
pointers that may point into more than one buffer (through offsets, selects and phis) and hands
the hooks ``(base, length, origin)`` for every access.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator

from llvmlite import ir
from vxpu.ir.lower import math as vmath
from vxpu.ir.lower.bounds import (
    ORIGIN_NONE,
    PROVEN,
    FaultTarget,
    i32,
    pointer_origins,
)
from vxpu.ir.lower.errors import LoweringError
from vxpu.ir.lower.hoist import check_array_index, proven_accesses, range_ok
from vxpu.ir.lower.versioning import UNROLL_COUNT, CountedLoop, find_counted_loops, loop_id
from vxpu.ir.model import Block, Kernel, Op, Value
from vxpu.ir.types import AddressSpace, Type

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VOID = ir.VoidType()

_SCALAR = {
    "i1": I1, "i8": I8, "i16": I16, "i32": I32, "i64": I64,
    "f16": ir.HalfType(), "f32": ir.FloatType(), "f64": ir.DoubleType(),
}
_FLOAT_SUFFIX = {16: "f16", 32: "f32", 64: "f64"}
_ICMP = {"eq": "==", "ne": "!=", "slt": "<", "sle": "<=", "sgt": ">", "sge": ">=",
         "ult": "<", "ule": "<=", "ugt": ">", "uge": ">="}
_FCMP = {"oeq": "==", "one": "!=", "olt": "<", "ole": "<=", "ogt": ">", "oge": ">=", "ord": "ord",
         "ueq": "==", "une": "!=", "ult": "<", "ule": "<=", "ugt": ">", "uge": ">=", "uno": "uno"}
_RMW = {"atomic_add": "add", "atomic_fadd": "fadd", "atomic_smin": "min", "atomic_smax": "max",
        "atomic_umin": "umin", "atomic_umax": "umax", "atomic_and": "and", "atomic_or": "or",
        "atomic_xor": "xor", "atomic_xchg": "xchg"}
_INT_BIN = {"add": "add", "sub": "sub", "mul": "mul", "and": "and_", "or": "or_", "xor": "xor"}
_FLOAT_BIN = {"fadd": "fadd", "fsub": "fsub", "fmul": "fmul", "fdiv": "fdiv"}
_FLOAT_INTRINSIC1 = {"fabs": "llvm.fabs", "sqrt": "llvm.sqrt", "floor": "llvm.floor", "ceil": "llvm.ceil",
                     "rint": "llvm.roundeven"}
_FLOAT_INTRINSIC2 = {"fmin": "llvm.minnum", "fmax": "llvm.maxnum"}
_INT_MINMAX = {"smin": ("<", True), "smax": (">", True), "umin": ("<", False), "umax": (">", False)}


def scalar_type(t: Type) -> ir.Type:
    """The LLVM type of a non-pointer IR type."""
    return _SCALAR[t.name]


def float_constant(t: Type, value: float) -> ir.Constant:
    """An exact LLVM float constant (hex bit patterns; f16 as ``0xH``)."""
    if t.bits == 16:
        bits = 0x7E00 if math.isnan(value) else struct.unpack("<H", struct.pack("<e", value))[0]
        return ir.FormattedConstant(_SCALAR["f16"], f"0xH{bits:04X}")
    if math.isnan(value):
        return ir.FormattedConstant(_SCALAR[t.name], "0x7FF8000000000000")
    bits64 = struct.unpack("<Q", struct.pack("<d", float(value)))[0]
    return ir.FormattedConstant(_SCALAR[t.name], f"0x{bits64:016X}")


class FreezeInstr(ir.instructions.Instruction):
    """``freeze T %v``: an arbitrary but fixed value instead of undef/poison (llvmlite lacks it)."""

    def __init__(self, parent: ir.Block, val: ir.Value, name: str = "") -> None:
        super().__init__(parent, val.type, "freeze", [val], name=name)

    def descr(self, buf: list[str]) -> None:
        buf.append(f"freeze {self.operands[0].type} {self.operands[0].get_reference()}\n")


def freeze(b: ir.IRBuilder, val: ir.Value) -> ir.Value:
    """Emit ``freeze`` of ``val`` at the builder's position."""
    inst = FreezeInstr(b.block, val)
    b._insert(inst)
    return inst


def declare(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    """Get or declare the function ``name`` (intrinsics and helpers)."""
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, args), name=name)
    return fn


class TargetHooks:
    """What a target decides; :class:`KernelLowering` calls these while emitting a kernel.

    Subclasses set :attr:`triple`/:attr:`datalayout` and implement every method. ``kl`` is the
    calling :class:`KernelLowering` (``kl.b`` is the current builder).
    """

    triple = ""
    datalayout = ""
    #: Emit counted loops twice (see :mod:`vxpu.ir.lower.versioning`).
    version_loops = True
    #: The target has a correctly rounded f16 fma (else it is emulated exactly in f64).
    native_f16_fma = False
    #: Check every access against its own buffer (per-buffer bounds); False only for trusted
    #: modules compiled with ``checked=False`` on the host.
    checked = False
    #: id() of the accesses proven in bounds for the whole copy being emitted (GPU copies).
    assume_proven: set[int] = frozenset()  # type: ignore[assignment]

    def ptr_type(self, space: AddressSpace) -> ir.Type:
        """LLVM type of an IR pointer in ``space``."""
        raise NotImplementedError

    def geometry(self, kl: KernelLowering, opcode: str, dim: str) -> ir.Value:
        """An i32 for thread_id / block_id / block_dim / grid_dim."""
        raise NotImplementedError

    def offset(self, kl: KernelLowering, p: ir.Value, nbytes: ir.Value, space: AddressSpace) -> ir.Value:
        """``p + nbytes`` (i64, wrapping) in ``space``."""
        raise NotImplementedError

    def address(self, kl: KernelLowering, p: ir.Value, space: AddressSpace, t: ir.Type, size: int,
                atomic: bool, bounds: tuple[ir.Value, ir.Value, ir.Value] | None) -> ir.Value:
        """A typed LLVM pointer for an access of ``size`` bytes at IR pointer ``p``.

        ``bounds`` is ``(base, length, origin)`` of ``p``'s buffer when :attr:`checked` (the
        hooks emit the check, see :func:`vxpu.ir.lower.bounds.check_access`, and may change
        the current block); ``None`` in an unchecked build."""
        raise NotImplementedError

    def origin_bounds(self, kl: KernelLowering, origin: int) -> tuple[ir.Value, ir.Value]:
        """``(base, length)`` (i64, in the frame of the space's pointers) of a buffer origin."""
        raise NotImplementedError

    def fault_exit(self, kl: KernelLowering) -> FaultTarget:
        """The current function's fault exit (made on first use)."""
        raise NotImplementedError

    def group_check(self, kl: KernelLowering, op: Op) -> bool:
        """Emit the check of access ``op`` together with the accesses after it (or find it
        emitted by an earlier one); True if done, False: check ``op`` by itself."""
        return False

    def split_offset(self, kl: KernelLowering, op: Op) -> ir.Value | None:
        """``offset``/``byte_offset`` ``op`` emitted as two offsets, or None: emit it whole."""
        return None

    def load(self, kl: KernelLowering, op: Op, emit: Callable[[], ir.Value]) -> ir.Value:
        """Load ``op``'s value: ``emit()`` emits the load here (a target may put it under a branch)."""
        return emit()

    def pointer_int(self, kl: KernelLowering, p: ir.Value) -> ir.Value:
        """An IR pointer as the i64 its bounds are expressed in."""
        return p if isinstance(p.type, ir.IntType) else kl.b.ptrtoint(p, I64)

    def array_addr(self, kl: KernelLowering, op: Op) -> ir.Value:
        """The pointer value of ``shared_addr``/``local_addr``."""
        raise NotImplementedError

    def barrier(self, kl: KernelLowering) -> None:
        """Emit a block-wide barrier (the x86 target splits the function here)."""
        raise NotImplementedError

    def trap(self, kl: KernelLowering) -> None:
        """Terminate the current block with a kernel fault."""
        raise NotImplementedError

    def ret(self, kl: KernelLowering) -> None:
        """Terminate the current block: this thread is done."""
        raise NotImplementedError

    def invariant_load(self, space: AddressSpace) -> bool:
        """Whether loads from ``space`` may be marked ``!invariant.load``."""
        return False

    def freeze_loads(self, space: AddressSpace) -> bool:
        """Whether loads from ``space`` need ``freeze`` (memory LLVM may consider undef)."""
        return False

    def ex2_unit(self) -> vmath.Ex2Unit | None:
        """The target's hardware f32 2^x (f32 exp/exp2 are built on it), or None for the polynomial."""
        return None


def reverse_postorder(kernel: Kernel) -> list[Block]:
    """The blocks reachable from the entry, in reverse post-order."""
    if not kernel.blocks:
        return []
    seen: set[int] = set()
    order: list[Block] = []
    stack: list[tuple[Block, Iterator[Block]]] = [(kernel.blocks[0], iter(kernel.blocks[0].successor_blocks()))]
    seen.add(id(kernel.blocks[0]))
    while stack:
        blk, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            order.append(blk)
            stack.pop()
        elif id(nxt) not in seen:
            seen.add(id(nxt))
            stack.append((nxt, iter(nxt.successor_blocks())))
    order.reverse()
    return order


class KernelLowering:
    """Emits one kernel's ops into an LLVM function that the target prepared.

    Args:
        kernel: a verified kernel.
        hooks: the target.
        fn: the LLVM function to fill; ``entry`` is its first block (already holding any
            target prologue); ``params`` maps kernel params to their LLVM values.
    """

    def __init__(self, kernel: Kernel, hooks: TargetHooks, fn: ir.Function, entry: ir.Block,
                 params: dict[Value, ir.Value]) -> None:
        self.kernel = kernel
        self.hooks = hooks
        self.fn = fn
        self.module: ir.Module = fn.module
        self.b = ir.IRBuilder(entry)
        self.values: dict[Value, ir.Value] = dict(params)
        self.blocks: dict[int, ir.Block] = {}
        self.phis: dict[int, list[ir.PhiInstr]] = {}
        #: Values kept in per-thread spill slots (x86 barrier fission): value -> typed slot pointer.
        self.spill: dict[Value, ir.Value] = {}
        self.current_op: Op | None = None
        self.current_block: Block | None = None
        self.versioned: dict[int, CountedLoop] = {}
        self.slow_blocks: dict[int, ir.Block] = {}
        self.slow_phis: dict[int, list[ir.PhiInstr]] = {}
        #: id() of the ops emitted with nsw/nuw (increments of the fast copy of a counted loop).
        self.no_wrap: dict[int, str] = {}
        self.fast_loop: CountedLoop | None = None
        self.checked = hooks.checked
        #: Possible buffers of every pointer value (checked builds only).
        self.origins = pointer_origins(kernel) if self.checked else {}
        #: The i32 origin tag of pointers with several possible buffers.
        self.tags: dict[Value, ir.Value] = {}
        #: Spill slots (i32*) of tags live across a barrier (x86 barrier fission).
        self.tag_spill: dict[Value, ir.Value] = {}
        #: id(LLVM block) -> {block param index: phi of that param's tag}.
        self.tag_phis: dict[int, dict[int, ir.PhiInstr]] = {}
        #: id(header) -> {id(access op): (base pointer, size)}: accesses of a counted loop whose
        #: checks the loop's version test proves for every iteration (see :meth:`_proven`).
        self.loop_proven: dict[int, dict[int, tuple[Value, int, int, Value | None]]] = {}
        #: id() of the access ops being emitted without a check (the fast copy of such a loop).
        self.proven_ops: set[int] = set()

    # ------------------------------------------------------------------ types and values

    def llvm_type(self, t: Type) -> ir.Type:
        return self.hooks.ptr_type(t.space) if t.is_ptr else scalar_type(t)  # type: ignore[arg-type]

    def get(self, v: Value) -> ir.Value:
        """The LLVM value of ``v`` at the current point (reloaded from its spill slot if spilled)."""
        slot = self.spill.get(v)
        if slot is not None:
            loaded = self.b.load(slot)
            return self.b.trunc(loaded, I1) if v.type.name == "i1" else loaded
        try:
            return self.values[v]
        except KeyError:
            raise LoweringError(f"kernel @{self.kernel.name}: value {v!r} used before definition "
                                "(run the verifier first)") from None

    def define(self, v: Value, val: ir.Value) -> None:
        self.values[v] = val
        slot = self.spill.get(v)
        if slot is not None:
            self.b.store(self.b.zext(val, I8) if v.type.name == "i1" else val, slot)

    # ------------------------------------------------------------------ pointer bounds

    def multi(self, v: Value) -> bool:
        """Whether pointer ``v`` may point into more than one buffer (it carries a tag)."""
        return len(self.origins.get(v, ())) > 1

    def tag(self, v: Value) -> ir.Value:
        """The i32 origin of pointer ``v`` at the current point (a constant if it has one)."""
        origins = self.origins.get(v)
        if not origins:
            return i32(ORIGIN_NONE)
        if len(origins) == 1:
            return i32(next(iter(origins)))
        slot = self.tag_spill.get(v)
        if slot is not None:
            return self.b.load(slot)
        return self.tags[v]

    def set_tag(self, v: Value, tag: ir.Value) -> None:
        if not self.multi(v):
            return
        self.tags[v] = tag
        slot = self.tag_spill.get(v)
        if slot is not None:
            self.b.store(tag, slot)

    def bounds_of(self, v: Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``(base, length, origin)`` of the buffer pointer ``v`` points into."""
        origins = sorted(self.origins.get(v, ()))
        if not origins:
            return ir.Constant(I64, 0), ir.Constant(I64, 0), i32(ORIGIN_NONE)
        tag = self.tag(v)
        base, length = self.hooks.origin_bounds(self, origins[0])
        for o in origins[1:]:
            ob, ol = self.hooks.origin_bounds(self, o)
            hit = self.b.icmp_unsigned("==", tag, i32(o))
            base, length = self.b.select(hit, ob, base), self.b.select(hit, ol, length)
        return base, length, tag

    def _make_phis(self, lb: ir.Block, blk: Block) -> list[ir.PhiInstr]:
        pb = ir.IRBuilder(lb)
        phis = [pb.phi(self.llvm_type(p.type)) for p in blk.params]
        tags = {p.index: pb.phi(I32) for p in blk.params if self.multi(p)}
        if tags:
            self.tag_phis[id(lb)] = tags
        return phis

    def define_params(self, blk: Block) -> None:
        """Define ``blk``'s parameters (and their tags) from the phis of its current LLVM block."""
        for p, phi in zip(blk.params, self.phis[id(blk)]):
            self.define(p, phi)
        for i, phi in self.tag_phis.get(id(self.blocks[id(blk)]), {}).items():
            self.set_tag(blk.params[i], phi)

    def _tag_incoming(self, target: ir.Block, tags: dict[int, ir.Value], src: ir.Block) -> None:
        for i, phi in self.tag_phis.get(id(target), {}).items():
            phi.add_incoming(tags[i], src)

    def _arg_tags(self, target: ir.Block, args: tuple[Value, ...]) -> dict[int, ir.Value]:
        return {i: self.tag(args[i]) for i in self.tag_phis.get(id(target), {})}

    # ------------------------------------------------------------------ driver

    def lower(self) -> None:
        """Emit every reachable block; the entry builder branches to the IR entry block."""
        order = reverse_postorder(self.kernel)
        if not order:
            raise LoweringError(f"kernel @{self.kernel.name} has no blocks")
        if self.hooks.version_loops and not self.spill:
            self.versioned = {id(cl.header): cl for cl in find_counted_loops(self.kernel, order)}
            if self.checked:
                whole = self.hooks.assume_proven    # proven for the whole copy already
                self.loop_proven = {h: {k: v for k, v in proven_accesses(cl).items() if k not in whole}
                                    for h, cl in self.versioned.items()}
        for blk in order:
            lb = self.fn.append_basic_block(f"b.{blk.name or len(self.blocks)}")
            self.blocks[id(blk)] = lb
            self.phis[id(blk)] = self._make_phis(lb, blk)
        for cl in self.versioned.values():
            for blk in cl.blocks:
                lb = self.fn.append_basic_block(f"b.{blk.name or 'loop'}.wrap")
                self.slow_blocks[id(blk)] = lb
                self.slow_phis[id(blk)] = self._make_phis(lb, blk)
        self.b.branch(self.blocks[id(order[0])])
        done: set[int] = set()
        for blk in order:
            if id(blk) in done:
                continue
            found = self.versioned.get(id(blk))
            if found is not None:
                self._lower_versioned(found)
                done.update(id(b) for b in found.blocks)
            else:
                self._lower_block(blk)

    def _lower_block(self, blk: Block) -> None:
        self.current_block = blk
        self.b = ir.IRBuilder(self.blocks[id(blk)])
        self.define_params(blk)
        for op in blk.ops:
            self.current_op = op
            self.lower_op(op)

    def _lower_versioned(self, cl: CountedLoop) -> None:
        """Emit ``cl`` twice: the no-wrap copy (fast) and the wrapping original (slow)."""
        ends: list[ir.Block] = []
        escaped: list[dict[Value, ir.Value]] = []
        escaped_tags: list[dict[Value, ir.Value]] = []
        saved = {id(b): (self.blocks[id(b)], self.phis[id(b)]) for b in cl.blocks}
        for fast in (True, False):
            if not fast:
                for b in cl.blocks:
                    self.blocks[id(b)], self.phis[id(b)] = self.slow_blocks[id(b)], self.slow_phis[id(b)]
            flag = "nsw" if cl.signed else "nuw"
            self.no_wrap = {i: flag for i in cl.increments} if fast else {}
            self.fast_loop = cl if fast else None
            self.proven_ops = set(self.loop_proven.get(id(cl.header), {})) if fast else set()
            for b in cl.blocks:
                self._lower_block(b)
                if b is cl.header:
                    ends.append(self.b.block)
            escaped.append({v: self.values[v] for v in cl.escaping})
            escaped_tags.append({v: self.tags[v] for v in cl.escaping if self.multi(v)})
        for b in cl.blocks:
            self.blocks[id(b)], self.phis[id(b)] = saved[id(b)]
        self.no_wrap, self.fast_loop, self.proven_ops = {}, None, set()
        merge = ir.IRBuilder(self.blocks[id(cl.exit)])  # holds only its parameter phis so far
        for v in cl.escaping:
            phi = merge.phi(self.llvm_type(v.type))
            phi.add_incoming(escaped[0][v], ends[0])
            phi.add_incoming(escaped[1][v], ends[1])
            self.values[v] = phi
            if v in escaped_tags[0]:
                tphi = merge.phi(I32)
                tphi.add_incoming(escaped_tags[0][v], ends[0])
                tphi.add_incoming(escaped_tags[1][v], ends[1])
                self.tags[v] = tphi

    def _dispatch(self, cl: CountedLoop, args: tuple[Value, ...]) -> ir.Block:
        """The preheader edge of a versioned loop: a block that checks that no increment can
        wrap (``step > 0`` and ``bound + step - 1`` representable) and enters the right copy."""
        vals = [self.get(a) for a in args]
        tags = self._arg_tags(self.blocks[id(cl.header)], args)
        n, step = self.get(cl.bound), self.get(cl.step)
        d = self.fn.append_basic_block("loop.version")
        db = ir.IRBuilder(d)
        ty = n.type
        if cl.signed:
            top = ir.Constant(ty, (1 << (ty.width - 1)) - 1)
            pos = db.icmp_signed(">", step, ir.Constant(ty, 0))
            fits = db.icmp_signed("<=", n, db.add(db.sub(top, step), ir.Constant(ty, 1)))
        else:
            top = ir.Constant(ty, (1 << ty.width) - 1)
            pos = db.icmp_unsigned("!=", step, ir.Constant(ty, 0))
            fits = db.icmp_unsigned("<=", n, db.add(db.sub(top, step), ir.Constant(ty, 1)))
        go = db.and_(pos, fits)
        proven = self.loop_proven.get(id(cl.header), {})
        if proven:
            go = db.and_(go, range_ok(self, db, cl, vals[cl.iv.index], proven))
        h = cl.header
        db.cbranch(go, self.blocks[id(h)], self.slow_blocks[id(h)])
        for fast_phi, slow_phi, v in zip(self.phis[id(h)], self.slow_phis[id(h)], vals):
            fast_phi.add_incoming(v, d)
            slow_phi.add_incoming(v, d)
        self._tag_incoming(self.blocks[id(h)], tags, d)
        self._tag_incoming(self.slow_blocks[id(h)], tags, d)
        return d

    def branch_to(self, succ_block: Block, args: tuple[Value, ...]) -> ir.Block:
        """Add phi incomings for a branch from the current block; returns the target block."""
        cl = self.versioned.get(id(succ_block))
        if cl is not None and self.current_block is cl.preheader:
            return self._dispatch(cl, args)
        target = self.blocks[id(succ_block)]
        for phi, a in zip(self.phis[id(succ_block)], args):
            phi.add_incoming(self.get(a), self.b.block)
        self._tag_incoming(target, self._arg_tags(target, args), self.b.block)
        return target

    # ------------------------------------------------------------------ ops

    def lower_op(self, op: Op) -> None:
        name = op.opcode
        handler = _HANDLERS.get(name)
        if handler is None:
            handler = _family_handler(name)
        val = handler(self, op)
        if op.result is not None:
            if val is None:
                raise LoweringError(f"op {name} produced no value")
            self.define(op.result, val)

    def args(self, op: Op) -> list[ir.Value]:
        return [self.get(v) for v in op.operands]

    def intrinsic(self, name: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
        return self.b.call(declare(self.module, name, ret, [a.type for a in args]), args)


# ---------------------------------------------------------------------- op handlers


def _int_binary(kl: KernelLowering, op: Op) -> ir.Value:
    a, c = kl.args(op)
    flag = kl.no_wrap.get(id(op))
    if flag is not None:  # proven by the loop-version check (see versioning.py)
        return kl.b.add(a, c, flags=(flag,))
    return getattr(kl.b, _INT_BIN[op.opcode])(a, c)


def _div_rem(kl: KernelLowering, op: Op) -> ir.Value:
    a, d = kl.args(op)
    ty = a.type
    b = kl.b
    zero = ir.Constant(ty, 0)
    one = ir.Constant(ty, 1)
    is_zero = b.icmp_unsigned("==", d, zero)
    bad = is_zero
    if op.opcode in ("sdiv", "srem"):
        bits = ty.width
        int_min = ir.Constant(ty, 1 << (bits - 1))
        ovf = b.and_(b.icmp_unsigned("==", a, int_min), b.icmp_unsigned("==", d, ir.Constant(ty, -1)))
        bad = b.or_(is_zero, ovf)
    safe = b.select(bad, one, d)
    res = {"sdiv": b.sdiv, "udiv": b.udiv, "srem": b.srem, "urem": b.urem}[op.opcode](a, safe)
    # x/1 = x gives MIN/-1 = MIN and x%1 = 0 gives MIN%-1 = 0; only b == 0 needs a fix-up.
    return b.select(is_zero, zero if op.opcode.endswith("div") else a, res)


def _shift(kl: KernelLowering, op: Op) -> ir.Value:
    a, s = kl.args(op)
    ty = a.type
    b = kl.b
    width = ty.width
    big = b.icmp_unsigned(">=", s, ir.Constant(ty, width))
    if op.opcode == "ashr":
        return b.ashr(a, b.select(big, ir.Constant(ty, width - 1), s))
    masked = b.select(big, ir.Constant(ty, 0), s)
    res = b.shl(a, masked) if op.opcode == "shl" else b.lshr(a, masked)
    return b.select(big, ir.Constant(ty, 0), res)


def _int_minmax(kl: KernelLowering, op: Op) -> ir.Value:
    a, c = kl.args(op)
    cmp, signed = _INT_MINMAX[op.opcode]
    cond = kl.b.icmp_signed(cmp, a, c) if signed else kl.b.icmp_unsigned(cmp, a, c)
    return kl.b.select(cond, a, c)


def _int_unary(kl: KernelLowering, op: Op) -> ir.Value:
    (a,) = kl.args(op)
    zero = ir.Constant(a.type, 0)
    if op.opcode == "neg":
        return kl.b.sub(zero, a)
    if op.opcode == "not":
        return kl.b.xor(a, ir.Constant(a.type, -1))
    return kl.b.select(kl.b.icmp_signed("<", a, zero), kl.b.sub(zero, a), a)


def _float_binary(kl: KernelLowering, op: Op) -> ir.Value:
    a, c = kl.args(op)
    return getattr(kl.b, _FLOAT_BIN[op.opcode])(a, c)


def _frem(kl: KernelLowering, op: Op) -> ir.Value:
    a, c = kl.args(op)
    return vmath.call_fmod(kl.b, a, c)


def _fsuffix(v: ir.Value) -> str:
    t = v.type
    return "f16" if isinstance(t, ir.HalfType) else "f32" if isinstance(t, ir.FloatType) else "f64"


def _float_intrinsic(kl: KernelLowering, op: Op) -> ir.Value:
    args = kl.args(op)
    if op.opcode == "fma" and isinstance(args[0].type, ir.HalfType) and not kl.hooks.native_f16_fma:
        return vmath.fma_f16(kl.b, *args)
    base = _FLOAT_INTRINSIC1.get(op.opcode) or _FLOAT_INTRINSIC2.get(op.opcode) or "llvm.fma"
    return kl.intrinsic(f"{base}.{_fsuffix(args[0])}", args[0].type, args)


def _float_unary(kl: KernelLowering, op: Op) -> ir.Value:
    (a,) = kl.args(op)
    if op.opcode == "fneg":
        return kl.b.fneg(a)
    # rsqrt: 1 / sqrt(a), both correctly rounded (within the documented 2 ulp).
    s = kl.intrinsic(f"llvm.sqrt.{_fsuffix(a)}", a.type, [a])
    return kl.b.fdiv(float_constant(op.type, 1.0), s)  # type: ignore[arg-type]


def _math(kl: KernelLowering, op: Op) -> ir.Value:
    return vmath.call_math(kl.b, op.opcode, kl.args(op), kl.hooks.ex2_unit())


def _icmp(kl: KernelLowering, op: Op) -> ir.Value:
    a, c = kl.args(op)
    pred = op.pred or "eq"
    if pred in ("eq", "ne") or pred.startswith("u"):
        return kl.b.icmp_unsigned(_ICMP[pred], a, c)
    return kl.b.icmp_signed(_ICMP[pred], a, c)


def _fcmp(kl: KernelLowering, op: Op) -> ir.Value:
    a, c = kl.args(op)
    pred = op.pred or "oeq"
    if pred in ("ord", "uno"):
        return kl.b.fcmp_ordered("ord", a, c) if pred == "ord" else kl.b.fcmp_unordered("uno", a, c)
    if pred.startswith("o"):
        return kl.b.fcmp_ordered(_FCMP[pred], a, c)
    return kl.b.fcmp_unordered(_FCMP[pred], a, c)


def _select(kl: KernelLowering, op: Op) -> ir.Value:
    c, a, d = kl.args(op)
    assert op.result is not None
    if kl.multi(op.result):
        kl.set_tag(op.result, kl.b.select(c, kl.tag(op.operands[1]), kl.tag(op.operands[2])))
    return kl.b.select(c, a, d)


def _convert(kl: KernelLowering, op: Op) -> ir.Value:
    (a,) = kl.args(op)
    assert op.type is not None
    to = scalar_type(op.type)
    b = kl.b
    name = op.opcode
    if name == "fptrunc" and op.type.bits == 16 and isinstance(a.type, ir.DoubleType):
        return vmath.fptrunc_f64_to_f16(b, a)
    if name in ("trunc", "zext", "sext", "fptrunc", "fpext", "sitofp", "uitofp", "bitcast"):
        return getattr(b, name)(a, to)
    sat = "llvm.fptosi.sat" if name == "fptosi" else "llvm.fptoui.sat"
    if isinstance(a.type, ir.HalfType):
        # Through f32 (exact for every f16): x86 hosts with AVX512-FP16 lowered the f16 form
        # to vcvttph2w, which gives -32768 for NaN instead of the specified 0.
        a = b.fpext(a, _SCALAR["f32"])
    return kl.intrinsic(f"{sat}.i{op.type.bits}.{_fsuffix(a)}", to, [a])


def _const(kl: KernelLowering, op: Op) -> ir.Value:
    assert op.type is not None
    if op.type.is_float:
        return float_constant(op.type, float(op.imm))  # type: ignore[arg-type]
    return ir.Constant(scalar_type(op.type), int(op.imm) & op.type.max_unsigned)  # type: ignore[arg-type]


def _geometry(kl: KernelLowering, op: Op) -> ir.Value:
    return kl.hooks.geometry(kl, op.opcode, op.dim or "x")


def _offset(kl: KernelLowering, op: Op) -> ir.Value:
    space = op.operands[0].type.space
    assert space is not None and op.result is not None
    if kl.multi(op.result):
        kl.set_tag(op.result, kl.tag(op.operands[0]))
    split = kl.hooks.split_offset(kl, op)
    if split is not None:
        return split
    p, i = kl.args(op)
    idx = i if i.type.width == 64 else kl.b.sext(i, I64)
    if op.opcode == "offset":
        assert op.type is not None
        idx = kl.b.mul(idx, ir.Constant(I64, op.type.size))
    return kl.hooks.offset(kl, p, idx, space)


def _array_addr(kl: KernelLowering, op: Op) -> ir.Value:
    return kl.hooks.array_addr(kl, op)


def _address(kl: KernelLowering, pv: Value, t: Type, atomic: bool = False, op: Op | None = None) -> ir.Value:
    space = pv.type.space
    assert space is not None
    if not kl.checked:
        bounds = None
    elif op is not None and id(op) in kl.proven_ops:
        bounds = PROVEN                  # checked once before the loop (see _range_ok)
    elif op is not None and kl.hooks.group_check(kl, op):
        bounds = PROVEN                  # checked with its group (GPU: gpucheck.py)
    elif check_array_index(kl, pv, t.size):
        bounds = PROVEN                  # checked just now, as an index
    else:
        bounds = kl.bounds_of(pv)
    return kl.hooks.address(kl, kl.get(pv), space, scalar_type(t), t.size, atomic, bounds)


def _load(kl: KernelLowering, op: Op) -> ir.Value:
    return kl.hooks.load(kl, op, lambda: _plain_load(kl, op))


def _plain_load(kl: KernelLowering, op: Op) -> ir.Value:
    assert op.type is not None
    addr = _address(kl, op.operands[0], op.type, op=op)
    inst = kl.b.load(addr, align=op.type.size)
    space = op.operands[0].type.space
    if space is not None and kl.hooks.invariant_load(space):
        inst.set_metadata("invariant.load", kl.module.add_metadata([]))
    if space is not None and kl.hooks.freeze_loads(space):
        return freeze(kl.b, inst)
    return inst


def _store(kl: KernelLowering, op: Op) -> None:
    v = kl.get(op.operands[0])
    addr = _address(kl, op.operands[1], op.operands[0].type, op=op)
    kl.b.store(v, addr, align=op.operands[0].type.size)


def _atomic(kl: KernelLowering, op: Op) -> ir.Value:
    assert op.type is not None
    addr = _address(kl, op.operands[0], op.type, atomic=True, op=op)
    if op.opcode == "atomic_cas":
        cmp = kl.get(op.operands[1])
        new = kl.get(op.operands[2])
        pair = kl.b.cmpxchg(addr, cmp, new, "monotonic", "monotonic")
        return kl.b.extract_value(pair, 0)
    val = kl.get(op.operands[1])
    return kl.b.atomic_rmw(_RMW[op.opcode], addr, val, "monotonic")


def _barrier(kl: KernelLowering, op: Op) -> None:
    kl.hooks.barrier(kl)


def _br(kl: KernelLowering, op: Op) -> None:
    s = op.successors[0]
    inst = kl.b.branch(kl.branch_to(s.block, s.args))
    if kl.fast_loop is not None and s.block is kl.fast_loop.header:
        inst.set_metadata("llvm.loop", loop_id(kl.module, UNROLL_COUNT))


def _cbr(kl: KernelLowering, op: Op) -> None:
    cond = kl.get(op.operands[0])
    t, f = op.successors
    if t.block is f.block:
        # Same target twice: one edge, choose the arguments with selects.
        args = tuple(kl.b.select(cond, kl.get(x), kl.get(y)) for x, y in zip(t.args, f.args))
        target = kl.blocks[id(t.block)]
        for phi, a in zip(kl.phis[id(t.block)], args):
            phi.add_incoming(a, kl.b.block)
        tags = {i: kl.b.select(cond, kl.tag(t.args[i]), kl.tag(f.args[i])) for i in kl.tag_phis.get(id(target), {})}
        kl._tag_incoming(target, tags, kl.b.block)
        kl.b.branch(target)
        return
    src = kl.b.block
    tb = kl.branch_to(t.block, t.args)
    assert kl.b.block is src
    fb = kl.branch_to(f.block, f.args)
    kl.b.cbranch(cond, tb, fb)


def _ret(kl: KernelLowering, op: Op) -> None:
    kl.hooks.ret(kl)


def _trap(kl: KernelLowering, op: Op) -> None:
    kl.hooks.trap(kl)


_HANDLERS = {
    "sdiv": _div_rem, "udiv": _div_rem, "srem": _div_rem, "urem": _div_rem,
    "shl": _shift, "lshr": _shift, "ashr": _shift,
    "neg": _int_unary, "not": _int_unary, "abs": _int_unary,
    "frem": _frem, "fneg": _float_unary, "rsqrt": _float_unary, "fma": _float_intrinsic,
    "icmp": _icmp, "fcmp": _fcmp, "select": _select, "const": _const,
    "thread_id": _geometry, "block_id": _geometry, "block_dim": _geometry, "grid_dim": _geometry,
    "offset": _offset, "byte_offset": _offset, "shared_addr": _array_addr, "local_addr": _array_addr,
    "load": _load, "store": _store, "atomic_cas": _atomic, "barrier": _barrier,
    "br": _br, "cbr": _cbr, "ret": _ret, "trap": _trap,
}


def _family_handler(name: str):  # type: ignore[no-untyped-def]
    if name in _INT_BIN:
        return _int_binary
    if name in _INT_MINMAX:
        return _int_minmax
    if name in _FLOAT_BIN:
        return _float_binary
    if name in _FLOAT_INTRINSIC1 or name in _FLOAT_INTRINSIC2:
        return _float_intrinsic
    if name in vmath.FUNCTIONS:
        return _math
    if name in _RMW:
        return _atomic
    if name in ("trunc", "zext", "sext", "fptrunc", "fpext", "fptosi", "fptoui", "sitofp", "uitofp", "bitcast"):
        return _convert
    raise LoweringError(f"no lowering for op {name!r}")


def new_module(name: str, hooks: TargetHooks) -> ir.Module:
    """An empty LLVM module for ``hooks``' triple and data layout."""
    mod = ir.Module(name=name)
    mod.triple = hooks.triple
    if hooks.datalayout:
        mod.data_layout = hooks.datalayout
    return mod
