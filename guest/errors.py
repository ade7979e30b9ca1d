"""Errors of the guest driver. Stdlib-only, like the rest of vxpu.guest."""

from __future__ import annotations

from vxpu.errors import Error


class GuestError(Error):
    """A guest-side driver operation failed (no device, sysfs refused, no pinned memory)."""


class DeviceNotFound(GuestError):
    """No PCI function with the requested IDs is present (is the device attached to the VM?)."""


class DeviceError(GuestError):
    """The accelerator refused a command (``status``) or stopped with a fatal error (``fatal``).

    Attributes:
        status: the wire status code (:class:`vxpu.abi.status.Status` when known), 0 for a
            fatal device error.
        name: the status name (``"INVALID_HANDLE"``) or the fatal code's name.
        meaning: what the status means and what to do (:func:`vxpu.abi.status.describe`).
        command: the command that failed (``"MEM_FREE"``), or ``"device"`` for a fatal error.
        fatal: the :class:`vxpu.abi.xpu.FatalCode` value when the device stopped (else 0);
            only :meth:`vxpu.guest.sdk.Device.reset` brings it back.
        result: the completion's result word (a detail some commands report).
    """

    def __init__(self, status: int, command: str, *, fatal: int = 0, fatal_name: str = "",
                 detail: str = "", result: int = 0) -> None:
        from vxpu.abi.status import Status, describe

        self.status = status
        self.command = command
        self.fatal = fatal
        self.result = result
        if fatal:
            self.name = fatal_name or f"FATAL_{fatal}"
            self.meaning = "the device stopped its queue; reset the device (Device.reset())"
        else:
            self.name = Status(status).name if status in Status._value2member_map_ else f"STATUS_{status}"
            self.meaning = describe(status).partition(": ")[2] or describe(status)
        text = f"{command}: {self.name} ({self.meaning})"
        super().__init__(f"{text}: {detail}" if detail else text)
