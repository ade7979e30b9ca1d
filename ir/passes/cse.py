"""Common subexpression elimination over the dominator tree.

**Pure ops** (no side effects, no memory access: arithmetic, comparisons, conversions,
``const``, geometry, ``offset``, ``shared_addr`` ...) are keyed by opcode, annotation,
attributes, immediate (floats by bit pattern, so ``-0.0`` and ``0.0`` stay apart) and
operands (sorted for commutative ops). Walking the dominator tree in pre-order with a scoped
table, an op whose key is already available from a dominating op is replaced by it and deleted.

**Loads** are merged only within one block, and only while no op that may write memory or has
side effects (store, atomic, barrier, trap) lies between the two loads: the second load of the
same type through the same pointer value then reads what the first one read. Nothing is ever
merged across a store, a barrier or an atomic, and loads never move.
"""

from __future__ import annotations

from ..model import Block, Kernel, Op, Value
from ..verify import Dominators
from .util import op_key_imm, replace_uses, resolve

__all__ = ["run"]


def run(kernel: Kernel) -> bool:
    """Merge identical computations. Returns True if anything changed."""
    dom = Dominators(kernel)
    children: dict[int, list[Block]] = {}
    for b in dom.order[1:]:
        children.setdefault(id(dom.idom[id(b)]), []).append(b)
    mapping: dict[Value, Value] = {}
    table: dict[tuple[object, ...], Value] = {}
    dead: set[int] = set()
    stack: list[tuple[Block, list[tuple[object, ...]] | None]] = [(dom.order[0], None)] if dom.order else []
    while stack:
        block, added = stack.pop()
        if added is not None:              # leaving the block's subtree: drop its entries
            for key in added:
                del table[key]
            continue
        added = _visit(block, table, mapping, dead)
        stack.append((block, added))
        for child in reversed(children.get(id(block), [])):
            stack.append((child, None))
    if not mapping:
        return False
    for b in kernel.blocks:
        b.ops = [op for op in b.ops if id(op) not in dead]
    replace_uses(kernel, mapping)
    return True


def _visit(block: Block, table: dict[tuple[object, ...], Value], mapping: dict[Value, Value],
           dead: set[int]) -> list[tuple[object, ...]]:
    added: list[tuple[object, ...]] = []
    loads: dict[tuple[object, ...], Value] = {}
    for op in block.ops:
        if op.opcode == "load" and op.result is not None:
            lkey: tuple[object, ...] = ("load", op.type, id(resolve(mapping, op.operands[0])))
            prev = loads.get(lkey)
            if prev is not None:
                mapping[op.result] = prev
                dead.add(id(op))
            else:
                loads[lkey] = op.result
            continue
        if op.defn.writes_memory or op.defn.side_effects:
            loads.clear()
            continue
        if not op.defn.pure or op.result is None:
            continue
        key = _key(op, mapping)
        prev = table.get(key)
        if prev is not None:
            mapping[op.result] = prev
            dead.add(id(op))
        else:
            table[key] = op.result
            added.append(key)
    return added


def _key(op: Op, mapping: dict[Value, Value]) -> tuple[object, ...]:
    operands = [id(resolve(mapping, v)) for v in op.operands]
    if op.defn.commutative:
        operands.sort()
    array = id(op.array) if op.array is not None else None
    return (op.opcode, op.type, op.pred, op.dim, array, op_key_imm(op), op.result.type if op.result else None,
            tuple(operands))
