"""Errors of the QEMU-control layer (QMP, server processes, host VFIO passthrough).

Every message names the cause and the fix, because operators read them on a terminal::

    vxpu.errors.Error
     ├── QmpError                  a QMP command failed or timed out (QEMU's class kept)
     │    ├── QmpUnreachable       nothing answers on the QMP socket (missing, refused)
     │    ├── QmpBusy              the socket accepts but never greets: another client holds it
     │    ├── IdInUse              the device id is taken in this VM
     │    ├── UnknownDevice        detach of an id that neither QEMU nor vxpu knows
     │    ├── NoFreeSlot           no hot-pluggable slot (pc bus full, no free pcie-root-port)
     │    └── UnplugTimeout        the guest did not release the device in time
     ├── ServerError               a vxpu server did not start, died, or did not stop (log tail)
     └── PassthroughError          host VFIO binding refused or failed
"""

from __future__ import annotations

from vxpu.errors import Error


class QmpError(Error):
    """QMP failed: no connection, a command error from QEMU (``klass`` and ``desc``), or a timeout.

    Args:
        message: what was attempted and what QEMU said.
        klass: QEMU's error class (e.g. ``"GenericError"``), when QEMU answered with an error.
    """

    def __init__(self, message: str, klass: str = "") -> None:
        super().__init__(message)
        self.klass = klass


class QmpUnreachable(QmpError):
    """Nothing answers on the QMP socket: it does not exist, refuses connections, or is not ours."""


class QmpBusy(QmpError):
    """The QMP socket accepted the connection but sent no greeting: QEMU serves one client at a
    time on a ``-qmp`` socket and another client is connected."""


class IdInUse(QmpError):
    """A device with this id already exists in the VM (or vxpu has a server for it)."""


class UnknownDevice(QmpError):
    """The id names no device of the VM and no vxpu server."""


class NoFreeSlot(QmpError):
    """The VM has no free hot-pluggable PCI slot for another device."""


class UnplugTimeout(QmpError):
    """``device_del`` was sent but the guest did not release the device within the timeout.

    The device stays in the VM and its server keeps running; a later ``detach`` retries.
    """


class ServerError(Error):
    """A vxpu server process did not start, died, or did not stop; carries its log tail."""


class PassthroughError(Error):
    """Host VFIO passthrough set-up failed (no such device, IOMMU off, vfio-pci missing)."""
