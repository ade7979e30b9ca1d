"""The range copy (``vxpu.ir.lower.rangecopy``): global accesses proven for a whole block at entry.

* Soundness: the entry test, JIT-compiled for the host exactly as the GPU lowering emits it
  (:meth:`RangePlan.emit`), is evaluated for every block of random launches of random kernels
  (a counted loop with a barrier reading ``a[expr]``, ``expr`` a random tree of add, sub, mul,
  shl and select over the counter, thread and block indices, parameters and constants, with
  values near the i32 limits); whenever it holds for every block, the interpreter runs the
  launch without a fault. A test that drops the last iteration, the thread range or a wrap
  check fails this sweep.
* Structure: sgemm's and scan's NVPTX kernels test the range of every global buffer at entry
  (each hidden length is compared) and their fast copy has fewer fault exits than the general.
"""

from __future__ import annotations

import ctypes
import random
import re
import struct

import numpy as np
import pytest
from llvmlite import ir
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.interp import InterpFault, Memory, run_kernel
from vxpu.ir.lower import rangecopy
from vxpu.ir.lower.common import reverse_postorder
from vxpu.ir.lower.nvptx import lower_module
from vxpu.ir.lower.toolchain import llvm_binding
from vxpu.ir.model import Module, Value
from vxpu.ir.samples import SAMPLES
from vxpu.ir.types import f32, i32, ptr_global

from tests.ir.lowerhelpers import cuda_session, jit_function

I32 = ir.IntType(32)
I64 = ir.IntType(64)
BIG = [0, 1, 3, 7, 40, (1 << 30), (1 << 31) - 3, -(1 << 31) + 5, -2, 1 << 16]


def _expr(kb: KernelBuilder, rng: random.Random, leaves: list, depth: int):  # type: ignore[no-untyped-def]
    if depth == 0 or rng.random() < 0.25:
        pick = rng.randrange(len(leaves) + 1)
        return leaves[pick] if pick < len(leaves) else kb.const(rng.choice(BIG + list(range(-3, 12))), i32)
    op = rng.choice(["add", "add", "sub", "mul", "shl", "select"])
    a = _expr(kb, rng, leaves, depth - 1)
    if op == "shl":
        return kb.shl(a, kb.const(rng.randrange(0, 5), i32))
    b = _expr(kb, rng, leaves, depth - 1)
    if op == "select":
        return kb.select(kb.icmp("slt", a, b), a, b)
    return getattr(kb, op)(a, b)


