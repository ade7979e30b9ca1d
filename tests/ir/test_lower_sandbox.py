"""The x86 sandbox: hostile kernels fault cleanly and never touch memory outside their windows."""

from __future__ import annotations

import numpy as np
import pytest
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.compile import compile_module
from vxpu.ir.cpu_exec import CpuModule, KernelFault
from vxpu.ir.lower import x86
from vxpu.ir.model import Module
from vxpu.ir.types import f32, f64, i32, i64, ptr_constant, ptr_global

from tests.ir.lowerhelpers import cpu_module, pack_args

ARENA = 4096
GUARD = 4096


class Arena:
    """An arena with canary pages on both sides, to prove nothing outside it is written."""

    def __init__(self) -> None:
        self.buf = np.full(GUARD + ARENA + GUARD, 0xA5, np.uint8)
        self.buf[GUARD:GUARD + ARENA] = 0
        self.base = self.buf.ctypes.data + GUARD

    def intact(self) -> bool:
        return bool((self.buf[:GUARD] == 0xA5).all() and (self.buf[GUARD + ARENA:] == 0xA5).all())


def _access_kernel(kind: str, t=f32) -> Module:  # type: ignore[no-untyped-def]
    """``kind``: load/store/atomic through p + off (bytes) in the address space under test."""
    space = ptr_constant if kind == "cload" else ptr_global
    kb = KernelBuilder("k", [("p", space), ("off", i64), ("out", ptr_global)])
    p, off, out = kb.params
    kb.set_block(kb.block("e"))
    q = kb.byte_offset(p, off)
    if kind in ("load", "cload"):
        kb.store(kb.load(q, t), out)
    elif kind == "store":
        kb.store(kb.const(1.0, t), q)
    else:
        kb.atomic_add(q, kb.const(1, i32))
    kb.ret()
    return Module("m", [kb.finish()])


_MODS = {k: _access_kernel(k) for k in ("load", "cload", "store", "atomic")}


def _run(kind: str, off: int, arena: Arena) -> None:
    mod = _MODS[kind]
    k = cpu_module(mod).kernel("k")
    k.run((1,), (1,), pack_args(mod, "k", [0, off, 64]), arena.base, ARENA)


@pytest.mark.parametrize("kind", ["load", "cload", "store", "atomic"])
@pytest.mark.parametrize("off", [ARENA, ARENA - 2, ARENA + 4096, -4, -(1 << 63), (1 << 63) - 1, 1 << 40])
def test_out_of_arena_faults(kind: str, off: int) -> None:
    arena = Arena()
    with pytest.raises(KernelFault) as info:
        _run(kind, off, arena)
    # a misaligned access is reported as such, even out of bounds (the alignment test comes first)
    assert info.value.code == (x86.FAULT_MISALIGNED if off % 4 else x86.FAULT_GLOBAL)
    assert info.value.address == off & ((1 << 64) - 1)
    assert arena.intact()


@pytest.mark.parametrize("kind", ["load", "store", "atomic"])
def test_in_bounds_edges_work(kind: str) -> None:
    arena = Arena()
    _run(kind, ARENA - 4, arena)
    _run(kind, 0, arena)
    assert arena.intact()


@pytest.mark.parametrize("kind", ["load", "store", "atomic"])
def test_misaligned_faults(kind: str) -> None:
    arena = Arena()
    with pytest.raises(KernelFault) as info:
        _run(kind, 2, arena)
    assert info.value.code == x86.FAULT_MISALIGNED
    assert arena.intact()


def test_zero_sized_arena_faults_on_any_access() -> None:
    mod = _MODS["load"]
    k = cpu_module(mod).kernel("k")
    buf = np.zeros(64, np.uint8)
    with pytest.raises(KernelFault):
        k.run((1,), (1,), pack_args(mod, "k", [0, 0, 0]), buf.ctypes.data, 0)


def _array_kernel(space: str, store: bool) -> Module:
    kb = KernelBuilder("k", [("i", i32), ("out", ptr_global)])
    i, out = kb.params
    arr = kb.shared_array("s", f64, 4) if space == "shared" else kb.local_array("l", f64, 4)
    kb.set_block(kb.block("e"))
    base = kb.shared_addr(arr) if space == "shared" else kb.local_addr(arr)
    q = kb.offset(base, i, f64)
    if store:
        kb.store(kb.const(2.0, f64), q)
    else:
        kb.store(kb.load(q, f64), out)
    kb.ret()
    return Module("m", [kb.finish()])


@pytest.mark.parametrize("space,code", [("shared", x86.FAULT_SHARED), ("local", x86.FAULT_LOCAL)])
@pytest.mark.parametrize("store", [False, True])
def test_shared_and_local_bounds(space: str, code: int, store: bool) -> None:
    mod = _array_kernel(space, store)
    k = cpu_module(mod).kernel("k")
    arena = Arena()
    k.run((1,), (1,), pack_args(mod, "k", [3, 0]), arena.base, ARENA)  # last element: fine
    for bad in (4, -1, 1 << 30):
        with pytest.raises(KernelFault) as info:
            k.run((1,), (1,), pack_args(mod, "k", [bad, 0]), arena.base, ARENA)
        assert info.value.code == code
    assert arena.intact()


