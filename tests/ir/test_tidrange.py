"""Array indices proven for small blocks (``vxpu.ir.lower.tidrange``) and the GPU copy it picks.

The proof must be sound: an index it calls in bounds for blocks of at most ``B`` threads must be
in bounds for every thread of every such block. A hypothesis test builds random index
expressions over ``thread_id.x`` (adds, subs, muls, shifts, masks, remainders, selects, with
wrapping), computes every thread's index with the interpreter, and requires each index the
analysis proves to lie inside the array. Fixed cases: the samples' reductions and tiles are
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
from vxpu.ir.interp import Memory, run_kernel
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


_LEAVES = st.sampled_from(["t", "c"])
_OPS = st.sampled_from(["add", "sub", "mul", "shl", "lshr", "and", "urem", "select"])


_CONSTS = st.one_of(st.integers(-70, 70), st.sampled_from([1 << k for k in (24, 26, 28, 29, 30, 31)]),
                    st.sampled_from([24, 26, 28, 29, 30, 31]))


def _expr(depth: int) -> st.SearchStrategy:
    if depth == 0:
        return st.tuples(_LEAVES, _CONSTS)
    return st.one_of(st.tuples(_LEAVES, _CONSTS), st.tuples(_OPS, _expr(depth - 1), _expr(depth - 1)))


def _build(kb: KernelBuilder, t, e):  # type: ignore[no-untyped-def]
    c = lambda v: kb.const(v - (1 << 32) if v >= 1 << 31 else v, i32)
    if e[0] == "t":
        return t
    if e[0] == "c":
        return c(e[1])
    a, b = _build(kb, t, e[1]), _build(kb, t, e[2])
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
    idx = _build(kb, t, e)
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
