"""Loop-invariant code motion: hoist pure ops out of natural loops into a preheader.

A back edge is an edge ``B -> H`` where ``H`` dominates ``B``; the natural loop of header ``H``
is ``H`` plus every block that reaches a back-edge source without passing ``H``. Loops are
processed innermost first (smaller before larger), so an op can climb several levels over
successive loops.

The **preheader** is the one block outside the loop that jumps to ``H``: an existing
predecessor is reused when it is the only outside one and ends in ``br H``; otherwise a new
block with ``H``'s parameter types is inserted and every outside edge is redirected to it.

An op is hoisted when it is pure (no side effects, no memory access: pure ops never fault, so
running them speculatively is safe; division by zero is defined) and each operand is defined
outside the loop or by an op already hoisted. Ops are visited in reverse post-order so chains
of invariant ops move together, keeping their order. Loads are never hoisted (a store in the
loop could alias them), nor are stores, atomics or barriers.
"""

from __future__ import annotations

from ..model import Block, Kernel, Op, Successor
from ..verify import Dominators
from .util import incoming_edges, unique_block_name

__all__ = ["natural_loops", "run"]


def natural_loops(kernel: Kernel) -> list[tuple[Block, list[Block]]]:
    """``(header, blocks)`` for every natural loop (loops sharing a header merged), smallest
    first; ``blocks`` are in reverse post-order, header first."""
    dom = Dominators(kernel)
    rpo = {id(b): i for i, b in enumerate(dom.order)}
    preds: dict[int, list[Block]] = {}
    for b in dom.order:
        for s in b.successor_blocks():
            preds.setdefault(id(s), []).append(b)
    bodies: dict[int, tuple[Block, set[int]]] = {}
    for b in dom.order:
        for h in b.successor_blocks():
            if not dom.dominates(h, b):
                continue
            header, body = bodies.setdefault(id(h), (h, {id(h)}))
            work = [b]
            while work:
                x = work.pop()
                if id(x) in body:
                    continue
                body.add(id(x))
                work.extend(p for p in preds.get(id(x), []) if id(p) in rpo)
    loops = []
    for header, body in bodies.values():
        blocks = sorted((b for b in dom.order if id(b) in body), key=lambda b: rpo[id(b)])
        loops.append((header, blocks))
    loops.sort(key=lambda hb: len(hb[1]))
    return loops


def run(kernel: Kernel) -> bool:
    """Hoist loop-invariant pure ops. Returns True if anything changed."""
    changed = False
    for header, _ in natural_loops(kernel):
        # Recompute the body: earlier loops may have added preheaders inside this one.
        loop = next((blocks for h, blocks in natural_loops(kernel) if h is header), None)
        if loop is None:
            continue
        changed |= _hoist(kernel, header, loop)
    return changed


def _invariant_ops(loop: list[Block]) -> list[Op]:
    inside: set[int] = set()
    for b in loop:
        inside.update(id(p) for p in b.params)
        inside.update(id(op.result) for op in b.ops if op.result is not None)
    hoist: list[Op] = []
    for b in loop:
        for op in b.ops:
            if not op.defn.pure or op.result is None:
                continue
            if all(id(v) not in inside for v in op.operands):
                hoist.append(op)
                inside.discard(id(op.result))
    return hoist


def _hoist(kernel: Kernel, header: Block, loop: list[Block]) -> bool:
    ops = _invariant_ops(loop)
    if not ops:
        return False
    pre = _preheader(kernel, header, {id(b) for b in loop})
    term = pre.ops.pop()
    hoisted = {id(op) for op in ops}
    for b in loop:
        b.ops = [op for op in b.ops if id(op) not in hoisted]
    for op in ops:
        op.block = pre
        pre.ops.append(op)
    pre.ops.append(term)
    return True


def _preheader(kernel: Kernel, header: Block, body: set[int]) -> Block:
    outside = [(t, i) for t, i in incoming_edges(kernel).get(id(header), []) if id(t.block) not in body]
    if len(outside) == 1:
        term, _ = outside[0]
        if term.opcode == "br" and term.block is not None:
            return term.block
    pre = Block(unique_block_name(kernel, f"{header.name or 'loop'}.preheader"))
    for p in header.params:
        pre.add_param(p.type)
    pre.kernel = kernel
    kernel.blocks.insert(kernel.blocks.index(header), pre)
    br = Op("br", successors=[Successor(header, list(pre.params))])
    pre.append(br)
    for term, i in outside:
        term.successors[i] = Successor(pre, term.successors[i].args)
    return pre

