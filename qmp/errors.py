"""Errors of the QEMU-control layer (QMP, server processes, host VFIO passthrough)."""

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


class ServerError(Error):
    """A vxpu server process did not start, died, or did not stop; carries its log tail."""


class PassthroughError(Error):
    """Host VFIO passthrough set-up failed (no such device, IOMMU off, vfio-pci missing)."""
