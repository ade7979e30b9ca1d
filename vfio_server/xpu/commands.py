"""The accelerator's command table: one handler per opcode, run on the accel Session.

:class:`Executor` runs one parsed descriptor at a time on the poller thread and returns the
completion's ``(status, result, result2)``. Every handler parses and checks first, then acts:

* **Descriptor.** Reserved flag bits, a malformed scatter-gather list (inline ``sg_count``
  above 1, an inline list of zero entries with a non-zero address or length, an indirect list
  of 0 or more than ``MAX_SG_ENTRIES`` entries or with ``sg_len != 0``, a zero-length entry),
  or an SG list on a command that takes none are BAD_DESCRIPTOR. An unknown opcode is
  UNSUPPORTED.
* **Guest memory.** Every SG entry (and an indirect list itself) must lie inside one
  fd-backed DMA map, writable where the device writes; otherwise OUT_OF_RANGE. A total above
  ``MAX_TRANSFER_BYTES`` (or the command's own limit) is INVALID_ARGUMENT; the sum is computed
  on Python integers, so it cannot wrap.
* **Device memory and handles.** The session checks them (OUT_OF_RANGE, INVALID_HANDLE ...).

Guest memory is only touched with :attr:`GuestRam.lock` held, through :meth:`Executor.guest`,
which also checks that no device reset or disconnect happened meanwhile (:class:`Abandoned`).
Backend calls that may wait (compiles, FENCE, frees, event waits) run without that lock, so
a DMA_UNMAP on the serve loop never waits for them.

LAUNCH plans: a LAUNCH whose kernel handle, dims words, queue and argument bytes (read from
guest RAM for every command, after the same SG checks) match an earlier successful one reuses
the session's :class:`~vxpu.accel.session.LaunchPlan` (:meth:`Session.relaunch`: the depth
accounting and the backend call). The session refuses a plan made before any free, module
unload, context reset, quota change or close, and the LAUNCH is then checked in full, so a
stale handle fails exactly as without the cache. At most :data:`MAX_PLANS` are kept.

Asynchronous errors (KERNEL_FAULT, TIMEOUT, DEVICE_LOST surfacing from earlier work) complete
the command during which they surfaced with that status, and are also kept until the next
FENCE, which reports the first of them.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from typing import NamedTuple

from vxpu.accel.backend import BackendError, ModuleKind
from vxpu.accel.session import DEFAULT_QUEUE, LaunchPlan, Session
from vxpu.vfio_server.xpu.guestram import GuestFault, GuestRam, RamRegion
from vxpu.vfio_server.xpu.stats import DeviceStats

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import DescFlags, Feature, Opcode

log = logging.getLogger(__name__)

U64_MAX = (1 << 64) - 1
ASYNC_ERRORS = frozenset({Status.KERNEL_FAULT, Status.TIMEOUT, Status.DEVICE_LOST})
MAX_INFER_REQUEST = 4096
MAX_PLANS = 256                  # LAUNCH plans kept per device (all dropped when full)
_KINDS = {abi.ModuleKind.IR: ModuleKind.IR, abi.ModuleKind.PTX: ModuleKind.PTX,
          abi.ModuleKind.CUBIN: ModuleKind.CUBIN, abi.ModuleKind.HSACO: ModuleKind.HSACO,
          abi.ModuleKind.ONNX: ModuleKind.ONNX}
_KIND_FEATURE = {abi.ModuleKind.IR: Feature.IR, abi.ModuleKind.PTX: Feature.PTX,
                 abi.ModuleKind.CUBIN: Feature.CUBIN, abi.ModuleKind.HSACO: Feature.HSACO,
                 abi.ModuleKind.ONNX: Feature.ONNX}
_NO_SG = frozenset(int(op) for op in (Opcode.NOP, Opcode.MEM_ALLOC, Opcode.MEM_FREE, Opcode.MEM_SET,
                                       Opcode.MEM_COPY_DTOD, Opcode.MODULE_UNLOAD, Opcode.FENCE,
                                       Opcode.EVENT_CREATE, Opcode.EVENT_DESTROY, Opcode.EVENT_RECORD,
                                       Opcode.EVENT_QUERY, Opcode.EVENT_ELAPSED, Opcode.RESET))
_U64 = struct.Struct("<Q")
_SG_INDIRECT = int(DescFlags.SG_INDIRECT)
_OK = int(Status.OK)
_FLAGS_RESERVED = ~int(abi.DESC_FLAGS_MASK)
_MAX_BLOCK_DIM = abi.MAX_BLOCK_DIM


class Abandoned(Exception):
    """A device reset or disconnect happened while the command ran: post no completion."""


class Desc(NamedTuple):
    """One submission descriptor, decoded (the fields of :data:`vxpu.abi.xpu.DESCRIPTOR`, in
    order). A named tuple: :meth:`Executor.execute` makes one per command from the raw tuple
    with ``tuple.__new__``, which costs a fraction of a dataclass's ``__init__``."""

    opcode: int
    flags: int
    sg_count: int
    tag: int
    a0: int
    a1: int
    a2: int
    a3: int
    sg_addr: int
    sg_len: int


