"""The CUDA backend: one NVIDIA GPU driven through ``cuda.bindings.driver``.

Concept: a thin, allocation-free layer between a :class:`~vxpu.accel.session.Session` and the
CUDA driver API. It retains the device's *primary context* and makes it current in every
thread that calls in (a thread-local identity check, so the common case costs one attribute
load). Device addresses are the real ``CUdeviceptr`` values as ``int``.

* **Data path.** Guest RAM arrives as a ``memoryview`` over a memfd mapping. :meth:`register_host`
  pins it in place with ``cuMemHostRegister`` (``READ_ONLY`` for read-only maps where the device
  supports it), so copies from it run at pinned-memory speed with no staging copy. The view
  object itself is handed to the driver call (the binding takes its address through the
  buffer protocol): no bytes are copied in Python.
* **Queues.** ``queue=None`` is the legacy default stream: copies on it are synchronous
  (``cuMemcpyHtoD``/``DtoH``), launches and memsets are ordered on it. Queues from
  :meth:`create_queue` are ``CU_STREAM_NON_BLOCKING`` streams; work on them is asynchronous and
  the caller keeps host buffers alive until it synchronizes.
* **Modules.** IR modules go through :func:`vxpu.ir.compile.compile_module` (target ``nvptx``,
  the device's ``sm_XY``, cubin via nvJitLink, through the compile cache). Native PTX and cubin
  are accepted when the server opts in. PTX newer than the driver can JIT (driver 580 takes
  ISA ≤ 9.0) is retried through nvJitLink into a cubin. Loader logs come back in
  :attr:`BackendError.log`.
* **Hot launches.** Each kernel gets an :class:`~vxpu.accel.gpu_common.ArgPack` at lookup: a
  preallocated argument buffer and a ``void**`` array into it. A launch copies the packed bytes
  in and passes the array's integer address; nothing else is built per call.
* **Faults.** A kernel fault (illegal address, launch failure, trap, ...) makes the backend
  reset the primary context (``cuDevicePrimaryCtxReset``, re-retain, a check that the new context
  works): every allocation, module, queue and event is gone, registered host memory is
  registered again, handles from before fail with ``INVALID_HANDLE``, and the call raises
  ``KERNEL_FAULT``. **Measured on the H100 machine (driver 580.159.04): these faults are sticky
  for the whole process** — after ``CUDA_ERROR_ILLEGAL_ADDRESS`` even a freshly created context
  fails with the same error. The backend detects that, raises ``DEVICE_LOST`` naming the cause,
  sets :attr:`CudaBackend.lost` and refuses further work; serving again needs a new process
  (the server is one process per device per VM, so its supervisor restarts it).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from vxpu.accel.backend import (
    BackendError,
    BackendStats,
    BackendUnavailable,
    DeviceProperties,
    KernelInfo,
    ModuleKind,
    Status,
)
from vxpu.accel.cuda_util import LOG_BYTES, MAX_PARAMS, max_ptx_isa, ptx_to_cubin, status_for_cuda_error
from vxpu.accel.gpu_common import (
    ArgPack,
    GpuEvent,
    GpuKernel,
    GpuModule,
    GpuQueue,
    HostRegistration,
    buffer_address,
    check_handle,
)
from vxpu.accel.gpu_ir import compile_ir, resolve_cache

log = logging.getLogger(__name__)

_NONE = object()  # never a backend's context, not even a closed backend's ``None``


class _Current(threading.local):
    """The CUDA context this thread has made current through a backend (:data:`_NONE`: none)."""

    ctx: object = _NONE


_current = _Current()


class CudaBackend:
    """One NVIDIA GPU. Construct with the device ordinal, then :meth:`open`.

    Args:
        device_index: CUDA device ordinal.
        compile_cache: passed to :func:`vxpu.ir.compile.compile_module` (``None``: its default).
        opt_level: LLVM optimisation level for IR modules.
    """

    name = "cuda"

    def __init__(self, device_index: int = 0, *, compile_cache: Any = None, opt_level: int | str = 3) -> None:
        self.index = int(device_index)
        self.stats = BackendStats()
        self._compile_cache = resolve_cache(compile_cache)
        self._opt_level = int(opt_level)
        self._drv: Any = None
        self._cuMemcpyHtoD: Any = None
        self._cuMemcpyDtoH: Any = None
        self._cuMemcpyHtoDAsync: Any = None
        self._cuMemcpyDtoHAsync: Any = None
        self._cuMemcpyDtoDAsync: Any = None
        self._cuMemsetD8Async: Any = None
        self._cuLaunchKernel: Any = None
        self._cuStreamSynchronize: Any = None
        self._cuEventRecord: Any = None
        self._dev: Any = None
        self._ctx: Any = None
        self._generation = 0
        self._props: DeviceProperties | None = None
        self._allocs: dict[int, int] = {}
        self._modules: set[GpuModule] = set()
        self._queues: set[GpuQueue] = set()
        self._events: set[GpuEvent] = set()
        self._hosts: set[HostRegistration] = set()
        self._last_host: HostRegistration | None = None  # region of the last address-based copy
        self._lock = threading.RLock()
        self._null_stream: Any = None
        self._ro_register = False
        self.driver_version = 0
        self.pci_bus_id = ""
        self.lost: str | None = None  # why the device is unusable in this process, after a fault

    # -- life cycle -----------------------------------------------------------------------
    def open(self) -> None:
        """Initialise the driver, retain the primary context and read the device properties.

        Raises:
            BackendUnavailable: no cuda-bindings, no NVIDIA driver, or no such device.
        """
        if self._ctx is not None:
            return
        try:
            from cuda.bindings import driver
        except ImportError as exc:
            raise BackendUnavailable("cuda-bindings is not installed: pip install 'vxpu[cuda]'") from exc
        try:
            (err,) = driver.cuInit(0)
        except Exception as exc:  # DynamicLibNotFoundError when libcuda.so is absent
            raise BackendUnavailable(f"NVIDIA driver library not found ({exc})") from exc
        if err:
            raise BackendUnavailable("cuInit failed: no usable NVIDIA GPU", vendor=err.name)
        self._drv = driver
        # Hot-path driver entry points, bound once (saves a module attribute lookup per call).
        for fn in ("cuMemcpyHtoD", "cuMemcpyDtoH", "cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync", "cuMemcpyDtoDAsync",
                   "cuMemsetD8Async", "cuLaunchKernel", "cuStreamSynchronize", "cuEventRecord"):
            setattr(self, f"_{fn}", getattr(driver, fn))
        err, count = driver.cuDeviceGetCount()
        if err or not 0 <= self.index < count:
            raise BackendUnavailable(f"CUDA device {self.index} does not exist ({count if not err else 0} present)")
        err, self._dev = driver.cuDeviceGet(self.index)
        self._check(err, "cuDeviceGet")
        self._null_stream = driver.CUstream(0)
        self._retain()
        self._props = self._read_properties()
        log.info("opened CUDA device %d: %s (%s, %d MiB, driver %d)", self.index, self._props.name,
                 self._props.architecture, self._props.memory_total >> 20, self.driver_version)

    def close(self) -> None:
        """Free everything this backend created and release the primary context (idempotent)."""
        with self._lock:
            if self._ctx is None:
                return
            self._bind()
            self._destroy_all(quiet=True)
            for reg in list(self._hosts):
                self._unpin(reg)
                reg.released = True
            self._hosts.clear()
            self._last_host = None
            self._drv.cuDevicePrimaryCtxRelease(self._dev)
            self._ctx = None
            _current.ctx = _NONE
            self._generation += 1

    def properties(self) -> DeviceProperties:
        """Static device facts. Raises UNAVAILABLE before :meth:`open`."""
        if self._props is None:
            raise BackendError(Status.UNAVAILABLE, "CUDA backend is not open")
        return self._props

    def memory_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes of device memory."""
        self._ensure()
        err, free, total = self._drv.cuMemGetInfo()
        self._check(err, "cuMemGetInfo")
        return int(free), int(total)

    def reset(self) -> None:
        """Drop every allocation, module, queue and event and start a fresh primary context.
        Registered host memory stays registered (it is registered again in the new context).

        Raises:
            BackendError: DEVICE_LOST if the context cannot be rebuilt.
        """
        with self._lock:
            self._ensure()
            self._destroy_all(quiet=True)
            self._hard_reset()

    # -- memory ---------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """Allocate ``size`` bytes of device memory. Raises OUT_OF_MEMORY or INVALID_ARGUMENT."""
        if _current.ctx is not self._ctx:
            self._ensure()
        if not 0 < size < 1 << 48:
            raise BackendError(Status.INVALID_ARGUMENT, f"allocation size {size} out of range")
        err, dptr = self._drv.cuMemAlloc(size)
        if err:
            self._raise(err, f"cuMemAlloc({size})")
        address = int(dptr)
        self._allocs[address] = size
        return address

    def free(self, address: int) -> None:
        """Free an allocation. Raises INVALID_HANDLE for an address :meth:`alloc` did not return."""
        if _current.ctx is not self._ctx:
            self._ensure()
        if self._allocs.pop(address, None) is None:
            raise BackendError(Status.INVALID_HANDLE, f"no device allocation at {address:#x}")
        (err,) = self._drv.cuMemFree(address)
        if err:
            self._raise(err, "cuMemFree")

    def memset(self, address: int, value: int, size: int, queue: object | None = None) -> None:
        """Fill ``size`` bytes at ``address`` with the byte ``value`` (ordered on ``queue``)."""
        if _current.ctx is not self._ctx:
            self._ensure()
        if not 0 <= value <= 0xFF:
            raise BackendError(Status.INVALID_ARGUMENT, f"memset value {value} is not a byte")
        stream = self._null_stream if queue is None else self._stream(queue)
        try:
            (err,) = self._cuMemsetD8Async(address, value, size, stream)
        except (TypeError, OverflowError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad memset {address!r}+{size!r}: {exc}") from exc
        if err:
            self._raise(err, "cuMemsetD8Async")

    def copy_htod(self, dst: int, src: memoryview, queue: object | None = None) -> None:
        """Copy ``src`` to device address ``dst``; synchronous when ``queue`` is ``None``."""
        if _current.ctx is not self._ctx:
            self._ensure()
        try:
            n = src.nbytes
            if queue is None:
                (err,) = self._cuMemcpyHtoD(dst, src, n)
            else:
                (err,) = self._cuMemcpyHtoDAsync(dst, src, n, self._stream(queue))
        except (BufferError, TypeError, OverflowError, AttributeError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad host buffer for copy_htod: {exc}") from exc
        if err:
            self._raise(err, "cuMemcpyHtoD")
        self.stats.bytes_htod += n

    def copy_dtoh(self, dst: memoryview, src: int, queue: object | None = None) -> None:
        """Copy device memory at ``src`` into ``dst``; synchronous when ``queue`` is ``None``."""
        if _current.ctx is not self._ctx:
            self._ensure()
        try:
            n = dst.nbytes
            if dst.readonly:
                raise BackendError(Status.INVALID_ARGUMENT, "copy_dtoh destination is read-only")
            if queue is None:
                (err,) = self._cuMemcpyDtoH(dst, src, n)
            else:
                (err,) = self._cuMemcpyDtoHAsync(dst, src, n, self._stream(queue))
        except (BufferError, TypeError, OverflowError, AttributeError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad host buffer for copy_dtoh: {exc}") from exc
        if err:
            self._raise(err, "cuMemcpyDtoH")
        self.stats.bytes_dtoh += n

    def copy_dtod(self, dst: int, src: int, size: int, queue: object | None = None) -> None:
        """Copy ``size`` bytes between device addresses, ordered on ``queue``."""
        if _current.ctx is not self._ctx:
            self._ensure()
        stream = self._null_stream if queue is None else self._stream(queue)
        try:
            (err,) = self._cuMemcpyDtoDAsync(dst, src, size, stream)
        except (TypeError, OverflowError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad copy_dtod of {size!r} bytes: {exc}") from exc
        if err:
            self._raise(err, "cuMemcpyDtoDAsync")
        self.stats.bytes_dtod += size

    def copy_htod_address(self, dst: int, host: int, size: int, queue: object | None = None) -> None:
        """Like :meth:`copy_htod`, from the host address ``host`` instead of a memoryview.

        The fast path for callers that translate guest-physical addresses to host addresses
        themselves (saves the buffer-protocol round trip, ≈0.4 µs per call). ``[host, host+size)``
        must lie inside one region given to :meth:`register_host` (whose token keeps it mapped).

        Raises:
            BackendError: OUT_OF_RANGE outside every registered region; as :meth:`copy_htod`.
        """
        if _current.ctx is not self._ctx:
            self._ensure()
        reg = self._last_host
        if reg is None or not (reg.address <= host and host + size <= reg.address + reg.size):
            self._host_region(host, size, writable=False)
        try:
            if queue is None:
                (err,) = self._cuMemcpyHtoD(dst, host, size)
            else:
                (err,) = self._cuMemcpyHtoDAsync(dst, host, size, self._stream(queue))
        except (TypeError, OverflowError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad copy_htod_address: {exc}") from exc
        if err:
            self._raise(err, "cuMemcpyHtoD")
        self.stats.bytes_htod += size

    def copy_dtoh_address(self, host: int, src: int, size: int, queue: object | None = None) -> None:
        """Like :meth:`copy_dtoh`, into the host address ``host`` (see :meth:`copy_htod_address`).

        Raises:
            BackendError: OUT_OF_RANGE outside every writable registered region; as :meth:`copy_dtoh`.
        """
        if _current.ctx is not self._ctx:
            self._ensure()
        reg = self._last_host
        if reg is None or reg.read_only or not (reg.address <= host and host + size <= reg.address + reg.size):
            self._host_region(host, size, writable=True)
        try:
            if queue is None:
                (err,) = self._cuMemcpyDtoH(host, src, size)
            else:
                (err,) = self._cuMemcpyDtoHAsync(host, src, size, self._stream(queue))
        except (TypeError, OverflowError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad copy_dtoh_address: {exc}") from exc
        if err:
            self._raise(err, "cuMemcpyDtoH")
        self.stats.bytes_dtoh += size

    def _host_region(self, host: int, size: int, *, writable: bool) -> HostRegistration:
        """Find the registered region holding ``[host, host+size)`` and cache it for the next call."""
        if size < 0 or host < 0:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad host range {host:#x}+{size}")
        for reg in self._hosts:
            if reg.address <= host and host + size <= reg.end and not (writable and reg.read_only):
                self._last_host = reg
                return reg
        raise BackendError(Status.OUT_OF_RANGE,
                           f"host range {host:#x}+{size} is not inside a registered{' writable' if writable else ''} "
                           f"region")

    def register_host(self, view: memoryview, read_only: bool = False) -> object:
        """Pin a host region (a DMA-mapped guest RAM mapping) with ``cuMemHostRegister``.

        A refusal by the driver (out of pinnable memory, a read-only map the device cannot pin)
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
        """Undo :meth:`register_host`; call it before the memory is unmapped.
        Raises INVALID_HANDLE for an unknown or already released token."""
        if token is None:
            return
        with self._lock:
            if not isinstance(token, HostRegistration) or token not in self._hosts:
                raise BackendError(Status.INVALID_HANDLE, "unknown or already released host registration")
            self._hosts.discard(token)
            self._last_host = None
            if self._ctx is not None:
                self._bind()
                self._unpin(token)
            token.released = True

    # -- code -----------------------------------------------------------------------------
    def load_module(self, image: bytes, kind: ModuleKind = ModuleKind.IR) -> object:
        """Load an IR module (compiled to a cubin) or a native PTX/cubin image.

        Raises:
            BackendError: BAD_MODULE with the compiler/loader log; UNSUPPORTED for HSACO/ONNX.
        """
        self._ensure()
        signatures: dict[str, KernelInfo] = {}
        if kind is ModuleKind.IR:
            data, signatures = self._compile_ir(image)
        elif kind is ModuleKind.PTX:
            data = bytes(image).rstrip(b"\0") + b"\0"
        elif kind is ModuleKind.CUBIN:
            data = bytes(image)
        else:
            raise BackendError(Status.UNSUPPORTED, f"the CUDA backend does not load {kind.value} modules")
        try:
            handle = self._load_image(data)
        except BackendError as exc:
            if kind is not ModuleKind.PTX or exc.vendor not in ("CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
                                                                "CUDA_ERROR_INVALID_PTX"):
                raise
            log.info("driver cannot JIT this PTX (%s); assembling it with nvJitLink", exc.vendor)
            handle = self._load_image(ptx_to_cubin(data, self.properties().architecture))
        module = GpuModule(self._generation, handle=handle, signatures=signatures)
        with self._lock:
            self._modules.add(module)
        return module

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
        (err,) = self._drv.cuModuleUnload(module.handle)
        if err:
            self._raise(err, "cuModuleUnload")

    def get_kernel(self, module: object, name: str) -> tuple[object, KernelInfo]:
        """Look up kernel ``name``; builds its launch facts and preallocated arguments once.

        Raises:
            BackendError: NOT_FOUND when the module has no such kernel; INVALID_HANDLE.
        """
        self._ensure()
        check_handle(module, GpuModule, self._generation, "module")
        assert isinstance(module, GpuModule)
        cached = module.kernels.get(name)
        if cached is not None:
            assert cached.info is not None
            return cached, cached.info
        err, func = self._drv.cuModuleGetFunction(module.handle, name.encode())
        if err:
            name_err = err.name
            if name_err in ("CUDA_ERROR_NOT_FOUND", "CUDA_ERROR_INVALID_VALUE"):
                raise BackendError(Status.NOT_FOUND, f"no kernel {name!r} in the module", vendor=name_err)
            self._raise(err, "cuModuleGetFunction")
        info = self._kernel_info(func, name, module.signatures.get(name))
        kernel = GpuKernel(self._generation, handle=func, module=module, info=info, pack=ArgPack(info))
        module.kernels[name] = kernel
        return kernel, info

    def launch(
        self,
        kernel: object,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: bytes | memoryview,
        shared_bytes: int = 0,
        queue: object | None = None,
    ) -> None:
        """Launch ``kernel`` asynchronously; ``args`` is its packed argument buffer.

        Raises:
            BackendError: INVALID_HANDLE, INVALID_ARGUMENT (shape, argument size, resources),
            KERNEL_FAULT (context already reset) for a fault reported at launch.
        """
        if _current.ctx is not self._ctx:
            self._ensure()
        if kernel.__class__ is not GpuKernel or kernel.generation != self._generation:  # type: ignore[attr-defined]
            check_handle(kernel, GpuKernel, self._generation, "kernel")
        if queue is None:
            stream = self._null_stream
        elif queue.__class__ is GpuQueue and queue.generation == self._generation:  # type: ignore[attr-defined]
            stream = queue.handle  # type: ignore[attr-defined]
        else:
            stream = self._stream(queue)
        pack = kernel.pack  # type: ignore[attr-defined]
        try:
            gx, gy, gz = grid
            bx, by, bz = block
            pack.view[:] = args
            (err,) = self._cuLaunchKernel(kernel.handle,  # type: ignore[attr-defined]
                                          gx, gy, gz, bx, by, bz, shared_bytes, stream,
                                          pack.params_address, 0)
        except (ValueError, TypeError, OverflowError, IndexError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad launch of {pack.info.name!r}: {exc}") from exc
        if err:
            self._raise(err, f"launch of {pack.info.name!r}")
        self.stats.launches += 1

    # -- ordering -------------------------------------------------------------------------
    def create_queue(self) -> object:
        """Create a non-blocking stream."""
        self._ensure()
        err, stream = self._drv.cuStreamCreate(self._drv.CUstream_flags.CU_STREAM_NON_BLOCKING)
        self._check(err, "cuStreamCreate")
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
        (err,) = self._drv.cuStreamDestroy(queue.handle)
        if err:
            self._raise(err, "cuStreamDestroy")

    def create_event(self) -> object:
        """Create a timing-enabled event."""
        self._ensure()
        err, event = self._drv.cuEventCreate(self._drv.CUevent_flags.CU_EVENT_DEFAULT)
        self._check(err, "cuEventCreate")
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
        (err,) = self._drv.cuEventDestroy(event.handle)
        if err:
            self._raise(err, "cuEventDestroy")

    def record_event(self, event: object, queue: object | None = None) -> None:
        """Record ``event`` on ``queue``."""
        if _current.ctx is not self._ctx:
            self._ensure()
        check_handle(event, GpuEvent, self._generation, "event")
        stream = self._null_stream if queue is None else self._stream(queue)
        (err,) = self._cuEventRecord(event.handle, stream)  # type: ignore[attr-defined]
        if err:
            self._raise(err, "cuEventRecord")

    def event_elapsed_ms(self, start: object, end: object) -> float:
        """Milliseconds between two recorded, completed events.
        Raises INVALID_ARGUMENT if either has not completed (synchronize first)."""
        self._ensure()
        check_handle(start, GpuEvent, self._generation, "event")
        check_handle(end, GpuEvent, self._generation, "event")
        err, ms = self._drv.cuEventElapsedTime(start.handle, end.handle)  # type: ignore[attr-defined]
        if err:
            self._raise(err, "cuEventElapsedTime (are both events recorded and complete?)")
        return float(ms)

    def synchronize(self, queue: object | None = None) -> None:
        """Wait for ``queue``, or for the whole device. Raises KERNEL_FAULT after a fault."""
        if _current.ctx is not self._ctx:
            self._ensure()
        if queue is None:
            (err,) = self._drv.cuCtxSynchronize()
        else:
            (err,) = self._cuStreamSynchronize(self._stream(queue))
        if err:
            self._raise(err, "synchronize")

    # -- internals ------------------------------------------------------------------------
    def _ensure(self) -> None:
        """Make this backend's context current in the calling thread (cheap when it is)."""
        if self._ctx is None:
            if self.lost:
                raise BackendError(Status.DEVICE_LOST, self.lost)
            raise BackendError(Status.UNAVAILABLE, "CUDA backend is not open (or was closed)")
        if _current.ctx is not self._ctx:
            self._bind()

    def _bind(self) -> None:
        (err,) = self._drv.cuCtxSetCurrent(self._ctx)
        if err:
            raise BackendError(Status.DEVICE_LOST, "cannot make the CUDA context current", vendor=err.name)
        _current.ctx = self._ctx

    def _retain(self) -> None:
        err, ctx = self._drv.cuDevicePrimaryCtxRetain(self._dev)
        if err:
            raise BackendUnavailable("cannot retain the CUDA primary context", vendor=err.name)
        self._ctx = ctx
        self._bind()

    def _stream(self, queue: object) -> Any:
        if queue.__class__ is not GpuQueue or queue.generation != self._generation:  # type: ignore[attr-defined]
            check_handle(queue, GpuQueue, self._generation, "queue")
        return queue.handle  # type: ignore[attr-defined]

    def _check(self, err: Any, what: str) -> None:
        if err:
            self._raise(err, what)

    def _raise(self, err: Any, what: str) -> None:
        """Map a failed ``CUresult`` to a BackendError; reset the context first after a fault.

        A fault that the driver keeps *sticky for the whole process* (driver 580 does this for
        ``CUDA_ERROR_ILLEGAL_ADDRESS`` and friends: even a fresh context fails with the same
        error) cannot be recovered in-process. The backend then reports DEVICE_LOST, stays
        closed (every later call raises DEVICE_LOST naming the cause, :attr:`lost` says why),
        and the server process has to be restarted to serve again.
        """
        name = getattr(err, "name", str(err))
        status = status_for_cuda_error(name)
        if status in (Status.KERNEL_FAULT, Status.DEVICE_LOST):
            self.stats.faults += 1
            log.warning("CUDA device %d: %s during %s; resetting the context", self.index, name, what)
            try:
                with self._lock:
                    self._destroy_all(quiet=True)
                    self._hard_reset()
            except BackendError as exc:
                self.lost = (f"{name} during {what} poisoned the CUDA driver for this process ({exc}); "
                             f"restart the server process")
                log.error("CUDA device %d: %s", self.index, self.lost)
                raise BackendError(Status.DEVICE_LOST, self.lost, vendor=name) from None
            raise BackendError(status, f"{what} failed; the context was reset", vendor=name)
        raise BackendError(status, f"{what} failed", vendor=name)

    def _hard_reset(self) -> None:
        """Reset the primary context, retain it again, check it works and re-pin host memory.

        Raises:
            BackendError: DEVICE_LOST when no working context can be made (the backend is closed).
        """
        drv = self._drv
        for reg in self._hosts:
            reg.pinned = False  # the reset drops every registration
        (err,) = drv.cuDevicePrimaryCtxReset(self._dev)
        if err:
            log.warning("cuDevicePrimaryCtxReset: %s", err.name)
        drv.cuDevicePrimaryCtxRelease(self._dev)
        self._generation += 1
        _current.ctx = _NONE
        self._ctx = None
        err, ctx = drv.cuDevicePrimaryCtxRetain(self._dev)
        if not err:
            self._ctx = ctx
            (err,) = drv.cuCtxSetCurrent(ctx)
            if not err:
                _current.ctx = ctx
                (err,) = drv.cuCtxSynchronize()  # a poisoned driver fails even on a fresh context
        if err:
            if self._ctx is not None:
                drv.cuDevicePrimaryCtxRelease(self._dev)
                self._ctx = None
                _current.ctx = _NONE
            raise BackendError(Status.DEVICE_LOST, "CUDA context could not be re-created", vendor=err.name)
        self.stats.resets += 1
        for reg in self._hosts:
            self._pin(reg, replay=True)

    def _destroy_all(self, *, quiet: bool) -> None:
        """Invalidate every handle and try to free its driver object (errors ignored when quiet)."""
        drv = self._drv
        for module in self._modules:
            module.invalidate()
            for kernel in module.kernels.values():
                kernel.invalidate()
            drv.cuModuleUnload(module.handle)
        for queue in self._queues:
            queue.invalidate()
            drv.cuStreamDestroy(queue.handle)
        for event in self._events:
            event.invalidate()
            drv.cuEventDestroy(event.handle)
        for address in self._allocs:
            drv.cuMemFree(address)
        self._modules.clear()
        self._queues.clear()
        self._events.clear()
        self._allocs.clear()

    def _pin(self, reg: HostRegistration, *, replay: bool = False) -> None:
        drv = self._drv
        flags = drv.CU_MEMHOSTREGISTER_PORTABLE
        if reg.read_only:
            if not self._ro_register:
                log.info("device cannot pin read-only host memory; a %d-byte region stays pageable", reg.size)
                return
            flags |= drv.CU_MEMHOSTREGISTER_READ_ONLY
        (err,) = drv.cuMemHostRegister(reg.address, reg.size, flags)
        if err:
            if err.name == "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED":
                if replay:  # the registration outlived the context reset
                    reg.pinned = True
                    return
                raise BackendError(Status.INVALID_ARGUMENT, "host region overlaps a registered one", vendor=err.name)
            log.warning("cuMemHostRegister of %d bytes failed (%s); copies from it will be slower",
                        reg.size, err.name)
            return
        reg.pinned = True

    def _unpin(self, reg: HostRegistration) -> None:
        if reg.pinned:
            (err,) = self._drv.cuMemHostUnregister(reg.address)
            if err:
                log.warning("cuMemHostUnregister: %s", err.name)
            reg.pinned = False

    def _load_image(self, data: bytes) -> Any:
        drv = self._drv
        opt = drv.CUjit_option
        err_buf, info_buf = bytearray(LOG_BYTES), bytearray(LOG_BYTES)
        options = [opt.CU_JIT_ERROR_LOG_BUFFER, opt.CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
                   opt.CU_JIT_INFO_LOG_BUFFER, opt.CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES, opt.CU_JIT_LOG_VERBOSE]
        values = [err_buf, LOG_BYTES, info_buf, LOG_BYTES, 1]
        err, module = drv.cuModuleLoadDataEx(data, len(options), options, values)
        if err:
            text = (err_buf.split(b"\0", 1)[0] + b"\n" + info_buf.split(b"\0", 1)[0]).decode(errors="replace")
            status = status_for_cuda_error(err.name)
            if status in (Status.KERNEL_FAULT, Status.DEVICE_LOST, Status.OUT_OF_MEMORY):
                self._raise(err, "cuModuleLoadDataEx")
            if status is Status.INVALID_ARGUMENT or status is Status.INTERNAL:
                status = Status.BAD_MODULE
            hint = ""
            if err.name == "CUDA_ERROR_UNSUPPORTED_PTX_VERSION":
                major, minor = max_ptx_isa(self.driver_version)
                hint = f" (this driver JITs PTX ISA <= {major}.{minor}; send a cubin or older PTX)"
            raise BackendError(status, f"module failed to load{hint}", vendor=err.name, log=text.strip())
        return module

    def _compile_ir(self, image: bytes) -> tuple[bytes, dict[str, KernelInfo]]:
        """Compile an IR module to a cubin for this device; returns the image and kernel layouts."""
        cubin, signatures, hit = compile_ir(image, "nvptx", self.properties().architecture,
                                            self._opt_level, self._compile_cache)
        if hit:
            self.stats.compile_cache_hits += 1
        else:
            self.stats.compile_cache_misses += 1
        return cubin, signatures

    def _kernel_info(self, func: Any, name: str, signature: KernelInfo | None) -> KernelInfo:
        """Launch facts from the driver (``cuFuncGetParamInfo``), or from the IR signature."""
        drv = self._drv
        err, shared = drv.cuFuncGetAttribute(
            drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, func)
        shared = int(shared) if not err else 0
        sizes: list[int] = []
        offsets: list[int] = []
        for index in range(MAX_PARAMS):
            err, offset, size = drv.cuFuncGetParamInfo(func, index)
            if err:
                break
            offsets.append(int(offset))
            sizes.append(int(size))
        else:
            raise BackendError(Status.BAD_MODULE, f"kernel {name!r} has more than {MAX_PARAMS} parameters")
        if err.name != "CUDA_ERROR_INVALID_VALUE":  # the driver cannot describe parameters
            if signature is None:
                raise BackendError(Status.UNSUPPORTED, f"driver cannot report the parameters of {name!r} "
                                   f"({err.name}); load it as an IR module", vendor=err.name)
            return KernelInfo(name, signature.param_sizes, signature.param_offsets, signature.args_size, shared)
        total = max((o + s for o, s in zip(offsets, sizes)), default=0)
        info = KernelInfo(name, tuple(sizes), tuple(offsets), total, shared)
        if signature is not None and (signature.param_sizes, signature.param_offsets) != (info.param_sizes,
                                                                                        info.param_offsets):
            raise BackendError(Status.BAD_MODULE, f"kernel {name!r}: compiled layout differs from the IR signature")
        if signature is not None:
            # IR kernels take the IR's packed layout on every backend: the driver reports where
            # the last parameter ends, the IR rounds the buffer up to its widest alignment.
            return KernelInfo(name, info.param_sizes, info.param_offsets, signature.args_size, shared)
        return info

    def _read_properties(self) -> DeviceProperties:
        drv = self._drv
        attr = drv.CUdevice_attribute

        def get(a: Any) -> int:
            err, value = drv.cuDeviceGetAttribute(a, self._dev)
            return int(value) if not err else 0

        major = get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        minor = get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        err, raw = drv.cuDeviceGetName(256, self._dev)
        name = raw.split(b"\0", 1)[0].decode(errors="replace") if not err else "NVIDIA GPU"
        err, total = drv.cuDeviceTotalMem(self._dev)
        _, self.driver_version = drv.cuDriverGetVersion()
        err_b, bus = drv.cuDeviceGetPCIBusId(32, self._dev)
        if not err_b:
            self.pci_bus_id = bus.split(b"\0", 1)[0].decode().lower() if isinstance(bus, bytes) else str(bus).lower()
        self._ro_register = bool(get(attr.CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED))
        # "sticky-faults": a kernel fault poisons the CUDA driver for the whole process (measured
        # on driver 580); the backend then reports DEVICE_LOST and the process must be restarted.
        features = {"ir", "ptx", "cubin", "atomics-f32", "fp16", "events", "host-register", "sticky-faults"}
        if major >= 6:
            features.add("atomics-f64")
        if major >= 8:
            features.add("bf16")
        if self._ro_register:
            features.add("host-register-read-only")
        return DeviceProperties(
            backend="cuda", name=name, vendor="nvidia", architecture=f"sm_{major}{minor}",
            memory_total=int(total) if not err else 0,
            compute_units=get(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            max_threads_per_block=get(attr.CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK),
            max_shared_memory_per_block=get(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK),
            features=frozenset(features),
        )
