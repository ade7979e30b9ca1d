"""Array indices proven in bounds for small blocks: the GPU kernel's block-size version.

Shared-memory indices are mostly built from thread indices: ``s[tid]``, ``s[tid + s]`` under
``tid < s``, ``As[ty*16 + tx]``. Each is in bounds once the block is small enough, and a
thread index is always below the block size. So a checked GPU kernel may be emitted twice
(:mod:`vxpu.ir.lower.gpu`): a copy for blocks of at most ``(Bx, By, Bz)`` threads, in which
the array accesses proven here run unchecked, and the general copy with every check; the
kernel's entry picks one on ``block_dim <= (Bx, By, Bz)`` (a uniform branch).

The proof is an interval analysis over the IR (a forward fixpoint): every integer value of at
most 32 bits gets the range of its *signed* value. Under the assumption, ``thread_id.d`` is in
``[0, B_d - 1]`` and ``block_dim.d`` in ``[1, B_d]``; ``block_id``/``grid_dim`` are
non-negative. Constants, ``add``/``sub``/``mul`` (a result that may leave the type's range —
wrap — is unknown), ``shl``/``lshr`` by constants, ``and`` with a non-negative constant,
``urem`` by a positive divisor, ``select`` (its true value ``(p + a) - b`` under ``a >= b``
is ``p + [0, a.hi - b.lo]``) and block parameters (the union of what every branch passes)
follow exactly; anything else is unknown. A conditional branch on
``icmp slt|sle|ult|ule|sgt|sge`` (or its negation on the false edge) narrows its operands
inside a successor that has no other predecessor. Block parameters still growing after
:data:`WIDEN_AFTER` rounds go to the type's limit (the bound that still moves), so the
fixpoint ends. An access ``offset
(shared_addr|local_addr @a), i : T`` (element size = access size) is proven when the range of
``i`` lies in ``[0, count(a) - 1]``.

:func:`choose` tries block shapes (:data:`SIZES` per dimension the kernel reads), with and
without ranges for integer parameters that divide an array index (``bins[v % nbins]`` is in
bounds for ``1 <= nbins <= count``; the entry then tests those too), and keeps the choice that
proves the most accesses (the larger block on a tie); none if it proves nothing, or if every
proven access inside a loop is a reduction step guarded by a thread-index test (:func:`_pays`).
"""

from __future__ import annotations

from vxpu.ir.model import Block, BlockParam, Kernel, Op, OpResult, Param, Value

__all__ = ["ANY_BLOCK", "MAX_OPS", "SIZES", "WIDEN_AFTER", "choose", "no_wrap_ops", "proven_array_accesses"]

Range = tuple[int, int]

#: Sizes tried for each thread dimension the kernel uses (at most 1024 threads in all).
SIZES = (1024, 512, 256, 128, 64, 32, 16, 8)
#: A block shape that holds for every launch: no GPU block has more than 1024 threads in a
#: dimension (see :func:`choose`).
ANY_BLOCK = (SIZES[0],) * 3
#: Fixpoint rounds after which a bound of a block parameter that still moves goes to its
#: type's limit (the branch into a loop body then narrows it again).
WIDEN_AFTER = 3
#: Kernels with more ops than this are not analysed (compile time).
MAX_OPS = 4000

_INVERSE = {"slt": "sge", "sge": "slt", "sle": "sgt", "sgt": "sle", "ult": "uge", "uge": "ult",
            "ule": "ugt", "ugt": "ule", "eq": "ne", "ne": "eq"}


def _full(bits: int) -> Range:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _fit(lo: int, hi: int, bits: int) -> Range:
    """``[lo, hi]`` if it is representable in ``bits`` (no wrap), else unknown."""
    flo, fhi = _full(bits)
    return (lo, hi) if flo <= lo and hi <= fhi else (flo, fhi)


