"""Complexity measures of a kernel's control flow that bound how long LLVM takes on it.

The verifier refuses a kernel past these limits (``vxpu.ir.limits``) before anything compiles
it, the way eBPF's verifier bounds a program before its JIT runs: LLVM's loop passes are
super-linear in the loop nest depth (a 128-deep nest takes over a second, a 2000-deep one
crashed the optimiser with SIGSEGV), and every incoming edge of a block with parameters
becomes one operand of each of its phi nodes.

* :func:`loop_nest_depth` — the deepest nesting of natural loops, found like LLVM's
  ``LoopInfo``: headers are blocks that dominate one of their predecessors (a back edge); the
  headers are visited innermost first (reverse of reverse post-order), each loop's body is
  found by walking predecessors back from its latches, and an inner loop already found is
  collapsed into its header with a union-find, so the whole walk is near-linear in edges.
  Retreating edges into a header that does not dominate them (irreducible control flow) make
  no natural loop, as in LLVM.
* :func:`phi_fan_in` — the most branch edges into one block that has parameters.

Both take the kernel's :class:`~vxpu.ir.verify.Dominators` (reachable blocks only) and never
recurse.
"""

from __future__ import annotations

from typing import Protocol

from .model import Block, Kernel

__all__ = ["DominatorQuery", "loop_nest_depth", "phi_fan_in"]


class DominatorQuery(Protocol):
    """What the measures need from :class:`vxpu.ir.verify.Dominators`."""

    order: list[Block]

    def dominates(self, a: Block, b: Block) -> bool: ...


def loop_nest_depth(dom: DominatorQuery) -> int:
    """The deepest nesting of natural loops among the reachable blocks (0: no loop).

    Args:
        dom: the kernel's dominators (its ``order`` is the reverse post-order of reachable blocks).
    """
    order = dom.order
    index = {id(b): i for i, b in enumerate(order)}
    preds: list[list[int]] = [[] for _ in order]
    for i, b in enumerate(order):
        for s in b.successor_blocks():
            j = index.get(id(s))
            if j is not None:
                preds[j].append(i)
    latches: dict[int, list[int]] = {}
    for h, block in enumerate(order):
        back = [p for p in preds[h] if dom.dominates(block, order[p])]
        if back:
            latches[h] = back
    rep = list(range(len(order)))

    def find(x: int) -> int:
        root = x
        while rep[root] != root:
            root = rep[root]
        while rep[x] != root:
            rep[x], x = root, rep[x]
        return root

    parent: dict[int, int] = {}
    for h in sorted(latches, reverse=True):            # inner headers come later in RPO
        header = order[h]
        seen = {h}
        work = list(latches[h])
        while work:
            x = find(work.pop())
            if x in seen or not dom.dominates(header, order[x]):
                continue
            seen.add(x)
            if x in latches and x not in parent:       # an inner loop: nest it, collapse it
                parent[x] = h
            rep[x] = h
            work.extend(preds[x])
    depth: dict[int, int] = {}
    deepest = 0
    for h in sorted(latches):                          # outer headers first
        depth[h] = depth.get(parent.get(h, -1), 0) + 1
        deepest = max(deepest, depth[h])
    return deepest


def phi_fan_in(kernel: Kernel) -> tuple[int, Block | None]:
    """The most branch edges into one block with parameters, and that block (``None`` if none)."""
    counts: dict[int, int] = {}
    for b in kernel.blocks:
        for s in b.successor_blocks():
            if s.params:
                counts[id(s)] = counts.get(id(s), 0) + 1
    if not counts:
        return 0, None
    worst = max(counts, key=counts.__getitem__)
    block = next(b for b in kernel.blocks if id(b) == worst)
    return counts[worst], block
