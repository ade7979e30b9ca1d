"""Hard limits of the IR, shared by the verifier, the text parser and the binary decoder.

Input from guests is hostile: every count is checked against these constants *before* anything
is allocated, so a tiny message cannot make the host allocate or loop much. They are generous
for real kernels (the largest sample kernels use a few hundred ops) and documented in docs/ir.md.
Worst case, a module at every limit decodes into roughly 150 MB of Python objects.
"""

from __future__ import annotations

__all__ = [
    "MAX_ARRAYS",
    "MAX_ARRAY_COUNT",
    "MAX_BLOCKS",
    "MAX_BLOCK_PARAMS",
    "MAX_KERNELS",
    "MAX_LOCAL_BYTES",
    "MAX_MODULE_BYTES",
    "MAX_NAME_LEN",
    "MAX_OPERANDS",
    "MAX_OPS_PER_KERNEL",
    "MAX_OPS_PER_MODULE",
    "MAX_PARAMS",
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
#: Blocks per kernel.
MAX_BLOCKS = 16384
#: Parameters per block (and so arguments per successor).
MAX_BLOCK_PARAMS = 256
#: Ops per kernel (all blocks together).
MAX_OPS_PER_KERNEL = 65536
#: Ops per module (bounds the memory a decoded module takes: about 0.5 KiB per op in Python).
MAX_OPS_PER_MODULE = 262144
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
