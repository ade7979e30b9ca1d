"""vxpu.ir: the portable kernel IR.

Guests ship kernels as one IR module; the host verifies it (guest input is hostile) and
JIT-compiles it for what it has. This package root is pure Python with no llvmlite import, so
the guest imports it too. The everyday entry points::

    from vxpu.ir import KernelBuilder, Module, parse, print_module, encode, decode, verify

    module = parse(open("saxpy.vxir").read())   # text form (.vxir), ParseError with line:col
    wire = encode(module)                        # compact binary form for the wire
    same = decode(wire)                          # DecodeError on hostile bytes; verifies
    key = module_hash(module)                    # sha256 of the canonical encoding

Compilation (LLVM, host side only) lives in :mod:`vxpu.ir.compile`; the optimization passes in
:mod:`vxpu.ir.passes`; the reference interpreter in :mod:`vxpu.ir.interp`. The specification is
``docs/ir.md``.
"""

from vxpu.ir.binary import decode, encode
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.errors import DecodeError, IRError, ParseError, VerifyError
from vxpu.ir.hashing import module_hash
from vxpu.ir.model import Kernel, Module
from vxpu.ir.text import parse, print_module
from vxpu.ir.verify import verify

__all__ = [
    "DecodeError", "IRError", "Kernel", "KernelBuilder", "Module", "ParseError", "VerifyError",
    "decode", "encode", "module_hash", "parse", "print_module", "verify",
]
