"""Errors raised while provisioning QEMU or the guest image.

Every message names the fix (install a package, set ``VXPU_QEMU``, check the network).
"""

from __future__ import annotations

from vxpu.errors import Error


class ImageError(Error):
    """QEMU or guest-image provisioning failed; the message says what to do about it."""


class VmError(Error):
    """A VM could not be started or did not behave (boot failure, timeout, QEMU crash).

    Args:
        message: what went wrong, naming the fix where there is one.
        log_tail: the last lines of the console/QEMU log, for diagnosis.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message + (f"\n--- log tail ---\n{log_tail}" if log_tail else ""))
        self.log_tail = log_tail
