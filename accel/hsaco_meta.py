"""Kernel argument layouts from an AMDGPU code object's ``NT_AMDGPU_METADATA`` note.

HIP has no ``cuFuncGetParamInfo``: a native (opt-in) hsaco says how its kernels take arguments
only in its metadata note, a MessagePack map (``amdhsa.kernels`` → ``.name``, ``.args`` →
``.offset``/``.size``/``.value_kind``). The note arrives from a guest, so the decoder here is a
small, bounded MessagePack reader (depth, item counts and lengths all capped; any violation is
a BAD_MODULE), not a general one. Hidden arguments (``hidden_*``) are appended by the HIP
runtime itself and are not part of the packed argument buffer.
"""

from __future__ import annotations

import struct
from typing import Any

from vxpu.accel.backend import BackendError, KernelInfo, Status

_MAX_DEPTH = 16
_MAX_ITEMS = 1 << 16
_MAX_ARGS = 4096


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.items = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated MessagePack data")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError("MessagePack nesting too deep")
        self.items += 1
        if self.items > _MAX_ITEMS:
            raise ValueError("too many MessagePack items")
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self.take(b & 0x1F).decode("utf-8", "replace")
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        fixed = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
                 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
        if b in fixed:
            return self.unpack(fixed[b])
        lengths = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I", 0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}
        if b in lengths:
            raw = self.take(self.unpack(lengths[b]))
            return raw.decode("utf-8", "replace") if b >= 0xD9 else raw
        if b in (0xDC, 0xDD):
            return self.array(self.unpack(">H" if b == 0xDC else ">I"), depth)
        if b in (0xDE, 0xDF):
            return self.map(self.unpack(">H" if b == 0xDE else ">I"), depth)
        raise ValueError(f"unsupported MessagePack byte {b:#x}")

    def array(self, n: int, depth: int) -> list[Any]:
        if n > _MAX_ITEMS:
            raise ValueError("MessagePack array too long")
        return [self.value(depth + 1) for _ in range(n)]

    def map(self, n: int, depth: int) -> dict[Any, Any]:
        if n > _MAX_ITEMS:
            raise ValueError("MessagePack map too long")
        out: dict[Any, Any] = {}
        for _ in range(n):
            key = self.value(depth + 1)
            out[key if isinstance(key, (str, int)) else repr(key)] = self.value(depth + 1)
        return out


def decode_msgpack(data: bytes) -> Any:
    """Decode one bounded MessagePack value. Raises ValueError on malformed or oversized input."""
    return _Reader(data).value()


def kernel_layouts(metadata: bytes) -> dict[str, KernelInfo]:
    """``{kernel name: KernelInfo}`` from an ``NT_AMDGPU_METADATA`` MessagePack blob.

    Raises:
        BackendError: BAD_MODULE for malformed metadata.
    """
    try:
        root = decode_msgpack(metadata)
        kernels = root.get("amdhsa.kernels", []) if isinstance(root, dict) else None
        if not isinstance(kernels, list):
            raise ValueError("no amdhsa.kernels list")  # noqa: TRY004 - all malformations are ValueError
        out: dict[str, KernelInfo] = {}
        for k in kernels:
            name = k.get(".name") if isinstance(k, dict) else None
            if not isinstance(name, str):
                raise ValueError("kernel without a name")  # noqa: TRY004
            args = [a for a in k.get(".args", []) or []
                    if isinstance(a, dict) and not str(a.get(".value_kind", "")).startswith("hidden_")]
            if len(args) > _MAX_ARGS:
                raise ValueError("too many kernel arguments")
            offsets = tuple(int(a[".offset"]) for a in args)
            sizes = tuple(int(a[".size"]) for a in args)
            if any(o < 0 or s <= 0 or o + s > 1 << 16 for o, s in zip(offsets, sizes)):
                raise ValueError(f"kernel {name!r} has an argument outside 0..64 KiB")
            total = max((o + s for o, s in zip(offsets, sizes)), default=0)
            shared = int(k.get(".group_segment_fixed_size", 0) or 0)
            out[name] = KernelInfo(name, sizes, offsets, total, shared)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackendError(Status.BAD_MODULE, f"unreadable AMDGPU kernel metadata: {exc}") from exc