class _Ranges:
    """The interval fixpoint of one kernel under one block-shape assumption."""

    def __init__(self, kernel: Kernel, shape: tuple[int, int, int], params: dict[int, Range]) -> None:
        self.kernel = kernel
        self.shape = dict(zip("xyz", shape))
        self.params = params
        self.values: dict[Value, Range] = {}
        #: id(block) -> its (predecessor, successor index) edges (set by :meth:`run`).
        self.preds: dict[int, list[tuple[Block, int]]] = {}

    def get(self, v: Value, env: dict[Value, Range]) -> Range | None:
        if v in env:
            return env[v]
        if isinstance(v, Param):
            return self.params.get(v.index, _full(v.type.bits)) if _narrow(v) else None
        return self.values.get(v)

    def run(self) -> None:
        preds: dict[int, list[tuple[Block, int]]] = {id(b): [] for b in self.kernel.blocks}
        for b in self.kernel.blocks:
            term = b.terminator
            for k, s in enumerate(term.successors if term is not None else ()):
                preds[id(s.block)].append((b, k))
        self.preds = preds
        rounds = 0
        changed = True
        while changed:
            changed = False
            rounds += 1
            for blk in self.kernel.blocks:
                env = self._edge_env(blk, preds[id(blk)])
                for p in blk.params:
                    if not _narrow(p):
                        continue
                    new = self._param_range(p, preds[id(blk)])
                    old = self.values.get(p)
                    if new is not None and old != new:
                        if old is not None:
                            new = (min(new[0], old[0]), max(new[1], old[1]))
                            if rounds > WIDEN_AFTER:          # widen the bound that still moves
                                full = _full(p.type.bits)
                                new = (full[0] if new[0] < old[0] else new[0], full[1] if new[1] > old[1] else new[1])
                        if new != old:
                            self.values[p] = new
                            changed = True
                for op in blk.ops:
                    res = op.result
                    if res is None or not _narrow(res):
                        continue
                    r = self._op_range(op, env)
                    if r is not None and self.values.get(res) != r:
                        old = self.values.get(res)
                        self.values[res] = r if old is None else (min(r[0], old[0]), max(r[1], old[1]))
                        changed = changed or self.values[res] != old

    def _param_range(self, p: BlockParam, preds: list[tuple[Block, int]]) -> Range | None:
        out: Range | None = None
        for b, k in preds:
            term = b.terminator
            assert term is not None
            arg = term.successors[k].args[p.index]
            r = self.get(arg, self._narrowing(term, k))
            if r is None:
                continue
            out = r if out is None else (min(out[0], r[0]), max(out[1], r[1]))
        return out

    def _edge_env(self, blk: Block, preds: list[tuple[Block, int]]) -> dict[Value, Range]:
        """Ranges narrowed by the branch into ``blk`` (only if it is ``blk``'s one way in)."""
        if len(preds) != 1:
            return {}
        b, k = preds[0]
        term = b.terminator
        assert term is not None
        if len(term.successors) == 2 and term.successors[0].block is term.successors[1].block:
            return {}
        return self._narrowing(term, k)

    def _narrowing(self, term: Op, k: int) -> dict[Value, Range]:
        if term.opcode != "cbr" or not isinstance(term.operands[0], OpResult):
            return {}
        cmp = term.operands[0].op
        if cmp.opcode != "icmp" or cmp.pred is None:
            return {}
        pred = cmp.pred if k == 0 else _INVERSE[cmp.pred]
        a, b = cmp.operands
        ra, rb = self.get(a, {}), self.get(b, {})
        if ra is None or rb is None or not (_narrow(a) and _narrow(b)):
            return {}
        env: dict[Value, Range] = {}
        if pred in ("slt", "sle", "ult", "ule"):
            strict = 1 if pred in ("slt", "ult") else 0
            if pred[0] == "u" and rb[0] < 0:
                return {}                  # b may be a huge unsigned value: nothing follows
            lo_a = 0 if pred[0] == "u" else ra[0]
            env[a] = (max(ra[0], lo_a), min(ra[1], rb[1] - strict))
            if pred[0] == "s" or ra[0] >= 0:
                env[b] = (max(rb[0], ra[0] + strict), rb[1])
        elif pred in ("sgt", "sge"):
            strict = 1 if pred == "sgt" else 0
            env[a] = (max(ra[0], rb[0] + strict), ra[1])
            env[b] = (rb[0], min(rb[1], ra[1] - strict))
        return {v: r for v, r in env.items() if r[0] <= r[1]}

    def _op_range(self, op: Op, env: dict[Value, Range]) -> Range | None:
        assert op.result is not None
        bits = op.result.type.bits
        name = op.opcode
        if name == "const":
            v = int(op.imm) & ((1 << bits) - 1)  # type: ignore[arg-type]
            v = v - (1 << bits) if v >> (bits - 1) else v
            return v, v
        if name in ("thread_id", "block_dim"):
            n = self.shape[op.dim or "x"]
            return (0, n - 1) if name == "thread_id" else (1, n)
        if name in ("block_id", "grid_dim"):
            return 0, (1 << 31) - 1
        ins = [self.get(v, env) for v in op.operands]
        if name == "select":
            x, y = ins[1], ins[2]
            if x is None or y is None:
                return None
            x = self._guarded_difference(op.operands[0], op.operands[1], env) or x
            return min(x[0], y[0]), max(x[1], y[1])
        if not all(_narrow(v) for v in op.operands):
            return _full(bits)                # a load, a conversion, ...: unknown
        if any(r is None for r in ins):
            return None                       # an operand not reached yet
        rs: list[Range] = ins  # type: ignore[assignment]
        return _arith(name, rs, bits)


    def _guarded_difference(self, cond: Value, x: Value, env: dict[Value, Range]) -> Range | None:
        """The range of ``x = (p + a) - b`` where ``cond`` is ``a >= b`` (``uge``/``sge``, or
        ``b <= a``): ``x = p + (a - b)`` with ``0 <= a - b <= a.hi - b.lo``, when neither the
        add nor the sub can wrap (scan's ``select (tid >= d), own - d, own``)."""
        if not (isinstance(cond, OpResult) and cond.op.opcode == "icmp" and isinstance(x, OpResult)
                and x.op.opcode == "sub" and isinstance(x.op.operands[0], OpResult)
                and x.op.operands[0].op.opcode == "add"):
            return None
        a, b = cond.op.operands
        if cond.op.pred in ("ule", "sle"):
            a, b = b, a
        elif cond.op.pred not in ("uge", "sge"):
            return None
        if x.op.operands[1] is not b:
            return None
        left, right = x.op.operands[0].op.operands
        p = right if left is a else left if right is a else None
        if p is None:
            return None
        ra, rb, rp = self.get(a, env), self.get(b, env), self.get(p, env)
        if ra is None or rb is None or rp is None or not all(_narrow(v) for v in (a, b, p)):
            return None
        if cond.op.pred in ("uge", "ule") and (ra[0] < 0 or rb[0] < 0):
            return None                       # unsigned order differs from signed here
        bits = x.type.bits
        full = _full(bits)
        if _fit(rp[0] + ra[0], rp[1] + ra[1], bits) == full or \
                _fit(rp[0] + ra[0] - rb[1], rp[1] + ra[1] - rb[0], bits) == full:
            return None                       # the add or the sub may wrap
        return rp[0], rp[1] + max(0, ra[1] - rb[0])


