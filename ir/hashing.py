"""Content hashes of IR: sha256 over the canonical binary encoding, without debug names.

Two modules have the same hash exactly when they have the same canonical encoding without the
names section (``vxpu.ir.binary.encode(m, names=False)``): the same kernels with the same
names, parameter types, arrays, blocks and ops, whatever their values, blocks, parameters and
arrays are called and whether they came from text, the builder or the wire. The compile cache
keys on these hashes (plus target and compiler versions).
"""

from __future__ import annotations

import hashlib

from .binary import MAGIC, VERSION, decode, encode, encode_kernel_body
from .model import Kernel, Module

__all__ = ["encoded_hash", "kernel_hash", "module_hash"]

_KERNEL_DOMAIN = b"VXIR-kernel\x00"


def module_hash(module: Module) -> str:
    """Hex sha256 of the canonical encoding of ``module`` (names section excluded).

    Raises:
        IRError: the module cannot be encoded (verify it first).
    """
    return hashlib.sha256(encode(module, names=False)).hexdigest()


def kernel_hash(kernel: Kernel) -> str:
    """Hex sha256 of one kernel's canonical encoding (its name included, other names not).

    Kernels with equal hashes compile to the same code, whichever module holds them.

    Raises:
        IRError: the kernel cannot be encoded (verify it first).
    """
    h = hashlib.sha256(_KERNEL_DOMAIN + MAGIC + VERSION.to_bytes(2, "little"))
    h.update(encode_kernel_body(kernel))
    return h.hexdigest()


def encoded_hash(data: bytes) -> str:
    """The :func:`module_hash` of an encoding received from elsewhere (decoded and verified first).

    Raises:
        DecodeError: the bytes are not a valid encoding.
        VerifyError: the module breaks IR rules.
    """
    return module_hash(decode(data))