def test_dynamic_shared_is_not_reachable_from_an_array() -> None:
    """Checked: a shared array's pointer reaches its declared elements only, never the dynamic
    shared bytes after it. Unchecked (host-side option): the whole window, but no further."""
    mod = _array_kernel("shared", True)
    k = cpu_module(mod).kernel("k")
    arena = Arena()
    with pytest.raises(KernelFault) as info:
        k.run((1,), (1,), pack_args(mod, "k", [5, 0]), arena.base, ARENA, dynamic_shared=64)
    assert (info.value.code, info.value.param, info.value.address) == (x86.FAULT_SHARED, 0x100, 40)
    unchecked = CpuModule(compile_module(mod, "x86", cache=False, checked=False)).kernel("k")
    unchecked.run((1,), (1,), pack_args(mod, "k", [5, 0]), arena.base, ARENA, dynamic_shared=64)
    with pytest.raises(KernelFault):
        unchecked.run((1,), (1,), pack_args(mod, "k", [12, 0]), arena.base, ARENA, dynamic_shared=64)


def test_trap_and_fault_location() -> None:
    kb = KernelBuilder("k", [("n", i32)])
    (n,) = kb.params
    e, bad, ok = kb.block("e"), kb.block("bad"), kb.block("ok")
    kb.set_block(e)
    lin = kb.add(kb.mul(kb.block_id("x"), kb.block_dim("x")), kb.thread_id("x"))
    kb.cbr(kb.icmp("eq", lin, n), bad, ok)
    kb.set_block(bad)
    kb.trap()
    kb.set_block(ok)
    kb.ret()
    mod = Module("m", [kb.finish()])
    k = cpu_module(mod).kernel("k")
    arena = Arena()
    with pytest.raises(KernelFault) as info:
        k.run((4,), (32,), pack_args(mod, "k", [70]), arena.base, ARENA)
    assert info.value.code == x86.FAULT_TRAP
    assert info.value.block == (2, 0, 0) and info.value.thread == (6, 0, 0)
    k.run((2,), (32,), pack_args(mod, "k", [70]), arena.base, ARENA)  # not reached: fine


def test_non_uniform_barrier_faults_instead_of_hanging() -> None:
    kb = KernelBuilder("k", [("n", i32)])
    (n,) = kb.params
    e, wait, done = kb.block("e"), kb.block("wait"), kb.block("done")
    kb.set_block(e)
    kb.cbr(kb.icmp("slt", kb.thread_id("x"), n), wait, done)
    kb.set_block(wait)
    kb.barrier()
    kb.br(done)
    kb.set_block(done)
    kb.ret()
    mod = Module("m", [kb.finish()])
    k = cpu_module(mod).kernel("k")
    arena = Arena()
    k.run((2,), (16,), pack_args(mod, "k", [16]), arena.base, ARENA)  # all threads: fine
    k.run((2,), (16,), pack_args(mod, "k", [0]), arena.base, ARENA)   # none: fine
    with pytest.raises(KernelFault) as info:
        k.run((2,), (16,), pack_args(mod, "k", [5]), arena.base, ARENA)
    assert info.value.code == x86.FAULT_BARRIER


def test_launch_argument_validation() -> None:
    mod = _MODS["load"]
    k = cpu_module(mod).kernel("k")
    arena = Arena()
    args = pack_args(mod, "k", [0, 0, 64])
    for bad in [{"grid": (0,)}, {"block": (1025,)}, {"block": (32, 32, 2)}, {"args": args[:-1]},
                {"blocks": range(2)}, {"blocks": range(0, 1, 2)}, {"arena_size": -1},
                {"dynamic_shared": -1}, {"grid": (1, 1, 1, 1)}]:
        kw = {"grid": (1,), "block": (1,), "args": args, "arena_base": arena.base, "arena_size": ARENA}
        kw.update(bad)
        with pytest.raises(ValueError):
            k.run(**kw)  # type: ignore[arg-type]


def test_process_survives_many_faults() -> None:
    arena = Arena()
    for off in range(ARENA, ARENA + 200):
        with pytest.raises(KernelFault):
            _run("store", off, arena)
    _run("store", 8, arena)
    assert arena.buf[GUARD + 8:GUARD + 12].view(np.float32)[0] == 1.0
    assert arena.intact()


def test_missing_import_is_a_compile_error_not_a_crash(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from vxpu.ir import cpu_exec
    from vxpu.ir.compile import compile_module
    from vxpu.ir.lower.errors import CompileError
    from vxpu.ir.lower.toolchain import elf_undefined_symbols

    from tests.ir.lowerhelpers import load_sample

    cm = compile_module(load_sample("histogram"), "x86", cache=False)
    assert elf_undefined_symbols(cm.image)  # it calls memset
    monkeypatch.setattr(cpu_exec, "_IMPORT_LIBS", ())
    monkeypatch.setattr(cpu_exec, "_resolved", {})
    with pytest.raises(CompileError, match="needs"):
        cpu_exec.CpuModule(cm)


@pytest.mark.parametrize("target", ["x86", "nvptx", "amdgpu"])
def test_hostile_wire_bytes_are_rejected_before_lowering(target: str) -> None:
    from vxpu.ir.compile import compile_module
    from vxpu.ir.errors import DecodeError

    for junk in (b"", b"garbage", b"VXIR\x01\x00\x00" + b"\xff" * 64):
        with pytest.raises(DecodeError):
            compile_module(junk, target, cache=False)
