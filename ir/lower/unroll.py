"""Unroll by 2 the GPU barrier loops whose counter doubles or halves (``d <<= 1``, ``s >>= 1``).

Such a loop runs log2(block size) times, unknown at compile time, and holds a barrier: LLVM
will not unroll it (a convergent operation forbids the runtime remainder; asked with
``llvm.loop.unroll.count``, it reports "loop not unrolled"), and ptxas cannot count it either.
This pass writes the loop twice in a row *with the exit test in each copy*, so it is exact for
every trip count, odd, even or zero: the header ``H`` exits or runs the body, whose back edges
now go to the copy ``H'``, which exits or runs the copied body, whose back edges go back to
``H``. Values that alternate between iterations (scan's buffer half ``src``) are then constants
in each copy. Scan's level loop: 15 SASS instructions per level → 25 per two levels.

A loop qualifies when: its header ends in ``cbr`` with exactly one edge leaving the loop and no
other block of the loop leaves it; it has no inner loop and no entry but the header; it holds a
``barrier``; the header's condition compares a header parameter whose every back-edge value is
``shl``/``lshr`` of it by a constant (the doubling/halving counter); another header parameter
alternates (``c - p`` or ``p ^ c`` on every back edge: what the unrolling makes constant; dot's
and softmax's reductions have none, and unrolled they took more instructions per step, 11 and
16.5 against 10 and 15); the exit block's only
predecessor is the header; it has at most :data:`MAX_OPS` ops. Header values used after the loop
become parameters of the exit block (each exit passes its copy's value).
"""

from __future__ import annotations

from vxpu.ir.lower.common import reverse_postorder
from vxpu.ir.lower.versioning import natural_loop, predecessors
from vxpu.ir.model import Block, BlockParam, Kernel, Module, Op, OpResult, Successor, Value
from vxpu.ir.passes.util import clone_module, unique_block_name

__all__ = ["MAX_OPS", "shift_loops", "unroll_shift_loops"]

#: Loops with more ops than this are left alone (code size).
MAX_OPS = 200


def shift_loops(kernel: Kernel) -> list[tuple[Block, list[Block], Block]]:
    """``(header, loop blocks in order, exit)`` of every loop of ``kernel`` that qualifies."""
    order = reverse_postorder(kernel)
    index = {id(b): i for i, b in enumerate(order)}
    preds = predecessors(order)
    found = []
    for h in order:
        latches = [p for p in preds[id(h)] if index[id(p)] >= index[id(h)]]
        if not latches:
            continue
        loop = natural_loop(h, latches, preds)
        blocks = [b for b in order if id(b) in loop]
        exit_ = _qualifies(h, blocks, loop, latches, preds, index)
        if exit_ is not None:
            found.append((h, blocks, exit_))
    return found


def _qualifies(h: Block, blocks: list[Block], loop: set[int], latches: list[Block],
               preds: dict[int, list[Block]], index: dict[int, int]) -> Block | None:
    if sum(len(b.ops) for b in blocks) > MAX_OPS or not any(op.opcode == "barrier" for b in blocks for op in b.ops):
        return None
    for b in blocks:
        if b is not h and any(id(p) not in loop or index[id(p)] >= index[id(b)] for p in preds[id(b)]):
            return None                          # a second entry or an inner loop
        if b is not h and any(id(s) not in loop for s in b.successor_blocks()):
            return None                          # an exit from the body
    term = h.terminator
    if term is None or term.opcode != "cbr" or len(term.successors) != 2:
        return None
    outside = [s.block for s in term.successors if id(s.block) not in loop]
    if len(outside) != 1 or len(preds[id(outside[0])]) != 1 or term.successors[0].block is term.successors[1].block:
        return None
    cond = term.operands[0]
    if not (isinstance(cond, OpResult) and cond.op.opcode == "icmp" and cond.op.block is h):
        return None
    if not any(_alternates(q, h, latches) for q in h.params):
        return None
    for v in cond.op.operands:
        if isinstance(v, BlockParam) and v.block is h and _shifted(v, h, latches):
            return outside[0]
    return None


