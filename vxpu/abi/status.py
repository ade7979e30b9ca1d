"""The project's one status table: every result a device command, a backend or the SDK reports.

Status codes travel on the wire (the ``status`` field of an accelerator completion, see
:mod:`vxpu.abi.xpu`) and are never renumbered; new codes are only appended. Each code has one
meaning, written in :data:`MEANING` and in ``docs/device-abi.md`` §4.4, so that a guest can
explain a failure without knowing the host.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """Stable status codes (wire values). Never renumber; append only."""

    OK = 0
    INVALID_ARGUMENT = 1
    INVALID_HANDLE = 2
    OUT_OF_RANGE = 3
    OUT_OF_MEMORY = 4
    QUOTA_EXCEEDED = 5
    BAD_MODULE = 6
    NOT_FOUND = 7
    KERNEL_FAULT = 8
    UNSUPPORTED = 9
    UNAVAILABLE = 10
    DEVICE_LOST = 11
    TIMEOUT = 12
    INTERNAL = 13
    COMPILE_LIMIT = 14
    ABORTED = 15
    BAD_DESCRIPTOR = 16

    @property
    def meaning(self) -> str:
        """One sentence that says what the code means and what to do about it."""
        return MEANING[self]


#: What each status means, as the guest should read it.
MEANING: dict[Status, str] = {
    Status.OK: "the command completed",
    Status.INVALID_ARGUMENT: "a malformed request: a bad size, alignment, flag, value, grid or block shape",
    Status.INVALID_HANDLE: "an unknown, freed or foreign handle (a double free lands here)",
    Status.OUT_OF_RANGE: "a range outside one live allocation, or a guest address outside DMA-mapped guest RAM",
    Status.OUT_OF_MEMORY: "the device itself is out of memory",
    Status.QUOTA_EXCEEDED: "this guest's quota (memory, allocations, modules, compiles, queue depth) is used up",
    Status.BAD_MODULE: "the module failed to decode, verify, compile or load; the server logs the reason",
    Status.NOT_FOUND: "no kernel of that name in the module",
    Status.KERNEL_FAULT: "the kernel faulted (out-of-bounds or misaligned access, trap); the completion's "
                        "result2 bit 0 says whether the guest's device state was dropped",
    Status.UNSUPPORTED: "this device or backend cannot do this (unknown opcode, a feature bit that is off)",
    Status.UNAVAILABLE: "the backend's runtime or device is missing on this host",
    Status.DEVICE_LOST: "an unrecoverable device error; the device must be reset or the server restarted",
    Status.TIMEOUT: "the operation ran past its time limit; an overrunning kernel was cancelled",
    Status.INTERNAL: "a bug in vxpu; the server logged it",
    Status.COMPILE_LIMIT: "compiling the module ran past the compile worker's memory, CPU or time limit",
    Status.ABORTED: "the command was dropped by a device reset before it ran",
    Status.BAD_DESCRIPTOR: "the descriptor itself is malformed: reserved bits set, or a bad scatter-gather list",
}


def describe(code: int) -> str:
    """``"NAME: meaning"`` for a wire status code, or ``"status N (unknown)"`` for any other int."""
    try:
        status = Status(code)
    except ValueError:
        return f"status {code} (unknown)"
    return f"{status.name}: {status.meaning}"
