"""Dead code elimination by marking what is live (so dead cycles through block parameters go too).

Roots are the ops that are not pure and not loads: stores, atomics, barriers, terminators. A
load whose result is never needed is removed too: docs/ir.md (section 5.2) lets optimizations
delete unused loads, so an out-of-bounds load without effect may or may not fault. A live op
makes its operands live; a live block parameter makes the matching argument of every branch to
its block live; a ``cbr`` condition is an operand of a live terminator. Everything else is
removed: pure ops and loads whose results are never (transitively) needed, and block parameters
nobody needs, together with the arguments that fed them. The entry block has no parameters, so none are touched there.
"""

from __future__ import annotations

from ..model import BlockParam, Kernel, Op, OpResult, Value
from .util import incoming_edges, remove_block_params

__all__ = ["run"]


def run(kernel: Kernel) -> bool:
    """Remove dead pure ops and dead block parameters. Returns True if anything changed."""
    edges = incoming_edges(kernel)
    live_ops: set[int] = set()
    live_params: set[int] = set()
    work: list[Value] = []
    for op in kernel.ops():
        if not op.defn.pure and op.opcode != "load":
            live_ops.add(id(op))
            work.extend(op.operands)
    while work:
        v = work.pop()
        if isinstance(v, OpResult):
            if id(v.op) not in live_ops:
                live_ops.add(id(v.op))
                work.extend(v.op.operands)
        elif isinstance(v, BlockParam) and id(v) not in live_params:
            live_params.add(id(v))
            for term, i in edges.get(id(v.block), ()):
                args = term.successors[i].args
                if v.index < len(args):
                    work.append(args[v.index])
    changed = False
    for b in kernel.blocks:
        keep: list[Op] = [op for op in b.ops if id(op) in live_ops]
        if len(keep) != len(b.ops):
            b.ops = keep
            changed = True
        dead = {p.index for p in b.params if id(p) not in live_params}
        if dead:
            remove_block_params(b, dead, edges.get(id(b), ()))
            changed = True
    return changed
