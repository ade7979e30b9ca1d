"""What NVPTX and AMDGPU lowering share: one LLVM kernel function per IR kernel.

A GPU kernel is a plain SIMT function: its parameters are the IR parameters, shared arrays
are ``addrspace(3)`` globals of the module, local arrays are zero-initialised ``alloca`` s in
the entry block, pointers are byte pointers and offsets are (non-``inbounds``, wrapping)
``getelementptr i8``. The subclasses supply the intrinsics.

**Checked build** (the default; :mod:`vxpu.ir.lower.bounds`). After the IR parameters the
kernel takes hidden ones, filled by the host at launch: ``(base: i64, length: i64)`` per
pointer parameter, ``(lo: i32, hi: i32)`` per pointer parameter and element size 1, 2, 4, 8
(the pointer's element window, :func:`vxpu.accel.gpu_checked.element_window`), with any
pointer parameter ``(lo: i32, hi: i32)`` per size for the intersection of them all (all the
windows only while the parameters fit :data:`~.gpucheck.WINDOW_PARAM_BYTES`), then
``fault: i8 addrspace(1)*`` (the context's fault record) and ``kernel_id: i32``. Every load,
store and atomic is checked against its own buffer (shared and local arrays against their
declared size) and alignment; a violation — or ``trap`` — never
performs the access: the thread claims the record with a ``cmpxchg`` of its first word
(0 → 1, so the first violation wins), writes :data:`FAULT_RECORD` fields and returns. The
launch then completes normally (no sticky driver fault); the host reads the record. The
unchecked build (``checked=False``, host-side only) has no hidden parameters and no checks:
a bad address faults the context, and ``trap`` is ``llvm.trap``.

A checked kernel may be emitted twice (:meth:`GpuHooks._copies`): a fast copy that runs the
accesses proven for small blocks (:mod:`vxpu.ir.lower.tidrange`) and for the block's index
ranges (:mod:`vxpu.ir.lower.rangecopy`) unchecked, and the general copy; the entry picks one
with a branch that is the same for every thread of a block.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import ClassVar

from llvmlite import ir
from vxpu.ir.args import kernel_signature
from vxpu.ir.lower import rangecopy, tidrange, unroll
from vxpu.ir.lower.bounds import (
    FAULT_TRAP,
    ORIGIN_LOCAL,
    ORIGIN_NONE,
    ORIGIN_SHARED,
    PROVEN,
    FaultTarget,
    check_access,
    i32,
)
from vxpu.ir.lower.common import (
    I8,
    I32,
    I64,
    VOID,
    KernelLowering,
    TargetHooks,
    declare,
    new_module,
    reverse_postorder,
    scalar_type,
)
from vxpu.ir.lower.gpucheck import WINDOW_SIZES, CheckGroups, windows_fit
from vxpu.ir.lower.toolchain import NVPTX_TRIPLE
from vxpu.ir.model import Kernel, LocalArray, Module, Op, OpResult, SharedArray, Value
from vxpu.ir.types import AddressSpace

_SAFE = re.compile(r"[^A-Za-z0-9_]")

#: The fault record (little-endian, in device memory): byte offset of each field. ``claimed``
#: is 0 until the first violation sets it to 1; the other fields are written once, after it.
FAULT_RECORD = {"claimed": 0, "code": 4, "origin": 8, "kernel_id": 12, "offset": 16,
                "block_x": 24, "block_y": 28, "block_z": 32,
                "thread_x": 36, "thread_y": 40, "thread_z": 44}
FAULT_RECORD_SIZE = 64


def array_align(elem_size: int) -> int:
    """Alignment of shared/local arrays: at least 16 bytes (room for vector accesses)."""
    return max(16, elem_size)


class GpuHooks(TargetHooks):
    """Common GPU behaviour; subclasses set the address spaces and intrinsics."""

    #: LLVM address space per IR address space.
    spaces: ClassVar[dict[AddressSpace, int]] = {}
    native_f16_fma = True
    #: NVPTX: write the fault record inline in each check's cold block (else, and on AMDGPU:
    #: call one ``noinline`` writer per module; the call cost sgemm 14 registers).
    inline_record = True
    #: Check runs of accesses with one branch (:mod:`vxpu.ir.lower.gpucheck`).
    group_checks = True
    #: gpucheck's parameter-offset form for a (parameter, size) with at least this many accesses,
    #: and which of its two exact forms ("dq": element index against d, q; "dl": byte offset).
    param_form_uses = 2
    param_form = "dq"
    #: gpucheck's window form for ``offset P, i`` (``i`` at most 32 bits): ``lo <= i <= hi``
    #: against the host-filled element window of (P, size) (before the two forms above), and
    #: the range copy's test of such accesses against the window (:mod:`.rangecopy`).
    limits32 = True
    #: Emit a second copy of kernels for blocks small enough to prove array accesses in
    #: bounds (:mod:`vxpu.ir.lower.tidrange`).
    block_version = True
    #: Prefer copies that leave no check before a barrier (:meth:`_copies`).
    exit_free = True
    #: Emit a second copy of kernels whose global accesses the entry can prove in bounds for
    #: the whole block (:mod:`vxpu.ir.lower.rangecopy`).
    range_copy = True
    #: Emit ``offset p, a ± b`` as two offsets where ``a ± b`` cannot wrap (:meth:`split_offset`):
    #: "shared" (shared-space pointers), "all" (every space) or "" (none).
    split_offsets = "shared"
    #: Unroll barrier loops with a doubling/halving counter by 2 (:mod:`vxpu.ir.lower.unroll`).
    unroll_shift_loops = True
    #: Emit an unchecked load whose one use is ``select c, v, x`` under ``c`` (:meth:`load`):
    #: "shared" (loads from shared memory), "all" or "" (none).
    guarded_loads = "shared"

    def __init__(self, checked: bool = True) -> None:
        self.arrays: dict[int, ir.Value] = {}
        self.checked = checked
        self.kernel: Kernel | None = None
        self.exit: FaultTarget | None = None
        #: parameter index -> (base, length) hidden parameters.
        self.param_bounds: dict[int, tuple[ir.Value, ir.Value]] = {}
        #: (parameter index, element size) -> its element window (lo, hi), i32 hidden parameters.
        self.param_windows: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        #: element size -> the intersection of every pointer parameter's window (lo, hi).
        self.common_windows: dict[int, tuple[ir.Value, ir.Value]] = {}
        self.groups: CheckGroups | None = None
        #: id() of the array accesses proven in bounds in the copy being emitted (tidrange.py).
        self.assume_proven: set[int] = set()
        self.record: ir.Value | None = None
        self.kernel_id: ir.Value | None = None
        #: id() of the kernel's add/sub ops that cannot wrap (:meth:`split_offset`; made on first use).
        self.no_wrap: set[int] | None = None
        #: value -> the ops that read it (:meth:`_guard`; made on first use).
        self.uses: dict[Value, list[Op]] | None = None

    def ptr_type(self, space: AddressSpace) -> ir.Type:
        return I8.as_pointer(self.spaces[space])

    def offset(self, kl: KernelLowering, p: ir.Value, nbytes: ir.Value, space: AddressSpace) -> ir.Value:
        return kl.b.gep(p, [nbytes])

    def split_offset(self, kl: KernelLowering, op: Op) -> ir.Value | None:
        """``offset p, a ± b : T`` (s = sizeof T, 1 for ``byte_offset``) as ``(p + sext(a)·s)
        ± sext(b)·s``, recursively through ``a`` and ``b``, where that is the same address:
        always for i64 indices (arithmetic mod 2^64), for narrower ones when ``a ± b`` cannot
        wrap in any launch (:func:`tidrange.no_wrap_ops`). LLVM then keeps ``p + sext(b)·s``
        out of a loop where ``b`` is invariant and shares it between accesses (scan's
        ``buf[src + tid]``, ``buf[dst + tid]``: ``[R + UR]`` addressing instead of an add and
        a ``LEA`` each), as for CUDA C, whose ``int`` sums cannot wrap. None: nothing to split
        (``select`` indices are not split: that cost scan's level loop an instruction)."""
        space = op.operands[0].type.space
        if not (self.split_offsets == "all" or self.split_offsets == "shared" and space is AddressSpace.SHARED) \
                or not self._splits(kl, op.operands[1]):
            return None
        size = op.type.size if op.opcode == "offset" and op.type is not None else 1
        assert space is not None
        return self._split(kl, kl.get(op.operands[0]), op.operands[1], size, space)

    def _splits(self, kl: KernelLowering, i: Value) -> bool:
        if not isinstance(i, OpResult) or i.op.opcode not in ("add", "sub"):
            return False
        if i.type.bits == 64:
            return True
        if self.no_wrap is None:
            self.no_wrap = tidrange.no_wrap_ops(kl.kernel)
        return id(i.op) in self.no_wrap

    def _split(self, kl: KernelLowering, p: ir.Value, i: Value, size: int, space: AddressSpace) -> ir.Value:
        """``p + sext(i)·size``, split where :meth:`_splits` allows."""
        if self._splits(kl, i):
            assert isinstance(i, OpResult)
            a, c = i.op.operands
            q = self._split(kl, p, a, size, space)
            return self._split(kl, q, c, -size if i.op.opcode == "sub" else size, space)
        b, v = kl.b, kl.get(i)
        return self.offset(kl, p, b.mul(v if v.type.width == 64 else b.sext(v, I64), ir.Constant(I64, size)), space)

    def load(self, kl: KernelLowering, op: Op, emit: Callable[[], ir.Value]) -> ir.Value:
        """A load whose value is used once, as the chosen value of ``select c, v, x`` (or
        ``select c, x, v``) in its block, with ``c`` defined before it, runs only where the
        select takes it: ``br c, load, join`` and a phi (0 on the other edge, which the select
        never passes on), as CUDA C's ``tid >= d ? buf[...] : 0`` (scan's level loop: a
        predicated ``LDS`` instead of a select of its index and of its value). Only for
        accesses without a check (unchecked builds, accesses the copy proves in bounds):
        a load that would fault must still fault where the IR runs it."""
        space = op.operands[0].type.space
        scope = self.guarded_loads == "all" or self.guarded_loads == "shared" and space is AddressSpace.SHARED
        guard = self._guard(kl, op) if scope else None
        if guard is None:
            return emit()
        cond, when = guard
        start, then, join = kl.b.block, kl.fn.append_basic_block("load.then"), kl.fn.append_basic_block("load.join")
        kl.b.cbranch(cond, then, join) if when else kl.b.cbranch(cond, join, then)
        kl.b = ir.IRBuilder(then)
        val = emit()
        end = kl.b.block
        kl.b.branch(join)
        kl.b = ir.IRBuilder(join)
        phi = kl.b.phi(val.type)
        phi.add_incoming(val, end)
        phi.add_incoming(ir.Constant(val.type, None), start)
        return phi

    def _guard(self, kl: KernelLowering, op: Op) -> tuple[ir.Value, bool] | None:
        """``(c, taken)`` for :meth:`load`: the load's value is the select's when ``c == taken``."""
        if op.result is None or (self.checked and id(op) not in self.assume_proven) or op.block is None:
            return None
        if self.uses is None:
            self.uses = {}
            for blk in kl.kernel.blocks:
                for other in blk.ops:
                    for v in other.uses():
                        self.uses.setdefault(v, []).append(other)
        users = self.uses.get(op.result, [])
        sel = users[0] if len(users) == 1 else None
        if sel is None or sel.opcode != "select" or sel.block is not op.block:
            return None
        c, x, y = sel.operands
        if c is op.result or (x is op.result) == (y is op.result):
            return None
        ops = op.block.ops
        if isinstance(c, OpResult) and c.op.block is op.block and ops.index(c.op) > ops.index(op):
            return None                   # c is computed after the load: not available here
        return kl.get(c), x is op.result

    def address(self, kl: KernelLowering, p: ir.Value, space: AddressSpace, t: ir.Type, size: int,
                atomic: bool, bounds: tuple[ir.Value, ir.Value, ir.Value] | None) -> ir.Value:
        if bounds is not None and bounds is not PROVEN:
            addr = kl.b.ptrtoint(p, I64)
            kl.b = check_access(kl.b, kl.fn, self.fault_exit(kl), addr, bounds, size, space)
        return kl.b.bitcast(p, t.as_pointer(self.spaces[space]))

    def group_check(self, kl: KernelLowering, op: Op) -> bool:
        if id(op) in self.assume_proven:
            return True
        if not self.group_checks:
            return False
        if self.groups is None:
            self.groups = CheckGroups(self)
        return self.groups.check(kl, op)

    def origin_bounds(self, kl: KernelLowering, origin: int) -> tuple[ir.Value, ir.Value]:
        if origin < ORIGIN_SHARED:
            return self.param_bounds[origin]
        assert self.kernel is not None
        arr = self.kernel.shared[origin - ORIGIN_SHARED] if origin < ORIGIN_LOCAL else \
            self.kernel.local[origin - ORIGIN_LOCAL]
        # the arrays' places: link-time constants (shared) or the entry block's allocas (local)
        return kl.b.ptrtoint(self.arrays[id(arr)], I64), ir.Constant(I64, arr.size)

    def fault_exit(self, kl: KernelLowering) -> FaultTarget:
        if self.exit is None:
            self.exit = _SiteExits(self, kl)
        return self.exit

    def _record(self, kl: KernelLowering, b: ir.IRBuilder, code: ir.Value, origin: ir.Value,
                offset: ir.Value) -> None:
        """End the thread at a fault: write the record (inline, or through the module's record
        writer), return."""
        assert self.record is not None and self.kernel_id is not None
        if self.inline_record and self.triple == NVPTX_TRIPLE:
            done = kl.fn.append_basic_block("fault.done")
            self._write_record(b, self.record, code, origin, self.kernel_id, offset, done, self.fault_geometry)
            ir.IRBuilder(done).ret_void()
            return
        b.call(self._record_fn(kl.module), [self.record, code, origin, self.kernel_id, offset])
        b.ret_void()

    @staticmethod
    def fault_geometry(b: ir.IRBuilder, opcode: str, dim: str) -> ir.Value:
        """A thread/block index read for an inline fault record (NVPTX): a volatile ``mov``
        from the special register, which LLVM cannot hoist out of the cold block (it hoisted
        the intrinsic reads into the kernel body, one live register each)."""
        sreg = _PTX_SREG[opcode]
        asm = ir.InlineAsm(ir.FunctionType(I32, []), f"mov.u32 $0, %{sreg}.{dim};", "=r", side_effect=True)
        return b.call(asm, [])

    def _write_record(self, b: ir.IRBuilder, rec: ir.Value, code: ir.Value, origin: ir.Value,
                      kernel_id: ir.Value, offset: ir.Value, done: ir.Block,
                      geometry: Callable[[ir.IRBuilder, str, str], ir.Value]) -> None:
        """Claim the record (first violation wins: ``cmpxchg`` of its first word, 0 → 1) and
        fill it; ends ``b``'s block with a branch to ``done``."""
        def field(name: str, ty: ir.Type) -> ir.Value:
            return b.bitcast(b.gep(rec, [ir.Constant(I64, FAULT_RECORD[name])]), ty.as_pointer(1))

        pair = b.cmpxchg(field("claimed", I32), ir.Constant(I32, 0), ir.Constant(I32, 1), "monotonic", "monotonic")
        write = b.function.append_basic_block("fault.first")
        b.cbranch(b.extract_value(pair, 1), write, done)
        b.position_at_end(write)
        for name, val in (("code", code), ("origin", origin), ("kernel_id", kernel_id), ("offset", offset)):
            b.store(val, field(name, val.type), align=val.type.width // 8)
        for dim in "xyz":
            b.store(geometry(b, "block_id", dim), field(f"block_{dim}", I32), align=4)
            b.store(geometry(b, "thread_id", dim), field(f"thread_{dim}", I32), align=4)
        b.branch(done)

    def _record_fn(self, mod: ir.Module) -> ir.Function:
        """``vxpu.fault.record(rec, code, origin, kernel_id, offset)``, made once per module and
        never inlined: it claims the record (first violation wins: ``cmpxchg`` of its first
        word, 0 → 1) and fills it. Out of line, so the fault path adds a call per check site
        and LLVM cannot hoist its thread/block index reads into the kernel body."""
        fn = mod.globals.get(_RECORD_FN)
        if isinstance(fn, ir.Function):
            return fn
        fnty = ir.FunctionType(VOID, [I8.as_pointer(1), I32, I32, I32, I64])
        fn = ir.Function(mod, fnty, name=_RECORD_FN)
        fn.linkage = "internal"
        fn.attributes.add("noinline")
        rec, code, origin, kernel_id, offset = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        done = fn.append_basic_block("done")
        self._write_record(b, rec, code, origin, kernel_id, offset, done,
                           lambda eb, opcode, dim: self.geometry(_Emitter(eb, mod), opcode, dim))  # type: ignore[arg-type]
        ir.IRBuilder(done).ret_void()
        return fn

    def array_addr(self, kl: KernelLowering, op: Op) -> ir.Value:
        arr = self.arrays[id(op.array)]
        space = AddressSpace.SHARED if isinstance(op.array, SharedArray) else AddressSpace.LOCAL
        return kl.b.bitcast(arr, self.ptr_type(space))

    def freeze_loads(self, space: AddressSpace) -> bool:
        # Shared arrays are globals with an undef initializer (GPUs allow no other): a read of
        # a never-written element must give some bit pattern, never undef (docs/ir.md §5.2).
        return space is AddressSpace.SHARED

    def ret(self, kl: KernelLowering) -> None:
        kl.b.ret_void()

    def trap(self, kl: KernelLowering) -> None:
        if self.checked:
            self.fault_exit(kl).jump(kl.b, FAULT_TRAP, ORIGIN_NONE)
            return
        kl.b.call(declare(kl.module, "llvm.trap", VOID, []), [])
        kl.b.unreachable()

    # -- kernel shell ------------------------------------------------------------------------

    def mark_kernel(self, fn: ir.Function) -> None:
        raise NotImplementedError

    def finish_module(self, mod: ir.Module) -> None:
        """Add module-level flags/metadata after all kernels are emitted."""

    def make_local(self, b: ir.IRBuilder, ty: ir.ArrayType, align: int) -> ir.Value:
        slot = b.alloca(ty)
        slot.align = align
        return slot

    def lower_kernel(self, mod: ir.Module, kernel: Kernel) -> ir.Function:
        if self.unroll_shift_loops:
            kernel = unroll.unroll_shift_loops(kernel)
        params = [kl_type for kl_type in (self._param_type(p.type) for p in kernel.params)]
        ptrs = [i for i, p in enumerate(kernel.params) if p.type.is_ptr]
        nsizes = len(WINDOW_SIZES)
        if self.checked:
            # each pointer's windows, then the common ones (while the parameters fit)
            nwin = len(ptrs) + 1 if windows_fit(kernel_signature(kernel).args_size, len(ptrs)) else 0
            params += [I64, I64] * len(ptrs) + [I32, I32] * nsizes * nwin + [I8.as_pointer(1), I32]
        fn = ir.Function(mod, ir.FunctionType(VOID, params), name=kernel.name)
        self.kernel = kernel
        if self.checked:
            hidden = fn.args[len(kernel.params):]
            self.param_bounds = {i: (hidden[2 * k], hidden[2 * k + 1]) for k, i in enumerate(ptrs)}
            self.record, self.kernel_id = hidden[-2], hidden[-1]
            fn.args[len(fn.args) - 2].add_attribute("noalias")
            wins = hidden[2 * len(ptrs):-2]
            if nwin:
                self.param_windows = {(i, size): (wins[2 * (nsizes * k + n)], wins[2 * (nsizes * k + n) + 1])
                                      for k, i in enumerate(ptrs) for n, size in enumerate(WINDOW_SIZES)}
                at = 2 * nsizes * len(ptrs)
                self.common_windows = {size: (wins[at + 2 * n], wins[at + 2 * n + 1])
                                       for n, size in enumerate(WINDOW_SIZES)}
        self.mark_kernel(fn)
        entry = fn.append_basic_block("entry")
        b = ir.IRBuilder(entry)
        for sarr in kernel.shared:
            self.arrays[id(sarr)] = self._shared_global(mod, kernel, sarr)
        for larr in kernel.local:
            self.arrays[id(larr)] = self._local_alloca(mod, b, larr)
        version, ranged = self._copies(kernel)
        if version is None and ranged is None:
            kl = KernelLowering(kernel, self, fn, entry, dict(zip(kernel.params, fn.args)))
            kl.b = b
            kl.lower()
            return fn
        # two copies: the fast one runs the proven accesses unchecked
        go: ir.Value = ir.Constant(ir.IntType(1), 1)
        proven: set[int] = set()
        fast = fn.append_basic_block("small.block" if version is not None else "range.block")
        general = fn.append_basic_block("any.block")
        if version is not None:
            shape, ranges, proven = version
            for dim, n in zip("xyz", shape):
                if n < tidrange.SIZES[0]:
                    size = self.geometry(_Emitter(b, mod), "block_dim", dim)  # type: ignore[arg-type]
                    go = b.and_(go, b.icmp_unsigned("<=", size, ir.Constant(I32, n)))
            for index, (lo, hi) in ranges.items():
                v = fn.args[index]
                go = b.and_(go, b.and_(b.icmp_signed(">=", v, ir.Constant(v.type, lo)),
                                       b.icmp_signed("<=", v, ir.Constant(v.type, hi))))
        if ranged is not None:
            proven = proven | set(ranged.accesses)
            if version is not None:
                check = fn.append_basic_block("range.check")
                b.cbranch(go, check, general)
                b = ir.IRBuilder(check)
            leaves = rangecopy.Leaves(list(fn.args),
                                      lambda eb, opcode, dim: self.geometry(_Emitter(eb, mod), opcode, dim),  # type: ignore[arg-type]
                                      self.param_bounds, self.param_windows if self.limits32 else None)
            go = ranged.emit(b, leaves)
        b.cbranch(go, fast, general)
        proven = proven | rangecopy.direct_array_accesses(kernel)
        for start, assume in ((fast, proven), (general, set())):
            self.assume_proven = assume
            KernelLowering(kernel, self, fn, start, dict(zip(kernel.params, fn.args))).lower()
        self.assume_proven = set()
        return fn

    def _copies(self, kernel: Kernel) -> tuple[tidrange.Choice | None, rangecopy.RangePlan | None]:
        """The small-block copy's choice and the range copy's plan of a checked kernel (either
        may be None; both None: one copy). With :attr:`exit_free`, a kernel with barriers
        first tries both copies with every access they prove (the range copy only where a
        proven access runs in a loop): taken when no check before a barrier remains in the
        fast copy (so ptxas needs no convergence code there)."""
        if not self.checked:
            return None, None
        order = reverse_postorder(kernel)
        if self.exit_free and self.block_version and self.range_copy \
                and any(op.opcode == "barrier" for b in kernel.blocks for op in b.ops):
            version = tidrange.choose(kernel, pays=False)
            ranged = rangecopy.plan(kernel, order, every=True)
            proven = (version[2] if version is not None else set()) | (set(ranged.accesses) if ranged else set())
            if proven and not rangecopy.exits_before_barrier(kernel, proven | rangecopy.direct_array_accesses(kernel)):
                return version, ranged
        version = tidrange.choose(kernel) if self.block_version else None
        ranged = rangecopy.plan(kernel, order) if self.range_copy else None
        return version, ranged

    def _param_type(self, t):  # type: ignore[no-untyped-def]
        return self.ptr_type(t.space) if t.is_ptr else scalar_type(t)

    def _shared_global(self, mod: ir.Module, kernel: Kernel, arr: SharedArray) -> ir.Value:
        ty = ir.ArrayType(scalar_type(arr.type), arr.count)
        name = f"{kernel.name}.shared.{_SAFE.sub('_', arr.name)}"
        gv = ir.GlobalVariable(mod, ty, name=mod.get_unique_name(name), addrspace=self.spaces[AddressSpace.SHARED])
        gv.linkage = "internal"
        gv.initializer = ir.Constant(ty, ir.Undefined)
        gv.align = array_align(arr.type.size)
        return gv

    def _local_alloca(self, mod: ir.Module, b: ir.IRBuilder, arr: LocalArray) -> ir.Value:
        ty = ir.ArrayType(scalar_type(arr.type), arr.count)
        slot = self.make_local(b, ty, array_align(arr.type.size))
        # Zero-initialise: reading an unwritten local is defined (0), never undef.
        b.store(ir.Constant(ty, None), slot)
        return slot


_RECORD_FN = "vxpu.fault.record"
_PTX_SREG = {"thread_id": "tid", "block_id": "ctaid"}


class _Emitter:
    """What ``GpuHooks.geometry`` reads of a lowering (a builder and its module), for code
    emitted outside a kernel."""

    def __init__(self, b: ir.IRBuilder, module: ir.Module) -> None:
        self.b, self.module = b, module


class _SiteExits:
    """The GPU fault exit: a separate cold block per check that writes the record and returns.

    One shared exit block (as on x86) is a join point of every check; ptxas then wrapped the
    whole kernel in a convergence region (``BSSY``/``BSYNC``) and put ``WARPSYNC.ALL`` before
    each ``bar.sync`` (scan ran at half speed); exits that never join need neither."""

    def __init__(self, hooks: GpuHooks, kl: KernelLowering) -> None:
        self.hooks, self.kl = hooks, kl

    def branch(self, b: ir.IRBuilder, fn: ir.Function, ok: ir.Value, code: ir.Value, origin: ir.Value,
               offset: ir.Value) -> ir.IRBuilder:
        cont, fail = fn.append_basic_block("ok"), fn.append_basic_block("fault")
        br = b.cbranch(ok, cont, fail)
        mod = b.module
        br.set_metadata("prof", mod.add_metadata([ir.MetaDataString(mod, "branch_weights"),
                                                  ir.Constant(I32, 1 << 20), ir.Constant(I32, 1)]))
        self.hooks._record(self.kl, ir.IRBuilder(fail), code, origin, offset)
        return ir.IRBuilder(cont)

    def jump(self, b: ir.IRBuilder, code: int, origin: int = ORIGIN_NONE) -> None:
        self.hooks._record(self.kl, b, i32(code), i32(origin), ir.Constant(I64, 0))


def lower_gpu_module(module: Module, hooks_factory: type[GpuHooks], checked: bool = True) -> ir.Module:
    """Lower every kernel of ``module`` into one LLVM module for a GPU target (``checked``:
    per-buffer bounds and the fault record; False only for trusted modules)."""
    proto = hooks_factory(checked)
    mod = new_module(module.name, proto)
    for kernel in module.kernels:
        hooks_factory(checked).lower_kernel(mod, kernel)
    proto.finish_module(mod)
    return mod


__all__ = ["FAULT_RECORD", "FAULT_RECORD_SIZE", "I32", "I64", "GpuHooks", "array_align", "lower_gpu_module"]
