"""IR → AMDGPU LLVM IR → ELF object → ``ld.lld -shared`` → hsaco.

Conventions: ``define amdgpu_kernel void @k(...)``, ``ptr<global>`` = ``addrspace(1)``,
``ptr<constant>`` = ``addrspace(4)`` (read-only global memory), ``ptr<shared>`` = LDS
``addrspace(3)`` globals, ``ptr<local>`` = ``alloca ..., addrspace(5)`` (scratch). Thread and
block indices come from ``llvm.amdgcn.workitem.id.*``/``workgroup.id.*``; the block size and the
grid size (in work-items) are read from the HSA dispatch packet (``llvm.amdgcn.dispatch.ptr``:
``workgroup_size_*`` u16 at 4/6/8, ``grid_size_*`` u32 at 12/16/20). A barrier is
``fence syncscope("workgroup") release; s_barrier; fence syncscope("workgroup") acquire``.
The code-object version is a module flag (``amdhsa_code_object_version`` 400 or 500).
"""

from __future__ import annotations

from typing import ClassVar

from llvmlite import ir
from vxpu.ir.lower.common import I8, I16, I32, I64, KernelLowering, declare
from vxpu.ir.lower.gpu import GpuHooks, lower_gpu_module
from vxpu.ir.lower.toolchain import AMDGPU_DATALAYOUT, AMDGPU_TRIPLE, COV_FLAGS
from vxpu.ir.model import Module
from vxpu.ir.types import AddressSpace

_DISPATCH_WG = {"x": 4, "y": 6, "z": 8}
_DISPATCH_GRID = {"x": 12, "y": 16, "z": 20}


class _PrivateAlloca(ir.instructions.AllocaInstr):
    """``alloca T, align N, addrspace(5)`` (llvmlite only prints address-space-0 allocas)."""

    def __init__(self, parent: ir.Block, typ: ir.Type, name: str = "") -> None:
        super().__init__(parent, typ, None, name)
        self.type = typ.as_pointer(5)

    def descr(self, buf: list[str]) -> None:
        buf.append(f"alloca {self.allocated_type}, align {self.align or 16}, addrspace(5)")


class AmdgpuHooks(GpuHooks):
    """AMDGPU specifics."""

    triple = AMDGPU_TRIPLE
    datalayout = AMDGPU_DATALAYOUT
    spaces: ClassVar[dict[AddressSpace, int]] = {AddressSpace.GLOBAL: 1, AddressSpace.CONSTANT: 4, AddressSpace.SHARED: 3,
              AddressSpace.LOCAL: 5}
    cov = 5

    def geometry(self, kl: KernelLowering, opcode: str, dim: str) -> ir.Value:
        b = kl.b
        if opcode == "thread_id":
            return b.call(declare(kl.module, f"llvm.amdgcn.workitem.id.{dim}", I32, []), [])
        if opcode == "block_id":
            return b.call(declare(kl.module, f"llvm.amdgcn.workgroup.id.{dim}", I32, []), [])
        dp = b.call(declare(kl.module, "llvm.amdgcn.dispatch.ptr", I8.as_pointer(4), []), [])
        wg_ptr = b.bitcast(b.gep(dp, [ir.Constant(I64, _DISPATCH_WG[dim])]), I16.as_pointer(4))
        wg_load = b.load(wg_ptr, align=2)
        wg_load.set_metadata("invariant.load", kl.module.add_metadata([]))
        wg = b.zext(wg_load, I32)
        if opcode == "block_dim":
            return wg
        grid_ptr = b.bitcast(b.gep(dp, [ir.Constant(I64, _DISPATCH_GRID[dim])]), I32.as_pointer(4))
        grid = b.load(grid_ptr, align=4)
        grid.set_metadata("invariant.load", kl.module.add_metadata([]))
        # The runtime always dispatches whole blocks; guard the division anyway (wg >= 1).
        safe = b.select(b.icmp_unsigned("==", wg, ir.Constant(I32, 0)), ir.Constant(I32, 1), wg)
        return b.udiv(grid, safe)

    def barrier(self, kl: KernelLowering) -> None:
        kl.b.fence("release", "workgroup")
        kl.b.call(declare(kl.module, "llvm.amdgcn.s.barrier", ir.VoidType(), []), [])
        kl.b.fence("acquire", "workgroup")

    def invariant_load(self, space: AddressSpace) -> bool:
        return space is AddressSpace.CONSTANT

    def mark_kernel(self, fn: ir.Function) -> None:
        fn.calling_convention = "amdgpu_kernel"

    def make_local(self, b: ir.IRBuilder, ty: ir.ArrayType, align: int) -> ir.Value:
        inst = _PrivateAlloca(b.block, ty)
        inst.align = align
        b._insert(inst)
        return inst

    def finish_module(self, mod: ir.Module) -> None:
        flags = mod.add_named_metadata("llvm.module.flags")
        flags.add(mod.add_metadata([ir.Constant(I32, 1), "amdhsa_code_object_version",
                                    ir.Constant(I32, COV_FLAGS[self.cov])]))


def lower_module(module: Module, cov: int = 5, checked: bool = True) -> ir.Module:
    """The AMDGPU LLVM module for ``module`` with code-object version ``cov`` (4 or 5);
    ``checked``: per-buffer bounds (see :mod:`vxpu.ir.lower.gpu`)."""

    class _Hooks(AmdgpuHooks):
        pass

    _Hooks.cov = cov
    return lower_gpu_module(module, _Hooks, checked)
