"""Optional per-phase timing of the accelerator's poller (``VXPU_XPU_PROFILE=1``), for benchmarks.

When the variable is set the poller wraps its per-command and per-batch steps with a timer
(wall-clock ``perf_counter_ns``, summed with counts) and the STATS document carries the totals
under ``"profile"``:

* ``op:<OPCODE>`` — :meth:`Executor.execute` per opcode (descriptor checks, guest-memory
  reads, the session and backend calls, a FENCE's wait);
* ``synchronize`` — every wait for the backend (inside a FENCE, or for a batch's copies);
* ``flush`` — posting a group of completions, its synchronization included;
* ``cycle`` — a whole poller cycle that took descriptors (ring reads, statistics, IRQ
  settings, the batch); ``cycle - sum(op:*) - flush`` is the per-batch cost of the poller;
* ``sleep`` — the poller asleep (need-wakeup set) until a doorbell, a request or its timeout;
* ``doorbell`` — a DOORBELL write handled on the serve loop (its end: the poller was kicked);
* ``native_issue`` / ``native_finish`` / ``native_fence`` / ``native_extend`` — the fast lane's
  steps (:mod:`~vxpu.vfio_server.xpu.poller_native`): a C run and its accounting under the lock,
  posting a group (its copies' wait included), a FENCE's native wait and completion, taking
  the descriptors posted while copies wait.

With ``VXPU_XPU_TRACE=FILE`` as well, the last :data:`TRACE_EVENTS` timed calls are kept as
``(key, start_ns, end_ns)`` on ``time.perf_counter_ns`` (CLOCK_MONOTONIC: the same clock in every
process of the host, so a guest's timestamps line up with them) and written to FILE as JSON
whenever the STATS document is made.

Unset, nothing is wrapped: the hot path is unchanged. Not for production: the timers cost
about 0.2 us per wrapped call.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vxpu.abi.xpu import Opcode

F = TypeVar("F", bound=Callable[..., Any])

ENV = "VXPU_XPU_PROFILE"
TRACE_ENV = "VXPU_XPU_TRACE"
TRACE_EVENTS = 50_000
_NAMES = {int(op): op.name for op in Opcode}


def enabled() -> bool:
    """Whether ``VXPU_XPU_PROFILE`` asks for a profile."""
    return os.environ.get(ENV, "") not in ("", "0")


class PhaseProfile:
    """Summed wall-clock nanoseconds and counts per phase (one writer: the poller thread)."""

    def __init__(self, trace_path: str | None = None) -> None:
        self.totals: dict[str, list[int]] = {}
        self.trace_path = trace_path if trace_path is not None else os.environ.get(TRACE_ENV) or None
        self.events: collections.deque[tuple[str, int, int]] | None = (
            collections.deque(maxlen=TRACE_EVENTS) if self.trace_path else None)

    def add(self, key: str, ns: int, start: int = 0) -> None:
        if self.events is not None:
            self.events.append((key, start, start + ns))
        entry = self.totals.get(key)
        if entry is None:
            self.totals[key] = [1, ns]
        else:
            entry[0] += 1
            entry[1] += ns

    def wrap(self, key: str, fn: F, *, count_if: Callable[[Any], bool] | None = None) -> F:
        """``fn`` timed under ``key`` (only calls whose result passes ``count_if``, if given)."""
        clock, add = time.perf_counter_ns, self.add

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            result = fn(*args, **kwargs)
            if count_if is None or count_if(result):
                add(key, clock() - t0, t0)
            return result
        return timed  # type: ignore[return-value]

    def wrap_execute(self, fn: F) -> F:
        """``fn(raw_descriptor)`` timed per opcode."""
        clock, add = time.perf_counter_ns, self.add

        @functools.wraps(fn)
        def timed(raw: tuple[int, ...]) -> Any:
            t0 = clock()
            try:
                return fn(raw)
            finally:
                add("op:" + _NAMES.get(raw[0], "UNKNOWN"), clock() - t0, t0)
        return timed  # type: ignore[return-value]

    def write_trace(self) -> None:
        """Write the kept events to the trace file (if tracing)."""
        if self.events is not None and self.trace_path:
            with open(self.trace_path, "w") as fh:
                json.dump(list(self.events), fh)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{key: {"count": n, "total_us": ..., "mean_us": ...}}``."""
        return {key: {"count": n, "total_us": ns / 1e3, "mean_us": ns / n / 1e3}
                for key, (n, ns) in sorted(self.totals.items())}
