"""IR → sandboxed x86-64 code: a whole launch (blocks × threads) in one native call.

Guest kernels run inside the server process on the CPU backend, so the generated code is a
sandbox:

* **Pointers are offsets**, never host addresses: ``ptr<global>``/``ptr<constant>`` are offsets
  into the client's arena (``arena_base``, ``arena_size``), ``ptr<shared>`` offsets into the
  block's shared window, ``ptr<local>`` offsets into the thread's local area.
* **Per-buffer bounds** (checked build, the default): every access is checked against its own
  buffer (:mod:`vxpu.ir.lower.bounds`): a pointer parameter's ``(base, length)`` comes from the
  launch context's ``bounds`` array (one pair per pointer parameter, filled by the host from
  the allocation behind the address and checked by :mod:`vxpu.ir.cpu_exec` to lie inside the
  arena), a shared or local array's from its declared size. A failed check stores the fault
  code, the offset within the buffer and the origin (parameter index, ``0x100 + j`` shared
  array ``j``, ``0x200 + j`` local array ``j``) and stops the launch. The unchecked build
  (``checked=False``, trusted modules only) checks against the whole window (arena, shared
  window, local area) instead, so it still never touches memory outside it.
* **Barriers** use work-item loop fission: the kernel becomes a per-thread *body* function that
  runs from a resume point (0 = kernel entry, k = just after barrier k) to the next barrier
  (returns k), to its end (returns 0) or to a fault (returns ``-code``). Values live across a
  barrier are kept in a per-thread spill frame (stored at their definition, reloaded at each
  use); local arrays of barrier kernels live in per-thread scratch. The driver runs all threads
  of a block up to the next barrier, checks that every thread reached the *same* barrier (else
  the launch faults: a barrier reached non-uniformly is a fault, not a hang) and resumes them.
* **Cancellation.** ``ctx.cancel`` is the host address of an aligned u32 that another host
  thread may set (the CPU backend's watchdog does, when a launch runs past its time limit).
  Generated code reads it (a volatile unordered atomic load, see :class:`_CancelLoad`) at the
  top of every IR loop header (each block that is the target of a retreating edge in reverse
  post-order, so every cycle of the control-flow graph, reducible or not, passes a check; only
  innermost loops with a small constant trip count are exempt, see :func:`loop_headers`) and
  before each thread of the driver's thread loop (which also covers the block and
  barrier-region loops). A set word stops the launch with :data:`FAULT_CANCELLED`. The check
  costs one load of an uncontended, shared cache line and a predicted branch (saxpy and tiled
  sgemm: ~3 % single-threaded).
* The **driver** ``vxpu_launch_<kernel>(ctx*)`` loops over its range of blocks and, per block,
  over the threads (z, y, x); see :data:`CTX_FIELDS` for the context record. It touches nothing
  but the context, the arena and the scratch memory that the caller passes, so several OS
  threads may run disjoint block ranges of one launch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir
from vxpu.ir.args import array_layout
from vxpu.ir.lower import bounds as vb
from vxpu.ir.lower.bounds import (
    ORIGIN_LOCAL,
    ORIGIN_NONE,
    ORIGIN_SHARED,
    PROVEN,
    FaultExit,
    check_access,
    i32,
)
from vxpu.ir.lower.common import (
    I1,
    I8,
    I32,
    I64,
    KernelLowering,
    TargetHooks,
    new_module,
    reverse_postorder,
    scalar_type,
)
from vxpu.ir.model import Block, BlockParam, Kernel, Module, Op, OpResult, SharedArray, Value
from vxpu.ir.types import AddressSpace

#: Fault codes written to ``ctx.fault_code`` (stable, the same on every target: see bounds.py).
FAULT_GLOBAL = vb.FAULT_GLOBAL
FAULT_SHARED = vb.FAULT_SHARED
FAULT_LOCAL = vb.FAULT_LOCAL
FAULT_MISALIGNED = vb.FAULT_MISALIGNED
FAULT_TRAP = vb.FAULT_TRAP
FAULT_BARRIER = vb.FAULT_BARRIER
#: The host set the launch's cancel word (e.g. the CPU backend's time limit expired).
FAULT_CANCELLED = vb.FAULT_CANCELLED

#: The launch context record: one little-endian u64 per field, in this order. ``bounds`` is
#: the host address of ``(base, length)`` u64 pairs, one per pointer parameter (checked build);
#: ``fault_param`` receives the faulting access's origin (``ORIGIN_NONE`` if none).
CTX_FIELDS = ("arena_base", "arena_size", "args", "shared", "shared_size", "spill", "local",
              "block_begin", "block_end", "grid_x", "grid_y", "grid_z", "block_x", "block_y",
              "block_z", "fault_code", "fault_addr", "fault_block", "fault_thread", "cancel",
              "bounds", "fault_param")
_CTX = {name: i for i, name in enumerate(CTX_FIELDS)}
SPILL_SLOT = 8


@dataclass(frozen=True)
class X86KernelLayout:
    """Sizes the caller needs to prepare scratch memory for a launch."""

    name: str
    symbol: str
    has_barriers: bool
    shared_offsets: tuple[int, ...]
    static_shared: int
    local_offsets: tuple[int, ...]
    local_size: int
    spill_frame: int
    uses_global_atomics: bool
    #: Per-buffer bounds checks (False: unchecked build, arena-wide checks only).
    checked: bool = True
    #: Indices of the pointer parameters (one ``bounds`` pair each, in this order).
    pointer_params: tuple[int, ...] = ()


def crossing_values(kernel: Kernel) -> list[Value]:
    """Values (block params and op results) live just after some barrier, in canonical order."""
    blocks = kernel.blocks
    if not any(op.opcode == "barrier" for op in kernel.ops()):
        return []
    uses: dict[int, set[Value]] = {}
    defs: dict[int, set[Value]] = {}
    for blk in blocks:
        u: set[Value] = set()
        d: set[Value] = set(blk.params)
        for op in blk.ops:
            u.update(v for v in op.uses() if v not in d)
            if op.result is not None:
                d.add(op.result)
        uses[id(blk)], defs[id(blk)] = u, d
    live_in: dict[int, set[Value]] = {id(b): set() for b in blocks}
    changed = True
    while changed:
        changed = False
        for blk in reversed(blocks):
            out: set[Value] = set()
            for s in blk.successor_blocks():
                out |= live_in[id(s)]
            new = uses[id(blk)] | (out - defs[id(blk)])
            if new != live_in[id(blk)]:
                live_in[id(blk)] = new
                changed = True
    crossing: set[Value] = set()
    for blk in blocks:
        live: set[Value] = set()
        for s in blk.successor_blocks():
            live |= live_in[id(s)]
        for op in reversed(blk.ops):
            if op.opcode == "barrier":
                crossing |= live
            if op.result is not None:
                live.discard(op.result)
            live.update(op.uses())
    order = kernel.numbering()
    return sorted((v for v in crossing if isinstance(v, (BlockParam, OpResult))), key=lambda v: order[v])


class X86Hooks(TargetHooks):
    """Sandboxed x86 lowering of one kernel's body."""

    def __init__(self, kernel: Kernel, layout: X86KernelLayout) -> None:
        import llvmlite.binding as llvm

        self.triple = llvm.get_process_triple()
        self.kernel = kernel
        self.layout = layout
        self.checked = layout.checked
        self.arrays = {id(a): off for a, off in zip(kernel.shared, layout.shared_offsets)}
        self.arrays.update({id(a): off for a, off in zip(kernel.local, layout.local_offsets)})
        self.exit: FaultExit | None = None
        #: parameter index -> (base, length) body arguments (checked build).
        self.param_bounds: dict[int, tuple[ir.Value, ir.Value]] = {}
        self.switch: ir.SwitchInstr | None = None
        self.n_barriers = 0
        self.args: dict[str, ir.Value] = {}
        self.version_loops = not layout.has_barriers
        self.cancel_exit: ir.Block | None = None

    def ptr_type(self, space: AddressSpace) -> ir.Type:
        return I64

    def geometry(self, kl: KernelLowering, opcode: str, dim: str) -> ir.Value:
        prefix = {"thread_id": "t", "block_id": "b", "block_dim": "nt", "grid_dim": "nb"}[opcode]
        return self.args[prefix + dim]

    def offset(self, kl: KernelLowering, p: ir.Value, nbytes: ir.Value, space: AddressSpace) -> ir.Value:
        return kl.b.add(p, nbytes)

    def array_addr(self, kl: KernelLowering, op: Op) -> ir.Value:
        return ir.Constant(I64, self.arrays[id(op.array)])

    def _stop(self, b: ir.IRBuilder, code: ir.Value, origin: ir.Value, offset: ir.Value) -> None:
        """Report (code, origin, offset) to the driver and end the thread's body."""
        b.store(offset, self.args["fault_addr"])
        b.store(b.zext(origin, I64), b.gep(self.args["fault_addr"], [ir.Constant(I32, 1)]))
        b.ret(ir.Constant(I32, -code.constant) if isinstance(code, ir.Constant) else b.neg(code))

    def fault_exit(self, kl: KernelLowering) -> FaultExit:
        if self.exit is None:
            self.exit = FaultExit(kl.fn, self._stop)
        return self.exit

    def cancel_check(self, b: ir.IRBuilder, fn: ir.Function, cont: ir.Block) -> None:
        """Terminate ``b``'s block: to the cancel exit if the cancel word is set, else ``cont``."""
        if self.cancel_exit is None:
            self.cancel_exit = fn.append_basic_block("cancelled")
            self._stop(ir.IRBuilder(self.cancel_exit), i32(FAULT_CANCELLED), i32(ORIGIN_NONE),
                       ir.Constant(I64, 0))
        emit_cancel_branch(b, self.args["cancel"], self.cancel_exit, cont)

    def origin_bounds(self, kl: KernelLowering, origin: int) -> tuple[ir.Value, ir.Value]:
        if origin < ORIGIN_SHARED:
            return self.param_bounds[origin]
        arr = self.kernel.shared[origin - ORIGIN_SHARED] if origin < ORIGIN_LOCAL else \
            self.kernel.local[origin - ORIGIN_LOCAL]
        return ir.Constant(I64, self.arrays[id(arr)]), ir.Constant(I64, arr.size)

    def address(self, kl: KernelLowering, p: ir.Value, space: AddressSpace, t: ir.Type, size: int,
                atomic: bool, bounds: tuple[ir.Value, ir.Value, ir.Value] | None) -> ir.Value:
        b = kl.b
        if space in (AddressSpace.GLOBAL, AddressSpace.CONSTANT):
            frame, limit = self.args["arena"], self.args["arena_size"]
        elif space is AddressSpace.SHARED:
            frame, limit = self.args["shared"], self.args["shared_size"]
        else:
            frame, limit = self.args["local"], ir.Constant(I64, self.layout.local_size)
        if bounds is None:          # unchecked build: the whole window
            bounds = (ir.Constant(I64, 0), limit, i32(ORIGIN_NONE))
        if bounds is not PROVEN:    # (PROVEN: inside its buffer, hence the arena: checked before the loop)
            kl.b = check_access(b, kl.fn, self.fault_exit(kl), p, bounds, size, space)
        return kl.b.bitcast(kl.b.gep(frame, [p]), t.as_pointer())

    def barrier(self, kl: KernelLowering) -> None:
        assert self.switch is not None
        self.n_barriers += 1
        kl.b.ret(ir.Constant(I32, self.n_barriers))
        resume = kl.fn.append_basic_block(f"resume.{self.n_barriers}")
        self.switch.add_case(ir.Constant(I32, self.n_barriers), resume)
        kl.b = ir.IRBuilder(resume)

    def trap(self, kl: KernelLowering) -> None:
        self._stop(kl.b, i32(FAULT_TRAP), i32(ORIGIN_NONE), ir.Constant(I64, 0))

    def ret(self, kl: KernelLowering) -> None:
        kl.b.ret(ir.Constant(I32, 0))


