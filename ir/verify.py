"""The verifier: checks every IR rule and reports *every* violation with its location.

Invariants (each violation becomes one :class:`~vxpu.ir.errors.Problem`):

Module
  M1 the module and kernel names are C identifiers; kernel names are unique; at most MAX_KERNELS.
Kernel
  K1 parameter types are PARAM_TYPES; at most MAX_PARAMS.
  K2 arrays have a memory element type and a count in 1..MAX_ARRAY_COUNT; shared arrays total at
     most MAX_SHARED_BYTES, local arrays at most MAX_LOCAL_BYTES; array names are unique.
  K3 value names and block names are valid and unique within the kernel.
  K4 there is at least one block; the entry block has no parameters and is no branch target.
  K5 every block is reachable from the entry block (unreachable blocks are an error: delete them).
  K6 limits: blocks, ops, block parameters.
  K7 complexity: loops nested at most MAX_LOOP_DEPTH deep; at most MAX_PHI_FAN_IN branch edges
     into a block that has parameters (see :mod:`vxpu.ir.complexity`).
Block
  B1 a block is not empty and ends with exactly one terminator; no terminator elsewhere.
Op (against its row in the opcode table, ``vxpu.ir.ops.OPS``)
  O1 operand count and types, the annotation's type class, conversion rules, address spaces
     (no store through ptr<constant>; atomics only on global/shared).
  O2 attributes: predicates, dims, arrays (of this kernel, of the right kind), constants
     present exactly when the table says so and valid.
  O3 the result type is the one the table gives.
  O4 successors: the right number, blocks of this kernel, argument count and types matching the
     target's parameters.
SSA
  S1 every operand is a value of this kernel; its definition dominates the use (an op result in
     the same block must come earlier; a block parameter's block must dominate the use).

Runs in O(ops + uses + edges · log blocks) time: dominators by Lengauer-Tarjan, dominance
queries in O(1) through dominator-tree DFS intervals, all traversals iterative (no recursion, so deep nesting cannot overflow the stack).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from .complexity import loop_nest_depth, phi_fan_in
from .errors import IRError, Location, Problem, VerifyError
from .limits import (
    MAX_ARRAY_COUNT,
    MAX_ARRAYS,
    MAX_BLOCK_PARAMS,
    MAX_BLOCKS,
    MAX_KERNELS,
    MAX_LOCAL_BYTES,
    MAX_LOOP_DEPTH,
    MAX_OPS_PER_KERNEL,
    MAX_OPS_PER_MODULE,
    MAX_PARAMS,
    MAX_PHI_FAN_IN,
    MAX_SHARED_BYTES,
)
from .model import (
    Block,
    Kernel,
    LocalArray,
    Module,
    Op,
    OpResult,
    Param,
    SharedArray,
    Value,
    is_valid_name,
    is_valid_symbol,
    normalize_imm,
)
from .ops import DIMS, check_types, infer_result
from .types import PARAM_TYPES

__all__ = ["Dominators", "check", "check_kernel", "verify", "verify_kernel"]

log = logging.getLogger(__name__)

#: The verifier stops after this many problems (like the parser): a hostile module at the op
#: limit could otherwise produce one Problem per use, hundreds of thousands of them.
MAX_VERIFY_PROBLEMS = 100


class _Enough(Exception):
    """Raised inside a kernel check once the problem budget is used up."""


def _not_listed(where: Location) -> Problem:
    return Problem(where, f"more than {MAX_VERIFY_PROBLEMS} problems; the rest are not listed (fix these first)")


def verify(module: Module) -> None:
    """Check ``module``.

    Raises:
        VerifyError: listing every problem found, each with kernel, block, op index (and line:col
            if the module came from text).
    """
    problems = check(module)
    if problems:
        raise VerifyError(problems)


def verify_kernel(kernel: Kernel) -> None:
    """Check one kernel.

    Raises:
        VerifyError: listing every problem found.
    """
    problems = check_kernel(kernel)
    if problems:
        raise VerifyError(problems)


def check(module: Module) -> list[Problem]:
    """Every problem of ``module`` (empty if it is valid)."""
    problems: list[Problem] = []
    where = Location()
    if not is_valid_symbol(module.name):
        problems.append(Problem(where, f"invalid module name {module.name!r}: use a C identifier"))
    if len(module.kernels) > MAX_KERNELS:
        problems.append(Problem(where, f"{len(module.kernels)} kernels exceed the limit of {MAX_KERNELS}"))
        return problems
    total_ops = sum(len(b.ops) for k in module.kernels for b in k.blocks)
    if total_ops > MAX_OPS_PER_MODULE:
        problems.append(Problem(where, f"{total_ops} ops exceed the limit of {MAX_OPS_PER_MODULE} per module"))
        return problems
    seen: set[str] = set()
    for k in module.kernels:
        if k.name in seen:
            if len(problems) >= MAX_VERIFY_PROBLEMS:
                problems.append(_not_listed(_kloc(k)))
                break
            problems.append(Problem(_kloc(k), f"duplicate kernel name @{k.name}"))
        seen.add(k.name)
        found = _KernelChecker(k, MAX_VERIFY_PROBLEMS - len(problems)).run()
        problems.extend(found)
        if found and "are not listed" in found[-1].message:
            break
    return problems


def check_kernel(kernel: Kernel) -> list[Problem]:
    """Every problem of one kernel (empty if it is valid), at most MAX_VERIFY_PROBLEMS of
    them plus a last one saying that the rest are not listed."""
    return _KernelChecker(kernel).run()


def _kloc(k: Kernel) -> Location:
    line = k.loc.line if k.loc is not None else None
    col = k.loc.col if k.loc is not None else None
    return Location(kernel=k.name, line=line, col=col)


class Dominators:
    """Dominator tree of a kernel's reachable blocks, with O(1) dominance queries.

    Built with the Lengauer-Tarjan algorithm (path compression, O(E log N)) over a DFS from the
    entry, all iterative.

    Attributes:
        order: reachable blocks in reverse post-order (entry first).
        idom: immediate dominator per block id (the entry maps to itself).
    """

    def __init__(self, kernel: Kernel) -> None:
        self.order: list[Block] = _reverse_postorder(kernel)
        vertex, parent, preds = _dfs_preorder(kernel)
        self._index = {id(b): i for i, b in enumerate(vertex)}
        self._idom = _lengauer_tarjan(parent, preds)
        self.idom = {id(vertex[i]): vertex[d] for i, d in enumerate(self._idom)}
        self._pre, self._post = self._intervals()

    def reachable(self, block: Block) -> bool:
        """True if ``block`` is reachable from the entry."""
        return id(block) in self._index

    def dominates(self, a: Block, b: Block) -> bool:
        """True if every path from the entry to ``b`` passes through ``a`` (a block dominates itself)."""
        ia, ib = self._index.get(id(a)), self._index.get(id(b))
        if ia is None or ib is None:
            return False
        return self._pre[ia] <= self._pre[ib] and self._post[ib] <= self._post[ia]

    def _intervals(self) -> tuple[list[int], list[int]]:
        n = len(self._idom)
        children: list[list[int]] = [[] for _ in range(n)]
        for i in range(1, n):
            children[self._idom[i]].append(i)
        pre, post = [0] * n, [0] * n
        clock = 0
        stack: list[tuple[int, int]] = [(0, 0)] if n else []
        while stack:
            node, child = stack.pop()
            if child == 0:
                pre[node] = clock
                clock += 1
            if child < len(children[node]):
                stack.append((node, child + 1))
                stack.append((children[node][child], 0))
            else:
                post[node] = clock
                clock += 1
        return pre, post


def _reverse_postorder(kernel: Kernel) -> list[Block]:
    if not kernel.blocks:
        return []
    entry = kernel.blocks[0]
    owned = {id(b) for b in kernel.blocks}
    visited = {id(entry)}
    post: list[Block] = []
    stack: list[tuple[Block, int]] = [(entry, 0)]
    while stack:
        block, i = stack.pop()
        succs = block.successor_blocks()
        if i < len(succs):
            stack.append((block, i + 1))
            s = succs[i]
            if id(s) in owned and id(s) not in visited:
                visited.add(id(s))
                stack.append((s, 0))
        else:
            post.append(block)
    post.reverse()
    return post


def _dfs_preorder(kernel: Kernel) -> tuple[list[Block], list[int], list[list[int]]]:
    """Reachable blocks in DFS preorder, each one's DFS-tree parent and its reachable predecessors."""
    vertex: list[Block] = []
    parent: list[int] = []
    if not kernel.blocks:
        return vertex, parent, []
    owned = {id(b) for b in kernel.blocks}
    number: dict[int, int] = {}
    stack: list[tuple[Block, int]] = [(kernel.blocks[0], -1)]
    while stack:
        block, par = stack.pop()
        if id(block) in number:
            continue
        number[id(block)] = len(vertex)
        vertex.append(block)
        parent.append(par)
        for s in reversed(block.successor_blocks()):
            if id(s) in owned and id(s) not in number:
                stack.append((s, number[id(block)]))
    preds: list[list[int]] = [[] for _ in vertex]
    for i, block in enumerate(vertex):
        for s in block.successor_blocks():
            j = number.get(id(s))
            if j is not None:
                preds[j].append(i)
    return vertex, parent, preds


