"""Host-filled element windows (ir-lowering §7, "Element windows"): exact, through the fill.

A checked GPU kernel checks an access at ``offset P, i : T`` (``P`` a pointer parameter,
sizeof(T) the access size, ``i`` at most 32 bits) as ``lo <= sext32(i) <= hi``, where ``(lo,
hi)`` is the window ``gpu_checked.CheckedArgs.fill`` computed for (P, size) from the pointer
argument and its bounds. Here the window, read back from the packed buffer the fill wrote, and
the very instructions ``CheckGroups._param_window`` emits (compiled for the host with
llvmlite's MCJIT) must admit exactly the indices the general check admits — ``off = P +
size*i - base (mod 2^64)`` a multiple of ``size`` with ``off + size <= length`` — over the
edges: indices around 0, -1, 2^31 - 1, -2^31 and the window's own ends, pointers before, at,
inside, at the end of and past their buffer, misaligned, lengths near 2^31 and 2^32 elements
and the host limit 2^62, bases near 0 and 2^64. Deliberately wrong windows (off by one, no
clamp to i32, no pointer offset, no alignment, no wrap) fail the same comparison. The
interpreter (which checks every access against the allocation containing its pointer, as
the session fills bounds) faults exactly outside the window.
"""

from __future__ import annotations

import ctypes
import re
import struct
from collections.abc import Callable
from types import SimpleNamespace

import llvmlite.binding as llvm
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir
from vxpu.accel import gpu_checked
from vxpu.accel.backend import KernelInfo
from vxpu.accel.gpu_checked import EMPTY_WINDOW, MAX_LENGTH, WINDOW_SIZES, CheckedArgs, element_window
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.interp import InterpFault, Memory, run_kernel
from vxpu.ir.lower.gpucheck import CheckGroups
from vxpu.ir.model import Module
from vxpu.ir.types import f32, f64, i8, i16, i32, ptr_global

from tests.ir.lowerhelpers import jit_function, needs_nvjitlink

M64 = (1 << 64) - 1
I1, I32, I64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
_TYPES = {1: i8, 2: i16, 4: f32, 8: f64}


def general_ok(pointer: int, base: int, length: int, size: int, i: int) -> bool:
    """The general check (bounds.check_access) of a ``size``-byte access at ``P + size*i``."""
    off = (pointer + size * i - base) & M64
    return off & (size - 1) == 0 and (off + size - 1) & M64 < length


Window = Callable[[int, int, int, int], tuple[int, int]]


def _filled(pointer: int, base: int, length: int) -> dict[int, tuple[int, int]]:
    """The windows of one pointer parameter as CheckedArgs.fill packs them (size -> (lo, hi))."""
    info = KernelInfo("k", (8,), (0,), 8, 0, True, (0,))
    full = gpu_checked.launch_info(info)
    buf = bytearray(full.args_size)
    CheckedArgs(info, 0).fill(memoryview(buf), struct.pack("<Q", pointer), [(base, length)], 0xF000)
    raw = struct.unpack_from(f"<{2 * len(WINDOW_SIZES)}i", buf, full.param_offsets[3])
    assert full.param_offsets[1:3] == (8, 16) and full.param_offsets[-2:] == (88, 96)
    assert buf[56:88] == buf[24:56]                  # one pointer: the common windows are its own
    return {size: (raw[2 * n], raw[2 * n + 1]) for n, size in enumerate(WINDOW_SIZES)}


def _lengths(size: int) -> list[int]:
    out = {0, 1, size - 1, size, size + 1, 40, 4096, MAX_LENGTH, MAX_LENGTH - 1, MAX_LENGTH - size}
    for e in (31, 32, 33):
        for k in (-1, 0, 1):
            out.add(size * ((1 << e) + k))
    return sorted(v for v in out if 0 <= v <= MAX_LENGTH)


def _dists(size: int, length: int) -> list[int]:
    out = {0, 1, size - 1, size, -size, 3 * size, length, length - size, length + size, length - 1,
           size << 31, (size << 31) - size, size << 32, -(size << 31), -(size << 31) - size, -(size << 32),
           1 << 62, -(1 << 62), 1 << 63, (1 << 63) - size, (1 << 62) + size}
    return sorted(out)