_BODY_ARGS = ("arena", "arena_size", "shared", "shared_size", "local", "spill", "fault_addr", "cancel",
              "tx", "ty", "tz", "bx", "by", "bz", "ntx", "nty", "ntz", "nbx", "nby", "nbz", "resume")
_BODY_TYPES = (I8.as_pointer(), I64, I8.as_pointer(), I64, I8.as_pointer(), I8.as_pointer(),
               I64.as_pointer(), I32.as_pointer()) + (I32,) * 13


def _tagged_crossing(kernel: Kernel, crossing: list[Value], checked: bool) -> list[Value]:
    """The crossing pointers that carry a tag (several possible buffers): one more slot each."""
    if not checked or not crossing:
        return []
    origins = vb.pointer_origins(kernel)
    return [v for v in crossing if len(origins.get(v, ())) > 1]


def kernel_layout(kernel: Kernel, checked: bool = True) -> X86KernelLayout:
    """The scratch-memory layout of ``kernel`` on x86."""
    sh_off, sh_size = array_layout(kernel.shared)
    lo_off, lo_size = array_layout(kernel.local)
    has_barriers = any(op.opcode == "barrier" for op in kernel.ops())
    atom = any(op.opcode.startswith("atomic_") and op.operands[0].type.space is AddressSpace.GLOBAL
               for op in kernel.ops())
    crossing = crossing_values(kernel)
    frame = (len(crossing) + len(_tagged_crossing(kernel, crossing, checked))) * SPILL_SLOT
    return X86KernelLayout(kernel.name, f"vxpu_launch_{kernel.name}", has_barriers, sh_off, sh_size,
                           lo_off, lo_size, frame, atom, checked, vb.pointer_params(kernel))