def _next_values(p: BlockParam, h: Block, latches: list[Block]) -> list[Value]:
    out = []
    for latch in latches:
        lt = latch.terminator
        assert lt is not None
        out += [s.args[p.index] for s in lt.successors if s.block is h]
    return out


def _const(v: Value) -> bool:
    return isinstance(v, OpResult) and v.op.opcode == "const"


def _alternates(p: BlockParam, h: Block, latches: list[Block]) -> bool:
    """Every back edge passes ``sub c, p`` or ``xor p, c`` (c a constant) for ``p``: its values
    alternate, so each copy of the unrolled loop sees one constant offset of the entry value."""
    nexts = _next_values(p, h, latches)
    return bool(nexts) and all(
        isinstance(n, OpResult) and (
            (n.op.opcode == "sub" and _const(n.op.operands[0]) and n.op.operands[1] is p)
            or (n.op.opcode == "xor" and p in n.op.operands and any(_const(x) for x in n.op.operands)))
        for n in nexts)


def _shifted(p: BlockParam, h: Block, latches: list[Block]) -> bool:
    """Every back edge passes ``shl|lshr p, const`` for ``p``."""
    nexts = _next_values(p, h, latches)
    return bool(nexts) and all(isinstance(n, OpResult) and n.op.opcode in ("shl", "lshr")
                               and n.op.operands[0] is p and _const(n.op.operands[1]) for n in nexts)


def unroll_shift_loops(kernel: Kernel) -> Kernel:
    """``kernel``, or a copy with every qualifying loop unrolled by 2 (the exit test in each copy)."""
    if not shift_loops(kernel):
        return kernel
    k = clone_module(Module("unroll", [kernel])).kernels[0]
    for h, blocks, exit_ in shift_loops(k):
        _unroll(k, h, blocks, exit_)
    return k


def _unroll(k: Kernel, h: Block, blocks: list[Block], exit_: Block) -> None:
    inside = {id(b) for b in blocks}
    vmap: dict[Value, Value] = {}
    bmap: dict[int, Block] = {}
    for b in blocks:
        nb = Block(unique_block_name(k, f"{b.name or 'b'}.u2"))
        for bp in b.params:
            vmap[bp] = nb.add_param(bp.type)          # unnamed: value names are unique
        bmap[id(b)] = nb
        k.add_block(nb)
    for b in blocks:
        for op in b.ops:
            copy = Op(op.opcode, [], type=op.type, pred=op.pred, dim=op.dim, array=op.array, imm=op.imm,
                      result_type=op.result.type if op.result is not None else None,
                      loc=op.loc)
            if op.result is not None and copy.result is not None:
                vmap[op.result] = copy.result
            bmap[id(b)].append(copy)
    for b in blocks:
        for op, copy in zip(b.ops, bmap[id(b)].ops):
            copy.operands = [vmap.get(v, v) for v in op.operands]
            # the copy's back edges return to the original header; its exit leaves as the header's
            copy.successors = [Successor(bmap[id(s.block)] if id(s.block) in inside and s.block is not h else s.block,
                                         [vmap.get(a, a) for a in s.args]) for s in op.successors]
    for b in blocks:                            # the original back edges go to the copy
        term = b.terminator
        assert term is not None
        for s in term.successors:
            if s.block is h:                    # (from inside the loop every edge to h is a back edge)
                s.block = bmap[id(h)]
    # header values used after the loop: parameters of the exit block, one per value
    defined = [*h.params, *(op.result for op in h.ops if op.result is not None)]
    copies = {id(b) for b in bmap.values()}
    outside_ops = [op for b in k.blocks if id(b) not in inside and id(b) not in copies for op in b.ops]
    for v in defined:
        if not any(v in op.uses() for op in outside_ops):
            continue
        param = exit_.add_param(v.type)
        for op in outside_ops:
            op.operands = [param if x is v else x for x in op.operands]
            for s in op.successors:
                s.args = tuple(param if x is v else x for x in s.args)
        for head, val in ((h, v), (bmap[id(h)], vmap[v])):
            term = head.terminator
            assert term is not None
            for s in term.successors:
                if s.block is exit_:
                    s.args = (*s.args, val)
