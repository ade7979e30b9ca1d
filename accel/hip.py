"""The HIP backend: one AMD GPU driven through hip-python (``from hip import hip``).

**Status: written to the HIP API and tested without AMD hardware. It has never run on an AMD
GPU** (none was reachable while it was written). Everything short of executing on a device is
tested: code-object production for the device's ``gfx`` arch through :mod:`vxpu.ir`, the
packed-argument ``extra`` layout, the ``hipError_t`` → :class:`Status` mapping, hsaco metadata
parsing and the clean ``UNAVAILABLE`` path when ``libamdhip64.so`` or a GPU is missing.

Concept: the same surface as :mod:`vxpu.accel.cuda`, over the HIP runtime:

* The calling thread's device is set with ``hipSetDevice`` behind a thread-local check.
* Guest RAM is pinned with ``hipHostRegister`` (``ReadOnly`` for read-only maps where the
  device supports it); copies pass the ``memoryview`` itself to the runtime.
* IR modules compile to a linked hsaco for the device's ``gcnArchName`` (split at ``:``:
  ``gfx942:sramecc+:xnack-`` → ``gfx942``) via :func:`vxpu.ir.compile.compile_module`; native
  hsaco is opt-in and its kernels' argument layouts come from the ``NT_AMDGPU_METADATA`` note.
* Launches use ``hipModuleLaunchKernel`` with ``extra`` = ``{HIP_LAUNCH_PARAM_BUFFER_POINTER,
  buf, HIP_LAUNCH_PARAM_BUFFER_SIZE, &size, HIP_LAUNCH_PARAM_END}``, built once per kernel
  (:class:`HipArgPack`) and passed by address; a launch copies the packed bytes in.
* A kernel fault resets the device (``hipDeviceReset``); if the runtime cannot be used again in
  this process the backend reports ``DEVICE_LOST`` and sets :attr:`HipBackend.lost`.
"""

from __future__ import annotations

import ctypes
import logging
import struct
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

# HIP's launch-parameter markers (hip_runtime_api.h: ((void*)0x01) ... ((void*)0x03)).
HIP_LAUNCH_PARAM_BUFFER_POINTER = 0x01
HIP_LAUNCH_PARAM_BUFFER_SIZE = 0x02
HIP_LAUNCH_PARAM_END = 0x03
HIP_HOST_REGISTER_READ_ONLY = 0x08   # hipHostRegisterReadOnly

_KERNEL_FAULT = frozenset({
    "hipErrorIllegalAddress", "hipErrorLaunchFailure", "hipErrorAssert", "hipErrorLaunchTimeOut",
    "hipErrorPriorLaunchFailure", "hipErrorInvalidDevicePointer",
})
_DEVICE_LOST = frozenset({"hipErrorECCNotCorrectable", "hipErrorDeinitialized", "hipErrorContextIsDestroyed"})
_STATUS_BY_NAME: dict[str, Status] = {
    "hipErrorOutOfMemory": Status.OUT_OF_MEMORY,
    "hipErrorMemoryAllocation": Status.OUT_OF_MEMORY,
    "hipErrorInvalidValue": Status.INVALID_ARGUMENT,
    "hipErrorInvalidConfiguration": Status.INVALID_ARGUMENT,
    "hipErrorLaunchOutOfResources": Status.INVALID_ARGUMENT,
    "hipErrorCooperativeLaunchTooLarge": Status.INVALID_ARGUMENT,
    "hipErrorHostMemoryAlreadyRegistered": Status.INVALID_ARGUMENT,
    "hipErrorNotReady": Status.INVALID_ARGUMENT,
    "hipErrorHostMemoryNotRegistered": Status.INVALID_HANDLE,
    "hipErrorInvalidHandle": Status.INVALID_HANDLE,
    "hipErrorInvalidResourceHandle": Status.INVALID_HANDLE,
    "hipErrorInvalidContext": Status.INVALID_HANDLE,
    "hipErrorNotFound": Status.NOT_FOUND,
    "hipErrorInvalidSymbol": Status.NOT_FOUND,
    "hipErrorInvalidDeviceFunction": Status.NOT_FOUND,
    "hipErrorInvalidImage": Status.BAD_MODULE,
    "hipErrorInvalidKernelFile": Status.BAD_MODULE,
    "hipErrorNoBinaryForGpu": Status.BAD_MODULE,
    "hipErrorInvalidSource": Status.BAD_MODULE,
    "hipErrorSharedObjectSymbolNotFound": Status.BAD_MODULE,
    "hipErrorSharedObjectInitFailed": Status.BAD_MODULE,
    "hipErrorNotSupported": Status.UNSUPPORTED,
    "hipErrorNoDevice": Status.UNAVAILABLE,
    "hipErrorInvalidDevice": Status.UNAVAILABLE,
    "hipErrorNotInitialized": Status.UNAVAILABLE,
    "hipErrorInsufficientDriver": Status.UNAVAILABLE,
    "hipErrorInitializationError": Status.UNAVAILABLE,
}


