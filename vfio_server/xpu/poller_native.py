"""The poller's side of the native fast lane: issue, extend, post and FENCE through C.

A mixin of :class:`~vxpu.vfio_server.xpu.poller.Poller` (which owns the state it uses: the
guest-RAM lock, the rings, the epoch, the executor and session, the statistics and interrupt
coalescing), kept apart so the poller module stays one concept. :meth:`NativeLane._native_issue`
runs under :attr:`GuestRam.lock` from ``Poller._cycle``: the lane
(:class:`~vxpu.vfio_server.xpu.fastlane.FastLane`) takes what it can complete successfully of the
validated descriptors, and the poller accounts what it issued exactly as the Python commands
would. Its group of completions is then posted by :meth:`NativeLane._native_finish` (after one
synchronization when copies wait, with one ``cq_tail`` store), or, when Python has descriptors
to run right after it, handed to ``Poller._run_batch`` as held completions, so the grouping (and
which copies an asynchronous error marks) is the Python path's. A FENCE the lane stopped at is
waited for without the lock (:meth:`NativeLane._native_fence`) or run by Python.

The **poll loop** (:meth:`NativeLane._native_poll`) runs the lane without Python at all while
the queue is busy: under the lock the tables are brought up to date and the lane resumed, then
C spins on ``sq_tail`` and runs whole cycles (:meth:`FastLane.poll`), and afterwards
:meth:`NativeLane._poll_account` applies what it did to the state Python keeps (ring indices,
queue accounting, statistics, interrupts) and :meth:`NativeLane._poll_group` finishes in Python,
exactly as after :meth:`NativeLane._native_issue`, whatever it handed back.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vxpu.accel.session import Session
from vxpu.vfio_server.xpu.commands import Executor
from vxpu.vfio_server.xpu.fastlane import (
    PR_GROUP,
    PR_HANDOFF,
    PR_INDEX,
    STOP_END,
    STOP_FENCE,
    Batch,
    FastLane,
    Poll,
)
from vxpu.vfio_server.xpu.guestram import GuestRam
from vxpu.vfio_server.xpu.queue import QueueFatal, Rings
from vxpu.vfio_server.xpu.stats import DeviceStats

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import DescFlags, FatalCode, IrqControl, Opcode

BATCH = 64                       # descriptors taken per lock acquisition (the poller's too)
POLL_RUN_S = 0.05                # a native poll returns at least this often (its accounting)
MAX_HELD = 4 * BATCH             # completions held while copies wait for one synchronization
_DESC_IRQ = int(DescFlags.IRQ)
_FENCE = int(Opcode.FENCE)
_IRQ_COMPLETION = int(IrqControl.COMPLETION)
Held = tuple[int, int, int, int, int, int, bool]


class NativeLane:
    """The fast-lane steps of the :class:`~vxpu.vfio_server.xpu.poller.Poller` (a mixin)."""

    ram: GuestRam
    stats: DeviceStats
    executor: Executor
    session: Session
    epoch: int
    enabled: bool
    aborting: bool
    controls: collections.deque[tuple[str, Any]]
    fastlane: FastLane | None
    _native_gen: int
    _native_posted: bool
    _bus_master: Callable[[], bool]
    _irq_settings: Callable[[], tuple[int, int, int]]
    _rings: Rings | None
    _unsignalled: int
    _stopping: bool
    _batch_irq: tuple[int, int, int] | None
    spin_s: float
    kick: threading.Event
    #: spin in the lane's C poll loop instead of Python (``VXPU_FASTLANE_POLL=0`` turns it off)
    native_polling = True
    native_polls = 0                 # polls returned and accounted
    native_poll_active = False       # a poll runs now (its counters are applied when it returns)

    if TYPE_CHECKING:                   # Poller's own, used here
        def _same_rings(self, rings: Rings) -> bool: ...
        def _still_attached(self, rings: Rings, epoch: int) -> bool: ...
        def _set_fatal(self, code: FatalCode, info: int, why: str) -> None: ...
        def _final(self, entry: Held, err: Status | None) -> Held: ...
        def _note_completions(self, n: int, forced: int, count: int) -> None: ...
        def _run_batch(self, descs: list[tuple[int, ...]], rings: Rings, epoch: int, extend: bool = True,
                       handed: list[Held] | None = None) -> int: ...
        def _finish_cycle(self, rings: Rings, epoch: int, native: int, descs: list[tuple[int, ...]],
                          fence: tuple[int, int] | None, extend: bool) -> int: ...
        def _irq_deadline(self) -> float: ...
        def _cycle(self, limit: int = BATCH, extend: bool = True) -> int: ...

    # -- the poll loop -----------------------------------------------------------------------
    def _poll_ready(self) -> bool:
        """Lock-free: may the lane's poll loop spin now (re-checked under the lock)?"""
        return (self.fastlane is not None and self.native_polling and self.enabled and self._rings is not None
                and not self.aborting and not self.controls and not self._stopping
                and self.executor.async_error is None)

    def _native_poll(self, first_s: float) -> float | None:
        """Spin in the lane's C loop instead of Python for up to ``first_s`` idle seconds,
        running what arrives natively (:meth:`FastLane.poll`); then account it as the Python
        cycles would have, and finish in Python what the loop handed back (an open group, a
        FENCE, descriptors it does not take, an index to validate). Returns how long nothing
        had arrived when it returned (``math.inf``: nothing arrived), or None when the loop
        cannot run now (the Python cycle and spin go on)."""
        lane, ex = self.fastlane, self.executor
        queue = ex.made_queue()
        if lane is None or queue is None:
            return None
        with self.ram.lock:
            lane.resume()               # first: a request or poke from now on stops the poll
            rings = self._rings
            if (not self.enabled or rings is None or self.aborting or self.controls or self._stopping
                    or ex.async_error is not None):
                return None
            try:
                rings.attach(self.ram)
            except QueueFatal as exc:
                self._set_fatal(exc.code, exc.info, str(exc))
                return 0.0
            if not self._bus_master():
                return None
            addrs = self._native_start(lane, rings, queue)
            if addrs is None:
                return None
            pending = lane.batch.pending        # (the group's start, as _native_run counts from)
            epoch = self.epoch
            settings = self._irq_settings()     # read once per poll, as once per batch in Python
            irq = bool(settings[0] & _IRQ_COMPLETION)
            if irq and self._unsignalled:           # the coalescing timer is Python's
                first_s = min(first_s, max(0.0, self._irq_deadline() - time.monotonic()))
            self.native_poll_active = True
        p = lane.poll(addrs, rings, first_s, self.spin_s, POLL_RUN_S, irq)
        try:
            self._poll_account(p, rings, queue, pending, settings)
            if p.reason == PR_GROUP or p.reason == PR_HANDOFF:
                self._poll_group(lane, rings, epoch, p)
                return 0.0
            if p.reason == PR_INDEX:    # Python re-reads the index and decides (fatal or not)
                self._cycle()
                return 0.0
            return p.idle_ns / 1e9 if p.batches else math.inf
        finally:
            self.native_poll_active = False
            self.native_polls += 1      # (for tests: the poll's work is accounted; XpuRig.settle)

    def _poll_account(self, p: Poll, rings: Rings, queue: int, pending: int,
                      settings: tuple[int, int, int]) -> None:
        """Apply what a poll did to the state Python keeps: the ring indices, the executor's
        and session's queue accounting, the backend's, the device statistics, interrupts (with
        the IRQ settings the poll ran under, ``settings``: completions posted while they were
        off raise nothing when they come on, as on the Python path)."""
        lane = self.fastlane
        assert lane is not None
        b = lane.batch
        rings.sq_head = b.sq_head
        rings.cq_tail, rings.cq_head = p.cq_tail, p.cq_head
        rings.completed += p.posted
        ex, s, stats = self.executor, self.session, self.stats
        ex.queued = b.queued
        if p.waits:
            s.note_native_sync(p.waits)
        if p.taken:
            ex.counters.bytes_htod += p.bytes_htod
            ex.counters.bytes_dtoh += p.bytes_dtoh
            s.note_native_work(queue, b.pending - (0 if p.waits else pending), p.launches, p.bytes_htod,
                               p.bytes_dtoh, p.checked_after)
        stats.batches_of(p.batches, p.max_batch, p.depth, p.max_depth)
        stats.busy_ns += p.busy_ns
        lane.count_polled(stats.commands)
        if p.posted:
            self._batch_irq = settings
            try:
                self._note_completions(p.posted, p.forced & _DESC_IRQ, max(1, settings[1]))
            finally:
                self._batch_irq = None

    def _poll_group(self, lane: FastLane, rings: Rings, epoch: int, p: Poll) -> None:
        """A poll handed back the descriptors Python runs next (the lane does not take them),
        an open group (its copies' wait is still to make, or to post) or the FENCE it stopped
        at: finish the cycle in Python, exactly as after :meth:`_native_issue`."""
        b = lane.batch
        native = b.group
        fence = (b.stop_tag, b.stop_flags) if p.fence else None
        descs: list[tuple[int, ...]] = []
        with self.ram.lock:
            if not self._still_attached(rings, epoch):
                return                  # stopped meanwhile: nothing is posted
            if b.python_run and fence is None:
                try:
                    n = min(b.python_run, rings.pending(), rings.cq_free() - native)
                except QueueFatal as exc:
                    self._set_fatal(exc.code, exc.info, str(exc))
                    return
                if n > 0 and self._bus_master():
                    descs = rings.take(n)       # (counted in the poll's batch already)
        self._finish_cycle(rings, epoch, native, descs, fence, True)

    def _native_issue(self, lane: FastLane, rings: Rings, queue: int, n: int,
                      room: int) -> tuple[int, int, tuple[int, int] | None]:
        """Under the lock: let the lane take what it can of the ``n`` validated descriptors, and
        of those the guest posts meanwhile within ``room`` validated free completion slots (0:
        none; a drain takes only what it saw). Returns ``(taken natively, descriptors Python
        takes now, the FENCE taken for the native wait as (tag, flags) or None)``; Python takes
        the descriptor the lane stopped at and those after it that the lane would not take
        either."""
        addrs = self._native_start(lane, rings, queue)
        if addrs is None:
            return 0, n, None
        b = self._native_run(lane, rings, addrs, queue, n, room)
        k = b.consumed
        fence = None
        if b.stop == STOP_FENCE and k < b.max:
            rings.consume(1)                # the FENCE: waited for natively after the group
            fence = (b.stop_tag, b.stop_flags)
        take = min(b.max - k, b.python_run)
        if k and not take and not b.syncs and not self.aborting:
            self._native_post(lane, rings)  # nothing waits and nothing joins: post it under this lock
        return k, take, fence

    def _native_start(self, lane: FastLane, rings: Rings, queue: int) -> tuple[int, int, int] | None:
        """Under the lock, before a lane run or poll: the rings' host addresses, once the lane's
        tables are up to date and a group started with this session's queue accounting; None
        when the lane cannot run now."""
        s, ex = self.session, self.executor
        addrs = lane.ring_addresses(rings.cfg, self.ram)
        if addrs is None or not lane.prepare(s, queue, ex.plan_drops, self.ram):
            return None
        self._native_gen = self.ram.generation
        self._native_posted = False
        lane.start_group(s.pending(queue), ex.queued, s.quota.queue_depth)
        return addrs

    def _native_post(self, lane: FastLane, rings: Rings) -> None:
        """Post the lane's group with one ``cq_tail`` store (lock held, views current) and
        count its commands; :attr:`_native_posted` says so to the cycle."""
        b = lane.batch
        rings.publish(b.group)
        lane.count_commands(self.stats.commands)
        self._native_posted = True

    def _native_run(self, lane: FastLane, rings: Rings, addrs: tuple[int, int, int], queue: int, n: int,
                    room: int) -> Batch:
        """One lane run from ``sq_head`` (lock held), its completions after the group's unposted
        ones (from ``cq_tail`` on), taking what the guest posts meanwhile within ``room`` free
        completion slots besides the group's (0: none); accounts what it issued, as Python
        would (a take of posted-meanwhile descriptors counts as a batch, as ``_take_more``'s)."""
        pending_before = lane.batch.pending
        head, tail = rings.sq_head, rings.cq_tail
        b = lane.run(addrs, rings.sq_mask, rings.cq_mask, rings.cfg.sq_entries, head, tail, n,
                     room - lane.batch.group, room > 0)
        if b.ntakes:
            seen = n
            for extra in b.takes[:b.ntakes]:
                seen += extra
                self.stats.batch(extra, (head + seen - tail) & abi.INDEX_MASK)
        if b.consumed:
            rings.consume(b.consumed)
            ex = self.executor
            ex.queued = b.queued
            ex.counters.bytes_htod += b.bytes_htod
            ex.counters.bytes_dtoh += b.bytes_dtoh
            self.session.note_native_work(queue, b.pending - pending_before, b.launches, b.bytes_htod,
                                          b.bytes_dtoh, b.checked)
        return b

    def _native_extend(self, rings: Rings, epoch: int) -> list[tuple[int, ...]]:
        """While the lane's copies wait for their synchronization, take the descriptors posted
        meanwhile into the group (as :meth:`_take_more` does); returns the descriptors Python
        must run in the same group when the lane stopped at one (none: the group is all native)."""
        lane, queue = self.fastlane, self.executor.made_queue()
        assert lane is not None
        b = lane.batch
        while queue is not None and b.syncs and b.group < MAX_HELD and b.stop == STOP_END:
            with self.ram.lock:
                if self.epoch != epoch or not self.enabled or not self._same_rings(rings) or self.controls:
                    break
                try:
                    rings.attach(self.ram)
                    pending = rings.pending()
                    free = rings.cq_free()
                    more = min(pending, free - b.group, BATCH, MAX_HELD - b.group)
                except QueueFatal as exc:
                    self._set_fatal(exc.code, exc.info, str(exc))
                    break
                addrs = lane.ring_addresses(rings.cfg, self.ram)
                if more <= 0 or addrs is None or self.ram.generation != self._native_gen or not self._bus_master():
                    break
                self.stats.batch(more, (rings.sq_head + more - rings.cq_tail) & abi.INDEX_MASK)
                self._native_run(lane, rings, addrs, queue, more, free)
                if b.python_run:
                    return rings.take(b.python_run)
                if b.stop == STOP_FENCE or not b.consumed:
                    break
        return []

    def _native_finish(self, rings: Rings, epoch: int, count: int) -> bool:
        """Post the lane's group: after one synchronization when copies wait for it (native when
        it surfaces nothing, else Python's, which reports the error), with one ``cq_tail`` store; rewritten by Python in the rare case (an error or abort surfaced, or
        guest RAM changed). False when the queue stopped or changed meanwhile."""
        lane = self.fastlane
        assert lane is not None
        b = lane.batch
        if self._native_posted:             # posted at issue (see _native_issue)
            self._note_completions(b.group, b.irq & _DESC_IRQ, count)
            return True
        err = None
        if b.syncs:                         # the copies' one wait: natively when it surfaces nothing
            if lane.fence_wait():
                self.session.note_native_sync()
                self.executor.queued = 0
            else:
                err = self.executor.synchronize_deferred()
        n = b.group
        with self.ram.lock:
            if not self._still_attached(rings, epoch):
                return False
            if err is None and not self.aborting and self.ram.generation == self._native_gen:
                rings.publish(n)
            else:
                held = [self._final(entry, err) for entry in lane.held(0, n)]
                rings.complete_many(held)
                for entry in held:
                    if entry[1]:
                        self.stats.errors[Status(entry[1]).name] += 1
        lane.count_commands(self.stats.commands)
        self._note_completions(n, b.irq & _DESC_IRQ, count)
        return True

    def _native_fence(self, fence: tuple[int, int], rings: Rings, epoch: int, count: int) -> int:
        """The FENCE the lane stopped at (taken off the ring): when no asynchronous error is
        pending, wait natively without the lock and complete it OK if the device finished and
        the fault record is unclaimed; anything else runs the FENCE in Python. Returns 1, or -1
        when the queue stopped meanwhile."""
        lane, ex = self.fastlane, self.executor
        assert lane is not None
        tag, flags = fence
        ok = False
        if ex.async_error is None and not self.aborting:
            if not ex.queued:
                ok = True               # nothing issued since the last wait: Python waits neither
            else:
                lane.refresh_record()   # (the group's wait may have reset the context: never a freed record)
            if not ok and lane.fence_wait():
                self.session.note_native_sync()
                ex.queued = 0
                ok = True
        if not ok or self.aborting:
            return self._run_batch([(_FENCE, flags, 0, tag, 0, 0, 0, 0, 0, 0)], rings, epoch, False)
        with self.ram.lock:
            if not self._still_attached(rings, epoch):
                return -1
            rings.complete(tag, 0, 0, 0)
        self.stats.count(_FENCE, 0)
        self._note_completions(1, flags & _DESC_IRQ, count)
        return 1

