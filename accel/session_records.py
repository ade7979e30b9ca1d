"""The records a :class:`~vxpu.accel.session.Session` keeps, and the guard its methods run under.

* Handle-table entries (:class:`ModuleRecord`, :class:`KernelRecord`, :class:`QueueRecord`) and
  :class:`LaunchPlan`, a launch that passed every check (``Session.relaunch`` issues it again
  while the session's plan generation, from :func:`next_plan_generation`, is unchanged).
* :func:`guarded`: every public session method runs under the session lock, refuses a closed
  session, notices another client's context reset first, and maps any error to a
  :class:`BackendError` (an unexpected exception becomes INTERNAL, logged to the session's
  own logger within :data:`WARN_BUDGET`).
* :func:`dims3`: the launch-shape check with a fast path for three-int tuples.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from vxpu.accel.backend import BackendError, KernelInfo, ModuleKind, Status, pack_dims
from vxpu.accel.pool import DEFAULT_CHUNK_SIZE
from vxpu.accel.quota import Quota

from vxpu.log import LogBudget

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_QUEUE = 0                      # the handle of the backend's default queue
U64_MAX = (1 << 64) - 1

#: Guest-caused warnings (kernel faults, context resets, internal errors) logged at WARNING or
#: ERROR per process before they go to DEBUG; one more is allowed every WARN_REFILL_S seconds.
#: A guest faulting its kernels in a loop cannot flood the host's log (stats still count all).
WARN_BUDGET = 64
WARN_REFILL_S = 60.0

_budget = LogBudget(WARN_BUDGET, WARN_REFILL_S,
                    "further guest-caused device warnings are logged at DEBUG for a while")


def guest_log(logger: logging.Logger, level: int, fmt: str, *args: Any) -> None:
    """Log a guest-caused event at ``level`` while the budget lasts, else at DEBUG."""
    _budget.log(logger, level, fmt, *args)


def reserve_limit(quota: Quota) -> int:
    """Device bytes a client's pool may hold: twice its memory quota plus one chunk, so ordinary
    fragmentation never stops a client short of its quota, while a client fragmenting on
    purpose cannot make the host hold more than that."""
    return 2 * quota.memory_bytes + DEFAULT_CHUNK_SIZE


def status_of(exc: BaseException) -> Status:
    """The wire status for any exception a session operation raised (INTERNAL if unknown)."""
    return exc.status if isinstance(exc, BackendError) else Status.INTERNAL


@dataclass
class ModuleRecord:
    token: object
    kind: ModuleKind
    kernels: dict[str, int]            # kernel name -> kernel handle


@dataclass
class KernelRecord:
    token: object
    info: KernelInfo
    module: int


@dataclass
class QueueRecord:
    token: object | None
    pending: int = 0


@dataclass(eq=False)
class LaunchPlan:
    """A launch that passed every check, for ``Session.relaunch``. Only the session that made
    it can issue it, while its plan generation is ``generation``; the other fields are what the
    backend's ``launch`` takes (the same objects every time, which lets a GPU backend skip
    refilling its argument pack)."""

    generation: int
    kernel: object                     # the backend's kernel token
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: bytes
    shared_bytes: int
    queue: QueueRecord
    bounds: tuple[tuple[int, int], ...] | None      # a checked kernel's pointer buffers


_PLAN_GENERATIONS = itertools.count(1)


def next_plan_generation() -> int:
    """A plan generation never used before in this process (so a plan never matches another
    session, not even one whose handles have the same numbers)."""
    return next(_PLAN_GENERATIONS)


_DIM_MAX = 0x7FFFFFFF


def dims3(dims: tuple[int, ...]) -> tuple[int, int, int]:
    """:func:`pack_dims` with a fast path for what the device model passes (a tuple of three
    ints); the same checks, the same errors."""
    if dims.__class__ is tuple and len(dims) == 3:
        x, y, z = dims
        if (x.__class__ is int and y.__class__ is int and z.__class__ is int
                and 0 < x <= _DIM_MAX and 0 < y <= _DIM_MAX and 0 < z <= _DIM_MAX):
            return dims  # type: ignore[return-value]
    return pack_dims(dims)


def guarded(method: F) -> F:
    """Serialise, notice foreign resets, map errors, and invalidate handles after a fault."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._closed:
                raise BackendError(Status.INVALID_HANDLE, "the session is closed")
            if self.backend.stats.resets != self._epoch:     # another client's fault reset the context
                self._check_epoch()
            try:
                return method(self, *args, **kwargs)
            except BackendError as exc:
                self._on_error(exc)
                raise
            except Exception as exc:  # a bug below us: never let it reach the guest raw
                guest_log(self.log, logging.ERROR, "internal error in %s: %s", method.__name__, exc)
                self.log.debug("traceback", exc_info=True)
                err = BackendError(Status.INTERNAL, f"internal error in {method.__name__}: {type(exc).__name__}")
                self._on_error(err)
                raise err from exc

    return wrapper  # type: ignore[return-value]
