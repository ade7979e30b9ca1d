"""The common part of the backends whose device memory is host memory (CPU and NPU).

Device memory is one **arena**: a single anonymous, lazily committed ``mmap`` reserved at open
(default 1 GiB of address space; pages cost RAM only once touched). Device addresses are byte
offsets into the arena, handed out by a best-fit :class:`vxpu.accel.pool.RangeAllocator`. The
first :data:`ARENA_GUARD` bytes are never allocated, so address 0 (null) and small offsets are
always invalid. JIT-compiled kernels get the arena's base and size and bounds-check every
access against it: a guest kernel can read and write only its arena, never server memory.

Queues are :class:`vxpu.accel.hostqueue.HostQueue` s (ordered, one worker thread each, small
memory operations inline when the queue is idle). Subclasses add code: they implement
:meth:`HostBackend._load`, :meth:`HostBackend._kernel` and :meth:`HostBackend._execute` (run
on a queue's worker thread) plus :meth:`properties`.

**Faults.** When an operation on a worker thread fails, the backend records a pending fault and
bumps its context *generation*, so every queued operation of the old context is dropped. The
next call into the backend (any method) waits for the queues to drain, resets the context
(frees every allocation, zeroes the arena, drops modules, queues and events) and raises the
fault once: KERNEL_FAULT for a kernel fault, TIMEOUT for a kernel stopped by the subclass's time
limit, DEVICE_LOST for anything unexpected. After that the backend serves normally.

**Cancellation.** A fault, a reset and :meth:`HostBackend.close` call
:meth:`HostBackend._cancel_running` right after bumping the generation: a subclass stops there
the kernels still running in the old context (the CPU backend sets their cancel words), so
nothing ever waits on a kernel that does not terminate, and a fault surfaces at once instead
of after the other queues' kernels. A cancelled launch counts as a fault of the old context
(``stats.faults``), never raised. ``close`` also drops work still queued: nothing can observe
it any more. A *contained* fault (:class:`~vxpu.accel.backend.KernelFaultError` with
``context_kept``: checked code stopped at a bad access before performing it) is raised once
the same way but resets nothing: the context, its memory and the queued work stay.

**Host memory lifetime.** Copies queued behind other work keep a reference to the host
``memoryview`` until they run; :meth:`HostBackend.unregister_host` therefore waits for all
queues, so the caller may unmap the memory right after it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from vxpu.accel.backend import (
    BackendError,
    BackendStats,
    DeviceProperties,
    KernelFaultError,
    KernelInfo,
    ModuleKind,
    Status,
    launch_bounds,
)
from vxpu.accel.hostqueue import HostEvent, HostQueue
from vxpu.accel.pool import RangeAllocator

log = logging.getLogger(__name__)

DEFAULT_ARENA_BYTES = 1 << 30
MIN_ARENA_BYTES = 1 << 20
MAX_ARENA_BYTES = 1 << 46
ARENA_GUARD = 64 << 10
ARENA_ALIGNMENT = 256
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_SIZE_RE = re.compile(r"^(\d{1,15})([kmgt]?)i?b?$")


def _contained(fault: BackendError) -> bool:
    """A fault that checked code stopped before it did anything: no context reset needed."""
    return isinstance(fault, KernelFaultError) and fault.context_kept


def parse_size(value: int | str, what: str) -> int:
    """Parse ``1073741824``, ``"512M"``, ``"1G"`` or ``"1GiB"`` into bytes.

    Raises:
        BackendError: INVALID_ARGUMENT naming ``what`` for anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE_RE.match(str(value).strip().lower())
    if not m:
        raise BackendError(Status.INVALID_ARGUMENT, f"{what}={value!r} is not a size (use e.g. 512M, 4G)")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2) or " "))


class _HostModule:
    """A loaded module; ``payload`` is the subclass's compiled object."""

    __slots__ = ("kind", "live", "payload")

    def __init__(self, payload: Any, kind: ModuleKind) -> None:
        self.payload = payload
        self.kind = kind
        self.live = True


class _HostRegion:
    """A registered host region; holding the view keeps the memory mapped."""

    __slots__ = ("address", "size", "view", "writable")

    def __init__(self, view: memoryview, address: int, size: int, read_only: bool) -> None:
        self.view = view
        self.address = address
        self.size = size
        self.writable = not read_only


class HostKernel:
    """A kernel token: the subclass's runnable plus its module (for liveness checks)."""

    __slots__ = ("info", "module", "runnable")

    def __init__(self, module: _HostModule, runnable: Any, info: KernelInfo) -> None:
        self.module = module
        self.runnable = runnable
        self.info = info


