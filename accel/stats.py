"""Statistics of one client session, and a flat metrics view of session, pool and backend.

:class:`SessionStats` are the per-client counters kept by :class:`vxpu.accel.session.Session`.
:func:`metrics` flattens a session's, its pool's and its backend's figures into one
``{name: number}`` mapping with stable, Prometheus-friendly names (``vxpu_session_launches``,
``vxpu_pool_bytes_in_use``, ``vxpu_backend_faults`` ...) for logs and metric exporters.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SessionStats:
    """Per-client counters. ``errors`` counts failed operations by status name."""

    allocations: int = 0
    frees: int = 0
    bytes_htod: int = 0
    bytes_dtoh: int = 0
    bytes_dtod: int = 0
    memsets: int = 0
    modules_loaded: int = 0
    launches: int = 0
    synchronizes: int = 0
    queue_waits: int = 0          # launches/copies that waited because a queue was full
    faults: int = 0               # KERNEL_FAULT or DEVICE_LOST seen by this client
    invalidations: int = 0        # times the client's handles were dropped by a context reset
    errors: Counter[str] = field(default_factory=Counter)


def _numeric(prefix: str, obj: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool):
            out[f"{prefix}_{f.name}"] = float(value)
        elif isinstance(value, (int, float)):
            out[f"{prefix}_{f.name}"] = value
        elif isinstance(value, Counter):
            for key, count in sorted(value.items()):
                out[f"{prefix}_{f.name}_{key.lower()}"] = count
    return out


def metrics(session_stats: SessionStats, pool_stats: Any, backend_stats: Any) -> dict[str, float]:
    """One flat ``{metric_name: value}`` view of a session, its pool and its backend.

    Args:
        session_stats: the session's :class:`SessionStats`.
        pool_stats: a :class:`vxpu.accel.pool.PoolStats` snapshot.
        backend_stats: the backend's :class:`vxpu.accel.backend.BackendStats`.
    """
    out = _numeric("vxpu_session", session_stats)
    out.update(_numeric("vxpu_pool", pool_stats))
    out.update(_numeric("vxpu_backend", backend_stats))
    return out
