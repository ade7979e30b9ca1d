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
* **Checked IR.** IR kernels are compiled checked (docs/ir-lowering.md §7): a bad access or a
  ``trap`` never reaches the driver; it is reported at ``synchronize`` as a contained
  ``KernelFaultError`` with the fault record, and nothing is reset (feature ``checked-ir``).
  What follows applies to native PTX/cubin modules and to driver errors.
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

import ctypes
import dataclasses
import logging
from typing import Any

from vxpu.accel import gpu_checked
from vxpu.accel.backend import BackendError, BackendUnavailable, DeviceProperties, KernelInfo, ModuleKind
from vxpu.accel.cuda_util import CUDA_ERRORS, LOG_BYTES, MAX_PARAMS, max_ptx_isa, ptx_to_cubin
from vxpu.accel.gpu_common import ArgPack, HostRegistration
from vxpu.accel.gpu_ir import compile_ir
from vxpu.accel.gpubase import UNBOUND, CurrentSlot, GpuBackend

from vxpu.abi.status import Status

log = logging.getLogger(__name__)

_current = CurrentSlot()  # the CUDA context this thread has made current through a backend


class CudaBackend(GpuBackend):
    """One NVIDIA GPU. Construct with the device ordinal, then :meth:`open`.

    Args:
        device_index: CUDA device ordinal.
        compile_cache: passed to :func:`vxpu.ir.compile.compile_module` (``None``: its default).
        opt_level: LLVM optimisation level for IR modules.
    """

    name = "cuda"
    vendor = "CUDA"
    already_registered = "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"
    errors = CUDA_ERRORS
    launch_errors = (ValueError, TypeError, OverflowError, IndexError)

    def __init__(self, device_index: int = 0, *, compile_cache: Any = None, opt_level: int | str = 3) -> None:
        super().__init__(device_index, compile_cache=compile_cache, opt_level=opt_level)
        self._drv: Any = None
        self._cuMemcpyHtoD: Any = None
        self._cuMemcpyDtoH: Any = None
        self._cuMemcpyHtoDAsync: Any = None
        self._cuMemcpyDtoHAsync: Any = None
        self._cuLaunchKernel: Any = None
        self._dev: Any = None
        self._ctx: Any = None
        self.driver_version = 0

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
        for fn in ("cuMemcpyHtoD", "cuMemcpyDtoH", "cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync", "cuLaunchKernel"):
            setattr(self, f"_{fn}", getattr(driver, fn))
        self._ops = self._driver_ops(driver)
        err, count = driver.cuDeviceGetCount()
        if err or not 0 <= self.index < count:
            raise BackendUnavailable(f"CUDA device {self.index} does not exist ({count if not err else 0} present)")
        err, self._dev = driver.cuDeviceGet(self.index)
        self._check(err, "cuDeviceGet")
        self._default_stream = driver.CUstream(0)
        self._retain()
        self._props = self._read_properties()
        log.info("opened CUDA device %d: %s (%s, %d MiB, driver %d)", self.index, self._props.name,
                 self._props.architecture, self._props.memory_total >> 20, self.driver_version)

    def _driver_ops(self, drv: Any) -> dict[str, tuple[str, Any]]:
        """The base's vendor-call table over ``cuda.bindings.driver``."""
        htod, dtoh, htod_async, dtoh_async = (self._cuMemcpyHtoD, self._cuMemcpyDtoH, self._cuMemcpyHtoDAsync,
                                              self._cuMemcpyDtoHAsync)
        return {
            "malloc": ("cuMemAlloc", self._malloc), "free": ("cuMemFree", drv.cuMemFree),
            "mem_info": ("cuMemGetInfo", drv.cuMemGetInfo), "memset": ("cuMemsetD8Async", drv.cuMemsetD8Async),
            "htod": ("cuMemcpyHtoD", lambda d, s, n, st: htod(d, s, n) if st is None else htod_async(d, s, n, st)),
            "dtoh": ("cuMemcpyDtoH", lambda d, s, n, st: dtoh(d, s, n) if st is None else dtoh_async(d, s, n, st)),
            "dtod": ("cuMemcpyDtoDAsync", drv.cuMemcpyDtoDAsync),
            "module_unload": ("cuModuleUnload", drv.cuModuleUnload),
            "stream_create": ("cuStreamCreate",
                              lambda: drv.cuStreamCreate(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)),
            "stream_destroy": ("cuStreamDestroy", drv.cuStreamDestroy),
            "event_create": ("cuEventCreate", lambda: drv.cuEventCreate(drv.CUevent_flags.CU_EVENT_DEFAULT)),
            "event_destroy": ("cuEventDestroy", drv.cuEventDestroy),
            "event_record": ("cuEventRecord", drv.cuEventRecord),
            "event_elapsed": ("cuEventElapsedTime", drv.cuEventElapsedTime),
            "host_register": ("cuMemHostRegister", self._host_register),
            "host_unregister": ("cuMemHostUnregister", drv.cuMemHostUnregister),
            "sync_device": ("cuCtxSynchronize", drv.cuCtxSynchronize),
            "sync_stream": ("cuStreamSynchronize", drv.cuStreamSynchronize),
            "host_alloc": ("cuMemAllocHost", self._host_alloc), "host_free": ("cuMemFreeHost", drv.cuMemFreeHost),
            "host_alloc_mapped": ("cuMemHostAlloc", self._host_alloc_mapped),
        }

    # -- memory ---------------------------------------------------------------------------
    def copy_htod_address(self, dst: int, host: int, size: int, queue: object | None = None) -> None:
        """Like :meth:`copy_htod`, from the host address ``host`` instead of a memoryview.

        The fast path for callers that translate guest-physical addresses to host addresses
        themselves (saves the buffer-protocol round trip, ≈0.4 µs per call). ``[host, host+size)``
        must lie inside one region given to :meth:`register_host` (whose token keeps it mapped).

        Raises:
            BackendError: OUT_OF_RANGE outside every registered region; as :meth:`copy_htod`.
        """
        if _current.token is not self._ctx:
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
        if _current.token is not self._ctx:
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

    def native_driver(self) -> dict[str, int] | None:
        """libcuda's entry points for the device model's native fast lane: ``cuLaunchKernel``,
        ``cuMemcpyHtoDAsync_v2``, ``cuMemcpyDtoHAsync_v2``, ``cuCtxSynchronize``, ``cuStreamQuery``
        (the library cuda.bindings loaded: the same context). None when libcuda cannot be opened
        here."""
        names = {"launch": "cuLaunchKernel", "htod": "cuMemcpyHtoDAsync_v2", "dtoh": "cuMemcpyDtoHAsync_v2",
                 "sync": "cuCtxSynchronize", "query": "cuStreamQuery"}
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            table = {key: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for key, name in names.items()}
        except (OSError, AttributeError) as exc:
            log.info("no native driver entry points: %s", exc)
            return None
        return {key: int(addr) for key, addr in table.items() if addr} if all(table.values()) else None

    def native_pointer(self, handle: Any) -> int:
        """The raw ``CUfunction``/``CUstream`` of a cuda.bindings handle."""
        try:
            return int(handle)
        except TypeError:                   # a binding without __int__: read the stored pointer
            return int(ctypes.c_void_p.from_address(int(handle.getPtr())).value or 0)

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
        return self._add_module(handle, signatures)

    def get_kernel(self, module: object, name: str) -> tuple[object, KernelInfo]:
        """Look up kernel ``name``; builds its launch facts and preallocated arguments once.

        Raises:
            BackendError: NOT_FOUND when the module has no such kernel; INVALID_HANDLE.
        """
        module, cached = self._lookup(module, name)
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
        return self._add_kernel(module, name, func, info, ArgPack(info))

    # -- the vendor side of GpuBackend -----------------------------------------------------
    def _is_open(self) -> bool:
        return self._ctx is not None

    def _is_current(self) -> bool:
        return _current.token is self._ctx

    def _ensure(self) -> None:
        """Make this backend's context current in the calling thread (cheap when it is)."""
        if self._ctx is None:
            if self.lost:
                raise BackendError(Status.DEVICE_LOST, self.lost)
            raise BackendError(Status.UNAVAILABLE, "CUDA backend is not open (or was closed)")
        if _current.token is not self._ctx:
            self._bind()

    def _bind(self) -> None:
        (err,) = self._drv.cuCtxSetCurrent(self._ctx)
        if err:
            raise BackendError(Status.DEVICE_LOST, "cannot make the CUDA context current", vendor=err.name)
        _current.token = self._ctx

    def _release(self) -> None:
        self._drv.cuDevicePrimaryCtxRelease(self._dev)
        self._ctx = None
        _current.token = UNBOUND
    def _retain(self) -> None:
        err, ctx = self._drv.cuDevicePrimaryCtxRetain(self._dev)
        if err:
            raise BackendUnavailable("cannot retain the CUDA primary context", vendor=err.name)
        self._ctx = ctx
        self._bind()

    def _malloc(self, size: int) -> tuple[Any, int]:
        err, dptr = self._drv.cuMemAlloc(size)
        return err, 0 if err else int(dptr)

    def _host_alloc(self, size: int) -> tuple[Any, int]:
        err, ptr = self._drv.cuMemAllocHost(size)
        return err, 0 if err else int(ptr)

    def _host_alloc_mapped(self, size: int) -> tuple[Any, int, int]:
        """Pinned host memory mapped into the device: ``(err, host address, device address)``."""
        drv = self._drv
        err, ptr = drv.cuMemHostAlloc(size, drv.CU_MEMHOSTALLOC_DEVICEMAP)
        if err:
            return err, 0, 0
        err, dptr = drv.cuMemHostGetDevicePointer(ptr, 0)
        if err:
            drv.cuMemFreeHost(ptr)
            return err, 0, 0
        return err, int(ptr), int(dptr)

    def _drv_launch(self, handle: Any, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                    shared_bytes: int, stream: Any, pack: Any) -> tuple[Any, ...]:
        return self._cuLaunchKernel(handle, gx, gy, gz, bx, by, bz, shared_bytes, stream, pack.params_address, 0)

    def _host_register(self, address: int, size: int, read_only: bool) -> tuple[Any, ...]:
        drv = self._drv
        flags = drv.CU_MEMHOSTREGISTER_PORTABLE
        if read_only:
            flags |= drv.CU_MEMHOSTREGISTER_READ_ONLY
        return drv.cuMemHostRegister(address, size, flags)

    def _lost_reason(self, name: str, what: str, exc: BackendError) -> str:
        return f"{name} during {what} poisoned the CUDA driver for this process ({exc}); restart the server process"

    def _hard_reset(self) -> None:
        """Reset the primary context, retain it again, check it works and re-pin host memory.

        Raises:
            BackendError: DEVICE_LOST when no working context can be made (the backend is closed).
        """
        drv = self._drv
        self._before_reset()
        (err,) = drv.cuDevicePrimaryCtxReset(self._dev)
        if err:
            log.warning("cuDevicePrimaryCtxReset: %s", err.name)
        drv.cuDevicePrimaryCtxRelease(self._dev)
        self._generation += 1
        _current.token = UNBOUND
        self._ctx = None
        err, ctx = drv.cuDevicePrimaryCtxRetain(self._dev)
        if not err:
            self._ctx = ctx
            (err,) = drv.cuCtxSetCurrent(ctx)
            if not err:
                _current.token = ctx
                (err,) = drv.cuCtxSynchronize()  # a poisoned driver fails even on a fresh context
        if err:
            if self._ctx is not None:
                drv.cuDevicePrimaryCtxRelease(self._dev)
                self._ctx = None
                _current.token = UNBOUND
            raise BackendError(Status.DEVICE_LOST, "CUDA context could not be re-created", vendor=err.name)
        self._after_reset()

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
            status = CUDA_ERRORS.status(err.name)
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
        self._count_compile(hit)
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
            return dataclasses.replace(signature, static_shared_bytes=shared)
        total = max((o + s for o, s in zip(offsets, sizes)), default=0)
        info = KernelInfo(name, tuple(sizes), tuple(offsets), total, shared)
        if signature is not None and signature.checked:   # IR params, then the hidden ones
            full = gpu_checked.launch_info(signature)
            if (full.param_sizes, full.param_offsets) != (info.param_sizes, info.param_offsets):
                raise BackendError(Status.BAD_MODULE, f"kernel {name!r}: compiled layout differs from the IR "
                                   "signature with its bounds arguments")
            return dataclasses.replace(signature, static_shared_bytes=shared)
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
        # "checked-ir": IR kernels check every access against its own buffer (contained
        # KERNEL_FAULT with a fault record); "sticky-faults" is left to native PTX/cubin.
        features = {"ir", "ptx", "cubin", "atomics-f32", "fp16", "events", "host-register", "sticky-faults",
                    "checked-ir"}
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
