"""The GPU backend base: what CUDA and HIP share, over a small table of vendor calls.

:class:`vxpu.accel.hostbase.HostBackend` is this for the CPU and NPU backends; :class:`GpuBackend`
is it for :mod:`vxpu.accel.cuda` and :mod:`vxpu.accel.hip`. Both vendor runtimes have the same
shape: a device that is made current per thread, opaque module/stream/event handles, host-memory
pinning, and a context that a kernel fault destroys. The base owns everything that follows from
that shape:

* **Handle tables.** Allocations, modules, queues, events and host registrations, each handle
  stamped with the context generation (:mod:`vxpu.accel.gpu_common`), so a handle from before a
  reset fails with ``INVALID_HANDLE`` instead of reaching the driver.
* **Queue and event lifecycle**, copies and memsets, ``synchronize``.
* **Checked IR kernels** (:mod:`vxpu.accel.gpu_checked`): each launch fills the hidden
  bounds and fault-record arguments; :meth:`GpuBackend.synchronize` reads the fault record
  back and raises a contained :class:`~vxpu.accel.backend.KernelFaultError` (no reset). Where
  the vendor maps pinned host memory into the device (``host_alloc_mapped``), the record lives
  there: the kernels' fault writer claims and fills it over the bus (the claim's ``cmpxchg`` is
  atomic among this device's threads, which is all first-violation-wins needs; the host reads
  only after the wait), and the check after a wait is a plain memory read. Otherwise it is
  device memory, read through a pinned *mirror* (``host_alloc``: an asynchronous copy queued
  on the launches' one stream right before the wait, so one synchronization covers both) or,
  failing that, with a synchronous copy after the wait. H200, checked launch + synchronize
  of an empty kernel: 23.7-27.5 us with the synchronous copy, 16.9-21.8 with the mirror,
  14.8-15.9 mapped, 10.9-13.3 not read at all (benchmarks/RESULTS.md, issue 8 second round,
  "Launches").
* **Faults and teardown.** :meth:`GpuBackend._raise` maps a vendor error through the subclass's
  :class:`~vxpu.accel.gpu_common.ErrorMap`; after a kernel fault it destroys every handle and
  has the subclass rebuild its context (:meth:`_hard_reset`), re-pinning host memory. When
  that fails the device is lost for this process (``DEVICE_LOST``, :attr:`lost` says why).
  :meth:`close` and :meth:`reset` share the same teardown.

A subclass supplies the vendor calls (``_ops``, a table filled at open: each entry is the
vendor's name for messages and one runtime call returning its error and results), its error
table (:class:`~vxpu.accel.gpu_common.ErrorMap`), how the device is made
current (``_bind``, ``_is_open``, ``_is_current``, ``_release``, ``_hard_reset``), module loading,
kernel lookup and the launch call itself (``_drv_launch``).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vxpu.accel import gpu_checked
from vxpu.accel.backend import (
    BackendError,
    BackendStats,
    DeviceProperties,
    KernelFaultError,
    KernelInfo,
    Status,
    launch_bounds,
)
from vxpu.accel.gpu_common import (
    ArgPack,
    ErrorMap,
    GpuEvent,
    GpuKernel,
    GpuModule,
    GpuQueue,
    HostRegistration,
    buffer_address,
    check_handle,
)
from vxpu.accel.gpu_ir import resolve_cache
from vxpu.accel.gpu_native import GpuNativeLane

__all__ = ["UNBOUND", "CurrentSlot", "GpuBackend"]

UNBOUND = object()  # never a context or a backend, not even a closed backend's ``None``

log = logging.getLogger(__name__)


class CurrentSlot(threading.local):
    """Per thread: what a backend of one vendor last made current here (a context, a backend).

    Each vendor module keeps one slot, so that the hot-path "is it current?" test is one
    identity compare and a thread switches device only when it has to.
    """

    token: object = UNBOUND


class GpuBackend(GpuNativeLane):
    """Handle tables, queue/event lifecycle, copies, fault recovery and teardown of a GPU backend.

    Args:
        device_index: the vendor's device ordinal.
        compile_cache: passed to :func:`vxpu.ir.compile.compile_module` (``None``: its default).
        opt_level: LLVM optimisation level for IR modules.
    """

    name = "gpu"
    vendor = "GPU"                 # in messages: "CUDA", "HIP"
    reset_what = "context"         # what a fault resets: "context", "device"
    already_registered = ""        # the vendor error for "this host range is registered already"
    errors: ErrorMap
    #: Exceptions a vendor binding raises for a bad host buffer in a copy.
    copy_errors: tuple[type[Exception], ...] = (BufferError, TypeError, OverflowError, AttributeError)
    #: Exceptions a vendor binding raises for bad launch arguments.
    launch_errors: tuple[type[Exception], ...] = (ValueError, TypeError, OverflowError)

    def __init__(self, device_index: int = 0, *, compile_cache: Any = None, opt_level: int | str = 3) -> None:
        self.index = int(device_index)
        self.stats = BackendStats()
        self._compile_cache = resolve_cache(compile_cache)
        self._opt_level = int(opt_level)
        self._generation = 0
        self._props: DeviceProperties | None = None
        self._allocs: dict[int, int] = {}
        self._modules: set[GpuModule] = set()
        self._queues: set[GpuQueue] = set()
        self._events: set[GpuEvent] = set()
        self._hosts: set[HostRegistration] = set()
        self._last_host: HostRegistration | None = None  # region of the last address-based copy
        # The vendor calls, set at open: key -> (the vendor's name for messages, the call). Each
        # call returns the runtime's result tuple, error first. Keys: malloc (returns the address
        # as an int), free, mem_info, memset, htod, dtoh (stream None: a synchronous copy), dtod,
        # module_unload, stream_create, stream_destroy, event_create, event_destroy,
        # event_record, event_elapsed, host_register (address, size, read_only),
        # host_unregister, sync_device, sync_stream; optional: host_alloc (pinned host memory,
        # returns its address as an int), host_alloc_mapped (pinned host memory mapped into the
        # device: returns the host and the device address), host_free (either kind).
        self._ops: dict[str, tuple[str, Callable[..., tuple[Any, ...]]]] = {}
        self._lock = threading.RLock()
        self._default_stream: Any = None  # what queue=None means to the runtime
        self._ro_register = False
        self.pci_bus_id = ""
        self.lost: str | None = None  # why the device is unusable in this process, after a fault
        self._record: tuple[int, int] | None = None   # (generation, device address) of the fault record
        self._record_host = 0                          # its host address when it is mapped host memory
        self._kernel_names: list[str] = []             # kernel_id -> name, for fault records
        self._checked_pending = False                  # checked launches since the last full sync
        self._record_stream: Any = None                # the one stream they went to (None: none yet)
        self._record_streams_many = False              # ... or they went to more than one
        self._mirror: tuple[int, int] | None = None   # (generation, pinned host address) of the mirror
        #: native readers of the mapped fault record (see :meth:`native_watch_record`)
        self._record_readers: list[Callable[[int], None]] = []

    # -- the vendor side (subclasses) ------------------------------------------------------
    def _is_open(self) -> bool:
        raise NotImplementedError

    def _is_current(self) -> bool:
        """This backend's device/context is current in the calling thread."""
        raise NotImplementedError

    def _bind(self) -> None:
        """Make this backend's device/context current in the calling thread."""
        raise NotImplementedError

    def _release(self) -> None:
        """Let go of the device/context at :meth:`close` (after every handle is destroyed)."""
        raise NotImplementedError

    def _hard_reset(self) -> None:
        """Rebuild the context after a fault (call :meth:`_after_reset` at the end).

        Raises:
            BackendError: DEVICE_LOST when the device cannot be used again.
        """
        raise NotImplementedError

    def _drv_launch(self, handle: Any, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                    shared_bytes: int, stream: Any, pack: Any) -> tuple[Any, ...]:
        """Launch ``handle`` with the arguments already in ``pack``; returns the result tuple."""
        raise NotImplementedError

    def _lost_reason(self, name: str, what: str, exc: BackendError) -> str:
        """Why the device is unusable after the fault ``name`` during ``what`` (for :attr:`lost`)."""
        raise NotImplementedError

    # -- life cycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Free everything this backend created and let go of the device (idempotent)."""
        with self._lock:
            if not self._is_open():
                return
            self._bind()
            self._record_going()
            self._destroy_all()
            self._free_record()
            for reg in list(self._hosts):
                self._unpin(reg)
                reg.released = True
            self._hosts.clear()
            self._last_host = None
            self._release()
            self._generation += 1

    def properties(self) -> DeviceProperties:
        """Static device facts. Raises UNAVAILABLE before :meth:`open`."""
        if self._props is None:
            raise BackendError(Status.UNAVAILABLE, f"{self.vendor} backend is not open")
        return self._props

    def memory_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes of device memory."""
        self._ensure()
        err, free, total = self._call("mem_info")
        self._check(err, self._call_name("mem_info"))
        return int(free), int(total)

    def reset(self) -> None:
        """Drop every allocation, module, queue and event and start a fresh context.
        Registered host memory stays registered (it is registered again in the new context).

        Raises:
            BackendError: DEVICE_LOST if the context cannot be rebuilt.
        """
        with self._lock:
            self._ensure()
            self._record_going()
            self._destroy_all()
            self._hard_reset()

    # -- memory ---------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """Allocate ``size`` bytes of device memory. Raises OUT_OF_MEMORY or INVALID_ARGUMENT."""
        self._ensure()
        if not 0 < size < 1 << 48:
            raise BackendError(Status.INVALID_ARGUMENT, f"allocation size {size} out of range")
        err, address = self._call("malloc", size)
        self._check(err, f"{self._call_name('malloc')}({size})")
        self._allocs[address] = size
        return int(address)

    def free(self, address: int) -> None:
        """Free an allocation. Raises INVALID_HANDLE for an address :meth:`alloc` did not return."""
        self._ensure()
        if self._allocs.pop(address, None) is None:
            raise BackendError(Status.INVALID_HANDLE, f"no device allocation at {address:#x}")
        (err,) = self._call("free", address)
        self._check(err, self._call_name("free"))

    def memset(self, address: int, value: int, size: int, queue: object | None = None) -> None:
        """Fill ``size`` bytes at ``address`` with the byte ``value`` (ordered on ``queue``)."""
        self._ensure()
        if not 0 <= value <= 0xFF:
            raise BackendError(Status.INVALID_ARGUMENT, f"memset value {value} is not a byte")
        stream = self._stream(queue)
        try:
            (err,) = self._call("memset", address, value, size, stream)
        except (TypeError, OverflowError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad memset {address!r}+{size!r}: {exc}") from exc
        self._check(err, self._call_name("memset"))

    def copy_htod(self, dst: int, src: memoryview, queue: object | None = None) -> None:
        """Copy ``src`` to device address ``dst``; synchronous when ``queue`` is ``None``."""
        self._ensure()
        try:
            n = src.nbytes
            stream = None if queue is None else self._stream(queue)
            (err,) = self._call("htod", dst, src, n, stream)
        except self.copy_errors as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad host buffer for copy_htod: {exc}") from exc
        self._check(err, self._call_name("htod"))
        self.stats.bytes_htod += n

    def copy_dtoh(self, dst: memoryview, src: int, queue: object | None = None) -> None:
        """Copy device memory at ``src`` into ``dst``; synchronous when ``queue`` is ``None``."""
        self._ensure()
        try:
            n = dst.nbytes
            if dst.readonly:
                raise BackendError(Status.INVALID_ARGUMENT, "copy_dtoh destination is read-only")
            stream = None if queue is None else self._stream(queue)
            (err,) = self._call("dtoh", dst, src, n, stream)
        except self.copy_errors as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad host buffer for copy_dtoh: {exc}") from exc
        self._check(err, self._call_name("dtoh"))
        self.stats.bytes_dtoh += n

    def copy_dtod(self, dst: int, src: int, size: int, queue: object | None = None) -> None:
        """Copy ``size`` bytes between device addresses, ordered on ``queue``."""
        self._ensure()
        stream = self._stream(queue)
        try:
            (err,) = self._call("dtod", dst, src, size, stream)
        except (TypeError, OverflowError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad copy_dtod of {size!r} bytes: {exc}") from exc
        self._check(err, self._call_name("dtod"))
        self.stats.bytes_dtod += size

    def register_host(self, view: memoryview, read_only: bool = False) -> object:
        """Pin a host region (a DMA-mapped guest RAM mapping) with the vendor's host-register call.

        A refusal by the runtime (out of pinnable memory, a read-only map the device cannot pin)
        is not an error: the returned token records ``pinned=False`` and copies run from
        pageable memory. Raises INVALID_ARGUMENT for a non-contiguous or empty view.
        """
        self._ensure()
        view = memoryview(view).cast("B") if view.format != "B" or view.ndim != 1 else view
        if view.nbytes == 0:
            raise BackendError(Status.INVALID_ARGUMENT, "cannot register an empty host region")
        reg = HostRegistration(view, buffer_address(view), view.nbytes, bool(read_only or view.readonly))
        with self._lock:
            self._pin(reg)
            self._hosts.add(reg)
        return reg

    def unregister_host(self, token: object) -> None:
        """Undo :meth:`register_host`; call it before the memory is unmapped. Copies queued from
        or into it finish first (a device-wide wait), so no DMA outlives the mapping.
        Raises INVALID_HANDLE for an unknown or already released token."""
        if token is None:
            return
        with self._lock:
            if not isinstance(token, HostRegistration) or token not in self._hosts:
                raise BackendError(Status.INVALID_HANDLE, "unknown or already released host registration")
            self._hosts.discard(token)
            self._last_host = None
            if self._is_open():
                self._bind()
                if token.pinned:
                    # Copies queued from or into it (asynchronous, possibly issued natively)
                    # finish first: after this returns the memory may be unmapped.
                    (err,) = self._call("sync_device")
                    if err:
                        log.warning("%s before %s: %s", self._call_name("sync_device"),
                                    self._call_name("host_unregister"), getattr(err, "name", err))
                self._unpin(token)
            token.released = True

    # -- code -----------------------------------------------------------------------------
    def unload_module(self, module: object) -> None:
        """Unload a module; its kernels become invalid. Raises INVALID_HANDLE."""
        self._ensure()
        check_handle(module, GpuModule, self._generation, "module")
        assert isinstance(module, GpuModule)
        with self._lock:
            self._modules.discard(module)
            module.invalidate()
            for kernel in module.kernels.values():
                kernel.invalidate()
            module.kernels.clear()
        (err,) = self._call("module_unload", module.handle)
        self._check(err, self._call_name("module_unload"))

    def _count_compile(self, hit: bool) -> None:
        if hit:
            self.stats.compile_cache_hits += 1
        else:
            self.stats.compile_cache_misses += 1

    def _add_module(self, handle: Any, signatures: dict[str, KernelInfo]) -> GpuModule:
        module = GpuModule(self._generation, handle=handle, signatures=signatures)
        with self._lock:
            self._modules.add(module)
        return module

    def _lookup(self, module: object, name: str) -> tuple[GpuModule, GpuKernel | None]:
        """Check ``module`` and return it with its cached kernel ``name`` (None: not looked up yet)."""
        self._ensure()
        check_handle(module, GpuModule, self._generation, "module")
        assert isinstance(module, GpuModule)
        cached = module.kernels.get(name)
        return module, cached if cached is not None and cached.info is not None else None

    def _add_kernel(self, module: GpuModule, name: str, func: Any, info: KernelInfo,
                    pack: ArgPack) -> tuple[GpuKernel, KernelInfo]:
        checked = None
        if info.checked:                 # the driver's view has the hidden arguments too
            pack = type(pack)(gpu_checked.launch_info(info))
            checked = gpu_checked.CheckedArgs(info, len(self._kernel_names))
            self._kernel_names.append(name)
        kernel = GpuKernel(self._generation, handle=func, module=module, info=info, pack=pack, checked=checked)
        module.kernels[name] = kernel
        return kernel, info

    def _allocation_at(self, address: int) -> tuple[int, int] | None:
        """This backend's allocation containing ``address`` (a scan: only for launches that
        come without a session's bounds)."""
        for start, size in self._allocs.items():
            if 0 <= address - start < size:
                return start, size
        return None

    def _fault_record(self) -> int:
        """The device address of this context's fault record (made, zeroed, on first use):
        mapped pinned host memory where the vendor has it, else device memory."""
        if self._record is None or self._record[0] != self._generation:
            self._record_host = 0           # an older context's allocations went with it
            address = self._mapped_record()
            if not address:
                err, address = self._call("malloc", gpu_checked.RECORD_SIZE)
                self._check(err, f"{self._call_name('malloc')} (fault record)")
            self._record = (self._generation, int(address))
            self._record_stream, self._record_streams_many = None, False   # streams of an older context
            self._clear_fault_record()
        return self._record[1]

    def _mapped_record(self) -> int:
        """A record in mapped pinned host memory: its device address (0: not available)."""
        if "host_alloc_mapped" not in self._ops:
            return 0
        err, host, device = self._call("host_alloc_mapped", gpu_checked.RECORD_SIZE)
        if err or not host or not device:
            log.info("%s for the fault record failed (%s); it goes to device memory",
                     self._call_name("host_alloc_mapped"), getattr(err, "name", err))
            self._ops.pop("host_alloc_mapped", None)
            return 0
        self._record_host = int(host)
        return int(device)

    def _free_record(self) -> None:
        """Free this context's fault record and its mirror (at close; errors are ignored)."""
        if self._record is not None and self._record[0] == self._generation:
            if self._record_host:
                self._call("host_free", self._record_host)
            else:
                self._call("free", self._record[1])
        if self._mirror is not None and self._mirror[0] == self._generation and "host_free" in self._ops:
            self._call("host_free", self._mirror[1])
        self._record = self._mirror = None
        self._record_host = 0

    def _clear_fault_record(self) -> None:
        """Zero the record: a plain store when it is mapped host memory, else a synchronous copy
        (either way before any later launch can run)."""
        assert self._record is not None
        if self._record_host:
            ctypes.memset(self._record_host, 0, gpu_checked.RECORD_SIZE)
            return
        zeros = bytes(gpu_checked.RECORD_SIZE)
        (err,) = self._call("htod", self._record[1], memoryview(zeros), len(zeros), None)
        self._check(err, f"{self._call_name('htod')} (fault record)")

    def _record_mirror(self) -> int:
        """The pinned host address the fault record is copied to before a wait (0: none; made
        on first use per context, since a context reset frees pinned host memory too)."""
        if self._mirror is not None and self._mirror[0] == self._generation:
            return self._mirror[1]
        if "host_alloc" not in self._ops:
            return 0
        err, address = self._call("host_alloc", gpu_checked.RECORD_SIZE)
        if err:
            log.info("%s for the fault-record mirror failed (%s); records are read synchronously",
                     self._call_name("host_alloc"), getattr(err, "name", err))
            self._ops.pop("host_alloc", None)
            return 0
        self._mirror = (self._generation, int(address))
        return self._mirror[1]

    def _queue_record_read(self, queue_stream: Any) -> int:
        """Before waiting for ``queue_stream`` (None: the device): when every checked launch
        since the last check went to one stream that this wait covers, queue the fault record's
        copy into the pinned mirror on it; the mirror's address, or 0 (read it after the wait)."""
        stream = self._record_stream
        if self._record_streams_many or stream is None or (queue_stream is not None and queue_stream is not stream):
            return 0
        if self._record_host:               # mapped: read in place after the wait
            return self._record_host
        mirror = self._record_mirror()
        if not mirror:
            return 0
        assert self._record is not None
        ctypes.memset(mirror, 0xFF, 4)              # "claimed" is 0 or 1: a stale mirror never decodes
        (err,) = self._call("dtoh", mirror, self._record[1], gpu_checked.RECORD_SIZE, stream)
        if err:
            return 0
        return mirror

    def _check_fault_record(self, full: bool, mirror: int = 0) -> None:
        """After a sync: raise the contained fault a checked kernel recorded, if any (read from
        ``mirror`` when the copy was queued before the wait, else copied now)."""
        assert self._record is not None
        if mirror:
            raw = bytearray(ctypes.string_at(mirror, gpu_checked.RECORD_SIZE))
            if raw[:4] == b"\xff\xff\xff\xff":     # the queued copy did not land: read it now
                mirror = 0
        elif self._record_host:             # mapped, but this wait did not cover every launch
            raw = bytearray(ctypes.string_at(self._record_host, gpu_checked.RECORD_SIZE))
        if not mirror and not self._record_host:
            raw = self._read_record()
        if not full and raw[:4] != bytes(4):
            # Claimed, but this wait did not cover every checked launch: a kernel on another
            # stream may still be writing the fields (the sync copy is not ordered after the
            # non-blocking streams either). Wait for the device, then read it whole.
            (err,) = self._call("sync_device")
            self._check(err, "synchronize")
            full = True
            raw = (bytearray(ctypes.string_at(self._record_host, gpu_checked.RECORD_SIZE))
                   if self._record_host else self._read_record())
        if full:
            self._checked_pending = False
            self._record_stream = None
            self._record_streams_many = False
        record = gpu_checked.decode_record(raw, self._kernel_names)
        if record is None:
            return
        self._clear_fault_record()
        self.stats.faults += 1
        fault = KernelFaultError(record)
        log.warning("%s device %d: %s (contained, context kept)", self.vendor, self.index, fault)
        raise fault

    def _read_record(self) -> bytearray:
        """The record in device memory, with a synchronous copy."""
        assert self._record is not None
        raw = bytearray(gpu_checked.RECORD_SIZE)
        (err,) = self._call("dtoh", memoryview(raw), self._record[1], len(raw), None)
        self._check(err, f"{self._call_name('dtoh')} (fault record)")
        return raw

    def launch(self, kernel: object, grid: tuple[int, int, int], block: tuple[int, int, int],
               args: bytes | memoryview, shared_bytes: int = 0, queue: object | None = None,
               bounds: Sequence[tuple[int, int]] | None = None) -> None:
        """Launch ``kernel`` asynchronously; ``args`` is its packed argument buffer, ``bounds``
        a checked kernel's pointer buffers (default: this backend's allocation of each).

        Raises:
            BackendError: INVALID_HANDLE, INVALID_ARGUMENT (shape, argument size, resources),
            KERNEL_FAULT (context already reset) or DEVICE_LOST for a fault reported at launch.
        """
        self._ensure()
        if kernel.__class__ is not GpuKernel or kernel.generation != self._generation:  # type: ignore[attr-defined]
            check_handle(kernel, GpuKernel, self._generation, "kernel")
        stream = self._stream(queue)
        pack = kernel.pack  # type: ignore[attr-defined]
        try:
            gx, gy, gz = grid
            bx, by, bz = block
            guard = kernel.checked  # type: ignore[attr-defined]
            if guard is None:
                pack.view[:] = args
            else:
                if bounds is None:
                    bounds = launch_bounds(kernel.info, args, self._allocation_at)  # type: ignore[attr-defined]
                record = self._fault_record()
                filled = kernel.filled  # type: ignore[attr-defined]
                # The pack still holds the last fill: skip it when these are the very same
                # (immutable) objects, as a session's launch plan passes them again.
                if filled is None or filled[0] is not args or filled[1] is not bounds or filled[2] != record:
                    kernel.filled = None  # type: ignore[attr-defined]
                    guard.fill(pack.view, args, bounds, record)
                    if args.__class__ is bytes and bounds.__class__ is tuple \
                            and all(b.__class__ is tuple for b in bounds):     # immutable: safe to compare by identity
                        kernel.filled = (args, bounds, record)  # type: ignore[attr-defined]
                self._note_checked_launch(stream)
            (err,) = self._drv_launch(kernel.handle, gx, gy, gz, bx, by, bz,  # type: ignore[attr-defined]
                                      shared_bytes, stream, pack)
        except self.launch_errors as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad launch of {pack.info.name!r}: {exc}") from exc
        if err:
            self._raise(err, f"launch of {pack.info.name!r}")
        self.stats.launches += 1

    # -- ordering -------------------------------------------------------------------------
    def create_queue(self) -> object:
        """Create a non-blocking stream."""
        self._ensure()
        err, stream = self._call("stream_create")
        self._check(err, self._call_name("stream_create"))
        queue = GpuQueue(self._generation, handle=stream)
        with self._lock:
            self._queues.add(queue)
        return queue

    def destroy_queue(self, queue: object) -> None:
        """Destroy a stream (pending work still completes). Raises INVALID_HANDLE."""
        self._ensure()
        check_handle(queue, GpuQueue, self._generation, "queue")
        assert isinstance(queue, GpuQueue)
        with self._lock:
            self._queues.discard(queue)
            queue.invalidate()
        (err,) = self._call("stream_destroy", queue.handle)
        self._check(err, self._call_name("stream_destroy"))

    def create_event(self) -> object:
        """Create a timing-enabled event."""
        self._ensure()
        err, event = self._call("event_create")
        self._check(err, self._call_name("event_create"))
        ev = GpuEvent(self._generation, handle=event)
        with self._lock:
            self._events.add(ev)
        return ev

    def destroy_event(self, event: object) -> None:
        """Destroy an event. Raises INVALID_HANDLE."""
        self._ensure()
        check_handle(event, GpuEvent, self._generation, "event")
        assert isinstance(event, GpuEvent)
        with self._lock:
            self._events.discard(event)
            event.invalidate()
        (err,) = self._call("event_destroy", event.handle)
        self._check(err, self._call_name("event_destroy"))

    def record_event(self, event: object, queue: object | None = None) -> None:
        """Record ``event`` on ``queue``."""
        self._ensure()
        check_handle(event, GpuEvent, self._generation, "event")
        assert isinstance(event, GpuEvent)
        (err,) = self._call("event_record", event.handle, self._stream(queue))
        self._check(err, self._call_name("event_record"))

    def event_elapsed_ms(self, start: object, end: object) -> float:
        """Milliseconds between two recorded, completed events.
        Raises INVALID_ARGUMENT if either has not completed (synchronize first)."""
        self._ensure()
        check_handle(start, GpuEvent, self._generation, "event")
        check_handle(end, GpuEvent, self._generation, "event")
        assert isinstance(start, GpuEvent) and isinstance(end, GpuEvent)
        err, ms = self._call("event_elapsed", start.handle, end.handle)
        self._check(err, f"{self._call_name('event_elapsed')} (are both events recorded and complete?)")
        return float(ms)

    def synchronize(self, queue: object | None = None) -> None:
        """Wait for ``queue``, or for the whole device. Raises KERNEL_FAULT after a fault."""
        self._ensure()
        stream = None if queue is None else self._stream(queue)
        checking = self._checked_pending and self._record is not None and self._record[0] == self._generation
        mirror = self._queue_record_read(stream) if checking else 0
        (err,) = self._call("sync_device") if queue is None else self._call("sync_stream", stream)
        self._check(err, "synchronize")
        if checking:
            # The mirror's copy followed every checked launch on their one stream, which this
            # wait covered: the check is complete, as after a device-wide wait.
            self._check_fault_record(full=queue is None or bool(mirror), mirror=mirror)

    # -- internals ------------------------------------------------------------------------
    def _call(self, key: str, *args: Any) -> tuple[Any, ...]:
        return self._ops[key][1](*args)

    def _call_name(self, key: str) -> str:
        return self._ops[key][0]

    def _stream(self, queue: object | None) -> Any:
        """The vendor stream of ``queue`` (``None``: the default stream). Raises INVALID_HANDLE."""
        if queue is None:
            return self._default_stream
        if queue.__class__ is not GpuQueue or queue.generation != self._generation:  # type: ignore[attr-defined]
            check_handle(queue, GpuQueue, self._generation, "queue")
        return queue.handle  # type: ignore[attr-defined]

    def _ensure(self) -> None:
        """Make this backend's device current in the calling thread (cheap when it is)."""
        if not self._is_open():
            if self.lost:
                raise BackendError(Status.DEVICE_LOST, self.lost)
            raise BackendError(Status.UNAVAILABLE, f"{self.vendor} backend is not open (or was closed)")
        if not self._is_current():
            self._bind()

    def _check(self, err: Any, what: str) -> None:
        if err:
            self._raise(err, what)

    def _raise(self, err: Any, what: str) -> None:
        """Map a failed vendor call to a BackendError; reset the context first after a fault.

        A fault that leaves the runtime unusable (CUDA driver 580 keeps
        ``CUDA_ERROR_ILLEGAL_ADDRESS`` and friends *sticky for the whole process*: even a fresh
        context fails with the same error) cannot be recovered in-process. The backend then
        reports DEVICE_LOST, stays closed (every later call raises DEVICE_LOST naming the cause,
        :attr:`lost` says why), and the server process has to be restarted to serve again.
        """
        name = getattr(err, "name", str(err))
        status = self.errors.status(name)
        if status in (Status.KERNEL_FAULT, Status.DEVICE_LOST):
            self.stats.faults += 1
            log.warning("%s device %d: %s during %s; resetting the %s", self.vendor, self.index, name, what,
                        self.reset_what)
            try:
                with self._lock:
                    self._record_going()
                    self._destroy_all()
                    self._hard_reset()
            except BackendError as exc:
                self.lost = self._lost_reason(name, what, exc)
                log.error("%s device %d: %s", self.vendor, self.index, self.lost)
                raise BackendError(Status.DEVICE_LOST, self.lost, vendor=name) from None
            raise BackendError(status, f"{what} failed; the {self.reset_what} was reset", vendor=name)
        raise BackendError(status, f"{what} failed", vendor=name)

    def _before_reset(self) -> None:
        for reg in self._hosts:
            reg.pinned = False  # a reset drops every registration

    def _after_reset(self) -> None:
        self.stats.resets += 1
        for reg in self._hosts:
            self._pin(reg, replay=True)

    def _destroy_all(self) -> None:
        """Invalidate every handle and try to free its driver object (errors are ignored)."""
        for module in self._modules:
            module.invalidate()
            for kernel in module.kernels.values():
                kernel.invalidate()
            self._call("module_unload", module.handle)
        for queue in self._queues:
            queue.invalidate()
            self._call("stream_destroy", queue.handle)
        for event in self._events:
            event.invalidate()
            self._call("event_destroy", event.handle)
        for address in self._allocs:
            self._call("free", address)
        self._modules.clear()
        self._queues.clear()
        self._events.clear()
        self._allocs.clear()

    def _pin(self, reg: HostRegistration, *, replay: bool = False) -> None:
        if reg.read_only and not self._ro_register:
            log.info("device cannot pin read-only host memory; a %d-byte region stays pageable", reg.size)
            return
        (err,) = self._call("host_register", reg.address, reg.size, reg.read_only)
        if err:
            if err.name == self.already_registered:
                if replay:  # the registration outlived the context reset
                    reg.pinned = True
                    return
                raise BackendError(Status.INVALID_ARGUMENT, "host region overlaps a registered one", vendor=err.name)
            log.warning("%s of %d bytes failed (%s); copies from it will be slower", self._call_name("host_register"),
                        reg.size, err.name)
            return
        reg.pinned = True

    def _unpin(self, reg: HostRegistration) -> None:
        if reg.pinned:
            (err,) = self._call("host_unregister", reg.address)
            if err:
                log.warning("%s: %s", self._call_name("host_unregister"), err.name)
            reg.pinned = False
