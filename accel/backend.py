"""The Backend interface: what every accelerator (CPU, CUDA, HIP, NPU) provides to vxpu.

A backend is the thin, vendor-specific layer: it talks to one device through its runtime and
speaks in raw device addresses. Everything that must be the same for all backends lives above
it, in :mod:`vxpu.accel.session` (per-client handle tables, quotas, range checks, statistics)
and :mod:`vxpu.accel.pool` (sub-allocation from large device allocations). The device model
(``vxpu.vfio_server``) only ever talks to a ``Session``, never to a backend directly.

Contract:

* Every method may raise :class:`BackendError` with a stable :class:`Status`; nothing else
  escapes (vendor exceptions are mapped). A backend never trusts its caller less than the
  session does: the session has already bounds-checked every range and handle.
* Device addresses are plain ``int``. On GPUs they are real device virtual addresses. On the
  CPU backend they are offsets into a sandboxed arena, and JIT-compiled kernels bounds-check
  every access against it (a guest kernel can never touch server memory).
* Host memory is passed as a writable or read-only :class:`memoryview` (typically a slice of a
  DMA-mapped guest RAM region). Backends copy directly from/to it (zero-copy when registered).
* ``queue`` is a backend queue handle from :meth:`Backend.create_queue`, or ``None`` for the
  backend's default, ordered queue. Operations on one queue run in submission order.
* After :attr:`Status.KERNEL_FAULT` the backend has already reset its context (all device
  allocations, modules, queues and events are gone) and keeps serving; the session invalidates
  the client's handles. **Except** a :class:`KernelFaultError` with ``context_kept``: a
  *checked* IR kernel (every access checked against its own buffer, see docs/ir-lowering.md)
  stopped at a bad access before performing it and recorded a :class:`FaultRecord`; nothing
  was corrupted, so the context, every allocation and every handle stay valid and the next
  launch works.
* **Bounds.** A checked IR kernel (``KernelInfo.checked``) takes, at launch, one
  ``(base, length)`` pair per pointer parameter (``KernelInfo.pointer_params``): the buffer
  that pointer may reach. The session fills them from the client's own allocations
  (:func:`launch_bounds`); a pointer inside none gets ``(0, 0)``, so every access through it
  faults. A backend called without ``bounds`` uses its own allocation containing each pointer.
* Some faults cannot be recovered inside the process. CUDA driver 580 keeps illegal-address
  faults *sticky for the whole process*: neither a primary-context reset nor a new context
  works afterwards (measured on the H100 machine). A backend that can hit this advertises the
  feature ``"sticky-faults"``; after such a fault it raises :attr:`Status.DEVICE_LOST`, sets its
  optional ``lost`` attribute to the reason, and refuses further work. Recovering then means a
  new server process (the supervisor's job), never silently continuing.

Optional extensions (feature-tested with ``getattr``, not part of the Protocol):

* ``lost: str | None`` -- set once the device is unusable in this process (see above).
* ``copy_htod_address(dst, host, size, queue=None)`` / ``copy_dtoh_address(host, src, size,
  queue=None)`` -- copies by raw host address, accepted only inside a registered host region;
  they save the memoryview-to-pointer conversion on the hot path of small copies.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from vxpu.abi.status import Status  # re-exported: the one status table is vxpu.abi.status
from vxpu.errors import Error

if TYPE_CHECKING:
    from vxpu.ir.args import KernelSignature


class BackendError(Error):
    """A backend operation failed.

    Attributes:
        status: the stable :class:`Status` to report to the guest.
        vendor: the vendor runtime's own error name (e.g. ``"CUDA_ERROR_ILLEGAL_ADDRESS"``), if any.
        log: compiler/loader log text, if any.
    """

    def __init__(self, status: Status, message: str, *, vendor: str | None = None, log: str = "") -> None:
        detail = f" [{vendor}]" if vendor else ""
        super().__init__(f"{status.name}: {message}{detail}")
        self.status = Status(status)
        self.vendor = vendor
        self.log = log


@dataclass(frozen=True)
class FaultRecord:
    """The first bad access of a checked kernel: what the fault record in device memory held.

    Attributes:
        kernel: the kernel's name.
        code: the fault code (``vxpu.ir.lower.bounds.FAULT_*``: 1 global/constant out of its
            buffer, 2 shared, 3 local, 4 misaligned, 5 trap, 6 barrier).
        origin: the buffer: pointer parameter index, ``0x100 + j`` shared array ``j``,
            ``0x200 + j`` local array ``j``, ``0xFFFFFFFF`` none (trap, barrier).
        offset: the access's byte offset from the buffer's start (wrapping, may be "negative").
        block: the faulting thread's block index (x, y, z).
        thread: its thread index (x, y, z).
    """

    kernel: str
    code: int
    origin: int
    offset: int
    block: tuple[int, int, int]
    thread: tuple[int, int, int]

    @property
    def param(self) -> int | None:
        """The pointer parameter's index, or None (an array or no buffer)."""
        return self.origin if self.origin < 0x100 else None

    def describe(self) -> str:
        from vxpu.ir.lower.bounds import describe_origin  # stdlib-only, cheap

        what = {1: "access outside its buffer", 2: "shared access outside its array",
                3: "local access outside its array", 4: "misaligned access", 5: "trap",
                6: "barrier reached non-uniformly"}.get(self.code, f"fault code {self.code}")
        off = self.offset - (1 << 64) if self.offset >> 63 else self.offset
        return (f"kernel {self.kernel!r}: {what} ({describe_origin(self.origin)}, offset {off}, "
                f"block {self.block}, thread {self.thread}); the access was not performed")


