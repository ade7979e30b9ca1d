"""Ordered queues and events for backends whose "device" is the host (CPU and NPU).

A :class:`HostQueue` runs submitted operations strictly in submission order on its own worker
thread. Memory operations take a fast path: when the queue is idle they run at once on the
caller's thread (still in order, since nothing is ahead of them), which keeps small copies
cheap. Every operation carries the backend's context *generation*; after a fault the backend
bumps the generation and the queue drops the stale operations instead of running them.

A :class:`HostEvent` completes when the queue reaches it and stamps ``perf_counter_ns``.

**Deferred wake-ups.** A thread that is about to synchronize anyway (the accelerator device's
poller, between a LAUNCH and the FENCE behind it in one batch) may call
:func:`defer_wakeups`: its submissions then do not wake the worker until it calls
:func:`resume_wakeups`. A synchronize in between runs the work on that thread (it helps), and
no worker is woken only to contend with it for the GIL: on a virtualized host each such
wake-up and GIL hand-off costs tens of microseconds, more than an empty kernel. A caller must
resume before anything that waits for the queue without helping (an event wait).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Op = Callable[[], None]
_local = threading.local()      # .deferred: set of queues whose wake-up this thread deferred


def defer_wakeups() -> None:
    """From now on, submissions from this thread do not wake any queue's worker (see the
    module docstring); :func:`resume_wakeups` wakes those that still have work."""
    if getattr(_local, "deferred", None) is None:
        _local.deferred = set()


def resume_wakeups() -> None:
    """End :func:`defer_wakeups`: wake the worker of every queue that got work meanwhile and
    still has some (the rest ran on a synchronizing thread). No-op when not deferring."""
    deferred = getattr(_local, "deferred", None)
    _local.deferred = None
    if deferred:
        for queue in deferred:
            queue._wake()


class HostEvent:
    """A point in a queue's stream; ``time_ns`` is set when the queue passes it."""

    __slots__ = ("done", "recorded", "time_ns")

    def __init__(self) -> None:
        self.recorded = False
        self.time_ns: int | None = None
        self.done = threading.Event()

    def arm(self) -> None:
        """Called when recorded: the event is pending until the queue reaches it."""
        self.recorded = True
        self.time_ns = None
        self.done.clear()

    def fire(self) -> None:
        self.time_ns = time.perf_counter_ns()
        self.done.set()


class HostQueue:
    """An in-order executor with one lazily started daemon worker thread.

    One lock guards the queue; two conditions on it say who is woken: the worker waits on
    ``_work`` for a runnable operation, :meth:`wait` and :meth:`stop` wait on ``_idle`` for
    progress. So finishing an operation inline (:meth:`run`, or a waiter helping) wakes no worker
    unless more work is queued, and a submission while an operation runs wakes no one (whoever
    finishes it hands on). On a many-core or virtualized host every wake-up of a sleeping
    thread costs the waker an inter-processor interrupt and the woken thread then contends for
    the GIL; the single condition this replaces woke the worker after every inline copy.

    Args:
        name: thread name suffix, for debugging.
        generation: a callable returning the backend's current context generation.
        on_error: called with the exception an operation raised and the generation it was
            submitted in; the backend turns it into a pending fault.
    """

    def __init__(self, name: str, generation: Callable[[], int],
                 on_error: Callable[[BaseException, int], None]) -> None:
        self.name = name
        self._generation = generation
        self._on_error = on_error
        self._ops: collections.deque[tuple[int, Op, HostEvent | None]] = collections.deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- submission -------------------------------------------------------------------
    def submit(self, op: Op, event: HostEvent | None = None) -> None:
        """Queue ``op`` (run later, in order). ``event`` is fired instead of dropped on reset."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=f"vxpu-queue-{self.name}", daemon=True)
                self._thread.start()
            self._ops.append((self._generation(), op, event))
            if not self._busy:           # else whoever runs the current operation hands on
                deferred = getattr(_local, "deferred", None)
                if deferred is None:
                    self._work.notify()
                else:
                    deferred.add(self)

    def _wake(self) -> None:
        """Wake the worker if work is queued and nothing runs (:func:`resume_wakeups`)."""
        with self._lock:
            if self._ops and not self._busy:
                self._work.notify()

    def run(self, op: Op, event: HostEvent | None = None) -> None:
        """Run ``op`` now on this thread if the queue is idle, else queue it behind the rest."""
        with self._lock:
            if self._ops or self._busy:
                inline = False
            else:
                self._busy = inline = True
        if not inline:
            self.submit(op, event)
            return
        try:
            op()
        finally:
            with self._lock:
                self._done()

    def record(self, event: HostEvent) -> None:
        """Fire ``event`` once everything submitted before it has run."""
        event.arm()
        self.run(event.fire, event)

    # -- waiting ----------------------------------------------------------------------
    def idle(self) -> bool:
        with self._lock:
            return not self._ops and not self._busy

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted operation has run or been dropped; False on timeout.

        Without a timeout the waiting thread helps: it runs queued operations itself whenever
        the worker is not busy (still one at a time, in order), which saves the hand-off to the
        worker thread on the common launch-then-synchronize path.
        """
        if timeout is not None:
            with self._lock:
                return self._idle.wait_for(lambda: not self._ops and not self._busy, timeout)
        while True:
            with self._lock:
                self._idle.wait_for(lambda: not self._busy)
                if not self._ops:
                    return True
                item = self._ops.popleft()
                self._busy = True
            self._run_item(item, helping=True)

    def _done(self, helping: bool = False) -> None:
        """An operation finished (lock held): wake the worker for what is queued behind it
        (unless this thread is a helping waiter, which takes it itself) and the waiters."""
        self._busy = False
        if self._ops and not helping:
            self._work.notify()
        self._idle.notify_all()

    def _run_item(self, item: tuple[int, Op, HostEvent | None], helping: bool = False) -> None:
        generation, op, event = item
        try:
            if generation == self._generation():
                op()
            elif event is not None:
                event.fire()       # a reset dropped the work before it; nothing to wait for
        except BaseException as exc:  # noqa: BLE001 - reported to the backend, never kills the thread
            self._on_error(exc, generation)
        finally:
            with self._lock:
                self._done(helping)

    def stop(self) -> None:
        """Wait for the queue, then end its worker thread (idempotent)."""
        with self._lock:
            self._idle.wait_for(lambda: not self._ops and not self._busy)
            self._stopping = True
            self._work.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- worker -----------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self._lock:
                self._work.wait_for(lambda: self._stopping or (self._ops and not self._busy))
                if self._stopping and not self._ops:
                    return
                item = self._ops.popleft()
                self._busy = True
            self._run_item(item)
