"""Statistics of one accelerator device: what the STATS command reports as JSON.

The poller thread updates :class:`DeviceStats` (plain counters, no lock: one writer; readers
tolerate a slightly stale value). :func:`stats_json` joins them with the session's metrics
(:meth:`vxpu.accel.session.Session.statistics`: memory held, allocations, launches, pool and
backend figures) into one UTF-8 JSON document of at most ``MAX_STATS_BYTES``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status

log = logging.getLogger(__name__)

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

    def batches_of(self, count: int, max_batch: int, depth: int, max_depth: int) -> None:
        """Account ``count`` batches taken natively (at most ``max_batch`` descriptors each,
        ``depth`` outstanding at the last one, ``max_depth`` at most), as :meth:`batch` would."""
        if count:
            self.batches += count
            self.max_batch = max(self.max_batch, max_batch)
            self.queue_depth = depth
            self.max_queue_depth = max(self.max_queue_depth, max_depth)

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


def stats_json(stats: DeviceStats, session_metrics: dict[str, float],
               profile: dict[str, Any] | None = None) -> bytes:
    """The STATS reply: ``{"device": {...}, "session": {...}}`` (and ``"profile"`` when the
    poller is profiled, see :mod:`vxpu.vfio_server.xpu.profile`) as compact UTF-8 JSON, cut
    down to the device part if the whole would exceed ``MAX_STATS_BYTES``."""
    doc: dict[str, Any] = {"abi": f"{abi.ABI_MAJOR}.{abi.ABI_MINOR}", "device": stats.as_dict(),
                           "session": session_metrics}
    if profile is not None:
        doc["profile"] = profile
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > abi.MAX_STATS_BYTES:
        doc["session"] = {"truncated": True}
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return data


class StatsFile:
    """Writes a device's STATS document to ``path`` at start and every ``interval`` seconds,
    atomically (a temporary file beside it, then rename), for host-side health checks
    (``vxpu serve --stats-file``). A write failure is logged once and retried next time.

    Args:
        path: the file to keep up to date.
        source: returns the document (e.g. :meth:`XpuDevice.stats_document`).
        interval: seconds between writes.
    """

    def __init__(self, path: str | os.PathLike[str], source: Callable[[], bytes], interval: float = 2.0) -> None:
        self.path = Path(path)
        self.source = source
        self.interval = interval
        self._stop = threading.Event()
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="vxpu-stats-file", daemon=True)

    def start(self) -> StatsFile:
        self.write()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def write(self) -> None:
        """Write the document once (never raises)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(self.source())
            os.replace(tmp, self.path)
            self._failed = False
        except Exception as exc:           # noqa: BLE001 -- a health file must not stop the server
            if not self._failed:
                log.warning("cannot write the stats file %s: %s", self.path, exc)
            self._failed = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()
