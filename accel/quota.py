"""Per-client quotas: how much of a device one guest may hold.

A :class:`Quota` is a frozen set of limits; a :class:`QuotaUsage` counts what one client holds
now. The session charges usage *before* it asks the backend for anything and refunds it when
the object goes away, so a hostile guest can neither exhaust the device nor grow the server's
handle tables without bound. Every limit is a named constant so operators can see and change
the defaults (``vxpu serve --quota-memory ...`` maps onto :func:`Quota.with_overrides`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from vxpu.accel.backend import BackendError, Status

MiB = 1 << 20
GiB = 1 << 30

DEFAULT_MEMORY_BYTES = 4 * GiB          # device memory one client may hold
DEFAULT_MAX_ALLOCATIONS = 65536         # live allocations (bounds the allocation table)
DEFAULT_MAX_ALLOCATION_BYTES = 4 * GiB  # one allocation
DEFAULT_MAX_MODULES = 256               # loaded modules
DEFAULT_MAX_MODULE_BYTES = 64 * MiB     # one module image on the wire
DEFAULT_MAX_KERNELS = 4096              # kernel handles (get_kernel results)
DEFAULT_MAX_QUEUES = 64                 # queues besides the default queue
DEFAULT_MAX_EVENTS = 4096               # live events
DEFAULT_QUEUE_DEPTH = 1024              # operations in flight on one queue
DEFAULT_COMPILE_SECONDS = 60            # module-load (compile) seconds one client may bank
COMPILE_WINDOW_S = 600.0                # ... refilled at that many seconds per this window


@dataclass(frozen=True)
class Quota:
    """Limits for one client. All values are positive; see the ``DEFAULT_*`` constants."""

    memory_bytes: int = DEFAULT_MEMORY_BYTES
    max_allocations: int = DEFAULT_MAX_ALLOCATIONS
    max_allocation_bytes: int = DEFAULT_MAX_ALLOCATION_BYTES
    modules: int = DEFAULT_MAX_MODULES
    module_bytes: int = DEFAULT_MAX_MODULE_BYTES
    kernels: int = DEFAULT_MAX_KERNELS
    queues: int = DEFAULT_MAX_QUEUES
    events: int = DEFAULT_MAX_EVENTS
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    compile_seconds: int = DEFAULT_COMPILE_SECONDS

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"quota {f.name} must be a positive integer, got {value!r}")

    def with_overrides(self, **limits: int) -> Quota:
        """A copy with some limits changed.

        Raises:
            ValueError: for an unknown limit name or a non-positive value.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(limits) - names)
        if unknown:
            raise ValueError(f"unknown quota limit(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **limits)


DEFAULT_QUOTA = Quota()


@dataclass
class QuotaUsage:
    """What one client holds now, checked against a :class:`Quota`."""

    quota: Quota = DEFAULT_QUOTA
    memory_bytes: int = 0
    allocations: int = 0
    modules: int = 0
    kernels: int = 0
    queues: int = 0
    events: int = 0

    def charge_memory(self, size: int) -> None:
        """Reserve ``size`` bytes of device memory and one allocation.

        Raises:
            BackendError: QUOTA_EXCEEDED when the allocation, the total or the count would
                exceed the quota.
        """
        q = self.quota
        if size > q.max_allocation_bytes:
            raise BackendError(Status.QUOTA_EXCEEDED,
                               f"allocation of {size} bytes exceeds the per-allocation quota of "
                               f"{q.max_allocation_bytes} bytes")
        if self.memory_bytes + size > q.memory_bytes:
            raise BackendError(Status.QUOTA_EXCEEDED,
                               f"allocation of {size} bytes exceeds the memory quota "
                               f"({self.memory_bytes} of {q.memory_bytes} bytes in use)")
        if self.allocations >= q.max_allocations:
            raise BackendError(Status.QUOTA_EXCEEDED, f"allocation count quota ({q.max_allocations}) reached")
        self.memory_bytes += size
        self.allocations += 1

    def refund_memory(self, size: int) -> None:
        """Give back what :meth:`charge_memory` reserved."""
        self.memory_bytes -= size
        self.allocations -= 1

    def charge(self, kind: str) -> None:
        """Reserve one module, kernel, queue or event (``kind`` is the field name).

        Raises:
            BackendError: QUOTA_EXCEEDED when the client already holds its limit.
        """
        limit = getattr(self.quota, kind)
        held = getattr(self, kind)
        if held >= limit:
            raise BackendError(Status.QUOTA_EXCEEDED, f"{kind} quota ({limit}) reached; release some first")
        setattr(self, kind, held + 1)

    def refund(self, kind: str, count: int = 1) -> None:
        """Give back ``count`` objects of ``kind``."""
        setattr(self, kind, getattr(self, kind) - count)

    def clear(self) -> None:
        """Forget all usage (after a context reset every object is gone)."""
        self.memory_bytes = self.allocations = self.modules = 0
        self.kernels = self.queues = self.events = 0


class CompileBudget:
    """The compile time one client may use, so a guest loading modules in a loop gets
    QUOTA_EXCEEDED instead of the compile workers.

    A bucket of ``seconds`` seconds (the quota's ``compile_seconds``) that refills at
    ``seconds`` per :data:`COMPILE_WINDOW_S`: a client compiling without a pause gets a tenth
    of one worker, and bursts up to the full bucket. Every load is charged the wall time it
    took (a cache hit costs next to nothing); a load that starts with any credit left may run
    up to the compile worker's deadline, so the bucket can go negative and must refill first.
    One load of a client runs at a time. The budget survives context resets: a guest cannot
    refill it by faulting.
    """

    def __init__(self, seconds: int = DEFAULT_COMPILE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = float(seconds)
        self._clock = clock
        self._credit = self.seconds
        self._stamp = clock()
        self.in_flight = False
        self.spent = 0.0

    def credit(self) -> float:
        """Seconds of compile time available now (negative while overdrawn)."""
        now = self._clock()
        self._credit = min(self.seconds, self._credit + (now - self._stamp) * self.seconds / COMPILE_WINDOW_S)
        self._stamp = now
        return self._credit

    def begin(self) -> None:
        """Start a load.

        Raises:
            BackendError: QUOTA_EXCEEDED when a load of this client is already running or the
                budget is used up (the message says when it has refilled).
        """
        if self.in_flight:
            raise BackendError(Status.QUOTA_EXCEEDED, "a module load of this client is already running; "
                               "wait for it before loading another")
        credit = self.credit()
        if credit <= 0:
            wait = -credit * COMPILE_WINDOW_S / self.seconds + 1
            raise BackendError(Status.QUOTA_EXCEEDED, f"compile budget used up ({self.seconds:g} s per "
                               f"{COMPILE_WINDOW_S:g} s); retry in {wait:.0f} s")
        self.in_flight = True

    def end(self, seconds: float) -> None:
        """Finish a load that took ``seconds``."""
        self.in_flight = False
        self.spent += seconds
        self.credit()
        self._credit -= seconds