def _kernel(rng: random.Random) -> Module:
    """k(n, p, a): j from init by step while j < n: v = a[expr] (then a barrier, if every thread
    of a block runs the same iterations); after the loop: ret."""
    kb = KernelBuilder("k", [("n", i32), ("p", i32), ("a", ptr_global)])
    n, p, a = kb.params
    entry, head, body, done = kb.block("e"), kb.block("h", [("j", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    tx, ty, bx = kb.thread_id("x"), kb.thread_id("y"), kb.block_id("x")
    uniform = rng.random() < 0.5           # a barrier in the loop needs one trip count per block
    init = rng.choice([kb.const(rng.randrange(-2, 4), i32), p, kb.mul(p, kb.const(4, i32)), kb.add(p, p)]
                      + ([] if uniform else [tx, kb.add(tx, bx)]))
    step = rng.choice([kb.const(rng.randrange(1, 5), i32), kb.const(16, i32), p, kb.block_dim("x")])
    kb.br(head, init)
    kb.set_block(head)
    j = head.params[0]
    kb.cbr(kb.icmp("slt", j, n), body, done)
    kb.set_block(body)
    idx = _expr(kb, rng, [j, tx, ty, bx, p, kb.block_dim("x")], 3)
    kb.load(kb.offset(a, idx, f32), f32)
    if uniform:
        kb.barrier()
    kb.br(head, kb.add(j, step))
    kb.set_block(done)
    kb.ret()
    return Module("m", [kb.finish()])


class _Jit:
    """The plan's entry test as a host function: (n, p, a, base, length, bid, bdim, gdim) -> ok."""

    def __init__(self, plan: rangecopy.RangePlan, windows: bool = False) -> None:
        llvm = llvm_binding()
        mod = ir.Module("rt")
        mod.triple = llvm.get_process_triple()
        fnty = ir.FunctionType(I32, [I32, I32, I64, I64, I64] + [I32] * 9 + [I32, I32])
        fn = ir.Function(mod, fnty, "ok")
        n, p, a, base, length, *geo = fn.args
        wlo, whi = geo[-2:]
        b = ir.IRBuilder(fn.append_basic_block("e"))
        a_ptr = b.inttoptr(a, ir.IntType(8).as_pointer(1))
        names = {(o, d): geo[3 * k + "xyz".index(d)] for k, o in enumerate(("block_id", "block_dim", "grid_dim"))
                 for d in "xyz"}
        # with windows: a's f32 element window as the host fills it (gpu_checked.element_window)
        leaves = rangecopy.Leaves([n, p, a_ptr], lambda _b, opcode, dim: names[(opcode, dim)], {2: (base, length)},
                                  {(2, 4): (wlo, whi)} if windows else None)
        b.ret(b.zext(plan.emit(b, leaves), I32))
        self.fn = jit_function(mod, "ok", ctypes.CFUNCTYPE(ctypes.c_int32, *[ctypes.c_int32] * 2,
                                                           *[ctypes.c_uint64] * 3, *[ctypes.c_int32] * 11))

    def __call__(self, n: int, p: int, a: int, base: int, length: int, bid: int, block: tuple[int, int],
                 grid: int) -> bool:
        from vxpu.accel.gpu_checked import element_window
        wlo, whi = element_window(a, base, length, 4)
        return bool(self.fn(n, p, a, base, length, bid, 0, 0, block[0], block[1], 1, grid, 1, 1, wlo, whi))


@pytest.mark.parametrize("windows", [False, True])
def test_random_kernels_run_without_fault_whenever_the_entry_test_holds(windows: bool) -> None:
    """(windows: the access is tested against a's host-filled element window)"""
    rng = random.Random(20261202)
    proven = held = 0
    for case in range(400):
        module = _kernel(rng)
        kernel = module.kernels[0]
        plan = rangecopy.plan(kernel, reverse_postorder(kernel), every=True)
        if plan is None:
            continue
        proven += 1
        jit = _Jit(plan, windows)
        for _ in range(3):
            n, p = rng.choice([rng.randrange(-2, 12), rng.choice(BIG)]), rng.choice(BIG[:5] + [rng.randrange(-4, 9)])
            count = rng.randrange(0, 300)
            delta = rng.choice([0, 0, 4, 8, 2])
            block, grid = (rng.choice([1, 2, 4, 5]), rng.choice([1, 2])), rng.choice([1, 2, 3])
            mem = Memory(1 << 20)
            base = mem.alloc(max(4 * count, 1))
            ok = all(jit(n, p, base + delta, base, 4 * count, bid, block, grid) for bid in range(grid))
            if not ok:
                continue
            held += 1
            try:
                run_kernel(module, "k", grid, block, [n, p, base + delta], mem, step_limit=1 << 17)
            except InterpFault as exc:
                assert "step limit" in str(exc), (case, n, p, count, delta, block, grid, exc)
    assert proven > 150 and held > 100, (proven, held)       # the sweep proves something


def _wrap(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >> 31 else x


def _eval(v, env: dict) -> int:  # type: ignore[no-untyped-def]
    """The i32 value of ``v`` (IR semantics: wrapping add/sub/mul/shl) given ``env``'s leaves."""
    if v in env:
        return env[v]
    op = v.op
    name = op.opcode
    if name == "const":
        return _wrap(int(op.imm))
    if name in ("thread_id", "block_id", "block_dim"):
        return env[(name, op.dim or "x")]
    args = [_eval(x, env) for x in op.operands]
    if name == "icmp":
        return int(args[0] < args[1])
    if name == "select":
        return args[1] if args[0] else args[2]
    if name == "shl":
        return 0 if not 0 <= args[1] < 32 else _wrap(args[0] << args[1])
    return _wrap({"add": args[0] + args[1], "sub": args[0] - args[1], "mul": args[0] * args[1]}[name])


@pytest.mark.parametrize("windows", [False, True])
def test_random_kernels_huge_buffers_every_access_in_bounds_whenever_the_test_holds(windows: bool) -> None:
    """The same kernels against buffers up to 2^36 bytes (pointers anywhere inside), checked by
    evaluating every thread's every iteration directly with i32 wrapping: a wrapped index that
    the test's exact intervals would place in bounds must still fail the test (windows: the
    access tested against a's host-filled element window)."""
    rng = random.Random(6)
    held = 0
    for _ in range(300):
        module = _kernel(rng)
        kernel = module.kernels[0]
        plan = rangecopy.plan(kernel, reverse_postorder(kernel), every=True)
        if plan is None:
            continue
        jit = _Jit(plan, windows)
        body = kernel.blocks[2]
        load = next(op for op in body.ops if op.opcode == "load")
        idx = load.operands[0].op.operands[1]
        head = kernel.blocks[1]
        j = head.params[0]
        init = kernel.blocks[0].terminator.successors[0].args[0]
        step = body.terminator.successors[0].args[0].op.operands[1]
        n_param, p_param = kernel.params[0], kernel.params[1]
        for _ in range(4):
            n = rng.choice([rng.randrange(-2, 12), rng.choice(BIG), (1 << 31) - rng.randrange(1, 40)])
            p = rng.choice(BIG + [rng.randrange(-4, 9), (1 << 28) + rng.randrange(-3, 3)])
            base = 8 * rng.randrange(1, 1 << 40)
            length = rng.choice([4 * rng.randrange(0, 1 << 34), rng.randrange(0, 1 << 36), 1 << 36])
            ptr = base + rng.choice([0, 4 * rng.randrange(0, 1 << 33), rng.randrange(0, 1 << 34), -4])
            block, grid = (rng.choice([1, 2, 3]), rng.choice([1, 2])), rng.choice([1, 2])
            oks = [jit(n, p, ptr & ((1 << 64) - 1), base, length, bid, block, grid) for bid in range(grid)]
            if not all(oks):
                continue
            held += 1
            for bid in range(grid):
                for tx in range(block[0]):
                    for ty in range(block[1]):
                        env = {n_param: _wrap(n), p_param: _wrap(p), ("thread_id", "x"): tx, ("thread_id", "y"): ty,
                               ("block_id", "x"): bid, ("block_dim", "x"): block[0], ("block_dim", "y"): block[1]}
                        jv = _eval(init, env)
                        for _trip in range(64):
                            env[j] = jv
                            if not jv < _wrap(n):
                                break
                            off = (ptr + 4 * _eval(idx, env) - base) & ((1 << 64) - 1)
                            assert off % 4 == 0 and off + 4 <= length, (n, p, base, length, ptr, bid, tx, ty, jv)
                            jv = _wrap(jv + _eval(step, env))
    assert held > 100, held


def test_an_access_past_the_end_in_the_last_iteration_fails_the_test() -> None:
    """j = 0, 16, ..., < k reading a[row*k + j + tx] (sgemm's A tile): the test holds for an
    m x k buffer and fails when it is one element short (the last iteration's last thread)."""
    kernel = SAMPLES["sgemm"].module().kernels[0]
    plan = rangecopy.plan(kernel, reverse_postorder(kernel))
    assert plan is not None and len(plan.accesses) == 3
    a_only = rangecopy.RangePlan({k: v for k, v in plan.accesses.items() if v.param == 3}, plan.loops)
    assert len(a_only.accesses) == 1
    llvm = llvm_binding()
    mod = ir.Module("rt")
    mod.triple = llvm.get_process_triple()
    fn = ir.Function(mod, ir.FunctionType(I32, [I32, I32, I32, I64, I64, I64, I32, I32, I32, I32]), "ok")
    m, n, k, a, base, length, bx, by, dx, dy = fn.args
    b = ir.IRBuilder(fn.append_basic_block("e"))
    geo = {("block_id", "x"): bx, ("block_id", "y"): by, ("block_dim", "x"): dx, ("block_dim", "y"): dy}
    null = ir.Constant(ir.IntType(8).as_pointer(1), None)
    leaves = rangecopy.Leaves([m, n, k, b.inttoptr(a, null.type), null, null], lambda _b, o, d: geo[(o, d)],
                              {3: (base, length)})
    b.ret(b.zext(a_only.emit(b, leaves), I32))
    ok = jit_function(mod, "ok", ctypes.CFUNCTYPE(ctypes.c_int32, *[ctypes.c_int32] * 3, *[ctypes.c_uint64] * 3,
                                                  *[ctypes.c_int32] * 4))
    size = 64
    last = (size // 16 - 1, size // 16 - 1)
    assert ok(size, size, size, 4096, 4096, 4 * size * size, *last, 16, 16)
    assert not ok(size, size, size, 4096, 4096, 4 * size * size - 4, *last, 16, 16)
    assert ok(size, size, size, 4096, 4096, 4 * size * size - 4, 0, 0, 16, 16)       # an earlier row
    assert not ok(size, size, size, 4098, 4096, 4 * size * size, 0, 0, 16, 16)       # misaligned
    assert not ok(size, size, size, 4096, 4096, 4 * size * size, *last, 16, 17)     # one row more
    assert not ok(size, size, size, 4096, 4096, 4 * size * size, *last, 17, 16)     # one column more


@pytest.mark.parametrize("name, params", [("sgemm", (3, 4, 5)), ("softmax", (2, 3))])
def test_nvptx_tests_every_global_buffer_at_entry(name: str, params: tuple[int, ...]) -> None:
    """The range test compares an offset with each pointer parameter's hidden length, and the
    range copy keeps no global fault exit (a cmpxchg of the record)."""
    mod = SAMPLES[name].module()
    text = str(lower_module(mod))
    kname = mod.kernels[0].name
    start = text.index(f'define ptx_kernel void @"{kname}"') if f'@"{kname}"' in text else text.index(f"@{kname}(")
    body = text[start:text.index("\n}\n", start)]
    check = body[body.index("range.check:"):]
    check = check[:re.search(r"\n[\w.\"]+:", check).start()]   # up to the next block's label
    nargs = len(mod.kernels[0].params)
    nptr = len(params)
    for k, index in enumerate(params):
        # its length (the offset form), or its f32 element window (lo, hi: sign-extended)
        length = f'%".{nargs + 2 * k + 2}"'
        lo, hi = (f'%".{nargs + 2 * nptr + 8 * k + 5 + d}"' for d in (0, 1))
        assert re.search(r"icmp ult i64 %[\w.\"]+, " + re.escape(length), check) \
            or (f"sext i32 {lo} to i64" in check and f"sext i32 {hi} to i64" in check), (index, length)
    without = _without_range_copy(mod)
    start = without.index(f'define ptx_kernel void @"{kname}"') if f'@"{kname}"' in without else without.index(f"@{kname}(")
    general = without[start:without.index("\n}\n", start)]
    # sgemm without the range copy has a small-block copy with the global checks; softmax none,
    # so its range copy, holding no fault exit, adds none to the general copy's
    have, before = body.count("cmpxchg"), general.count("cmpxchg")
    assert (have < before) if name == "sgemm" else (have == before), (have, before)


def _without_range_copy(mod: Module) -> str:
    from vxpu.ir.lower.gpu import GpuHooks

    saved = GpuHooks.range_copy
    GpuHooks.range_copy = False
    try:
        return str(lower_module(mod))
    finally:
        GpuHooks.range_copy = saved


def test_exit_free_copy_for_softmax_and_none_for_kernels_without_barriers() -> None:
    from vxpu.ir.lower.nvptx import NvptxHooks

    for name, want in (("softmax", True), ("sgemm", True), ("vector_add", False), ("saxpy", False),
                       ("stencil2d", False), ("scan", False), ("dot", False), ("histogram", False)):
        kernel = SAMPLES[name].module().kernels[0]
        version, ranged = NvptxHooks(True)._copies(kernel)
        assert (ranged is not None) == want, name
    kernel = SAMPLES["softmax"].module().kernels[0]
    version, ranged = NvptxHooks(True)._copies(kernel)
    assert version is not None and ranged is not None
    proven = version[2] | set(ranged.accesses) | rangecopy.direct_array_accesses(kernel)
    assert not rangecopy.exits_before_barrier(kernel, proven)
    assert rangecopy.exits_before_barrier(kernel, set(ranged.accesses))   # the shared checks stay


def test_intervals_stay_exact_in_i64() -> None:
    """A product whose exact bounds could pass 2^62 (``tid * (p * p)``) tests its operands to
    fit i32 first: its interval, computed in i64, then cannot wrap."""
    kb = KernelBuilder("k", [("p", i32), ("a", ptr_global)])
    p, a = kb.params
    kb.set_block(kb.block("e"))
    square = kb.mul(p, p)
    idx = kb.mul(kb.thread_id("x"), square)
    kb.load(kb.offset(a, idx, f32), f32)
    kb.ret()
    kernel = kb.finish()
    analysis = rangecopy._Analysis({})
    node = analysis.node(idx)
    assert node is not None and node.fit_args and not analysis.node(square).fit_args  # type: ignore[union-attr]
    assert max(-node.lo, node.hi) <= 1 << 62
    assert rangecopy.plan(kernel, reverse_postorder(kernel), every=True) is None   # no loop: no copy


def test_unknown_leaves_are_not_proven() -> None:
    """An index read from memory, or a counter used after its loop, is not proven."""
    kb = KernelBuilder("k", [("n", i32), ("a", ptr_global)])
    n, a = kb.params
    entry, head, body, done = kb.block("e"), kb.block("h", [("j", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    one = kb.const(1, i32)
    kb.br(head, kb.const(0, i32))
    kb.set_block(head)
    j = head.params[0]
    kb.cbr(kb.icmp("slt", j, n), body, done)
    kb.set_block(body)
    v = kb.load(kb.offset(a, j, i32), i32)
    kb.load(kb.offset(a, v, i32), i32)                 # data-dependent
    kb.barrier()
    kb.br(head, kb.add(j, one))
    kb.set_block(done)
    kb.load(kb.offset(a, j, i32), i32)                 # j == n here: past the loop's range
    kb.ret()
    kernel = kb.finish()
    plan = rangecopy.plan(kernel, reverse_postorder(kernel), every=True)
    assert plan is not None and len(plan.accesses) == 1
    (op_id,) = plan.accesses
    first = next(op for op in kernel.blocks[2].ops if op.opcode == "load")
    assert op_id == id(first)


def test_sgemm_one_element_short_faults_like_the_interpreter_on_cuda() -> None:
    """sgemm 32 x 32 x 32 with ``a`` one element short: only the last slab's last thread of
    each block in the last block row reads past it, so those blocks run the general copy and
    report the interpreter's fault (code, buffer, offset, thread); the other blocks take the
    range copy. With the whole buffer the next launch computes the product."""
    from vxpu.accel.backend import KernelFaultError
    from vxpu.ir import binary

    mod = SAMPLES["sgemm"].module()
    size = 32
    rng = np.random.default_rng(7)
    a = rng.standard_normal(size * size, dtype=np.float32)
    bm = rng.standard_normal(size * size, dtype=np.float32)
    mem = Memory(1 << 20)
    pa, pb = mem.upload(a[:-1]), mem.upload(bm)
    pc = mem.upload(np.zeros(size * size, np.float32))
    with pytest.raises(InterpFault) as want:
        run_kernel(mod, "sgemm", (2, 2), (16, 16), [size, size, size, pa, pb, pc], mem)
    assert (want.value.code, want.value.param, want.value.offset) == (1, 3, 4 * (size * size - 1))
    backend, session = cuda_session()
    try:
        k, _ = session.get_kernel(session.load_module(binary.encode(mod)), "sgemm")
        short, full = session.alloc(4 * (size * size - 1)), session.alloc(4 * size * size)
        gb, gc = session.alloc(4 * size * size), session.alloc(4 * size * size)
        session.copy_htod(short, memoryview(a[:-1]))
        session.copy_htod(full, memoryview(a))
        session.copy_htod(gb, memoryview(bm))
        args = struct.pack("<iiiiQQQ", size, size, size, 0, short, gb, gc)
        with pytest.raises(KernelFaultError) as got:
            session.launch(k, (2, 2), (16, 16), args)
            session.synchronize()
        r = got.value.record
        # both blocks of the last block row read that row of a: either may claim the record
        bx, by, _bz = r.block
        assert (r.code, r.origin, r.offset, by, tuple(r.thread)[:2]) == (1, 3, 4 * (size * size - 1), 1, (15, 15))
        assert bx in (0, 1)
        session.launch(k, (2, 2), (16, 16), struct.pack("<iiiiQQQ", size, size, size, 0, full, gb, gc))
        session.synchronize()
        out = np.zeros(size * size, np.float32)
        session.copy_dtoh(memoryview(out), gc)
        ref = a.reshape(size, size).astype(np.float64) @ bm.reshape(size, size)
        assert np.allclose(out.reshape(size, size), ref, rtol=1e-4, atol=1e-4)
    finally:
        session.close()
        backend.close()


@pytest.mark.parametrize("windows", [False, True])
def test_a_counter_started_by_a_select_is_not_one_sequence(windows: bool) -> None:
    """j from select(p < 1, 0, 1) by 4 while j < n: the start is one of two values, so the
    counter's last value is not init.lo + 4*((n - 1 - init.lo)/4) (p = 5, n = 10: j = 1, 5, 9,
    not 0, 4, 8). With a 9-element buffer a[9] is read: the test must fail (it held when a
    select of two constants counted as one value for the block)."""
    kb = KernelBuilder("k", [("n", i32), ("p", i32), ("a", ptr_global)])
    n, p, a = kb.params
    entry, head, body, done = kb.block("e"), kb.block("h", [("j", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    init = kb.select(kb.icmp("slt", p, kb.const(1, i32)), kb.const(0, i32), kb.const(1, i32))
    four = kb.const(4, i32)
    kb.br(head, init)
    kb.set_block(head)
    j = head.params[0]
    kb.cbr(kb.icmp("slt", j, n), body, done)
    kb.set_block(body)
    kb.load(kb.offset(a, j, f32), f32)
    kb.barrier()
    kb.br(head, kb.add(j, four))
    kb.set_block(done)
    kb.ret()
    module = Module("m", [kb.finish()])
    kernel = module.kernels[0]
    plan = rangecopy.plan(kernel, reverse_postorder(kernel), every=True)
    assert plan is not None
    jit = _Jit(plan, windows)
    mem = Memory(1 << 20)
    base = mem.alloc(4 * 9)
    with pytest.raises(InterpFault):
        run_kernel(module, "k", 1, (1, 1), [10, 5, base], mem)
    assert not jit(10, 5, base, base, 4 * 9, 0, (1, 1), 1)
    assert jit(10, 5, base, base, 4 * 10, 0, (1, 1), 1)


def _nested_kernel(rng: random.Random) -> Module:
    """k(n, p, a), no barrier: j from init1 by step1 while j < n { [a[e(j)]]; k from init2 by
    step2 while k < bound2 { a[e(j, k)]; [break out on a thread or parameter test]; [a second
    back edge ('continue') before a[e(j, k)] again] }; [a[e(j)]] }. init1 and init2 may be
    selects, init2/bound2 may read j; every index a random tree over the counters, thread and
    block indices and parameters."""
    kb = KernelBuilder("k", [("n", i32), ("p", i32), ("a", ptr_global)])
    n, p, a = kb.params
    e, h1, b1, h2, b2, c2, l1, x = (kb.block("e"), kb.block("h1", [("j", i32)]), kb.block("b1"),
                                    kb.block("h2", [("k", i32)]), kb.block("b2"), kb.block("c2"),
                                    kb.block("l1"), kb.block("x"))
    kb.set_block(e)
    tx, bx = kb.thread_id("x"), kb.block_id("x")
    c = [kb.const(v, i32) for v in (0, 1, 2, 3, 4)]

    def start(extra: list) -> Value:  # type: ignore[type-arg]
        pick = rng.choice(["const", "p", "select", "select_t"] + extra)
        if pick == "const":
            return kb.const(rng.randrange(-2, 4), i32)
        if pick == "p":
            return p
        if pick == "select":
            return kb.select(kb.icmp("slt", p, c[rng.randrange(5)]), c[rng.randrange(3)], c[rng.randrange(1, 5)])
        if pick == "select_t":
            return kb.select(kb.icmp("slt", tx, c[1]), c[rng.randrange(3)], c[rng.randrange(1, 5)])
        return rng.choice(extra) if not isinstance(pick, str) else pick  # pragma: no cover

    init1 = start([])
    step1 = rng.choice([c[1], c[2], c[3], p, kb.block_dim("x")])
    step2 = rng.choice([c[1], c[2], c[3], c[4], p])
    kb.br(h1, init1)
    kb.set_block(h1)
    j = h1.params[0]
    kb.cbr(kb.icmp("slt", j, n), b1, x)
    kb.set_block(b1)
    leaves = [j, tx, bx, p, kb.block_dim("x")]
    def index(vs: list, plain: Value) -> Value:  # type: ignore[type-arg]
        return plain if rng.random() < 0.4 else _expr(kb, rng, vs, 2)

    if rng.random() < 0.5:
        kb.load(kb.offset(a, index(leaves, j), f32), f32)
    init2 = rng.choice([start([]), j, kb.add(j, c[1]), kb.sub(j, c[2])])
    bound2 = rng.choice([n, kb.add(j, c[3]), p, kb.add(j, p), kb.mul(j, c[2]), c[0], kb.sub(j, c[1])])
    kb.br(h2, init2)
    kb.set_block(h2)
    k = h2.params[0]
    kb.cbr(kb.icmp("slt", k, bound2), b2, l1)
    kb.set_block(b2)
    inner = [j, k, tx, bx, p, kb.block_dim("x")]
    kb.load(kb.offset(a, index(inner, k), f32), f32)
    shape = rng.choice(["plain", "break", "continue"])
    if shape == "break":
        kb.cbr(kb.icmp("slt", rng.choice([tx, p, k]), rng.choice([c[2], p, c[3]])), c2, l1)
    elif shape == "continue":
        kb.cbr(kb.icmp("slt", rng.choice([tx, k]), rng.choice([c[2], p])), h2, c2, [kb.add(k, step2)])
    else:
        kb.br(c2)
    kb.set_block(c2)
    kb.load(kb.offset(a, index(inner, k), f32), f32)
    kb.br(h2, kb.add(k, step2))
    kb.set_block(l1)
    if rng.random() < 0.5:
        kb.load(kb.offset(a, index(leaves, j), f32), f32)
    kb.br(h1, kb.add(j, step1))
    kb.set_block(x)
    kb.ret()
    return Module("m", [kb.finish()])


@pytest.mark.parametrize("windows", [False, True])
def test_random_nested_loops_run_without_fault_whenever_the_entry_test_holds(windows: bool) -> None:
    """Nested counted loops, starts that are selects (uniform or per thread), inner loops
    started and bounded by the outer counter, early exits and second back edges: whenever the
    entry test holds for every block, the interpreter runs the launch without a fault."""
    rng = random.Random(20261203)
    proven = held = 0
    for case in range(400):
        module = _nested_kernel(rng)
        kernel = module.kernels[0]
        plan = rangecopy.plan(kernel, reverse_postorder(kernel), every=True)
        if plan is None:
            continue
        proven += 1
        jit = _Jit(plan, windows)
        for _ in range(6):
            n, p = rng.choice([rng.randrange(-2, 10), rng.randrange(-2, 10), rng.choice(BIG)]), \
                rng.choice([rng.randrange(-3, 8), rng.randrange(-3, 8), rng.choice(BIG)])
            count = rng.choice([rng.randrange(0, 16), rng.randrange(0, 120)])
            delta = rng.choice([0, 0, 4, 8, 2])
            block, grid = (rng.choice([1, 2, 3, 5]), 1), rng.choice([1, 2])
            mem = Memory(1 << 20)
            base = mem.alloc(max(4 * count, 1))
            if not all(jit(n, p, base + delta, base, 4 * count, bid, block, grid) for bid in range(grid)):
                continue
            held += 1
            try:
                run_kernel(module, "k", grid, block, [n, p, base + delta], mem, step_limit=1 << 15)
            except InterpFault as exc:
                assert "step limit" in str(exc), (case, n, p, count, delta, block, grid, exc)
    assert proven > 100 and held > 100, (proven, held)


@pytest.mark.parametrize("windows", [False, True])
def test_a_counter_with_one_static_value_still_tests_its_step(windows: bool) -> None:
    """j from 0 by p while j < 1: statically j is 0 in the body — but only if p > 0, which
    only the counter's run-time test says. With p = -1 the loop reads a[0], a[-1], a[-2], ...
    and the test must fail (it held when a node of one static value was emitted as that
    constant, dropping the tests of the counters below it)."""
    kb = KernelBuilder("k", [("n", i32), ("p", i32), ("a", ptr_global)])
    _n, p, a = kb.params
    entry, head, body, done = kb.block("e"), kb.block("h", [("j", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    zero, one = kb.const(0, i32), kb.const(1, i32)
    kb.br(head, zero)
    kb.set_block(head)
    j = head.params[0]
    kb.cbr(kb.icmp("slt", j, one), body, done)
    kb.set_block(body)
    kb.load(kb.offset(a, j, f32), f32)
    kb.barrier()
    kb.br(head, kb.add(j, p))
    kb.set_block(done)
    kb.ret()
    module = Module("m", [kb.finish()])
    kernel = module.kernels[0]
    plan = rangecopy.plan(kernel, reverse_postorder(kernel), every=True)
    assert plan is not None
    jit = _Jit(plan, windows)
    mem = Memory(1 << 20)
    base = mem.alloc(4 * 8)
    with pytest.raises(InterpFault) as fault:
        run_kernel(module, "k", 1, (1, 1), [0, -1, base + 8], mem, step_limit=1 << 12)
    assert "out of bounds" in str(fault.value)
    assert not jit(0, -1, base + 8, base, 4 * 8, 0, (1, 1), 1)
    assert not jit(0, 0, base + 8, base, 4 * 8, 0, (1, 1), 1)        # p = 0: j stays 0 (no end)
    assert jit(0, 1, base + 8, base, 4 * 8, 0, (1, 1), 1)            # p = 1: a[0] once


def _chain_kernel(rng: random.Random) -> Module:
    """k(n, p, a): j from init by step while j < n: an f32 load at offset(offset(a, e1) : T1,
    e2) : T2 (T1, T2 of 4, 8 or 16 bytes: element sizes that are multiples of the access's,
    so the element index is (s1/4)*e1 + (s2/4)*e2), or at offset(a, i16 index) : f32 (a
    conversion: never proven, the access stays checked)."""
    from vxpu.ir.types import f64, i16, i64

    kb = KernelBuilder("k", [("n", i32), ("p", i32), ("a", ptr_global)])
    n, p, a = kb.params
    entry, head, body, done = kb.block("e"), kb.block("h", [("j", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    tx, bx = kb.thread_id("x"), kb.block_id("x")
    init = rng.choice([kb.const(rng.randrange(-2, 4), i32), p, tx])
    step = rng.choice([kb.const(rng.randrange(1, 4), i32), p])
    kb.br(head, init)
    kb.set_block(head)
    j = head.params[0]
    kb.cbr(kb.icmp("slt", j, n), body, done)
    kb.set_block(body)
    leaves = [j, tx, bx, p]
    if rng.random() < 0.25:
        narrow = kb.convert("trunc", _expr(kb, rng, leaves, 1), i16)
        kb.load(kb.offset(a, kb.add(narrow, kb.convert("trunc", j, i16)), f32), f32)
    else:
        t1, t2 = rng.choice([f32, f64, i64]), rng.choice([f32, f64])
        inner = kb.offset(a, _expr(kb, rng, leaves, 2), t1)
        kb.load(kb.offset(inner, _expr(kb, rng, leaves, 2), t2), f32)
    kb.br(head, kb.add(j, step))
    kb.set_block(done)
    kb.ret()
    return Module("m", [kb.finish()])


@pytest.mark.parametrize("windows", [False, True])
def test_random_offset_chains_run_without_fault_whenever_the_entry_test_holds(windows: bool) -> None:
    """Chains of two offsets with element sizes 4 and 8 under an f32 access: whenever the entry test (offset form, or the f32 window with the element index
    (s1/4)*i1 + (s2/4)*i2) holds, the interpreter runs the launch without a fault."""
    rng = random.Random(20261204)
    proven = held = 0
    for case in range(300):
        module = _chain_kernel(rng)
        kernel = module.kernels[0]
        plan = rangecopy.plan(kernel, reverse_postorder(kernel), every=True)
        if plan is None:
            continue
        proven += 1
        jit = _Jit(plan, windows)
        for _ in range(5):
            n, p = rng.choice([rng.randrange(-2, 10), rng.choice(BIG)]), rng.choice([rng.randrange(-4, 9), rng.choice(BIG)])
            count = rng.choice([rng.randrange(0, 24), rng.randrange(0, 300)])
            delta = rng.choice([0, 0, 4, 8, 12, 2])
            block, grid = (rng.choice([1, 2, 3, 5]), 1), rng.choice([1, 2])
            mem = Memory(1 << 20)
            base = mem.alloc(max(4 * count, 1))
            if not all(jit(n, p, base + delta, base, 4 * count, bid, block, grid) for bid in range(grid)):
                continue
            held += 1
            try:
                run_kernel(module, "k", grid, block, [n, p, base + delta], mem, step_limit=1 << 15)
            except InterpFault as exc:
                assert "step limit" in str(exc), (case, n, p, count, delta, block, grid, exc)
    assert proven > 150 and held > 150, (proven, held)