def _lengauer_tarjan(parent: list[int], preds: list[list[int]]) -> list[int]:
    """Immediate dominators of nodes numbered in DFS preorder (node 0 is the root; idom[0] = 0)."""
    n = len(parent)
    semi = list(range(n))
    best = list(range(n))
    ancestor = [-1] * n
    idom = [0] * n
    samedom = [-1] * n
    bucket: list[list[int]] = [[] for _ in range(n)]

    def lowest_semi(v: int) -> int:
        path = []
        x = v
        while ancestor[ancestor[x]] != -1:
            path.append(x)
            x = ancestor[x]
        for x in reversed(path):
            a = ancestor[x]
            if semi[best[a]] < semi[best[x]]:
                best[x] = best[a]
            ancestor[x] = ancestor[a]
        return best[v]

    for node in range(n - 1, 0, -1):
        p = parent[node]
        s = p
        for v in preds[node]:
            s2 = v if v <= node else semi[lowest_semi(v)]
            s = min(s, s2)
        semi[node] = s
        bucket[s].append(node)
        ancestor[node] = p
        for v in bucket[p]:
            y = lowest_semi(v)
            if semi[y] == semi[v]:
                idom[v] = p
            else:
                samedom[v] = y
        bucket[p] = []
    for node in range(1, n):
        if samedom[node] != -1:
            idom[node] = idom[samedom[node]]
    return idom


