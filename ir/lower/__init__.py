"""Lowering of vxpu IR through LLVM to native code.

* :mod:`.common` — IR → ``llvmlite.ir``, shared by every target (exact IR semantics, no UB);
* :mod:`.gpu`, :mod:`.nvptx`, :mod:`.amdgpu` — GPU kernels (PTX/cubin, hsaco);
* :mod:`.x86` — sandboxed host code with barrier fission;
* :mod:`.math` — our own transcendental functions (same results on every target);
* :mod:`.mathprec` — their extra-precision parts (double-double log, Payne–Hanek reduction);
* :mod:`.toolchain` — target machines, emission, nvJitLink, ld.lld, ELF checks, versions.

The public entry is :func:`vxpu.ir.compile.compile_module`.
"""
