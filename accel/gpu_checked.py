"""Checked IR kernels on the GPU backends: hidden launch arguments and the fault record.

A checked IR kernel (:mod:`vxpu.ir.lower.gpu`) takes, after its IR parameters, hidden ones
that the host fills at every launch and the guest never sees:

* ``(base: u64, length: u64)`` per pointer parameter — the buffer that pointer may reach (the
  session's :func:`vxpu.accel.backend.launch_bounds`, or the backend's own allocation);
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

import struct
from collections.abc import Sequence

from vxpu.accel.backend import BackendError, FaultRecord, KernelInfo, Status

__all__ = ["MAX_LENGTH", "RECORD_SIZE", "CheckedArgs", "decode_record", "launch_info"]

#: The longest buffer a checked kernel's bounds may describe (``vxpu.ir.lower.gpucheck``).
MAX_LENGTH = 1 << 62

#: Bytes of the fault record (the layout is ``vxpu.ir.lower.gpu.FAULT_RECORD``).
RECORD_SIZE = 64
# claimed, code, origin, kernel_id: u32; offset: u64; block x/y/z, thread x/y/z: u32
_RECORD = struct.Struct("<IIIIQ6I")


def _hidden_start(info: KernelInfo) -> int:
    return (info.args_size + 7) & ~7


def launch_info(info: KernelInfo) -> KernelInfo:
    """The layout the driver sees: ``info``'s parameters, then the hidden ones (natural
    alignment, so it matches the lowering's LLVM signature)."""
    start = _hidden_start(info)
    pairs = 2 * len(info.pointer_params)
    sizes = info.param_sizes + (8,) * pairs + (8, 4)
    offsets = info.param_offsets + tuple(start + 8 * k for k in range(pairs)) + (start + 8 * pairs,
                                                                                 start + 8 * pairs + 8)
    return KernelInfo(info.name, sizes, offsets, start + 8 * pairs + 12, info.static_shared_bytes,
                      info.checked, info.pointer_params)


class CheckedArgs:
    """Writes one checked kernel's guest arguments and hidden arguments into its pack.

    Args:
        info: the kernel's (guest-visible) :class:`KernelInfo`.
        kernel_id: its index in the backend's kernel names (reported in the fault record).
    """

    __slots__ = ("args_size", "count", "kernel_id", "offset", "struct")

    def __init__(self, info: KernelInfo, kernel_id: int) -> None:
        self.args_size = info.args_size
        self.count = len(info.pointer_params)
        self.offset = _hidden_start(info)
        self.struct = struct.Struct("<" + "Q" * (2 * self.count) + "QI")
        self.kernel_id = kernel_id

    def fill(self, view: memoryview, args: bytes | memoryview, bounds: Sequence[tuple[int, int]],
             record: int) -> None:
        """Copy ``args`` and the hidden arguments into ``view`` (the pack's storage).

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
        self.struct.pack_into(view, self.offset, *flat, record, self.kernel_id)


def decode_record(raw: bytes | bytearray, names: Sequence[str]) -> FaultRecord | None:
    """The :class:`FaultRecord` in ``raw`` (``RECORD_SIZE`` bytes), or None if unclaimed."""
    claimed, code, origin, kernel_id, offset, bx, by, bz, tx, ty, tz = _RECORD.unpack_from(raw)
    if not claimed:
        return None
    name = names[kernel_id] if kernel_id < len(names) else f"#{kernel_id}"
    return FaultRecord(name, code, origin, offset, (bx, by, bz), (tx, ty, tz))
