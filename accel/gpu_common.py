"""Pieces shared by the GPU backends (:mod:`vxpu.accel.cuda` and :mod:`vxpu.accel.hip`).

Both vendor runtimes have the same shape: a context that can be lost and rebuilt, opaque
module/stream/event handles, host-memory pinning, and kernel launches that take either a
``void**`` array of pointers to each argument or one packed argument buffer. This module holds
the vendor-neutral parts:

* :class:`ArgPack` — per-kernel, preallocated parameter storage built once at kernel lookup.
  A launch copies the guest's packed bytes into it (one ``memoryview`` slice assignment) and
  passes a prebuilt integer address; no Python objects are made per launch.
* Generation-stamped handle classes (:class:`GpuModule`, :class:`GpuKernel`, :class:`GpuQueue`,
  :class:`GpuEvent`): a context reset bumps the backend's generation, so every handle issued
  before it is recognisably stale and fails with ``INVALID_HANDLE`` instead of reaching the
  driver with a dangling pointer.
* :class:`HostRegistration` — the token :meth:`Backend.register_host` returns. It keeps the
  registered view alive (so the mapping cannot be closed under the driver) and remembers
  whether the pinning actually succeeded, so it can be replayed after a context reset.
* :func:`buffer_address` — the address of any buffer (read-only ones too).
* :class:`ErrorMap` — a vendor's error names → :class:`Status` table.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vxpu.accel.backend import BackendError, KernelInfo, Status

log = logging.getLogger(__name__)


def buffer_address(view: memoryview) -> int:
    """Return the address of the first byte of ``view`` (read-only views included).

    Raises:
        BackendError: INVALID_ARGUMENT if ``view`` is not a C-contiguous byte buffer.
    """
    try:
        arr = np.frombuffer(view, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise BackendError(Status.INVALID_ARGUMENT, f"host memory must be a contiguous buffer: {exc}") from exc
    return int(arr.ctypes.data) if arr.size else 0


class ArgPack:
    """Preallocated storage for one kernel's parameters.

    ``storage`` holds the packed parameter bytes (the layout of :class:`KernelInfo`), and
    ``pointers`` is a ``void*[n]`` array whose entry *i* points at parameter *i* inside
    ``storage``. Both are built once; :meth:`load` copies new bytes in. ``params_address`` is
    what ``cuLaunchKernel``'s ``kernelParams`` takes; ``storage_address``/``args_size`` are
    what a ``*_LAUNCH_PARAM_BUFFER_POINTER`` ``extra`` array takes.

    A pack is not safe to use from two threads at once for the same kernel: the launch copies
    the bytes in and hands them to the runtime, which captures them before returning.
    """

    __slots__ = ("_pointers", "_storage", "args_size", "info", "params_address", "storage_address", "view")

    def __init__(self, info: KernelInfo) -> None:
        self.info = info
        self.args_size = info.args_size
        self._storage = (ctypes.c_uint8 * max(info.args_size, 8))()
        self.view = memoryview(self._storage).cast("B")[: info.args_size]
        self.storage_address = ctypes.addressof(self._storage)
        count = len(info.param_offsets)
        self._pointers = (ctypes.c_void_p * max(count, 1))()
        for i, offset in enumerate(info.param_offsets):
            self._pointers[i] = self.storage_address + offset
        self.params_address = ctypes.addressof(self._pointers) if count else 0

    def load(self, args: bytes | memoryview) -> None:
        """Copy ``args`` in (exactly ``args_size`` bytes).

        Raises:
            BackendError: INVALID_ARGUMENT when the length differs from the kernel's ``args_size``.
        """
        try:
            self.view[:] = args
        except (ValueError, TypeError) as exc:
            raise BackendError(
                Status.INVALID_ARGUMENT,
                f"kernel {self.info.name!r} takes {self.args_size} bytes of arguments, got {len(args)}",
            ) from exc


def natural_layout(name: str, sizes: Sequence[int], static_shared: int = 0) -> KernelInfo:
    """Lay parameters of the given sizes out with natural alignment (little-endian ABI).

    Raises:
        BackendError: INVALID_ARGUMENT for a size that is not 1, 2, 4, 8 or a multiple of 8.
    """
    offsets: list[int] = []
    pos = 0
    for size in sizes:
        if size <= 0 or (size > 8 and size % 8) or size in (3, 5, 6, 7):
            raise BackendError(Status.INVALID_ARGUMENT, f"parameter size {size} has no natural alignment")
        align = min(size, 8)
        pos = (pos + align - 1) & ~(align - 1)
        offsets.append(pos)
        pos += size
    widest = max((min(size, 8) for size in sizes), default=1)
    total = (pos + widest - 1) & ~(widest - 1)
    return KernelInfo(name, tuple(sizes), tuple(offsets), total, static_shared)


@dataclass(eq=False)
class GpuHandle:
    """Base of backend handles: ``generation`` ties the handle to one context incarnation.

    A destroyed handle gets generation ``-1``, so the hot-path validity test is one compare.
    """

    generation: int

    @property
    def alive(self) -> bool:
        return self.generation >= 0

    def invalidate(self) -> None:
        self.generation = -1


@dataclass(eq=False)
class GpuModule(GpuHandle):
    """A loaded module: the vendor handle plus the kernels already looked up in it."""

    handle: object = None
    kernels: dict[str, GpuKernel] = field(default_factory=dict)
    signatures: dict[str, KernelInfo] = field(default_factory=dict)


@dataclass(eq=False)
class GpuKernel(GpuHandle):
    """A kernel: the vendor function handle, its launch facts and its preallocated arguments."""

    handle: object = None
    module: GpuModule | None = None
    info: KernelInfo | None = None
    pack: ArgPack | None = None
    #: Checked IR kernels: writes the hidden bounds/fault-record arguments (accel.gpu_checked).
    checked: Any = None
    #: ``(args, bounds, record)`` of the fill ``pack`` holds now (None: unknown, fill again).
    filled: tuple[bytes, tuple[tuple[int, int], ...], int] | None = None


@dataclass(eq=False)
class GpuQueue(GpuHandle):
    """A stream the backend created (never the default one)."""

    handle: object = None


@dataclass(eq=False)
class GpuEvent(GpuHandle):
    """A timing-enabled event."""

    handle: object = None


@dataclass(eq=False)
class HostRegistration:
    """Token for one :meth:`Backend.register_host` call.

    ``pinned`` is False when the runtime refused to pin (the copies still work, from pageable
    memory, more slowly); ``view`` keeps the buffer exported so it cannot be unmapped while
    the device may still use it.
    """

    view: memoryview
    address: int
    size: int
    read_only: bool
    pinned: bool = False
    released: bool = False

    @property
    def end(self) -> int:
        return self.address + self.size


def check_handle(handle: object, cls: type[GpuHandle], generation: int, what: str) -> None:
    """Check that ``handle`` is a live ``cls`` from the current context generation.

    Raises:
        BackendError: INVALID_HANDLE for a foreign, destroyed or pre-reset handle.
    """
    if not isinstance(handle, cls) or handle.generation != generation or generation < 0:
        raise BackendError(Status.INVALID_HANDLE, f"unknown, destroyed or stale {what} handle")


@dataclass(frozen=True)
class ErrorMap:
    """A vendor runtime's error names (``CUresult``, ``hipError_t``) as stable :class:`Status` codes.

    Attributes:
        kernel_fault: names that mean the kernel faulted (the context must be reset).
        device_lost: names that mean the device is unusable.
        by_name: every other known name; unknown names are INTERNAL.
    """

    kernel_fault: frozenset[str]
    device_lost: frozenset[str]
    by_name: Mapping[str, Status]

    def status(self, name: str) -> Status:
        """The :class:`Status` for the vendor error ``name``."""
        if name in self.kernel_fault:
            return Status.KERNEL_FAULT
        if name in self.device_lost:
            return Status.DEVICE_LOST
        return self.by_name.get(name, Status.INTERNAL)
