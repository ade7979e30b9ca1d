"""Loop versioning for counted loops whose induction variable wraps in the IR.

IR integers wrap, so LLVM may not assume ``j + step`` does not overflow, cannot compute the
trip count of ``for (j = j0; j < n; j += step)`` when ``step`` is a run-time value, and so does
not unroll it (on GPUs that costs memory-level parallelism: softmax ran at 0.73 of CUDA C).
This module finds such loops; the lowering then emits them twice and picks a copy at run time:

* the preheader checks ``step > 0`` and ``n + step - 1`` fits the type (signed for ``slt``,
  unsigned for ``ult``, computed without overflow);
* if it holds, no ``j + step`` inside the loop can overflow — every increment runs after the
  header saw ``j < n`` — so the fast copy marks the increments ``nsw``/``nuw`` (a true fact, not
  an assumption) and asks for unrolling by 4;
* otherwise the original loop runs, wrapping as the IR says.

Only simple innermost loops qualify: one header that is the only exit (``cbr (icmp slt|ult j,
n), body, exit`` with the body on the true edge), one entry edge, an exit block whose only
predecessor is the header, no barriers, and back edges that all pass ``add j, step`` for ``j``
with ``n`` and ``step`` defined outside the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llvmlite import ir
from vxpu.ir.model import Block, BlockParam, Kernel, Op, OpResult, Value


@dataclass
class CountedLoop:
    """A loop the lowering emits in two versions."""

    header: Block
    blocks: list[Block]            # header first, then the body in reverse post-order
    preheader: Block
    exit: Block
    iv: BlockParam
    bound: Value
    step: Value
    signed: bool
    increments: set[int] = field(default_factory=set)   # id() of the add ops to mark
    escaping: list[Value] = field(default_factory=list)  # header values used after the loop


def predecessors(order: list[Block]) -> dict[int, list[Block]]:
    """Each block's predecessors in ``order``, keyed by ``id(block)``."""
    preds: dict[int, list[Block]] = {id(b): [] for b in order}
    for b in order:
        for s in b.successor_blocks():
            if id(s) in preds:
                preds[id(s)].append(b)
    return preds


def natural_loop(header: Block, latches: list[Block], preds: dict[int, list[Block]]) -> set[int]:
    """The ``id``s of the blocks of the natural loop of ``header`` with back edges from ``latches``."""
    body = {id(header)}
    stack = [b for b in latches if id(b) != id(header)]
    for b in stack:
        body.add(id(b))
    while stack:
        b = stack.pop()
        for p in preds[id(b)]:
            if id(p) not in body:
                body.add(id(p))
                stack.append(p)
    return body


def invariant(v: Value, loop: set[int]) -> bool:
    """Is ``v`` defined outside ``loop`` (block ``id``s), so the same on every iteration?"""
    if isinstance(v, OpResult):
        return v.op.block is not None and id(v.op.block) not in loop
    if isinstance(v, BlockParam):
        return id(v.block) not in loop
    return True  # kernel parameters


def latch_step(h: Block, iv: BlockParam, latches: list[Block], loop: set[int]) -> tuple[Value, list[Op]] | None:
    """``(s, adds)`` when every back edge of ``loop`` (header ``h``, blocks ``loop``) passes
    ``add iv, s`` (either operand order; the add inside the loop) as ``iv``'s next value, with
    one ``s`` defined outside the loop; ``adds`` are those add ops. None otherwise."""
    step: Value | None = None
    adds: list[Op] = []
    for latch in latches:
        lt = latch.terminator
        if lt is None:
            return None
        for succ in lt.successors:
            if succ.block is not h:
                continue
            nxt = succ.args[iv.index]
            if not isinstance(nxt, OpResult) or nxt.op.opcode != "add" or nxt.op.block is None \
                    or id(nxt.op.block) not in loop:
                return None
            a, c = nxt.op.operands
            other = c if a is iv else a if c is iv else None
            if other is None or not invariant(other, loop) or (step is not None and other is not step):
                return None
            step = other
            adds.append(nxt.op)
    return None if step is None else (step, adds)