def _lower_body(mod: ir.Module, kernel: Kernel, layout: X86KernelLayout) -> ir.Function:
    ptypes = [I64 if p.type.is_ptr else scalar_type(p.type) for p in kernel.params]
    if layout.checked:
        ptypes += [I64, I64] * len(layout.pointer_params)      # (base, length) per pointer
    fnty = ir.FunctionType(I32, list(_BODY_TYPES) + ptypes)
    fn = ir.Function(mod, fnty, name=f"vxpu.body.{kernel.name}")
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    for i in (0, 2, 4, 5, 6):
        fn.args[i].add_attribute("noalias")
    hooks = X86Hooks(kernel, layout)
    hooks.args = dict(zip(_BODY_ARGS, fn.args))
    extra = fn.args[len(_BODY_ARGS) + len(kernel.params):]
    if layout.checked:
        hooks.param_bounds = {i: (extra[2 * k], extra[2 * k + 1]) for k, i in enumerate(layout.pointer_params)}
    entry = fn.append_basic_block("entry")
    start = fn.append_basic_block("start")
    b = ir.IRBuilder(entry)
    slots: dict[Value, ir.Value] = {}
    tag_slots: dict[Value, ir.Value] = {}
    crossing = crossing_values(kernel)
    for i, v in enumerate(crossing):
        raw = b.gep(hooks.args["spill"], [ir.Constant(I64, i * SPILL_SLOT)])
        lt = I8 if v.type.name == "i1" else I64 if v.type.is_ptr else scalar_type(v.type)
        slots[v] = b.bitcast(raw, lt.as_pointer())
    for i, v in enumerate(_tagged_crossing(kernel, crossing, layout.checked), start=len(crossing)):
        tag_slots[v] = b.bitcast(b.gep(hooks.args["spill"], [ir.Constant(I64, i * SPILL_SLOT)]), I32.as_pointer())
    hooks.switch = b.switch(hooks.args["resume"], start)
    sb = ir.IRBuilder(start)
    if layout.local_size:
        # Local arrays start zeroed in every thread (never undef).
        sb.call(_memset(mod), [hooks.args["local"], ir.Constant(I8, 0),
                               ir.Constant(I64, layout.local_size), ir.Constant(I1, 0)])
    kl = _X86KernelLowering(kernel, hooks, fn, start, dict(zip(kernel.params, fn.args[len(_BODY_ARGS):])))
    kl.spill = slots
    kl.tag_spill = tag_slots
    kl.lower()
    return fn


