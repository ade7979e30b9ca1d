"""GPU address arithmetic and guarded loads (``GpuHooks.split_offset``, ``GpuHooks.load``).

``offset p, a ± b`` is emitted as two offsets only where ``a ± b`` cannot wrap in any launch
(:func:`vxpu.ir.lower.tidrange.no_wrap_ops`): a hypothesis test builds sums and differences of
thread indices, block sizes, parameters and constants (the edges of i32 included), runs them in
the interpreter for blocks of 1 to 1024 threads and extreme parameter values, and requires
every op the analysis calls wrap-free to have an exact result inside i32. Fixed cases: the
doubling loop ``d <<= 1`` bounded by ``block_dim`` is wrap-free, bounded by a parameter (so
``d`` may reach 2^30 and then wrap to negative values) it is not; x86 never splits. A load
whose one use is ``select c, v, x`` runs under ``c`` only where it has no check: not in the
general copy of a checked kernel, not when its value has another use or ``c`` comes after it.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.interp import InterpFault, Memory, run_kernel
from vxpu.ir.lower import tidrange
from vxpu.ir.lower.gpu import GpuHooks
from vxpu.ir.lower.nvptx import lower_module
from vxpu.ir.lower.x86 import lower_module as lower_x86
from vxpu.ir.model import Module
from vxpu.ir.samples import SAMPLES
from vxpu.ir.types import i32, i64, ptr_global

_LEAF = st.one_of(st.sampled_from([("t",), ("bd",), ("n",), ("bid",)]),
                  st.tuples(st.just("c"), st.one_of(st.integers(-300, 300),
                                                    st.sampled_from([(1 << 31) - 1, -(1 << 31), 1 << 30, -(1 << 30),
                                                                     (1 << 31) - 1024, (1 << 31) - 1023]))))


def _expr(depth: int) -> st.SearchStrategy:
    if depth == 0:
        return _LEAF
    sub = _expr(depth - 1)
    return st.one_of(_LEAF, st.tuples(st.sampled_from(["add", "sub", "shl1", "and1023"]), sub, sub))


def _build(kb: KernelBuilder, e, leaves):  # type: ignore[no-untyped-def]
    if e[0] == "c":
        return kb.const(e[1], i32)
    if e[0] in leaves:
        return leaves[e[0]]
    a, b = _build(kb, e[1], leaves), _build(kb, e[2], leaves)
    if e[0] == "shl1":
        return kb.shl(a, kb.const(1, i32))
    if e[0] == "and1023":
        return kb.and_(a, kb.const(1023, i32))
    return getattr(kb, e[0])(a, b)


def _kernel(op: str, ea, eb) -> Module:  # type: ignore[no-untyped-def]
    """k(n, out): out[2t] = a, out[2t + 1] = b, and r = a op b (the op under test)."""
    kb = KernelBuilder("k", [("n", i32), ("out", ptr_global)])
    n, out = kb.params
    kb.set_block(kb.block("e"))
    leaves = {"t": kb.thread_id("x"), "bd": kb.block_dim("x"), "n": n, "bid": kb.block_id("x")}
    a, b = _build(kb, ea, leaves), _build(kb, eb, leaves)
    r = getattr(kb, op)(a, b)
    t2 = kb.add(leaves["t"], leaves["t"])
    kb.store(a, kb.offset(out, t2, i32))
    kb.store(b, kb.offset(out, kb.add(t2, kb.const(1, i32)), i32))
    kb.store(r, kb.offset(out, kb.const(4096, i32), i32))
    kb.ret()
    return Module("m", [kb.finish()])


def _the_op(module: Module, op: str):  # type: ignore[no-untyped-def]
    ops = [o for b in module.kernels[0].blocks for o in b.ops if o.opcode == op]
    return ops[-3] if op == "add" else ops[-1]   # before t + t and 2t + 1


@settings(max_examples=150, deadline=None)
@given(op=st.sampled_from(["add", "sub"]), ea=_expr(2), eb=_expr(2))
def test_ops_called_wrap_free_never_wrap(op: str, ea, eb) -> None:  # type: ignore[no-untyped-def]
    module = _kernel(op, ea, eb)
    target = _the_op(module, op)
    if id(target) not in tidrange.no_wrap_ops(module.kernels[0]):
        return
    for threads in (33, 1024):
        for n in (0, -1, (1 << 31) - 1, -(1 << 31)):
            mem = Memory(1 << 20)
            out = mem.upload(np.zeros(4097, np.int32))
            run_kernel(module, "k", 1, threads, [n, out], mem)
            got = mem.read(out, np.int32, 2 * threads).astype(np.int64)
            exact = got[0::2] + got[1::2] if op == "add" else got[0::2] - got[1::2]
            assert ((exact >= -(1 << 31)) & (exact < (1 << 31))).all(), (op, ea, eb, threads, n)


def _doubling(bound: str) -> Module:
    """k(n): d = 1; while d ult bound: s[(d + t) & 63] = 1; d <<= 1 (bound: block_dim.x or n)."""
    kb = KernelBuilder("k", [("n", i32)])
    (n,) = kb.params
    s = kb.shared_array("s", i32, 64)
    entry, head, body, done = kb.block("e"), kb.block("h", [("d", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    t = kb.thread_id("x")
    lim = kb.block_dim("x") if bound == "bd" else n
    kb.br(head, kb.const(1, i32))
    kb.set_block(head)
    (d,) = head.params
    kb.cbr(kb.icmp("ult", d, lim), body, done)
    kb.set_block(body)
    kb.store(kb.const(1, i32), kb.offset(kb.shared_addr(s), kb.and_(kb.add(d, t), kb.const(63, i32)), i32))
    kb.br(head, kb.shl(d, kb.const(1, i32)))
    kb.set_block(done)
    kb.ret()
    return Module("m", [kb.finish()])


@pytest.mark.parametrize("bound,free", [("bd", True), ("n", False)])
def test_doubling_counter_plus_thread_index(bound: str, free: bool) -> None:
    """``d + t`` under ``d ult block_dim`` stays below 2048; under ``d ult n`` (any n) the
    doubling reaches 2^30 and ``d + t`` may pass 2^31 - 1 (and ``d`` then wraps to 2^31)."""
    module = _doubling(bound)
    add = next(o for b in module.kernels[0].blocks for o in b.ops if o.opcode == "add")
    assert (id(add) in tidrange.no_wrap_ops(module.kernels[0])) is free


def _offset_kernel(c: int) -> Module:
    """k(out): s[t + c] = 1 with s: i32[64] (c = 1: no wrap; c = 2^31 - 1: t + c wraps)."""
    kb = KernelBuilder("k", [("out", ptr_global)])
    s = kb.shared_array("s", i32, 64)
    kb.set_block(kb.block("e"))
    t = kb.thread_id("x")
    kb.store(kb.const(1, i32), kb.offset(kb.shared_addr(s), kb.add(t, kb.const(c, i32)), i32))
    kb.ret()
    return Module("m", [kb.finish()])


def _geps(text: str) -> int:
    return text.count("getelementptr i8, i8 addrspace(3)*")


@pytest.mark.parametrize("checked", [False, True])
def test_offsets_split_only_where_the_index_cannot_wrap(checked: bool) -> None:
    split = str(lower_module(_offset_kernel(1), checked))
    whole = str(lower_module(_offset_kernel((1 << 31) - 1), checked))
    assert _geps(split) == _geps(whole) + 1
    saved = GpuHooks.split_offsets
    try:
        GpuHooks.split_offsets = ""
        assert _geps(str(lower_module(_offset_kernel(1), checked))) == _geps(whole)
    finally:
        GpuHooks.split_offsets = saved


def test_x86_never_splits() -> None:
    a, b = str(lower_x86(_offset_kernel(1))), str(lower_x86(_offset_kernel((1 << 31) - 1)))
    assert a.count("add i64") == b.count("add i64")


def _kernel_text(name: str, kernel: str, checked: bool) -> str:
    text = str(lower_module(SAMPLES[name].module(), checked))
    start = text.index(f"@{kernel}(") if f"@{kernel}(" in text else text.index(f'@"{kernel}"(')
    end = text.find("\ndefine ", start)
    return text[start:end if end >= 0 else len(text)]


def test_scan_back_load_is_guarded_where_unchecked() -> None:
    unchecked = _kernel_text("scan", "scan_blocks", False)
    assert unchecked.count("load.then") >= 1
    checked = _kernel_text("scan", "scan_blocks", True)
    # the general copy's blocks follow the fast copy's: it starts where any.block branches to
    head = checked[checked.index("any.block:"):].split("\n")[1].split("label ")[1].strip()
    cut = checked.index(f"\n{head.strip('%').strip(chr(34))}:")
    fast, general = checked[:cut], checked[cut:]
    assert "load.then" in fast and "load.then" not in general   # the general copy checks it
    saved = GpuHooks.guarded_loads
    try:
        GpuHooks.guarded_loads = ""
        assert "load.then" not in _kernel_text("scan", "scan_blocks", False)
    finally:
        GpuHooks.guarded_loads = saved


def _select_kernel(order: str) -> Module:
    """k(out): v = s[t]; out[t] = select(t uge 3, v, 0), with ``order``: "before" (the compare
    before the load), "after" (after it) or "twice" (v also stored)."""
    kb = KernelBuilder("k", [("out", ptr_global)])
    (out,) = kb.params
    s = kb.shared_array("s", i32, 64)
    kb.set_block(kb.block("e"))
    t = kb.thread_id("x")
    slot = kb.offset(kb.shared_addr(s), kb.and_(t, kb.const(63, i32)), i32)
    c = kb.icmp("uge", t, kb.const(3, i32)) if order != "after" else None
    v = kb.load(slot, i32)
    if c is None:
        c = kb.icmp("uge", t, kb.const(3, i32))
    kb.store(kb.select(c, v, kb.const(0, i32)), kb.offset(out, t, i32))
    if order == "twice":
        kb.store(v, kb.offset(out, kb.add(t, kb.const(64, i32)), i32))
    kb.ret()
    return Module("m", [kb.finish()])


@pytest.mark.parametrize("order,guarded", [("before", True), ("after", False), ("twice", False)])
def test_only_a_load_used_once_by_a_select_is_guarded(order: str, guarded: bool) -> None:
    assert ("load.then" in str(lower_module(_select_kernel(order), False))) is guarded


_PREDS = ["slt", "sle", "sgt", "sge", "ult", "ule", "ugt", "uge", "ne"]
_LOOP_LEAF = st.one_of(st.sampled_from([("t",), ("bd",), ("n",), ("j",)]),
                       st.tuples(st.just("c"), st.one_of(st.integers(-40, 40),
                                                         st.sampled_from([(1 << 31) - 1, -(1 << 31), 1 << 30,
                                                                          (1 << 31) - 1024, 1023, 1024]))))


def _loop_expr(depth: int) -> st.SearchStrategy:
    if depth == 0:
        return _LOOP_LEAF
    sub = _loop_expr(depth - 1)
    return st.one_of(_LOOP_LEAF, st.tuples(st.sampled_from(["add", "sub", "shl1", "and1023", "mul", "lshr1", "urem"]),
                                           sub, sub))


def _loop_build(kb: KernelBuilder, e, leaves):  # type: ignore[no-untyped-def]
    if e[0] == "c":
        return kb.const(e[1], i32)
    if e[0] in leaves:
        return leaves[e[0]]
    a, b = _loop_build(kb, e[1], leaves), _loop_build(kb, e[2], leaves)
    if e[0] in ("shl1", "lshr1"):
        return getattr(kb, e[0][:-1])(a, kb.const(1, i32))
    if e[0] == "and1023":
        return kb.and_(a, kb.const(1023, i32))
    return getattr(kb, e[0])(a, b)


@settings(max_examples=120, deadline=None)
@given(op=st.sampled_from(["add", "sub"]), init=_LOOP_LEAF.filter(lambda e: e[0] != "j"),
       pred=st.sampled_from(_PREDS), lim=_loop_expr(1), step=st.sampled_from(["add1", "add3", "shl", "lshr", "sub1"]),
       pred2=st.sampled_from(_PREDS), x2=_loop_expr(1), y2=_loop_expr(1), ea=_loop_expr(2), eb=_loop_expr(2))
def test_loop_ops_called_wrap_free_never_wrap(op, init, pred, lim, step, pred2, x2, y2, ea, eb) -> None:  # type: ignore[no-untyped-def]
    """The same in a loop: j from init while (j pred lim) { if (x pred2 y) { r = a op b } ;
    j = j+1 | j+3 | j<<1 | j>>1 | j-1 } — block parameters, widening and the narrowing of both
    branches. The kernel itself flags (out[0] = 1) any run of the op whose exact result leaves
    i32 (sext(a) op sext(b) != sext(a op b)); an op the analysis calls wrap-free must never."""
    kb = KernelBuilder("k", [("n", i32), ("out", ptr_global)])
    n, out = kb.params
    entry, head, body, then, wrap, latch, done = (kb.block("e"), kb.block("h", [("j", i32)]), kb.block("b"),
                                                  kb.block("t"), kb.block("w"), kb.block("l"), kb.block("x"))
    kb.set_block(entry)
    leaves = {"t": kb.thread_id("x"), "bd": kb.block_dim("x"), "n": n}
    kb.br(head, _loop_build(kb, init, leaves))
    kb.set_block(head)
    leaves["j"] = head.params[0]
    kb.cbr(kb.icmp(pred, leaves["j"], _loop_build(kb, lim, leaves)), body, done)
    kb.set_block(body)
    kb.cbr(kb.icmp(pred2, _loop_build(kb, x2, leaves), _loop_build(kb, y2, leaves)), then, latch)
    kb.set_block(then)
    a, b = _loop_build(kb, ea, leaves), _loop_build(kb, eb, leaves)
    r = getattr(kb, op)(a, b)
    wide = getattr(kb, op)(kb.sext(a, i64), kb.sext(b, i64))
    kb.cbr(kb.icmp("ne", wide, kb.sext(r, i64)), wrap, latch)
    kb.set_block(wrap)
    kb.store(kb.const(1, i32), kb.offset(out, kb.const(0, i32), i32))
    kb.br(latch)
    kb.set_block(latch)
    j = leaves["j"]
    nxt = {"add1": lambda: kb.add(j, kb.const(1, i32)), "add3": lambda: kb.add(j, kb.const(3, i32)),
           "shl": lambda: kb.shl(j, kb.const(1, i32)), "lshr": lambda: kb.lshr(j, kb.const(1, i32)),
           "sub1": lambda: kb.sub(j, kb.const(1, i32))}[step]()
    kb.br(head, nxt)
    kb.set_block(done)
    kb.ret()
    module = Module("m", [kb.finish()])
    if id(r.op) not in tidrange.no_wrap_ops(module.kernels[0]):
        return
    for threads in (5, 1024):
        for nv in (0, 7, -1, (1 << 31) - 1, -(1 << 31), 1 << 30):
            mem = Memory(1 << 20)
            buf = mem.upload(np.zeros(4, np.int32))
            try:
                run_kernel(module, "k", 1, threads, [nv, buf], mem, step_limit=1 << 15)
            except InterpFault as exc:
                assert "step limit" in str(exc), exc
            assert mem.read(buf, np.int32, 1)[0] == 0, (threads, nv)
