"""GPU check groups (``vxpu.ir.lower.gpucheck``): one branch for a run of loads, same faults.

The lowering checks a run of loads (and the store that ends it) with one branch at its first
access; its cold side re-tests them in program order. Compile-only: no branch separates the
grouped loads, and a check never moves above a store. On an NVIDIA GPU (``VXPU_GPU_TESTS``
unset or 1, skipped without CUDA): a one-thread kernel whose loads take every check form (array
index, parameter index, general) faults exactly where the interpreter faults — same code,
buffer and offset — or computes the same result, for random indices in and out of bounds and
misaligned base pointers.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.interp import InterpFault, Memory, run_kernel
from vxpu.ir.lower.nvptx import lower_module
from vxpu.ir.model import Module
from vxpu.ir.types import f32, i32, i64, ptr_global

from tests.ir.lowerhelpers import cuda_session

N = 12


def _group_kernel() -> Module:
    """k(i, j, w, a, b, out): s[j] = 1; x = a[i] + a[i+1] + b[w] + s[j] (loads in one group);
    out[0] = x; then a[i] = x (a store after a store: its own group)."""
    kb = KernelBuilder("k", [("i", i32), ("j", i32), ("w", i64), ("a", ptr_global), ("b", ptr_global),
                             ("out", ptr_global)])
    i, j, w, a, b, out = kb.params
    arr = kb.shared_array("s", f32, 8)
    kb.set_block(kb.block("e"))
    sj = kb.offset(kb.shared_addr(arr), j, f32)
    kb.store(kb.const(1.0, f32), sj)
    pa = kb.offset(a, i, f32)
    pa1 = kb.offset(a, kb.add(i, kb.const(1, i32)), f32)
    pb = kb.offset(b, w, f32)
    x = kb.fadd(kb.fadd(kb.load(pa, f32), kb.load(pa1, f32)), kb.fadd(kb.load(pb, f32), kb.load(sj, f32)))
    kb.store(x, out)
    kb.store(x, pa)
    kb.ret()
    return Module("m", [kb.finish()])


_KERNEL = _group_kernel()


def test_grouped_loads_have_no_branch_between_them() -> None:
    text = str(lower_module(_KERNEL))
    body = text[text.index("define"):]
    loads = [m.start() for m in re.finditer(r"= load float, float addrspace\((1|3)\)\*", body)]
    assert len(loads) == 4
    assert "br " not in body[loads[0]:loads[-1]]          # one branch checked all four
    first_store = body.index("store float", loads[-1])
    second_store = body.index("store float", first_store + 1)
    assert "br " in body[first_store:second_store]         # a check never moves above a store


MASK = (1 << 64) - 1


def _interp(i: int, j: int, w: int, da: int) -> tuple:
    """("fault", code, param, offset) or ("ok", out[0]) from the interpreter."""
    mem = Memory(1 << 20)
    a = mem.upload(np.arange(N + 2, dtype=np.float32)) + da
    b = mem.upload(np.arange(N, dtype=np.float32) * 2)
    out = mem.upload(np.zeros(2, np.float32))
    try:
        run_kernel(_KERNEL, "k", 1, 1, [i, j, w, a, b, out], mem)
    except InterpFault as f:
        return ("fault", f.code, f.param, f.offset & MASK)
    return ("ok", float(mem.read(out, np.float32, 1)[0]))


@pytest.fixture(scope="module")
def cuda():  # type: ignore[no-untyped-def]
    backend, session = cuda_session()
    from vxpu.ir import binary
    k, _ = session.get_kernel(session.load_module(binary.encode(_KERNEL)), "k")
    yield session, k
    session.close()
    backend.close()


@settings(max_examples=60, deadline=None)
@given(i=st.integers(-3, N + 3), j=st.integers(-2, 9), w=st.integers(-3, N + 2), da=st.sampled_from([0, 0, 0, 2]))
def test_groups_fault_like_the_interpreter_on_cuda(cuda, i: int, j: int, w: int, da: int) -> None:  # type: ignore[no-untyped-def]
    from vxpu.accel.backend import KernelFaultError

    session, k = cuda
    want = _interp(i, j, w, da)
    a = session.alloc(4 * (N + 2))
    b = session.alloc(4 * N)
    out = session.alloc(8)
    try:
        session.copy_htod(a, memoryview(np.arange(N + 2, dtype=np.float32)))
        session.copy_htod(b, memoryview(np.arange(N, dtype=np.float32) * 2))
        session.copy_htod(out, memoryview(np.zeros(2, np.float32)))
        try:
            session.launch(k, (1,), (1,), struct.pack("<iiqQQQ", i, j, w, a + da, b, out))
            session.synchronize()
            got: tuple = ("ok", float(_read(session, out)[0]))
        except KernelFaultError as exc:
            r = exc.record
            got = ("fault", r.code, r.origin, r.offset & MASK)   # origin: as the interpreter's param
    finally:
        for p in (a, b, out):
            session.free(p)
    assert got == want


def _read(session, ptr: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    back = np.zeros(2, np.float32)
    session.copy_dtoh(memoryview(back), ptr)
    return back


def _tid_kernel() -> Module:
    """k(out): twice: s[tid] = tid; barrier; out[tid] = s[63 - tid % 64]; barrier (a 64-element
    shared array: proven for blocks of at most 64 threads, so the kernel has a small-block copy)."""
    kb = KernelBuilder("t", [("out", ptr_global)])
    (out,) = kb.params
    s = kb.shared_array("s", i32, 64)
    entry, head, body, done = kb.block("e"), kb.block("h", [("k", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    kb.br(head, kb.const(0, i32))
    kb.set_block(head)
    k = head.params[0]
    kb.cbr(kb.icmp("slt", k, kb.const(2, i32)), body, done)
    kb.set_block(body)
    t = kb.thread_id("x")
    base = kb.shared_addr(s)
    kb.store(kb.add(t, k), kb.offset(base, t, i32))
    kb.barrier()
    back = kb.sub(kb.const(63, i32), kb.urem(t, kb.const(64, i32)))
    kb.store(kb.load(kb.offset(base, back, i32), i32), kb.offset(out, t, i32))
    kb.barrier()
    kb.br(head, kb.add(k, kb.const(1, i32)))
    kb.set_block(done)
    kb.ret()
    return Module("t", [kb.finish()])


def test_the_tid_kernel_has_a_small_block_copy() -> None:
    from vxpu.ir.lower import tidrange

    got = tidrange.choose(_tid_kernel().kernels[0])
    assert got is not None and got[0][0] == 64 and len(got[2]) == 2


@pytest.mark.parametrize("threads", [1, 33, 64, 65, 128])
def test_small_block_copy_and_general_copy_on_cuda(threads: int) -> None:
    from vxpu.accel.backend import KernelFaultError
    from vxpu.ir import binary

    backend, session = cuda_session()
    try:
        k, _ = session.get_kernel(session.load_module(binary.encode(_tid_kernel())), "t")
        out = session.alloc(4 * 128)
        try:
            session.launch(k, (1,), (threads,), struct.pack("<Q", out))
            session.synchronize()
            got: tuple = ("ok", _read_n(session, out, threads))
        except KernelFaultError as exc:
            r = exc.record
            got = ("fault", r.code, r.origin, r.offset)
        mem = Memory(1 << 20)
        ref = mem.upload(np.zeros(128, np.int32))
        try:
            run_kernel(_tid_kernel(), "t", 1, threads, [ref], mem)
            want: tuple = ("ok", mem.read(ref, np.int32, threads).tolist())
        except InterpFault as f:
            want = ("fault", f.code, f.param, f.offset)
        if threads > 64:
            assert want[0] == "fault" and got[:3] == want[:3] and got[3] >= 256   # some thread >= 64
        else:
            assert got == want
    finally:
        session.close()
        backend.close()


def _read_n(session, ptr: int, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    back = np.zeros(128, np.int32)
    session.copy_dtoh(memoryview(back), ptr)
    return back[:n].tolist()


def test_hosts_refuse_bounds_the_element_form_is_not_exact_for() -> None:
    from vxpu.accel import gpu_checked
    from vxpu.accel.backend import BackendError, KernelInfo

    info = KernelInfo("k", (8,), (0,), 8, 0, True, (0,))
    guard = gpu_checked.CheckedArgs(info, 0)
    buf = bytearray(gpu_checked.launch_info(info).args_size)
    guard.fill(memoryview(buf), bytes(8), [(64, gpu_checked.MAX_LENGTH)], 0)
    with pytest.raises(BackendError):
        guard.fill(memoryview(buf), bytes(8), [(64, gpu_checked.MAX_LENGTH + 1)], 0)
