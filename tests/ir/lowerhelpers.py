"""Helpers for the lowering tests: run a kernel on the x86 JIT (and on the reference
interpreter) over one interpreter ``Memory`` arena, and the sample kernels' numpy references."""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vxpu.ir.compile import compile_module
from vxpu.ir.cpu_exec import CpuModule
from vxpu.ir.interp import Memory, run_kernel
from vxpu.ir.lower import toolchain
from vxpu.ir.lower.errors import ToolchainError, ToolMissingError
from vxpu.ir.model import Module
from vxpu.ir.text import parse

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "kernels"
_EMPTY_PTX = ".version 8.0\n.target sm_90\n.address_size 64\n"


@functools.cache
def nvjitlink_missing() -> str:
    """Why nvJitLink cannot assemble PTX here ('' when it can): not installed, or its library
    not found (cuda.pathfinder)."""
    try:
        toolchain.ptx_to_cubin(_EMPTY_PTX, "sm_90")
    except ToolMissingError as exc:
        return str(exc)
    except ToolchainError:
        pass  # the tool runs: it rejected the probe
    return ""


@functools.cache
def lld_missing() -> str:
    """Why no ``ld.lld`` can link hsaco here ('' when one can)."""
    try:
        toolchain.lld_command()
    except ToolMissingError as exc:
        return str(exc)
    return ""


#: Tests that compile for NVPTX (every NVPTX compile ends in nvJitLink) or link AMDGPU hsaco
#: skip with the reason when the native tool is absent.
needs_nvjitlink = pytest.mark.skipif(bool(nvjitlink_missing()), reason=f"nvJitLink unusable: {nvjitlink_missing()}")
needs_lld = pytest.mark.skipif(bool(lld_missing()), reason=f"no ld.lld: {lld_missing()}")
_FMT = {"i8": "b", "i16": "h", "i32": "i", "i64": "q", "f16": "e", "f32": "f", "f64": "d"}


@functools.cache
def load_sample(name: str) -> Module:
    """Parse ``examples/kernels/<name>.vxir`` (memoised: treat the result as read-only)."""
    return parse((EXAMPLES / f"{name}.vxir").read_text())


def pack_args(module: Module, kernel: str, args: Sequence[Any]) -> bytes:
    """Pack argument values the way ``KernelSignature`` lays them out (natural alignment, LE)."""
    k = module.kernel(kernel)
    out = bytearray()
    for p, v in zip(k.params, args, strict=True):
        size = p.type.size
        out += b"\0" * ((-len(out)) % size)
        fmt = "Q" if p.type.is_ptr else _FMT[p.type.name]
        if fmt in "bhiq" and isinstance(v, int) and v >= 1 << (8 * size - 1):
            v -= 1 << (8 * size)
        out += struct.pack("<" + fmt, v)
    align = max([p.type.size for p in k.params], default=1)
    out += b"\0" * ((-len(out)) % align)
    return bytes(out)


_loaded: dict[int, tuple[Module, CpuModule]] = {}


def cpu_module(module: Module, opt_level: int = 3) -> CpuModule:
    """Compile for x86 (no cache) and load; memoised per module object."""
    key = id(module) * 4 + opt_level
    if key not in _loaded:  # the module is kept alive with it, so ids are never reused
        _loaded[key] = (module, CpuModule(compile_module(module, "x86", opt_level=opt_level, cache=False)))
    return _loaded[key][1]


def run_x86(module: Module, kernel: str, grid: Sequence[int], block: Sequence[int], args: Sequence[Any],
            mem: Memory, **kw: Any) -> None:
    """Run on the x86 JIT with ``mem``'s buffer as the arena (each pointer's bounds: the
    allocation of ``mem`` containing it, unless ``bounds=`` is given)."""
    k = cpu_module(module).kernel(kernel)
    if "bounds" not in kw:
        kw["bounds"] = buffer_bounds(module, kernel, args, mem)
    k.run(grid, block, pack_args(module, kernel, args), mem.buf.ctypes.data, mem.size, **kw)


def buffer_bounds(module: Module, kernel: str, args: Sequence[Any], mem: Memory) -> list[tuple[int, int]]:
    """``(base, length)`` of each pointer argument: its allocation in ``mem`` (or nothing)."""
    params = module.kernel(kernel).params
    return [mem.allocation_at(int(a)) or (0, 0) for p, a in zip(params, args) if p.type.is_ptr]


def differential(module: Module, kernel: str, grid: Sequence[int], block: Sequence[int],
                 args: Sequence[Any], mem: Memory) -> tuple[np.ndarray, np.ndarray]:
    """Run the interpreter and the x86 JIT from the same memory; return both arenas."""
    mem_x86 = Memory(mem.size, guard=mem.guard, strict=False)
    mem_x86.buf[:] = mem.buf
    bounds = buffer_bounds(module, kernel, args, mem)      # the same buffers as the interpreter's
    run_kernel(module, kernel, grid, block, args, mem)
    run_x86(module, kernel, grid, block, args, mem_x86, bounds=bounds)
    return mem.buf, mem_x86.buf


_engines: list[object] = []      # MCJIT engines stay alive while the functions they made are used


def jit_function(module: Any, name: str, proto: Any) -> Any:
    """Compile the llvmlite ``module`` (an ``ir.Module``) for this host with MCJIT (after
    verifying it) and return its function ``name`` as ``proto`` (a ``ctypes.CFUNCTYPE``); the
    engine is kept alive for the rest of the test run."""
    llvm = toolchain.llvm_binding()
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    engine = llvm.create_mcjit_compiler(parsed, llvm.Target.from_default_triple().create_target_machine())
    engine.finalize_object()
    _engines.append(engine)
    return proto(engine.get_function_address(name))


def cuda_session() -> tuple[Any, Any]:
    """A CUDA backend and a session on it, or skip (no driver or device; ``VXPU_GPU_TESTS=0``).
    Contained faults log a WARNING each on a GPU run; those of ``vxpu.accel`` are raised to
    ERROR so dozens of them do not bury a failure's report."""
    import logging
    import os

    if os.environ.get("VXPU_GPU_TESTS", "1") == "0":
        pytest.skip("VXPU_GPU_TESTS=0")
    try:
        from vxpu.accel.registry import open_backend
        from vxpu.accel.session import Session
        backend = open_backend("cuda")
    except Exception as exc:  # noqa: BLE001 - any missing driver/device means: no GPU here
        pytest.skip(f"no CUDA device: {exc}")
    logging.getLogger("vxpu.accel").setLevel(logging.ERROR)
    return backend, Session(backend)
