"""Errors of the guest driver. Stdlib-only, like the rest of vxpu.guest."""

from __future__ import annotations

from vxpu.errors import Error


class GuestError(Error):
    """A guest-side driver operation failed (no device, sysfs refused, no pinned memory)."""


class DeviceNotFound(GuestError):
    """No PCI function with the requested IDs is present (is the device attached to the VM?)."""
