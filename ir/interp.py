"""The reference interpreter: runs an IR kernel over a grid, exactly as docs/ir.md specifies.

It exists for differential testing (against the x86 JIT and the GPU backends) and as the
executable specification, not for speed; a 256-thread block of saxpy takes a few milliseconds.

**Memory model.** :class:`Memory` mirrors the CPU backend: device ("global") memory is one
flat arena, a numpy ``uint8`` array, and a device address is a byte offset into it. The first
``guard`` bytes are never allocated, so null and small addresses always fault. In strict mode
(the default) every access must also lie inside one live allocation, which catches kernels
that run past their buffers even where the arena would not. ``ptr<constant>`` parameters are
addresses in the same arena (read-only by the verifier's rules). Shared arrays live in a
per-block segment and local arrays in a per-thread segment; pointers into them are offsets in
their segment. Every access must be naturally aligned. A violation raises
:class:`InterpFault`, as does ``trap``.

**Per-buffer bounds** (as the checked lowering, docs/ir-lowering.md): a pointer register holds
``(address, origin)``; the origin (the parameter index, ``0x100 + j`` for shared array ``j``,
``0x200 + j`` for local array ``j``) travels through ``offset``, ``select`` and block arguments,
and every access must lie inside *that* buffer: the allocation that contained the parameter's
address at launch (strict mode; a pointer inside none can access nothing) or the array. A
violation's :class:`InterpFault` carries the same ``code``, ``param`` (origin) and ``offset``
(from the buffer's start) as the x86 backend's ``KernelFault``.

**Execution.** Each thread is a Python generator over pre-compiled closures (one per op,
operating on a list of registers indexed by the kernel's canonical value numbering). Threads
of a block run in thread-index order (``x`` fastest) until their next barrier; a barrier that
not every thread of the block reaches, or threads waiting at different barriers, is a fault
(non-uniform barrier). Blocks run one after another in linear order ``x + gx * (y + gy * z)``,
which is also the CPU backend's order for kernels with global atomics, so float atomics give
the same bits on both. Scalar semantics come from :mod:`vxpu.ir.interp_ops`.
"""

from __future__ import annotations

import bisect
import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import IRError
from .interp_ops import evaluator, from_imm, round_float
from .model import Block, Kernel, Module, Op
from .types import AddressSpace, Type

__all__ = ["DEFAULT_GUARD", "MAX_THREADS_PER_BLOCK", "InterpFault", "Memory", "run_kernel"]

log = logging.getLogger(__name__)

MAX_THREADS_PER_BLOCK = 1024
#: Bytes at the start of the arena that are never allocated (as in the CPU backend).
DEFAULT_GUARD = 64 << 10
DEFAULT_ALIGNMENT = 256
_MASK64 = (1 << 64) - 1
# Buffer origins and fault codes, as vxpu.ir.lower.bounds (which needs llvmlite; this does not).
_ORIGIN_SHARED = 0x100
_ORIGIN_LOCAL = 0x200
_SPACE_CODE = {AddressSpace.SHARED: 2, AddressSpace.LOCAL: 3}


def _origin_name(origin: int) -> str:
    if origin >= _ORIGIN_LOCAL:
        return f"local array {origin - _ORIGIN_LOCAL}"
    if origin >= _ORIGIN_SHARED:
        return f"shared array {origin - _ORIGIN_SHARED}"
    return f"parameter {origin}"
_STRUCTS = {"i8": struct.Struct("<B"), "i16": struct.Struct("<H"), "i32": struct.Struct("<I"),
            "i64": struct.Struct("<Q"), "f16": struct.Struct("<e"), "f32": struct.Struct("<f"),
            "f64": struct.Struct("<d")}

Regs = list[Any]
Step = Callable[[Regs], None]


