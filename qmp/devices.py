"""Attach and detach vfio-user-pci devices on a running VM over QMP.

QEMU 11.1 accepts the device only in JSON form, with ``socket`` as a nested SocketAddress
object (``{"type": "unix", "path": ...}``). Hot-plug on the ``pc`` machine goes through ACPI:
the guest sees the device tens of milliseconds after ``device_add``. ``device_del`` needs the
guest's cooperation (acpiphp ejects it) and completes with a ``DEVICE_DELETED`` event.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vxpu.qmp.errors import QmpError
from vxpu.qmp.monitor import Monitor

log = logging.getLogger(__name__)

DRIVER = "vfio-user-pci"


def vfio_user_device(dev_id: str, socket_path: str | Path, **props: Any) -> dict[str, Any]:
    """The JSON device description for ``-device`` and ``device_add``.

    Args:
        dev_id: the QEMU device id (used by ``device_del``).
        socket_path: the server's vfio-user Unix socket.
        props: further properties (``bus``, ``addr``, ``x-msg-timeout``...).
    """
    return {"driver": DRIVER, "id": dev_id, "socket": {"type": "unix", "path": str(socket_path)}, **props}


def attach(mon: Monitor, dev_id: str, socket_path: str | Path, **props: Any) -> None:
    """Hot-plug a vfio-user-pci device connected to ``socket_path``.

    Raises:
        QmpError: QEMU refused (no server on the socket, duplicate id, handshake failure).
    """
    mon.execute("device_add", **vfio_user_device(dev_id, socket_path, **props))
    log.info("attached %s (%s)", dev_id, socket_path)


def detach(mon: Monitor, dev_id: str, timeout: float = 10.0) -> None:
    """Hot-unplug ``dev_id`` and wait for ``DEVICE_DELETED``.

    Raises:
        QmpError: no such device, or the guest did not release it within ``timeout`` seconds
            (the guest must support ACPI PCI hot-plug).
    """
    mon.execute("device_del", id=dev_id)
    try:
        mon.wait_event("DEVICE_DELETED", timeout, lambda ev: ev.get("data", {}).get("device") == dev_id)
    except QmpError as exc:
        raise QmpError(f"{dev_id} was not released by the guest within {timeout:.0f}s; the guest needs ACPI "
                       f"PCI hot-plug (acpiphp) and must not hold the device busy ({exc})") from exc
    log.info("detached %s", dev_id)


def list_vfio_user(mon: Monitor) -> list[str]:
    """Ids of the vfio-user-pci devices QEMU has (from ``qom-list`` of /machine/peripheral)."""
    ids = []
    for entry in mon.execute("qom-list", path="/machine/peripheral"):
        if entry.get("type") == f"child<{DRIVER}>":
            ids.append(entry["name"])
    return ids