#: A constant-trip innermost loop skips the check when trips × its ops stay within this.
BOUNDED_LOOP_WORK = 1 << 16


def loop_headers(kernel: Kernel) -> list[Block]:
    """The blocks that get a cancellation check: targets of retreating edges in reverse
    post-order (an edge to a block not later in the order). Every cycle of the control-flow
    graph contains such an edge, reducible or not, so every loop passes a check, except an
    innermost loop with a small constant trip count (:func:`constant_loop_work`), which cannot
    spin: there the check would only cost time (tiled sgemm's 16-step tile loop: ~10 %)."""
    order = reverse_postorder(kernel)
    index = {id(blk): i for i, blk in enumerate(order)}
    targets: dict[int, Block] = {}
    preds: dict[int, list[Block]] = {id(b): [] for b in order}
    for blk in order:
        for succ in dict.fromkeys(blk.successor_blocks()):
            preds[id(succ)].append(blk)
            if index[id(succ)] <= index[id(blk)]:
                targets[id(succ)] = succ
    others = set(targets)
    exempt = {i: h for i, h in targets.items() if constant_loop_work(h, others - {i}, preds) is not None}
    changed = True
    while changed:      # a cycle through an exempt loop's exit edge must pass a checked header
        changed = False
        checked = others - exempt.keys()
        for i, h in list(exempt.items()):
            if _reaches_unchecked(h.terminator.successors[1].block, h, checked):   # type: ignore[union-attr]
                del exempt[i]
                changed = True
                break           # one at a time: the next test sees this header as checked
    return [h for i, h in targets.items() if i not in exempt]


def _reaches_unchecked(start: Block, h: Block, checked: set[int]) -> bool:
    """Whether a path from ``start`` reaches ``h`` without entering a header in ``checked``."""
    seen = {id(start)}
    stack = [start]
    while stack:
        b = stack.pop()
        if b is h:
            return True
        if id(b) in checked:
            continue
        for s in b.successor_blocks():
            if id(s) not in seen:
                seen.add(id(s))
                stack.append(s)
    return False


def _reachable(start: Block, stop: Block | None = None) -> dict[int, Block]:
    """Blocks reachable from ``start`` (included) without passing through ``stop``."""
    seen = {id(start): start}
    stack = [start]
    while stack:
        for s in stack.pop().successor_blocks():
            if id(s) not in seen and s is not stop:
                seen[id(s)] = s
                stack.append(s)
    return seen


