"""Statistics of one accelerator device: what the STATS command reports as JSON.

The poller thread updates :class:`DeviceStats` (plain counters, no lock: one writer; readers
tolerate a slightly stale value). :func:`stats_json` joins them with the session's metrics
(:meth:`vxpu.accel.session.Session.statistics`: memory held, allocations, launches, pool and
backend figures) into one UTF-8 JSON document of at most ``MAX_STATS_BYTES``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status

_OPCODE_NAMES = {int(op): op.name for op in abi.Opcode}
_STATUS_NAMES = {int(st): st.name for st in Status}


@dataclass
class DeviceStats:
    """Counters of the device model (the session counts the backend side)."""

    commands: Counter[str] = field(default_factory=Counter)   # by opcode name (UNKNOWN for the rest)
    errors: Counter[str] = field(default_factory=Counter)     # by status name (non-OK completions)
    bytes_htod: int = 0
    bytes_dtoh: int = 0
    bytes_dtod: int = 0
    bytes_memset: int = 0
    busy_ns: int = 0                 # time the poller spent executing commands
    batches: int = 0                 # times the poller took descriptors off the ring
    max_batch: int = 0
    queue_depth: int = 0             # submitted, not yet completed (at the last poll)
    max_queue_depth: int = 0
    doorbells: int = 0
    sleeps: int = 0                  # times the poller set need-wakeup and slept
    interrupts: int = 0              # completion/fatal interrupts delivered
    fatal_errors: int = 0
    resets: int = 0                  # RESET commands, Control.RESET and device resets
    started_ns: int = field(default_factory=time.monotonic_ns)

    def count(self, opcode: int, status: int) -> None:
        """Account one completed command (made-up opcodes all count as ``UNKNOWN``, so a guest
        cannot grow the table)."""
        self.commands[_OPCODE_NAMES.get(opcode, "UNKNOWN")] += 1
        if status:
            self.errors[_STATUS_NAMES.get(status, str(status))] += 1

    def batch(self, n: int, depth: int) -> None:
        """Account one batch of ``n`` descriptors with ``depth`` outstanding."""
        self.batches += 1
        self.max_batch = max(self.max_batch, n)
        self.queue_depth = depth
        self.max_queue_depth = max(self.max_queue_depth, depth)

    def as_dict(self) -> dict[str, Any]:
        return {
            "commands": dict(self.commands),
            "errors": dict(self.errors),
            "bytes": {"htod": self.bytes_htod, "dtoh": self.bytes_dtoh, "dtod": self.bytes_dtod,
                      "memset": self.bytes_memset},
            "busy_ns": self.busy_ns,
            "uptime_ns": time.monotonic_ns() - self.started_ns,
            "batches": self.batches,
            "max_batch": self.max_batch,
            "queue_depth": self.queue_depth,
            "max_queue_depth": self.max_queue_depth,
            "doorbells": self.doorbells,
            "sleeps": self.sleeps,
            "interrupts": self.interrupts,
            "fatal_errors": self.fatal_errors,
            "resets": self.resets,
        }


def stats_json(stats: DeviceStats, session_metrics: dict[str, float]) -> bytes:
    """The STATS reply: ``{"device": {...}, "session": {...}}`` as compact UTF-8 JSON, cut
    down to the device part if the whole would exceed ``MAX_STATS_BYTES``."""
    doc = {"abi": f"{abi.ABI_MAJOR}.{abi.ABI_MINOR}", "device": stats.as_dict(), "session": session_metrics}
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > abi.MAX_STATS_BYTES:
        doc["session"] = {"truncated": True}
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return data
