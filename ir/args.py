"""Kernel argument layout: what a launch's argument blob looks like, on every target.

The host backends and the guest SDK must pack a launch's arguments identically, and the guest
has no llvmlite and perhaps no numpy, so the layout lives here, in the stdlib-only IR core::

    from vxpu.ir.args import kernel_signature, pack_args
    sig = kernel_signature(module.kernel("saxpy"))      # a verified kernel
    blob = pack_args(sig, [n, 2.0, x_addr, y_addr])     # sig.args_size bytes

The rules (C struct rules, little-endian): each parameter sits at a multiple of its size, and
the total is rounded up to the largest parameter size. Pointers are 64-bit device addresses.
Shared arrays are laid out by :func:`array_layout` (each at a multiple of ``max(16, element
size)``, the total rounded up to 16); the x86 lowering uses the same function for its
scratch memory, so ``static_shared_bytes`` is the same number the CPU backend reserves.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import IRError
from .model import Kernel, LocalArray, SharedArray

__all__ = [
    "ARRAY_ALIGN",
    "KernelSignature",
    "array_layout",
    "kernel_signature",
    "pack_args",
]

#: Alignment of each shared or local array and of the total.
ARRAY_ALIGN = 16

_FLOAT_FORMATS = {"f16": "<e", "f32": "<f", "f64": "<d"}
_INT_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


@dataclass(frozen=True)
class KernelSignature:
    """Launch-relevant facts of one kernel (the same on every target).

    Attributes:
        name: the kernel's name.
        param_sizes: size in bytes of each parameter.
        param_offsets: offset of each parameter in the argument blob.
        args_size: total size of the argument blob.
        static_shared_bytes: the kernel's shared arrays, laid out by :func:`array_layout`.
        uses_global_atomics: some atomic op works on global memory.
        has_barriers: the kernel contains a barrier.
        param_types: each parameter's IR type name (``"i32"``, ``"f32"``, ``"ptr<global>"`` ...),
            which is what :func:`pack_args` needs to encode a value.
        param_names: each parameter's name (without the ``%``), for messages.
    """

    name: str
    param_sizes: tuple[int, ...]
    param_offsets: tuple[int, ...]
    args_size: int
    static_shared_bytes: int
    uses_global_atomics: bool
    has_barriers: bool
    param_types: tuple[str, ...]
    param_names: tuple[str, ...]


def array_layout(arrays: Sequence[SharedArray | LocalArray], align: int = ARRAY_ALIGN
                 ) -> tuple[tuple[int, ...], int]:
    """Offsets of ``arrays`` packed in order, and their total size.

    Each array starts at a multiple of ``max(align, element size)``; the total is rounded up to
    ``align``.
    """
    offsets, pos = [], 0
    for arr in arrays:
        a = max(align, arr.type.size)
        pos = (pos + a - 1) // a * a
        offsets.append(pos)
        pos += arr.size
    return tuple(offsets), (pos + align - 1) // align * align


def kernel_signature(kernel: Kernel) -> KernelSignature:
    """The :class:`KernelSignature` of a verified kernel."""
    sizes, offsets, pos, align = [], [], 0, 1
    for p in kernel.params:
        size = p.type.size
        pos = (pos + size - 1) // size * size
        sizes.append(size)
        offsets.append(pos)
        pos += size
        align = max(align, size)
    total = (pos + align - 1) // align * align
    _, shared = array_layout(kernel.shared)
    atomics = any(op.opcode.startswith("atomic_") and op.operands[0].type.space is not None
                  and op.operands[0].type.space.value == "global" for op in kernel.ops())
    barriers = any(op.opcode == "barrier" for op in kernel.ops())
    types = tuple(p.type.name for p in kernel.params)
    names = tuple(p.name or str(i) for i, p in enumerate(kernel.params))
    return KernelSignature(kernel.name, tuple(sizes), tuple(offsets), total, shared, atomics, barriers,
                           types, names)


def pack_args(signature: KernelSignature, values: Sequence[Any]) -> bytes:
    """Pack launch arguments the way every backend takes them (little-endian, at the offsets).

    Args:
        signature: the kernel's layout (:func:`kernel_signature`).
        values: one value per parameter: integers (signed or unsigned) for integer parameters,
            numbers for float parameters, device addresses for pointers.

    Returns:
        ``signature.args_size`` bytes; padding is zero.

    Raises:
        IRError: wrong number of values, or a value that does not fit its parameter.
    """
    types = signature.param_types
    if len(values) != len(types):
        raise IRError(f"kernel @{signature.name} takes {len(types)} arguments, got {len(values)}")
    buf = bytearray(signature.args_size)
    for tname, pname, size, off, v in zip(types, signature.param_names, signature.param_sizes,
                                          signature.param_offsets, values):
        try:
            if tname in _FLOAT_FORMATS:
                struct.pack_into(_FLOAT_FORMATS[tname], buf, off, float(v))
                continue
            bits = size * 8
            iv = int(v)
            if not -(1 << (bits - 1)) <= iv < (1 << bits):
                raise IRError(f"argument %{pname} = {iv} does not fit {tname}")
            struct.pack_into(_INT_FORMATS[size], buf, off, iv & ((1 << bits) - 1))
        except (struct.error, OverflowError, TypeError, ValueError, KeyError) as exc:
            raise IRError(f"argument %{pname} ({tname}) cannot take {v!r}: {exc}") from None
    return bytes(buf)