class InterpFault(IRError):
    """A kernel fault in the interpreter: out-of-bounds or misaligned access, trap, non-uniform
    barrier, or the step limit. The message names the kernel, block, op and thread.

    Attributes:
        code: the fault code of ``vxpu.ir.lower.bounds`` (1 global, 2 shared, 3 local out of
            its buffer, 4 misaligned, 5 trap, 6 barrier), None for other faults.
        param: the buffer's origin (parameter index, ``0x100 + j``, ``0x200 + j``) or None.
        offset: the access's offset from the buffer's start (mod 2^64), or None.
    """

    def __init__(self, message: str, code: int | None = None, param: int | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.offset = offset


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

class _Segment:
    """A byte buffer with the ranges that may be accessed (allocations or arrays)."""

    def __init__(self, buf: np.ndarray, name: str) -> None:
        self.buf: Any = buf                    # a numpy uint8 array (struct packs straight into it)
        self.name = name
        self._starts: list[int] = []
        self._ends: list[int] = []

    def _add_range(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, end)

    def check(self, addr: int, size: int, where: str) -> None:
        """Raise InterpFault unless ``[addr, addr+size)`` is inside one range and aligned."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr + size > self._ends[i]:
            raise InterpFault(f"{where}: {size}-byte access at {self.name} address {addr:#x} is out of bounds")
        if addr % size:
            raise InterpFault(f"{where}: {size}-byte access at {self.name} address {addr:#x} is misaligned")


class Memory(_Segment):
    """Device memory for the interpreter: a flat arena with a bump allocator (allocations live as
    long as the Memory; make a new one per test or run).

    Args:
        size: arena size in bytes.
        guard: bytes at the start that are never allocated (null is always invalid).
        alignment: alignment of every allocation.
        strict: if True, accesses must fall inside a live allocation; if False, anywhere in
            ``[guard, size)``.

    Raises:
        IRError: a size, guard or alignment that makes no sense.
    """

    def __init__(self, size: int = 64 << 20, *, guard: int = DEFAULT_GUARD, alignment: int = DEFAULT_ALIGNMENT,
                 strict: bool = True) -> None:
        if not (0 <= guard < size) or alignment <= 0 or alignment & (alignment - 1):
            raise IRError(f"bad interpreter memory: size={size} guard={guard} alignment={alignment}")
        super().__init__(np.zeros(size, dtype=np.uint8), "global")
        self.size = size
        self.guard = guard
        self.alignment = alignment
        self.strict = strict
        self._next = guard
        self._allocs: dict[int, int] = {}
        if not strict:
            self._add_range(guard, size)

    def alloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` (zeroed) and return the device address.

        Raises:
            IRError: the arena is full or ``nbytes`` is not positive.
        """
        if nbytes <= 0:
            raise IRError(f"allocation size must be positive, got {nbytes}")
        addr = -(-self._next // self.alignment) * self.alignment
        if addr + nbytes > self.size:
            raise IRError(f"interpreter memory full: {nbytes} bytes do not fit in {self.size}; "
                          "create Memory(size=...) larger")
        self._next = addr + nbytes
        self._allocs[addr] = nbytes
        self.buf[addr:addr + nbytes] = 0
        if self.strict:
            self._add_range(addr, addr + nbytes)
        return addr

    def upload(self, array: np.ndarray) -> int:
        """Allocate room for ``array``, copy it in and return its address."""
        data = np.ascontiguousarray(array)
        addr = self.alloc(max(1, data.nbytes))
        self.write(addr, data)
        return addr

    def write(self, addr: int, array: np.ndarray) -> None:
        """Copy ``array``'s bytes to ``addr``.

        Raises:
            IRError: the range is outside the arena.
        """
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self._host_range(addr, raw.size)
        self.buf[addr:addr + raw.size] = raw

    def read(self, addr: int, dtype: Any, count: int) -> np.ndarray:
        """A copy of ``count`` elements of ``dtype`` at ``addr``.

        Raises:
            IRError: the range is outside the arena.
        """
        dt = np.dtype(dtype)
        n = dt.itemsize * count
        self._host_range(addr, n)
        return self.buf[addr:addr + n].view(dt).copy()

    def allocation_at(self, addr: int) -> tuple[int, int] | None:
        """``(start, size)`` of the live allocation (strict) or the usable arena (not strict)
        containing ``addr``, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._starts[i], self._ends[i] - self._starts[i]
        return None

    def _host_range(self, addr: int, n: int) -> None:
        if not (0 <= addr and n >= 0 and addr + n <= self.size):
            raise IRError(f"host access [{addr:#x}, +{n}) is outside the {self.size}-byte interpreter memory")


def _array_segment(arrays: Sequence[Any], name: str) -> tuple[_Segment, dict[int, int]]:
    """Lay out shared or local arrays (16-byte aligned); returns the segment and offsets by id."""
    offsets: dict[int, int] = {}
    pos = 0
    for a in arrays:
        pos = -(-pos // 16) * 16
        offsets[id(a)] = pos
        pos += a.size
    seg = _Segment(np.zeros(max(pos, 1), dtype=np.uint8), name)
    for a in arrays:
        seg._add_range(offsets[id(a)], offsets[id(a)] + a.size)
    return seg, offsets


def _fresh(seg: _Segment) -> _Segment:
    """A zeroed copy of a segment with the same ranges (per block / per thread)."""
    new = _Segment(np.zeros_like(seg.buf), seg.name)
    new._starts, new._ends = seg._starts, seg._ends
    return new


# ---------------------------------------------------------------------------------------------
# Compilation of a kernel into closures
# ---------------------------------------------------------------------------------------------

class _State:
    """Mutable launch state the closures read: memory, the current block's shared segment, the
    current epoch (linear block, barrier round) and the race tracker (None: not tracking)."""

    def __init__(self, mem: Memory, shared: _Segment, step_limit: int, races: _Races | None) -> None:
        self.mem = mem
        self.shared = shared
        self.steps_left = step_limit
        self.epoch = (0, 0)
        self.races = races
        #: origin -> (base, length) of each buffer (parameters at launch, arrays at compile).
        self.bounds: dict[int, tuple[int, int]] = {}


class _Races:
    """Finds data races: two accesses to one byte by different threads, at least one a write,
    that no barrier orders. Accesses of one block are ordered when a barrier lies between them
    (different rounds); accesses of different blocks are never ordered. Atomics are not
    tracked. Per byte: the last writer and the readers since, each as (thread, epoch)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[int, list[Any]]] = {"shared": {}, "global": {}}

    @staticmethod
    def _unordered(t1: Any, e1: tuple[int, int], t2: Any, e2: tuple[int, int]) -> bool:
        return t1 != t2 and not (e1[0] == e2[0] and e1[1] != e2[1])

    def access(self, space: str, addr: int, n: int, thread: Any, epoch: tuple[int, int], write: bool,
               where: str) -> None:
        table = self.tables[space]
        for byte in range(addr, addr + n):
            cell = table.get(byte)
            if cell is None:
                cell = table[byte] = [None, None, {}]
            wt, we, readers = cell
            if wt is not None and self._unordered(wt, we, thread, epoch):
                self._race(where, space, byte, thread, wt, "wrote")
            if write:
                for rt, re in readers.items():
                    if self._unordered(rt, re, thread, epoch):
                        self._race(where, space, byte, thread, rt, "read")
                cell[0], cell[1], cell[2] = thread, epoch, {}
            else:
                readers[thread] = epoch

    @staticmethod
    def _race(where: str, space: str, byte: int, thread: Any, other: Any, did: str) -> None:
        raise InterpFault(f"{where}: data race on {space} byte {byte:#x}: thread {other[1]} of block "
                          f"{other[0]} {did} it with no barrier in between")


class _CBlock:
    """A compiled IR block: op closures split at barriers, and the terminator."""

    __slots__ = ("barrier_ids", "name", "segments", "term")

    def __init__(self, name: str) -> None:
        self.name = name
        self.segments: list[list[Step]] = [[]]
        self.barrier_ids: list[str] = []
        self.term: Callable[[Regs], _CBlock | None] = _no_term


def _no_term(regs: Regs) -> _CBlock | None:
    raise AssertionError("block was not compiled")


@dataclass
class _Compiled:
    """A kernel ready to run: its blocks and where the geometry values go."""

    blocks: list[_CBlock]
    nregs: int
    template: list[Any]
    block_id_regs: list[tuple[int, int]]     # (register, dim index)
    thread_id_regs: list[tuple[int, int]]
    local: _Segment | None
    local_slot: int                          # register holding the thread's local segment
    thread_slot: int                         # register holding (linear block, linear thread)


_DIM = {"x": 0, "y": 1, "z": 2}


class _KernelCompiler:
    def __init__(self, kernel: Kernel, state: _State, grid: tuple[int, int, int],
                 block: tuple[int, int, int]) -> None:
        self.k = kernel
        self.st = state
        self.grid = grid
        self.block = block
        self.num = kernel.numbering()
        self.local_slot = len(self.num)
        self.thread_slot = self.local_slot + 1
        self.template: list[Any] = [None] * (self.local_slot + 2)
        _, self.shared_off = _array_segment(kernel.shared, "shared")
        self.local_seg, self.local_off = _array_segment(kernel.local, "local")
        self.block_id_regs: list[tuple[int, int]] = []
        self.thread_id_regs: list[tuple[int, int]] = []
        self.cblocks = {id(b): _CBlock(b.name or f"#{i}") for i, b in enumerate(kernel.blocks)}
        self.origin_of = {id(a): _ORIGIN_SHARED + j for j, a in enumerate(kernel.shared)}
        self.origin_of.update({id(a): _ORIGIN_LOCAL + j for j, a in enumerate(kernel.local)})
        for j, sa in enumerate(kernel.shared):
            state.bounds[_ORIGIN_SHARED + j] = (self.shared_off[id(sa)], sa.size)
        for j, la in enumerate(kernel.local):
            state.bounds[_ORIGIN_LOCAL + j] = (self.local_off[id(la)], la.size)

    def compile(self) -> _Compiled:
        for bi, b in enumerate(self.k.blocks):
            self._compile_block(bi, b)
        local = self.local_seg if self.k.local else None
        return _Compiled([self.cblocks[id(b)] for b in self.k.blocks], self.local_slot + 2, self.template,
                         self.block_id_regs, self.thread_id_regs, local, self.local_slot, self.thread_slot)

    def _compile_block(self, bi: int, b: Block) -> None:
        cb = self.cblocks[id(b)]
        for i, op in enumerate(b.ops):
            where = f"kernel @{self.k.name}, block ^{cb.name}, op {i} ({op.opcode})"
            if op.opcode == "barrier":
                cb.segments.append([])
                cb.barrier_ids.append(f"barrier at block ^{cb.name}, op {i}")
            elif op.defn.terminator:
                cb.term = self._terminator(op, where)
            else:
                step = self._op(op, where)
                if step is not None:
                    cb.segments[-1].append(step)

    # --- ops -----------------------------------------------------------------------------------
    def _op(self, op: Op, where: str) -> Step | None:
        name = op.opcode
        out = self.num[op.result] if op.result is not None else -1
        if name == "const":
            assert op.type is not None and op.imm is not None
            self.template[out] = from_imm(op.type, op.imm)
            return None
        if name in ("thread_id", "block_id", "block_dim", "grid_dim"):
            self._geometry(name, _DIM[op.dim or "x"], out)
            return None
        if name in ("shared_addr", "local_addr"):
            offsets = self.shared_off if name == "shared_addr" else self.local_off
            origin = self.origin_of[id(op.array)]
            self.template[out] = (offsets[id(op.array)], origin)
            return None
        if name in ("offset", "byte_offset"):
            return self._offset(op, out)
        if name == "load":
            return self._load(op, out, where)
        if name == "store":
            return self._store(op, where)
        if name.startswith("atomic_"):
            return self._atomic(op, out, where)
        fn = evaluator(op)
        if fn is None:
            raise IRError(f"{where}: the interpreter does not implement {name}")
        return _apply(fn, [self.num[v] for v in op.operands], out)

    def _geometry(self, name: str, dim: int, out: int) -> None:
        if name == "thread_id":
            self.thread_id_regs.append((out, dim))
        elif name == "block_id":
            self.block_id_regs.append((out, dim))
        else:
            self.template[out] = (self.block if name == "block_dim" else self.grid)[dim]

    def _offset(self, op: Op, out: int) -> Step:
        p, i = self.num[op.operands[0]], self.num[op.operands[1]]
        size = op.type.size if op.type is not None else 1
        ibits = op.operands[1].type.bits
        sign = 1 << (ibits - 1)
        full = 1 << ibits

        def offset(r: Regs) -> None:
            idx = r[i]
            if idx & sign:
                idx -= full
            a, o = r[p]
            r[out] = ((a + idx * size) & _MASK64, o)
        return offset

    def _segment_getter(self, space: AddressSpace | None) -> Callable[[Regs], _Segment]:
        if space is AddressSpace.SHARED:
            st = self.st
            return lambda r: st.shared
        if space is AddressSpace.LOCAL:
            slot = self.local_slot
            return lambda r: r[slot]
        mem = self.st.mem
        return lambda r: mem

    def _checker(self, space: AddressSpace | None, n: int, where: str) -> Callable[[int, int], None]:
        """A function ``(address, origin)`` that faults unless ``[address, address + n)`` lies
        inside the origin's buffer and is aligned."""
        bounds = self.st.bounds
        code = 1 if space is None else _SPACE_CODE.get(space, 1)

        def check(a: int, o: int) -> None:
            base, length = bounds.get(o, (0, 0))
            off = (a - base) & _MASK64
            if a % n:                          # misalignment first, as the lowering reports it
                raise InterpFault(f"{where}: {n}-byte access at offset {off:#x} of {_origin_name(o)} "
                                  "is misaligned", 4, o, off)
            if length < n or off > length - n:
                raise InterpFault(f"{where}: {n}-byte access at offset {off:#x} of {_origin_name(o)} "
                                  f"({length} bytes) is out of bounds", code, o, off)
        return check

    def _load(self, op: Op, out: int, where: str) -> Step:
        assert op.type is not None
        space = op.operands[0].type.space
        get = self._segment_getter(space)
        p = self.num[op.operands[0]]
        unpack = _STRUCTS[op.type.name].unpack_from
        n = op.type.size
        check = self._checker(space, n, where)

        def load(r: Regs) -> None:
            seg = get(r)
            a, o = r[p]
            check(a, o)
            r[out] = unpack(seg.buf, a)[0]
        return self._tracked(load, op.operands[0].type.space, p, n, False, where)

    def _tracked(self, step: Step, space: AddressSpace | None, p: int, n: int, write: bool, where: str) -> Step:
        """``step`` plus race tracking of its access, when the launch tracks races."""
        races, st, slot = self.st.races, self.st, self.thread_slot
        if races is None or space is AddressSpace.LOCAL:
            return step
        name = "shared" if space is AddressSpace.SHARED else "global"

        def tracked(r: Regs) -> None:
            step(r)                            # checks bounds first
            races.access(name, r[p][0], n, r[slot], st.epoch, write, where)
        return tracked

    def _store(self, op: Op, where: str) -> Step:
        vt = op.operands[0].type
        space = op.operands[1].type.space
        get = self._segment_getter(space)
        v, p = self.num[op.operands[0]], self.num[op.operands[1]]
        pack = _STRUCTS[vt.name].pack_into
        n = vt.size
        check = self._checker(space, n, where)

        def store(r: Regs) -> None:
            seg = get(r)
            a, o = r[p]
            check(a, o)
            pack(seg.buf, a, r[v])
        return self._tracked(store, op.operands[1].type.space, p, n, True, where)

    def _atomic(self, op: Op, out: int, where: str) -> Step:
        t = op.type
        assert t is not None
        get = self._segment_getter(op.operands[0].type.space)
        idx = [self.num[v] for v in op.operands]
        fmt = _STRUCTS[t.name]
        n = t.size
        update = _atomic_update(op.opcode, t)
        check = self._checker(op.operands[0].type.space, n, where)

        def atomic(r: Regs) -> None:
            seg = get(r)
            a, o = r[idx[0]]
            check(a, o)
            old = fmt.unpack_from(seg.buf, a)[0]
            new = update(old, *[r[j] for j in idx[1:]])
            fmt.pack_into(seg.buf, a, new)
            r[out] = old
        return atomic

    # --- terminators -----------------------------------------------------------------------------
    def _terminator(self, op: Op, where: str) -> Callable[[Regs], _CBlock | None]:
        if op.opcode == "ret":
            return _ret
        if op.opcode == "trap":
            def trap(r: Regs) -> _CBlock | None:
                raise InterpFault(f"{where}: trap", 5)
            return trap
        edges = [self._edge(s.block, s.args) for s in op.successors]
        if op.opcode == "br":
            return edges[0]
        c = self.num[op.operands[0]]
        on_true, on_false = edges

        def cbr(r: Regs) -> _CBlock | None:
            return on_true(r) if r[c] else on_false(r)
        return cbr

    def _edge(self, target: Block, args: Sequence[Any]) -> Callable[[Regs], _CBlock | None]:
        tb = self.cblocks[id(target)]
        src = [self.num[a] for a in args]
        dst = [self.num[p] for p in target.params]
        if not src:
            return lambda r: tb
        if len(src) == 1:
            s0, d0 = src[0], dst[0]

            def edge1(r: Regs) -> _CBlock | None:
                r[d0] = r[s0]
                return tb
            return edge1
        pairs = list(zip(dst, src))

        def edge(r: Regs) -> _CBlock | None:
            vals = [r[s] for _, s in pairs]          # parallel copy: read all, then write
            for (d, _), val in zip(pairs, vals):
                r[d] = val
            return tb
        return edge


def _ret(r: Regs) -> _CBlock | None:
    return None


def _apply(fn: Callable[..., Any], ins: list[int], out: int) -> Step:
    if len(ins) == 1:
        a = ins[0]

        def unary(r: Regs) -> None:
            r[out] = fn(r[a])
        return unary
    if len(ins) == 2:
        a, b = ins

        def binary(r: Regs) -> None:
            r[out] = fn(r[a], r[b])
        return binary
    a, b, c = ins

    def ternary(r: Regs) -> None:
        r[out] = fn(r[a], r[b], r[c])
    return ternary


def _atomic_update(opcode: str, t: Type) -> Callable[..., Any]:
    """new = update(old, operands...) for each atomic op."""
    from .interp_ops import scalar_fn

    if opcode == "atomic_xchg":
        return lambda old, v: v
    if opcode == "atomic_cas":
        return lambda old, cmp, new: new if old == cmp else old
    if opcode == "atomic_fadd":
        bits = t.bits
        return lambda old, v: round_float(bits, old + v)
    fn = scalar_fn(opcode[len("atomic_"):], t)
    if fn is None:
        raise IRError(f"the interpreter does not implement {opcode}")
    return fn


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _dims(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(not isinstance(d, (int, np.integer)) or d < 1 for d in dims):
        raise IRError(f"{what} must be 1 to 3 positive integers, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))  # type: ignore[return-value]


def _arg_value(t: Type, value: Any, name: str) -> Any:
    if t.is_ptr:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= _MASK64:
            raise IRError(f"argument %{name} ({t}) must be a device address (an int), got {value!r}")
        return int(value)
    if t.is_int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise IRError(f"argument %{name} ({t}) must be an integer, got {value!r}")
        v = int(value)
        if not t.min_signed <= v <= t.max_unsigned:
            raise IRError(f"argument %{name} = {v} does not fit {t}")
        return v & t.max_unsigned
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise IRError(f"argument %{name} ({t}) must be a number, got {value!r}")
    return round_float(t.bits, float(value))


def _thread(entry: _CBlock, regs: Regs, st: _State) -> Iterator[str]:
    """One thread: runs blocks, yielding the barrier's id at each barrier."""
    b: _CBlock | None = entry
    while b is not None:
        segs = b.segments
        for step in segs[0]:
            step(regs)
        for k in range(1, len(segs)):
            yield b.barrier_ids[k - 1]
            for step in segs[k]:
                step(regs)
        st.steps_left -= 1
        if st.steps_left < 0:
            raise InterpFault(f"step limit exceeded in block ^{b.name} (an endless loop?); "
                              "raise run_kernel(step_limit=...)")
        b = b.term(regs)


def _run_block(c: _Compiled, st: _State, bid: tuple[int, int, int], linear: int, block: tuple[int, int, int],
               shared: _Segment | None) -> None:
    base = list(c.template)
    for reg, dim in c.block_id_regs:
        base[reg] = bid[dim]
    if shared is not None:
        st.shared = _fresh(shared)
    if st.races is not None:
        st.races.tables["shared"] = {}
    threads: list[tuple[tuple[int, int, int], Iterator[str]]] = []
    bx, by, bz = block
    for z in range(bz):
        for y in range(by):
            for x in range(bx):
                regs = list(base)
                tid = (x, y, z)
                for reg, dim in c.thread_id_regs:
                    regs[reg] = tid[dim]
                if c.local is not None:
                    regs[c.local_slot] = _fresh(c.local)
                regs[c.thread_slot] = (linear, len(threads))
                threads.append((tid, _thread(c.blocks[0], regs, st)))
    rounds = 0
    while threads:
        st.epoch = (linear, rounds)
        rounds += 1
        waiting: list[tuple[tuple[int, int, int], Iterator[str]]] = []
        at: dict[str, tuple[int, int, int]] = {}
        done: tuple[int, int, int] | None = None
        for tid, gen in threads:
            try:
                barrier = next(gen)
            except StopIteration:
                done = done or tid
                continue
            except InterpFault as exc:
                raise InterpFault(f"kernel fault: {exc} [block {bid}, thread {tid}]", exc.code, exc.param,
                                  exc.offset) from None
            at.setdefault(barrier, tid)
            waiting.append((tid, gen))
        if waiting and (done is not None or len(at) > 1):
            where = "; ".join(f"thread {t} waits at the {b}" for b, t in at.items())
            if done is not None:
                where += f"; thread {done} returned"
            raise InterpFault(f"kernel fault: non-uniform barrier in block {bid}: {where}", 6)
        threads = waiting


def run_kernel(module: Module, name: str, grid: int | Sequence[int], block: int | Sequence[int],
               args: Sequence[Any], memory: Memory, *, verify: bool = True,
               step_limit: int = 100_000_000, detect_races: bool = False) -> None:
    """Run kernel ``name`` of ``module`` over ``grid`` x ``block`` threads on ``memory``.

    Args:
        module: the IR module.
        name: the kernel to run.
        grid: blocks per grid (an int, or 1 to 3 ints x, y, z).
        block: threads per block (at most MAX_THREADS_PER_BLOCK in total).
        args: one value per kernel parameter: device addresses (ints from ``memory.alloc`` /
            ``memory.upload``) for pointers, Python or numpy numbers for scalars (floats are
            rounded to the parameter's type).
        memory: the device memory; kernels read and write it in place.
        verify: run the verifier first (leave on for untrusted modules).
        step_limit: most blocks executed in total over all threads before faulting.
        detect_races: fault on data races (non-atomic accesses of different threads to one
            byte, at least one a write, with no barrier ordering them; slower).

    Raises:
        VerifyError: the module is invalid (with ``verify``).
        IRError: unknown kernel, bad geometry or arguments.
        InterpFault: the kernel faulted (out of bounds, misaligned, trap, non-uniform barrier,
            step limit, a data race with ``detect_races``); the message says where.
    """
    if verify:
        from .verify import verify as verify_module

        verify_module(module)
    kernel = module.kernel(name)
    g, b = _dims(grid, "grid"), _dims(block, "block")
    if b[0] * b[1] * b[2] > MAX_THREADS_PER_BLOCK:
        raise IRError(f"block {b} has more than {MAX_THREADS_PER_BLOCK} threads")
    if len(args) != len(kernel.params):
        raise IRError(f"kernel @{name} takes {len(kernel.params)} arguments, got {len(args)}")
    shared, _ = _array_segment(kernel.shared, "shared")
    st = _State(memory, shared, step_limit, _Races() if detect_races else None)
    compiled = _KernelCompiler(kernel, st, g, b).compile()
    num = kernel.numbering()
    for i, (p, value) in enumerate(zip(kernel.params, args)):
        v = _arg_value(p.type, value, p.name or str(p.index))
        if p.type.is_ptr:
            st.bounds[i] = memory.allocation_at(v) or (0, 0)     # a pointer into nothing reaches nothing
            v = (v, i)
        compiled.template[num[p]] = v
    with np.errstate(all="ignore"):
        for z in range(g[2]):
            for y in range(g[1]):
                for x in range(g[0]):
                    linear = x + g[0] * (y + g[1] * z)
                    _run_block(compiled, st, (x, y, z), linear, b, shared if kernel.shared else None)

