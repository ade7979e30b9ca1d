"""Control-flow simplification.

Repeated until nothing changes (bounded):

1. ``cbr`` on a constant condition becomes a ``br`` to the taken successor; a ``cbr`` whose two
   successors are the same block with the same arguments becomes a ``br``.
2. Blocks unreachable from the entry are deleted (the verifier rejects them).
3. A block parameter that receives one and the same value on every incoming edge (ignoring
   edges that pass the parameter itself) is replaced by that value and removed.
4. A block ``B`` whose only op is ``br C(args)`` is bypassed: each predecessor jumps to ``C``
   directly with the arguments substituted (not when that would give a ``cbr`` two edges to
   the same block, and not when ``B``'s parameters are used elsewhere).
5. A block with exactly one incoming edge, from a ``br``, is merged into its predecessor (its
   parameters become the branch arguments).

Barriers are ordinary ops here: merging blocks never moves an op across a barrier or changes
which threads execute it.
"""

from __future__ import annotations

from ..model import Block, Kernel, Op, Successor, Value
from ..ops import OPS
from ..verify import Dominators
from .util import const_value, incoming_edges, remove_block_params, replace_uses, resolve

__all__ = ["run"]


def run(kernel: Kernel) -> bool:
    """Simplify the CFG of ``kernel``. Returns True if anything changed."""
    changed = False
    for _ in range(4 * len(kernel.blocks) + 8):
        step = _fold_branches(kernel)
        step |= _remove_unreachable(kernel)
        step |= _uniform_params(kernel)
        step |= _forward_empty_blocks(kernel)
        step |= _remove_unreachable(kernel)
        step |= _merge_blocks(kernel)
        if not step:
            break
        changed = True
    return changed


def _to_br(term: Op, succ_index: int) -> None:
    """Rewrite a ``cbr`` in place into ``br`` to its successor ``succ_index``."""
    keep = term.successors[succ_index]
    term.opcode = "br"
    term.defn = OPS["br"]
    term.operands = []
    term.successors = [keep]


def _fold_branches(kernel: Kernel) -> bool:
    changed = False
    for b in kernel.blocks:
        term = b.terminator
        if term is None or term.opcode != "cbr":
            continue
        c = const_value(term.operands[0])
        t, f = term.successors
        if c is not None:
            _to_br(term, 0 if c else 1)
            changed = True
        elif t.block is f.block and t.args == f.args:
            _to_br(term, 0)
            changed = True
    return changed


def _remove_unreachable(kernel: Kernel) -> bool:
    if not kernel.blocks:
        return False
    dom_order = Dominators(kernel).order
    reachable = {id(b) for b in dom_order}
    if len(reachable) == len(kernel.blocks):
        return False
    kernel.blocks = [b for b in kernel.blocks if id(b) in reachable]
    return True


def _uniform_params(kernel: Kernel) -> bool:
    edges = incoming_edges(kernel)
    mapping: dict[Value, Value] = {}
    for b in kernel.blocks[1:]:
        incoming = edges.get(id(b), [])
        dead: set[int] = set()
        for p in b.params:
            values = {id(a): a for a in (resolve(mapping, term.successors[i].args[p.index])
                                         for term, i in incoming) if a is not p}
            if len(values) == 1:
                mapping[p] = next(iter(values.values()))
                dead.add(p.index)
        if dead:
            remove_block_params(b, dead, incoming)
    return replace_uses(kernel, mapping) or bool(mapping)


def _forward_empty_blocks(kernel: Kernel) -> bool:
    edges = incoming_edges(kernel)
    uses: dict[int, int] = {}
    for op in kernel.ops():
        for v in op.uses():
            uses[id(v)] = uses.get(id(v), 0) + 1
    changed = False
    for b in kernel.blocks[1:]:
        if len(b.ops) != 1 or b.ops[0].opcode != "br":
            continue
        out = b.ops[0].successors[0]
        if out.block is b:
            continue
        local = {id(p): p.index for p in b.params}
        own_uses = sum(1 for a in out.args if id(a) in local)
        if sum(uses.get(id(p), 0) for p in b.params) != own_uses:
            continue                        # a parameter is used beyond this br: keep the block
        for term, i in list(edges.get(id(b), [])):
            if term.block is b or _would_duplicate(term, i, out.block):
                continue
            passed = term.successors[i].args
            args = [passed[local[id(a)]] if id(a) in local else a for a in out.args]
            term.successors[i] = Successor(out.block, args)
            edges[id(b)].remove((term, i))
            edges.setdefault(id(out.block), []).append((term, i))
            for a in args:
                uses[id(a)] = uses.get(id(a), 0) + 1
            changed = True
    return changed


def _would_duplicate(term: Op, index: int, target: Block) -> bool:
    """True if redirecting successor ``index`` of ``term`` to ``target`` gives a cbr two edges
    to the same block (lowerings to phi nodes cannot express that with different values)."""
    return any(j != index and s.block is target for j, s in enumerate(term.successors))


def _merge_blocks(kernel: Kernel) -> bool:
    edges = incoming_edges(kernel)
    mapping: dict[Value, Value] = {}
    removed: set[int] = set()
    for b in kernel.blocks[1:]:
        incoming = edges.get(id(b), [])
        if len(incoming) != 1:
            continue
        term, _ = incoming[0]
        pred = term.block
        if term.opcode != "br" or pred is b or pred is None:
            continue
        for p, a in zip(b.params, term.successors[0].args):
            mapping[p] = a
        pred.ops.pop()                      # the br; b's ops (and terminator) follow
        for op in b.ops:
            op.block = pred
            pred.ops.append(op)
        b.ops = []
        b.params = []
        removed.add(id(b))
    if not removed:
        return False
    kernel.blocks = [b for b in kernel.blocks if id(b) not in removed]
    replace_uses(kernel, mapping)
    return True