def _arith(name: str, rs: list[Range], bits: int) -> Range:
    full = _full(bits)
    if name in ("add", "sub", "mul"):
        (a0, a1), (b0, b1) = rs
        if name == "add":
            return _fit(a0 + b0, a1 + b1, bits)
        if name == "sub":
            return _fit(a0 - b1, a1 - b0, bits)
        corners = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
        return _fit(min(corners), max(corners), bits)
    if name in ("shl", "lshr") and rs[1][0] == rs[1][1]:
        k = rs[1][0] & ((1 << bits) - 1)
        if k >= bits:
            return 0, 0                     # IR: a shift by >= the width gives 0
        (a0, a1) = rs[0]
        if name == "shl":
            return _fit(a0 << k, a1 << k, bits)
        if a0 >= 0:
            return a0 >> k, a1 >> k
        return (0, ((1 << bits) - 1) >> k) if k > 0 else full
    if name == "and" and any(r[0] == r[1] and r[0] >= 0 for r in rs):
        m = min(r[0] for r in rs if r[0] == r[1] and r[0] >= 0)
        return 0, m
    if name == "urem":
        (a0, a1), (b0, b1) = rs
        if b0 >= 1:
            return (0, b1 - 1) if a0 < 0 else (0, min(a1, b1 - 1))
    return full