def find_counted_loops(kernel: Kernel, order: list[Block]) -> list[CountedLoop]:
    """Every loop of ``kernel`` (blocks in reverse post-order ``order``) that can be versioned."""
    index = {id(b): i for i, b in enumerate(order)}
    preds = predecessors(order)
    found: list[CountedLoop] = []
    for h in order:
        latches = [p for p in preds[id(h)] if index[id(p)] >= index[id(h)]]
        if not latches:
            continue
        loop = natural_loop(h, latches, preds)
        cl = _match(h, loop, latches, preds, index, order)
        if cl is not None:
            found.append(cl)
    return found


def _match(h: Block, loop: set[int], latches: list[Block], preds: dict[int, list[Block]],
           index: dict[int, int], order: list[Block]) -> CountedLoop | None:
    blocks = [b for b in order if id(b) in loop]
    outside_preds = [p for p in preds[id(h)] if id(p) not in loop]
    if len(outside_preds) != 1 or any(op.opcode == "barrier" for b in blocks for op in b.ops):
        return None
    if sum(1 for s in outside_preds[0].successor_blocks() if s is h) != 1:
        return None
    for b in blocks:  # entered only through the header; innermost; exits only from the header
        if b is not h and any(id(p) not in loop for p in preds[id(b)]):
            return None
        for s in b.successor_blocks():
            if id(s) == id(h) and b not in latches:
                return None
            if id(s) not in loop and b is not h:
                return None
            if id(s) in loop and id(s) != id(h) and index[id(s)] <= index[id(b)]:
                return None
    term = h.terminator
    if term is None or term.opcode != "cbr" or len(term.successors) != 2:
        return None
    body_s, exit_s = term.successors
    if id(body_s.block) not in loop or id(exit_s.block) in loop or len(preds[id(exit_s.block)]) != 1:
        return None
    cond = term.operands[0]
    if not isinstance(cond, OpResult) or cond.op.block is not h or cond.op.opcode != "icmp":
        return None
    cmp: Op = cond.op
    if cmp.pred not in ("slt", "ult") or not isinstance(cmp.operands[0], BlockParam):
        return None
    iv, bound = cmp.operands
    if not isinstance(iv, BlockParam) or iv.block is not h or iv.type.name not in ("i8", "i16", "i32", "i64") \
            or not invariant(bound, loop):
        return None
    cl = CountedLoop(h, blocks, outside_preds[0], exit_s.block, iv, bound, bound, cmp.pred == "slt")
    found = latch_step(h, iv, latches, loop)
    if found is None:
        return None
    cl.step, adds = found
    cl.increments.update(id(op) for op in adds)
    cl.escaping = _escaping(h, loop, order)
    return cl


def _escaping(h: Block, loop: set[int], order: list[Block]) -> list[Value]:
    defined = set(h.params) | {op.result for op in h.ops if op.result is not None}
    used: list[Value] = []
    for b in order:
        if id(b) in loop:
            continue
        for op in b.ops:
            for v in op.uses():
                if v in defined and v not in used:
                    used.append(v)
    return used


#: Unroll factor requested for the no-wrap copy of a counted loop.
UNROLL_COUNT = 4


class _LoopID(ir.values.MDValue):
    """``distinct !{!self, ...}``: a loop ID (llvmlite cannot print self-referential nodes)."""

    def descr(self, buf: list[str]) -> None:
        ops = ", ".join(op.get_reference() for op in self.operands)
        buf += (f"distinct !{{ {ops} }}", "\n")


def loop_id(module: ir.Module, unroll_count: int) -> ir.values.MDValue:
    """A fresh loop ID asking for unrolling by ``unroll_count``."""
    opt = module.add_metadata(["llvm.loop.unroll.count", ir.Constant(ir.IntType(32), unroll_count)])
    md = _LoopID(module, [], name=str(len(module.metadata)))
    md.operands = (md, opt)
    return md
