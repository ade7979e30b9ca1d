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
* IR kernels are compiled checked (docs/ir-lowering.md §7): their bad accesses are contained
  and reported at ``synchronize`` with a fault record, without a reset (feature ``checked-ir``).
* A kernel fault of native code resets the device (``hipDeviceReset``); if the runtime cannot be used again in
  this process the backend reports ``DEVICE_LOST`` and sets :attr:`HipBackend.lost`.
"""

from __future__ import annotations

import ctypes
import logging
import struct
from typing import Any

from vxpu.accel.backend import BackendError, BackendUnavailable, DeviceProperties, KernelInfo, ModuleKind
from vxpu.accel.gpu_common import ArgPack, ErrorMap
from vxpu.accel.gpu_ir import compile_ir
from vxpu.accel.gpubase import CurrentSlot, GpuBackend

from vxpu.abi.status import Status

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
# Every other hipError_t name vxpu knows, grouped by the Status it maps to.
_NAMES_BY_STATUS: dict[Status, tuple[str, ...]] = {
    Status.OUT_OF_MEMORY: ("hipErrorOutOfMemory", "hipErrorMemoryAllocation"),
    Status.INVALID_ARGUMENT: ("hipErrorInvalidValue", "hipErrorInvalidConfiguration", "hipErrorLaunchOutOfResources",
                              "hipErrorCooperativeLaunchTooLarge", "hipErrorHostMemoryAlreadyRegistered",
                              "hipErrorNotReady"),
    Status.INVALID_HANDLE: ("hipErrorHostMemoryNotRegistered", "hipErrorInvalidHandle",
                            "hipErrorInvalidResourceHandle", "hipErrorInvalidContext"),
    Status.NOT_FOUND: ("hipErrorNotFound", "hipErrorInvalidSymbol", "hipErrorInvalidDeviceFunction"),
    Status.BAD_MODULE: ("hipErrorInvalidImage", "hipErrorInvalidKernelFile", "hipErrorNoBinaryForGpu",
                        "hipErrorInvalidSource", "hipErrorSharedObjectSymbolNotFound",
                        "hipErrorSharedObjectInitFailed"),
    Status.UNSUPPORTED: ("hipErrorNotSupported",),
    Status.UNAVAILABLE: ("hipErrorNoDevice", "hipErrorInvalidDevice", "hipErrorNotInitialized",
                         "hipErrorInsufficientDriver", "hipErrorInitializationError"),
}
_STATUS_BY_NAME = {name: status for status, names in _NAMES_BY_STATUS.items() for name in names}


HIP_ERRORS = ErrorMap(_KERNEL_FAULT, _DEVICE_LOST, _STATUS_BY_NAME)


def status_for_hip_error(name: str) -> Status:
    """Map a ``hipError_t`` name (e.g. ``"hipErrorIllegalAddress"``) to a stable :class:`Status`."""
    return HIP_ERRORS.status(name)


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


_current = CurrentSlot()  # the HIP backend whose device this thread has selected


class HipBackend(GpuBackend):
    """One AMD GPU. Construct with the device ordinal, then :meth:`open`. See the module doc:
    **not yet run on AMD hardware.**"""

    name = "hip"
    vendor = "HIP"
    reset_what = "device"
    already_registered = "hipErrorHostMemoryAlreadyRegistered"
    errors = HIP_ERRORS
    copy_errors = (BufferError, TypeError, OverflowError, RuntimeError, AttributeError)

    def __init__(self, device_index: int = 0, *, compile_cache: Any = None, opt_level: int | str = 3) -> None:
        super().__init__(device_index, compile_cache=compile_cache, opt_level=opt_level)
        self._hip: Any = None
        self._open = False

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
        self._ops = _runtime_ops(hip, self._malloc, self._host_register)
        self._open = True
        self._bind()
        self._props = self._read_properties()
        log.info("opened HIP device %d: %s (%s)", self.index, self._props.name, self._props.architecture)

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
            self._count_compile(hit)
        elif kind is ModuleKind.HSACO:
            data = bytes(image)
            signatures = native_hsaco_layouts(data)
        else:
            raise BackendError(Status.UNSUPPORTED, f"the HIP backend does not load {kind.value} modules")
        err, handle = self._hip.hipModuleLoadData(data)
        if err:
            status = HIP_ERRORS.status(err.name)
            if status in (Status.KERNEL_FAULT, Status.DEVICE_LOST, Status.OUT_OF_MEMORY):
                self._raise(err, "hipModuleLoadData")
            raise BackendError(Status.BAD_MODULE, "code object failed to load", vendor=err.name)
        return self._add_module(handle, signatures)

    def get_kernel(self, module: object, name: str) -> tuple[object, KernelInfo]:
        """Look up ``name``; raises NOT_FOUND (also for a kernel the metadata does not describe)."""
        module, cached = self._lookup(module, name)
        if cached is not None and cached.info is not None:
            return cached, cached.info
        info = module.signatures.get(name)
        if info is None:
            raise BackendError(Status.NOT_FOUND, f"no kernel {name!r} in the module")
        err, func = self._hip.hipModuleGetFunction(module.handle, name.encode())
        if err:
            if HIP_ERRORS.status(err.name) in (Status.NOT_FOUND, Status.INVALID_ARGUMENT):
                raise BackendError(Status.NOT_FOUND, f"no kernel {name!r} in the module", vendor=err.name)
            self._raise(err, "hipModuleGetFunction")
        return self._add_kernel(module, name, func, info, HipArgPack(info))

    # -- the vendor side of GpuBackend -----------------------------------------------------
    def _is_open(self) -> bool:
        return self._open

    def _is_current(self) -> bool:
        return _current.token is self

    def _bind(self) -> None:
        (err,) = self._hip.hipSetDevice(self.index)
        if err:
            raise BackendError(Status.DEVICE_LOST, f"hipSetDevice({self.index}) failed", vendor=err.name)
        _current.token = self

    def _release(self) -> None:
        self._open = False
        _current.token = None

    def _malloc(self, size: int) -> tuple[Any, int]:
        err, ptr = self._hip.hipMalloc(size)
        return err, 0 if err else as_address(ptr)

    def _drv_launch(self, handle: Any, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                    shared_bytes: int, stream: Any, pack: Any) -> tuple[Any, ...]:
        return self._hip.hipModuleLaunchKernel(handle, gx, gy, gz, bx, by, bz, shared_bytes, stream, None,
                                               pack.extra_address)

    def _host_register(self, address: int, size: int, read_only: bool) -> tuple[Any, ...]:
        hip = self._hip
        flags = int(hip.hipHostRegisterPortable)
        if read_only:
            flags |= int(getattr(hip, "hipHostRegisterReadOnly", HIP_HOST_REGISTER_READ_ONLY))
        return hip.hipHostRegister(address, size, flags)

    def _lost_reason(self, name: str, what: str, exc: BackendError) -> str:
        return f"{name} during {what} left the HIP runtime unusable ({exc}); restart the server"

    def _hard_reset(self) -> None:
        hip = self._hip
        self._before_reset()
        (err,) = hip.hipDeviceReset()
        self._generation += 1
        _current.token = None
        if not err:
            (err,) = hip.hipSetDevice(self.index)
        if not err:
            (err,) = hip.hipDeviceSynchronize()
        if err:
            self._open = False
            raise BackendError(Status.DEVICE_LOST, "HIP device could not be reset", vendor=err.name)
        _current.token = self
        self._after_reset()

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
        features = {"ir", "hsaco", "atomics-f32", "fp16", "events", "host-register", "checked-ir"}
        if self._ro_register:
            features.add("host-register-read-only")
        return DeviceProperties(
            backend="hip", name=name, vendor="amd", architecture=arch,
            memory_total=int(props.totalGlobalMem), compute_units=int(props.multiProcessorCount),
            max_threads_per_block=int(props.maxThreadsPerBlock),
            max_shared_memory_per_block=int(props.sharedMemPerBlock), features=frozenset(features))



def _runtime_ops(hip: Any, malloc: Any, host_register: Any) -> dict[str, tuple[str, Any]]:
    """The base's vendor-call table over ``hip.hip``, looked up per call (so a stand-in runtime
    need only have the calls a test makes)."""
    def call(name: str) -> tuple[str, Any]:
        return name, lambda *args: getattr(hip, name)(*args)

    def copy(name: str) -> tuple[str, Any]:  # stream None: the synchronous call
        return name, lambda d, s, n, st: (getattr(hip, name)(d, s, n) if st is None
                                          else getattr(hip, name + "Async")(d, s, n, st))

    ops = {key: call(name) for key, name in (
        ("free", "hipFree"), ("mem_info", "hipMemGetInfo"), ("memset", "hipMemsetD8Async"),
        ("dtod", "hipMemcpyDtoDAsync"), ("module_unload", "hipModuleUnload"), ("stream_destroy", "hipStreamDestroy"),
        ("event_create", "hipEventCreate"), ("event_destroy", "hipEventDestroy"), ("event_record", "hipEventRecord"),
        ("event_elapsed", "hipEventElapsedTime"), ("host_unregister", "hipHostUnregister"),
        ("sync_device", "hipDeviceSynchronize"), ("sync_stream", "hipStreamSynchronize"))}
    ops.update(htod=copy("hipMemcpyHtoD"), dtoh=copy("hipMemcpyDtoH"), malloc=("hipMalloc", malloc),
               host_register=("hipHostRegister", host_register),
               stream_create=("hipStreamCreateWithFlags",
                              lambda: hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking)))
    return ops


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