class KernelFaultError(BackendError):
    """KERNEL_FAULT carrying a :class:`FaultRecord`.

    ``context_kept`` is True when the fault was contained by checked code (the bad access never
    happened): the backend did **not** reset its context and every handle stays valid.
    """

    def __init__(self, record: FaultRecord, *, context_kept: bool = True) -> None:
        super().__init__(Status.KERNEL_FAULT, record.describe())
        self.record = record
        self.context_kept = context_kept


class BackendUnavailable(BackendError):
    """The backend cannot be opened here; ``str(exc)`` says why (no runtime, no device ...)."""

    def __init__(self, message: str, *, vendor: str | None = None) -> None:
        super().__init__(Status.UNAVAILABLE, message, vendor=vendor)


class ModuleKind(enum.Enum):
    """What :meth:`Backend.load_module` accepts. Only ``IR`` is on by default; native kinds
    are an explicit opt-in of the server (``--allow-native``)."""

    IR = "ir"          # vxpu.ir binary module (verified, compiled through the compile cache)
    PTX = "ptx"        # CUDA only
    CUBIN = "cubin"    # CUDA only
    HSACO = "hsaco"    # HIP only
    ONNX = "onnx"      # NPU only


@dataclass(frozen=True)
class DeviceProperties:
    """Static facts about the opened device."""

    backend: str                 # "cpu", "cuda", "hip", "npu"
    name: str                    # e.g. "NVIDIA H100 80GB HBM3"
    vendor: str                  # "nvidia", "amd", "intel", "qualcomm", "host" ...
    architecture: str            # "sm_90", "gfx942", "znver4", "QNNExecutionProvider" ...
    memory_total: int            # bytes
    compute_units: int           # SMs, CUs, cores
    max_threads_per_block: int
    max_shared_memory_per_block: int
    features: frozenset[str] = field(default_factory=frozenset)  # "ir", "ptx", "onnx", "atomics-f32", "fp16" ...


@dataclass(frozen=True)
class KernelInfo:
    """A loaded kernel's launch-relevant facts, derived from its IR signature."""

    name: str
    param_sizes: tuple[int, ...]     # size in bytes of each packed parameter
    param_offsets: tuple[int, ...]   # offset of each parameter in the packed argument buffer
    args_size: int                   # total packed size (natural alignment, little-endian)
    static_shared_bytes: int
    checked: bool = False            # checked IR code: launches take ``bounds``
    pointer_params: tuple[int, ...] = ()   # indices of the pointer parameters (one bounds pair each)

    @classmethod
    def from_signature(cls, sig: KernelSignature, checked: bool = False) -> KernelInfo:
        """The Backend contract's view of an IR kernel's :class:`~vxpu.ir.args.KernelSignature`
        (``checked``: compiled with per-buffer bounds)."""
        ptrs = tuple(i for i, t in enumerate(sig.param_types) if t.startswith("ptr"))
        return cls(sig.name, sig.param_sizes, sig.param_offsets, sig.args_size, sig.static_shared_bytes,
                   checked, ptrs)


def launch_bounds(info: KernelInfo, args: bytes | memoryview,
                  allocation_at: Callable[[int], tuple[int, int] | None]) -> tuple[tuple[int, int], ...]:
    """The ``(base, length)`` of each pointer argument's buffer, for a checked launch.

    Args:
        info: the kernel (its ``pointer_params`` and offsets).
        args: the packed arguments (pointers as u64 device addresses).
        allocation_at: the live allocation ``(start, size)`` containing an address, or None.

    A pointer inside no allocation gets ``(0, 0)``: every access through it faults.
    """
    out = []
    for i in info.pointer_params:
        (address,) = struct.unpack_from("<Q", args, info.param_offsets[i])
        found = allocation_at(address)
        out.append(found if found is not None else (0, 0))
    return tuple(out)


