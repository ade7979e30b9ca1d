"""Checked IR kernels on the GPU backends: hidden launch arguments and the fault record.

A checked IR kernel (:mod:`vxpu.ir.lower.gpu`) takes, after its IR parameters, hidden ones
that the host fills at every launch and the guest never sees:

* ``(base: u64, length: u64)`` per pointer parameter — the buffer that pointer may reach (the
  session's :func:`vxpu.accel.backend.launch_bounds`, or the backend's own allocation);
* ``(lo: i32, hi: i32)`` per pointer parameter and element size 1, 2, 4, 8
  (:data:`WINDOW_SIZES`): the *element window* of that pointer, :func:`element_window` — the
  i32 indices ``i`` for which an access of that size at ``P + size*i`` passes the general
  check, as ``lo <= i <= hi`` (``(1, 0)``: none). Computed here from the pointer argument and
  its bounds, so an access at ``offset P, i`` with a sign-extended index of at most 32 bits is
  checked with two 32-bit compares (``vxpu.ir.lower.gpucheck``; docs/ir-lowering.md §7);
* with any pointer parameter, ``(lo: i32, hi: i32)`` per element size: the *common* window,
  the intersection of every pointer parameter's window for that size (one compare pair for a
  run of accesses at one index into every pointer buffer, as vector_add's); no windows at all
  where they would take the parameters past :data:`WINDOW_PARAM_BYTES` (:func:`windows_fit`);
* ``fault: u64`` — the device address of the context's fault record (:data:`RECORD_SIZE`
  bytes, zero while no thread has faulted): pinned host memory mapped into the device where the
  vendor offers it (CUDA), else device memory;
* ``kernel_id: u32`` — which kernel wrote the record (an index into the backend's names).

A thread about to make a bad access claims the record with a ``cmpxchg`` (the first violation
wins), fills it and returns; the launch completes normally, so the driver never sees a fault
and nothing becomes sticky. The claim is atomic among the device's own threads also when the
record is mapped host memory (the host reads it only after the wait). At
:meth:`GpuBackend.synchronize`, only after checked launches, the backend reads the record (a
plain read of mapped host memory, else a 64-byte copy), clears it and raises
:class:`~vxpu.accel.backend.KernelFaultError` with the decoded :class:`FaultRecord` — without
resetting the context.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence

from vxpu.accel.backend import BackendError, FaultRecord, KernelInfo, Status

__all__ = ["EMPTY_WINDOW", "MAX_LENGTH", "RECORD_SIZE", "WINDOW_PARAM_BYTES", "WINDOW_SIZES", "CheckedArgs",
           "decode_record", "element_window", "launch_info", "windows_fit"]

#: The longest buffer a checked kernel's bounds may describe (``vxpu.ir.lower.gpucheck``).
MAX_LENGTH = 1 << 62

#: The element sizes that get a window per pointer parameter, in hidden-argument order.
WINDOW_SIZES = (1, 2, 4, 8)
#: The window that admits no index.
EMPTY_WINDOW = (1, 0)
_M64 = (1 << 64) - 1
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1


def element_window(pointer: int, base: int, length: int, size: int) -> tuple[int, int]:
    """``(lo, hi)``: the i32 indices ``i`` for which a ``size``-byte access at
    ``pointer + size*i`` (mod 2^64) passes the general check against ``(base, length)``
    (``off = addr - base`` mod 2^64 a multiple of ``size`` and ``off + size <= length``) are
    exactly ``lo <= i <= hi``; :data:`EMPTY_WINDOW` when there is none.

    With ``d = (pointer - base) mod 2^64``: ``off = d + size*i - k*2^64`` for the ``k`` that puts
    it in ``[0, 2^64)``; since ``size*i`` lies in ``[-2^34, 2^34)``, ``k`` is -1, 0 or 1, and
    ``k = -1`` (``d + size*i < 0``) gives ``off >= 2^64 - 2^34 > length``. Alignment: ``off``
    is a multiple of ``size`` iff ``d`` is (``size`` divides 2^64), so a misaligned ``d``
    admits nothing. Otherwise each ``k`` in (0, 1) admits the integers ``i`` with
    ``k*2^64 - d <= size*i <= k*2^64 + length - size - d``, an interval; both cannot be
    non-empty, since they lie ``2^64 - length > 2^34`` apart in ``d + size*i`` while ``length
    <= MAX_LENGTH`` (the caller refuses longer). Clamped to the i32 range. The window is never
    rounded: any index in it is in bounds, any outside it is not.
    """
    if length > MAX_LENGTH:
        raise BackendError(Status.INVALID_ARGUMENT, "a buffer is longer than 2^62 bytes")
    d = (pointer - base) & _M64
    if length < size or d % size:
        return EMPTY_WINDOW
    for k in (0, 1):
        lo = max(((k << 64) - d) // size, _I32_MIN)               # exact: size divides both
        hi = min(((k << 64) + length - size - d) // size, _I32_MAX)   # floor
        if lo <= hi:
            return lo, hi
    return EMPTY_WINDOW


#: The most parameter bytes a kernel with element windows takes (``vxpu.ir.lower.gpucheck``).
WINDOW_PARAM_BYTES = 4096


def windows_fit(args_size: int, pointers: int) -> bool:
    """Does a checked kernel (``args_size`` bytes of guest arguments, ``pointers`` pointer
    parameters) take element windows: with any pointer, while all its parameters then fit
    :data:`WINDOW_PARAM_BYTES` (the lowering's ``gpucheck.windows_fit``, the same rule)?"""
    start = (args_size + 7) & ~7
    end = start + 16 * pointers + 8 * len(WINDOW_SIZES) * (pointers + 1) + 12
    return pointers > 0 and end <= WINDOW_PARAM_BYTES


_WINDOWS = struct.Struct("<" + "ii" * len(WINDOW_SIZES))
_WINDOWS_BYTES = _WINDOWS.size
_TAIL = struct.Struct("<QI")          # the record's address, the kernel id


@functools.lru_cache(maxsize=1024)
def _common(each: tuple[bytes, ...]) -> bytes:
    """The windows of all pointers at once, per size: the intersection of theirs (``max`` of
    the ``lo``, ``min`` of the ``hi``; an empty one, ``lo > hi``, keeps it empty)."""
    rows = [_WINDOWS.unpack(w) for w in each]
    return _WINDOWS.pack(*(max(r[k] for r in rows) if k % 2 == 0 else min(r[k] for r in rows)
                           for k in range(2 * len(WINDOW_SIZES))))


@functools.lru_cache(maxsize=4096)
def _windows(pointer: int, base: int, length: int) -> bytes:
    """``(lo, hi)`` of every size of :data:`WINDOW_SIZES`, packed (a pure function of its
    arguments, cached: a plan miss with new scalar arguments but the same buffers costs a
    lookup per pointer, not four window computations)."""
    return _WINDOWS.pack(*(v for size in WINDOW_SIZES for v in element_window(pointer, base, length, size)))


#: Bytes of the fault record (the layout is ``vxpu.ir.lower.gpu.FAULT_RECORD``).
RECORD_SIZE = 64
# claimed, code, origin, kernel_id: u32; offset: u64; block x/y/z, thread x/y/z: u32
_RECORD = struct.Struct("<IIIIQ6I")


_U64 = struct.Struct("<Q")


def _hidden_start(info: KernelInfo) -> int:
    return (info.args_size + 7) & ~7


def launch_info(info: KernelInfo) -> KernelInfo:
    """The layout the driver sees: ``info``'s parameters, then the hidden ones (natural
    alignment, so it matches the lowering's LLVM signature)."""
    start = _hidden_start(info)
    pairs = 2 * len(info.pointer_params)
    # one window per pointer and size, then one per size for all pointers (while they fit)
    n = len(info.pointer_params)
    windows = 2 * len(WINDOW_SIZES) * (n + 1) if windows_fit(info.args_size, n) else 0
    record = start + 8 * pairs + 4 * windows          # a multiple of 8: windows come in eights
    sizes = info.param_sizes + (8,) * pairs + (4,) * windows + (8, 4)
    offsets = info.param_offsets + tuple(start + 8 * k for k in range(pairs)) \
        + tuple(start + 8 * pairs + 4 * k for k in range(windows)) + (record, record + 8)
    return KernelInfo(info.name, sizes, offsets, record + 12, info.static_shared_bytes,
                      info.checked, info.pointer_params)


class CheckedArgs:
    """Writes one checked kernel's guest arguments and hidden arguments into its pack.

    Args:
        info: the kernel's (guest-visible) :class:`KernelInfo`.
        kernel_id: its index in the backend's kernel names (reported in the fault record).
    """

    __slots__ = ("args_size", "count", "kernel_id", "offset", "pointers", "struct", "windows", "with_windows")

    def __init__(self, info: KernelInfo, kernel_id: int) -> None:
        self.args_size = info.args_size
        self.count = len(info.pointer_params)
        self.offset = _hidden_start(info)
        self.pointers = tuple(info.param_offsets[i] for i in info.pointer_params)
        self.struct = struct.Struct("<" + "Q" * (2 * self.count))
        self.windows = self.offset + self.struct.size
        self.with_windows = windows_fit(info.args_size, self.count)
        self.kernel_id = kernel_id

    def fill(self, view: memoryview, args: bytes | memoryview, bounds: Sequence[tuple[int, int]],
             record: int) -> None:
        """Copy ``args`` and the hidden arguments into ``view`` (the pack's storage): each
        pointer parameter's bounds, each pointer's :func:`element_window` per size of
        :data:`WINDOW_SIZES` (from the pointer in ``args`` and its bounds, nothing else the
        guest sends), their intersection per size (the *common* windows), the record and the
        kernel id.

        Raises:
            BackendError: INVALID_ARGUMENT for a wrong argument size or bounds count.
        """
        if len(args) != self.args_size or len(bounds) != self.count:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"checked launch needs {self.args_size} argument bytes and {self.count} bounds, "
                               f"got {len(args)} and {len(bounds)}")
        if any(base % 8 for base, _ in bounds):      # the generated alignment test needs it
            raise BackendError(Status.INVALID_ARGUMENT, "a buffer base is not a multiple of 8")
        if any(length > MAX_LENGTH for _, length in bounds):   # gpucheck's element-index form needs it
            raise BackendError(Status.INVALID_ARGUMENT, "a buffer is longer than 2^62 bytes")
        view[:self.args_size] = args
        flat = [v for pair in bounds for v in pair]
        self.struct.pack_into(view, self.offset, *flat)
        at = self.windows
        each = []
        for arg, (base, length) in zip(self.pointers if self.with_windows else (), bounds):
            # The pointer the kernel gets: read from the copy just made, never from ``args`` again
            # (a buffer the guest could change between two reads would get another pointer's window).
            packed = _windows(_U64.unpack_from(view, arg)[0], base, length)
            view[at:at + _WINDOWS_BYTES] = packed
            each.append(packed)
            at += _WINDOWS_BYTES
        if each:
            view[at:at + _WINDOWS_BYTES] = _common(tuple(each))
            at += _WINDOWS_BYTES
        _TAIL.pack_into(view, at, record, self.kernel_id)


def decode_record(raw: bytes | bytearray, names: Sequence[str]) -> FaultRecord | None:
    """The :class:`FaultRecord` in ``raw`` (``RECORD_SIZE`` bytes), or None if unclaimed."""
    claimed, code, origin, kernel_id, offset, bx, by, bz, tx, ty, tz = _RECORD.unpack_from(raw)
    if not claimed:
        return None
    name = names[kernel_id] if kernel_id < len(names) else f"#{kernel_id}"
    return FaultRecord(name, code, origin, offset, (bx, by, bz), (tx, ty, tz))
