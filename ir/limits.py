"""Hard limits of the IR, shared by the verifier, the text parser and the binary decoder.

Input from guests is hostile: every count is checked against these constants *before* anything
is allocated, so a tiny message cannot make the host allocate or loop much. They are documented
in docs/ir.md (section 9).

The complexity limits (blocks, ops, loop nest depth, phi fan-in) bound what LLVM is given, and
were chosen from measurement (issue 7): the largest sample kernel has 126 ops, 20 blocks, loops
nested 2 deep and 2 edges into a join, while LLVM took 2.3 s on a 16,384-op straight-line
kernel, over a second on a 128-deep loop nest and crashed on a 2000-deep one. At these limits
an x86 compile of the worst shape takes about a second on a slow shared core; the compile
worker's deadline (``vxpu.ir.workers``) bounds anything slower.
"""

from __future__ import annotations

__all__ = [
    "MAX_ARRAYS",
    "MAX_ARRAY_COUNT",
    "MAX_BLOCKS",
    "MAX_BLOCK_PARAMS",
    "MAX_KERNELS",
    "MAX_LOCAL_BYTES",
    "MAX_LOOP_DEPTH",
    "MAX_MODULE_BYTES",
    "MAX_NAME_LEN",
    "MAX_OPERANDS",
    "MAX_OPS_PER_KERNEL",
    "MAX_OPS_PER_MODULE",
    "MAX_PARAMS",
    "MAX_PHI_FAN_IN",
    "MAX_SHARED_BYTES",
    "MAX_SUCCESSORS",
    "MAX_TEXT_BYTES",
    "MAX_VALUES_PER_KERNEL",
]

#: Largest binary encoding accepted (bytes, header included).
MAX_MODULE_BYTES = 4 * 1024 * 1024
#: Largest .vxir text accepted (bytes).
MAX_TEXT_BYTES = 32 * 1024 * 1024
#: Kernels per module.
MAX_KERNELS = 256
#: Parameters per kernel.
MAX_PARAMS = 256
#: Shared plus local arrays per kernel.
MAX_ARRAYS = 256
#: Blocks per kernel (a 16,000-block branch chain took LLVM 6.2 s).
MAX_BLOCKS = 2048
#: Parameters per block (and so arguments per successor).
MAX_BLOCK_PARAMS = 256
#: Ops per kernel (all blocks together; LLVM's time grows faster than linearly in a block's length).
MAX_OPS_PER_KERNEL = 8192
#: Ops per module (256 kernels of 1,000 ops took LLVM 15.8 s and 683 MiB).
MAX_OPS_PER_MODULE = 32768
#: Depth of nested natural loops in one kernel (LLVM's loop passes are super-linear in it).
MAX_LOOP_DEPTH = 32
#: Branch edges into one block that has parameters (each edge is one operand of every phi).
MAX_PHI_FAN_IN = 256
#: Operands of one op (the largest fixed arity is 3; successor args are bounded by MAX_BLOCK_PARAMS).
MAX_OPERANDS = 3
#: Successors of one terminator (cbr has two).
MAX_SUCCESSORS = 2
#: Values (params, block params and op results) per kernel.
MAX_VALUES_PER_KERNEL = MAX_PARAMS + MAX_OPS_PER_KERNEL + 4 * MAX_BLOCKS
#: Characters of any name.
MAX_NAME_LEN = 128
#: Total bytes of a kernel's shared arrays (per block; GPUs offer 48 KiB statically).
MAX_SHARED_BYTES = 48 * 1024
#: Total bytes of a kernel's local arrays (per thread).
MAX_LOCAL_BYTES = 16 * 1024
#: Elements of one array.
MAX_ARRAY_COUNT = MAX_SHARED_BYTES
