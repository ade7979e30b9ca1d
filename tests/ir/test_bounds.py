"""Per-buffer bounds (docs/ir-lowering.md §6): every access is checked against its own buffer.

Each out-of-bounds kernel here — reads, writes and atomics one element past the end, one before
the start and far away; through a phi and a select of two buffers; in shared and local memory;
misaligned — must fail on the x86 JIT and in the interpreter with the same fault code, the same
buffer (parameter index or array) and the same offset, leave every byte of memory unchanged,
and let the next launch succeed. The same kernels compiled for NVPTX and AMDGPU carry the fault
path, and an unchecked build lacks exactly that. A hypothesis test draws random in- and
out-of-bounds index patterns and requires both executors to agree on fault or result.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.compile import compile_module
from vxpu.ir.cpu_exec import KernelFault
from vxpu.ir.interp import InterpFault, Memory, run_kernel
from vxpu.ir.lower.bounds import FAULT_GLOBAL, FAULT_LOCAL, FAULT_MISALIGNED, FAULT_SHARED
from vxpu.ir.model import Module
from vxpu.ir.types import Type, f32, i32, i64, ptr_global

from tests.ir.lowerhelpers import needs_lld, needs_nvjitlink, run_x86

N = 16                   # elements of the buffer under test (f32 / i32)
FAR = 1 << 40
MASK = (1 << 64) - 1


def _global_kernel(kind: str) -> Module:
    """k(i, a, b, out): one access to a[i] (``a`` is parameter 1); b and out are neighbours."""
    kb = KernelBuilder("k", [("i", i64), ("a", ptr_global), ("b", ptr_global), ("out", ptr_global)])
    i, a, _, out = kb.params
    kb.set_block(kb.block("e"))
    if kind == "misaligned":
        q = kb.byte_offset(kb.offset(a, i, f32), kb.const(2, i64))
        kb.store(kb.load(q, f32), out)
    else:
        q = kb.offset(a, i, f32 if kind != "atomic" else i32)
        if kind == "load":
            kb.store(kb.load(q, f32), out)
        elif kind == "store":
            kb.store(kb.const(1.5, f32), q)
        else:
            kb.store(kb.atomic_add(q, kb.const(1, i32)), out)
    kb.ret()
    return Module("m", [kb.finish()])


def _two_buffer_kernel(how: str) -> Module:
    """k(sel, i, a, b): store to p[i] where p = sel ? b : a, through a phi or a select."""
    kb = KernelBuilder("k", [("sel", i32), ("i", i64), ("a", ptr_global), ("b", ptr_global)])
    sel, i, a, b = kb.params
    entry = kb.block("e")
    kb.set_block(entry)
    c = kb.icmp("ne", sel, kb.const(0, i32))
    if how == "select":
        p = kb.select(c, b, a)
    else:
        join = kb.block("join", [("p", ptr_global)])
        left, right = kb.block("l"), kb.block("r")
        kb.cbr(c, left, right)
        kb.set_block(left)
        kb.br(join, b)
        kb.set_block(right)
        kb.br(join, a)
        kb.set_block(join)
        p = join.params[0]
    kb.store(kb.const(2.5, f32), kb.offset(p, i, f32))
    kb.ret()
    return Module("m", [kb.finish()])


def _array_kernel(space: str, index_type: Type = i64) -> Module:
    """k(i, out): one store to element i of an 8-element shared or local array, then a read
    (an i32 index takes the lowering's one-compare index check)."""
    kb = KernelBuilder("k", [("i", index_type), ("out", ptr_global)])
    i, out = kb.params
    arr = kb.shared_array("s", f32, 8) if space == "shared" else kb.local_array("l", f32, 8)
    kb.set_block(kb.block("e"))
    base = kb.shared_addr(arr) if space == "shared" else kb.local_addr(arr)
    kb.store(kb.const(3.0, f32), kb.offset(base, i, f32))
    kb.store(kb.load(base, f32), out)
    kb.ret()
    return Module("m", [kb.finish()])


def _fresh_memory() -> tuple[Memory, list[int]]:
    mem = Memory(1 << 20)
    bufs = [mem.upload(np.arange(N, dtype=np.float32) + 100 * k) for k in range(3)]
    return mem, bufs


def _both(module: Module, args_of: Callable[[list[int]], list[int]], grid: int = 1, block: int = 1
          ) -> list[tuple[int | None, int | None, int | None, bytes, Memory, list[int]]]:
    """Run on the interpreter and on x86 (each on fresh memory); for each: (code, param,
    offset, memory before) or Nones if it did not fault."""
    out = []
    for runner in ("interp", "x86"):
        mem, bufs = _fresh_memory()
        args = args_of(bufs)
        before = bytes(mem.buf)
        try:
            if runner == "interp":
                run_kernel(module, "k", grid, block, args, mem)
            else:
                run_x86(module, "k", (grid,), (block,), args, mem)
            out.append((None, None, None, before, mem, bufs))
        except InterpFault as f:
            out.append((f.code, f.param, f.offset, before, mem, bufs))
        except KernelFault as f:
            out.append((f.code, f.param, f.address, before, mem, bufs))
    return out


@pytest.mark.parametrize("kind", ["load", "store", "atomic"])
@pytest.mark.parametrize("index", [N, -1, FAR, -FAR])
def test_global_out_of_bounds_faults_with_the_parameter(kind: str, index: int) -> None:
    module = _global_kernel(kind)
    for code, param, offset, before, mem, bufs in _both(module, lambda b: [index & MASK, b[0], b[1], b[2]]):
        assert (code, param, offset) == (FAULT_GLOBAL, 1, (4 * index) & MASK)
        assert bytes(mem.buf) == before                      # nothing written, neighbours intact
        run_x86(module, "k", (1,), (1,), [3, bufs[0], bufs[1], bufs[2]], mem)   # the next launch works
        run_kernel(module, "k", 1, 1, [3, bufs[0], bufs[1], bufs[2]], mem)


def test_in_bounds_accesses_reach_the_last_element() -> None:
    for kind in ("load", "store", "atomic"):
        for code, *_ in _both(_global_kernel(kind), lambda b: [N - 1, b[0], b[1], b[2]]):
            assert code is None


def test_misaligned_access_faults() -> None:
    for code, param, offset, before, mem, _ in _both(_global_kernel("misaligned"), lambda b: [0, b[0], b[1], b[2]]):
        assert (code, param, offset) == (FAULT_MISALIGNED, 1, 2)
        assert bytes(mem.buf) == before


def test_a_pointer_into_no_allocation_reaches_nothing() -> None:
    for code, param, _, before, mem, _ in _both(_global_kernel("load"), lambda b: [0, b[2] + 4096, b[1], b[2]]):
        assert (code, param) == (FAULT_GLOBAL, 1)
        assert bytes(mem.buf) == before


@pytest.mark.parametrize("how", ["phi", "select"])
def test_phi_and_select_check_against_the_chosen_buffer(how: str) -> None:
    module = _two_buffer_kernel(how)
    for sel, param in ((0, 2), (1, 3)):
        for code, p, offset, before, mem, _ in _both(module, lambda b, s=sel: [s, N, b[0], b[1]]):
            assert (code, p, offset) == (FAULT_GLOBAL, param, 4 * N)
            assert bytes(mem.buf) == before
        for code, *_ in _both(module, lambda b, s=sel: [s, N - 1, b[0], b[1]]):
            assert code is None


@pytest.mark.parametrize("space,code,origin", [("shared", FAULT_SHARED, 0x100), ("local", FAULT_LOCAL, 0x200)])
@pytest.mark.parametrize("index", [8, -1, FAR, -(1 << 31), (1 << 31) - 1])
@pytest.mark.parametrize("index_type", [i64, i32], ids=["i64", "i32"])
def test_shared_and_local_arrays_are_checked_against_their_size(space: str, code: int, origin: int,
                                                                index: int, index_type: Type) -> None:
    if index_type is i32 and index == FAR:
        index = (1 << 30) + 3
    mask = (1 << index_type.bits) - 1
    module = _array_kernel(space, index_type)
    for got, param, offset, before, mem, _ in _both(module, lambda b: [index & mask, b[2]]):
        assert (got, param, offset) == (code, origin, (4 * index) & MASK)
        assert bytes(mem.buf) == before
    for got, *_ in _both(module, lambda b: [7, b[2]]):
        assert got is None


# -- GPU code: the fault path is there, and only there ------------------------------------------

_GPU_CASES = {"load": _global_kernel("load"), "store": _global_kernel("store"),
              "atomic": _global_kernel("atomic"), "phi": _two_buffer_kernel("phi"),
              "select": _two_buffer_kernel("select"), "shared": _array_kernel("shared")}


def _ptx_ops(text: str) -> list[tuple[str, str]]:
    """(op, space) of every memory instruction except the fault record's claim (the cas)."""
    return re.findall(r"\b(ld|st|atom|red)\.(?:relaxed\.sys\.)?(global|shared|local|param)(?![.\w]*cas)[.\w]*",
                      text)


@needs_nvjitlink
@pytest.mark.parametrize("name", sorted(_GPU_CASES))
def test_ptx_has_the_fault_path_and_unchecked_does_not(name: str) -> None:
    module = _GPU_CASES[name]
    checked = compile_module(module, "nvptx", arch="sm_90", cache=False).asm
    unchecked = compile_module(module, "nvptx", arch="sm_90", cache=False, checked=False).asm
    cas = re.compile(r"atom\.[.\w]*cas\.b32")
    assert cas.search(checked) and not cas.search(unchecked)
    assert "trap;" not in checked
    # the kernel's own memory ops are the same; checked adds loads of the hidden parameters and
    # the record writer's stores (code, origin, kernel id, offset, 6 indices; LLVM may pair them)
    ops_c, ops_u = _ptx_ops(checked), _ptx_ops(unchecked)
    for op in set(ops_c) | set(ops_u):           # (param space: hidden arguments, record calls)
        if op != ("st", "global") and op[1] != "param":
            assert ops_c.count(op) == ops_u.count(op), op
    assert ops_c.count(("st", "global")) >= ops_u.count(("st", "global")) + 5
    assert ops_c.count(("ld", "param")) > ops_u.count(("ld", "param"))


@needs_lld
@pytest.mark.parametrize("name", sorted(_GPU_CASES))
def test_amdgpu_has_the_fault_path_and_unchecked_does_not(name: str) -> None:
    from vxpu.ir.cli import emit

    module = _GPU_CASES[name]
    checked = emit(module, "amdgpu", "asm")
    unchecked = emit(module, "amdgpu", "asm", checked=False)
    assert isinstance(checked, str) and isinstance(unchecked, str)
    # the record's claims are more compare-and-swaps (older LLVMs also expand other atomics so)
    assert checked.count("global_atomic_cmpswap") > unchecked.count("global_atomic_cmpswap")
    assert "s_trap" not in checked
    image = compile_module(module, "amdgpu", arch="gfx942", cache=False).image
    assert image[:4] == b"\x7fELF"


# -- the property: random index patterns, the interpreter and x86 agree ----------------------------

def _gather_kernel() -> Module:
    """k(ix, src, dst): dst[t] = src[ix[t]] for each thread t (ix: i32 indices)."""
    kb = KernelBuilder("k", [("ix", ptr_global), ("src", ptr_global), ("dst", ptr_global)])
    ix, src, dst = kb.params
    kb.set_block(kb.block("e"))
    t = kb.thread_id("x")
    j = kb.load(kb.offset(ix, t, i32), i32)
    kb.store(kb.load(kb.offset(src, j, f32), f32), kb.offset(dst, t, f32))
    kb.ret()
    return Module("m", [kb.finish()])


_GATHER = _gather_kernel()


@settings(max_examples=40, deadline=None)
@given(src_len=st.integers(1, 24), data=st.data())
def test_random_index_patterns_agree(src_len: int, data: st.DataObject) -> None:
    threads = data.draw(st.integers(1, 32))
    idx = data.draw(st.lists(st.integers(-4, src_len + 4), min_size=threads, max_size=threads))
    results = []
    for runner in ("interp", "x86"):
        mem = Memory(1 << 20)
        ix = mem.upload(np.array(idx, dtype=np.int32))
        src = mem.upload(np.arange(src_len, dtype=np.float32) * 3)
        dst = mem.upload(np.full(threads, -1, dtype=np.float32))
        try:
            if runner == "interp":
                run_kernel(_GATHER, "k", 1, threads, [ix, src, dst], mem)
            else:
                run_x86(_GATHER, "k", (1,), (threads,), [ix, src, dst], mem)
            results.append(("ok", mem.read(dst, np.float32, threads).tolist()))
        except InterpFault as f:
            results.append(("fault", f.code, f.param, f.offset, mem.read(dst, np.float32, threads).tolist()))
        except KernelFault as f:
            results.append(("fault", f.code, f.param, f.address, mem.read(dst, np.float32, threads).tolist()))
    assert results[0] == results[1]
    bad = [k for k, j in enumerate(idx) if not 0 <= j < src_len]
    if bad:
        assert results[0][:3] == ("fault", FAULT_GLOBAL, 1)
    else:
        assert results[0] == ("ok", [3.0 * j for j in idx])


# -- counted loops: checks proven once before the loop (the loop's version test) -----------------

def _strided_copy() -> Module:
    """k(n, src, dst): for (j = tid; j < n; j += block_dim) dst[j] = src[j] + 1."""
    kb = KernelBuilder("k", [("n", i32), ("src", ptr_global), ("dst", ptr_global)])
    n, src, dst = kb.params
    entry, head, body, done = kb.block("e"), kb.block("h", [("j", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    step = kb.block_dim("x")
    kb.br(head, kb.thread_id("x"))
    kb.set_block(head)
    j = head.params[0]
    kb.cbr(kb.icmp("slt", j, n), body, done)
    kb.set_block(body)
    v = kb.fadd(kb.load(kb.offset(src, j, f32), f32), kb.const(1.0, f32))
    kb.store(v, kb.offset(dst, j, f32))
    kb.br(head, kb.add(j, step))
    kb.set_block(done)
    kb.ret()
    return Module("m", [kb.finish()])


_STRIDED = _strided_copy()


@pytest.mark.parametrize("n,fault", [(N, None), (N - 3, None), (0, None), (N + 1, (FAULT_GLOBAL, 1, 4 * N)),
                                     (N + 100, (FAULT_GLOBAL, 1, 4 * N))])
def test_counted_loop_proven_once_or_faults_like_the_interpreter(n: int, fault: tuple[int, int, int] | None) -> None:
    results = _both(_STRIDED, lambda b: [n, b[0], b[1]], block=4)
    for code, param, offset, before, mem, bufs in results:
        if fault is None:
            assert code is None
            got = mem.read(bufs[1], np.float32, N)
            want = np.arange(N, dtype=np.float32) + 100
            want[:max(n, 0)] = np.arange(max(n, 0), dtype=np.float32) + 1
            assert got.tolist() == want.tolist()
        else:
            assert (code, param, offset) == fault
    assert results[0][4].buf.tobytes() == results[1][4].buf.tobytes()   # same partial work on both


@needs_nvjitlink
def test_counted_loop_accesses_lose_their_per_iteration_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from vxpu.ir.lower import common

    def fault_edges(text: str) -> int:       # branches into the fault exit, in LLVM IR
        return len(re.findall(r"label %\"?fault(?:\.\d+)?\"?[,\s]", text))

    proved = compile_module(_STRIDED, "nvptx", arch="sm_90", cache=False).asm
    llvm_proved = _llvm(_STRIDED)
    monkeypatch.setattr(common, "proven_accesses", lambda cl: {})
    llvm_plain = _llvm(_STRIDED)
    # without the proof both copies check both accesses (4 edges); with it only the wrapping copy
    assert fault_edges(llvm_plain) == 4 and fault_edges(llvm_proved) == 2
    assert re.search(r"atom\.[.\w]*cas", proved)


def _llvm(module: Module) -> str:
    from vxpu.ir.lower import nvptx

    return str(nvptx.lower_module(module))


def _affine_copy() -> Module:
    """k(n, d, src, dst): for (j = tid; j < n; j += block_dim) dst[2*j + d] = src[j]."""
    kb = KernelBuilder("k", [("n", i32), ("d", i32), ("src", ptr_global), ("dst", ptr_global)])
    n, d, src, dst = kb.params
    entry, head, body, done = kb.block("e"), kb.block("h", [("j", i32)]), kb.block("b"), kb.block("x")
    kb.set_block(entry)
    step, two = kb.block_dim("x"), kb.const(2, i32)
    kb.br(head, kb.thread_id("x"))
    kb.set_block(head)
    j = head.params[0]
    kb.cbr(kb.icmp("slt", j, n), body, done)
    kb.set_block(body)
    kb.store(kb.load(kb.offset(src, j, f32), f32), kb.offset(dst, kb.add(kb.mul(two, j), d), f32))
    kb.br(head, kb.add(j, step))
    kb.set_block(done)
    kb.ret()
    return Module("m", [kb.finish()])


_AFFINE = _affine_copy()


@pytest.mark.parametrize("n,d", [(8, 0), (8, 1), (7, 2), (8, 2), (8, -1), (3, (1 << 31) - 2), (0, 99)])
def test_affine_index_in_a_counted_loop_agrees_with_the_interpreter(n: int, d: int) -> None:
    results = _both(_AFFINE, lambda b: [n, d & 0xFFFFFFFF, b[0], b[1]], block=4)
    (c0, p0, o0, _, m0, _), (c1, p1, o1, _, m1, _) = results
    assert (c0, p0, o0) == (c1, p1, o1)
    assert m0.buf.tobytes() == m1.buf.tobytes()
    inside = all(0 <= 2 * j + d < N for j in range(n))
    assert (c0 is None) == inside
    if not inside:
        assert (c0, p0) == (FAULT_GLOBAL, 3)
