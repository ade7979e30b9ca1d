"""What NVPTX and AMDGPU lowering share: one LLVM kernel function per IR kernel.

A GPU kernel is a plain SIMT function: its parameters are the IR parameters, shared arrays
are ``addrspace(3)`` globals of the module, local arrays are zero-initialised ``alloca`` s in
the entry block, pointers are byte pointers and offsets are (non-``inbounds``, wrapping)
``getelementptr i8``. Memory protection comes from the GPU itself (a bad address faults the
context), so no software bounds checks are emitted here. The subclasses supply the intrinsics.
"""

from __future__ import annotations

import re
from typing import ClassVar

from llvmlite import ir
from vxpu.ir.lower.common import (
    I8,
    I32,
    I64,
    VOID,
    KernelLowering,
    TargetHooks,
    declare,
    new_module,
    scalar_type,
)
from vxpu.ir.model import Kernel, LocalArray, Module, Op, SharedArray
from vxpu.ir.types import AddressSpace

_SAFE = re.compile(r"[^A-Za-z0-9_]")


def array_align(elem_size: int) -> int:
    """Alignment of shared/local arrays: at least 16 bytes (room for vector accesses)."""
    return max(16, elem_size)


class GpuHooks(TargetHooks):
    """Common GPU behaviour; subclasses set the address spaces and intrinsics."""

    #: LLVM address space per IR address space.
    spaces: ClassVar[dict[AddressSpace, int]] = {}
    native_f16_fma = True

    def __init__(self) -> None:
        self.arrays: dict[int, ir.Value] = {}

    def ptr_type(self, space: AddressSpace) -> ir.Type:
        return I8.as_pointer(self.spaces[space])

    def offset(self, kl: KernelLowering, p: ir.Value, nbytes: ir.Value, space: AddressSpace) -> ir.Value:
        return kl.b.gep(p, [nbytes])

    def address(self, kl: KernelLowering, p: ir.Value, space: AddressSpace, t: ir.Type, size: int,
                atomic: bool) -> ir.Value:
        return kl.b.bitcast(p, t.as_pointer(self.spaces[space]))

    def array_addr(self, kl: KernelLowering, op: Op) -> ir.Value:
        arr = self.arrays[id(op.array)]
        space = AddressSpace.SHARED if isinstance(op.array, SharedArray) else AddressSpace.LOCAL
        return kl.b.bitcast(arr, self.ptr_type(space))

    def freeze_loads(self, space: AddressSpace) -> bool:
        # Shared arrays are globals with an undef initializer (GPUs allow no other): a read of
        # a never-written element must give some bit pattern, never undef (docs/ir.md §5.2).
        return space is AddressSpace.SHARED

    def ret(self, kl: KernelLowering) -> None:
        kl.b.ret_void()

    def trap(self, kl: KernelLowering) -> None:
        kl.b.call(declare(kl.module, "llvm.trap", VOID, []), [])
        kl.b.unreachable()

    # -- kernel shell ------------------------------------------------------------------------

    def mark_kernel(self, fn: ir.Function) -> None:
        raise NotImplementedError

    def finish_module(self, mod: ir.Module) -> None:
        """Add module-level flags/metadata after all kernels are emitted."""

    def make_local(self, b: ir.IRBuilder, ty: ir.ArrayType, align: int) -> ir.Value:
        slot = b.alloca(ty)
        slot.align = align
        return slot

    def lower_kernel(self, mod: ir.Module, kernel: Kernel) -> ir.Function:
        params = [kl_type for kl_type in (self._param_type(p.type) for p in kernel.params)]
        fn = ir.Function(mod, ir.FunctionType(VOID, params), name=kernel.name)
        self.mark_kernel(fn)
        entry = fn.append_basic_block("entry")
        b = ir.IRBuilder(entry)
        for arr in kernel.shared:
            self.arrays[id(arr)] = self._shared_global(mod, kernel, arr)
        for arr in kernel.local:
            self.arrays[id(arr)] = self._local_alloca(mod, b, arr)
        kl = KernelLowering(kernel, self, fn, entry, dict(zip(kernel.params, fn.args)))
        kl.b = b
        kl.lower()
        return fn

    def _param_type(self, t):  # type: ignore[no-untyped-def]
        return self.ptr_type(t.space) if t.is_ptr else scalar_type(t)

    def _shared_global(self, mod: ir.Module, kernel: Kernel, arr: SharedArray) -> ir.Value:
        ty = ir.ArrayType(scalar_type(arr.type), arr.count)
        name = f"{kernel.name}.shared.{_SAFE.sub('_', arr.name)}"
        gv = ir.GlobalVariable(mod, ty, name=mod.get_unique_name(name), addrspace=self.spaces[AddressSpace.SHARED])
        gv.linkage = "internal"
        gv.initializer = ir.Constant(ty, ir.Undefined)
        gv.align = array_align(arr.type.size)
        return gv

    def _local_alloca(self, mod: ir.Module, b: ir.IRBuilder, arr: LocalArray) -> ir.Value:
        ty = ir.ArrayType(scalar_type(arr.type), arr.count)
        slot = self.make_local(b, ty, array_align(arr.type.size))
        # Zero-initialise: reading an unwritten local is defined (0), never undef.
        b.store(ir.Constant(ty, None), slot)
        return slot


def lower_gpu_module(module: Module, hooks_factory: type[GpuHooks]) -> ir.Module:
    """Lower every kernel of ``module`` into one LLVM module for a GPU target."""
    proto = hooks_factory()
    mod = new_module(module.name, proto)
    for kernel in module.kernels:
        hooks_factory().lower_kernel(mod, kernel)
    proto.finish_module(mod)
    return mod


__all__ = ["I32", "I64", "GpuHooks", "array_align", "lower_gpu_module"]
