"""IR → NVPTX LLVM IR → PTX (ISA 8.0) → cubin through nvJitLink.

Conventions: ``define ptx_kernel void @k(...)`` (plus the legacy ``nvvm.annotations`` kernel
mark), ``ptr<global>`` = ``addrspace(1)``, ``ptr<shared>`` = ``addrspace(3)`` globals,
``ptr<local>`` = generic pointers to ``alloca`` s (NVPTX turns them into ``.local``),
``ptr<constant>`` = ``addrspace(1)`` with ``!invariant.load`` loads (``ld.global.nc``): a
constant pointer is an ordinary device allocation, which the ``.const`` window
(``addrspace(4)``) cannot address. Thread geometry comes from the ``%tid``/``%ctaid``/``%ntid``/
``%nctaid`` special registers, barriers are ``bar.sync 0`` (``llvm.nvvm.barrier0``), traps
``trap;``.
"""

from __future__ import annotations

from typing import ClassVar

from llvmlite import ir
from vxpu.ir.lower.common import I32, KernelLowering, declare
from vxpu.ir.lower.gpu import GpuHooks, lower_gpu_module
from vxpu.ir.lower.math_f32 import Ex2Unit
from vxpu.ir.lower.toolchain import NVPTX_DATALAYOUT, NVPTX_TRIPLE
from vxpu.ir.model import Module
from vxpu.ir.types import AddressSpace

_SREG = {"thread_id": "tid", "block_id": "ctaid", "block_dim": "ntid", "grid_dim": "nctaid"}


class NvptxHooks(GpuHooks):
    """NVPTX specifics."""

    triple = NVPTX_TRIPLE
    datalayout = NVPTX_DATALAYOUT
    spaces: ClassVar[dict[AddressSpace, int]] = {AddressSpace.GLOBAL: 1, AddressSpace.CONSTANT: 1, AddressSpace.SHARED: 3,
              AddressSpace.LOCAL: 0}

    def __init__(self, checked: bool = True) -> None:
        super().__init__(checked)
        self.kernels: list[ir.Function] = []

    def geometry(self, kl: KernelLowering, opcode: str, dim: str) -> ir.Value:
        name = f"llvm.nvvm.read.ptx.sreg.{_SREG[opcode]}.{dim}"
        return kl.b.call(declare(kl.module, name, I32, []), [])

    def barrier(self, kl: KernelLowering) -> None:
        kl.b.call(declare(kl.module, "llvm.nvvm.barrier0", ir.VoidType(), []), [])

    def invariant_load(self, space: AddressSpace) -> bool:
        return space is AddressSpace.CONSTANT

    def ex2_unit(self) -> Ex2Unit | None:
        return _EX2

    def mark_kernel(self, fn: ir.Function) -> None:
        fn.calling_convention = "ptx_kernel"
        mod = fn.module
        ann = mod.add_named_metadata("nvvm.annotations")
        ann.add(mod.add_metadata([fn, "kernel", ir.Constant(I32, 1)]))


def _ex2_ftz(b: ir.IRBuilder, f: ir.Value) -> ir.Value:
    """``ex2.approx.ftz.f32``: one ``MUFU.EX2``, subnormal results flushed (the core of f32 exp)."""
    return b.call(declare(b.module, "llvm.nvvm.ex2.approx.ftz.f", f.type, [f.type]), [f])


def _ex2_full(b: ir.IRBuilder, f: ir.Value) -> ir.Value:
    """``ex2.approx.f32`` (subnormal results kept; ≤ 2 ulp by the PTX ISA): f32 exp2, as CUDA's ``exp2f``."""
    return b.call(declare(b.module, "llvm.nvvm.ex2.approx.f", f.type, [f.type]), [f])


def _rcp_ftz(b: ir.IRBuilder, f: ir.Value) -> ir.Value:
    """``rcp.approx.ftz.f32``: one ``MUFU.RCP`` (≤ 1 ulp; used by f32 tanh, as CUDA's ``tanhf``)."""
    return b.call(declare(b.module, "llvm.nvvm.rcp.approx.ftz.f", f.type, [f.type]), [f])


_EX2 = Ex2Unit(ftz=_ex2_ftz, full=_ex2_full, rcp=_rcp_ftz)


def lower_module(module: Module, checked: bool = True) -> ir.Module:
    """The NVPTX LLVM module for ``module`` (every kernel a ``.entry``; ``checked``: per-buffer
    bounds, see :mod:`vxpu.ir.lower.gpu`)."""
    return lower_gpu_module(module, NvptxHooks, checked)