def _int_const(v: Value | None, signed: bool) -> int | None:
    if not isinstance(v, OpResult) or v.op.opcode != "const" or not v.type.is_int:
        return None
    x = int(v.op.imm) & v.type.max_unsigned   # type: ignore[arg-type]
    return x - (1 << v.type.bits) if signed and x > v.type.max_unsigned >> 1 else x


def constant_loop_work(h: Block, other_headers: set[int], preds: dict[int, list[Block]]) -> int | None:
    """A bound on the ops the loop at header ``h`` executes per entry (trips × its ops), if its
    trip count is provably a small constant: ``h(i): cbr (icmp slt|ult i, N), body, out`` where every edge into ``h`` from
    outside the loop passes a constant start, every edge from inside passes ``add i, C``
    (C > 0), N and C are constants with ``N - 1 + C`` representable (no wrap), no other loop
    header lies on a cycle through ``h`` and ``body`` (innermost), and trips × the loop's ops
    ≤ :data:`BOUNDED_LOOP_WORK`. None otherwise. (The caller also requires every path from
    ``out`` back to ``h`` to pass a checked header.)"""
    term = h.terminator
    if term is None or term.opcode != "cbr":
        return None
    cond = term.operands[0]
    if not isinstance(cond, OpResult) or cond.op.opcode != "icmp" or cond.op.pred not in ("slt", "ult"):
        return None
    iv, bound = cond.op.operands
    t, f = term.successors
    if not isinstance(iv, BlockParam) or iv.block is not h or t.block is f.block:
        return None
    signed = cond.op.pred == "slt"
    n = _int_const(bound, signed)
    body = _reachable(t.block, stop=h)
    if n is None or id(h) in body:
        return None
    back = {id(p): p for p in preds[id(h)] if p is not h}       # blocks that reach h, not through h
    stack = list(back.values())
    while stack:
        for p in preds[id(stack.pop())]:
            if id(p) not in back and p is not h:
                back[id(p)] = p
                stack.append(p)
    loop = [b for i, b in body.items() if i in back]
    if any(id(b) in other_headers for b in loop):
        return None
    starts, steps = _header_edges(h, iv, signed, preds[id(h)], {id(b) for b in loop} | {id(h)})
    if not starts or not steps or None in starts or None in steps or len(set(steps)) != 1:
        return None
    step = steps[0]
    top = (iv.type.max_unsigned >> 1) if signed else iv.type.max_unsigned
    if step <= 0 or n - 1 + step > top:                             # type: ignore[operator]
        return None
    trips = max(0, -(-(n - min(starts)) // step))                    # type: ignore[type-var,operator]
    work = (trips + 1) * (len(h.ops) + sum(len(b.ops) for b in loop))
    return work if work <= BOUNDED_LOOP_WORK else None


def _header_edges(h: Block, iv: BlockParam, signed: bool, preds: list[Block], loop: set[int]
                  ) -> tuple[list[int | None], list[int | None]]:
    """(constant starts on edges from outside ``loop``, constant steps on edges from inside)."""
    starts: list[int | None] = []
    steps: list[int | None] = []
    for p in preds:
        for s in p.terminator.successors:                         # type: ignore[union-attr]
            if s.block is not h:
                continue
            arg = s.args[iv.index]
            if id(p) not in loop:
                starts.append(_int_const(arg, signed))
            elif isinstance(arg, OpResult) and arg.op.opcode == "add" and iv in arg.op.operands:
                a, c = arg.op.operands
                steps.append(_int_const(c if a is iv else a, signed))
            else:
                steps.append(None)
    return starts, steps

class _CancelLoad(ir.instructions.Instruction):
    """``load atomic volatile i32, i32* %p unordered``: re-read on every execution (volatile:
    never hoisted, merged or deleted), race-free (atomic), yet not a memory clobber for the
    kernel's other accesses. A ``monotonic`` load would be one (alias analysis treats ordered
    atomics as reading and writing all memory), which kept spill-slot and shared-memory loads
    from being hoisted out of loops and cost tiled sgemm ~40 %. llvmlite has no volatile loads."""

    def __init__(self, parent: ir.Block, ptr: ir.Value) -> None:
        super().__init__(parent, I32, "load", [ptr])

    def descr(self, buf: list[str]) -> None:
        [p] = self.operands
        buf.append(f"load atomic volatile i32, {p.type} {p.get_reference()} unordered, align 4"
                   f"{self._stringify_metadata(leading_comma=True)}\n")


def emit_cancel_branch(b: ir.IRBuilder, cancel: ir.Value, stop: ir.Block, cont: ir.Block) -> None:
    """Terminate ``b``'s block with ``cancel word != 0 ? stop : cont`` (a volatile atomic
    load, see :class:`_CancelLoad`; the stop edge marked unlikely)."""
    word = _CancelLoad(b.block, cancel)
    b._insert(word)
    br = b.cbranch(b.icmp_unsigned("!=", word, ir.Constant(I32, 0)), stop, cont)
    mod = b.module
    br.set_metadata("prof", mod.add_metadata([ir.MetaDataString(mod, "branch_weights"),
                                              ir.Constant(I32, 1), ir.Constant(I32, 1 << 20)]))


class _X86KernelLowering(KernelLowering):
    """:class:`KernelLowering` that opens every loop header with a cancellation check."""

    def __init__(self, kernel: Kernel, hooks: X86Hooks, fn: ir.Function, entry: ir.Block,
                 params: dict[Value, ir.Value]) -> None:
        super().__init__(kernel, hooks, fn, entry, params)
        self.x86 = hooks
        self.headers = {id(blk) for blk in loop_headers(kernel)}

    def _lower_block(self, blk: Block) -> None:
        if id(blk) not in self.headers:
            super()._lower_block(blk)
            return
        self.current_block = blk
        head = self.blocks[id(blk)]            # holds the parameter phis; edges arrive here
        cont = self.fn.append_basic_block(f"{head.name}.go")
        self.x86.cancel_check(ir.IRBuilder(head), self.fn, cont)
        self.b = ir.IRBuilder(cont)
        self.define_params(blk)
        for op in blk.ops:
            self.current_op = op
            self.lower_op(op)


def _memset(mod: ir.Module) -> ir.Function:
    name = "llvm.memset.p0i8.i64"
    fn = mod.globals.get(name)
    if fn is None:
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I8, I64, I1]), name=name)
    return fn


