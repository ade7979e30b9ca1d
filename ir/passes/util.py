"""Shared helpers of the passes: CFG edges, use counts, value replacement, cloning, constants.

The passes keep values' identity: they rewrite operand lists and successor arguments, move ops
between blocks and delete ops, but a value that survives is the same Python object.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..model import (
    Block,
    Kernel,
    LocalArray,
    Module,
    Op,
    OpResult,
    Param,
    SharedArray,
    Successor,
    Value,
    float_bits,
    normalize_imm,
)
from ..ops import OPS

__all__ = [
    "clone_module",
    "const_value",
    "incoming_edges",
    "make_const",
    "op_key_imm",
    "remove_block_params",
    "replace_uses",
    "resolve",
    "unique_block_name",
    "use_counts",
]


def incoming_edges(kernel: Kernel) -> dict[int, list[tuple[Op, int]]]:
    """For each block (by id): the (terminator, successor index) pairs that jump to it."""
    edges: dict[int, list[tuple[Op, int]]] = {id(b): [] for b in kernel.blocks}
    for b in kernel.blocks:
        term = b.terminator
        if term is None:
            continue
        for i, s in enumerate(term.successors):
            edges.setdefault(id(s.block), []).append((term, i))
    return edges


def use_counts(kernel: Kernel) -> dict[Value, int]:
    """How often each value is used (operands and successor arguments)."""
    counts: dict[Value, int] = {}
    for op in kernel.ops():
        for v in op.uses():
            counts[v] = counts.get(v, 0) + 1
    return counts


def resolve(mapping: dict[Value, Value], v: Value) -> Value:
    """Follow replacement chains ``v -> w -> ...`` to the final value."""
    seen = 0
    while v in mapping:
        v = mapping[v]
        seen += 1
        if seen > len(mapping):
            raise AssertionError("cyclic value replacement")
    return v


def replace_uses(kernel: Kernel, mapping: dict[Value, Value]) -> bool:
    """Replace every use of each key of ``mapping`` by its (resolved) value. True if any changed."""
    if not mapping:
        return False
    changed = False
    for op in kernel.ops():
        if any(v in mapping for v in op.operands):
            op.operands = [resolve(mapping, v) for v in op.operands]
            changed = True
        for s in op.successors:
            if any(a in mapping for a in s.args):
                s.args = tuple(resolve(mapping, a) for a in s.args)
                changed = True
    return changed


def remove_block_params(block: Block, dead: set[int], edges: Iterable[tuple[Op, int]]) -> None:
    """Delete the parameters at indexes ``dead`` of ``block`` and the matching branch arguments."""
    if not dead:
        return
    for term, i in edges:
        s = term.successors[i]
        s.args = tuple(a for j, a in enumerate(s.args) if j not in dead)
    block.params = [p for j, p in enumerate(block.params) if j not in dead]
    for j, p in enumerate(block.params):
        p.index = j


def const_value(v: Value) -> int | float | None:
    """The immediate of ``v`` if it is the result of a ``const`` op, else None."""
    if isinstance(v, OpResult) and v.op.opcode == "const":
        return v.op.imm
    return None


def make_const(op: Op, imm: float) -> None:
    """Turn ``op`` (which has a result) into ``const imm`` of its result type, in place.

    The result value keeps its identity, so no use needs rewriting.
    """
    assert op.result is not None
    t = op.result.type
    op.opcode = "const"
    op.defn = OPS["const"]
    op.operands = []
    op.type = t
    op.imm = normalize_imm(t, imm)
    op.pred = None
    op.dim = None
    op.array = None
    op.successors = []


def op_key_imm(op: Op) -> object:
    """A hashable key for an op's immediate (floats by bit pattern, so -0.0 != 0.0)."""
    if isinstance(op.imm, float) and op.type is not None and op.type.is_float:
        return ("f", float_bits(op.type, op.imm))
    return op.imm


def unique_block_name(kernel: Kernel, base: str) -> str:
    """A block name not used in ``kernel`` (``base``, ``base.1``, ``base.2`` ...)."""
    taken = {b.name for b in kernel.blocks}
    taken.update(v.name for v in kernel.values() if v.name is not None)
    if base not in taken:
        return base
    n = 1
    while f"{base}.{n}" in taken:
        n += 1
    return f"{base}.{n}"


def clone_module(module: Module) -> Module:
    """A deep copy of ``module`` (fresh values, ops, blocks and arrays; types are shared)."""
    return Module(module.name, [_clone_kernel(k) for k in module.kernels])


def _clone_kernel(k: Kernel) -> Kernel:
    vmap: dict[Value, Value] = {}
    params = []
    for p in k.params:
        q = Param(p.type, p.name, p.index)
        vmap[p] = q
        params.append(q)
    shared = [SharedArray(a.name, a.type, a.count) for a in k.shared]
    local = [LocalArray(a.name, a.type, a.count) for a in k.local]
    amap: dict[int, SharedArray | LocalArray] = {id(old): new for old, new in zip(k.shared, shared)}
    amap.update({id(old): new for old, new in zip(k.local, local)})
    out = Kernel(k.name, params, shared, local)
    out.loc = k.loc
    bmap: dict[int, Block] = {}
    for b in k.blocks:
        nb = Block(b.name)
        nb.loc = b.loc
        for bp in b.params:
            vmap[bp] = nb.add_param(bp.type, bp.name)
        bmap[id(b)] = nb
        out.add_block(nb)
    for b in k.blocks:
        nb = bmap[id(b)]
        for op in b.ops:
            copy = Op(op.opcode, [], type=op.type, pred=op.pred, dim=op.dim,
                      array=amap.get(id(op.array)) if op.array is not None else None, imm=op.imm,
                      result_type=op.result.type if op.result is not None else None,
                      name=op.result.name if op.result is not None else None, loc=op.loc)
            if op.result is not None and copy.result is not None:
                vmap[op.result] = copy.result
            nb.append(copy)
    for b in k.blocks:
        for op, copy in zip(b.ops, bmap[id(b)].ops):
            copy.operands = [vmap.get(v, v) for v in op.operands]
            copy.successors = [Successor(bmap.get(id(s.block), s.block), [vmap.get(a, a) for a in s.args])
                               for s in op.successors]
    return out
