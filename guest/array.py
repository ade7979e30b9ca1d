"""Arrays: device memory (:class:`DeviceArray`) and pinned guest memory (:class:`HostArray`).

A :class:`DeviceArray` is one MEM_ALLOC allocation with a shape and a dtype, like a
``cupy.ndarray`` without the arithmetic: it goes into kernels as a pointer and comes back with
:meth:`DeviceArray.to_host`. Its allocation is freed by :meth:`DeviceArray.free`, by leaving a
``with`` block, or, when the array is garbage, by the device at its next command (a
``weakref.finalize`` only queues the address; it never touches the ring, so collection can
happen anywhere). A device reset makes every older array *stale*: using one raises
:class:`StaleHandle` instead of touching memory that may now belong to someone else.

A :class:`HostArray` is DMA memory the device reads and writes directly (CUDA's pinned memory):
copies between it and a DeviceArray need no bounce buffer.

numpy is optional. Without it, dtypes are names (``"float32"``) and :meth:`DeviceArray.to_host`
returns a ``bytearray``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

from vxpu.guest.errors import GuestError
from vxpu.guest.transport import DmaMemory

from vxpu.abi import xpu
from vxpu.errors import StateError

try:
    import numpy as np
except ImportError:      # a minimal guest: bytes in, bytes out
    np = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from vxpu.guest.sdk import Device

_MEM_FREE = int(xpu.Opcode.MEM_FREE)
#: dtype names understood without numpy, and their sizes.
ITEMSIZE = {"int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2, "int32": 4, "uint32": 4,
            "float32": 4, "int64": 8, "uint64": 8, "float64": 8}

Shape = int | Sequence[int]


class StaleHandle(StateError):
    """The array, module or event belongs to a device state that a reset (or a kernel fault)
    discarded, or to a closed device. Create it again."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} belongs to an earlier device state", current="reset or closed",
                         required="the state it was created in")


def normalize(shape: Shape, dtype: Any) -> tuple[tuple[int, ...], Any, int]:
    """``(shape tuple, dtype, itemsize)`` for a shape and a dtype (numpy dtype or name).

    Raises:
        GuestError: a negative dimension or an unknown dtype.
    """
    dims = (int(shape),) if isinstance(shape, int) else tuple(map(int, shape))
    if dims and min(dims) < 0:
        raise GuestError(f"negative dimension in shape {dims}")
    if np is not None:
        dt = np.dtype(dtype)
        return dims, dt, dt.itemsize
    name = str(dtype)
    if name not in ITEMSIZE:
        raise GuestError(f"dtype {dtype!r} unknown (without numpy: one of {', '.join(ITEMSIZE)})")
    return dims, name, ITEMSIZE[name]


def as_bytes(data: Any) -> tuple[memoryview, tuple[int, ...], Any]:
    """A flat byte view of ``data`` (numpy array or buffer), its shape and dtype.

    Raises:
        GuestError: ``data`` is neither a numpy array nor a buffer.
    """
    if np is not None and not isinstance(data, (bytes, bytearray, memoryview)):
        arr = np.ascontiguousarray(data)
        return memoryview(arr.reshape(-1).view(np.uint8)), arr.shape, arr.dtype  # type: ignore[arg-type]
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise GuestError(f"cannot send a {type(data).__name__} to the device: {exc}") from None
    return view, (len(view),), (np.dtype(np.uint8) if np is not None else "uint8")


class DeviceAllocs:
    """Device objects whose Python side became garbage, waiting for the device to release them.

    A finalizer appends ``(epoch, opcode, handle)`` here (MEM_FREE for an array, MODULE_UNLOAD
    for a module, EVENT_DESTROY for an event); :class:`vxpu.guest.sdk.Device` posts those
    commands before its next one. Entries from an older epoch are dropped (a reset released
    them already).
    """

    def __init__(self) -> None:
        self.garbage: list[tuple[int, int, int]] = []

    def defer(self, epoch: int, opcode: int, handle: int) -> None:
        """Queue one release (called from a finalizer: no I/O here)."""
        self.garbage.append((epoch, opcode, handle))