@dataclass
class BackendStats:
    """Counters a backend keeps; the session adds pool and per-client figures."""

    launches: int = 0
    bytes_htod: int = 0
    bytes_dtoh: int = 0
    bytes_dtod: int = 0
    compile_cache_hits: int = 0
    compile_cache_misses: int = 0
    faults: int = 0
    resets: int = 0


@runtime_checkable
class Backend(Protocol):
    """One opened accelerator. Implementations: ``accel/cpu.py``, ``accel/cuda.py``,
    ``accel/hip.py``, ``accel/npu.py``. Construct with the device index, then :meth:`open`.
    """

    name: str                         # "cpu", "cuda", "hip", "npu"
    stats: BackendStats

    # -- life cycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Initialise the runtime and context. Raises BackendUnavailable with the reason."""

    def close(self) -> None:
        """Release everything (idempotent)."""

    def properties(self) -> DeviceProperties: ...

    def memory_info(self) -> tuple[int, int]:
        """``(free, total)`` device memory in bytes."""

    def reset(self) -> None:
        """Drop all device state (allocations, modules, queues, events) and start a fresh context."""

    # -- memory -------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """Allocate ``size`` bytes of device memory; returns the device address.
        Raises OUT_OF_MEMORY."""

    def free(self, address: int) -> None: ...

    def memset(self, address: int, value: int, size: int, queue: object | None = None) -> None:
        """Fill ``size`` bytes with the byte ``value``."""

    def copy_htod(self, dst: int, src: memoryview, queue: object | None = None) -> None: ...

    def copy_dtoh(self, dst: memoryview, src: int, queue: object | None = None) -> None: ...

    def copy_dtod(self, dst: int, src: int, size: int, queue: object | None = None) -> None: ...

    def register_host(self, view: memoryview, read_only: bool = False) -> object:
        """Pin host memory (a DMA-mapped guest RAM region) for zero-copy transfers.
        Returns a token for :meth:`unregister_host`. Backends without pinning return ``None``."""

    def unregister_host(self, token: object) -> None:
        """Undo :meth:`register_host`; called before the memory is unmapped."""

    # -- code ---------------------------------------------------------------------------
    def load_module(self, image: bytes, kind: ModuleKind = ModuleKind.IR) -> object:
        """Load a module; returns a module token. Raises BAD_MODULE (with the compiler log)
        or UNSUPPORTED for a kind this backend does not take."""

    def unload_module(self, module: object) -> None: ...

    def get_kernel(self, module: object, name: str) -> tuple[object, KernelInfo]:
        """Look up a kernel; raises NOT_FOUND."""

    def launch(
        self,
        kernel: object,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: bytes | memoryview,
        shared_bytes: int = 0,
        queue: object | None = None,
        bounds: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """Launch asynchronously on ``queue``. ``args`` is the packed argument buffer laid out
        as :class:`KernelInfo` says; ``bounds`` the buffers of a checked kernel's pointers
        (see the module docstring). Faults surface here or at the next synchronize."""

    # -- ordering -----------------------------------------------------------------------
    def create_queue(self) -> object: ...

    def destroy_queue(self, queue: object) -> None: ...

    def create_event(self) -> object: ...

    def destroy_event(self, event: object) -> None: ...

    def record_event(self, event: object, queue: object | None = None) -> None: ...

    def event_elapsed_ms(self, start: object, end: object) -> float:
        """Milliseconds between two recorded, completed events."""

    def synchronize(self, queue: object | None = None) -> None:
        """Wait for ``queue`` (or the whole device when ``None``). Raises KERNEL_FAULT after a fault."""


def pack_dims(dims: Sequence[int]) -> tuple[int, int, int]:
    """Normalise a 1-3 element grid/block shape to three positive ints.

    Raises:
        BackendError: INVALID_ARGUMENT for an empty/too long shape or a non-positive extent.
    """
    if not 1 <= len(dims) <= 3:
        raise BackendError(Status.INVALID_ARGUMENT, f"expected 1-3 dimensions, got {len(dims)}")
    out = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if any(d < 1 or d > 0x7FFFFFFF for d in out):
        raise BackendError(Status.INVALID_ARGUMENT, f"dimensions must be in 1..2^31-1, got {out}")
    return out  # type: ignore[return-value]