def _narrow(v: Value) -> bool:
    t = v.type
    return t.is_int and t.bits <= 32 and t.name != "i1"


def _array_index(op: Op) -> tuple[Value, int] | None:
    """``(index, element count)`` of an access at ``offset (shared_addr|local_addr), i``."""
    if op.opcode == "load" or op.opcode.startswith("atomic_"):
        pv, size = op.operands[0], op.type.size if op.type is not None else 0
    elif op.opcode == "store":
        pv, size = op.operands[1], op.operands[0].type.size
    else:
        return None
    if not (isinstance(pv, OpResult) and pv.op.opcode == "offset" and pv.op.type is not None
            and pv.op.type.size == size and isinstance(pv.op.operands[0], OpResult)
            and pv.op.operands[0].op.opcode in ("shared_addr", "local_addr")):
        return None
    arr = pv.op.operands[0].op.array
    assert arr is not None
    return pv.op.operands[1], arr.size // size


def proven_array_accesses(kernel: Kernel, shape: tuple[int, int, int],
                          params: dict[int, Range] | None = None) -> set[int]:
    """id() of the array accesses in bounds whenever ``block_dim <= shape`` (and each integer
    parameter ``i`` in ``params`` lies in ``params[i]``)."""
    ranges = _Ranges(kernel, shape, params or {})
    ranges.run()
    out: set[int] = set()
    for blk in kernel.blocks:
        for op in blk.ops:
            form = _array_index(op)
            if form is None or not _narrow(form[0]):
                continue
            r = ranges.get(form[0], {})
            if r is not None and 0 <= r[0] and r[1] < form[1]:
                out.add(id(op))
    return out


def no_wrap_ops(kernel: Kernel) -> set[int]:
    """id() of the ``add``/``sub`` ops (i8 to i32) whose signed result cannot wrap in any GPU
    launch: the ranges of both operands under :data:`ANY_BLOCK` (a fact, not an assumption:
    no copy or entry test needed) keep the exact sum or difference inside the type. For such
    an op ``sext(a ± b) = sext(a) ± sext(b)``, so ``offset p, a ± b`` may be emitted as two
    offsets (:meth:`vxpu.ir.lower.gpu.GpuHooks.split_offset`)."""
    if sum(len(b.ops) for b in kernel.blocks) > MAX_OPS:
        return set()
    ranges = _Ranges(kernel, ANY_BLOCK, {})
    ranges.run()
    out: set[int] = set()
    for blk in kernel.blocks:
        env = ranges._edge_env(blk, ranges.preds[id(blk)])     # narrowed by the branch into blk
        for op in blk.ops:
            if op.opcode not in ("add", "sub") or op.result is None or not _narrow(op.result):
                continue
            ra, rb = (ranges.get(v, env) for v in op.operands)
            if ra is None or rb is None:
                continue                      # never reached by the fixpoint: leave it whole
            lo, hi = (ra[0] + rb[0], ra[1] + rb[1]) if op.opcode == "add" else (ra[0] - rb[1], ra[1] - rb[0])
            flo, fhi = _full(op.result.type.bits)
            if flo <= lo and hi <= fhi:
                out.add(id(op))
    return out


def _shapes(kernel: Kernel) -> list[tuple[int, int, int]]:
    """Block shapes to try: :data:`SIZES` for each dimension whose thread_id or block_dim the
    kernel reads (1024 — no limit — for the others), at most 1024 threads in all."""
    used = {op.dim or "x" for b in kernel.blocks for op in b.ops if op.opcode in ("thread_id", "block_dim")}
    free = SIZES[0]
    xs = SIZES if "x" in used else (free,)
    ys = SIZES if "y" in used else (free,)
    zs = SIZES if "z" in used else (free,)
    return [(x, y, z) for x in xs for y in ys for z in zs if _volume((x, y, z), used) <= 1024]


