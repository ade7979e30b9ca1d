"""The accelerator's poller: one thread that takes descriptors off the ring and completes them.

Threads and locks (ARCHITECTURE.md decision 2; the serve loop is single-threaded):

* The **serve loop** answers QEMU. Register writes only *request* things: enable, disable and
  Control.RESET go into :attr:`Poller.controls` (handled in order by the poller), a doorbell
  sets :attr:`Poller.kick`. The loop never waits for a command. It takes
  :attr:`GuestRam.lock` only for what must be synchronous with respect to guest memory: a
  DMA map change (listener), a device reset or disconnect (:meth:`Poller.hard_reset`: no DMA
  after it returns), and bus mastering turned off.
* The **poller thread** holds :attr:`GuestRam.lock` while it touches guest memory (ring reads,
  completions, SG copies) and never while it waits for the backend, so those loop-side
  sections wait at most for one memory access. The fast lane's **poll loop** (C, see
  :mod:`.poller_native`) touches guest memory without the lock: each of those loop-side
  sections first calls :meth:`Poller._quiesce`, which stops the loop and waits until it is out
  of guest memory and the lane's tables (at most one descriptor's driver call), and the poller
  re-validates everything under the lock before it lets the loop run again. Control requests
  and new interrupt settings end a running poll too (:meth:`Poller.poke`, no wait). Interrupts go back to the loop through
  ``call_soon_threadsafe``. From a LAUNCH with a FENCE ahead in the same batch until that
  FENCE, it defers the wake-ups of a host backend's queue worker
  (:func:`vxpu.accel.hostqueue.defer_wakeups`), so the FENCE runs the kernel on the poller
  thread with no worker woken to contend for the GIL.

Polling: with the fast lane's poll loop (GPU backends) the spin below happens in C, which also
runs the lane's commands as they arrive, and the Python cycle runs only what the loop hands
back. Otherwise: after the last descriptor the poller spins (see *Adaptive spin*), checking ``sq_tail``
without the lock (a hint: the locked cycle runs only when it moved) and calling
``os.sched_yield()`` on every check: that releases the GIL (the loop's replies to QEMU are not
held up) and lets a submitter that shares the core run (with ``time.sleep(0)`` instead, a
client on the same core only ran once the spin had ended, and a NOP round trip took the
doorbell path: ~87 µs instead of ~10 µs). While the poller executes a batch it holds the GIL;
the device lowers the interpreter's switch interval to :data:`SWITCH_INTERVAL_S` (the default is
5 ms), so a QEMU request waits at most that long for it (benchmarks/RESULTS.md, "Accelerator
device"). Then it sets need-wakeup in the queue header, re-reads ``sq_tail`` (a descriptor
submitted meanwhile is taken at once), and sleeps until a doorbell, a control request or
:data:`~vxpu.abi.xpu.MAX_WAKEUP_LATENCY_MS` (a missed doorbell costs at most that long).

Adaptive spin (like KVM's halt polling): the spin lasts :attr:`Poller.spin_s`, at least
:data:`SPIN_S` and at most :attr:`Poller.max_spin_s` (``vxpu serve --poll-idle-us``, default
:data:`MAX_SPIN_S`). When the poller wakes from a sleep, the idle gap since its last work tells
whether a longer spin would have caught it: a gap within the ceiling raises the spin to twice
the gap (never lowering it), a longer gap (the guest went idle) puts it back to the floor. A
guest that pauses between bursts for less than the ceiling stops paying the ~0.3 ms wake-up
after a few bursts; an idle guest costs one ceiling's spin at most. A ceiling below
:data:`SPIN_S` is a fixed spin of that length (0: sleep at once, for hosts without a core to
spare, e.g. TCG guests on two cores).

Completions are posted in submission order, in groups: the completions of commands that only
issue work (copies, memsets, NOPs, launches, event records) are held and written together with
one lock and one ``cq_tail`` store, at the end of the batch and before any command that may
wait (a FENCE, a compile, a free ...), so no completion waits for a later command. Interrupts
are coalesced: vector 0 is raised once :attr:`REG_IRQ_COALESCE_COUNT` completions are
unsignalled, when the oldest unsignalled one is ``REG_IRQ_COALESCE_USEC`` old (0: at the end of
the batch that posted it), or right after the group that posted a descriptor with
``DescFlags.IRQ``.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from vxpu.accel.backend import BackendError
from vxpu.accel.hostqueue import defer_wakeups, resume_wakeups
from vxpu.accel.session import Session
from vxpu.vfio_server.dma import DmaRegion
from vxpu.vfio_server.xpu import profile
from vxpu.vfio_server.xpu.commands import ASYNC_ERRORS, Abandoned, Executor
from vxpu.vfio_server.xpu.fastlane import FastLane, poll_wanted
from vxpu.vfio_server.xpu.guestram import GuestRam
from vxpu.vfio_server.xpu.poller_native import BATCH, MAX_HELD, NativeLane
from vxpu.vfio_server.xpu.queue import QueueConfig, QueueFatal, Rings, check_config
from vxpu.vfio_server.xpu.stats import DeviceStats, stats_json

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import DescFlags, FatalCode, IrqControl, Opcode
from vxpu.log import LogBudget

log = logging.getLogger(__name__)

SPIN_S = 200e-6                  # keep polling at least this long after the last descriptor
#: ... and at most this long, after short idle gaps (adaptive): 5 ms, or 2 ms on a host of two
#: cores or fewer, where a spinning poller takes half the machine from the guest.
MAX_SPIN_S = 5e-3 if (os.cpu_count() or 1) > 2 else 2e-3
SWITCH_INTERVAL_S = 0.0005       # sys.setswitchinterval while a device runs (see the docstring)
IDLE_WAIT_S = 1.0                # sleep while the queue is off (requests kick anyway)
MAX_COALESCE_USEC = 100_000      # REG_IRQ_COALESCE_USEC is clamped to this
MAX_CONTROLS = 64                # control requests pending at once (see Poller.request)
_budget = LogBudget(32, 60.0, "further device-model errors are logged at DEBUG")
# Plain ints on the per-descriptor path (IntFlag/IntEnum arithmetic builds members every time).
_DESC_IRQ = int(DescFlags.IRQ)
_IRQ_COMPLETION = int(IrqControl.COMPLETION)
_ABORTED = int(Status.ABORTED)
_INTERNAL = int(Status.INTERNAL)
#: Commands that may run while copy completions wait for one synchronization (cheap, ordered).
_DEFERRABLE = frozenset(int(op) for op in (Opcode.NOP, Opcode.MEM_COPY_DTOH, Opcode.MEM_COPY_HTOD,
                                           Opcode.MEM_COPY_DTOD, Opcode.MEM_SET))
#: Commands that never wait long (they only issue work), so the completions before them may stay
#: held and be posted together. Before any other command (FENCE included) the held completions
#: are posted first: a completion is never held up by a command that waits.
_HOLDABLE = _DEFERRABLE | frozenset(int(op) for op in (Opcode.LAUNCH, Opcode.EVENT_RECORD))
#: Commands that queue work behind a host backend's worker thread. When one of them is followed
#: in the batch by a FENCE with only holdable commands between, the poller defers the worker's
#: wake-ups (accel.hostqueue) until that FENCE has run: the FENCE runs the work on the poller
#: thread, with no worker woken to contend for the GIL. Without a FENCE ahead the worker is woken
#: at once (batched launches run on it while the poller reads the next descriptors).
_DEFER_FROM = frozenset(int(op) for op in (Opcode.LAUNCH, Opcode.EVENT_RECORD))
_FENCE = int(Opcode.FENCE)


def _next_stop(descs: list[tuple[int, ...]], i: int) -> tuple[int, bool]:
    """The index of the first command from ``i`` on that is not holdable, and whether it is a
    FENCE (False when the batch ends first)."""
    j, n = i, len(descs)
    while j < n and descs[j][0] in _HOLDABLE:
        j += 1
    return j, j < n and descs[j][0] == _FENCE


class Poller(NativeLane):
    """The queue engine of one accelerator device (see the module docstring).

    Args:
        make_session: opens a fresh :class:`Session` (at start and after every reset).
        features: the device's Feature bits.
        identity: builds the IDENTIFY JSON.
        irq: ``irq(vector)`` delivers an interrupt from any thread (hands over to the loop).
        irq_settings: returns ``(IrqControl bits, coalesce count, coalesce usec)``.
        bus_master: returns whether the guest allows DMA now.
        max_spin_s: the adaptive idle spin's ceiling in seconds (None: :data:`MAX_SPIN_S`).
    """

    def __init__(self, make_session: Callable[[], Session], features: int, identity: Callable[[], bytes],
                 irq: Callable[[int], None], irq_settings: Callable[[], tuple[int, int, int]],
                 bus_master: Callable[[], bool], max_spin_s: float | None = None) -> None:
        self.max_spin_s = MAX_SPIN_S if max_spin_s is None else max(0.0, float(max_spin_s))
        self.min_spin_s = min(SPIN_S, self.max_spin_s)
        self.spin_s = self.min_spin_s            # the current idle spin (see the module docstring)
        self.ram = GuestRam(log)
        self.stats = DeviceStats()
        self.controls: collections.deque[tuple[str, Any]] = collections.deque()
        self.kick = threading.Event()
        self.epoch = 0                   # bumped (under the lock) by hard resets, disconnects, bus master off
        self.enabled = False
        self.fatal_code = FatalCode.NONE
        self.fatal_info = 0
        self.reset_count = 0
        self.aborting = False            # Control.RESET seen: abandon the rest of the batch
        self._make_session = make_session
        self.session = make_session()
        self._irq = irq
        self._irq_settings = irq_settings
        self._bus_master = bus_master
        self._rings: Rings | None = None
        self._unsignalled = 0
        self._oldest_unsignalled = 0.0
        self._batch_irq: tuple[int, int, int] | None = None
        self._stopping = False
        self.executor = Executor(self.ram, lambda: self.session, lambda: self.epoch, features, identity,
                                 self.stats_document, self._reset_command, self.stats)
        self.profile: profile.PhaseProfile | None = None
        #: the native fast lane (:meth:`use_fastlane`; None: every command runs in Python)
        self.fastlane: FastLane | None = None
        self._native_gen = -1            # guest-RAM generation the lane's group was written under
        self._native_posted = False      # ... and whether it was posted at issue already
        if profile.enabled():            # benchmarks: per-phase timers (see vfio_server.xpu.profile)
            self._profile(profile.PhaseProfile())
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)     # the loop waits at most this for the GIL
        self._thread = threading.Thread(target=self._run, name="vxpu-xpu-poller", daemon=True)
        self._thread.start()

    def use_fastlane(self, lane: FastLane | None) -> None:
        """Run the common success path natively through ``lane`` (None: Python only). Call it
        before the queue is enabled."""
        self.fastlane = lane
        self.native_polling = lane is not None and poll_wanted()
        self.executor.plan_hook = None if lane is None else lane.add_plan

    def _profile(self, prof: profile.PhaseProfile) -> None:
        """Wrap the per-command and per-batch steps with ``prof``'s timers."""
        self.profile = prof
        self._execute = prof.wrap_execute(self._execute)  # type: ignore[method-assign]
        self._flush = prof.wrap("flush", self._flush)  # type: ignore[method-assign]
        self._cycle = prof.wrap("cycle", self._cycle, count_if=lambda n: n > 0)  # type: ignore[method-assign]
        self._sleep = prof.wrap("sleep", self._sleep)  # type: ignore[method-assign]
        self.doorbell = prof.wrap("doorbell", self.doorbell)  # type: ignore[method-assign]
        for step in ("issue", "finish", "fence", "extend"):    # the fast lane's steps (poller_native)
            name = f"_native_{step}"
            setattr(self, name, prof.wrap(f"native_{step}", getattr(self, name)))
        ex = self.executor
        ex._synchronize = prof.wrap("synchronize", ex._synchronize)  # type: ignore[method-assign]

    # -- loop side -----------------------------------------------------------------------------
    def request(self, what: str, arg: Any = None) -> None:
        """Queue a control request (``enable`` with a QueueConfig, ``disable``, ``reset``).

        A guest can write the registers faster than the poller handles them (a reset waits for
        its kernels), so at most :data:`MAX_CONTROLS` wait: past that a reset replaces them
        all (it undoes what they would do) and any other request is dropped."""
        controls = self.controls
        if what == "reset":
            self.aborting = True
            if len(controls) >= MAX_CONTROLS:
                controls.clear()
        elif len(controls) >= MAX_CONTROLS:
            _budget.log(log, logging.WARNING, "accelerator control request %r dropped: %d pending",
                        what, len(controls))
            return
        controls.append((what, arg))
        self.poke()
        self.kick.set()

    def poke(self) -> None:
        """Any thread: a running native poll returns to Python soon (a control request, new
        interrupt settings), without waiting for it."""
        lane = self.fastlane
        if lane is not None:
            lane.halt()

    def _quiesce(self) -> None:
        """Loop side, with :attr:`GuestRam.lock` held, before guest memory or the tables change:
        the native poll touches neither from now on (see NativeLane)."""
        lane = self.fastlane
        if lane is not None:
            lane.quiesce()

    def doorbell(self) -> None:
        """A DOORBELL write: wake the poller, and clear need-wakeup at once, so the descriptors
        the guest stores while the poller wakes up ring no further doorbells (each one is a
        trapped register write). Skipped when the guest-RAM lock is taken: the poller is then
        busy, not asleep, and clears the flag itself."""
        self.stats.doorbells += 1
        self.kick.set()
        ram = self.ram
        if ram.lock.acquire(blocking=False):
            try:
                rings = self._rings
                if self.enabled and rings is not None and rings.attached and rings.generation == ram.generation:
                    rings.set_need_wakeup(False)
            finally:
                ram.lock.release()

    def hard_reset(self) -> None:
        """Device reset or disconnect: stop all guest-memory access now (no DMA after this
        returns, no completions for what was in flight), then drop the guest's device state on
        the poller thread."""
        with self.ram.lock:
            self._quiesce()
            self.epoch += 1
            self._stop_queue()
            self.fatal_code, self.fatal_info = FatalCode.NONE, 0
            self.controls.clear()
            self.aborting = True
            self.controls.append(("reset", "quiet"))
        self.kick.set()

    def bus_master_lost(self) -> None:
        """Bus mastering went off: a running queue stops with NO_BUS_MASTER, at once, and the
        commands of its batch touch guest memory no more (the epoch moves: they are abandoned)."""
        with self.ram.lock:
            self._quiesce()
            self.executor.forget_plans()
            if self.enabled:
                self.epoch += 1
                self._set_fatal(FatalCode.NO_BUS_MASTER, 0, "bus mastering turned off while the queue ran")

    def on_map(self, region: DmaRegion) -> None:
        """After ``region`` is mapped: list it (the poller registers it with the backend)."""
        with self.ram.lock:
            self._quiesce()
            if self.ram.add(region) is not None:
                self.kick.set()

    def on_unmap(self, region: DmaRegion) -> None:
        """Before ``region`` is unmapped: drop views into it (the poller re-translates)."""
        with self.ram.lock:
            self._quiesce()
            if self._rings is not None:
                self._rings.release()
            self.ram.remove(region, self.session.unregister_host)
            self.executor.forget_plans()

    def stop(self) -> None:
        """Stop the thread and close the session (server shutdown); the fast lane's tables go
        too, once the thread has ended (a thread still in a driver wait keeps them, and the
        backend withdraws its fault record from them before freeing it)."""
        self._stopping = True
        self.poke()
        self.kick.set()
        self._thread.join(5.0)
        with self.ram.lock:
            self._quiesce()
            self._stop_queue()
        self.session.close()
        if self.fastlane is not None and not self._thread.is_alive():
            self.fastlane.close()

    # -- state (lock held) ---------------------------------------------------------------------
    def _stop_queue(self) -> None:
        if self._rings is not None:
            self._rings.release()
        self._rings = None
        self.enabled = False

    def _set_fatal(self, code: FatalCode, info: int, why: str) -> None:
        _budget.log(log, logging.WARNING, "accelerator queue stopped: %s (%s, info %#x)", why, code.name, info)
        self._stop_queue()
        self.fatal_code, self.fatal_info = code, info & abi.INDEX_MASK
        self.stats.fatal_errors += 1
        ctrl, _count, _usec = self._irq_settings()
        if ctrl & IrqControl.FATAL:
            self._irq(-1)

    # -- control requests (poller thread) ------------------------------------------------------
    def _controls(self) -> bool:
        did = False
        while self.controls:
            try:
                what, arg = self.controls.popleft()
            except IndexError:
                break
            did = True
            if what == "enable":
                self._enable(arg)
            elif what == "disable":
                self._drain()
            elif what == "reset":
                self._reset(quiet=arg == "quiet")
        return did

    def _enable(self, cfg: QueueConfig) -> None:
        with self.ram.lock:
            if self.enabled or self.fatal_code:
                return
            if not self._bus_master():
                self._set_fatal(FatalCode.NO_BUS_MASTER, 0, "QUEUE_ENABLE with bus mastering off")
                return
            problem = check_config(cfg, self.ram)
            if problem is not None:
                self._set_fatal(FatalCode.BAD_QUEUE_CONFIG, problem[0], problem[1])
                return
            rings = Rings(cfg)
            rings.attach(self.ram)
            rings.start()
            self._rings = rings
            self.enabled = True
            self._unsignalled = 0

    def _drain(self) -> None:
        """QUEUE_ENABLE = 0: finish what was submitted when it was seen, then stop."""
        with self.ram.lock:
            rings = self._rings
            try:
                left = rings.pending() if rings is not None and rings.attached else 0
            except QueueFatal:
                left = 0
        while left > 0:
            done = self._cycle(limit=left, extend=False)
            if done <= 0:
                break
            left -= done
        with self.ram.lock:
            self._stop_queue()

    def _reset(self, quiet: bool) -> None:
        """Control.RESET (ABORTED for what was submitted) or the tail of a hard reset."""
        with self.ram.lock:
            rings = self._rings
            if not quiet and rings is not None:
                try:
                    rings.attach(self.ram)
                    for raw in rings.unread():
                        rings.complete(raw[3], _ABORTED, 0, 0)
                        self.stats.count(raw[0], _ABORTED)
                        self._unsignalled += 1          # signalled below
                except QueueFatal:
                    pass
            self._stop_queue()
            self.fatal_code, self.fatal_info = FatalCode.NONE, 0
        self.reset_session()
        self.executor.async_error = None
        self.executor.queued = 0
        self.executor.events.clear()
        self.aborting = any(what == "reset" for what, _ in list(self.controls))
        if not quiet:
            self._signal(force=True)            # the ABORTED completions, before RESET_COUNT moves
        self.reset_count += 1
        self.stats.resets += 1

    def reset_session(self) -> None:
        """Drop every allocation, module and event of the guest: a fresh session, with guest
        RAM registered again. The old session's work is waited for first without the guest-RAM
        lock (a long kernel must not hold up the loop); the swap itself holds it, so no unmap
        races the old registrations."""
        old = self.session
        # A fault recorded before the wait is raised at once, without waiting: wait again (each
        # asynchronous error is raised once), so the close below finds nothing left to wait for.
        for _ in range(old.quota.queue_depth + 1):
            try:
                old.synchronize()
                break
            except BackendError as exc:
                log.debug("work dropped by a reset failed: %s", exc)
                if exc.status not in ASYNC_ERRORS:
                    break
        with self.ram.lock:
            old.close()
            self.executor.forget_plans()
            self.session = self._make_session()
            self.ram.forget_registrations()
            self.ram.register_pending(self.session.register_host)

    def _reset_command(self) -> None:
        """The RESET opcode: the guest's device state goes, the queue keeps running."""
        self.reset_session()
        self.reset_count += 1
        self.stats.resets += 1

    def _register_new_ram(self) -> None:
        if self.ram.unregistered:
            with self.ram.lock:
                self.ram.register_pending(self.session.register_host)

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        last = time.monotonic()
        while not self._stopping:
            polled = False
            try:
                self._register_new_ram()
                did = self._controls()
                if not did and self._poll_ready():      # the lane's C loop runs and spins instead
                    idle = self._native_poll(max(0.0, last + self.spin_s - time.monotonic()))
                    if idle is not None:
                        polled = True
                        if idle != math.inf:            # it ran something: the spin counts from then
                            last = time.monotonic() - idle
                if not did and not polled:
                    did = not self._quiet() and self._cycle() > 0
            except Exception as exc:     # noqa: BLE001 -- a device-model bug must not kill the poller
                _budget.log(log, logging.ERROR, "accelerator poller error: %s: %s", type(exc).__name__, exc,
                            exc_info=log.isEnabledFor(logging.DEBUG))
                did = polled = False
                time.sleep(0.001)
            now = time.monotonic()
            if did:
                last = now
                continue
            self._timer_irq(now)
            if now - last < self.spin_s:
                if not polled:
                    os.sched_yield()     # releases the GIL and lets a submitter sharing this core run
                continue
            self._sleep()
            now = time.monotonic()
            self._adapt_spin(now - last)
            last = now

    def _adapt_spin(self, gap: float) -> None:
        """After a sleep that ended ``gap`` seconds after the last work: spin long enough to
        catch such a gap next time when it is within the ceiling, else back to the floor."""
        if gap <= self.max_spin_s:
            self.spin_s = min(self.max_spin_s, max(self.spin_s, 2 * gap))
        else:
            self.spin_s = self.min_spin_s

    def _quiet(self) -> bool:
        """Lock-free: the running queue has nothing new (so a spin iteration skips the locked
        cycle: ~2 us of ring reads per iteration, and the guest-RAM lock the loop may want)."""
        rings = self._rings
        return rings is not None and self.enabled and rings.idle_hint(self.ram.generation)

    def _sleep(self) -> None:
        """Set need-wakeup, re-check, then sleep until kicked (bounded while the queue runs)."""
        while not self._stopping and not self.controls:
            with self.ram.lock:
                rings = self._rings if self.enabled else None
                if rings is not None:
                    try:
                        rings.attach(self.ram)
                        if rings.pending() and rings.cq_free():      # woken for work: the flag stays clear
                            rings.set_need_wakeup(False)
                            return
                        rings.set_need_wakeup(True)
                        if rings.pending() and rings.cq_free():      # stored before the flag was seen
                            rings.set_need_wakeup(False)
                            return
                    except QueueFatal as exc:
                        self._set_fatal(exc.code, exc.info, str(exc))
                        return
            self.stats.sleeps += 1
            timeout = abi.MAX_WAKEUP_LATENCY_MS / 1000 if rings is not None else IDLE_WAIT_S
            if self._unsignalled:
                timeout = min(timeout, max(0.0, self._irq_deadline() - time.monotonic()))
            self.kick.wait(timeout)
            self.kick.clear()
            self._timer_irq(time.monotonic())
        with self.ram.lock:
            if self._rings is not None and self._rings.attached:
                self._rings.set_need_wakeup(False)

    def _cycle(self, limit: int = BATCH, extend: bool = True) -> int:
        """Take up to ``limit`` descriptors and complete them (``extend``: and those that join
        the batch while copies wait, see :meth:`_run_batch`). Returns how many were completed
        (-1 when the queue stopped)."""
        lane = self.fastlane
        queue = self.executor.made_queue() if lane is not None else None
        fence: tuple[int, int] | None = None
        with self.ram.lock:
            rings = self._rings
            if not self.enabled or rings is None:
                return 0
            try:
                rings.attach(self.ram)
                pending = rings.pending()
                free = rings.cq_free()
            except QueueFatal as exc:
                self._set_fatal(exc.code, exc.info, str(exc))
                return -1
            n = min(pending, free, limit, BATCH)
            if n == 0:
                return 0
            if not self._bus_master():
                self._set_fatal(FatalCode.NO_BUS_MASTER, 0, "bus mastering is off")
                return -1
            epoch = self.epoch
            self.stats.batch(n, (rings.sq_head + n - rings.cq_tail) & abi.INDEX_MASK)
            native = 0
            take = n
            if lane is not None and queue is not None and not self.aborting:
                native, take, fence = self._native_issue(lane, rings, queue, n, free if extend else 0)
            descs = rings.take(take) if take else []
        return self._finish_cycle(rings, epoch, native, descs, fence, extend)

    def _finish_cycle(self, rings: Rings, epoch: int, native: int, descs: list[tuple[int, ...]],
                      fence: tuple[int, int] | None, extend: bool) -> int:
        """The rest of a cycle after the taking (lock released): post the fast lane's group of
        ``native`` completions (or hand it to Python's batch when ``descs`` follow), wait for
        the FENCE it stopped at, run ``descs``. Returns how many were completed, -1 when the
        queue stopped meanwhile."""
        lane = self.fastlane
        self.executor.epoch = epoch
        t0 = time.perf_counter_ns()
        try:
            done = 0
            handed: list[tuple[int, int, int, int, int, int, bool]] = []
            if native or fence is not None:
                self._batch_irq = self._irq_settings()
                count = max(1, self._batch_irq[1])
                if native and not descs and extend and lane is not None and lane.batch.syncs:
                    descs = self._native_extend(rings, epoch)
                if native and descs:        # Python's descriptors join the lane's group, as without it
                    handed = lane.held(0, lane.batch.group) if lane is not None else []
                elif native:
                    if not self._native_finish(rings, epoch, count):
                        return -1
                    done = native
                if fence is not None:
                    got = self._native_fence(fence, rings, epoch, count)
                    if got < 0:
                        return -1
                    done += got
            if descs:
                got = self._run_batch(descs, rings, epoch, extend, handed)
                if got < 0:
                    return -1
                done += got
            self._signal(force=False, batch_end=True)
        finally:
            self.stats.busy_ns += time.perf_counter_ns() - t0
            self._batch_irq = None
        return done

    def _run_batch(self, descs: list[tuple[int, ...]], rings: Rings, epoch: int, extend: bool = True,
                   handed: list[tuple[int, int, int, int, int, int, bool]] | None = None) -> int:
        """Execute and complete ``descs`` in order. Completions are held and posted together
        (one lock, one ``cq_tail`` store): at the end of the batch, and before any command that
        may wait (all but :data:`_HOLDABLE`), so a completion is never held up by a later slow
        command. HTODs and DTOHs are not synchronized one by one: their completions (and every
        later one, to keep the order) wait for one synchronization, which happens at the next
        post, and before any command that is not a plain copy, memset or NOP (so it never waits
        for a kernel posted after them). While such copies wait and the guest has posted more
        descriptors, those join the batch (up to :data:`MAX_HELD` held completions) before the
        device synchronizes: a stream of copies keeps the backend's queue fed instead of draining
        it at every batch boundary. Returns the number completed, -1 when the queue stopped
        meanwhile. ``handed``: the fast lane's unposted group, held as if Python had run it."""
        self._batch_irq = self._irq_settings()      # the IRQ_* registers, read once per batch
        count = max(1, self._batch_irq[1])
        held = handed or []                         # tag, status, r1, r2, opcode, flags, sync
        syncs = sum(1 for entry in held if entry[6])     # held entries that wait for a synchronization
        done = 0
        ex = self.executor
        execute = self._execute
        ex.defer_sync = True
        deferring = False
        scanned, fence_ahead = -1, False     # the next command that is not holdable, and is it a FENCE
        try:
            i = 0
            while True:
                if i == len(descs):
                    if not extend or not syncs or len(held) >= MAX_HELD:
                        break
                    more = self._take_more(rings, epoch, len(held))
                    if not more:
                        break
                    descs.extend(more)
                raw = descs[i]
                op = raw[0]
                if held and (op not in _HOLDABLE or (syncs and op not in _DEFERRABLE)):
                    if not self._flush(held, syncs, rings, epoch, count):
                        return -1
                    done += len(held)
                    held.clear()
                    syncs = 0
                if op in _DEFER_FROM and not deferring:
                    if i >= scanned:
                        scanned, fence_ahead = _next_stop(descs, i)
                    if fence_ahead:
                        defer_wakeups()
                        deferring = True
                result = execute(raw)
                if deferring and op == _FENCE:
                    resume_wakeups()
                    deferring = False
                if result is None:
                    return -1
                needs_sync = ex.sync_pending
                if needs_sync:
                    ex.sync_pending = False
                    syncs += 1
                held.append((*result, op, raw[1], needs_sync))
                i += 1
            if held and not self._flush(held, syncs, rings, epoch, count):
                return -1
            return done + len(held)
        finally:
            if deferring:
                resume_wakeups()
            ex.defer_sync = False
            ex.sync_pending = False

    def _take_more(self, rings: Rings, epoch: int, held: int) -> list[tuple[int, ...]]:
        """The descriptors posted since the batch was taken, as far as the completion ring has
        room for them besides the ``held`` completions; none when the queue stopped, changed or
        has a control request waiting (it is then handled first)."""
        with self.ram.lock:
            if self.epoch != epoch or not self.enabled or not self._same_rings(rings) or self.controls:
                return []
            try:
                rings.attach(self.ram)
                n = min(rings.pending(), rings.cq_free() - held, BATCH)
            except QueueFatal as exc:
                self._set_fatal(exc.code, exc.info, str(exc))
                return []
            if n <= 0 or not self._bus_master():
                return []
            descs = rings.take(n)
            self.stats.batch(n, (rings.sq_head - rings.cq_tail) & abi.INDEX_MASK)
        return descs

    def _execute(self, raw: tuple[int, ...]) -> tuple[int, int, int, int] | None:
        """``(tag, status, result, result2)`` for one descriptor, ABORTED while a Control.RESET
        is pending; None when a reset or disconnect abandoned it."""
        if self.aborting:
            return raw[3], _ABORTED, 0, 0
        try:
            result = self.executor.execute(raw)
        except Abandoned:
            return None
        except Exception as exc:     # noqa: BLE001 -- a bug: INTERNAL for this command only
            _budget.log(log, logging.ERROR, "command %#x: internal error %s: %s", raw[0],
                        type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            result = raw[3], _INTERNAL, 0, 0
        if self.aborting:
            return raw[3], _ABORTED, 0, 0
        return result

    def _flush(self, held: list[tuple[int, int, int, int, int, int, bool]], syncs: int, rings: Rings,
               epoch: int, count: int) -> bool:
        """Post the held completions in order, after one synchronization when ``syncs`` of them
        wait for it (a copy then gets the asynchronous error that surfaced meanwhile, if any).
        False when the queue stopped or was replaced meanwhile (nothing is posted)."""
        err = self.executor.synchronize_deferred() if syncs else None
        if err is not None or self.aborting:
            held[:] = [self._final(entry, err) for entry in held]
        with self.ram.lock:
            if not self._still_attached(rings, epoch):
                return False
            rings.complete_many(held)
        forced = 0
        count_one = self.stats.count
        for entry in held:
            count_one(entry[4], entry[1])
            forced |= entry[5]
        self._note_completions(len(held), forced & _DESC_IRQ, count)
        return True

    def _final(self, entry: tuple[int, int, int, int, int, int, bool], err: Status | None
               ) -> tuple[int, int, int, int, int, int, bool]:
        """A held completion as posted: ABORTED while a Control.RESET is pending, the
        synchronization's error for a successful copy that waited for it."""
        tag, status, r1, r2, op, flags, needs_sync = entry
        if self.aborting:
            return tag, _ABORTED, 0, 0, op, flags, needs_sync
        if needs_sync and err is not None and status == 0:
            return tag, int(err), r1, r2, op, flags, needs_sync
        return entry

    def _still_attached(self, rings: Rings, epoch: int) -> bool:
        """With :attr:`GuestRam.lock` held: are ``rings`` still this device's enabled queue of
        ``epoch``, attached to the current guest-RAM views? A ring configuration that no longer
        validates puts the device into its fatal-error state (False, as for a stopped queue)."""
        if self.epoch != epoch or not self.enabled or not self._same_rings(rings):
            return False
        try:
            rings.attach(self.ram)
        except QueueFatal as exc:
            self._set_fatal(exc.code, exc.info, str(exc))
            return False
        return True

    def _same_rings(self, rings: Rings) -> bool:
        """Is ``rings`` still the running queue (not replaced by a reset or re-enable)?"""
        return self._rings is rings

    # -- interrupts ----------------------------------------------------------------------------
    def _note_completions(self, n: int, forced: int, count: int) -> None:
        """``n`` completions were posted (``forced``: one of them asked for DescFlags.IRQ)."""
        if not self._unsignalled:
            self._oldest_unsignalled = time.monotonic()
        self._unsignalled += n
        if forced or self._unsignalled >= count:
            self._signal(force=True)

    def _irq_deadline(self) -> float:
        _ctrl, _count, usec = self._irq_settings()
        return self._oldest_unsignalled + min(usec, MAX_COALESCE_USEC) / 1e6

    def _timer_irq(self, now: float) -> None:
        if self._unsignalled and now >= self._irq_deadline():
            self._signal(force=True)

    def _signal(self, force: bool, batch_end: bool = False) -> None:
        """Raise vector 0 for the unsignalled completions if due (see the module docstring)."""
        if not self._unsignalled:
            return
        ctrl, _count, usec = self._batch_irq or self._irq_settings()
        if not force and not (batch_end and usec == 0):
            return
        self._unsignalled = 0
        if ctrl & _IRQ_COMPLETION:
            self._irq(0)

    # -- documents -----------------------------------------------------------------------------
    def stats_document(self) -> bytes:
        rings = self._rings
        if rings is not None:
            self.stats.queue_depth = (rings.sq_head - rings.cq_tail) & abi.INDEX_MASK
        if self.profile is not None:
            self.profile.write_trace()
        session = self.session.statistics()
        lane = self.fastlane
        if lane is not None:
            session.update(lane.statistics())
        return stats_json(self.stats, session,
                          self.profile.as_dict() if self.profile is not None else None)