def status_for_hip_error(name: str) -> Status:
    """Map a ``hipError_t`` name (e.g. ``"hipErrorIllegalAddress"``) to a stable :class:`Status`."""
    if name in _KERNEL_FAULT:
        return Status.KERNEL_FAULT
    if name in _DEVICE_LOST:
        return Status.DEVICE_LOST
    return _STATUS_BY_NAME.get(name, Status.INTERNAL)


def gfx_arch(gcn_arch_name: str | bytes) -> str:
    """``"gfx942:sramecc+:xnack-"`` → ``"gfx942"``."""
    text = gcn_arch_name.decode(errors="replace") if isinstance(gcn_arch_name, bytes) else gcn_arch_name
    return text.split("\0", 1)[0].split(":", 1)[0].strip()


def as_address(pointer: Any) -> int:
    """The integer address of a hip-python pointer object (or an int)."""
    if isinstance(pointer, int):
        return pointer
    try:
        return int(pointer)
    except TypeError:
        return int(pointer.as_c_void_p().value or 0)


class HipArgPack(ArgPack):
    """An :class:`ArgPack` plus the ``extra`` array HIP takes: built once, passed by address."""

    __slots__ = ("_extra", "_size", "extra_address")

    def __init__(self, info: KernelInfo) -> None:
        super().__init__(info)
        self._size = ctypes.c_size_t(info.args_size)
        self._extra = (ctypes.c_void_p * 5)(
            HIP_LAUNCH_PARAM_BUFFER_POINTER, self.storage_address,
            HIP_LAUNCH_PARAM_BUFFER_SIZE, ctypes.addressof(self._size), HIP_LAUNCH_PARAM_END)
        self.extra_address = ctypes.addressof(self._extra)


def _load_hip() -> Any:
    """Import hip-python and make the runtime load; raises BackendUnavailable with the reason."""
    try:
        from hip import hip
    except ImportError as exc:
        raise BackendUnavailable("hip-python is not installed: pip install 'vxpu[rocm]'") from exc
    try:
        (err,) = hip.hipInit(0)
    except Exception as exc:  # RuntimeError: failed to dlopen libamdhip64.so
        raise BackendUnavailable(f"HIP runtime not loadable ({exc}); install ROCm (libamdhip64.so)") from exc
    if err:
        raise BackendUnavailable("hipInit failed: no usable AMD GPU", vendor=err.name)
    return hip


class _Current(threading.local):
    """The HIP backend whose device this thread has selected (``None``: none yet)."""

    backend: object = None


_current = _Current()