def _volume(shape: tuple[int, int, int], used: set[str] | None = None) -> int:
    v = 1
    for d, n in zip("xyz", shape):
        if used is None or d in used:
            v *= n
    return v


def _divisor_params(kernel: Kernel) -> dict[int, Range]:
    """``{i: (1, count)}`` for each integer parameter ``i`` that divides (``urem``) an array
    index directly (histogram's ``bins[v % nbins]``): in bounds whenever ``1 <= i <= count``."""
    out: dict[int, Range] = {}
    for blk in kernel.blocks:
        for op in blk.ops:
            form = _array_index(op)
            if form is None or not isinstance(form[0], OpResult) or form[0].op.opcode != "urem":
                continue
            d = form[0].op.operands[1]
            if isinstance(d, Param) and _narrow(d):
                have = out.get(d.index, (1, form[1]))
                out[d.index] = (1, min(have[1], form[1]))
    return out


Choice = tuple[tuple[int, int, int], dict[int, Range], set[int]]


def _pays(kernel: Kernel, proven: set[int]) -> bool:
    """Whether the small-block copy is worth its entry test and size: some proven access runs
    in a loop, in a block not guarded by a thread-index test. (A reduction step ``if (tid <
    s) s[tid] += s[tid + s]`` is the exception: without its checks ptxas predicates the step
    for every warp; on the H200 dot, all of whose proven accesses are such steps or outside
    loops, ran at 0.92 of CUDA C with the copy and 1.05 without.)"""
    succ = {id(b): b.successor_blocks() for b in kernel.blocks}
    preds: dict[int, list[Block]] = {id(b): [] for b in kernel.blocks}
    for b in kernel.blocks:
        for t in succ[id(b)]:
            preds[id(t)].append(b)
    for blk in kernel.blocks:
        if not any(id(op) in proven for op in blk.ops) or _guarded(blk, preds[id(blk)]):
            continue
        seen, stack = set(), list(succ[id(blk)])
        while stack:                                # does blk reach itself (a loop)?
            b = stack.pop()
            if b is blk:
                return True
            if id(b) not in seen:
                seen.add(id(b))
                stack.extend(succ[id(b)])
    return False


def _guarded(blk: Block, preds: list[Block]) -> bool:
    """``blk`` is entered only through a conditional branch on a compare of a thread index."""
    if len(preds) != 1:
        return False
    term = preds[0].terminator
    if term is None or term.opcode != "cbr" or not isinstance(term.operands[0], OpResult):
        return False
    cmp = term.operands[0].op
    return cmp.opcode == "icmp" and any(isinstance(v, OpResult) and v.op.opcode == "thread_id"
                                        for v in cmp.operands)


def choose(kernel: Kernel, pays: bool = True) -> Choice | None:
    """The block shape (and parameter ranges, :func:`_divisor_params`) whose copy proves the
    most array accesses (the larger block on a tie, no parameter ranges unless they prove
    more), with those accesses; None if nothing is proven or the copy does not pay
    (:func:`_pays`; ``pays=False`` skips that rule). A dimension the kernel does not read is 1024. The entry tests only the
    dimensions below 1024: no GPU block has more threads than that (the session refuses a
    block above the device's ``max_threads_per_block``, 1024 on CUDA and HIP, as do the
    drivers), so a dimension of 1024, read or not, holds for every launch."""
    if not (kernel.shared or kernel.local) or sum(len(b.ops) for b in kernel.blocks) > MAX_OPS:
        return None
    best: Choice | None = None
    divisors = _divisor_params(kernel)
    for params in ({}, divisors) if divisors else ({},):
        for shape in _shapes(kernel):
            proven = proven_array_accesses(kernel, shape, params)
            if proven and (best is None or len(proven) > len(best[2])
                           or (len(proven) == len(best[2]) and _volume(shape) > _volume(best[0]))):
                best = shape, params, proven
    return best if best is not None and (not pays or _pays(kernel, best[2])) else None
