"""Unrolling doubling/halving barrier loops by 2 (``vxpu.ir.lower.unroll``).

The unrolled kernel must compute what the original computes for every trip count: scan's
level loop and a halving loop run in the interpreter, original and unrolled, for blocks whose
level count is 0, 1, odd and even (1, 2, 3, 100, 128, 256 threads) on random data with a
partial last block, with the data-race detector on, and must agree bit for bit (an unroll that
dropped the exit test of the copy would run a level too many for odd counts). The unrolled
kernel passes the verifier. Only loops with a barrier, a doubling/halving counter in the
header's test and an alternating parameter qualify (scan, not dot's or softmax's reductions);
the NVPTX lowering emits the copy unless ``GpuHooks.unroll_shift_loops`` is off.
"""

from __future__ import annotations

import numpy as np
import pytest
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.interp import Memory, run_kernel
from vxpu.ir.lower import unroll
from vxpu.ir.lower.gpu import GpuHooks
from vxpu.ir.lower.nvptx import lower_module
from vxpu.ir.model import Module
from vxpu.ir.samples import SAMPLES
from vxpu.ir.types import i32, ptr_global
from vxpu.ir.verify import verify


def _unrolled(module: Module) -> Module:
    out = Module(module.name, [unroll.unroll_shift_loops(k) for k in module.kernels])
    verify(out)
    return out


def _run_scan(module: Module, n: int, block: int, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mem = Memory(1 << 22)
    g = (n + block - 1) // block
    src, out, sums = mem.upload(data), mem.upload(np.zeros(n, np.int32)), mem.upload(np.zeros(g, np.int32))
    run_kernel(module, "scan_blocks", g, block, [n, src, out, sums], mem, detect_races=True)
    return mem.read(out, np.int32, n), mem.read(sums, np.int32, g)


@pytest.mark.parametrize("block", [1, 2, 3, 100, 128, 256])
def test_unrolled_scan_computes_the_same_for_every_level_count(block: int) -> None:
    module = SAMPLES["scan"].module()
    unrolled = _unrolled(module)
    assert unrolled.kernels[0] is not module.kernels[0]          # scan's level loop qualifies
    n = 3 * block - 1 if block > 1 else 5
    data = np.random.default_rng(block).integers(-1000, 1000, n).astype(np.int32)
    want = _run_scan(module, n, block, data)
    got = _run_scan(unrolled, n, block, data)
    assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])


def _halving(alternate: bool) -> Module:
    """k(out): s[t] = t; for (h = bdim >> 1, a = 0; h > 0; h >>= 1, a = 64 - a):
    { if t < h: s[a + t]... } — a tree sum over the two halves of s, ping-ponging with ``a``
    (or with ``a`` fixed at 0 when not ``alternate``); out[t] = s[t] at the end."""
    kb = KernelBuilder("k", [("out", ptr_global)])
    (out,) = kb.params
    s = kb.shared_array("s", i32, 128)
    entry, head, body, done = kb.block("e"), kb.block("h", [("h", i32), ("a", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    t, bd = kb.thread_id("x"), kb.block_dim("x")
    base = kb.shared_addr(s)
    kb.store(t, kb.offset(base, t, i32))
    kb.store(t, kb.offset(base, kb.add(t, kb.const(64, i32)), i32))
    kb.barrier()
    kb.br(head, kb.lshr(bd, kb.const(1, i32)), kb.const(0, i32))
    kb.set_block(head)
    h, a = head.params
    kb.cbr(kb.icmp("ugt", h, kb.const(0, i32)), body, done)
    kb.set_block(body)
    x = kb.load(kb.offset(base, kb.add(a, t), i32), i32)
    y = kb.load(kb.offset(base, kb.add(a, kb.and_(kb.add(t, h), kb.const(63, i32))), i32), i32)
    nxt = kb.sub(kb.const(64, i32), a) if alternate else a
    kb.store(kb.add(x, y), kb.offset(base, kb.add(nxt, t), i32))
    kb.barrier()
    kb.br(head, kb.lshr(h, kb.const(1, i32)), nxt)
    kb.set_block(done)
    kb.store(kb.load(kb.offset(base, kb.add(a, t), i32), i32), kb.offset(out, t, i32))
    kb.ret()
    return Module("m", [kb.finish()])


@pytest.mark.parametrize("block", [1, 2, 3, 5, 16, 33, 64])
def test_unrolled_halving_loop_computes_the_same(block: int) -> None:
    module = _halving(True)
    unrolled = _unrolled(module)
    assert unrolled.kernels[0] is not module.kernels[0]
    got = []
    for m in (module, unrolled):
        mem = Memory(1 << 20)
        out = mem.upload(np.zeros(block, np.int32))
        run_kernel(m, "k", 1, block, [out], mem, detect_races=True)
        got.append(mem.read(out, np.int32, block))
    assert np.array_equal(got[0], got[1]), (block, got)


def test_only_loops_with_an_alternating_parameter_qualify() -> None:
    assert not unroll.shift_loops(_halving(False).kernels[0])
    for name in ("dot", "softmax", "sgemm", "histogram"):
        for k in SAMPLES[name].module().kernels:
            assert unroll.unroll_shift_loops(k) is k, name
    assert len(unroll.shift_loops(SAMPLES["scan"].module().kernels[0])) == 1


def test_nvptx_emits_the_unrolled_level_loop() -> None:
    module = SAMPLES["scan"].module()
    assert ".u2" in str(lower_module(module, False))
    saved = GpuHooks.unroll_shift_loops
    try:
        GpuHooks.unroll_shift_loops = False
        assert ".u2" not in str(lower_module(module, False))
    finally:
        GpuHooks.unroll_shift_loops = saved