class HostBackend:
    """Arena memory, ordered queues, events and fault recovery; subclasses add kernels.

    Args:
        index: device index; only 0 exists.
        arena: arena size in bytes (int or a size string like ``"2G"``).
    """

    name = "host"

    def __init__(self, index: int = 0, *, arena: int | str = DEFAULT_ARENA_BYTES) -> None:
        if index != 0:
            raise BackendError(Status.UNAVAILABLE, f"the {self.name} backend has only device 0, not {index}")
        size = parse_size(arena, "arena")
        if not MIN_ARENA_BYTES <= size <= MAX_ARENA_BYTES:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"arena={size} must be between {MIN_ARENA_BYTES} and {MAX_ARENA_BYTES} bytes")
        self.index = index
        self.arena_size = size - size % mmap.PAGESIZE
        self.stats = BackendStats()
        self._lock = threading.RLock()
        self._fault_lock = threading.Lock()      # guards _fault and _generation only
        self._mmap: mmap.mmap | None = None
        self._generation = 0
        self._fault: BackendError | None = None
        self._modules: set[_HostModule] = set()
        self._queues: set[HostQueue] = set()
        self._events: set[HostEvent] = set()
        self._hosts: set[_HostRegion] = set()
        self._queue_seq = 0

    # -- life cycle -------------------------------------------------------------------
    def open(self) -> None:
        """Reserve the arena and start the default queue.

        Raises:
            BackendError: UNAVAILABLE if the arena cannot be mapped (the registry turns it into
                BackendUnavailable) or the subclass's runtime is missing.
        """
        with self._lock:
            if self._mmap is not None:
                return
            try:
                mm = mmap.mmap(-1, self.arena_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
            except OSError as exc:
                raise BackendError(Status.UNAVAILABLE, f"cannot reserve a {self.arena_size}-byte arena: {exc}; "
                                   "use a smaller arena= option") from exc
            self._mmap = mm
            self.memory = memoryview(mm)
            self.array = np.frombuffer(mm, dtype=np.uint8)
            self.arena_base = int(self.array.ctypes.data)
            self._allocator = RangeAllocator(ARENA_GUARD, self.arena_size - ARENA_GUARD, ARENA_ALIGNMENT)
            self._default_queue = self._new_queue("default")
            self._open_hook()

    def _open_hook(self) -> None:
        """Subclasses start their runtime here."""

    def close(self) -> None:
        """Cancel running kernels, drop queued work, stop every queue and unmap the arena
        (idempotent)."""
        with self._lock:
            if self._mmap is None:
                return
            with self._fault_lock:
                self._generation += 1       # queued operations are dropped, not run
            self._cancel_running()
            for q in list(self._queues):
                q.stop()
            self._queues.clear()
            self._drop_modules()
            self._events.clear()
            self._hosts.clear()
            del self.array
            self.memory.release()
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                log.warning("arena still referenced at close; it is released when the last view goes")
            self._mmap = None

    def properties(self) -> DeviceProperties:
        raise NotImplementedError

    def memory_info(self) -> tuple[int, int]:
        """``(free, total)`` arena bytes."""
        self._check()
        return self._allocator.free_bytes, self._allocator.size

    def reset(self) -> None:
        """Drop every allocation, module, queue and event; the default queue stays."""
        with self._lock:
            self._check_open()
            with self._fault_lock:
                self._generation += 1
            self._reset_context()

    # -- internal: state, faults --------------------------------------------------------
    def _check_open(self) -> None:
        if self._mmap is None:
            raise BackendError(Status.UNAVAILABLE, f"the {self.name} backend is not open")

    def _check(self) -> None:
        """Raise (once) a fault a queue recorded, after resetting the context."""
        if self._fault is None and self._mmap is not None:
            return
        with self._lock:
            self._check_open()
            with self._fault_lock:
                fault, self._fault = self._fault, None
            if fault is not None:
                if not _contained(fault):
                    self._reset_context()
                raise fault

    def _on_queue_error(self, exc: BaseException, generation: int) -> None:
        """Queue hook: turn a failed operation into a pending fault.

        Takes only the small fault lock (never the backend lock): a reset in progress holds the
        backend lock while it waits for the queues, and a second kernel may fault meanwhile.
        A fault of an older generation belongs to a context that is already being reset: it is
        counted, not raised again.
        """
        fault = self._map_fault(exc)
        kept = _contained(fault)
        with self._fault_lock:
            self.stats.faults += 1
            current = generation == self._generation
            if current:
                if not kept:
                    self._generation += 1   # drop everything queued in this context
                if self._fault is None:
                    self._fault = fault
        if current and not kept:
            self._cancel_running()          # the rest of the old context's work is void: stop it now
        log.warning("%s backend: %s; %s", self.name, fault,
                    "contained by the checks, context kept" if kept else
                    "resetting the context" if current else "its context is already being reset")

    def _map_fault(self, exc: BaseException) -> BackendError:
        """Map a worker exception to KERNEL_FAULT/TIMEOUT/DEVICE_LOST; subclasses know their
        fault types."""
        if isinstance(exc, BackendError) and exc.status in (Status.KERNEL_FAULT, Status.TIMEOUT, Status.DEVICE_LOST):
            return exc
        log.error("%s backend: unexpected error on a queue: %s", self.name, exc)
        log.debug("traceback", exc_info=(type(exc), exc, exc.__traceback__))
        return BackendError(Status.DEVICE_LOST, f"unexpected {type(exc).__name__} on a queue: {exc}")

    def _cancel_running(self) -> None:
        """Stop the kernels running in the context being reset or closed (the generation was
        already bumped, so every running kernel belongs to the old context). Must not block."""

    def _reset_context(self) -> None:
        self._cancel_running()
        for q in list(self._queues):
            q.wait()
        self._allocator.reset()
        self._mmap.madvise(mmap.MADV_DONTNEED)  # type: ignore[union-attr]  # zero and give back the pages
        self._drop_modules()
        for q in list(self._queues):
            if q is not self._default_queue:
                q.stop()
        self._queues = {self._default_queue}
        for event in self._events:
            event.fire()
        self._events.clear()
        self.stats.resets += 1

    def _drop_modules(self) -> None:
        for module in self._modules:
            module.live = False
        self._modules.clear()

    def _new_queue(self, name: str) -> HostQueue:
        q = HostQueue(f"{self.name}-{name}", lambda: self._generation, self._on_queue_error)
        self._queues.add(q)
        return q

    def _queue(self, queue: object | None) -> HostQueue:
        if queue is None:
            return self._default_queue
        if queue not in self._queues:
            raise BackendError(Status.INVALID_HANDLE, "unknown or destroyed queue")
        return queue  # type: ignore[return-value]

    def _range(self, address: int, size: int) -> None:
        if not (ARENA_GUARD <= address and 0 <= size and address + size <= self.arena_size):
            raise BackendError(Status.OUT_OF_RANGE, f"range {address:#x}+{size} is outside the arena")

    @staticmethod
    def _bytes(view: memoryview) -> memoryview:
        try:
            view = view if isinstance(view, memoryview) else memoryview(view)
            return view if view.format == "B" and view.ndim == 1 else view.cast("B")
        except (TypeError, ValueError) as exc:
            raise BackendError(Status.INVALID_ARGUMENT, f"host memory must be a contiguous buffer: {exc}") from None

    # -- memory -----------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """Allocate from the arena. Raises OUT_OF_MEMORY when nothing fits."""
        self._check()
        if size < 1:
            raise BackendError(Status.INVALID_ARGUMENT, f"allocation size must be positive, got {size}")
        with self._lock:
            address = self._allocator.alloc(size)
        if address is None:
            raise BackendError(Status.OUT_OF_MEMORY,
                               f"arena exhausted: {size} bytes wanted, largest free block "
                               f"{self._allocator.largest_free} of {self._allocator.free_bytes} free")
        return address

    def free(self, address: int) -> None:
        """Free an allocation once queued work is done with it (like ``cuMemFree``, this waits
        for the queues, so the range cannot be handed out while a kernel still uses it).
        Raises INVALID_HANDLE for anything else."""
        self._check()
        for q in list(self._queues):
            q.wait()
        self._check()
        with self._lock:
            try:
                self._allocator.free(address)
            except KeyError:
                raise BackendError(Status.INVALID_HANDLE, f"{address!r} is not a live allocation") from None

    def memset(self, address: int, value: int, size: int, queue: object | None = None) -> None:
        self._check()
        self._range(address, size)
        arr = self.array
        self._queue(queue).run(lambda: arr[address:address + size].fill(value))

    def copy_htod(self, dst: int, src: memoryview, queue: object | None = None) -> None:
        self._check()
        src = self._bytes(src)
        n = src.nbytes
        self._range(dst, n)
        mem = self.memory

        def op() -> None:
            mem[dst:dst + n] = src
        self._queue(queue).run(op)
        self.stats.bytes_htod += n

    def copy_dtoh(self, dst: memoryview, src: int, queue: object | None = None) -> None:
        self._check()
        dst = self._bytes(dst)
        n = dst.nbytes
        self._range(src, n)
        mem = self.memory

        def op() -> None:
            dst[:] = mem[src:src + n]
        self._queue(queue).run(op)
        self.stats.bytes_dtoh += n

    def copy_dtod(self, dst: int, src: int, size: int, queue: object | None = None) -> None:
        self._check()
        self._range(src, size)
        self._range(dst, size)
        arr = self.array

        def op() -> None:
            arr[dst:dst + size] = arr[src:src + size]   # numpy handles overlap (memmove)
        self._queue(queue).run(op)
        self.stats.bytes_dtod += size

    def register_host(self, view: memoryview, read_only: bool = False) -> object:
        """Record a host region (no pinning is needed here) for the address-copy extension;
        returns the token for :meth:`unregister_host`, which keeps the region mapped.

        Raises:
            BackendError: INVALID_ARGUMENT for an empty or non-contiguous view.
        """
        self._check()
        view = self._bytes(view)
        if view.nbytes == 0:
            raise BackendError(Status.INVALID_ARGUMENT, "cannot register an empty host region")
        address = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
        region = _HostRegion(view, address, view.nbytes, bool(read_only or view.readonly))
        with self._lock:
            self._hosts.add(region)
        return region

    def unregister_host(self, token: object) -> None:
        """Forget a region once no queued copy can still touch it (it may be unmapped next).

        Raises:
            BackendError: INVALID_HANDLE for an unknown or already released token.
        """
        with self._lock:
            if token not in self._hosts:
                raise BackendError(Status.INVALID_HANDLE, "unknown or already released host registration")
            self._hosts.discard(token)  # type: ignore[arg-type]
        for q in list(self._queues):
            q.wait()

    def _host_range(self, host: int, size: int, writable: bool) -> None:
        for r in self._hosts:
            if r.address <= host and host + size <= r.address + r.size and (r.writable or not writable):
                return
        raise BackendError(Status.OUT_OF_RANGE, f"host range {host:#x}+{size} is not inside a registered "
                           f"{'writable ' if writable else ''}region")

    def copy_htod_address(self, dst: int, host: int, size: int, queue: object | None = None) -> None:
        """Copy from a host address inside a registered region (the optional address-copy
        extension of the Backend contract). Raises OUT_OF_RANGE outside every region."""
        self._check()
        self._range(dst, size)
        self._host_range(host, size, writable=False)
        target = self.arena_base + dst
        def htod_copy() -> None:
            ctypes.memmove(target, host, size)

        self._queue(queue).run(htod_copy)
        self.stats.bytes_htod += size

    def copy_dtoh_address(self, host: int, src: int, size: int, queue: object | None = None) -> None:
        """Copy to a host address inside a registered writable region. Raises OUT_OF_RANGE."""
        self._check()
        self._range(src, size)
        self._host_range(host, size, writable=True)
        source = self.arena_base + src
        def dtoh_copy() -> None:
            ctypes.memmove(host, source, size)

        self._queue(queue).run(dtoh_copy)
        self.stats.bytes_dtoh += size

    # -- code -------------------------------------------------------------------------
    def load_module(self, image: bytes, kind: ModuleKind = ModuleKind.IR) -> object:
        self._check()
        module = _HostModule(self._load(bytes(image), kind), kind)
        with self._lock:
            self._modules.add(module)
        return module

    def unload_module(self, module: object) -> None:
        self._check()
        with self._lock:
            if module not in self._modules:
                raise BackendError(Status.INVALID_HANDLE, "unknown or unloaded module")
            self._modules.discard(module)  # type: ignore[arg-type]
            module.live = False  # type: ignore[attr-defined]

    def get_kernel(self, module: object, name: str) -> tuple[object, KernelInfo]:
        self._check()
        if module not in self._modules:
            raise BackendError(Status.INVALID_HANDLE, "unknown or unloaded module")
        runnable, info = self._kernel(module.payload, name)  # type: ignore[attr-defined]
        return HostKernel(module, runnable, info), info  # type: ignore[arg-type]

    def launch(self, kernel: object, grid: tuple[int, int, int], block: tuple[int, int, int],
               args: bytes | memoryview, shared_bytes: int = 0, queue: object | None = None,
               bounds: Sequence[tuple[int, int]] | None = None) -> None:
        """Queue the kernel; a fault surfaces at the next call (synchronize typically).
        ``bounds``: a checked kernel's pointer buffers (else this backend's own allocation
        containing each pointer)."""
        self._check()
        if not isinstance(kernel, HostKernel) or not kernel.module.live:
            raise BackendError(Status.INVALID_HANDLE, "unknown kernel or its module was unloaded")
        if len(args) != kernel.info.args_size:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"{kernel.info.name} takes {kernel.info.args_size} argument bytes, got {len(args)}")
        q = self._queue(queue)
        runnable = kernel.runnable
        if kernel.info.checked:
            if bounds is None:
                with self._lock:
                    bounds = launch_bounds(kernel.info, args, self._allocation_at)
            work = self._prepare(runnable, grid, block, bytes(args), shared_bytes, bounds=tuple(bounds))
        else:
            work = self._prepare(runnable, grid, block, bytes(args), shared_bytes)
        q.submit(lambda: self._execute(runnable, work))
        self.stats.launches += 1

    def _allocation_at(self, address: int) -> tuple[int, int] | None:
        """This backend's allocation containing ``address`` (a scan: only for launches that
        come without a session's bounds)."""
        for start, size in self._allocator.used.items():
            if 0 <= address - start < size:
                return start, size
        return None

    def _load(self, image: bytes, kind: ModuleKind) -> Any:
        """Compile/load a module image; raises BAD_MODULE or UNSUPPORTED."""
        raise NotImplementedError

    def _kernel(self, payload: Any, name: str) -> tuple[Any, KernelInfo]:
        """Find a kernel in a loaded payload; raises NOT_FOUND."""
        raise NotImplementedError

    def _prepare(self, runnable: Any, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: bytes, shared_bytes: int, bounds: tuple[tuple[int, int], ...] | None = None) -> Any:
        """Validate a launch on the caller's thread; returns what :meth:`_execute` needs
        (``bounds``: a checked kernel's pointer buffers, passed only for those).
        Raises INVALID_ARGUMENT/OUT_OF_RANGE for launches that must not be queued."""
        return grid, block, args, shared_bytes

    def _execute(self, runnable: Any, work: Any) -> None:
        """Run a prepared launch to completion on the calling (queue worker) thread."""
        raise NotImplementedError

    # -- ordering ---------------------------------------------------------------------
    def create_queue(self) -> object:
        self._check()
        with self._lock:
            self._queue_seq += 1
            return self._new_queue(str(self._queue_seq))

    def destroy_queue(self, queue: object) -> None:
        self._check()
        if queue is None or queue is self._default_queue:
            raise BackendError(Status.INVALID_HANDLE, "the default queue cannot be destroyed")
        q = self._queue(queue)
        with self._lock:
            self._queues.discard(q)
        q.stop()
        self._check()

    def create_event(self) -> object:
        self._check()
        event = HostEvent()
        with self._lock:
            self._events.add(event)
        return event

    def destroy_event(self, event: object) -> None:
        self._check()
        with self._lock:
            if event not in self._events:
                raise BackendError(Status.INVALID_HANDLE, "unknown or destroyed event")
            self._events.discard(event)  # type: ignore[arg-type]

    def record_event(self, event: object, queue: object | None = None) -> None:
        self._check()
        if event not in self._events:
            raise BackendError(Status.INVALID_HANDLE, "unknown or destroyed event")
        self._queue(queue).record(event)  # type: ignore[arg-type]

    def event_elapsed_ms(self, start: object, end: object) -> float:
        """Milliseconds from ``start`` to ``end``; waits for both.

        Raises:
            BackendError: INVALID_HANDLE; INVALID_ARGUMENT if either was never recorded.
        """
        self._check()
        events: list[HostEvent] = []
        for e in (start, end):
            if e not in self._events:
                raise BackendError(Status.INVALID_HANDLE, "unknown or destroyed event")
            if not e.recorded:  # type: ignore[attr-defined]
                raise BackendError(Status.INVALID_ARGUMENT, "event was never recorded")
            events.append(e)  # type: ignore[arg-type]
        for e in events:
            e.done.wait()
        self._check()
        t0, t1 = events[0].time_ns, events[1].time_ns
        if t0 is None or t1 is None:
            raise BackendError(Status.INVALID_ARGUMENT, "event was dropped by a context reset")
        return (t1 - t0) / 1e6

    def synchronize(self, queue: object | None = None) -> None:
        """Wait for one queue or all; raises a fault that happened meanwhile."""
        self._check()
        if queue is None:
            for q in list(self._queues):
                q.wait()
        else:
            self._queue(queue).wait()
        self._check()

