"""A client's view of a device: handle tables, quotas, range checks and statistics.

The device model (``vxpu.vfio_server``) gives every guest connection one :class:`Session` and
never talks to a backend directly. The session is the backend-independent policy layer:

* **Handles.** Allocations are named by their device address (the guest packs them into
  kernel arguments); modules, kernels, queues and events by opaque 64-bit handles that carry a
  per-kind tag and a sequence number that is never reused within the session, so a stale, freed
  or foreign handle is always :attr:`Status.INVALID_HANDLE` (double free included). Queue
  handle ``0`` (:data:`DEFAULT_QUEUE`) is the backend's default queue.
* **Ranges.** Every device range ``[address, address + length)`` of a copy or memset must lie
  inside *one* live allocation of this client (overflow-safe: the bounds are checked against
  the 64-bit limit and the allocation, never by wrapping arithmetic). Host memory arrives as
  ``memoryview`` slices the device model has already translated from DMA mappings.
* **Quotas.** Memory, allocations, modules, kernels, queues and events are charged before the
  backend is asked and refunded afterwards (:mod:`vxpu.accel.quota`); memory at the size the
  pool really holds (rounded up to its alignment). Queue depth is bounded:
  by default a full queue makes the submitter wait for it (back-pressure, like a full CUDA
  launch queue); ``depth_policy="fail"`` answers QUOTA_EXCEEDED instead.
* **Launch checks.** Grid and block shapes, threads per block, shared memory and the exact
  argument-buffer size from the kernel's :class:`KernelInfo`. For a checked IR kernel the
  session also gives the backend each pointer argument's buffer: the live allocation *of this
  client* that contains it, or ``(0, 0)`` (so any access through it faults). The guest
  cannot forge these bounds, so its kernel can touch only its own allocations it passed.
* **Errors.** Every public method raises only :class:`BackendError`: an unexpected exception is
  logged once and becomes INTERNAL (:func:`status_of` maps any exception to a status). After
  KERNEL_FAULT, DEVICE_LOST, or a TIMEOUT for which the backend cancelled an overrunning kernel,
  the backend has reset its context; the session drops all of the
  client's handles (and notices resets caused by other clients through ``stats.resets``).
  A contained fault of checked code (:class:`~vxpu.accel.backend.KernelFaultError` with
  ``context_kept``) resets nothing: it is reported with its fault record and every handle
  stays valid.
  Guest-caused log lines (faults, resets, internal errors) share a per-process budget
  (:data:`WARN_BUDGET`, refilled slowly); past it they go to DEBUG, so a guest faulting in a
  loop cannot flood the log.
* **Launch plans.** :meth:`Session.launch_plan` launches like :meth:`Session.launch` and
  returns a :class:`LaunchPlan`: the checked result (kernel, shapes, argument bytes, queue, the
  checked kernel's bounds). :meth:`Session.relaunch` issues it again with only the per-launch
  work (the depth accounting, the backend call), while the session's *plan generation* is the
  one it was made in. The generation moves on everything that could make a check come out
  differently: any free, a module unload, a queue destroyed, a context reset (own or foreign),
  a quota change and :meth:`close` (and :meth:`forget_plans`). A launch with a pointer outside
  every allocation gets no plan (a later allocation could make it resolve).
* **Statistics.** :class:`vxpu.accel.stats.SessionStats` plus the pool's figures.

Memory goes through a :class:`vxpu.accel.pool.MemoryPool` per session. Typical use::

    backend = open_backend("cpu")                     # vxpu.accel.registry
    with Session(backend, Quota(memory_bytes=1 << 30)) as s:
        x = s.alloc(4 * n)
        s.copy_htod(x, memoryview(host_array))
        kernel, info = s.get_kernel(s.load_module(ir_image), "saxpy")
        s.launch(kernel, grid=(n // 256,), block=(256,), args=packed_args)
        s.copy_dtoh(memoryview(result), x)
        s.synchronize()                               # raises KERNEL_FAULT etc.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from vxpu.accel.backend import (
    Backend,
    BackendError,
    KernelFaultError,
    KernelInfo,
    ModuleKind,
    Status,
    launch_bounds,
)
from vxpu.accel.pool import MemoryPool, align_up
from vxpu.accel.quota import DEFAULT_QUOTA, CompileBudget, Quota, QuotaUsage
from vxpu.accel.session_copies import SessionCopies
from vxpu.accel.session_records import (
    DEFAULT_QUEUE,
    U64_MAX,
    WARN_BUDGET,
    WARN_REFILL_S,
    LaunchPlan,
    next_plan_generation,
    reserve_limit,
    status_of,
)
from vxpu.accel.session_records import KernelRecord as _Kernel
from vxpu.accel.session_records import ModuleRecord as _Module
from vxpu.accel.session_records import QueueRecord as _Queue
from vxpu.accel.session_records import dims3 as _dims3
from vxpu.accel.session_records import guarded as _guarded
from vxpu.accel.session_records import guest_log as _guest_log
from vxpu.accel.stats import SessionStats, metrics

__all__ = ["DEFAULT_QUEUE", "WARN_BUDGET", "WARN_REFILL_S", "LaunchPlan", "Session", "reserve_limit", "status_of"]

log = logging.getLogger(__name__)

MAX_KERNEL_NAME = 255
DEFAULT_ALLOWED_KINDS = frozenset({ModuleKind.IR})

# Handle tags (top 16 bits of a 64-bit handle) so a handle of one kind never names another.
_TAG_MODULE, _TAG_KERNEL, _TAG_QUEUE, _TAG_EVENT = 0x4D4F, 0x4B45, 0x5155, 0x4556
_TAG_SHIFT = 48

class Session(SessionCopies):
    """One client's handles, quotas and statistics on one opened backend.

    Args:
        backend: an opened :class:`Backend`.
        quota: the client's limits.
        pool: the memory pool to use; by default one over ``backend.alloc``/``backend.free``.
        allowed_kinds: module kinds this client may load (native kinds are an opt-in).
        depth_policy: ``"wait"`` (a full queue is drained first) or ``"fail"`` (QUOTA_EXCEEDED).
        name: for log lines.
        compile_budget: the client's compile budget when it outlives this session (a device
            model keeps one per guest, so a device reset does not refill it); default: a new
            one of ``quota.compile_seconds``.
    """

    def __init__(self, backend: Backend, quota: Quota = DEFAULT_QUOTA, *, pool: MemoryPool | None = None,
                 allowed_kinds: frozenset[ModuleKind] = DEFAULT_ALLOWED_KINDS, depth_policy: str = "wait",
                 name: str = "client", compile_budget: CompileBudget | None = None) -> None:
        if depth_policy not in ("wait", "fail"):
            raise ValueError(f"depth_policy must be 'wait' or 'fail', got {depth_policy!r}")
        self.backend = backend
        self._quota = quota
        self._plan_generation = next_plan_generation()
        self.usage = QuotaUsage(quota)
        self.compile_budget = compile_budget or CompileBudget(quota.compile_seconds)
        self.pool = pool or MemoryPool(backend.alloc, backend.free, reserve_limit=reserve_limit(quota))
        self.allowed_kinds = frozenset(allowed_kinds)
        self.depth_policy = depth_policy
        self.stats = SessionStats()
        self.log = log.getChild(name)
        self._props = backend.properties()
        self._lock = threading.RLock()
        self._closed = False
        self._seq = itertools.count(1)
        self._allocs: dict[int, int] = {}        # address -> requested size
        self._alloc_starts: list[int] = []       # sorted addresses, for range lookup
        self.allocation_version = 0              # moves whenever the allocation table changes
        self._modules: dict[int, _Module] = {}
        self._kernels: dict[int, _Kernel] = {}
        self._queues: dict[int, _Queue] = {DEFAULT_QUEUE: _Queue(None)}
        self._events: dict[int, object] = {}
        self._host_tokens: list[object] = []
        self._epoch = backend.stats.resets
        #: the backend's optional address copies (htod, dtoh), looked up once
        self._address_copies: tuple[Callable[..., None] | None, Callable[..., None] | None] = (
            getattr(backend, "copy_htod_address", None), getattr(backend, "copy_dtoh_address", None))

    @property
    def quota(self) -> Quota:
        """The client's limits; setting new ones makes every :class:`LaunchPlan` stale."""
        return self._quota

    @quota.setter
    def quota(self, value: Quota) -> None:
        with self._lock:
            self._quota = value
            self.usage.quota = value
            self.forget_plans()

    def forget_plans(self) -> None:
        """Make every :class:`LaunchPlan` of this session stale (the next launch is checked
        in full). The session calls it itself on every change that could affect a plan."""
        self._plan_generation = next_plan_generation()

    # -- internal helpers -------------------------------------------------------------
    def _new_handle(self, tag: int) -> int:
        return (tag << _TAG_SHIFT) | next(self._seq)

    def _check_epoch(self) -> None:
        if self.backend.stats.resets != self._epoch:
            _guest_log(self.log, logging.WARNING,
                       "device context was reset (another client faulted); dropping this client's handles")
            self._invalidate()

    def _context_lost(self, exc: BackendError) -> bool:
        """Did ``exc`` come with a context reset? Faults always do; a TIMEOUT does when the
        backend cancelled an overrunning kernel and reset (a plain wait timeout does not)."""
        if isinstance(exc, KernelFaultError) and exc.context_kept:
            return False
        if exc.status in (Status.KERNEL_FAULT, Status.DEVICE_LOST):
            return True
        return exc.status is Status.TIMEOUT and self.backend.stats.resets != self._epoch

    def _on_error(self, exc: BackendError) -> None:
        self.stats.errors[exc.status.name] += 1
        if self._context_lost(exc):
            self.stats.faults += 1
            _guest_log(self.log, logging.WARNING, "device fault, context reset, handles invalidated: %s", exc)
            self._invalidate()
        elif exc.status is Status.KERNEL_FAULT:
            self.stats.faults += 1
            _guest_log(self.log, logging.WARNING, "contained kernel fault (context kept): %s", exc)

    def _invalidate(self) -> None:
        """Forget every handle: the backend context (and all device objects) are gone."""
        self._allocs.clear()
        self._alloc_starts.clear()
        self.allocation_version += 1
        self._modules.clear()
        self._kernels.clear()
        self._queues = {DEFAULT_QUEUE: _Queue(None)}
        self._events.clear()
        self.pool.forget()
        self.usage.clear()
        self.stats.invalidations += 1
        self._epoch = self.backend.stats.resets
        self.forget_plans()

    def _lookup(self, table: dict[int, Any], handle: int, what: str) -> Any:
        try:
            return table[handle]
        except (KeyError, TypeError):
            raise BackendError(Status.INVALID_HANDLE, f"unknown or released {what} handle {handle!r}") from None

    def _queue(self, handle: int) -> _Queue:
        return self._lookup(self._queues, handle, "queue")  # type: ignore[no-any-return]

    def check_range(self, address: int, length: int) -> None:
        """Check that ``[address, address + length)`` lies inside one live allocation.

        Raises:
            BackendError: INVALID_ARGUMENT for a negative or over-64-bit value; OUT_OF_RANGE
                otherwise.
        """
        if not (0 <= address <= U64_MAX and 0 <= length <= U64_MAX):
            raise BackendError(Status.INVALID_ARGUMENT, f"address {address!r}/length {length!r} not a u64")
        i = bisect.bisect_right(self._alloc_starts, address) - 1
        if i >= 0:
            start = self._alloc_starts[i]
            size = self._allocs[start]
            if address - start + length <= size and (length or address < start + size):
                return
        raise BackendError(Status.OUT_OF_RANGE,
                           f"device range {address:#x}+{length} is not inside one allocation of this client")

    def _allocation_at(self, address: int) -> tuple[int, int] | None:
        """``(start, size)`` of this client's live allocation containing ``address``, or None."""
        i = bisect.bisect_right(self._alloc_starts, address) - 1
        if i >= 0:
            start = self._alloc_starts[i]
            size = self._allocs[start]
            if address - start < size:
                return start, size
        return None

    def _charged(self, size: int) -> int:
        """What an allocation of ``size`` bytes costs against the memory quota: the size the
        pool really holds (rounded up to its alignment), so rounding cannot bypass the quota."""
        return align_up(size, self.pool.alignment)

    def _submit(self, queue: int) -> _Queue:
        """Account one operation on ``queue``, applying the depth policy."""
        q = self._queue(queue)
        self._account(q)
        return q

    def _account(self, q: _Queue) -> None:
        """Count one operation on ``q``; a full queue is waited for ("wait") or refused ("fail")."""
        if q.pending >= self._quota.queue_depth:
            if self.depth_policy == "fail":
                raise BackendError(Status.QUOTA_EXCEEDED,
                                   f"queue depth quota ({self._quota.queue_depth}) reached; synchronize first")
            self.stats.queue_waits += 1
            self.backend.synchronize(q.token)
            q.pending = 0
        q.pending += 1

    def pending(self, queue: int = DEFAULT_QUEUE) -> int:
        """Operations on ``queue`` since it was last waited for: what the depth quota counts
        (0 for an unknown queue). A failed wait or submission leaves them counted."""
        with self._lock:
            q = self._queues.get(queue)
            return 0 if q is None else q.pending

    # -- memory -----------------------------------------------------------------------
    @_guarded
    def alloc(self, size: int) -> int:
        """Allocate ``size`` bytes of device memory; returns its device address.

        Raises:
            BackendError: INVALID_ARGUMENT (size < 1), QUOTA_EXCEEDED, OUT_OF_MEMORY.
        """
        if not 1 <= size <= U64_MAX:
            raise BackendError(Status.INVALID_ARGUMENT, f"allocation size must be 1..2^64-1, got {size!r}")
        charged = self._charged(size)
        self.usage.charge_memory(charged)
        try:
            address = self.pool.alloc(size)
        except BaseException:
            self.usage.refund_memory(charged)
            raise
        self._allocs[address] = size
        bisect.insort(self._alloc_starts, address)
        self.allocation_version += 1
        self.stats.allocations += 1
        return address

    @_guarded
    def free(self, address: int) -> None:
        """Free the allocation that starts at ``address``.

        Raises:
            BackendError: INVALID_HANDLE if it is not a live allocation of this client.
        """
        size = self._allocs.pop(address, None)
        if size is None:
            raise BackendError(Status.INVALID_HANDLE, f"{address!r} is not a live allocation of this client")
        del self._alloc_starts[bisect.bisect_left(self._alloc_starts, address)]
        self.allocation_version += 1
        self.forget_plans()                      # a plan's bounds may name this allocation
        self.usage.refund_memory(self._charged(size))
        self.stats.frees += 1
        self.pool.free(address)

    def allocation_size(self, address: int) -> int | None:
        """The requested size of the live allocation at ``address``, or ``None`` (also after
        a context reset, which this notices first: the address may belong to someone else now)."""
        with self._lock:
            if self._closed:
                return None
            self._check_epoch()
            return self._allocs.get(address)

    # -- code -------------------------------------------------------------------------
    def load_module(self, image: bytes | memoryview, kind: ModuleKind = ModuleKind.IR) -> int:
        """Load a module image; returns a module handle.

        The backend compiles without this session's lock held (IR in a sandboxed compile
        worker), so the client's calls from other threads go on meanwhile. The time a load
        takes is charged to the client's :class:`~vxpu.accel.quota.CompileBudget`.

        Raises:
            BackendError: UNSUPPORTED (kind not allowed for this client or backend),
                QUOTA_EXCEEDED (too many modules, too large an image, the compile budget used
                up, or another load of this client running), BAD_MODULE, COMPILE_LIMIT (the
                compile crashed or ran past the worker's limits), ABORTED (a context reset
                during the compile dropped the module: load it again).
        """
        data, epoch = self._load_begin(image, kind)
        start = time.monotonic()
        try:
            token = self._unlocked("load_module", self.backend.load_module, data, kind)
        except BaseException:
            self._load_done(None, kind, epoch, time.monotonic() - start)
            raise
        return self._load_done(token, kind, epoch, time.monotonic() - start)

    @_guarded
    def _load_begin(self, image: bytes | memoryview, kind: ModuleKind) -> tuple[bytes, int]:
        if kind not in self.allowed_kinds:
            raise BackendError(Status.UNSUPPORTED,
                               f"{kind.value} modules are not enabled for this client "
                               "(native modules need the server's --allow-native)")
        if len(image) > self._quota.module_bytes:
            raise BackendError(Status.QUOTA_EXCEEDED,
                               f"module image of {len(image)} bytes exceeds the quota of {self._quota.module_bytes}")
        self.usage.charge("modules")
        try:
            self.compile_budget.begin()
        except BackendError:
            self.usage.refund("modules")
            raise
        return bytes(image), self._epoch

    def _unlocked(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the backend without the session lock, mapping errors as :func:`_guarded` does."""
        try:
            return fn(*args)
        except BackendError as exc:
            with self._lock:
                self._on_error(exc)
            raise
        except Exception as exc:  # a bug below us: never let it reach the guest raw
            _guest_log(log, logging.ERROR, "internal error in %s: %s", what, exc)
            log.debug("traceback", exc_info=True)
            err = BackendError(Status.INTERNAL, f"internal error in {what}: {type(exc).__name__}")
            with self._lock:
                self._on_error(err)
            raise err from exc

    def _load_done(self, token: object | None, kind: ModuleKind, epoch: int, seconds: float) -> int:
        """Charge the load's time; register its module (``token`` None: the load failed)."""
        with self._lock:
            self.compile_budget.end(seconds)
            if token is None:
                if self._epoch == epoch:
                    self.usage.refund("modules")
                return 0
            if self._closed or self._epoch != epoch or self.backend.stats.resets != epoch:
                if self._epoch == epoch:
                    self.usage.refund("modules")
                try:
                    self.backend.unload_module(token)
                except BackendError:
                    pass
                if self._closed:
                    raise BackendError(Status.INVALID_HANDLE, "the session closed while the module loaded")
                raise BackendError(Status.ABORTED, "the device context was reset while the module loaded; "
                                   "load it again")
            handle = self._new_handle(_TAG_MODULE)
            self._modules[handle] = _Module(token, kind, {})
            self.stats.modules_loaded += 1
            return handle

    @_guarded
    def unload_module(self, module: int) -> None:
        """Unload a module; its kernel handles become invalid.

        Raises:
            BackendError: INVALID_HANDLE.
        """
        mod: _Module = self._lookup(self._modules, module, "module")
        del self._modules[module]
        self.forget_plans()
        for kernel in mod.kernels.values():
            del self._kernels[kernel]
        self.usage.refund("kernels", len(mod.kernels))
        self.usage.refund("modules")
        self.backend.unload_module(mod.token)

    @_guarded
    def get_kernel(self, module: int, name: str) -> tuple[int, KernelInfo]:
        """Look up a kernel by name; returns ``(kernel handle, KernelInfo)``. Looking the same
        name up again returns the same handle.

        Raises:
            BackendError: INVALID_HANDLE, INVALID_ARGUMENT (bad name), NOT_FOUND, QUOTA_EXCEEDED.
        """
        mod: _Module = self._lookup(self._modules, module, "module")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_KERNEL_NAME:
            raise BackendError(Status.INVALID_ARGUMENT, f"kernel name must be 1..{MAX_KERNEL_NAME} characters")
        handle = mod.kernels.get(name)
        if handle is not None:
            return handle, self._kernels[handle].info
        self.usage.charge("kernels")
        try:
            token, info = self.backend.get_kernel(mod.token, name)
        except BaseException:
            self.usage.refund("kernels")
            raise
        handle = self._new_handle(_TAG_KERNEL)
        self._kernels[handle] = _Kernel(token, info, module)
        mod.kernels[name] = handle
        return handle, info

    @_guarded
    def launch(self, kernel: int, grid: tuple[int, ...], block: tuple[int, ...], args: bytes | memoryview,
               shared_bytes: int = 0, queue: int = DEFAULT_QUEUE) -> None:
        """Launch a kernel asynchronously on ``queue``.

        Raises:
            BackendError: INVALID_HANDLE, INVALID_ARGUMENT (shape, threads per block, shared
                memory, argument size), QUOTA_EXCEEDED (queue depth with the "fail" policy),
                KERNEL_FAULT / DEVICE_LOST (a fault surfaced; handles are invalidated).
        """
        self._launch(kernel, grid, block, args, shared_bytes, queue, False)

    @_guarded
    def launch_plan(self, kernel: int, grid: tuple[int, ...], block: tuple[int, ...], args: bytes | memoryview,
                    shared_bytes: int = 0, queue: int = DEFAULT_QUEUE) -> LaunchPlan | None:
        """:meth:`launch`, returning the plan that :meth:`relaunch` issues again (None when the
        launch gets none: a pointer argument inside no allocation).

        Raises:
            BackendError: as :meth:`launch`.
        """
        return self._launch(kernel, grid, block, args, shared_bytes, queue, True)

    @_guarded
    def relaunch(self, plan: LaunchPlan) -> bool:
        """Launch ``plan`` again: the depth accounting and the backend call, no other check,
        which is exact only while the plan generation is unchanged. False (nothing done) when
        the plan is stale: launch in full (:meth:`launch_plan`).

        Raises:
            BackendError: INVALID_HANDLE (closed session), QUOTA_EXCEEDED (queue depth with
                the "fail" policy), KERNEL_FAULT / DEVICE_LOST (a fault surfaced).
        """
        if plan.generation != self._plan_generation:
            return False
        q = plan.queue
        self._account(q)
        if plan.bounds is None:
            self.backend.launch(plan.kernel, plan.grid, plan.block, plan.args, plan.shared_bytes, q.token)
        else:
            self.backend.launch(plan.kernel, plan.grid, plan.block, plan.args, plan.shared_bytes, q.token,
                                bounds=plan.bounds)
        self.stats.launches += 1
        return True

    def _launch(self, kernel: int, grid: tuple[int, ...], block: tuple[int, ...], args: bytes | memoryview,
                shared_bytes: int, queue: int, plan: bool) -> LaunchPlan | None:
        k: _Kernel = self._lookup(self._kernels, kernel, "kernel")
        grid3, block3 = _dims3(grid), _dims3(block)
        threads = block3[0] * block3[1] * block3[2]
        if threads > self._props.max_threads_per_block:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"{threads} threads per block exceed the device limit {self._props.max_threads_per_block}")
        limit = self._props.max_shared_memory_per_block
        if not 0 <= shared_bytes <= limit - k.info.static_shared_bytes:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"dynamic shared memory {shared_bytes} + static {k.info.static_shared_bytes} "
                               f"exceeds the device limit {limit}")
        if len(args) != k.info.args_size:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"kernel {k.info.name!r} takes {k.info.args_size} bytes of arguments, got {len(args)}")
        q = self._submit(queue)
        data = bytes(args)
        bounds = None
        if k.info.checked:
            bounds = launch_bounds(k.info, data, self._allocation_at)
            self.backend.launch(k.token, grid3, block3, data, shared_bytes, q.token, bounds=bounds)
        else:
            self.backend.launch(k.token, grid3, block3, data, shared_bytes, q.token)
        self.stats.launches += 1
        if not plan or (bounds is not None and (0, 0) in bounds):
            return None
        return LaunchPlan(self._plan_generation, k.token, grid3, block3, data, shared_bytes, q, bounds)

    # -- native issue (the device model's fast lane) ------------------------------------
    @_guarded
    def plan_generation(self) -> int:
        """The current plan generation, after noticing another client's context reset (a
        native copy of this session's plans is valid only while it is unchanged).

        Raises:
            BackendError: INVALID_HANDLE (closed session).
        """
        return self._plan_generation

    def allocation_table(self) -> list[tuple[int, int]]:
        """``(start, size)`` of every live allocation, by address (:attr:`allocation_version`
        moves whenever this changes)."""
        with self._lock:
            return [(start, self._allocs[start]) for start in self._alloc_starts]

    def queue_token(self, queue: int) -> object | None:
        """The backend token of ``queue`` (None for the default queue or an unknown handle)."""
        with self._lock:
            q = self._queues.get(queue)
            return None if q is None else q.token

    def note_native_work(self, queue: int, ops: int, launches: int, bytes_htod: int, bytes_dtoh: int,
                         checked: int) -> None:
        """Account work a native issuer put on ``queue`` after :meth:`plan_generation` and the
        checks this session would make (plans, :meth:`allocation_table`, the depth quota):
        ``ops`` operations, of them ``launches`` launches (``checked`` of checked kernels), and
        the bytes copied, exactly as :meth:`relaunch` and :meth:`copy_address` count them; the
        backend is told too. An unknown queue is ignored (nothing was issued on it)."""
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return
            q.pending += ops
            self.stats.launches += launches
            self.stats.bytes_htod += bytes_htod
            self.stats.bytes_dtoh += bytes_dtoh
            self.backend.note_native_work(q.token, launches, checked, bytes_htod, bytes_dtoh)  # type: ignore[attr-defined]

    def note_native_sync(self, waits: int = 1) -> None:
        """Account ``waits`` device-wide waits a native issuer made that surfaced no error (a
        FENCE): as :meth:`synchronize` with no queue does."""
        with self._lock:
            self.stats.synchronizes += waits
            for q in self._queues.values():
                q.pending = 0
            self.backend.note_native_sync()  # type: ignore[attr-defined]

    # -- ordering ---------------------------------------------------------------------
    @_guarded
    def create_queue(self) -> int:
        """Create an ordered queue; returns its handle.

        Raises:
            BackendError: QUOTA_EXCEEDED.
        """
        self.usage.charge("queues")
        try:
            token = self.backend.create_queue()
        except BaseException:
            self.usage.refund("queues")
            raise
        handle = self._new_handle(_TAG_QUEUE)
        self._queues[handle] = _Queue(token)
        return handle

    @_guarded
    def destroy_queue(self, queue: int) -> None:
        """Wait for and destroy a queue. The default queue cannot be destroyed.

        Raises:
            BackendError: INVALID_HANDLE; KERNEL_FAULT if pending work faulted.
        """
        if queue == DEFAULT_QUEUE:
            raise BackendError(Status.INVALID_HANDLE, "the default queue cannot be destroyed")
        q = self._queue(queue)
        del self._queues[queue]
        self.forget_plans()
        self.usage.refund("queues")
        self.backend.destroy_queue(q.token)

    @_guarded
    def create_event(self) -> int:
        """Create an event; returns its handle.

        Raises:
            BackendError: QUOTA_EXCEEDED.
        """
        self.usage.charge("events")
        try:
            token = self.backend.create_event()
        except BaseException:
            self.usage.refund("events")
            raise
        handle = self._new_handle(_TAG_EVENT)
        self._events[handle] = token
        return handle

    @_guarded
    def destroy_event(self, event: int) -> None:
        """Destroy an event.

        Raises:
            BackendError: INVALID_HANDLE.
        """
        token = self._lookup(self._events, event, "event")
        del self._events[event]
        self.usage.refund("events")
        self.backend.destroy_event(token)

    @_guarded
    def record_event(self, event: int, queue: int = DEFAULT_QUEUE) -> None:
        """Record ``event`` on ``queue`` (it completes when the work before it has).

        Raises:
            BackendError: INVALID_HANDLE.
        """
        token = self._lookup(self._events, event, "event")
        q = self._submit(queue)
        self.backend.record_event(token, q.token)

    @_guarded
    def event_elapsed_ms(self, start: int, end: int) -> float:
        """Milliseconds between two recorded events (waits for both to complete).

        Raises:
            BackendError: INVALID_HANDLE; INVALID_ARGUMENT if either was never recorded.
        """
        t0 = self._lookup(self._events, start, "event")
        t1 = self._lookup(self._events, end, "event")
        return self.backend.event_elapsed_ms(t0, t1)

    @_guarded
    def synchronize(self, queue: int | None = None) -> None:
        """Wait for one queue, or for all of this client's work when ``queue`` is ``None``.
        (The default queue is the backend's ``None`` queue, so waiting for it waits for the
        whole device; that is a superset, never less.)

        Raises:
            BackendError: INVALID_HANDLE; KERNEL_FAULT / DEVICE_LOST (handles are invalidated).
        """
        self.stats.synchronizes += 1
        if queue is None:
            self.backend.synchronize(None)
            for q in self._queues.values():
                q.pending = 0
        else:
            q = self._queue(queue)
            self.backend.synchronize(q.token)
            q.pending = 0

    # -- life cycle and figures ---------------------------------------------------------
    def statistics(self) -> dict[str, float]:
        """Flat metrics of this session, its pool and the backend (see :func:`stats.metrics`),
        plus the backend's own ``extra_stats()`` if it has one (e.g. the NPU's provider runs)."""
        with self._lock:
            out = metrics(self.stats, self.pool.stats(), self.backend.stats)
            out["vxpu_session_memory_bytes"] = self.usage.memory_bytes
            out["vxpu_session_live_allocations"] = self.usage.allocations
            extra = getattr(self.backend, "extra_stats", None)
            if callable(extra):
                out.update(extra())
            return out

    def close(self) -> None:
        """Wait for the client's work and release everything it holds (idempotent, never raises)."""
        with self._lock:
            if self._closed:
                return
            try:
                self._check_epoch()
                self._teardown()
            except BackendError as exc:
                self.log.warning("error while closing session: %s", exc)
            except Exception:
                self.log.exception("internal error while closing session")
            finally:
                self._closed = True
                self.forget_plans()
            for token in self._host_tokens:
                try:
                    self.backend.unregister_host(token)
                except Exception as exc:  # noqa: BLE001 - never raise from close
                    self.log.warning("unregistering host memory failed: %s", exc)
            self._host_tokens.clear()

    def _teardown(self) -> None:
        try:
            self.backend.synchronize(None)
        except BackendError as exc:
            if self._context_lost(exc):
                self._invalidate()     # everything is gone already
                return
            raise
        for token in self._events.values():
            self.backend.destroy_event(token)
        for handle, q in self._queues.items():
            if handle != DEFAULT_QUEUE:
                self.backend.destroy_queue(q.token)
        for mod in self._modules.values():
            self.backend.unload_module(mod.token)
        self.pool.release()
        self._invalidate()

    def __enter__(self) -> Session:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