class _Loop:
    """``for (i = start; i < end; i++)`` in generated code; ``i`` is the induction variable."""

    def __init__(self, b: ir.IRBuilder, fn: ir.Function, start: ir.Value, end: ir.Value, name: str) -> None:
        self.b = b
        pre = b.block
        self.head = fn.append_basic_block(f"{name}.head")
        self.body = fn.append_basic_block(f"{name}.body")
        self.exit = fn.append_basic_block(f"{name}.exit")
        b.branch(self.head)
        b.position_at_end(self.head)
        self.i = b.phi(start.type, name=name)
        self.i.add_incoming(start, pre)
        b.cbranch(b.icmp_unsigned("<", self.i, end), self.body, self.exit)
        b.position_at_end(self.body)

    def close(self) -> None:
        b = self.b
        nxt = b.add(self.i, ir.Constant(self.i.type, 1))
        self.i.add_incoming(nxt, b.block)
        b.branch(self.head)
        b.position_at_end(self.exit)


def _lower_driver(mod: ir.Module, kernel: Kernel, layout: X86KernelLayout, body: ir.Function) -> None:
    """Emit ``vxpu_launch_<kernel>(ctx*)``: the block loop around the thread loops."""
    fn = ir.Function(mod, ir.FunctionType(I32, [I64.as_pointer()]), name=layout.symbol)
    fn.args[0].add_attribute("noalias")
    drv = _Driver(fn, kernel, layout, body)
    b = drv.b
    lb = _Loop(b, fn, drv.ctx_load("block_begin"), drv.ctx_load("block_end"), "blk")
    drv.block_index = lb.i
    gx, gy = b.zext(drv.grid[0], I64), b.zext(drv.grid[1], I64)
    rest = b.udiv(lb.i, gx)
    drv.bid = (b.trunc(b.urem(lb.i, gx), I32), b.trunc(b.urem(rest, gy), I32), b.trunc(b.udiv(rest, gy), I32))
    if layout.static_shared:
        # Shared memory starts zeroed in every block (deterministic, never stale).
        b.call(_memset(mod), [drv.shared, ir.Constant(I8, 0), drv.shared_size, ir.Constant(I1, 0)])
    if layout.has_barriers:
        drv.emit_regions()
    else:
        drv.emit_threads(ir.Constant(I32, 0), check_agreement=False)
    lb.close()
    b.ret(ir.Constant(I32, 0))


def _load_params(b: ir.IRBuilder, kernel: Kernel, args_ptr: ir.Value) -> list[ir.Value]:
    out, pos = [], 0
    for p in kernel.params:
        size = p.type.size
        pos = (pos + size - 1) // size * size
        lt = I64 if p.type.is_ptr else scalar_type(p.type)
        ptr = b.bitcast(b.gep(args_ptr, [ir.Constant(I64, pos)]), lt.as_pointer())
        out.append(b.load(ptr, align=1))
        pos += size
    return out


