"""Global accesses proven in bounds for a whole block at the kernel's entry: the range copy (GPU).

A checked access whose fault exit sits inside a loop with barriers, or before the barriers of
a kernel, costs more than its compare: ptxas wraps the barriers in convergence code (``BSSY``/
``BSYNC``, ``WARPSYNC``) because a thread may leave between them. The loop versioning of
:mod:`vxpu.ir.lower.versioning` cannot help there: its test is per thread, and the threads of
one block must not take different copies of a loop with barriers (on NVIDIA ``bar.sync`` is an
*aligned* barrier: every thread of a warp must execute the same instruction). So this module
proves global accesses for a whole block at once, from values that are the same for every
thread of the block, and the kernel is emitted twice (:mod:`vxpu.ir.lower.gpu`): the entry
tests the ranges — one uniform branch — and the *range copy* runs those accesses unchecked;
otherwise the general copy checks everything, exactly as before (the first violation is then
reported as always; the range copy runs only when none of its unchecked accesses can violate).

**Intervals at run time.** Every integer value of at most 32 bits built from *leaves* by
``add``, ``sub``, ``mul``, ``shl`` by a constant and ``select`` gets an interval ``[lo, hi]``
of i64 values computed at the kernel entry:

* constants, integer parameters, ``block_id``, ``block_dim``, ``grid_dim``: one value (the same
  for the whole block);
* ``thread_id.d``: ``[0, block_dim.d - 1]``;
* the counter ``j`` of a *counted loop* (:class:`Loop`: header ``cbr (icmp slt j, n)`` whose
  true edge enters the loop and whose false edge leaves it, every back edge passes ``add j, s``,
  ``n`` and ``s`` defined before the loop; barriers and inner loops allowed), only where it is
  read in the loop's body (a block of the loop other than the header, so ``j < n`` held on
  entry to that iteration): ``[j0.lo, n.hi - 1]``, or exactly ``[j0, j0 + s*((n - 1 - j0) / s)]``
  when ``j0``, ``n`` and ``s`` are single values; valid when ``s.lo > 0`` and ``n.hi + s.hi - 1``
  fits the counter's type (so no ``j + s`` wraps: the test includes it).

``add``/``sub``/``mul`` combine intervals (a product takes the least and greatest of the four
corner products), ``select`` takes the hull of both operands (the condition is ignored), and
each result must fit its type: the test includes ``lo >= MIN`` and ``hi <= MAX`` for every
result that could leave the type (static bounds drop the others). Then, by induction over the
expression, every value the kernel computes lies in its interval and no operation wraps. In
i64 nothing overflows: operands fit 32 bits, so products fit 63.

**The access test.** An access at ``offset(...offset(P, i1)..., ik)`` (``P`` a pointer
parameter, each element size a multiple of the access size) lies at byte offset
``B = sum size_k * i_k`` from ``P``; with ``[B.lo, B.hi]`` from the intervals (each index
tested to fit its type), ``off_lo = P - base + B.lo`` and ``off_hi = P - base + B.hi`` (mod
2^64), the test is ``off_lo >= 0`` (signed), ``off_lo`` aligned
(:func:`~vxpu.ir.lower.bounds.aligned`) and ``off_hi`` in bounds
(:func:`~vxpu.ir.lower.bounds.in_bounds`, ``off_hi + size <= length``): ``off_hi = off_lo +
(B.hi - B.lo)`` does not wrap (``off_lo < 2^63``, ``B.hi - B.lo < 2^40``), so every offset the
access takes lies in ``[0, off_hi]`` and ends within the buffer, and each is ``off_lo`` plus a
multiple of the access size, so aligned. With host-filled *element windows* (GPU: ``P``'s
window for the access size, :func:`vxpu.accel.gpu_checked.element_window` — exactly the i32
indices ``i`` for which an access at ``P + size*i`` passes the general check, an interval)
the test is instead ``w.lo <= E.lo`` and ``E.hi <= w.hi`` for the element index ``E = sum
(size_k/size) * i_k`` (exact in i64: each index is tested to fit its type): the access is at
``P + size*E`` (mod 2^64) with ``E`` an i32 value in the window, so it passes the general
check. Two compares instead of the offset arithmetic; it fails (the general copy runs) only
where ``E`` may leave the i32 range, i.e. buffers of 2^31 elements or more.

**Which accesses, which kernels.** Global and constant accesses in the form above whose leaves
are all known (a loaded value, a phi that is not a counted loop's counter, a counter read
outside its loop's body: not proven), except those a counted loop's own per-thread version
test already proves (:func:`vxpu.ir.lower.hoist.proven_accesses`; cheaper there). The copy is
made (:func:`plan`) only when one of them lies in a counted loop — with a barrier, or, for the
exit-free copy of :meth:`vxpu.ir.lower.gpu.GpuHooks._copies`, any — so that the test is paid
once for many accesses. Where every access runs once per thread the test costs more than the
checks it removes: scan's block kernel, whose issue slots bound it, ran at 0.68 of CUDA C with
a 55-instruction test against 0.78 with its three checks (H200), and dot at 0.92 against 1.01.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llvmlite import ir
from vxpu.ir.lower.bounds import aligned, in_bounds
from vxpu.ir.lower.gpucheck import access_of
from vxpu.ir.lower.hoist import proven_accesses
from vxpu.ir.lower.versioning import find_counted_loops, invariant, latch_step, natural_loop, predecessors
from vxpu.ir.model import Block, BlockParam, Kernel, OpResult, Param, Value
from vxpu.ir.types import AddressSpace

__all__ = ["MAX_OPS", "AccessRange", "Leaves", "Loop", "RangePlan", "direct_array_accesses", "exits_before_barrier", "find_loops", "plan"]

I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)

#: Kernels with more ops than this are not analysed (compile time).
MAX_OPS = 4000
#: An access whose index expression has more nodes than this stays checked.
MAX_NODES = 64
#: Intervals are computed in i64; a node whose exact bounds could exceed this has its operands
#: tested to fit their type first (then every bound stays below 2^63).
_EXACT = 1 << 62

#: Static bounds of the geometry values (no block has more than 1024 threads).
_STATIC = {"thread_id": (0, 1023), "block_dim": (1, 1024), "block_id": (0, (1 << 31) - 1),
           "grid_dim": (1, (1 << 31) - 1)}


@dataclass(frozen=True)
class Loop:
    """A counted loop (barriers and inner loops allowed): ``j`` from ``init`` by ``step`` while
    ``j < bound`` (signed)."""

    header: Block
    iv: BlockParam
    init: Value
    bound: Value
    step: Value
    body: frozenset[int]          # id() of the loop's blocks other than the header
    barrier: bool                 # a barrier in the loop (nested loops included)


def find_loops(kernel: Kernel, order: list[Block]) -> list[Loop]:
    """The counted loops of ``kernel`` (blocks in reverse post-order ``order``)."""
    index = {id(b): i for i, b in enumerate(order)}
    preds = predecessors(order)
    out: list[Loop] = []
    for h in order:
        latches = [p for p in preds[id(h)] if index[id(p)] >= index[id(h)]]
        if latches:
            found = _match(h, natural_loop(h, latches, preds), latches, preds, order)
            if found is not None:
                out.append(found)
    return out


def _match(h: Block, loop: set[int], latches: list[Block], preds: dict[int, list[Block]],
           order: list[Block]) -> Loop | None:
    outside = [p for p in preds[id(h)] if id(p) not in loop]
    if len(outside) != 1 or outside[0].terminator is None:
        return None
    entries = [s for s in outside[0].terminator.successors if s.block is h]
    blocks = [b for b in order if id(b) in loop]
    if len(entries) != 1 or any(b is not h and any(id(p) not in loop for p in preds[id(b)]) for b in blocks):
        return None                                   # one way in, through the header
    term = h.terminator
    if term is None or term.opcode != "cbr" or len(term.successors) != 2:
        return None
    body_s, exit_s = term.successors
    if body_s.block is h or id(body_s.block) not in loop or id(exit_s.block) in loop:
        return None
    cond = term.operands[0]
    if not (isinstance(cond, OpResult) and cond.op.opcode == "icmp" and cond.op.pred == "slt"):
        return None
    iv, bound = cond.op.operands
    if not (isinstance(iv, BlockParam) and iv.block is h and _narrow(iv) and invariant(bound, loop)):
        return None
    found = latch_step(h, iv, latches, loop)
    if found is None:
        return None
    step = found[0]
    barrier = any(op.opcode == "barrier" for b in blocks for op in b.ops)
    return Loop(h, iv, entries[0].args[iv.index], bound, step, frozenset(id(b) for b in blocks if b is not h), barrier)


def _narrow(v: Value) -> bool:
    return v.type.is_int and v.type.name != "i1" and v.type.bits <= 32


@dataclass
class _Node:
    """An expression's interval: how to emit it, and what it needs."""

    op: str                                   # "leaf", "const", "add", "sub", "mul", "select", "iv"
    args: tuple[_Node, ...]
    value: Value | None
    lo: int                                   # static bounds (exact Python ints)
    hi: int
    bits: int
    ivs: frozenset[int]                       # id() of the loop counters it reads
    size: int                                 # nodes in the expression
    fit_args: bool = False                    # its operands need a run-time fit test

    def fits(self) -> bool:
        """The static bounds fit the type: no run-time test needed."""
        return -(1 << (self.bits - 1)) <= self.lo and self.hi <= (1 << (self.bits - 1)) - 1


