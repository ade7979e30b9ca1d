"""Array indices proven for small blocks (``vxpu.ir.lower.tidrange``) and the GPU copy it picks.

The proof must be sound: an index it calls in bounds for blocks of at most ``B`` threads must be
in bounds for every thread of every such block. A hypothesis test builds random index
expressions over ``thread_id.x`` and ``block_dim.x`` (adds, subs, muls, shifts, masks,
remainders, selects, with wrapping), computes every thread's index with the interpreter, and
requires each index the analysis proves to lie inside the array. The narrowing by a conditional
branch is tested the same way: a sweep of compares of thread indices and block sizes with the
constants at the edges (both edges, every ordered predicate) and a hypothesis test of random
ones. Fixed cases: the samples' reductions and tiles are
proven; wrapping, ``urem`` by a parameter (``x % 0 = x``), loaded and off-by-one indices are
not. The NVPTX lowering versions the kernel on ``block_dim`` and drops exactly those checks in
the small-block copy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.interp import InterpFault, Memory, run_kernel
from vxpu.ir.lower import tidrange
from vxpu.ir.lower.nvptx import lower_module
from vxpu.ir.model import Kernel, Module
from vxpu.ir.samples import SAMPLES
from vxpu.ir.types import i32, ptr_global

COUNT = 64


@pytest.mark.parametrize("name,shape,proven", [
    ("scan", (256, 1024, 1024), 5), ("sgemm", (16, 16, 1024), 4), ("softmax", (256, 1024, 1024), 8),
    ("dot", (256, 1024, 1024), 4)])
def test_samples_are_proven_for_their_launch_shape(name: str, shape: tuple[int, int, int], proven: int) -> None:
    kernel = SAMPLES[name].module().kernels[0]
    assert len(tidrange.proven_array_accesses(kernel, shape)) == proven


@pytest.mark.parametrize("name,copy", [("scan", True), ("sgemm", True), ("histogram", True), ("dot", False),
                                       ("softmax", False)])
def test_small_block_copy_only_where_it_pays(name: str, copy: bool) -> None:
    # dot and softmax: every proven access in a loop is a reduction step under `tid < s`
    assert (tidrange.choose(SAMPLES[name].module().kernels[0]) is not None) is copy


def _one_index_kernel(expr: str, nbins: bool = False) -> Kernel:
    """k(n, src, out): s[<expr of tid>] = 1 (a 64-element shared array)."""
    kb = KernelBuilder("k", [("n", i32), ("src", ptr_global), ("out", ptr_global)])
    n, src, _ = kb.params
    s = kb.shared_array("s", i32, COUNT)
    kb.set_block(kb.block("e"))
    t = kb.thread_id("x")
    c = kb.const
    three = c(3, i32)
    idx = {"tid+1": lambda: kb.add(t, c(1, i32)),
           "wrap": lambda: kb.add(kb.mul(t, c(0x10000000, i32)), t),
           "urem_n": lambda: kb.urem(t, n),
           "loaded": lambda: kb.load(kb.offset(src, t, i32), i32),
           "tid": lambda: t,
           "wrap_shift": lambda: kb.lshr(kb.mul(t, c(1 << 28, i32)), c(28, i32)),
           "guarded": lambda: kb.select(kb.icmp("uge", t, three), kb.sub(kb.add(c(0, i32), t), three), t),
           "urem_64": lambda: kb.urem(kb.load(kb.offset(src, t, i32), i32), c(64, i32)),
           "back_wrong": lambda: kb.select(kb.icmp("ule", t, three), kb.sub(kb.add(c(0, i32), t), three), t),
           }[expr]()
    kb.store(c(1, i32), kb.offset(kb.shared_addr(s), idx, i32))
    kb.ret()
    return kb.finish()


@pytest.mark.parametrize("expr,shape,proven", [
    ("tid", (64, 1024, 1024), True), ("tid", (128, 1024, 1024), False), ("tid+1", (64, 1024, 1024), False),
    ("tid+1", (32, 1024, 1024), True), ("wrap", (64, 1024, 1024), False), ("urem_n", (64, 1024, 1024), False),
    ("loaded", (8, 1024, 1024), False), ("urem_64", (8, 1024, 1024), True), ("back_wrong", (8, 1024, 1024), False),
    ("wrap_shift", (64, 1024, 1024), True), ("guarded", (64, 1024, 1024), True)])
def test_fixed_cases(expr: str, shape: tuple[int, int, int], proven: bool) -> None:
    kernel = _one_index_kernel(expr)
    assert bool(tidrange.proven_array_accesses(kernel, shape)) is proven


_LEAVES = st.sampled_from(["t", "c", "bd"])
_OPS = st.sampled_from(["add", "sub", "mul", "shl", "lshr", "and", "urem", "select"])


_CONSTS = st.one_of(st.integers(-70, 70), st.sampled_from([1 << k for k in (24, 26, 28, 29, 30, 31)]),
                    st.sampled_from([24, 26, 28, 29, 30, 31]))


def _expr(depth: int) -> st.SearchStrategy:
    if depth == 0:
        return st.tuples(_LEAVES, _CONSTS)
    return st.one_of(st.tuples(_LEAVES, _CONSTS), st.tuples(_OPS, _expr(depth - 1), _expr(depth - 1)))


def _build(kb: KernelBuilder, t, e, bd=None, env=None):  # type: ignore[no-untyped-def]
    """The value of expression ``e``: leaves ``t`` (thread_id.x), ``bd`` (block_dim.x), ``c``
    (a constant) and names in ``env``."""
    c = lambda v: kb.const(v - (1 << 32) if v >= 1 << 31 else v, i32)
    if e[0] == "t":
        return t
    if e[0] == "c":
        return c(e[1])
    if e[0] == "bd":
        return bd if bd is not None else t
    if env is not None and e[0] in env:
        return env[e[0]]
    if e[0] in ("a", "vb"):
        return t
    a, b = _build(kb, t, e[1], bd, env), _build(kb, t, e[2], bd, env)
    if e[0] == "shl" or e[0] == "lshr":
        b = kb.and_(b, c(31)) if e[2][0] != "c" else c(e[2][1] & 31)
        return getattr(kb, e[0])(a, b)
    if e[0] == "and":
        return kb.and_(a, b)
    if e[0] == "select":
        return kb.select(kb.icmp("uge", t, b), kb.sub(kb.add(c(5), t), b), a)
    return getattr(kb, e[0])(a, b)


def _kernel(e, with_access: bool) -> Module:  # type: ignore[no-untyped-def]
    kb = KernelBuilder("k", [("out", ptr_global)])
    (out,) = kb.params
    s = kb.shared_array("s", i32, COUNT)
    kb.set_block(kb.block("e"))
    t = kb.thread_id("x")
    idx = _build(kb, t, e, kb.block_dim("x"))
    if with_access:
        kb.store(kb.const(1, i32), kb.offset(kb.shared_addr(s), idx, i32))
    kb.store(idx, kb.offset(out, t, i32))
    kb.ret()
    return Module("m", [kb.finish()])


@settings(max_examples=400, deadline=None)
@given(e=_expr(3), block=st.sampled_from([8, 16, 32, 64]))
def test_random_indices_proven_only_when_in_bounds(e, block: int) -> None:  # type: ignore[no-untyped-def]
    proven = tidrange.proven_array_accesses(_kernel(e, True).kernels[0], (block, 1024, 1024))
    if not proven:
        return
    mem = Memory(1 << 20)
    out = mem.upload(np.zeros(block, np.int32))
    for threads in {1, block // 2 or 1, block}:
        run_kernel(_kernel(e, False), "k", 1, threads, [out], mem)
        got = mem.read(out, np.int32, threads)
        assert ((got >= 0) & (got < COUNT)).all(), (e, threads, got)


_PREDS = st.sampled_from(["slt", "sle", "sgt", "sge", "ult", "ule", "ugt", "uge", "eq", "ne"])


def _guarded_kernel(a, b, pred: str, e, edge: bool, with_access: bool) -> Module:  # type: ignore[no-untyped-def]
    """k(out): if ((a pred b) == edge) { s[e] = 1 (e may use a and b as leaves); out[tid] = e }.
    Threads that do not take the edge leave out[tid] at 0 (in bounds)."""
    kb = KernelBuilder("k", [("out", ptr_global)])
    (out,) = kb.params
    s = kb.shared_array("s", i32, COUNT)
    entry, body, done = kb.block("e"), kb.block("body"), kb.block("done")
    kb.set_block(entry)
    t = kb.thread_id("x")
    bd = kb.block_dim("x")
    va, vb = _build(kb, t, a, bd), _build(kb, t, b, bd)
    cond = kb.icmp(pred, va, vb)
    kb.cbr(cond, body, done) if edge else kb.cbr(cond, done, body)
    kb.set_block(body)
    idx = _build(kb, t, e, bd, {"a": va, "vb": vb})
    if with_access:
        kb.store(kb.const(1, i32), kb.offset(kb.shared_addr(s), idx, i32))
    kb.store(idx, kb.offset(out, t, i32))
    kb.br(done)
    kb.set_block(done)
    kb.ret()
    return Module("m", [kb.finish()])


_GUARD_LEAVES = st.tuples(st.sampled_from(["t", "c", "bd", "a", "vb"]), _CONSTS)


def _guard_expr(depth: int) -> st.SearchStrategy:
    if depth == 0:
        return _GUARD_LEAVES
    return st.one_of(_GUARD_LEAVES, st.tuples(_OPS, _guard_expr(depth - 1), _guard_expr(depth - 1)))


#: constants at the edges that matter: the array's bounds, the block sizes, the i32 limits
_EDGE_CONSTS = st.sampled_from([0, 1, 2, 7, 8, 9, 31, 32, 33, 56, 63, 64, 65, 127, 128, 0x7FFFFFFF,
                                0x80000000, 0xFFFFFFFF, 0xFFFFFFC0])
_SMALL = st.tuples(st.just("c"), st.one_of(st.integers(-70, 70), _EDGE_CONSTS))
#: the index: mostly the compared values themselves, or one step from them
_GUARDED_INDEX = st.one_of(st.tuples(st.sampled_from(["a", "vb"]), st.just(0)),
                           st.tuples(st.sampled_from(["add", "sub", "and", "urem"]),
                                     st.tuples(st.sampled_from(["a", "vb"]), st.just(0)), _SMALL),
                           st.tuples(st.just("sub"), st.tuples(st.just("a"), st.just(0)),
                                     st.tuples(st.just("vb"), st.just(0))),
                           _guard_expr(2))


@settings(max_examples=600, deadline=None)
@given(a=st.one_of(st.tuples(st.sampled_from(["t", "bd"]), st.just(0)), _expr(1)),
       b=st.one_of(_SMALL, _expr(1)), pred=_PREDS, e=_GUARDED_INDEX, edge=st.booleans(),
       block=st.sampled_from([8, 16, 32, 64]))
def test_random_branch_narrowing_is_sound(a, b, pred: str, e, edge: bool, block: int) -> None:  # type: ignore[no-untyped-def]
    """An index in a block entered only when ``a pred b`` holds (or fails) is proven only when
    every thread of every block of at most ``block`` threads that enters it has it in bounds."""
    proven = tidrange.proven_array_accesses(_guarded_kernel(a, b, pred, e, edge, True).kernels[0],
                                            (block, 1024, 1024))
    if not proven:
        return
    mem = Memory(1 << 20)
    for threads in {1, block // 2 or 1, block}:
        out = mem.upload(np.zeros(block, np.int32))
        run_kernel(_guarded_kernel(a, b, pred, e, edge, False), "k", 1, threads, [out], mem)
        got = mem.read(out, np.int32, threads)
        assert ((got >= 0) & (got < COUNT)).all(), (a, b, pred, e, edge, threads, got)



def test_branch_narrowing_is_sound_at_the_edges() -> None:
    """Every compare of a thread index (or block size) with a constant at the edges that matter,
    on both edges, with the index one step from the compared values: each access proven for
    blocks of at most 16 or 64 threads is in bounds for every thread that reaches it."""
    t, bd, c = ("t", 0), ("bd", 0), lambda v: ("c", v)
    lefts = [t, bd, ("sub", t, c(8))]
    rights = [c(v) for v in (-1, 0, 1, 8, 32, 63, 64, 65, 0x7FFFFFFF, 0x80000000)] + [t, bd, ("sub", t, c(8))]
    av, bv = ("a", 0), ("vb", 0)
    indices = [av, bv, ("sub", av, c(8)), ("add", av, c(1)), ("sub", av, bv), ("sub", bv, av)]
    checked = 0
    for a in lefts:
        for b in rights:
            for pred in ("slt", "sle", "sgt", "sge", "ult", "ule", "ugt", "uge"):
                for edge in (True, False):
                    for e in indices:
                        for block in (16, 64):
                            kernel = _guarded_kernel(a, b, pred, e, edge, True).kernels[0]
                            if not tidrange.proven_array_accesses(kernel, (block, 1024, 1024)):
                                continue
                            checked += 1
                            mem = Memory(1 << 20)
                            for threads in {1, block - 1, block}:
                                out = mem.upload(np.zeros(block, np.int32))
                                run_kernel(_guarded_kernel(a, b, pred, e, edge, False), "k", 1, threads, [out], mem)
                                got = mem.read(out, np.int32, threads)
                                assert ((got >= 0) & (got < COUNT)).all(), (a, b, pred, edge, e, threads, got)
    assert checked > 100                   # the sweep proves something to check


def _loop_kernel(start, limit, pred: str, step, e) -> Module:  # type: ignore[no-untyped-def]
    """k(): for (j = start; j pred limit; j += step) s[e(j)] = 1 (a block parameter the
    analysis widens, narrowed again by the header's branch)."""
    kb = KernelBuilder("k", [])
    s = kb.shared_array("s", i32, COUNT)
    entry = kb.block("e")
    head, body, done = kb.block("head", [("j", i32)]), kb.block("body"), kb.block("done")
    kb.set_block(entry)
    t, bd = kb.thread_id("x"), kb.block_dim("x")
    kb.br(head, _build(kb, t, start, bd))
    kb.set_block(head)
    (j,) = head.params
    kb.cbr(kb.icmp(pred, j, _build(kb, t, limit, bd)), body, done)
    kb.set_block(body)
    kb.store(kb.const(1, i32), kb.offset(kb.shared_addr(s), _build(kb, t, e, bd, {"a": j}), i32))
    kb.br(head, kb.add(j, _build(kb, t, step, bd)))
    kb.set_block(done)
    kb.ret()
    return Module("m", [kb.finish()])


def test_loop_indices_are_proven_only_when_in_bounds() -> None:
    """Counted loops over a shared array (the widening of a block parameter, then the narrowing
    by the loop test): an access proven for blocks of at most 16 or 64 threads never faults in
    the interpreter for such blocks (a wrapping counter included)."""
    t, bd, c = ("t", 0), ("bd", 0), lambda v: ("c", v)
    j = ("a", 0)
    checked = 0
    for start in (t, c(0), ("sub", t, c(8)), bd):
        for limit in (c(0), c(63), c(64), c(65), bd, c(0x7FFFFFFF)):
            for pred in ("slt", "sle", "ult", "ule"):
                for step in (c(1), bd, c(0x40000000)):
                    if limit == c(0x7FFFFFFF) and step != c(0x40000000):
                        continue                    # billions of iterations
                    for e in (j, ("add", j, c(1)), ("sub", j, c(1))):
                        for block in (16, 64):
                            module = _loop_kernel(start, limit, pred, step, e)
                            if not tidrange.proven_array_accesses(module.kernels[0], (block, 1024, 1024)):
                                continue
                            checked += 1
                            for threads in {1, block - 1, block}:
                                try:
                                    run_kernel(module, "k", 1, threads, [], Memory(1 << 20), step_limit=1 << 16)
                                except InterpFault as exc:
                                    assert "step limit" in str(exc), (start, limit, pred, step, e, threads, exc)
    assert checked > 50                    # the sweep proves something to check

def test_nvptx_versions_the_kernel_and_drops_the_proven_checks() -> None:
    mod = SAMPLES["scan"].module()
    text = str(lower_module(mod))
    body = text[text.index("define ptx_kernel void @\"scan_blocks\""):] if "@\"scan_blocks\"" in text else \
        text[text.index("@scan_blocks"):]
    assert "small.block" in body and "any.block" in body
    fast = body[body.index("small.block:"):body.index("any.block:")]
    general = body[body.index("any.block:"):]
    # the general copy checks every shared index against 512 elements; the small-block copy none
    assert "icmp ult i32" in general and fast.count(", 512") < general.count(", 512")


@pytest.mark.parametrize("name", ["histogram", "sgemm", "scan"])
def test_the_entry_tests_every_assumption_of_the_small_block_copy(name: str) -> None:
    """The kernel's entry branches to the small-block copy only when every dimension proven for
    fewer than 1024 threads has ``block_dim <= B`` (unsigned) and every divisor parameter lies
    in its range: exactly the assumptions the copy's unchecked accesses were proven under (a
    dimension of 1024 holds for every launch: no block has more threads)."""
    import re

    mod = SAMPLES[name].module()
    choice = tidrange.choose(mod.kernels[0])
    assert choice is not None
    shape, params, _proven = choice
    text = str(lower_module(mod))
    entry = text[text.index("entry:"):text.index("small.block:")]
    tests = set()
    for dim, n in zip("xyz", shape):
        m = re.search(r'%"?([\w.]+)"? = call i32 @"llvm\.nvvm\.read\.ptx\.sreg\.ntid\.' + dim + r'"\(\)', entry)
        if n < 1024:
            assert m is not None, f"block_dim.{dim} is not tested"
            assert re.search(r'icmp ule i32 %"?' + re.escape(m.group(1)) + r'"?, ' + str(n) + r'\b', entry), dim
            tests.add(dim)
    for index, (lo, hi) in params.items():
        arg = f'%"?\\.{index + 1}"?'             # llvmlite names the function's arguments .1, .2, ...
        assert re.search(rf'icmp sge i32 {arg}, {lo}\b', entry) and re.search(rf'icmp sle i32 {arg}, {hi}\b', entry)
    assert tests or params
    assert entry.count("icmp") == len(tests) + 2 * len(params)   # nothing else decides the branch


@pytest.mark.parametrize("pred", ["uge", "ule"])
def test_an_unsigned_guard_over_a_negative_value_narrows_nothing(pred: str) -> None:
    """``select (a uge b), (p + a) - b, q`` with ``a = tid - 4``: for tid < 4, ``a`` is a huge
    unsigned value, so the guard holds and the index is ``a - b`` < 0. The guarded-difference
    rule must not assume ``a - b >= 0`` there (it did not, but no test failed when that
    refusal was removed); every thread's index is checked against what the analysis proves."""
    def kernel(with_access: bool) -> Module:
        kb = KernelBuilder("k", [("out", ptr_global)])
        (out,) = kb.params
        s = kb.shared_array("s", i32, COUNT)
        kb.set_block(kb.block("e"))
        t = kb.thread_id("x")
        a, b, zero = kb.sub(t, kb.const(4, i32)), kb.const(5, i32), kb.const(0, i32)
        guard = kb.icmp("uge", a, b) if pred == "uge" else kb.icmp("ule", b, a)
        idx = kb.select(guard, kb.sub(kb.add(zero, a), b), zero)
        if with_access:
            kb.store(kb.const(1, i32), kb.offset(kb.shared_addr(s), idx, i32))
        kb.store(idx, kb.offset(out, t, i32))
        kb.ret()
        return Module("m", [kb.finish()])

    mem = Memory(1 << 20)
    out = mem.upload(np.zeros(16, np.int32))
    run_kernel(kernel(False), "k", 1, 16, [out], mem)
    got = mem.read(out, np.int32, 16)
    assert (got[:4] < 0).all()                       # the guard holds for tid < 4: out of bounds
    assert not tidrange.proven_array_accesses(kernel(True).kernels[0], (16, 1024, 1024))
