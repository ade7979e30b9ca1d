"""Synchronous wrappers of :mod:`vxpu.qmp.lifecycle` for scripts and tests.

Each call runs the async function in a fresh event loop (:func:`asyncio.run`), connecting to
the QMP socket path and disconnecting again, so it must not be called from a running loop.
Parameters, results and errors are those of the async functions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from vxpu.qmp import lifecycle
from vxpu.qmp.lifecycle import Attached, Detached, DeviceInfo
from vxpu.qmp.server import STOP_GRACE_S

__all__ = ["Attached", "Detached", "DeviceInfo", "attach", "detach", "list_devices"]


def attach(qmp: str | Path, backend: str = "cpu", id: str | None = None, bus: str | None = None,
           *, device: str | None = None, server_args: Sequence[str] = ()) -> Attached:
    """Start a server and hot-plug its device; see :func:`vxpu.qmp.lifecycle.attach`."""
    return asyncio.run(lifecycle.attach(qmp, backend, id, bus, device=device, server_args=server_args))


def detach(qmp: str | Path, id: str, timeout: float = 10.0, grace: float = STOP_GRACE_S) -> Detached:
    """Unplug a device and stop its server; see :func:`vxpu.qmp.lifecycle.detach`."""
    return asyncio.run(lifecycle.detach(qmp, id, timeout, grace))


def list_devices(qmp: str | Path) -> list[DeviceInfo]:
    """The VM's vxpu devices; see :func:`vxpu.qmp.lifecycle.list_devices`."""
    return asyncio.run(lifecycle.list_devices(qmp))
