"""A :class:`~vxpu.accel.gpubase.GpuBackend`'s side of the native fast lane.

A mixin of :class:`~vxpu.accel.gpubase.GpuBackend` (which owns the state it uses: the context
generation, the fault record and its native readers, the checked-launch bookkeeping, the lock).
The accelerator device model's fast lane (:mod:`vxpu.vfio_server.xpu.fastlane`) issues launches
and copies from C; through these methods it learns what to call (driver entry points, raw
function and stream handles, a launch's fully packed parameters), where the fault record is
(withdrawn under the backend's lock before its memory goes), and it reports what it issued and
waited for, so the backend's accounting is exactly what :meth:`GpuBackend.launch` and
:meth:`GpuBackend.synchronize` would have left.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vxpu.accel.backend import BackendStats
from vxpu.accel.gpu_common import GpuKernel


class GpuNativeLane:
    """The native-issue methods of :class:`~vxpu.accel.gpubase.GpuBackend` (a mixin)."""

    stats: BackendStats
    _lock: threading.RLock
    _generation: int
    _record: tuple[int, int] | None
    _record_host: int
    _checked_pending: bool
    _record_stream: Any
    _record_streams_many: bool
    _record_readers: list[Callable[[int], None]]

    if TYPE_CHECKING:                   # GpuBackend's own, used here
        def _ensure(self) -> None: ...
        def _is_open(self) -> bool: ...
        def _stream(self, queue: object | None) -> Any: ...

    def native_driver(self) -> dict[str, int] | None:
        """Driver entry points for a native issuer (``launch``: cuLaunchKernel's signature,
        ``htod``/``dtoh``: the async copies, ``sync``: context synchronize, ``query``: a stream's
        state, 0 done / 600 still running); None: none here."""
        return None

    def native_ready(self) -> None:
        """Make this backend's context current in the calling thread before native calls.

        Raises:
            BackendError: UNAVAILABLE or DEVICE_LOST (closed, or lost after a fault)."""
        self._ensure()

    def native_pointer(self, handle: Any) -> int:
        """The raw driver value of a vendor handle (a function, a stream)."""
        return int(handle)

    def native_stream(self, queue: object | None) -> int | None:
        """The raw stream of ``queue`` (None for the default stream: a native issuer then
        leaves copies to Python, whose copies on it are synchronous).

        Raises:
            BackendError: INVALID_HANDLE.
        """
        return None if queue is None else self.native_pointer(self._stream(queue))

    def native_launch(self, kernel: object, args: bytes, bounds: Sequence[tuple[int, int]] | None,
                      queue: object | None) -> tuple[int, int, bytes, tuple[int, ...], bool] | None:
        """What a native issuer needs to launch ``kernel`` as :meth:`launch` would with these
        arguments: ``(function, stream, packed parameter bytes, parameter offsets, checked)``;
        the bytes are a fresh fill (arguments, and a checked kernel's hidden bounds and fault
        record), never the kernel's shared pack. None when this backend cannot say (no fault
        record in this context yet, a handle from before a reset)."""
        if kernel.__class__ is not GpuKernel or kernel.generation != self._generation:  # type: ignore[attr-defined]
            return None
        assert isinstance(kernel, GpuKernel) and kernel.pack is not None
        info = kernel.pack.info
        buf = bytearray(max(info.args_size, 1))
        if kernel.checked is None:
            if len(args) != info.args_size:
                return None
            buf[:len(args)] = args
        else:
            if bounds is None or self._record is None or self._record[0] != self._generation:
                return None
            kernel.checked.fill(memoryview(buf), args, bounds, self._record[1])
        stream = self.native_stream(queue)
        if stream is None:
            return None
        return (self.native_pointer(kernel.handle), stream, bytes(buf[:max(info.args_size, 0)]),
                tuple(info.param_offsets), kernel.checked is not None)

    def native_record(self) -> int:
        """Where a native FENCE finds this context's fault record after its wait: the host
        address when it is mapped host memory, 0 when there is none yet (no checked launch in
        this context: nothing to read), -1 when it is in device memory or the backend is closed
        (FENCE stays in Python)."""
        if not self._is_open():
            return -1
        record = self._record
        if record is None or record[0] != self._generation:
            return 0
        return self._record_host or -1

    def native_watch_record(self, reader: Callable[[int], None]) -> None:
        """Tell ``reader`` where the mapped fault record is (:meth:`native_record`), now and
        whenever a native reader must look again, always under this backend's lock: with -1
        right before the record's memory goes (close, context reset), from whatever thread
        does that, so a native wait in another thread never reads a freed record. Call it
        again to refresh (a record made since); :meth:`native_unwatch_record` ends it."""
        with self._lock:
            if reader not in self._record_readers:
                self._record_readers.append(reader)
            reader(self.native_record())

    def native_unwatch_record(self, reader: Callable[[int], None]) -> None:
        """Stop telling ``reader`` (before the reader's native state is freed)."""
        with self._lock:
            if reader in self._record_readers:
                self._record_readers.remove(reader)

    def _record_going(self) -> None:
        """The fault record's memory is about to go (lock held): withdraw it from native readers."""
        for reader in self._record_readers:
            reader(-1)

    def note_native_work(self, queue: object | None, launches: int, checked: int, bytes_htod: int,
                         bytes_dtoh: int) -> None:
        """A native issuer launched ``launches`` kernels (``checked`` of them checked IR) and
        copied these bytes on ``queue``: count them, and note the checked launches for the
        fault-record check of the next :meth:`synchronize`, as :meth:`launch` does."""
        stats = self.stats
        stats.launches, stats.bytes_htod, stats.bytes_dtoh = (stats.launches + launches, stats.bytes_htod + bytes_htod,
                                                              stats.bytes_dtoh + bytes_dtoh)
        if checked:
            self._note_checked_launch(self._stream(queue))

    def _note_checked_launch(self, stream: Any) -> None:
        """A checked kernel went to ``stream``: the next :meth:`synchronize` reads the fault
        record, and knows whether its wait covers every stream such kernels went to."""
        self._checked_pending = True
        if stream is not self._record_stream:
            if self._record_stream is None:
                self._record_stream = stream
            else:
                self._record_streams_many = True

    def note_native_sync(self) -> None:
        """A native issuer waited for the whole device and found the fault record unclaimed:
        the checked launches before are checked, as after :meth:`synchronize` (None)."""
        self._checked_pending, self._record_stream, self._record_streams_many = False, None, False
