"""CUDA driver facts that need no device: error mapping, PTX ISA limits, nvJitLink, probing.

Kept apart from :mod:`vxpu.accel.cuda` so that enumeration and tests can use them without a
backend, and so that the mapping from ``CUresult`` names to stable :class:`Status` codes is one
table that can be read (and tested) on its own.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from vxpu.accel.backend import BackendError, Status
from vxpu.accel.gpu_common import ErrorMap

log = logging.getLogger(__name__)

# Driver 580 (CUDA 13.0) JITs PTX ISA up to 9.0; newer PTX must become a cubin first.
_DRIVER_PTX_ISA = {13000: (9, 0), 12090: (8, 8), 12080: (8, 7), 12060: (8, 5), 12040: (8, 4)}
#: Size of the error and info log buffers given to the CUDA JIT/linker.
LOG_BYTES = 1 << 16
#: The most kernel parameters the CUDA backend reads back from a loaded function.
MAX_PARAMS = 4096

_KERNEL_FAULT = frozenset({
    "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED", "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION", "CUDA_ERROR_HARDWARE_STACK_ERROR", "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_INVALID_PC", "CUDA_ERROR_LAUNCH_TIMEOUT", "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_TENSOR_MEMORY_LEAK", "CUDA_ERROR_CONTAINED",
})
_DEVICE_LOST = frozenset({
    "CUDA_ERROR_ECC_UNCORRECTABLE", "CUDA_ERROR_NVLINK_UNCORRECTABLE", "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_DEINITIALIZED", "CUDA_ERROR_CONTEXT_IS_DESTROYED",
})
_STATUS_BY_NAME: dict[str, Status] = {
    "CUDA_ERROR_OUT_OF_MEMORY": Status.OUT_OF_MEMORY,
    "CUDA_ERROR_INVALID_VALUE": Status.INVALID_ARGUMENT,
    "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES": Status.INVALID_ARGUMENT,
    "CUDA_ERROR_INVALID_CLUSTER_SIZE": Status.INVALID_ARGUMENT,
    "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE": Status.INVALID_ARGUMENT,
    "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED": Status.INVALID_ARGUMENT,
    "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED": Status.INVALID_HANDLE,
    "CUDA_ERROR_NOT_READY": Status.INVALID_ARGUMENT,
    "CUDA_ERROR_INVALID_HANDLE": Status.INVALID_HANDLE,
    "CUDA_ERROR_INVALID_CONTEXT": Status.INVALID_HANDLE,
    "CUDA_ERROR_NOT_FOUND": Status.NOT_FOUND,
    "CUDA_ERROR_INVALID_IMAGE": Status.BAD_MODULE,
    "CUDA_ERROR_INVALID_PTX": Status.BAD_MODULE,
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION": Status.BAD_MODULE,
    "CUDA_ERROR_NO_BINARY_FOR_GPU": Status.BAD_MODULE,
    "CUDA_ERROR_INVALID_SOURCE": Status.BAD_MODULE,
    "CUDA_ERROR_JIT_COMPILER_NOT_FOUND": Status.BAD_MODULE,
    "CUDA_ERROR_JIT_COMPILATION_DISABLED": Status.BAD_MODULE,
    "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND": Status.BAD_MODULE,
    "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED": Status.BAD_MODULE,
    "CUDA_ERROR_NOT_SUPPORTED": Status.UNSUPPORTED,
    "CUDA_ERROR_NOT_PERMITTED": Status.UNSUPPORTED,
    "CUDA_ERROR_NO_DEVICE": Status.UNAVAILABLE,
    "CUDA_ERROR_INVALID_DEVICE": Status.UNAVAILABLE,
    "CUDA_ERROR_NOT_INITIALIZED": Status.UNAVAILABLE,
    "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH": Status.UNAVAILABLE,
    "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE": Status.UNAVAILABLE,
    "CUDA_ERROR_STUB_LIBRARY": Status.UNAVAILABLE,
    "CUDA_ERROR_TIMEOUT": Status.TIMEOUT,
}


CUDA_ERRORS = ErrorMap(_KERNEL_FAULT, _DEVICE_LOST, _STATUS_BY_NAME)


def status_for_cuda_error(name: str) -> Status:
    """Map a ``CUresult`` name (e.g. ``"CUDA_ERROR_ILLEGAL_ADDRESS"``) to a stable :class:`Status`."""
    return CUDA_ERRORS.status(name)


def ptx_version(ptx: bytes) -> tuple[int, int] | None:
    """The ``.version X.Y`` a PTX text declares, or ``None`` if it declares none."""
    match = re.search(rb"^\s*\.version\s+(\d+)\.(\d+)", ptx[:4096], re.MULTILINE)
    return (int(match.group(1)), int(match.group(2))) if match else None


def max_ptx_isa(driver_version: int) -> tuple[int, int]:
    """The newest PTX ISA a driver of ``cuDriverGetVersion()`` = ``driver_version`` can JIT."""
    best = (8, 0)
    for version, isa in sorted(_DRIVER_PTX_ISA.items()):
        if driver_version >= version:
            best = isa
    return best


def ptx_to_cubin(ptx: bytes, arch: str) -> bytes:
    """Assemble PTX into a cubin for ``arch`` (``"sm_90"``) with nvJitLink.

    Raises:
        BackendError: BAD_MODULE with the ptxas log, or UNAVAILABLE when nvJitLink is missing.
    """
    try:
        from cuda.bindings import nvjitlink
    except ImportError as exc:
        raise BackendError(Status.UNAVAILABLE, "nvJitLink bindings missing: pip install 'vxpu[cuda]'") from exc
    data = ptx.rstrip(b"\0")
    try:
        handle = nvjitlink.create(2, [f"-arch={arch}", "-O3"])
    except Exception as exc:  # DynamicLibNotFoundError and nvJitLinkError alike
        raise BackendError(Status.UNAVAILABLE, f"nvJitLink unusable: {exc}") from exc
    try:
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "module.ptx")
        nvjitlink.complete(handle)
        size = nvjitlink.get_linked_cubin_size(handle)
        cubin = bytearray(size)
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin)
    except Exception as exc:
        text = ""
        try:
            buf = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, buf)
            text = buf.rstrip(b"\0").decode(errors="replace")
        except Exception:  # the log is best effort; the original error is what matters
            log.debug("nvJitLink error log unavailable", exc_info=True)
        raise BackendError(Status.BAD_MODULE, f"nvJitLink could not assemble the PTX: {exc}", log=text) from exc
    finally:
        nvjitlink.destroy(handle)


def probe_devices() -> list[dict[str, Any]]:
    """Describe every CUDA device without opening a backend; ``[]`` when CUDA is unusable.

    Each entry has ``index``, ``pci_bus_id`` (lower-case ``dddd:bb:dd.f``), ``name``,
    ``architecture`` and ``memory_total``. Never raises.
    """
    try:
        from cuda.bindings import driver

        (err,) = driver.cuInit(0)
        if err:
            return []
        err, count = driver.cuDeviceGetCount()
        out: list[dict[str, Any]] = []
        for index in range(count if not err else 0):
            err, dev = driver.cuDeviceGet(index)
            if err:
                continue
            _, bus = driver.cuDeviceGetPCIBusId(32, dev)
            _, raw = driver.cuDeviceGetName(256, dev)
            _, major = driver.cuDeviceGetAttribute(
                driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
            _, minor = driver.cuDeviceGetAttribute(
                driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
            _, total = driver.cuDeviceTotalMem(dev)
            out.append({
                "index": index,
                "pci_bus_id": bytes(bus).split(b"\0", 1)[0].decode().lower(),
                "name": bytes(raw).split(b"\0", 1)[0].decode(errors="replace"),
                "architecture": f"sm_{major}{minor}",
                "memory_total": int(total),
            })
        return out
    except Exception as exc:  # noqa: BLE001 - any runtime problem means "no CUDA devices"
        log.debug("CUDA probe failed: %s", exc)
        return []