_make_desc = tuple.__new__


Result = tuple[int, int]
Segment = tuple[RamRegion, int, int]          # region, offset in it, length


class Executor:
    """Runs descriptors on the current session (see the module docstring).

    Args:
        ram: the guest-RAM snapshot.
        session: a callable returning the current session (it changes at resets).
        alive: a callable returning the device epoch; a change means "abandon".
        features: the device's Feature bits.
        identity: a callable returning the IDENTIFY document.
        stats: a callable returning the STATS document.
        reset: the RESET command's action (drop the guest's device state).
        counters: the device statistics (bytes moved).
    """

    def __init__(self, ram: GuestRam, session: Callable[[], Session], alive: Callable[[], int],
                 features: int, identity: Callable[[], bytes], stats: Callable[[], bytes],
                 reset: Callable[[], None], counters: DeviceStats) -> None:
        self.ram = ram
        self._session = session
        self._alive = alive
        self.features = features
        self._identity = identity
        self._stats = stats
        self._reset = reset
        self.counters = counters
        self.async_error: Status | None = None
        self.epoch = alive()
        self.defer_sync = False        # DTOH leaves its synchronization to the caller (batches)
        self.sync_pending = False      # ... and says so here
        self.queued = 0                # backend operations issued since the last full synchronize
        self._section = _GuestSection(self)
        self.events: dict[int, bool] = {}      # this guest's event handles -> recorded yet
        #: LAUNCH plans: (kernel, dims words, queue, argument bytes) -> the session's LaunchPlan
        self._plans: dict[tuple[int, int, int, int, int, bytes], LaunchPlan] = {}
        self.max_plans = MAX_PLANS                 # 0: no plan cache (every LAUNCH checked in full)
        self.plan_drops = 0                        # times forget_plans() dropped them all
        #: told of every plan a LAUNCH made or reused (the native fast lane keeps its own copy)
        self.plan_hook: Callable[[tuple[int, int, int, int, int, bytes], LaunchPlan, int], None] | None = None
        self._queue = DEFAULT_QUEUE
        self._queue_session: Session | None = None     # the session and its invalidation count the
        self._queue_drops = -1                         # queue is for
        self._table: dict[int, Callable[[Desc], Result]] = {
            Opcode.NOP: lambda d: (0, 0),
            Opcode.IDENTIFY: lambda d: self._write_doc(d, self._identity()),
            Opcode.MEM_ALLOC: self._alloc, Opcode.MEM_FREE: self._free, Opcode.MEM_SET: self._memset,
            Opcode.MEM_COPY_HTOD: self._htod, Opcode.MEM_COPY_DTOH: self._dtoh,
            Opcode.MEM_COPY_DTOD: self._dtod, Opcode.MODULE_LOAD: self._module_load,
            Opcode.MODULE_UNLOAD: self._module_unload, Opcode.KERNEL_GET: self._kernel_get,
            Opcode.LAUNCH: self._launch, Opcode.FENCE: self._fence,
            Opcode.EVENT_CREATE: self._event_create,
            Opcode.EVENT_DESTROY: self._event_destroy, Opcode.EVENT_RECORD: self._event_record,
            Opcode.EVENT_QUERY: self._event_query, Opcode.EVENT_ELAPSED: self._event_elapsed,
            Opcode.INFER: self._infer, Opcode.STATS: lambda d: self._write_doc(d, self._stats()),
            Opcode.RESET: self._reset_cmd,
        }

    @property
    def session(self) -> Session:
        return self._session()

    @property
    def queue(self) -> int:
        """The session queue all of this guest's work goes to, in order. Not the backend's
        default queue: on CUDA that is the legacy stream, where copies are synchronous; a queue
        of its own makes them asynchronous (cuMemcpyHtoDAsync), so a batch of copies overlaps.
        Made again for a new session and after a context reset dropped it."""
        s = self._session()
        if s is self._queue_session and s.stats.invalidations == self._queue_drops:
            return self._queue
        try:
            self._queue = s.create_queue()
        except BackendError as exc:
            log.debug("no queue of its own (%s); using the default queue", exc)
            self._queue = DEFAULT_QUEUE
        self._queue_session, self._queue_drops = s, s.stats.invalidations
        return self._queue

    def made_queue(self) -> int | None:
        """:attr:`queue` when it is already made for the current session, else None (it is made
        by the first command that needs it, so a native issuer never makes one first)."""
        s = self._session()
        if s is self._queue_session and s.stats.invalidations == self._queue_drops:
            return self._queue
        return None

    # -- entry point ---------------------------------------------------------------------------
    def execute(self, raw: tuple[int, ...]) -> tuple[int, int, int, int]:
        """``(tag, status, result, result2)`` for one raw descriptor.

        Raises:
            Abandoned: a reset or disconnect happened meanwhile (post nothing).
        """
        d: Desc = _make_desc(Desc, raw)
        dropped_before = self._session().stats.invalidations
        try:
            handler = self._check_descriptor(d)
            result, result2 = handler(d)
            return d.tag, _OK, result, result2
        except GuestFault as exc:
            log.debug("command %#x refused: %s", d.opcode, exc)
            needed = exc.needed if isinstance(exc, _TooSmall) else 0
            return d.tag, exc.status, 0, needed | self._dropped_bit(exc.status, dropped_before)
        except BackendError as exc:
            log.debug("command %#x failed: %s", d.opcode, exc)
            if exc.status in ASYNC_ERRORS and self.async_error is None:
                self.async_error = exc.status
            return d.tag, exc.status, 0, self._dropped_bit(exc.status, dropped_before)

    def _state_drops(self) -> int:
        """How often a context reset has dropped this guest's handles (session lifetime)."""
        return self.session.stats.invalidations

    def _dropped_bit(self, status: Status, before: int) -> int:
        """:data:`vxpu.abi.xpu.CPL_STATE_DROPPED` when this failing command saw a context reset
        drop the guest's allocations, modules and events (a contained checked-IR fault keeps
        them, so the guest must not guess from the status alone)."""
        if status in ASYNC_ERRORS and self._state_drops() != before:
            return abi.CPL_STATE_DROPPED
        return 0

    def _check_descriptor(self, d: Desc) -> Callable[[Desc], Result]:
        """The opcode's handler, once the descriptor's opcode, flags and SG shape are valid.

        Raises:
            GuestFault: UNSUPPORTED (unknown opcode), BAD_DESCRIPTOR (see the module docstring).
        """
        handler = self._table.get(d.opcode)
        if handler is None:
            raise GuestFault(Status.UNSUPPORTED, f"unknown opcode {d.opcode:#x}")
        flags, count = d.flags, d.sg_count
        if flags & _FLAGS_RESERVED:
            raise GuestFault(Status.BAD_DESCRIPTOR, f"reserved descriptor flags {flags:#x}")
        if flags & _SG_INDIRECT:
            if not 1 <= count <= abi.MAX_SG_ENTRIES or d.sg_len:
                raise GuestFault(Status.BAD_DESCRIPTOR, f"indirect SG list of {count} entries, sg_len {d.sg_len}")
        elif count > abi.MAX_INLINE_SG_COUNT or (count == 0 and (d.sg_addr or d.sg_len)) \
                or (count == 1 and d.sg_len == 0):
            raise GuestFault(Status.BAD_DESCRIPTOR, f"inline SG of {count} entries ({d.sg_addr:#x}+{d.sg_len})")
        if count and d.opcode in _NO_SG:
            raise GuestFault(Status.BAD_DESCRIPTOR, f"opcode {d.opcode:#x} takes no scatter-gather list")
        return handler

    # -- guest memory --------------------------------------------------------------------------
    def guest(self) -> _GuestSection:
        """``with executor.guest():`` holds the guest-RAM lock and raises :class:`Abandoned` if
        the device was reset meanwhile."""
        return self._section

    def _sg_list(self, d: Desc) -> list[tuple[int, int]]:
        """The descriptor's ``(addr, length)`` entries (caller holds the lock).

        Raises:
            GuestFault: OUT_OF_RANGE for an indirect list outside guest RAM, BAD_DESCRIPTOR for a
                zero-length entry.
        """
        if d.sg_count == 0:
            return []
        if not d.flags & _SG_INDIRECT:
            return [(d.sg_addr, d.sg_len)]
        blob = self.ram.read(d.sg_addr, d.sg_count * abi.SG_ENTRY.size)
        entries = list(abi.SG_ENTRY.iter_unpack(blob))
        if any(length == 0 for _addr, length in entries):
            raise GuestFault(Status.BAD_DESCRIPTOR, "zero-length scatter-gather entry")
        return entries

    def _segments(self, d: Desc, write: bool, limit: int = abi.MAX_TRANSFER_BYTES) -> tuple[list[Segment], int]:
        """Resolve the SG list to guest-RAM segments, coalescing contiguous ones (lock held).

        Raises:
            GuestFault: BAD_DESCRIPTOR, OUT_OF_RANGE, or INVALID_ARGUMENT above ``limit`` bytes.
        """
        if d.sg_count == 1 and not d.flags & _SG_INDIRECT:     # inline: one entry, no list to read
            length = d.sg_len
            if length > limit:
                raise GuestFault(Status.INVALID_ARGUMENT, f"{length} bytes exceed the limit of {limit}")
            ram, off = self.ram.find(d.sg_addr, length, write)
            return [(ram, off, length)], length
        entries = self._sg_list(d)
        total = sum(length for _addr, length in entries)
        if total > limit:
            raise GuestFault(Status.INVALID_ARGUMENT, f"{total} bytes exceed the limit of {limit}")
        out: list[Segment] = []
        for addr, length in entries:
            ram, off = self.ram.find(addr, length, write)
            if out and out[-1][0] is ram and out[-1][1] + out[-1][2] == off:
                out[-1] = (ram, out[-1][1], out[-1][2] + length)
            else:
                out.append((ram, off, length))
        return out, total

    def _read_sg(self, d: Desc, limit: int) -> bytes:
        """The bytes the SG list names (at most ``limit``), copied out of guest RAM."""
        if not d.sg_count:
            return b""
        if d.sg_count == 1 and not d.flags & _SG_INDIRECT:     # inline: _segments' checks, in its order
            length = d.sg_len
            with self.guest():
                if length > limit:
                    raise GuestFault(Status.INVALID_ARGUMENT, f"{length} bytes exceed the limit of {limit}")
                ram, off = self.ram.find(d.sg_addr, length, False)
                return ram.view[off:off + length].tobytes()
        with self.guest():
            segs, _total = self._segments(d, False, limit)
            if len(segs) == 1:
                ram, off, n = segs[0]
                return ram.view[off:off + n].tobytes()
            return b"".join(bytes(ram.view[off:off + n]) for ram, off, n in segs)

    def _write_doc(self, d: Desc, data: bytes) -> Result:
        """IDENTIFY/STATS: write ``data`` to the SG buffer; INVALID_ARGUMENT (result2 = the
        size needed) when it does not fit."""
        with self.guest():
            segs, total = self._segments(d, True)
            if total < len(data):
                raise _TooSmall(len(data))
            pos = 0
            for ram, off, n in segs:
                take = min(n, len(data) - pos)
                if take <= 0:
                    break
                ram.view[off:off + take] = data[pos:pos + take]
                pos += take
        return len(data), 0

    # -- memory --------------------------------------------------------------------------------
    def _alloc(self, d: Desc) -> Result:
        return self.session.alloc(d.a0), 0

    def _free(self, d: Desc) -> Result:
        self.session.free(d.a0)
        return 0, 0

    def _memset(self, d: Desc) -> Result:
        addr, value, length = d.a0, d.a1, d.a2
        if value > 0xFF:
            raise GuestFault(Status.INVALID_ARGUMENT, f"MEM_SET value {value:#x} is not a byte")
        self.session.memset(addr, value, length, self.queue)
        self.queued += 1
        self.counters.bytes_memset += length
        return 0, 0

    def _dtod(self, d: Desc) -> Result:
        self.session.copy_dtod(d.a0, d.a1, d.a2, self.queue)
        self.queued += 1
        self.counters.bytes_dtod += d.a2
        return 0, 0

    def _htod(self, d: Desc) -> Result:
        n = self._copy_inline(d, True) if d.sg_count == 1 and not d.flags & _SG_INDIRECT else -1
        self.counters.bytes_htod += n if n >= 0 else self._copy(d, to_device=True)
        self._consumed()                # HTOD completes once its guest bytes were read
        return 0, 0

    def _dtoh(self, d: Desc) -> Result:
        n = self._copy_inline(d, False) if d.sg_count == 1 and not d.flags & _SG_INDIRECT else -1
        self.counters.bytes_dtoh += n if n >= 0 else self._copy(d, to_device=False)
        self._consumed()                # DTOH completes when the bytes are in guest RAM
        return 0, 0

    def _copy_inline(self, d: Desc, to_device: bool) -> int:
        """The common copy in one step: one inline SG entry in a region registered with the
        backend, one :meth:`Session.copy_address` (the same checks, in the same order, as
        :meth:`_copy`: transfer limit, guest range, device range, queue room). Returns the
        bytes, or -1 when the region is not registered (then :meth:`_copy` does it)."""
        length = d.sg_len
        if length > abi.MAX_TRANSFER_BYTES:
            raise GuestFault(Status.INVALID_ARGUMENT, f"{length} bytes exceed the limit of {abi.MAX_TRANSFER_BYTES}")
        for reserve in (self.queued, None):     # None: after waiting for the queue, no room check
            s = self._session()
            q = self.queue
            with self.guest():
                ram, off = self.ram.find(d.sg_addr, length, not to_device)
                if ram.token is None:
                    return -1
                if s.copy_address(to_device, d.a0, ram.host_base + off, length, q, reserve):
                    self.queued += 1
                    return length
            self._synchronize()         # without the lock: earlier kernels may take a while
        raise AssertionError("copy_address without a room check issued nothing")

    def _consumed(self) -> None:
        """The copy just issued must be done with guest RAM before its completion is posted:
        in a batch the poller synchronizes once for all such copies (:attr:`sync_pending`),
        else synchronize now."""
        if self.defer_sync:
            self.sync_pending = True
        else:
            self._synchronize()

    def _copy(self, d: Desc, to_device: bool) -> int:
        """Issue one HTOD/DTOH's copies; returns the bytes. The copies are issued with the
        guest-RAM lock held, so no unmap can race a queued raw-address copy. So the backend queue
        must have room for them first: a full queue makes the session wait for earlier work,
        and a DMA map change or device reset on the serve loop would wait as long."""
        total = self._issue(d, to_device, need_room=True)
        if total is None:
            self._synchronize()         # without the lock: earlier kernels may take a while
            total = self._issue(d, to_device, need_room=False)
        assert total is not None
        return total

    def _issue(self, d: Desc, to_device: bool, need_room: bool) -> int | None:
        """Translate and issue the copies (None when ``need_room`` and the queue is too full)."""
        s = self._session()
        q = self.queue
        dev = d.a0
        with self.guest():
            segs, total = self._segments(d, not to_device)
            s.check_range(dev, total)
            # The session's own count too: a wait or launch that failed leaves it above ours.
            if need_room and max(self.queued, s.pending(q)) + len(segs) >= s.quota.queue_depth:
                return None
            for ram, off, n in segs:
                if to_device:
                    if ram.token is not None:
                        s.copy_htod_address(dev, ram.host_base + off, n, q)
                    else:
                        s.copy_htod(dev, ram.view[off:off + n], q)    # the backend keeps the view while queued
                elif ram.token is not None:
                    s.copy_dtoh_address(ram.host_base + off, dev, n, q)
                else:
                    s.copy_dtoh(ram.view[off:off + n], dev, q)
                dev += n
            self.queued += len(segs)
        return total

    def _synchronize(self) -> None:
        self.queued = 0
        self.session.synchronize()

    def synchronize_deferred(self) -> Status | None:
        """Wait for the DTOHs whose synchronization was deferred; the asynchronous error that
        surfaced while waiting (also kept for the next FENCE), or None."""
        try:
            self._synchronize()
        except BackendError as exc:
            if exc.status in ASYNC_ERRORS and self.async_error is None:
                self.async_error = exc.status
            return exc.status
        return None

    # -- code ----------------------------------------------------------------------------------
    def _module_load(self, d: Desc) -> Result:
        kind = d.a0
        if kind not in _KINDS:
            raise GuestFault(Status.INVALID_ARGUMENT, f"unknown module kind {kind}")
        if not self.features & _KIND_FEATURE[abi.ModuleKind(kind)]:
            raise GuestFault(Status.UNSUPPORTED, f"{abi.ModuleKind(kind).name} modules are not enabled on this device")
        limit = self.session.quota.module_bytes
        with self.guest():
            _segs, total = self._segments(d, False)
            if total > limit:
                raise GuestFault(Status.QUOTA_EXCEEDED, f"module image of {total} bytes exceeds the quota of {limit}")
        image = self._read_sg(d, limit)
        if not image:
            raise GuestFault(Status.BAD_MODULE, "empty module image")
        return self.session.load_module(image, _KINDS[abi.ModuleKind(kind)]), 0

    def _module_unload(self, d: Desc) -> Result:
        self.session.unload_module(d.a0)
        return 0, 0

    def _kernel_get(self, d: Desc) -> Result:
        raw = self._read_sg(d, abi.MAX_NAME_BYTES)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GuestFault(Status.INVALID_ARGUMENT, "kernel name is not UTF-8") from None
        if not name or "\0" in name:
            raise GuestFault(Status.INVALID_ARGUMENT, "kernel name is empty or contains NUL")
        handle, info = self.session.get_kernel(d.a0, name)
        return handle, info.args_size

    def _launch(self, d: Desc) -> Result:
        """LAUNCH through the plan cache (see the module docstring): the argument blob is read
        from guest RAM every time and is part of the key; a plan the session no longer vouches
        for (its generation moved) is checked in full again, like a miss."""
        try:
            blob = self._read_sg(d, abi.MAX_ARG_BYTES)
        except GuestFault:
            self._launch_dims(d)       # a shape error is reported first, as it always was
            raise
        q = self.queue
        key = (d.a0, d.a1, d.a2, d.a3, q, blob)
        plan = self._plans.get(key)
        if plan is None or not self._session().relaunch(plan):
            grid, block, shared = self._launch_dims(d)
            plan = self._session().launch_plan(d.a0, grid, block, blob, shared, q)
            if plan is not None and self.max_plans:
                if len(self._plans) >= self.max_plans:
                    self._plans.clear()
                self._plans[key] = plan
        if plan is not None and self.max_plans and self.plan_hook is not None:
            self.plan_hook(key, plan, self.plan_drops)
        self.queued += 1
        return 0, 0

    @staticmethod
    def _launch_dims(d: Desc) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
        """LAUNCH's ``(grid, block, shared bytes)``; INVALID_ARGUMENT for a zero or too large
        dimension (the session checks the rest)."""
        grid, block, shared = abi.unpack_launch_dims(d.a1, d.a2, d.a3)
        if block[0] > _MAX_BLOCK_DIM or 0 in grid or 0 in block:
            raise GuestFault(Status.INVALID_ARGUMENT, f"grid {grid} / block {block} out of range")
        return grid, block, shared

    def forget_plans(self) -> None:
        """Drop the launch plans (a reset, a bus-master loss, a DMA map change: none of them can
        make a plan wrong, the session's generation covers that, but none is worth keeping)."""
        self._plans = {}
        self.plan_drops += 1

    def _infer(self, d: Desc) -> Result:
        if not self.features & Feature.ONNX:
            raise GuestFault(Status.UNSUPPORTED, "INFER needs an ONNX-capable device (Feature.ONNX)")
        try:
            req = json.loads(self._read_sg(d, MAX_INFER_REQUEST))
            values = [*req.get("inputs", []), *req.get("outputs", []), *req.get("dims", [])]
            blob = b"".join(_U64.pack(int(v)) for v in values)
        except (ValueError, TypeError, AttributeError, struct.error, OverflowError, RecursionError):
            raise GuestFault(Status.INVALID_ARGUMENT, "INFER request is not the documented JSON") from None
        kernel, _info = self.session.get_kernel(d.a0, "main")
        self.session.launch(kernel, (1,), (1,), blob, 0, self.queue)
        self.queued += 1
        return 0, 0

    # -- ordering ------------------------------------------------------------------------------
    def _fence(self, d: Desc) -> Result:
        """Wait for the guest's work, unless none was issued since the last synchronization
        (which surfaced any asynchronous error of what came before it); then report the first
        asynchronous error since the previous FENCE."""
        try:
            if self.queued:
                self._synchronize()
        except BackendError as exc:
            if exc.status not in ASYNC_ERRORS:
                raise
            if self.async_error is None:
                self.async_error = exc.status
        err, self.async_error = self.async_error, None
        if err is not None:        # a GuestFault: reported here, not recorded again
            raise GuestFault(err, "an earlier command failed asynchronously")
        return 0, 0

    def _event_create(self, d: Desc) -> Result:
        handle = self.session.create_event()
        if len(self.events) >= 2 * self.session.quota.events:
            self.events.clear()         # stale entries (a context reset dropped those events)
        self.events[handle] = False
        return handle, 0

    def _event_destroy(self, d: Desc) -> Result:
        self.session.destroy_event(d.a0)
        self.events.pop(d.a0, None)
        return 0, 0

    def _event_record(self, d: Desc) -> Result:
        self.session.record_event(d.a0, self.queue)
        if d.a0 in self.events:
            self.events[d.a0] = True
        self.queued += 1
        return 0, 0

    def _check_recorded(self, *handles: int) -> None:
        """INVALID_ARGUMENT for an event of this guest that was never recorded, the same on every
        backend (CUDA itself would say INVALID_HANDLE); unknown handles are left to the session."""
        for handle in handles:
            if self.events.get(handle) is False:
                raise GuestFault(Status.INVALID_ARGUMENT, f"event {handle:#x} was never recorded")

    def _event_query(self, d: Desc) -> Result:
        """1 when the event was reached, 0 while pending. A GPU backend answers at once (an
        elapsed time of a pending event is INVALID_ARGUMENT); the CPU backend waits for it."""
        self._check_recorded(d.a0)
        try:
            self.session.event_elapsed_ms(d.a0, d.a0)
        except BackendError as exc:
            if exc.status is not Status.INVALID_ARGUMENT:
                raise
            return 0, 0
        return 1, 0

    def _event_elapsed(self, d: Desc) -> Result:
        """Nanoseconds between two recorded events, waiting for them where the backend does not
        (a GPU backend refuses pending events: wait for the device, then ask again)."""
        self._check_recorded(d.a0, d.a1)
        try:
            ms = self.session.event_elapsed_ms(d.a0, d.a1)
        except BackendError as exc:
            if exc.status is not Status.INVALID_ARGUMENT:
                raise
            self._synchronize()
            ms = self.session.event_elapsed_ms(d.a0, d.a1)
        return max(0, int(ms * 1e6)), 0

    def _reset_cmd(self, d: Desc) -> Result:
        self._reset()
        self.forget_plans()
        self.events.clear()
        self.queued = 0
        self.async_error = None
        return 0, 0


class _GuestSection:
    """The context manager behind :meth:`Executor.guest` (a plain class: this is on the path of
    every command that touches guest memory, and generator-based context managers cost more)."""

    __slots__ = ("_ex",)

    def __init__(self, executor: Executor) -> None:
        self._ex = executor

    def __enter__(self) -> GuestRam:
        ex = self._ex
        ex.ram.lock.acquire()
        if ex._alive() != ex.epoch:
            ex.ram.lock.release()
            raise Abandoned()
        return ex.ram

    def __exit__(self, *exc: object) -> None:
        self._ex.ram.lock.release()


class _TooSmall(GuestFault):
    """IDENTIFY/STATS buffer too small; ``needed`` goes to result2."""

    def __init__(self, needed: int) -> None:
        super().__init__(Status.INVALID_ARGUMENT, f"buffer too small: {needed} bytes needed")
        self.needed = needed