@dataclass(frozen=True)
class AccessRange:
    """A global access proven at the entry: its parameter and its byte-offset terms."""

    param: int
    size: int
    terms: tuple[tuple[int, _Node], ...]      # (element size, index interval)


class Leaves:
    """What the entry test reads: the kernel's arguments, the geometry and the hidden bounds."""

    def __init__(self, args: list[ir.Value], geometry: Callable[[ir.IRBuilder, str, str], ir.Value],
                 bounds: dict[int, tuple[ir.Value, ir.Value]],
                 windows: dict[tuple[int, int], tuple[ir.Value, ir.Value]] | None = None) -> None:
        self.args, self.geometry, self.bounds = args, geometry, bounds
        #: (parameter, element size) -> the host-filled element window (lo, hi) (i32 values).
        self.windows = windows or {}


@dataclass
class RangePlan:
    """The accesses the range copy runs unchecked, and how to emit its entry test."""

    accesses: dict[int, AccessRange]
    loops: dict[int, Loop]                    # id(iv) -> loop
    #: (lo, hi) LLVM values of each emitted node, and the conjunction of their fit tests.
    _emitted: dict[int, tuple[ir.Value, ir.Value]] = field(default_factory=dict)
    _ok: list[ir.Value] = field(default_factory=list)
    _fitted: set[int] = field(default_factory=set)

    def emit(self, b: ir.IRBuilder, leaves: Leaves) -> ir.Value:
        """Emit the entry test at ``b``: true when every access of :attr:`accesses` is in
        bounds and aligned for every thread of the block and every iteration."""
        self._emitted, self._ok, self._fitted = {}, [], set()
        dists: dict[int, ir.Value] = {}                   # P - base per pointer parameter
        for acc in self.accesses.values():
            window = leaves.windows.get((acc.param, acc.size))
            if window is not None and all(esize % acc.size == 0 for esize, _ in acc.terms):
                # the element index E = sum (esize/size)*i_k lies in [elo, ehi] (exact in i64);
                # the window (the i32 indices the general check admits at P, an interval)
                # containing it proves every access (module docstring)
                elo: ir.Value = ir.Constant(I64, 0)
                ehi: ir.Value = ir.Constant(I64, 0)
                for esize, node in acc.terms:
                    lo, hi = self._emit(b, leaves, node)
                    self._fit(b, node, lo, hi)            # offset sign-extends its index
                    m = ir.Constant(I64, esize // acc.size)
                    elo, ehi = b.add(elo, b.mul(lo, m)), b.add(ehi, b.mul(hi, m))
                wlo, whi = (b.sext(w, I64) for w in window)
                self._ok.append(b.and_(b.icmp_signed("<=", wlo, elo), b.icmp_signed("<=", ehi, whi)))
                continue
            blo: ir.Value = ir.Constant(I64, 0)
            bhi: ir.Value = ir.Constant(I64, 0)
            for esize, node in acc.terms:
                lo, hi = self._emit(b, leaves, node)
                self._fit(b, node, lo, hi)                # offset sign-extends its index
                c = ir.Constant(I64, esize)
                blo, bhi = b.add(blo, b.mul(lo, c)), b.add(bhi, b.mul(hi, c))
            base, length = leaves.bounds[acc.param]
            dist = dists.get(acc.param)
            if dist is None:
                dist = dists[acc.param] = b.sub(b.ptrtoint(leaves.args[acc.param], I64), base)
            off_lo, off_hi = b.add(dist, blo), b.add(dist, bhi)
            # off_lo >= 0 and off_hi in bounds: every offset between them is (module docstring)
            ok = b.and_(b.icmp_signed(">=", off_lo, ir.Constant(I64, 0)), in_bounds(b, off_hi, length, acc.size))
            self._ok.append(b.and_(aligned(b, off_lo, acc.size), ok) if acc.size > 1 else ok)
        out: ir.Value = ir.Constant(I1, 1)
        for t in self._ok:
            out = b.and_(out, t)
        return out

    def _emit(self, b: ir.IRBuilder, leaves: Leaves, n: _Node) -> tuple[ir.Value, ir.Value]:
        have = self._emitted.get(id(n))
        if have is not None:
            return have
        if n.lo == n.hi and not n.ivs:                    # statically one value
            # (not below a counter: its static bounds hold only once the counter's run-time
            # tests, emitted by _iv, pass — j from 0 by p while j < 1 is 0 only for p > 0)
            c = ir.Constant(I64, n.lo)
            self._emitted[id(n)] = c, c
            return c, c
        if n.op == "leaf":
            lo, hi = self._leaf(b, leaves, n)
        elif n.op == "iv":
            lo, hi = self._iv(b, leaves, n)
        else:
            parts = [self._emit(b, leaves, a) for a in n.args]
            if n.fit_args:
                for a, (alo, ahi) in zip(n.args, parts):
                    self._fit(b, a, alo, ahi)
            lo, hi = _combine(b, n, parts)
        self._emitted[id(n)] = lo, hi
        return lo, hi

    def _fit(self, b: ir.IRBuilder, n: _Node, lo: ir.Value, hi: ir.Value) -> None:
        """Test that ``n``'s interval fits its type. The kernel computes every value mod
        2^bits, which add, sub, mul and shl respect, and a select passes one operand's value
        on, so the value it computes is congruent to one in the exact interval; if that
        interval fits the type, it is that value. Needed where a value is used as itself:
        an offset's index (sign-extended), a counter's start, bound and step."""
        if n.fits() or id(n) in self._fitted:
            return
        self._fitted.add(id(n))
        if n.lo == n.hi:                                  # statically one value, which wraps
            self._ok.append(ir.Constant(I1, 0))
            return
        top = (1 << (n.bits - 1)) - 1
        self._ok.append(b.and_(b.icmp_signed(">=", lo, ir.Constant(I64, -top - 1)),
                               b.icmp_signed("<=", hi, ir.Constant(I64, top))))

    def _leaf(self, b: ir.IRBuilder, leaves: Leaves, n: _Node) -> tuple[ir.Value, ir.Value]:
        v = n.value
        if isinstance(v, Param):
            x = b.sext(leaves.args[v.index], I64) if v.type.bits < 64 else leaves.args[v.index]
            return x, x
        assert isinstance(v, OpResult)
        dim = v.op.dim or "x"
        if v.op.opcode == "thread_id":
            size = b.zext(leaves.geometry(b, "block_dim", dim), I64)
            return ir.Constant(I64, 0), b.sub(size, ir.Constant(I64, 1))
        x = b.zext(leaves.geometry(b, v.op.opcode, dim), I64)
        return x, x

    def _iv(self, b: ir.IRBuilder, leaves: Leaves, n: _Node) -> tuple[ir.Value, ir.Value]:
        """The counter's interval in the loop body, and the no-wrap test of its increments."""
        init, bound, step = (self._emit(b, leaves, a) for a in n.args)
        for a, (alo, ahi) in zip(n.args, (init, bound, step)):
            self._fit(b, a, alo, ahi)
        top = ir.Constant(I64, (1 << (n.bits - 1)) - 1)
        one = ir.Constant(I64, 1)
        # s > 0 and n + s - 1 <= MAX: j < n, so no j + s wraps
        self._ok.append(b.and_(b.icmp_signed(">", step[0], ir.Constant(I64, 0)),
                               b.icmp_signed("<=", b.sub(b.add(bound[1], step[1]), one), top)))
        last = b.sub(bound[1], one)
        if all(_single(a) for a in n.args):
            # one counter sequence for the whole block: its last value exactly
            span = b.sub(last, init[0])
            s = b.select(b.icmp_signed(">", step[0], ir.Constant(I64, 0)), step[0], one)
            last = b.add(init[0], b.mul(b.sdiv(span, s), s))
        return init[0], last


def _single(n: _Node) -> bool:
    """The node is one value for the whole block (no thread index, no counter, no select below
    it: a select of two single values is either, its interval the hull of both)."""
    if n.lo == n.hi:
        return True
    if n.op in ("iv", "select") or (n.op == "leaf" and _ranged(n)):
        return False
    return all(_single(a) for a in n.args)


def _ranged(n: _Node) -> bool:
    return isinstance(n.value, OpResult) and n.value.op.opcode == "thread_id"


def _combine(b: ir.IRBuilder, n: _Node, parts: list[tuple[ir.Value, ir.Value]]) -> tuple[ir.Value, ir.Value]:
    if n.op == "add":
        (a0, a1), (b0, b1) = parts
        return b.add(a0, b0), b.add(a1, b1)
    if n.op == "sub":
        (a0, a1), (b0, b1) = parts
        return b.sub(a0, b1), b.sub(a1, b0)
    if n.op == "select":
        (a0, a1), (b0, b1) = parts
        return _min(b, a0, b0), _max(b, a1, b1)
    assert n.op == "mul"
    (a0, a1), (b0, b1) = parts
    x, y = n.args
    if a0 is a1 and b0 is b1:
        p = b.mul(a0, b0)
        return p, p
    if b0 is b1 or a0 is a1:                          # a range times one value
        (r0, r1), k, kn = ((a0, a1), b0, y) if b0 is b1 else ((b0, b1), a0, x)
        if kn.lo >= 0:
            return b.mul(r0, k), b.mul(r1, k)
        if kn.hi <= 0:
            return b.mul(r1, k), b.mul(r0, k)
        p0, p1 = b.mul(r0, k), b.mul(r1, k)
        return _min(b, p0, p1), _max(b, p0, p1)
    corners = [b.mul(u, v) for u in (a0, a1) for v in (b0, b1)]
    lo, hi = corners[0], corners[0]
    for c in corners[1:]:
        lo, hi = _min(b, lo, c), _max(b, hi, c)
    return lo, hi


def _min(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    return x if x is y else b.select(b.icmp_signed("<", x, y), x, y)


def _max(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    return x if x is y else b.select(b.icmp_signed(">", x, y), x, y)


class _Analysis:
    """Builds the interval nodes of a kernel's values (memoised; None: not provable)."""

    def __init__(self, loops: dict[int, Loop]) -> None:
        self.loops = loops
        self.nodes: dict[int, _Node | None] = {}
        self.busy: set[int] = set()

    def node(self, v: Value) -> _Node | None:
        key = id(v)
        if key in self.nodes:
            return self.nodes[key]
        if key in self.busy or not _narrow(v):
            return None
        self.busy.add(key)
        try:
            out = self._build(v)
        finally:
            self.busy.discard(key)
        self.nodes[key] = out if out is None or out.size <= MAX_NODES else None
        return self.nodes[key]

    def _build(self, v: Value) -> _Node | None:
        bits = v.type.bits
        full = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        if isinstance(v, Param):
            return _Node("leaf", (), v, *full, bits, frozenset(), 1)
        if isinstance(v, BlockParam):
            loop = self.loops.get(id(v))
            if loop is None:
                return None
            args = self._all((loop.init, loop.bound, loop.step))
            if args is None:
                return None
            init, bound = _clamp(args[0]), _clamp(args[1])
            lo, hi = init[0], bound[1] - 1                # the counter's own type: clamped
            ivs = frozenset({id(v)}).union(*(a.ivs for a in args))
            return _Node("iv", tuple(args), v, max(min(lo, hi), full[0]), max(lo, hi), bits, ivs,
                         1 + sum(a.size for a in args), True)
        assert isinstance(v, OpResult)
        op = v.op
        if op.opcode == "const":
            c = int(op.imm) & ((1 << bits) - 1)  # type: ignore[arg-type]
            c = c - (1 << bits) if c >> (bits - 1) else c
            return _Node("const", (), v, c, c, bits, frozenset(), 1)
        if op.opcode in _STATIC:
            lo, hi = _STATIC[op.opcode]
            return _Node("leaf", (), v, lo, hi, bits, frozenset(), 1)
        if op.opcode == "shl":
            k = self.node(op.operands[1])
            if k is None or k.lo != k.hi or not 0 <= k.lo < bits:
                return None
            a = self.node(op.operands[0])
            c = 1 << k.lo
            scale = _Node("const", (), None, c, c, 64, frozenset(), 1)
            return None if a is None else self._arith("mul", [a, scale], v)
        if op.opcode in ("add", "sub", "mul"):
            parts = self._all(op.operands)
            return None if parts is None else self._arith(op.opcode, parts, v)
        if op.opcode == "select":
            parts = self._all(op.operands[1:])
            if parts is None:
                return None
            x, y = parts
            return _Node("select", (x, y), v, min(x.lo, y.lo), max(x.hi, y.hi), bits,
                         x.ivs | y.ivs, 1 + x.size + y.size)
        return None

    def _all(self, values: Sequence[Value]) -> list[_Node] | None:
        """The nodes of ``values``, or None if one is not provable."""
        out = []
        for x in values:
            n = self.node(x)
            if n is None:
                return None
            out.append(n)
        return out

    @staticmethod
    def _arith(name: str, parts: list[_Node], v: Value) -> _Node:
        """add, sub, mul: no fit test of their own (arithmetic mod 2^bits agrees with the
        exact one, so only where a value is used as itself — an index, a select operand, a
        counter's bounds — must it fit); operands get one only where the exact i64 interval
        could leave ±2^62."""
        lo, hi = _static(name, [(p.lo, p.hi) for p in parts])
        fit_args = max(-lo, hi) > _EXACT
        if fit_args:
            lo, hi = _static(name, [_clamp(p) for p in parts])
        x, y = parts
        return _Node(name, (x, y), v, lo, hi, v.type.bits, x.ivs | y.ivs, 1 + x.size + y.size, fit_args)


def _static(name: str, rs: list[tuple[int, int]]) -> tuple[int, int]:
    (a0, a1), (b0, b1) = rs
    if name == "add":
        return a0 + b0, a1 + b1
    if name == "sub":
        return a0 - b1, a1 - b0
    corners = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
    return min(corners), max(corners)


def _clamp(n: _Node) -> tuple[int, int]:
    """``n``'s static bounds once a run-time test has checked that it fits its type."""
    lo, hi = -(1 << (n.bits - 1)), (1 << (n.bits - 1)) - 1
    return max(n.lo, lo), min(n.hi, hi)


def _chain(pv: Value, size: int) -> tuple[Param, list[tuple[int, Value]]] | None:
    """``(P, [(element size, index), ...])`` of ``offset(...offset(P, i1)..., ik)`` with ``P`` a
    global or constant pointer parameter and every element size a multiple of ``size``."""
    terms: list[tuple[int, Value]] = []
    while isinstance(pv, OpResult) and pv.op.opcode == "offset" and pv.op.type is not None:
        if pv.op.type.size % size:
            return None
        terms.append((pv.op.type.size, pv.op.operands[1]))
        pv = pv.op.operands[0]
    if not (isinstance(pv, Param) and pv.type.space in (AddressSpace.GLOBAL, AddressSpace.CONSTANT)) or not terms:
        return None
    return pv, terms


def plan(kernel: Kernel, order: list[Block], every: bool = False) -> RangePlan | None:
    """The range copy of ``kernel`` (``order``: its blocks in reverse post-order), or None when
    it proves nothing or does not pay: no proven access lies in a counted loop with a barrier.
    ``every``: also the accesses a counted loop's own version test proves, and it pays when a
    proven access lies in any counted loop (the caller then also requires the fast copy to be
    free of checks before barriers, :func:`exits_before_barrier`)."""
    if sum(len(b.ops) for b in kernel.blocks) > MAX_OPS:
        return None
    loops = {id(lp.iv): lp for lp in find_loops(kernel, order)}
    per_thread: set[int] = set()
    for cl in () if every else find_counted_loops(kernel, order):
        per_thread.update(proven_accesses(cl))
    analysis = _Analysis(loops)
    accesses: dict[int, AccessRange] = {}
    pays = False
    for blk in order:
        inside = {key for key, lp in loops.items() if id(blk) in lp.body}
        for op in blk.ops:
            acc = access_of(op)
            if acc is None or id(op) in per_thread:
                continue
            chain = _chain(*acc)
            if chain is None:
                continue
            nodes = [analysis.node(i) for _, i in chain[1]]
            if any(n is None or not n.ivs <= inside for n in nodes):
                continue
            accesses[id(op)] = AccessRange(chain[0].index, acc[1],
                                           tuple((s, n) for (s, _), n in zip(chain[1], nodes)))  # type: ignore[misc]
            pays = pays or any(every or loops[k].barrier for k in inside)
    if not accesses or not pays:
        return None
    return RangePlan(accesses, loops)


def direct_array_accesses(kernel: Kernel) -> set[int]:
    """id() of the accesses at a shared or local array's start (``load (shared_addr @a)``) no
    larger than the array: always in bounds and aligned (arrays are 16-aligned)."""
    out: set[int] = set()
    for blk in kernel.blocks:
        for op in blk.ops:
            acc = access_of(op)
            if acc is not None and isinstance(acc[0], OpResult) and acc[0].op.opcode in ("shared_addr", "local_addr"):
                arr = acc[0].op.array
                if arr is not None and acc[1] <= min(arr.size, 16):
                    out.add(id(op))
    return out


def exits_before_barrier(kernel: Kernel, proven: set[int]) -> bool:
    """Whether a check that stays in a copy running the accesses ``proven`` unchecked (or a
    ``trap``) can be followed by a barrier: its fault exit then makes ptxas wrap that barrier in
    convergence code."""
    has = {id(b): any(op.opcode == "barrier" for op in b.ops) for b in kernel.blocks}
    reach = {id(b): False for b in kernel.blocks}        # a barrier in a successor, transitively
    changed = True
    while changed:
        changed = False
        for b in kernel.blocks:
            r = any(has[id(s)] or reach[id(s)] for s in b.successor_blocks())
            if r and not reach[id(b)]:
                reach[id(b)] = changed = True
    for b in kernel.blocks:
        later = reach[id(b)]
        for op in reversed(b.ops):
            if op.opcode == "barrier":
                later = True
            elif later and (op.opcode == "trap" or (access_of(op) is not None and id(op) not in proven)):
                return True
    return False