class _KernelChecker:
    """Checks one kernel; collects problems instead of stopping at the first."""

    def __init__(self, kernel: Kernel, limit: int = MAX_VERIFY_PROBLEMS) -> None:
        self.k = kernel
        self.problems: list[Problem] = []
        self.limit = max(0, limit)

    def error(self, message: str, block: Block | None = None, op_index: int | None = None,
              op: Op | None = None, at: Location | None = None) -> None:
        loc = at or (op.loc if op is not None else None) or (block.loc if block is not None else None) or self.k.loc
        bname = None
        if block is not None:
            bname = block.name if block.name is not None else f"#{self._block_index.get(id(block), '?')}"
        self.problems.append(Problem(Location(
            kernel=self.k.name, block=bname, op=op_index,
            line=loc.line if loc is not None else None, col=loc.col if loc is not None else None,
        ), message))
        if len(self.problems) > self.limit:
            self.problems.pop()          # one too many: report that there are more instead
            raise _Enough

    def run(self) -> list[Problem]:
        try:
            return self._run()
        except _Enough:
            self.problems.append(_not_listed(_kloc(self.k)))
            return self.problems

    def _run(self) -> list[Problem]:
        k = self.k
        self._block_index = {id(b): i for i, b in enumerate(k.blocks)}
        if not is_valid_symbol(k.name):
            self.error(f"invalid kernel name {k.name!r}: use a C identifier")
        if not self._check_limits():
            return self.problems
        self._check_params()
        self._check_arrays()
        self._def_pos = self._definition_positions()
        self._check_names()
        if not k.blocks:
            self.error("kernel has no blocks; it needs at least an entry block ending in ret")
            return self.problems
        if k.blocks[0].params:
            self.error("the entry block cannot have parameters", k.blocks[0])
        self.dom = Dominators(k)
        if not self._check_complexity():
            return self.problems
        self.numbering = k.numbering()
        for b in k.blocks:
            self._check_block(b)
        return self.problems

    def _check_limits(self) -> bool:
        k = self.k
        n_ops = sum(len(b.ops) for b in k.blocks)
        checks = [
            (len(k.params), MAX_PARAMS, "parameters"),
            (len(k.shared) + len(k.local), MAX_ARRAYS, "arrays"),
            (len(k.blocks), MAX_BLOCKS, "blocks"),
            (n_ops, MAX_OPS_PER_KERNEL, "ops"),
        ]
        ok = True
        for count, limit, what in checks:
            if count > limit:
                self.error(f"{count} {what} exceed the limit of {limit} {what} per kernel")
                ok = False
        for b in k.blocks:
            if len(b.params) > MAX_BLOCK_PARAMS:
                self.error(f"{len(b.params)} block parameters exceed the limit of {MAX_BLOCK_PARAMS}", b)
                ok = False
        return ok

    def _check_complexity(self) -> bool:
        depth = loop_nest_depth(self.dom)
        if depth > MAX_LOOP_DEPTH:
            self.error(f"loops are nested {depth} deep, more than the limit of {MAX_LOOP_DEPTH}")
        fan_in, join = phi_fan_in(self.k)
        if fan_in > MAX_PHI_FAN_IN:
            self.error(f"{fan_in} branches pass arguments to this block, more than the limit of "
                       f"{MAX_PHI_FAN_IN} (phi fan-in)", join)
        return depth <= MAX_LOOP_DEPTH and fan_in <= MAX_PHI_FAN_IN

    def _check_params(self) -> None:
        for i, p in enumerate(self.k.params):
            if p.type not in PARAM_TYPES:
                allowed = ", ".join(t.name for t in PARAM_TYPES)
                self.error(f"parameter {i} (%{p.name}) cannot have type {p.type}; allowed: {allowed}")

    def _check_arrays(self) -> None:
        names: set[str] = set()
        for arrays, limit, kind in ((self.k.shared, MAX_SHARED_BYTES, "shared"),
                                    (self.k.local, MAX_LOCAL_BYTES, "local")):
            total = 0
            for a in arrays:
                if not is_valid_name(a.name):
                    self.error(f"invalid {kind} array name {a.name!r}", at=a.loc)
                if a.name in names:
                    self.error(f"duplicate array name @{a.name}", at=a.loc)
                names.add(a.name)
                if not a.type.is_memory:
                    self.error(f"{kind} array @{a.name} cannot hold {a.type}; use a memory type (i8..i64, f16..f64)",
                               at=a.loc)
                if not 1 <= a.count <= MAX_ARRAY_COUNT:
                    self.error(f"{kind} array @{a.name} has {a.count} elements; allowed 1..{MAX_ARRAY_COUNT}",
                               at=a.loc)
                    continue
                total += a.type.size * a.count
            if total > limit:
                self.error(f"{kind} arrays take {total} bytes, more than the limit of {limit}")

    def _check_names(self) -> None:
        seen: set[str] = set()
        for v in self.k.values():
            if v.name is None:
                continue
            if not is_valid_name(v.name):
                self.error(f"invalid value name {v.name!r}", *self._where(v))
            elif v.name in seen:
                self.error(f"duplicate value name %{v.name}", *self._where(v))
            seen.add(v.name)
        blocks: set[str] = set()
        for b in self.k.blocks:
            if b.kernel is not self.k:
                self.error("block does not belong to this kernel (append it with Kernel.add_block)", b)
            if b.name is None:
                continue
            if not is_valid_name(b.name):
                self.error(f"invalid block name {b.name!r}", b)
            elif b.name in blocks:
                self.error(f"duplicate block name ^{b.name}", b)
            blocks.add(b.name)

    def _where(self, v: Value) -> tuple[Block | None, int | None, Op | None]:
        pos = self._def_pos.get(v)
        if pos is None:
            return None, None, None
        block, index = pos
        if isinstance(v, OpResult):
            return block, index, v.op
        return block, None, None

    def _definition_positions(self) -> dict[Value, tuple[Block, int]]:
        """For every op result: its block and op index (block params: index -1)."""
        pos: dict[Value, tuple[Block, int]] = {}
        for b in self.k.blocks:
            for p in b.params:
                pos[p] = (b, -1)
            for i, op in enumerate(b.ops):
                if op.result is not None:
                    pos[op.result] = (b, i)
        return pos

    def _check_block(self, b: Block) -> None:
        reachable = self.dom.reachable(b)
        if not reachable:
            self.error("block is unreachable from the entry block; delete it", b)
        if not b.ops:
            self.error("block is empty; it must end with a terminator (br, cbr, ret or trap)", b)
            return
        last = len(b.ops) - 1
        for i, op in enumerate(b.ops):
            if op.block is not b:
                self.error("op is listed in this block but belongs to another", b, i, op)
            if op.defn.terminator and i != last:
                self.error(f"terminator {op.opcode} in the middle of the block; it must be the last op",
                           b, i, op)
            self._check_op(b, i, op, reachable)
        if not b.ops[last].defn.terminator:
            self.error(f"block does not end with a terminator (last op is {b.ops[last].opcode})", b, last,
                       b.ops[last])

    def _check_op(self, b: Block, i: int, op: Op, reachable: bool) -> None:
        d = op.defn
        operand_types = [v.type for v in op.operands]
        for msg in check_types(d, op.type, operand_types):
            self.error(msg, b, i, op)
        for msg in self._check_attrs(op):
            self.error(msg, b, i, op)
        if d.has_result:
            want = infer_result(d, op.type, operand_types) if len(operand_types) == len(d.operands) else None
            if op.result is None:
                self.error(f"{op.opcode} must define a result", b, i, op)
            elif want is not None and op.result.type is not want:
                self.error(f"result of {op.opcode} has type {op.result.type}, expected {want}", b, i, op)
        elif op.result is not None:
            self.error(f"{op.opcode} defines no result", b, i, op)
        self._check_successors(b, i, op)
        if reachable:
            for v in op.uses():
                use_problem = self._check_use(v, b, i)
                if use_problem:
                    self.error(use_problem, b, i, op)

    def _check_attrs(self, op: Op) -> Iterable[str]:
        d = op.defn
        has = d.attrs
        if ("pred" in has) != (op.pred is not None):
            yield f"{op.opcode} {'needs' if 'pred' in has else 'takes no'} predicate"
        elif op.pred is not None and op.pred not in d.predicates:
            yield f"invalid {op.opcode} predicate {op.pred!r}; use one of {' '.join(d.predicates)}"
        if ("dim" in has) != (op.dim is not None):
            yield f"{op.opcode} {'needs' if 'dim' in has else 'takes no'} dimension"
        elif op.dim is not None and op.dim not in DIMS:
            yield f"invalid dimension {op.dim!r}; use x, y or z"
        yield from self._check_array_attr(op)
        if ("imm" in has) != (op.imm is not None):
            yield f"{op.opcode} {'needs' if 'imm' in has else 'takes no'} constant value"
        elif op.imm is not None and op.type is not None and (op.type.is_int or op.type.is_float):
            try:
                canon = normalize_imm(op.type, op.imm)
            except IRError as exc:
                yield str(exc)
            else:
                both_nan = isinstance(canon, float) and math.isnan(canon) and math.isnan(float(op.imm))
                if canon != op.imm and not both_nan:
                    yield f"constant {op.imm!r} is not in canonical form for {op.type} (expected {canon!r})"

    def _check_array_attr(self, op: Op) -> Iterable[str]:
        if ("array" in op.defn.attrs) != (op.array is not None):
            yield f"{op.opcode} {'needs' if 'array' in op.defn.attrs else 'takes no'} array"
            return
        if op.array is None:
            return
        if op.opcode == "shared_addr":
            if not isinstance(op.array, SharedArray) or not any(a is op.array for a in self.k.shared):
                yield f"shared_addr names @{op.array.name}, which is not a shared array of this kernel"
        elif not isinstance(op.array, LocalArray) or not any(a is op.array for a in self.k.local):
            yield f"local_addr names @{op.array.name}, which is not a local array of this kernel"

    def _check_successors(self, b: Block, i: int, op: Op) -> None:
        d = op.defn
        if len(op.successors) != d.successors:
            self.error(f"{op.opcode} takes {d.successors} successor(s), got {len(op.successors)}", b, i, op)
            return
        for s in op.successors:
            target = s.block
            if id(target) not in self._block_index or target.kernel is not self.k:
                self.error(f"{op.opcode} targets a block that is not in this kernel", b, i, op)
                continue
            tname = target.name if target.name is not None else f"#{self._block_index[id(target)]}"
            if target is self.k.blocks[0]:
                self.error(f"{op.opcode} cannot jump to the entry block ^{tname}", b, i, op)
            if len(s.args) != len(target.params):
                self.error(f"{op.opcode} passes {len(s.args)} argument(s) to ^{tname}, which takes "
                           f"{len(target.params)}", b, i, op)
                continue
            for j, (arg, param) in enumerate(zip(s.args, target.params)):
                if arg.type is not param.type:
                    self.error(f"argument {j} to ^{tname} has type {arg.type}, expected {param.type}", b, i, op)

    def _check_use(self, v: Value, b: Block, i: int) -> str | None:
        if v not in self.numbering:
            return f"operand {_vname(v)} is not defined in this kernel"
        if isinstance(v, Param):
            return None
        pos = self._def_pos.get(v)
        if pos is None:
            return f"operand {_vname(v)} is not defined in this kernel"
        dblock, di = pos
        if dblock is b:
            if di < i:
                return None
            return f"{_vname(v)} is used before its definition"
        if not self.dom.reachable(dblock) or not self.dom.dominates(dblock, b):
            return f"{_vname(v)} (defined in ^{dblock.name}) does not dominate this use"
        return None


def _vname(v: Value) -> str:
    return f"%{v.name}" if v.name is not None else f"value of type {v.type}"
