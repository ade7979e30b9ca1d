"""The ring driver: one submission ring and one completion ring in guest memory.

This is the layer under :mod:`vxpu.guest.sdk` that speaks the queue protocol of
:mod:`vxpu.abi.xpu` over any :class:`~vxpu.guest.transport.Transport`::

    ring = Ring(transport, sq_entries=1024)
    ring.start()                                      # program BAR0, QUEUE_ENABLE
    seq = ring.submit(Opcode.MEM_ALLOC, 4096, waited=True)
    status, result, _ = ring.wait(seq)

One physically contiguous DMA block holds, in order: the queue header (one 4 KiB page), the
submission ring, the completion ring, and a *side area* of :data:`SIDE_BYTES` per submission
slot, for the data a descriptor points to that must live as long as the command (a launch's
argument blob, an indirect scatter-gather list). The slot of a descriptor is its sequence
number modulo the ring size, and so is its side area.

Hot paths: :meth:`Ring.post` writes the descriptor with one precompiled ``pack_into`` and
publishes inline; :meth:`Ring.post_packed` packs a launch's arguments straight into the slot's
side area and :meth:`Ring.post_inline` copies a blob there, each in one call with no
intermediate views or bytes (what ``reserve`` + ``side`` + ``post`` do, byte for byte:
tests/sdk/test_fast_paths.py). A wait polls once before it sets up its spin, so a completion
that is already there costs one poll.

Flow control: at most ``sq_entries`` commands are *in flight* (posted, completion not yet
consumed). That one rule keeps the submission ring from overfilling (``sq_tail - sq_head``
cannot pass it) and the completion ring from overflowing (``cq_entries >= sq_entries``), and it
makes a side area free exactly when its slot is. :meth:`Ring.reserve` waits for room instead of
overfilling. Posting does not trap: it stores ``sq_tail`` in guest memory and writes
``REG_DOORBELL`` only when the device has set ``FLAG_NEED_WAKEUP`` (it sleeps). Completions are
polled (no interrupts); each carries the descriptor's tag, which is its sequence number, and
they arrive in submission order, which the driver checks.

Results: a command posted with ``waited=True`` keeps its completion until :meth:`Ring.wait`
takes it. Any other command that fails is recorded as the ring's first *asynchronous error*,
which :meth:`Ring.drain` raises (the CUDA "sticky until synchronize" model, minus the
stickiness). A device that stops with a fatal error (``DeviceStatus.FATAL``) makes every wait
raise :class:`~vxpu.guest.errors.DeviceError` with the fatal code until :meth:`Ring.start`
runs again after a reset.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from vxpu.guest.errors import DeviceError, GuestError
from vxpu.guest.transport import DmaMemory, Transport

from vxpu.abi import xpu
from vxpu.abi.status import Status

#: Bytes of side area per submission slot (an argument blob or an indirect SG list).
SIDE_BYTES = 256
#: Indirect scatter-gather entries that fit one side area.
SIDE_SG_ENTRIES = SIDE_BYTES // xpu.SG_ENTRY.size
#: How long a waiter keeps polling after the last progress before it sleeps between polls (s).
SPIN_S = 1e-3
#: ... and how long it keeps polling while the device is awake (need-wakeup clear), i.e. busy
#: with the commands in flight: a batch of large copies or a long kernel completes nothing for
#: milliseconds, and the sleeps of the slow path (50 us doubling to 1 ms, plus the kernel's
#: timer slack) overshot its end by up to ~0.3 ms (16 MiB x4 copies on the H200: 0.80 of
#: native). Polling yields the CPU (``sched_yield``) on every check, so a device sharing the
#: core still runs. 0 restores the plain SPIN_S rule.
BUSY_SPIN_S = 50e-3
#: How long a waiter sees no progress before it reads REG_STATUS for a fatal error (seconds).
FATAL_CHECK_S = 0.002
#: How long :meth:`Ring.start` waits for the device to report its queue enabled (seconds).
ENABLE_TIMEOUT_S = 10.0
_MASK = xpu.INDEX_MASK
_SQ_TAIL = xpu.QH_SQ_TAIL // 4
_CQ_HEAD = xpu.QH_CQ_HEAD // 4
_SQ_HEAD = xpu.QH_SQ_HEAD // 4
_CQ_TAIL = xpu.QH_CQ_TAIL // 4
_FLAGS = xpu.QH_FLAGS // 4
_ERRORS = xpu.QH_ERRORS // 4
_NEED_WAKEUP = xpu.FLAG_NEED_WAKEUP
_SQ_ENTRY_SIZE = xpu.SQ_ENTRY_SIZE
_CQ_ENTRY_SIZE = xpu.CQ_ENTRY_SIZE
_pack_descriptor = xpu.DESCRIPTOR.pack_into
_unpack_completion = xpu.COMPLETION.unpack_from
#: From this many new completions on, :meth:`Ring.poll` first checks runs of them with slices.
_BULK_MIN = 4
#: The statuses after which the guest's device state may be gone: a fault, a lost device, or a
#: TIMEOUT for which the server cancelled an overrunning kernel by resetting the context.
_STATE_FAULTS = frozenset({int(Status.KERNEL_FAULT), int(Status.DEVICE_LOST), int(Status.TIMEOUT)})
#: In such a completion's result2: the guest's device state was reset (allocations, modules and
#: events are gone). A device following ABI 1.0 as documented now always sets it when that
#: happened; servers from before the bit existed never set it, so when it is clear the SDK still
#: probes whether its state survived (see ``Device.live_ring``).
STATE_RESET_BIT = xpu.CPL_STATE_DROPPED


def opcode_name(opcode: int) -> str:
    """``"MEM_FREE"`` for a known opcode, ``"opcode 0x99"`` for any other."""
    try:
        return xpu.Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode:#x}"


class Ring:
    """The queue of one device, in DMA memory from ``transport``.

    Args:
        transport: registers and DMA memory.
        sq_entries: submission slots (a power of two, 2..4096).
        cq_entries: completion slots (a power of two, ``>= sq_entries``; default the same).
        timeout: seconds a wait may see no completion before it raises.

    Raises:
        GuestError: bad ring sizes, or the transport has no contiguous memory for the rings.
    """

    def __init__(self, transport: Transport, sq_entries: int = 1024, cq_entries: int | None = None,
                 timeout: float = 120.0) -> None:
        cq_entries = sq_entries if cq_entries is None else cq_entries
        if not (xpu.is_valid_ring_size(sq_entries) and xpu.is_valid_ring_size(cq_entries)
                and cq_entries >= sq_entries):
            raise GuestError(f"ring sizes {sq_entries}/{cq_entries}: need powers of two in "
                             f"{xpu.MIN_RING_ENTRIES}..{xpu.MAX_RING_ENTRIES} with cq >= sq")
        self.transport = transport
        self.sq_entries, self.cq_entries, self.timeout = sq_entries, cq_entries, timeout
        self._sq_off = xpu.QUEUE_HEADER_ALIGN
        self._cq_off = self._sq_off + sq_entries * xpu.SQ_ENTRY_SIZE
        self._side_off = self._cq_off + cq_entries * xpu.CQ_ENTRY_SIZE
        size = self._side_off + sq_entries * SIDE_BYTES
        self.mem: DmaMemory = transport.alloc_dma(size, contiguous=True)
        if not self.mem.contiguous:
            transport.free_dma(self.mem)
            raise GuestError("the transport returned non-contiguous memory for the rings")
        view = self.mem.view
        self._hdr = view[:xpu.QUEUE_HEADER_SIZE].cast("I")
        self._sq = view[self._sq_off:self._cq_off]
        self._cq = view[self._cq_off:self._side_off]
        self._cq64 = self._cq.cast("Q")            # four words per completion (poll's bulk path)
        self._side = view[self._side_off:size]
        self._base = self.mem.address(0)
        self._side_base = self._base + self._side_off      # device address of slot 0's side area
        self._sq_mask, self._cq_mask = sq_entries - 1, cq_entries - 1
        self._waited = [False] * sq_entries
        self._opcode = [0] * sq_entries
        self._hold: list[DmaMemory | None] = [None] * sq_entries
        # The in-flight commands somebody waits for or that hold memory, by sequence number in
        # posting order: poll() looks at these one by one and takes the runs between unread.
        # _waited and _hold are written for these slots only.
        self._special: deque[int] = deque()
        self._done: dict[int, tuple[int, int, int]] = {}
        self.batching = 0           # > 0: post() leaves publishing to publish()
        self._counted = False       # the device counts non-OK completions in QH_ERRORS (set by start)
        self.doorbells = 0          # REG_DOORBELL writes, for benchmarks and tests
        self.fatal: DeviceError | None = None
        self.faults = 0             # KERNEL_FAULT / DEVICE_LOST / TIMEOUT completions seen
        self.state_resets = 0       # ... of which said that the device state was reset
        self._reset_counters()

    # -- set-up ----------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self._submitted = self._published = self._completed = 0
        self._errors_seen = 0       # non-OK completions consumed (QH_ERRORS, when the device counts them)
        self._cq_head = 0
        self._rung_at = -1          # sq_head when the doorbell was last rung (-1: not since start)
        self._done.clear()
        self._special.clear()
        self.async_error: tuple[int, int, int, int] | None = None   # seq, opcode, status, result
        for i, held in enumerate(self._hold):
            if held is not None:
                self.transport.free_dma(held)
                self._hold[i] = None

    def start(self) -> None:
        """Program the queue registers and enable the queue (indices start at 0).

        Raises:
            DeviceError: the device refused the configuration (fatal BAD_QUEUE_CONFIG ...).
        """
        t = self.transport
        self._reset_counters()
        self.fatal = None
        self.mem.view[:xpu.QUEUE_HEADER_SIZE] = bytes(xpu.QUEUE_HEADER_SIZE)
        for reg, addr in ((xpu.REG_QUEUE_BASE_LO, self._base), (xpu.REG_SQ_BASE_LO, self._base + self._sq_off),
                          (xpu.REG_CQ_BASE_LO, self._base + self._cq_off)):
            t.write_reg(reg, addr & _MASK)
            t.write_reg(reg + 4, addr >> 32)
        t.write_reg(xpu.REG_SQ_ENTRIES, self.sq_entries)
        t.write_reg(xpu.REG_CQ_ENTRIES, self.cq_entries)
        self._counted = bool(t.read_reg(xpu.REG_FEATURES_LO) & xpu.Feature.ERROR_COUNT)
        t.write_reg(xpu.REG_QUEUE_ENABLE, 1)
        deadline = time.monotonic() + ENABLE_TIMEOUT_S
        pause = 50e-6
        while True:                  # the device takes the request asynchronously
            status = t.read_reg(xpu.REG_STATUS)
            if status & xpu.DeviceStatus.FATAL:
                self.check_fatal()
            if status & xpu.DeviceStatus.ENABLED:
                return
            if time.monotonic() > deadline:
                raise GuestError(f"the device did not enable its queue within {ENABLE_TIMEOUT_S:g} s "
                                 f"(REG_STATUS {status:#x})")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def stop(self, timeout: float = ENABLE_TIMEOUT_S) -> bool:
        """Disable the queue and wait until the device says it stopped (it finishes what was
        submitted first), so the ring memory can be given back. Counters keep their values.

        Returns:
            False when the device still reported the queue enabled after ``timeout`` seconds.
        """
        t = self.transport
        t.write_reg(xpu.REG_QUEUE_ENABLE, 0)
        deadline = time.monotonic() + timeout
        pause = 50e-6
        while t.read_reg(xpu.REG_STATUS) & xpu.DeviceStatus.ENABLED:
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        return True

    def close(self, *, free: bool = True) -> None:
        """Drop the ring's views and give its memory back (after :meth:`stop` succeeded). With
        ``free=False`` the memory stays with the transport, whose close releases it once the
        device can no longer reach it."""
        if self._hdr is None:
            return
        self._reset_counters()
        for v in (self._hdr, self._sq, self._cq64, self._cq, self._side):
            v.release()
        self._hdr = None  # type: ignore[assignment]
        if free:
            self.transport.free_dma(self.mem)

    def check_fatal(self) -> None:
        """Read REG_STATUS; raise the device's fatal error if it has one.

        Raises:
            DeviceError: with ``fatal`` set to the FatalCode (and FATAL_INFO in the message).
        """
        if self.fatal is None:
            t = self.transport
            if not t.read_reg(xpu.REG_STATUS) & xpu.DeviceStatus.FATAL:
                return
            code, info = t.read_reg(xpu.REG_FATAL_CODE), t.read_reg(xpu.REG_FATAL_INFO)
            try:
                name = xpu.FatalCode(code).name
            except ValueError:
                name = f"FATAL_{code}"
            self.fatal = DeviceError(0, "device", fatal=code or -1, fatal_name=name,
                                     detail=f"fatal info {info:#x}")
        raise self.fatal

    # -- submission ------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Commands posted whose completion has not been consumed."""
        return self._submitted - self._completed

    @property
    def submitted(self) -> int:
        """The sequence number the next command gets (= commands posted so far)."""
        return self._submitted

    def reserve(self) -> int:
        """Wait for a free slot (publishing what is pending first); the next sequence number.

        Raises:
            DeviceError: a fatal device error, or no completion within the timeout.
        """
        if self._submitted - self._completed >= self.sq_entries:
            self.publish()
            self._wait_completed(self._submitted - self.sq_entries + 1)
        return self._submitted

    def side(self, seq: int) -> tuple[memoryview, int]:
        """The side area of ``seq``'s slot: (writable view of SIDE_BYTES, its device address)."""
        off = (seq & self._sq_mask) * SIDE_BYTES
        return self._side[off:off + SIDE_BYTES], self._side_base + off

    def post(self, opcode: int, a0: int = 0, a1: int = 0, a2: int = 0, a3: int = 0, *, flags: int = 0,
             sg_addr: int = 0, sg_len: int = 0, sg_count: int | None = None, waited: bool = False,
             hold: DmaMemory | None = None) -> int:
        """Write one descriptor into the reserved slot and post it; its sequence number (= tag).

        Call :meth:`reserve` first when the side area is used; otherwise this reserves itself.
        ``sg_count`` defaults to 1 with an inline segment (``sg_len > 0``), else 0. ``hold`` is
        DMA memory the command reads, freed when its completion arrives.

        Raises:
            DeviceError: a fatal device error, or no room within the timeout.
            struct.error: an argument does not fit its field.
        """
        seq = self._submitted
        if seq - self._completed >= self.sq_entries:
            seq = self.reserve()
        slot = seq & self._sq_mask
        if sg_count is None:
            sg_count = 1 if sg_len else 0
        _pack_descriptor(self._sq, slot * _SQ_ENTRY_SIZE, opcode, flags, sg_count, seq, a0, a1, a2, a3,
                         sg_addr, sg_len)
        self._opcode[slot] = opcode
        if waited or hold is not None:        # poll() looks at this one
            self._waited[slot] = waited
            self._hold[slot] = hold
            self._special.append(seq)
        self._submitted = seq = seq + 1
        if not self.batching:                 # publish(), inlined: the common case
            self._published = seq
            hdr = self._hdr
            hdr[_SQ_TAIL] = seq & _MASK
            if hdr[_FLAGS] & _NEED_WAKEUP:
                self._doorbell()
        return seq - 1

    def post_inline(self, opcode: int, a0: int, a1: int, a2: int, a3: int, data: bytes | memoryview) -> int:
        """Post one command whose inline scatter-gather segment is ``data`` (1..SIDE_BYTES
        bytes), copied into the slot's side area: what ``reserve()``, ``side()``, a copy and
        ``post(..., sg_addr=, sg_len=len(data))`` do, without the intermediate views.

        Raises:
            DeviceError: a fatal device error, or no room within the timeout.
            GuestError: ``data`` is empty or larger than SIDE_BYTES.
            struct.error: an argument does not fit its field.
        """
        n = len(data)
        if not 0 < n <= SIDE_BYTES:
            raise GuestError(f"{n} bytes of inline data (1..{SIDE_BYTES} fit a side area)")
        seq = self._submitted
        if seq - self._completed >= self.sq_entries:
            seq = self.reserve()
        slot = seq & self._sq_mask
        off = slot * SIDE_BYTES
        self._side[off:off + n] = data
        _pack_descriptor(self._sq, slot * _SQ_ENTRY_SIZE, opcode, 0, 1, seq, a0, a1, a2, a3,
                         self._side_base + off, n)
        self._opcode[slot] = opcode
        self._submitted = seq = seq + 1
        if not self.batching:
            self._published = seq
            hdr = self._hdr
            hdr[_SQ_TAIL] = seq & _MASK
            if hdr[_FLAGS] & _NEED_WAKEUP:
                self._doorbell()
        return seq - 1

    def post_packed(self, opcode: int, a0: int, a1: int, a2: int, a3: int, pack_into: Callable[..., None],
                    size: int, values: Sequence[Any]) -> int:
        """Post one command whose inline segment is the ``size`` bytes that ``pack_into``
        (a ``struct.Struct``'s bound ``pack_into``, ``0 < size <= SIDE_BYTES``) packs from
        ``values``, straight into the slot's side area. Packing happens before anything is
        posted: when it raises, the ring is as it was (the side area of a free slot may hold
        part of the bytes, which no command reads). The bound method is passed, not the Struct:
        looking ``pack_into`` up on every call costs more than the pack.

        Raises:
            struct.error, OverflowError: ``values`` do not fit (nothing posted).
            DeviceError: a fatal device error, or no room within the timeout.
        """
        seq = self._submitted
        if seq - self._completed >= self.sq_entries:
            seq = self.reserve()
        slot = seq & self._sq_mask
        off = slot * SIDE_BYTES
        pack_into(self._side, off, *values)
        _pack_descriptor(self._sq, slot * _SQ_ENTRY_SIZE, opcode, 0, 1, seq, a0, a1, a2, a3,
                         self._side_base + off, size)
        self._opcode[slot] = opcode
        self._submitted = seq = seq + 1
        if not self.batching:
            self._published = seq
            hdr = self._hdr
            hdr[_SQ_TAIL] = seq & _MASK
            if hdr[_FLAGS] & _NEED_WAKEUP:
                self._doorbell()
        return seq - 1

    def publish(self) -> None:
        """Store ``sq_tail`` for everything posted; ring the doorbell only if the device sleeps
        and has not been rung awake already.

        A doorbell is redundant while ``sq_head`` has not moved since the last one: the device
        has not taken anything since, so it has yet to wake up for that doorbell, and then it
        reads ``sq_tail`` afresh and sees these descriptors too. Without this rule every command
        posted while the device wakes up rang again (a trapped write each: 64 doorbells for a
        burst of 64 copies into a sleeping device, each one a message the server handles)."""
        if self._published != self._submitted:
            self._published = self._submitted
            hdr = self._hdr
            hdr[_SQ_TAIL] = self._submitted & _MASK
            if hdr[_FLAGS] & _NEED_WAKEUP:
                self._doorbell()

    def _doorbell(self) -> None:
        """The device sleeps (need-wakeup read set after the ``sq_tail`` store): ring, unless it
        was rung already and has taken nothing since (see :meth:`publish`)."""
        head = self._hdr[_SQ_HEAD]
        if head != self._rung_at:
            self._rung_at = head
            self.transport.write_reg(xpu.REG_DOORBELL, 1)
            self.doorbells += 1

    def set_sq_tail(self, value: int) -> None:
        """Store a raw ``sq_tail`` (a deliberate protocol violation, for tests) and ring."""
        self._hdr[_SQ_TAIL] = value & _MASK
        self.transport.write_reg(xpu.REG_DOORBELL, 1)

    # -- completion ------------------------------------------------------------------------
    def poll(self) -> int:
        """Consume the completions the device has written; how many.

        The run up to the first command somebody waits for or that holds memory is taken
        without reading an entry while the device's error count (``QH_ERRORS``, Feature
        ERROR_COUNT) says none of them failed, or checked with slices at C speed when the device
        keeps no count; the rest, and any run that is short or holds an error, go one by one.

        Raises:
            GuestError: the device broke the ring protocol (too many completions, a wrong tag).
        """
        head = self._cq_head
        n = (self._hdr[_CQ_TAIL] - head) & _MASK
        if not n:
            return 0
        seq = self._completed
        if n > self._submitted - seq:
            raise GuestError(f"the device posted {n} completions with only {self.in_flight} commands in flight")
        end = seq + n
        special = self._special
        if n >= _BULK_MIN:
            stop = special[0] if special and special[0] < end else end
            if stop != seq:
                # With the device's count equal to the errors consumed, none up to the cq_tail
                # read failed, and none of the run is read at all: each entry is a cache line
                # another core just wrote (3-4 us for a 17-completion batch on the H200 host).
                got = stop - seq if self._counted and self._hdr[_ERRORS] == self._errors_seen \
                    else self._checked_run(head, seq, stop - seq)
                head += got
                seq += got
        cq, cq_mask, sq_mask = self._cq, self._cq_mask, self._sq_mask
        while seq != end:
            tag, result, result2, status, _ = _unpack_completion(cq, (head & cq_mask) * _CQ_ENTRY_SIZE)
            if tag != seq:
                raise GuestError(f"completion tag {tag} where {seq} was expected (the ring is corrupt)")
            slot = seq & sq_mask
            if special and special[0] == seq:
                special.popleft()
                if self._waited[slot]:
                    self._done[seq] = (status, result, result2)
                elif status and self.async_error is None:
                    self.async_error = (seq, self._opcode[slot], status, result)
                held = self._hold[slot]
                if held is not None:
                    self._hold[slot] = None
                    self.transport.free_dma(held)
            elif status and self.async_error is None:
                self.async_error = (seq, self._opcode[slot], status, result)
            if status:
                self._errors_seen = (self._errors_seen + 1) & _MASK
                if status in _STATE_FAULTS:
                    self.faults += 1
                    if result2 & STATE_RESET_BIT:
                        self.state_resets += 1
            head += 1
            seq += 1
        self._completed = seq
        self._cq_head = head = head & _MASK
        self._hdr[_CQ_HEAD] = head
        return n

    def wait(self, seq: int) -> tuple[int, int, int]:
        """Wait for the ``waited=True`` command ``seq``; its ``(status, result, result2)``.

        Raises:
            DeviceError: a fatal device error, or no completion within the timeout.
            GuestError: ``seq`` was not posted with ``waited=True`` or was already taken.
        """
        if seq >= self._published:
            self.publish()
        if self._completed <= seq and (self.fatal is not None or not self.poll() or self._completed <= seq):
            self._wait_completed(seq + 1)     # (a fatal device raises there, as before any poll)
        try:
            return self._done.pop(seq)
        except KeyError:
            raise GuestError(f"command {seq} was not posted with waited=True, or its result was taken") from None

    def wait_done(self, seq: int) -> None:
        """Wait until command ``seq`` (waited or not) has completed; its status is not returned.

        Raises:
            DeviceError: a fatal device error, or no completion within the timeout.
        """
        if seq >= self._published:
            self.publish()
        self._wait_completed(seq + 1)

    def check(self, seq: int) -> tuple[int, int]:
        """:meth:`wait`, raising DeviceError for a status other than OK; ``(result, result2)``."""
        opcode = self._opcode[seq & self._sq_mask]
        status, result, result2 = self.wait(seq)
        if status:
            raise DeviceError(status, opcode_name(opcode), result=result)
        return result, result2

    def drain(self) -> None:
        """Publish and wait for every posted command, then raise the first asynchronous error.

        Raises:
            DeviceError: an asynchronous command failed since the last drain (then cleared), a
                fatal device error, or no completion within the timeout.
        """
        self.publish()
        self._wait_completed(self._submitted)
        self.raise_async()

    def raise_async(self) -> None:
        """Raise (and clear) the first recorded asynchronous error, if any."""
        err = self.async_error
        if err is not None:
            self.async_error = None
            seq, opcode, status, result = err
            raise DeviceError(status, opcode_name(opcode), result=result,
                              detail=f"asynchronous command #{seq} (reported at synchronize)")

    def _wait_completed(self, target: int) -> None:
        """Poll until ``target`` completions were consumed: spin (yielding the CPU between
        polls, since the device may need it) for SPIN_S after the last progress, or BUSY_SPIN_S
        while the device is awake working on them, then back off."""
        if self._completed >= target:
            return
        if self.fatal is not None:
            raise self.fatal
        if self.poll() and self._completed >= target:     # already there: no clock, no spin set-up
            return
        poll, clock, yield_cpu, hdr = self.poll, time.perf_counter, os.sched_yield, self._hdr
        start = clock()
        deadline, busy_deadline = start + SPIN_S, start + BUSY_SPIN_S
        while True:
            yield_cpu()
            if hdr[_CQ_TAIL] != self._cq_head and poll():     # poll() only when cq_tail moved
                if self._completed >= target:
                    return
                now = clock()
                deadline, busy_deadline = now + SPIN_S, now + BUSY_SPIN_S
                continue
            now = clock()
            if now > deadline and (now > busy_deadline or hdr[_FLAGS] & _NEED_WAKEUP):
                break
        self._wait_slow(target)

    def _wait_slow(self, target: int) -> None:
        start = last_check = time.monotonic()
        pause = 50e-6
        while self._completed < target:
            if self.poll():
                pause, start = 50e-6, time.monotonic()
                continue
            now = time.monotonic()
            if now - last_check >= FATAL_CHECK_S:
                self.check_fatal()
                last_check = now
            if now - start > self.timeout:
                self.check_fatal()
                raise DeviceError(Status.TIMEOUT, opcode_name(self._opcode[self._completed & self._sq_mask]),
                                  detail=f"no completion for {self.timeout:g} s ({self.in_flight} in flight)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _checked_run(self, head: int, seq: int, n: int) -> int:
        """Of the ``n`` completions from ring index ``head`` on (sequence numbers ``seq`` on),
        how many leading ones have status OK and their own sequence number as tag, checked with
        slices at C speed, one contiguous stretch of the completion ring at a time; the caller's
        loop reads the rest one by one (a stretch with an error or a bad tag is left to it whole)."""
        words, cq_mask, done = self._cq64, self._cq_mask, 0
        while done < n:
            first = (head + done) & cq_mask
            k = min(n - done, self.cq_entries - first)
            w = first * 4
            if words[w + 3:w + 4 * k:4].tolist().count(0) != k:          # status + reserved words
                return done
            if words[w:w + 4 * k:4].tolist() != list(range(seq + done, seq + done + k)):
                return done
            done += k
        return done

    def header(self) -> dict[str, Any]:
        """The queue header's indices and flags (for diagnostics and tests)."""
        h = self._hdr
        return {"sq_tail": h[_SQ_TAIL], "sq_head": h[_SQ_HEAD], "cq_head": h[_CQ_HEAD],
                "cq_tail": h[_CQ_TAIL], "flags": h[_FLAGS]}