def _indices(window: tuple[int, int], size: int, dist: int, length: int) -> set[int]:
    out = {0, -1, 1, I32_MAX, I32_MIN, I32_MAX - 1, I32_MIN + 1}
    for v in (*window, -dist // size, (length - dist) // size):
        out |= {v - 1, v, v + 1}
    return {v for v in out if I32_MIN <= v <= I32_MAX}


_BASES = (0, 8, 0x1000, 1 << 63, (1 << 64) - 64)


def _cases(size: int):  # type: ignore[no-untyped-def]
    for base in _BASES:
        for length in _lengths(size):
            for dist in _dists(size, length):
                yield (base + dist) & M64, base, length


def _mismatches(window: Window, size: int, limit: int = 5) -> list[tuple[int, ...]]:
    bad: list[tuple[int, ...]] = []
    for pointer, base, length in _cases(size):
        lo, hi = window(pointer, base, length, size)
        for i in _indices((lo, hi), size, (pointer - base) & M64, length) \
                | _indices((lo, hi), size, (pointer - base) - (1 << 64), length):
            if (lo <= i <= hi) != general_ok(pointer, base, length, size, i):
                bad.append((pointer, base, length, size, i, lo, hi))
                if len(bad) >= limit:
                    return bad
    return bad


@pytest.mark.parametrize("size", WINDOW_SIZES)
def test_the_window_admits_exactly_what_the_general_check_admits(size: int) -> None:
    assert _mismatches(element_window, size) == []


def test_the_fill_packs_each_sizes_window() -> None:
    for pointer, base, length in ((0x1008, 0x1000, 40), (0x1002, 0x1000, 40), (0x2000, 0x1000, 8),
                                  (0, 0, 0), (0x1000 + (4 << 31), 0x1000, 4 << 32)):
        assert _filled(pointer, base, length) == {s: element_window(pointer, base, length, s)
                                                  for s in WINDOW_SIZES}
    assert _filled(0x1008, 0x1000, 40)[4] == (-2, 7)          # an offset pointer reaches back
    assert _filled(0x1002, 0x1000, 40)[4] == EMPTY_WINDOW     # misaligned: nothing (the cold side says so)
    assert _filled(0x1002, 0x1000, 40)[2] == (-1, 18)
    assert _filled(0x1000 + (4 << 31), 0x1000, 4 << 32)[4] == (I32_MIN, I32_MAX)   # every i32 index


# -- deliberately wrong windows: the comparison above must catch each -----------------------------

def _off_by_one(p: int, b: int, n: int, s: int) -> tuple[int, int]:
    lo, hi = element_window(p, b, n, s)
    return (lo, hi + 1) if lo <= hi < I32_MAX else (lo, hi)


def _one_short(p: int, b: int, n: int, s: int) -> tuple[int, int]:
    lo, hi = element_window(p, b, n, s)
    return (lo, hi - 1) if lo <= hi else (lo, hi)


def _no_clamp(p: int, b: int, n: int, s: int) -> tuple[int, int]:
    """The unclamped bounds, truncated to i32 as a naive pack would."""
    d = (p - b) & M64
    if n < s or d % s:
        return EMPTY_WINDOW
    lo, hi = -d // s, (n - s - d) // s
    def wrap(v: int) -> int:
        return ((v + (1 << 31)) & M64 & 0xFFFFFFFF) - (1 << 31)
    return wrap(lo), wrap(hi)


def _from_zero(p: int, b: int, n: int, s: int) -> tuple[int, int]:
    """``min(elements that fit from the pointer, 2^31)`` as a limit on ``(u32) i``."""
    d = (p - b) & M64
    if n < s or d % s or d > n:
        return EMPTY_WINDOW
    return 0, min((n - d) // s, 1 << 31) - 1


def _no_alignment(p: int, b: int, n: int, s: int) -> tuple[int, int]:
    d = (p - b) & M64
    lo, hi = -(d // s), (n - s - d) // s
    return (max(lo, I32_MIN), min(hi, I32_MAX)) if n >= s and max(lo, I32_MIN) <= min(hi, I32_MAX) else EMPTY_WINDOW


def _no_wrap(p: int, b: int, n: int, s: int) -> tuple[int, int]:
    """Only ``k = 0``: a pointer just below its base (``d`` near 2^64) gets nothing."""
    d = (p - b) & M64
    if n < s or d % s:
        return EMPTY_WINDOW
    lo, hi = max(-d // s, I32_MIN), min((n - s - d) // s, I32_MAX)
    return (lo, hi) if lo <= hi else EMPTY_WINDOW


@pytest.mark.parametrize("wrong", [_off_by_one, _one_short, _no_clamp, _from_zero, _no_alignment, _no_wrap])
def test_a_wrong_window_is_caught(wrong: Window) -> None:
    assert any(_mismatches(wrong, size, limit=1) for size in WINDOW_SIZES), wrong.__name__


@settings(max_examples=300, deadline=None)
@given(size=st.sampled_from(WINDOW_SIZES), base=st.integers(0, (M64 >> 3)).map(lambda v: v << 3),
       dist=st.one_of(st.integers(-(1 << 36), 1 << 36), st.integers(-(1 << 63), M64)),
       length=st.one_of(st.integers(0, 1 << 12), st.integers(0, 1 << 36), st.integers(0, MAX_LENGTH)),
       i=st.integers(I32_MIN, I32_MAX))
def test_random_windows_match_the_general_check(size: int, base: int, dist: int, length: int, i: int) -> None:
    pointer = (base + dist) & M64
    lo, hi = element_window(pointer, base, length, size)
    assert (lo <= i <= hi) == general_ok(pointer, base, length, size, i)
    for j in (lo - 1, lo, hi, hi + 1):               # its edges too, when they are i32 indices
        if I32_MIN <= j <= I32_MAX:
            assert (lo <= j <= hi) == general_ok(pointer, base, length, size, j)


def test_a_length_past_the_host_limit_is_refused() -> None:
    from vxpu.accel.backend import BackendError
    with pytest.raises(BackendError):
        element_window(0, 0, MAX_LENGTH + 1, 4)


# -- the emitted check, compiled for the host ------------------------------------------------------

def _window_check(size: int, index_type):  # type: ignore[no-untyped-def]
    """``ok(lo, hi, i)`` compiled from the check ``_param_window`` emits for a ``size``-byte
    load at ``offset P, i``."""
    kb = KernelBuilder("k", [("P", ptr_global), ("i", index_type)])
    p, i = kb.params
    kb.set_block(kb.block("e"))
    pv = kb.offset(p, i, _TYPES[size])
    kb.load(pv, _TYPES[size])
    kb.ret()
    kernel = kb.finish()
    mod = ir.Module("windows")
    mod.triple = llvm.get_process_triple()
    ity = ir.IntType(index_type.bits)
    fn = ir.Function(mod, ir.FunctionType(I1, [I32, I32, ity]), "ok")
    a_lo, a_hi, a_i = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    ptr = ir.IntType(8).as_pointer(1)
    values = {p: ir.Constant(ptr, None), i: a_i, pv: ir.Constant(ptr, None)}
    hooks = SimpleNamespace(limits32=True, param_windows={(0, size): (a_lo, a_hi)},
                            param_bounds={0: (ir.Constant(I64, 0), ir.Constant(I64, 0))})
    kl = SimpleNamespace(fn=fn, b=b, values=values, get=values.__getitem__, kernel=kernel)
    member = CheckGroups(hooks)._param_window(kl, pv, size)   # type: ignore[arg-type]
    assert member is not None, "the window form did not apply"
    kl.b.ret(member.ok)
    ctype = {8: ctypes.c_int8, 16: ctypes.c_int16, 32: ctypes.c_int32}[index_type.bits]
    return jit_function(mod, "ok", ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int32, ctypes.c_int32, ctype))


@pytest.mark.parametrize("size", WINDOW_SIZES)
def test_the_emitted_check_with_the_filled_window_is_the_general_check(size: int) -> None:
    ok = _window_check(size, i32)
    bad = []
    for base in (0x1000, (1 << 64) - 64):
        for length in _lengths(size):
            for dist in _dists(size, length):
                pointer = (base + dist) & M64
                lo, hi = _filled(pointer, base, length)[size]
                for i in _indices((lo, hi), size, (pointer - base) & M64, length) \
                        | _indices((lo, hi), size, dist, length):
                    if ok(lo, hi, i) != general_ok(pointer, base, length, size, i):
                        bad.append((pointer, base, length, i))
    assert bad == []


def test_narrow_indices_are_sign_extended() -> None:
    ok = _window_check(4, i16)
    lo, hi = element_window(0x1000 + 4 * 100, 0x1000, 4 * 200, 4)          # indices -100..99
    for i in (-32768, -101, -100, -1, 0, 99, 100, 32767):
        assert ok(lo, hi, i) == general_ok(0x1000 + 400, 0x1000, 800, 4, i) == (-100 <= i <= 99)
    ok8 = _window_check(1, i8)
    lo, hi = element_window(0x1000 + 10, 0x1000, 20, 1)                      # -10..9
    for i in range(-128, 128):
        assert ok8(lo, hi, i) == (-10 <= i <= 9)


# -- the interpreter agrees ------------------------------------------------------------------------

def _load_kernel(size: int) -> Module:
    t = _TYPES[size]
    kb = KernelBuilder("k", [("p", ptr_global), ("i", i32), ("out", ptr_global)])
    p, i, out = kb.params
    kb.set_block(kb.block("e"))
    kb.store(kb.load(kb.offset(p, i, t), t), kb.offset(out, kb.const(0, i32), t))
    kb.ret()
    return Module("m", [kb.finish()])


@pytest.mark.parametrize("size", WINDOW_SIZES)
def test_the_interpreter_faults_exactly_outside_the_filled_window(size: int) -> None:
    module = _load_kernel(size)
    mem = Memory(1 << 21)
    buf = mem.upload(np.zeros(64, np.uint8))
    out = mem.upload(np.zeros(16, np.uint8))
    for delta in (0, size, 3 * size, 1, 64 - size, 64, 64 + size, -size, 1 << 20):
        pointer = (buf + delta) & M64
        base, length = mem.allocation_at(pointer) or (0, 0)
        lo, hi = _filled(pointer, base, length)[size]
        for i in sorted({lo - 1, lo, hi, hi + 1, 0, -1, 1, -delta // size - 1, -delta // size, I32_MIN, I32_MAX}):
            if not I32_MIN <= i <= I32_MAX:
                continue
            try:
                run_kernel(module, "k", 1, 1, [pointer, i, out], mem)
                faulted = False
            except InterpFault as f:
                faulted = True
                assert f.param == 0
            assert faulted == (not lo <= i <= hi), (delta, i, lo, hi)


# -- the PTX ---------------------------------------------------------------------------------------

def test_vector_add_tests_its_one_index_against_the_common_window() -> None:
    """a[i], b[i], c[i]: one index into every pointer buffer, so the hot side tests the common
    f32 window (the intersection of the three); each buffer's own window is tested on the cold
    side, in program order."""
    from vxpu.ir.lower.nvptx import lower_module
    from vxpu.ir.samples import SAMPLES

    module = SAMPLES["vector_add"].module()
    text = str(lower_module(module))
    body = text[text.index("define"):]
    # (n, a, b, c), 3 x (base, length), 4 x 4 windows (lo, hi): a's, b's, c's, the common ones
    sig = body[:body.index("{")]
    args = re.findall(r"%\"?(\.\d+)\"?", sig)
    assert len(args) == 4 + 6 + 32 + 2
    windows = args[10:42]
    own = [(windows[8 * k + 4], windows[8 * k + 5]) for k in range(3)]
    common = (windows[28], windows[29])
    branch = re.search(r'br i1 %"(\.\d+)", label %"ok", label %"fault"', body)
    assert branch is not None
    cond = re.search(rf'%"{re.escape(branch.group(1))}" = and i1 %"(\.\d+)", %"(\.\d+)"', body)
    assert cond is not None
    ge = re.search(rf'%"{re.escape(cond.group(1))}" = icmp sge i32 %"?\.\d+"?, %"{common[0]}"', body)
    le = re.search(rf'%"{re.escape(cond.group(2))}" = icmp sle i32 %"?\.\d+"?, %"{common[1]}"', body)
    assert ge and le
    cold = body[body.index("fault:"):]
    for lo, hi in own[:2]:                    # the last one needs no test: something failed
        assert f'%"{lo}"' in body and f'%"{hi}"' in body
    assert "icmp ult i64" not in body[:body.index("fault:")]
    assert cold


def test_a_run_that_misses_a_pointer_keeps_its_own_windows() -> None:
    """k(a, b, c): loads a[i] and b[i] but not c — the common window would also test c's, so
    each load is tested against its own window."""
    from vxpu.ir.lower.nvptx import lower_module

    kb = KernelBuilder("k", [("i", i32), ("a", ptr_global), ("b", ptr_global), ("c", ptr_global)])
    i, a, b, c = kb.params
    kb.set_block(kb.block("e"))
    pa, pb, pc = kb.offset(a, i, f32), kb.offset(b, i, f32), kb.offset(c, kb.add(i, kb.const(1, i32)), f32)
    kb.store(kb.fadd(kb.load(pa, f32), kb.load(pb, f32)), pc)        # one group: one branch
    kb.ret()
    text = str(lower_module(Module("m", [kb.finish()])))
    body = text[text.index("define"):]
    args = re.findall(r"%\"?(\.\d+)\"?", body[:body.index("{")])
    windows = args[10:42]
    code = body[body.index("{"):]
    assert code.count('label %"fault"') == 1
    for k in range(2):                        # a's and b's own f32 windows, not the common one
        assert f'icmp sge i32 %".1", %"{windows[8 * k + 4]}"' in code
    assert f'%"{windows[28]}"' not in code


@settings(max_examples=300, deadline=None)
@given(size=st.sampled_from(WINDOW_SIZES), i=st.integers(I32_MIN, I32_MAX),
       bufs=st.lists(st.tuples(st.integers(1, 1 << 20).map(lambda v: v << 3), st.integers(0, 1 << 12),
                               st.integers(-64, 1 << 12)), min_size=1, max_size=4))
def test_the_common_window_admits_exactly_what_every_window_admits(size: int, i: int, bufs: list) -> None:  # type: ignore[type-arg]
    """Through the fill: ``i`` is in the common window iff every pointer's window has it."""
    info = KernelInfo("k", (8,) * len(bufs), tuple(8 * k for k in range(len(bufs))), 8 * len(bufs), 0, True,
                      tuple(range(len(bufs))))
    full = gpu_checked.launch_info(info)
    buf = bytearray(full.args_size)
    args = struct.pack(f"<{len(bufs)}Q", *((base + d) & M64 for base, _, d in bufs))
    CheckedArgs(info, 0).fill(memoryview(buf), args, [(base, length) for base, length, _ in bufs], 0xF000)
    n = WINDOW_SIZES.index(size)
    start = full.param_offsets[len(bufs) + 2 * len(bufs)]
    own = [struct.unpack_from("<ii", buf, start + 32 * k + 8 * n) for k in range(len(bufs))]
    common = struct.unpack_from("<ii", buf, start + 32 * len(bufs) + 8 * n)
    assert (common[0] <= i <= common[1]) == all(lo <= i <= hi for lo, hi in own)
    assert (common[0] <= i <= common[1]) == all(general_ok((base + d) & M64, base, length, size, i)
                                                 for base, length, d in bufs)


def test_the_variant_switch_restores_the_64_bit_forms() -> None:
    from vxpu.ir.lower.gpu import GpuHooks
    from vxpu.ir.lower.nvptx import lower_module
    from vxpu.ir.samples import SAMPLES

    module = SAMPLES["vector_add"].module()
    GpuHooks.limits32 = False
    try:
        text = str(lower_module(module))
    finally:
        GpuHooks.limits32 = True
    hot = text[text.index("define"):text.index("fault:")]
    assert "icmp ult i64" in hot and "icmp sge i32" not in hot


@needs_nvjitlink
def test_vector_add_ptx_has_one_s32_compare_pair_and_no_64_bit_bound_test() -> None:
    """In the PTX: the index is compared (``setp.ge.s32`` / ``setp.le.s32``) with the common f32
    window, hidden parameters 38/39 (after n, a, b, c, 3 bounds pairs and 3 x 8 window i32),
    before the loads, and with no 64-bit compare; the unchecked PTX has only ``i < n``."""
    from vxpu.ir.compile import compile_module
    from vxpu.ir.samples import SAMPLES

    module = SAMPLES["vector_add"].module()
    ptx = compile_module(module, "nvptx", arch="sm_90", cache=False).asm
    reg = dict(re.findall(r"ld\.param\.b32\s+(%r\d+), \[vector_add_param_(\d+)\];", ptx))
    param_of = {r: int(n) for r, n in reg.items()}
    hot = ptx[ptx.index(".entry"):ptx.index("ld.global")]
    pairs = re.findall(r"setp\.(ge|le)\.s32\s+%p\d+, %r\d+, (%r\d+);", hot)
    assert sorted((param_of[r], op) for op, r in pairs) == [(0, "ge"), (38, "ge"), (39, "le")]   # (0: i < n)
    assert not re.search(r"setp\.\w+\.[us]64", hot)
    unchecked = compile_module(module, "nvptx", arch="sm_90", cache=False, checked=False).asm
    assert re.findall(r"setp\.\w+", unchecked) == ["setp.ge"]


def _pointer_kernel(n: int) -> Module:
    kb = KernelBuilder("k", [(f"p{k}", ptr_global) for k in range(n)])
    ps = kb.params
    kb.set_block(kb.block("e"))
    t = kb.thread_id("x")
    kb.store(kb.load(kb.offset(ps[0], t, f32), f32), kb.offset(ps[n - 1], t, f32))
    kb.ret()
    return Module("m", [kb.finish()])


def test_windows_only_while_the_parameters_fit_and_host_and_lowering_agree() -> None:
    """Past WINDOW_PARAM_BYTES of parameters (PTX before ISA 8.1 allows 4352) a kernel takes no
    windows; the host's layout and the lowered signature agree on either side of the edge."""
    from vxpu.ir.args import kernel_signature
    from vxpu.ir.lower import gpucheck
    from vxpu.ir.lower.nvptx import lower_module

    assert gpu_checked.WINDOW_PARAM_BYTES == gpucheck.WINDOW_PARAM_BYTES
    for args_size in range(0, 4200, 4):
        for n in (0, 1, 2, 3, 30, 60, 70, 75, 80, 100):
            assert gpu_checked.windows_fit(args_size, n) == gpucheck.windows_fit(args_size, n)
    flips = [n for n in range(1, 130) if gpu_checked.windows_fit(8 * n, n) != gpu_checked.windows_fit(8 * n + 8, n + 1)]
    assert len(flips) == 1
    for n in (1, flips[0], flips[0] + 1, 128):
        module = _pointer_kernel(n)
        info = KernelInfo.from_signature(kernel_signature(module.kernels[0]), checked=True)
        full = gpu_checked.launch_info(info)
        text = str(lower_module(module))
        sig = text[text.index("define"):]
        sig = sig[:sig.index("{")]
        assert len(re.findall(r"%\"?\.\d+\"?", sig)) == len(full.param_sizes), n
        assert ("icmp sge i32" in text) == gpu_checked.windows_fit(info.args_size, n), n
        buf = bytearray(full.args_size)
        CheckedArgs(info, 5).fill(memoryview(buf), struct.pack(f"<{n}Q", *([0x1000] * n)), [(0x1000, 64)] * n, 0xF000)
        assert struct.unpack_from("<QI", buf, full.param_offsets[-2]) == (0xF000, 5)
        assert struct.unpack_from("<QQ", buf, full.param_offsets[n]) == (0x1000, 64)


@needs_nvjitlink
def test_a_kernel_with_128_pointers_still_compiles() -> None:
    from vxpu.ir.compile import compile_module

    assert compile_module(_pointer_kernel(128), "nvptx", arch="sm_90", cache=False).image