class _Driver:
    """State of one launch driver while it is emitted: context values, the fault exit, and
    the per-block thread loops (with or without barrier regions)."""

    def __init__(self, fn: ir.Function, kernel: Kernel, layout: X86KernelLayout, body: ir.Function) -> None:
        self.fn, self.layout, self.body = fn, layout, body
        self.ctx = fn.args[0]
        self.b = b = ir.IRBuilder(fn.append_basic_block("entry"))
        i8p = I8.as_pointer()
        self.arena = b.inttoptr(self.ctx_load("arena_base"), i8p)
        self.arena_size = self.ctx_load("arena_size")
        self.shared = b.inttoptr(self.ctx_load("shared"), i8p)
        self.shared_size = self.ctx_load("shared_size")
        self.spill = b.inttoptr(self.ctx_load("spill"), i8p)
        self.local = b.inttoptr(self.ctx_load("local"), i8p)
        self.cancel = b.inttoptr(self.ctx_load("cancel"), I32.as_pointer())
        self.grid = [b.trunc(self.ctx_load(f"grid_{d}"), I32) for d in "xyz"]
        self.blk = [b.trunc(self.ctx_load(f"block_{d}"), I32) for d in "xyz"]
        # [offset, origin] of a fault, set by the body (a barrier fault reports these defaults).
        self.fault_addr = b.alloca(I64, size=2)
        b.store(ir.Constant(I64, 0), self.fault_addr)
        b.store(ir.Constant(I64, ORIGIN_NONE), b.gep(self.fault_addr, [ir.Constant(I32, 1)]))
        self.agreed = b.alloca(I32)
        self.params = _load_params(b, kernel, b.inttoptr(self.ctx_load("args"), i8p))
        if layout.checked and layout.pointer_params:
            table = b.inttoptr(self.ctx_load("bounds"), I64.as_pointer())
            self.params += [b.load(b.gep(table, [ir.Constant(I64, k)]), align=8)
                            for k in range(2 * len(layout.pointer_params))]
        self.block_index: ir.Value = ir.Constant(I64, 0)
        self.bid: tuple[ir.Value, ...] = ()
        self.fault_exit = fn.append_basic_block("fault")
        fb = ir.IRBuilder(self.fault_exit)
        self.f_code, self.f_block, self.f_thread = fb.phi(I32), fb.phi(I64), fb.phi(I64)
        fb.store(fb.sext(fb.neg(self.f_code), I64), self._field(fb, "fault_code"))
        fb.store(fb.load(self.fault_addr), self._field(fb, "fault_addr"))
        fb.store(fb.load(fb.gep(self.fault_addr, [ir.Constant(I32, 1)])), self._field(fb, "fault_param"))
        fb.store(self.f_block, self._field(fb, "fault_block"))
        fb.store(self.f_thread, self._field(fb, "fault_thread"))
        fb.ret(ir.Constant(I32, -1))

    def _field(self, b: ir.IRBuilder, name: str) -> ir.Value:
        return b.gep(self.ctx, [ir.Constant(I32, _CTX[name])])

    def ctx_load(self, name: str) -> ir.Value:
        return self.b.load(self._field(self.b, name), align=8)

    def _fault(self, code: ir.Value, thread: ir.Value) -> None:
        b = self.b
        self.f_code.add_incoming(code, b.block)
        self.f_block.add_incoming(self.block_index, b.block)
        self.f_thread.add_incoming(thread, b.block)
        b.branch(self.fault_exit)

    def cancel_check(self, thread: ir.Value) -> None:
        """Stop the launch with FAULT_CANCELLED (blamed on ``thread``) if the cancel word is set."""
        b, fn = self.b, self.fn
        stop, go = fn.append_basic_block("cancelled"), fn.append_basic_block("go")
        emit_cancel_branch(b, self.cancel, stop, go)
        b.position_at_end(stop)
        self._fault(ir.Constant(I32, -FAULT_CANCELLED), thread)
        b.position_at_end(go)

    def _thread_memory(self, lin: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(spill frame, local area) of thread ``lin`` (shared by all threads without barriers)."""
        b, lay = self.b, self.layout
        spill, local = self.spill, self.local
        if lay.has_barriers:
            if lay.spill_frame:
                spill = b.gep(spill, [b.mul(lin, ir.Constant(I64, lay.spill_frame))])
            if lay.local_size:
                local = b.gep(local, [b.mul(lin, ir.Constant(I64, lay.local_size))])
        return spill, local

    def emit_threads(self, resume: ir.Value, *, check_agreement: bool) -> ir.Value | None:
        """The z/y/x thread loops running ``body`` from ``resume``. With ``check_agreement``,
        faults unless every thread returned the same code, and returns that code."""
        b, fn = self.b, self.fn
        if check_agreement:
            b.store(ir.Constant(I32, -1), self.agreed)
        lz = _Loop(b, fn, ir.Constant(I32, 0), self.blk[2], "tz")
        ly = _Loop(b, fn, ir.Constant(I32, 0), self.blk[1], "ty")
        lx = _Loop(b, fn, ir.Constant(I32, 0), self.blk[0], "tx")
        nx, ny = b.zext(self.blk[0], I64), b.zext(self.blk[1], I64)
        lin = b.add(b.mul(b.add(b.mul(b.zext(lz.i, I64), ny), b.zext(ly.i, I64)), nx), b.zext(lx.i, I64))
        self.cancel_check(lin)
        spill, local = self._thread_memory(lin)
        args = [self.arena, self.arena_size, self.shared, self.shared_size, local, spill, self.fault_addr,
                self.cancel, lx.i, ly.i, lz.i, *self.bid, *self.blk, *self.grid, resume, *self.params]
        r = b.call(self.body, args)
        bad, good = fn.append_basic_block("thread.fault"), fn.append_basic_block("thread.ok")
        b.cbranch(b.icmp_signed("<", r, ir.Constant(I32, 0)), bad, good)
        b.position_at_end(bad)
        self._fault(r, lin)
        b.position_at_end(good)
        if check_agreement:
            prev = b.load(self.agreed)
            agree = b.or_(b.icmp_signed("<", prev, ir.Constant(I32, 0)), b.icmp_unsigned("==", prev, r))
            mismatch, fine = fn.append_basic_block("barrier.mismatch"), fn.append_basic_block("barrier.ok")
            b.cbranch(agree, fine, mismatch)
            b.position_at_end(mismatch)
            self._fault(ir.Constant(I32, -FAULT_BARRIER), lin)
            b.position_at_end(fine)
            b.store(r, self.agreed)
        lx.close()
        ly.close()
        lz.close()
        return b.load(self.agreed) if check_agreement else None

    def emit_regions(self) -> None:
        """Run regions between barriers until every thread has returned."""
        b, fn = self.b, self.fn
        pre = b.block
        head, done = fn.append_basic_block("region"), fn.append_basic_block("block.done")
        b.branch(head)
        b.position_at_end(head)
        resume = b.phi(I32)
        resume.add_incoming(ir.Constant(I32, 0), pre)
        agreed = self.emit_threads(resume, check_agreement=True)
        assert agreed is not None
        resume.add_incoming(agreed, b.block)
        b.cbranch(b.icmp_signed(">", agreed, ir.Constant(I32, 0)), head, done)
        b.position_at_end(done)


def lower_module(module: Module, checked: bool = True) -> tuple[ir.Module, list[X86KernelLayout]]:
    """The host LLVM module for ``module`` and each kernel's scratch layout (``checked``:
    per-buffer bounds; False only for trusted modules)."""
    import llvmlite.binding as llvm

    hooks = TargetHooks()
    hooks.triple = llvm.get_process_triple()
    mod = new_module(module.name, hooks)
    layouts = []
    for kernel in module.kernels:
        layout = kernel_layout(kernel, checked)
        body = _lower_body(mod, kernel, layout)
        _lower_driver(mod, kernel, layout, body)
        layouts.append(layout)
    return mod, layouts


__all__ = [
    "CTX_FIELDS",
    "FAULT_BARRIER",
    "FAULT_CANCELLED",
    "FAULT_GLOBAL",
    "FAULT_LOCAL",
    "FAULT_MISALIGNED",
    "FAULT_SHARED",
    "FAULT_TRAP",
    "SharedArray",
    "X86KernelLayout",
    "crossing_values",
    "emit_cancel_branch",
    "kernel_layout",
    "loop_headers",
    "lower_module",
]


def layout_to_json(layout: X86KernelLayout) -> dict:  # type: ignore[type-arg]
    """A JSON-able form of a layout (for the compile cache)."""
    return {"name": layout.name, "symbol": layout.symbol, "has_barriers": layout.has_barriers,
            "shared_offsets": list(layout.shared_offsets), "static_shared": layout.static_shared,
            "local_offsets": list(layout.local_offsets), "local_size": layout.local_size,
            "spill_frame": layout.spill_frame, "uses_global_atomics": layout.uses_global_atomics,
            "checked": layout.checked, "pointer_params": list(layout.pointer_params)}


def layout_from_json(d: dict) -> X86KernelLayout:  # type: ignore[type-arg]
    """Inverse of :func:`layout_to_json`."""
    return X86KernelLayout(str(d["name"]), str(d["symbol"]), bool(d["has_barriers"]),
                           tuple(int(x) for x in d["shared_offsets"]), int(d["static_shared"]),
                           tuple(int(x) for x in d["local_offsets"]), int(d["local_size"]),
                           int(d["spill_frame"]), bool(d["uses_global_atomics"]), bool(d["checked"]),
                           tuple(int(x) for x in d["pointer_params"]))
