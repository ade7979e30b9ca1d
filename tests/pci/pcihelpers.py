"""Shared helpers for the PCI model tests: config accessors and a fake DeviceContext.

The fake context is for unit tests of device logic only; its DMA space hands out slices of one
bytearray ("guest RAM" at GUEST_BASE). Real-socket tests of the test device live in
tests/testdev/test_testdev_socket.py.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from vxpu.vfio_server.device import CONFIG_REGION
from vxpu.vfio_server.errors import DmaError
from vxpu.vfio_server.pci import Command, PciDevice

GUEST_BASE = 0x10_0000
GUEST_SIZE = 4 << 20


def cfg_read(dev: PciDevice, offset: int, size: int) -> int:
    return int.from_bytes(dev.region_read(CONFIG_REGION, offset, size), "little")


def cfg_write(dev: PciDevice, offset: int, size: int, value: int) -> None:
    dev.region_write(CONFIG_REGION, offset, value.to_bytes(size, "little"))


def enable(dev: PciDevice, command: int = Command.MEMORY | Command.BUS_MASTER) -> None:
    cfg_write(dev, 0x04, 2, command)


def bar_read(dev: PciDevice, bar: int, offset: int, size: int = 4) -> int:
    return int.from_bytes(dev.region_read(bar, offset, size), "little")


def bar_write(dev: PciDevice, bar: int, offset: int, value: int, size: int = 4) -> None:
    dev.region_write(bar, offset, value.to_bytes(size, "little"))


class FakeDma:
    """Guest RAM as a bytearray at GUEST_BASE; optional read-only and message-only ranges."""

    def __init__(self) -> None:
        self.mem = bytearray(GUEST_SIZE)
        self.read_only: tuple[int, int] | None = None
        self.message_only: tuple[int, int] | None = None    # (gpa, size), reached by *_async only
        self.pending: list[Callable[[], None]] = []          # queued async completions
        self.exports: list[memoryview] = []

    def _inside(self, gpa: int, length: int, rng: tuple[int, int] | None) -> bool:
        return rng is not None and rng[0] <= gpa and gpa + length <= rng[0] + rng[1]

    def translate(self, gpa: int, length: int, write: bool) -> memoryview:
        if self._inside(gpa, length, self.message_only):
            raise DmaError("message-only range")
        if gpa < GUEST_BASE or gpa + length > GUEST_BASE + GUEST_SIZE:
            raise DmaError("unmapped")
        if write and self._inside(gpa, length, self.read_only):
            raise DmaError("read-only", errno.EPERM)
        view = memoryview(self.mem)[gpa - GUEST_BASE:gpa - GUEST_BASE + length]
        self.exports.append(view)
        return view

    def read_async(self, gpa: int, length: int, done: Callable[[bytes | None, DmaError | None], None]) -> None:
        if not self._inside(gpa, length, self.message_only):
            raise DmaError("unmapped")
        off = gpa - GUEST_BASE
        self.pending.append(lambda: done(bytes(self.mem[off:off + length]), None))

    def write_async(self, gpa: int, data: bytes | memoryview, done: Callable[[DmaError | None], None]) -> None:
        if not self._inside(gpa, len(data), self.message_only):
            raise DmaError("unmapped")
        off, blob = gpa - GUEST_BASE, bytes(data)

        def complete() -> None:
            self.mem[off:off + len(blob)] = blob
            done(None)
        self.pending.append(complete)

    def complete_all(self) -> None:
        while self.pending:
            self.pending.pop(0)()


class FakeContext:
    """A DeviceContext whose interrupts are recorded; ``deliver`` says whether they go out."""

    def __init__(self) -> None:
        self.dma = FakeDma()
        self.log = logging.getLogger("test.pci")
        self.raised: list[int] = []
        self.deliver = True

    def raise_irq(self, vector: int = 0) -> bool:
        if self.deliver:
            self.raised.append(vector)
        return self.deliver