class DeviceArray:
    """A device allocation with a shape and a dtype (create with ``Device.empty`` or
    ``Device.to_device``).

    Attributes:
        device: the owning :class:`~vxpu.guest.sdk.Device`.
        shape, dtype, size, nbytes, itemsize: as in numpy.
    """

    def __init__(self, device: Device, address: int, shape: tuple[int, ...], dtype: Any, itemsize: int,
                 allocated: int) -> None:
        self.device = device
        self._ptr = address
        self.shape, self.dtype, self.itemsize = shape, dtype, itemsize
        self.size = math.prod(shape)
        self.nbytes = self.size * itemsize
        self.allocated = allocated
        self.epoch = device.epoch
        #: ``epoch`` while the array is not freed, -1 after :meth:`free`: the one comparison
        #: (``_valid_epoch == device.epoch``) that says the address may be used.
        self._valid_epoch = self.epoch
        self._finalizer = weakref.finalize(self, device.allocs.defer, self.epoch, _MEM_FREE, address)
        # Only free() or garbage collection ends the allocation; at interpreter exit nothing
        # would post the release anyway, and a finalizer run then would make a live array look
        # freed to ``_finalizer.alive`` but not to ``_valid_epoch``.
        self._finalizer.atexit = False

    @property
    def ptr(self) -> int:
        """The device address (what a kernel's pointer parameter receives).

        Raises:
            StaleHandle: the array was freed, or the device was reset since it was made.
        """
        if self._valid_epoch != self.device.epoch:
            raise StaleHandle(f"array at {self._ptr:#x}")
        return self._ptr

    def to_host(self, out: Any = None, *, blocking: bool = True) -> Any:
        """The contents as a new numpy array of this shape and dtype (a ``bytearray`` without
        numpy), or copied into ``out`` (a writable buffer or array of ``nbytes``, e.g. a
        :class:`HostArray`, which is zero-copy), which is then returned. ``blocking=False``
        with a HostArray ``out`` only posts the copy (complete at the next synchronize).

        Raises:
            DeviceError: the copy failed. StaleHandle: a freed or stale array.
        """
        if out is None:
            out = np.empty(self.shape, self.dtype) if np is not None else bytearray(self.nbytes)
        self.device.copy_to_host(out, self, blocking=blocking)
        return out

    def copy_from(self, src: Any) -> None:
        """Overwrite the contents with ``src`` (``nbytes`` bytes: an array, a buffer or a
        :class:`HostArray`).

        Raises:
            DeviceError: the copy failed. GuestError: a size mismatch.
        """
        self.device.copy_to_device(self, src)

    def fill_bytes(self, value: int) -> None:
        """Set every byte to ``value`` (MEM_SET; asynchronous)."""
        self.device.memset(self, value)

    def free(self) -> None:
        """Free the allocation now (asynchronously on the device; idempotent)."""
        self._valid_epoch = -1
        if self._finalizer.detach() is not None and self.epoch == self.device.epoch:
            self.device.free_address(self._ptr)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        state = "" if self._finalizer.alive else ", freed"
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr={self._ptr:#x}{state})"


class HostArray:
    """Pinned DMA memory with a shape and a dtype (create with ``Device.pinned``).

    ``array`` is a numpy view of it (``None`` without numpy; use ``view``). The memory goes back
    to the transport at :meth:`free`, on leaving a ``with`` block, or when the device closes;
    drop every numpy view of it first.
    """

    def __init__(self, mem: DmaMemory, shape: tuple[int, ...], dtype: Any, itemsize: int,
                 release: Callable[[DmaMemory], None]) -> None:
        self.mem = mem
        self.shape, self.dtype = shape, dtype
        self.nbytes = math.prod(shape) * itemsize
        self.view = mem.view[:self.nbytes]
        self.array: Any = np.frombuffer(self.view, dtype).reshape(shape) if np is not None else None
        #: The device address of byte 0 when the memory is one contiguous run (a copy is then
        #: one inline segment); None when it is not, and after :meth:`free`.
        self.address: int | None = mem.runs[0][1] if mem.contiguous else None
        self._finalizer = weakref.finalize(self, release, mem)

    @property
    def freed(self) -> bool:
        """True once the memory went back to the transport (copies then refuse it)."""
        return not self._finalizer.alive

    def free(self) -> None:
        """Give the memory back (idempotent)."""
        self.address = None
        self.array = None
        self.view.release()
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()