class HipBackend:
    """One AMD GPU. Construct with the device ordinal, then :meth:`open`. See the module doc:
    **not yet run on AMD hardware.**"""

    name = "hip"

    def __init__(self, device_index: int = 0, *, compile_cache: Any = None, opt_level: int | str = 3) -> None:
        self.index = int(device_index)
        self.stats = BackendStats()
        self._compile_cache = resolve_cache(compile_cache)
        self._opt_level = int(opt_level)
        self._hip: Any = None
        self._open = False
        self._generation = 0
        self._props: DeviceProperties | None = None
        self._allocs: dict[int, int] = {}
        self._modules: set[GpuModule] = set()
        self._queues: set[GpuQueue] = set()
        self._events: set[GpuEvent] = set()
        self._hosts: set[HostRegistration] = set()
        self._lock = threading.RLock()
        self._ro_register = False
        self.pci_bus_id = ""
        self.lost: str | None = None

    # -- life cycle -----------------------------------------------------------------------
    def open(self) -> None:
        """Load the HIP runtime, select the device, read its properties.

        Raises:
            BackendUnavailable: no hip-python, no libamdhip64.so, no GPU or no such device.
        """
        if self._open:
            return
        hip = _load_hip()
        err, count = hip.hipGetDeviceCount()
        if err or not 0 <= self.index < count:
            raise BackendUnavailable(f"HIP device {self.index} does not exist ({0 if err else count} present)")
        self._hip = hip
        self._open = True
        self._bind()
        self._props = self._read_properties()
        log.info("opened HIP device %d: %s (%s)", self.index, self._props.name, self._props.architecture)

    def close(self) -> None:
        """Free everything this backend created (idempotent)."""
        with self._lock:
            if not self._open:
                return
            self._bind()
            self._destroy_all()
            for reg in list(self._hosts):
                self._unpin(reg)
                reg.released = True
            self._hosts.clear()
            self._open = False
            _current.backend = None
            self._generation += 1

    def properties(self) -> DeviceProperties:
        """Static device facts. Raises UNAVAILABLE before :meth:`open`."""
        if self._props is None:
            raise BackendError(Status.UNAVAILABLE, "HIP backend is not open")
        return self._props

    def memory_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes of device memory."""
        self._ensure()
        err, free, total = self._hip.hipMemGetInfo()
        self._check(err, "hipMemGetInfo")
        return int(free), int(total)

    def reset(self) -> None:
        """Drop all device state (``hipDeviceReset``); registered host memory is re-pinned.
        Raises DEVICE_LOST if the device cannot be used again."""
        with self._lock:
            self._ensure()
            self._destroy_all()
            self._hard_reset()

    # -- memory ---------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """Allocate ``size`` bytes; returns the device address. Raises OUT_OF_MEMORY."""
        self._ensure()
        if not 0 < size < 1 << 48:
            raise BackendError(Status.INVALID_ARGUMENT, f"allocation size {size} out of range")
        err, ptr = self._hip.hipMalloc(size)
        self._check(err, f"hipMalloc({size})")
        address = as_address(ptr)
        self._allocs[address] = size
        return address

    def free(self, address: int) -> None:
        """Free an allocation. Raises INVALID_HANDLE for an unknown address."""
        self._ensure()
        if self._allocs.pop(address, None) is None:
            raise BackendError(Status.INVALID_HANDLE, f"no device allocation at {address:#x}")
        (err,) = self._hip.hipFree(address)
        self._check(err, "hipFree")

    def memset(self, address: int, value: int, size: int, queue: object | None = None) -> None:
        """Fill ``size`` bytes with the byte ``value``, ordered on ``queue``."""
        self._ensure()
        if not 0 <= value <= 0xFF:
            raise BackendError(Status.INVALID_ARGUMENT, f"memset value {value} is not a byte")
        try:
            (err,) = self._hip.hipMemsetD8Async(address, value, size, self._stream(queue))
        except (TypeError, OverflowError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad memset {address!r}+{size!r}: {exc}") from exc
        self._check(err, "hipMemsetD8Async")

    def copy_htod(self, dst: int, src: memoryview, queue: object | None = None) -> None:
        """Copy ``src`` to ``dst``; synchronous when ``queue`` is ``None``."""
        self._ensure()
        try:
            n = src.nbytes
            if queue is None:
                (err,) = self._hip.hipMemcpyHtoD(dst, src, n)
            else:
                (err,) = self._hip.hipMemcpyHtoDAsync(dst, src, n, self._stream(queue))
        except (BufferError, TypeError, OverflowError, RuntimeError, AttributeError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad host buffer for copy_htod: {exc}") from exc
        self._check(err, "hipMemcpyHtoD")
        self.stats.bytes_htod += n

    def copy_dtoh(self, dst: memoryview, src: int, queue: object | None = None) -> None:
        """Copy device memory at ``src`` into ``dst``; synchronous when ``queue`` is ``None``."""
        self._ensure()
        try:
            n = dst.nbytes
            if dst.readonly:
                raise BackendError(Status.INVALID_ARGUMENT, "copy_dtoh destination is read-only")
            if queue is None:
                (err,) = self._hip.hipMemcpyDtoH(dst, src, n)
            else:
                (err,) = self._hip.hipMemcpyDtoHAsync(dst, src, n, self._stream(queue))
        except (BufferError, TypeError, OverflowError, RuntimeError, AttributeError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad host buffer for copy_dtoh: {exc}") from exc
        self._check(err, "hipMemcpyDtoH")
        self.stats.bytes_dtoh += n

    def copy_dtod(self, dst: int, src: int, size: int, queue: object | None = None) -> None:
        """Copy ``size`` bytes between device addresses, ordered on ``queue``."""
        self._ensure()
        try:
            (err,) = self._hip.hipMemcpyDtoDAsync(dst, src, size, self._stream(queue))
        except (TypeError, OverflowError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad copy_dtod of {size!r} bytes: {exc}") from exc
        self._check(err, "hipMemcpyDtoDAsync")
        self.stats.bytes_dtod += size

    def register_host(self, view: memoryview, read_only: bool = False) -> object:
        """Pin a host region with ``hipHostRegister``; a refusal leaves it pageable (``pinned=False``)."""
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
        """Undo :meth:`register_host` before the memory is unmapped. Raises INVALID_HANDLE."""
        if token is None:
            return
        with self._lock:
            if not isinstance(token, HostRegistration) or token not in self._hosts:
                raise BackendError(Status.INVALID_HANDLE, "unknown or already released host registration")
            self._hosts.discard(token)
            if self._open:
                self._bind()
                self._unpin(token)
            token.released = True

    # -- code -----------------------------------------------------------------------------
    def load_module(self, image: bytes, kind: ModuleKind = ModuleKind.IR) -> object:
        """Load an IR module (compiled to hsaco for this gfx arch) or a native hsaco.

        Raises:
            BackendError: BAD_MODULE (with the log), UNSUPPORTED for PTX/CUBIN/ONNX.
        """
        self._ensure()
        if kind is ModuleKind.IR:
            data, signatures, hit = compile_ir(bytes(image), "amdgpu", self.properties().architecture,
                                               self._opt_level, self._compile_cache)
            if hit:
                self.stats.compile_cache_hits += 1
            else:
                self.stats.compile_cache_misses += 1
        elif kind is ModuleKind.HSACO:
            data = bytes(image)
            signatures = native_hsaco_layouts(data)
        else:
            raise BackendError(Status.UNSUPPORTED, f"the HIP backend does not load {kind.value} modules")
        err, handle = self._hip.hipModuleLoadData(data)
        if err:
            status = status_for_hip_error(err.name)
            if status in (Status.KERNEL_FAULT, Status.DEVICE_LOST, Status.OUT_OF_MEMORY):
                self._raise(err, "hipModuleLoadData")
            raise BackendError(Status.BAD_MODULE, "code object failed to load", vendor=err.name)
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
        (err,) = self._hip.hipModuleUnload(module.handle)
        self._check(err, "hipModuleUnload")

    def get_kernel(self, module: object, name: str) -> tuple[object, KernelInfo]:
        """Look up ``name``; raises NOT_FOUND (also for a kernel the metadata does not describe)."""
        self._ensure()
        check_handle(module, GpuModule, self._generation, "module")
        assert isinstance(module, GpuModule)
        cached = module.kernels.get(name)
        if cached is not None and cached.info is not None:
            return cached, cached.info
        info = module.signatures.get(name)
        if info is None:
            raise BackendError(Status.NOT_FOUND, f"no kernel {name!r} in the module")
        err, func = self._hip.hipModuleGetFunction(module.handle, name.encode())
        if err:
            if status_for_hip_error(err.name) in (Status.NOT_FOUND, Status.INVALID_ARGUMENT):
                raise BackendError(Status.NOT_FOUND, f"no kernel {name!r} in the module", vendor=err.name)
            self._raise(err, "hipModuleGetFunction")
        kernel = GpuKernel(self._generation, handle=func, module=module, info=info, pack=HipArgPack(info))
        module.kernels[name] = kernel
        return kernel, info

    def launch(self, kernel: object, grid: tuple[int, int, int], block: tuple[int, int, int],
               args: bytes | memoryview, shared_bytes: int = 0, queue: object | None = None) -> None:
        """Launch asynchronously with the packed ``args`` (through ``extra``).

        Raises:
            BackendError: INVALID_HANDLE, INVALID_ARGUMENT, KERNEL_FAULT/DEVICE_LOST.
        """
        if _current.backend is not self:
            self._ensure()
        if kernel.__class__ is not GpuKernel or kernel.generation != self._generation:  # type: ignore[attr-defined]
            check_handle(kernel, GpuKernel, self._generation, "kernel")
        stream = self._stream(queue)
        pack = kernel.pack  # type: ignore[attr-defined]
        try:
            gx, gy, gz = grid
            bx, by, bz = block
            pack.view[:] = args
            (err,) = self._hip.hipModuleLaunchKernel(kernel.handle,  # type: ignore[attr-defined]
                                                     gx, gy, gz, bx, by, bz, shared_bytes,
                                                     stream, None, pack.extra_address)
        except (ValueError, TypeError, OverflowError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"bad launch of {pack.info.name!r}: {exc}") from exc
        if err:
            self._raise(err, f"launch of {pack.info.name!r}")
        self.stats.launches += 1

    # -- ordering -------------------------------------------------------------------------
    def create_queue(self) -> object:
        """Create a non-blocking stream."""
        self._ensure()
        err, stream = self._hip.hipStreamCreateWithFlags(self._hip.hipStreamNonBlocking)
        self._check(err, "hipStreamCreateWithFlags")
        queue = GpuQueue(self._generation, handle=stream)
        with self._lock:
            self._queues.add(queue)
        return queue

    def destroy_queue(self, queue: object) -> None:
        """Destroy a stream. Raises INVALID_HANDLE."""
        self._ensure()
        check_handle(queue, GpuQueue, self._generation, "queue")
        with self._lock:
            self._queues.discard(queue)  # type: ignore[arg-type]
            queue.invalidate()  # type: ignore[attr-defined]
        (err,) = self._hip.hipStreamDestroy(queue.handle)  # type: ignore[attr-defined]
        self._check(err, "hipStreamDestroy")

    def create_event(self) -> object:
        """Create a timing event."""
        self._ensure()
        err, event = self._hip.hipEventCreate()
        self._check(err, "hipEventCreate")
        ev = GpuEvent(self._generation, handle=event)
        with self._lock:
            self._events.add(ev)
        return ev

    def destroy_event(self, event: object) -> None:
        """Destroy an event. Raises INVALID_HANDLE."""
        self._ensure()
        check_handle(event, GpuEvent, self._generation, "event")
        with self._lock:
            self._events.discard(event)  # type: ignore[arg-type]
            event.invalidate()  # type: ignore[attr-defined]
        (err,) = self._hip.hipEventDestroy(event.handle)  # type: ignore[attr-defined]
        self._check(err, "hipEventDestroy")

    def record_event(self, event: object, queue: object | None = None) -> None:
        """Record ``event`` on ``queue``."""
        self._ensure()
        check_handle(event, GpuEvent, self._generation, "event")
        (err,) = self._hip.hipEventRecord(event.handle, self._stream(queue))  # type: ignore[attr-defined]
        self._check(err, "hipEventRecord")

    def event_elapsed_ms(self, start: object, end: object) -> float:
        """Milliseconds between two completed events; INVALID_ARGUMENT if not complete."""
        self._ensure()
        check_handle(start, GpuEvent, self._generation, "event")
        check_handle(end, GpuEvent, self._generation, "event")
        err, ms = self._hip.hipEventElapsedTime(start.handle, end.handle)  # type: ignore[attr-defined]
        self._check(err, "hipEventElapsedTime (are both events recorded and complete?)")
        return float(ms)

    def synchronize(self, queue: object | None = None) -> None:
        """Wait for ``queue`` or the whole device. Raises KERNEL_FAULT after a fault."""
        self._ensure()
        if queue is None:
            (err,) = self._hip.hipDeviceSynchronize()
        else:
            (err,) = self._hip.hipStreamSynchronize(self._stream(queue))
        self._check(err, "synchronize")

    # -- internals ------------------------------------------------------------------------
    def _ensure(self) -> None:
        if not self._open:
            if self.lost:
                raise BackendError(Status.DEVICE_LOST, self.lost)
            raise BackendError(Status.UNAVAILABLE, "HIP backend is not open (or was closed)")
        if _current.backend is not self:
            self._bind()

    def _bind(self) -> None:
        (err,) = self._hip.hipSetDevice(self.index)
        if err:
            raise BackendError(Status.DEVICE_LOST, f"hipSetDevice({self.index}) failed", vendor=err.name)
        _current.backend = self

    def _stream(self, queue: object | None) -> Any:
        if queue is None:
            return None
        if queue.__class__ is not GpuQueue or queue.generation != self._generation:  # type: ignore[attr-defined]
            check_handle(queue, GpuQueue, self._generation, "queue")
        return queue.handle  # type: ignore[attr-defined]

    def _check(self, err: Any, what: str) -> None:
        if err:
            self._raise(err, what)

    def _raise(self, err: Any, what: str) -> None:
        """Map a failed ``hipError_t``; after a fault reset the device first (or mark it lost)."""
        name = getattr(err, "name", str(err))
        status = status_for_hip_error(name)
        if status in (Status.KERNEL_FAULT, Status.DEVICE_LOST):
            self.stats.faults += 1
            log.warning("HIP device %d: %s during %s; resetting the device", self.index, name, what)
            try:
                with self._lock:
                    self._destroy_all()
                    self._hard_reset()
            except BackendError as exc:
                self.lost = f"{name} during {what} left the HIP runtime unusable ({exc}); restart the server"
                log.error("HIP device %d: %s", self.index, self.lost)
                raise BackendError(Status.DEVICE_LOST, self.lost, vendor=name) from None
            raise BackendError(status, f"{what} failed; the device was reset", vendor=name)
        raise BackendError(status, f"{what} failed", vendor=name)

    def _hard_reset(self) -> None:
        hip = self._hip
        for reg in self._hosts:
            reg.pinned = False
        (err,) = hip.hipDeviceReset()
        self._generation += 1
        _current.backend = None
        if not err:
            (err,) = hip.hipSetDevice(self.index)
        if not err:
            (err,) = hip.hipDeviceSynchronize()
        if err:
            self._open = False
            raise BackendError(Status.DEVICE_LOST, "HIP device could not be reset", vendor=err.name)
        _current.backend = self
        self.stats.resets += 1
        for reg in self._hosts:
            self._pin(reg, replay=True)

    def _destroy_all(self) -> None:
        hip = self._hip
        for module in self._modules:
            module.invalidate()
            for kernel in module.kernels.values():
                kernel.invalidate()
            hip.hipModuleUnload(module.handle)
        for queue in self._queues:
            queue.invalidate()
            hip.hipStreamDestroy(queue.handle)
        for event in self._events:
            event.invalidate()
            hip.hipEventDestroy(event.handle)
        for address in self._allocs:
            hip.hipFree(address)
        self._modules.clear()
        self._queues.clear()
        self._events.clear()
        self._allocs.clear()

    def _pin(self, reg: HostRegistration, *, replay: bool = False) -> None:
        hip = self._hip
        flags = int(hip.hipHostRegisterPortable)
        if reg.read_only:
            if not self._ro_register:
                log.info("device cannot pin read-only host memory; a %d-byte region stays pageable", reg.size)
                return
            flags |= int(getattr(hip, "hipHostRegisterReadOnly", HIP_HOST_REGISTER_READ_ONLY))
        (err,) = hip.hipHostRegister(reg.address, reg.size, flags)
        if err:
            if err.name == "hipErrorHostMemoryAlreadyRegistered":
                if replay:
                    reg.pinned = True
                    return
                raise BackendError(Status.INVALID_ARGUMENT, "host region overlaps a registered one", vendor=err.name)
            log.warning("hipHostRegister of %d bytes failed (%s); copies from it will be slower", reg.size, err.name)
            return
        reg.pinned = True

    def _unpin(self, reg: HostRegistration) -> None:
        if reg.pinned:
            (err,) = self._hip.hipHostUnregister(reg.address)
            if err:
                log.warning("hipHostUnregister: %s", err.name)
            reg.pinned = False

    def _read_properties(self) -> DeviceProperties:
        hip = self._hip
        err, props = hip.hipGetDeviceProperties(self.index)
        self._check(err, "hipGetDeviceProperties")
        arch = gfx_arch(props.gcnArchName)
        self._ro_register = bool(getattr(props, "hostRegisterReadOnlySupported", 0))
        err, bus = hip.hipDeviceGetPCIBusId(32, self.index)
        if not err:
            self.pci_bus_id = _c_string(bus).lower()
        name = _c_string(props.name) or "AMD GPU"
        features = {"ir", "hsaco", "atomics-f32", "fp16", "events", "host-register"}
        if self._ro_register:
            features.add("host-register-read-only")
        return DeviceProperties(
            backend="hip", name=name, vendor="amd", architecture=arch,
            memory_total=int(props.totalGlobalMem), compute_units=int(props.multiProcessorCount),
            max_threads_per_block=int(props.maxThreadsPerBlock),
            max_shared_memory_per_block=int(props.sharedMemPerBlock), features=frozenset(features))


def _c_string(value: Any) -> str:
    raw = value if isinstance(value, bytes) else str(value).encode()
    return raw.split(b"\0", 1)[0].decode(errors="replace").strip()


def native_hsaco_layouts(image: bytes) -> dict[str, KernelInfo]:
    """Kernel layouts of a native hsaco (ELF checks and metadata from :mod:`vxpu.ir.lower.toolchain`).

    Raises:
        BackendError: BAD_MODULE for anything that is not a loadable AMDGPU code object.
    """
    from vxpu.accel.hsaco_meta import kernel_layouts
    from vxpu.ir.lower.errors import ToolchainError
    from vxpu.ir.lower.toolchain import check_hsaco

    try:
        info = check_hsaco(image, [])
    except (ToolchainError, ValueError, IndexError, struct.error) as exc:
        raise BackendError(Status.BAD_MODULE, f"not a loadable AMDGPU code object: {exc}") from exc
    return kernel_layouts(info.metadata)


def probe_devices() -> list[dict[str, Any]]:
    """Describe every HIP device without opening a backend; ``[]`` when HIP is unusable. Never raises."""
    try:
        hip = _load_hip()
        err, count = hip.hipGetDeviceCount()
        out: list[dict[str, Any]] = []
        for index in range(0 if err else count):
            err, props = hip.hipGetDeviceProperties(index)
            if err:
                continue
            _, bus = hip.hipDeviceGetPCIBusId(32, index)
            out.append({"index": index, "pci_bus_id": _c_string(bus).lower(), "name": _c_string(props.name),
                        "architecture": gfx_arch(props.gcnArchName), "memory_total": int(props.totalGlobalMem)})
        return out
    except Exception as exc:  # noqa: BLE001 - any runtime problem means "no HIP devices"
        log.debug("HIP probe failed: %s", exc)
        return []
