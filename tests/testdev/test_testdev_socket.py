"""The test device end to end over a real AF_UNIX socket, as QEMU would drive it.

The real VfioUserServer runs the TestDevice in a background thread; the real VfioUserClient
plays QEMU with memfd guest RAM (``memory-backend-memfd,share=on``) and eventfds. Everything
the guest-visible contract promises is checked through the wire: identity through the config
region, BAR sizes through region info, register accesses, the three DMA commands, interrupts
reaching an eventfd, and DEVICE_RESET keeping the DMA maps.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

import pytest
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import GuestMemory, VfioUserClient
from vxpu.vfio_server.device import RegionFlags
from vxpu.vfio_server.server import VfioUserServer
from vxpu.vfio_server.testdev import TestDevice

from vxpu.abi import testdev as abi

CONFIG = 7
RAM_BASE = 0x10_0000
RAM_SIZE = 4 << 20
MSG_RAM_BASE = 0x1_0000_0000        # a second "RAM" mapped without an fd (no share=on)
MSG_RAM_SIZE = 64 << 10
TRIGGER_EVENTFD = P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_TRIGGER


class Rig:
    """A connected client with guest RAM mapped, decode and bus mastering on."""

    def __init__(self, client: VfioUserClient, ram: GuestMemory, msg_ram: GuestMemory, dev: TestDevice) -> None:
        self.c, self.ram, self.msg_ram, self.dev = client, ram, msg_ram, dev

    def cfg(self, offset: int, size: int) -> int:
        return int.from_bytes(self.c.region_read(CONFIG, offset, size), "little")

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.c.region_write(CONFIG, offset, value.to_bytes(size, "little"))

    def reg(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(self.c.region_read(0, offset, size), "little")

    def set_reg(self, offset: int, value: int, size: int = 4) -> None:
        # Posted, as QEMU sends trapped BAR writes while no region is mmap-able.
        self.c.region_write(0, offset, value.to_bytes(size, "little"), posted=True)

    def dma(self, cmd: int, addr: int, length: int) -> int:
        self.set_reg(abi.DMA_ADDR_LO, addr, 8)
        self.set_reg(abi.DMA_LEN, length)
        self.set_reg(abi.DMA_CMD, cmd)
        for _ in range(50):              # BUSY only for message-only RAM; the client answers
            status = self.reg(abi.DMA_STATUS)          # DMA requests while it waits for replies
            if status != abi.DMA_BUSY:
                return status
            self.c.serve_dma(timeout=0.05, count=8)
        raise AssertionError("DMA stayed busy")


@pytest.fixture
def rig(tmp_path) -> Iterator[Rig]:
    dev = TestDevice()
    with GuestMemory(RAM_SIZE) as ram, GuestMemory(MSG_RAM_SIZE) as msg_ram, \
            VfioUserServer(tmp_path / "testdev.sock", dev), \
            VfioUserClient(tmp_path / "testdev.sock", timeout=5.0) as client:
        info = client.handshake()
        assert info.flags & P.DEVICE_FLAGS_PCI and info.flags & P.DEVICE_FLAGS_RESET
        assert (info.num_regions, info.num_irqs) == (9, 5)
        client.map_guest_ram(ram, RAM_BASE)
        client.map_guest_ram(msg_ram, MSG_RAM_BASE, with_fd=False)
        r = Rig(client, ram, msg_ram, dev)
        r.cfg_write(0x04, 2, 0x0006)                 # memory decode + bus master
        yield r
        # Unmap as QEMU does at unplug: the client drops its views of guest RAM, the server
        # munmaps (it must not find a device still holding a view).
        client.dma_unmap(MSG_RAM_BASE, MSG_RAM_SIZE)
        client.dma_unmap(RAM_BASE, RAM_SIZE)


def test_identity_and_bar_types_through_config_region(rig: Rig) -> None:
    cfg = rig.c.region_read(CONFIG, 0, 256)         # QEMU reads the whole space at realize
    vendor, device = struct.unpack_from("<HH", cfg, 0)
    assert (vendor, device) == (abi.VENDOR_ID, abi.DEVICE_ID)
    assert cfg[8] == abi.REVISION and int.from_bytes(cfg[9:12], "little") == abi.CLASS_CODE
    assert struct.unpack_from("<HH", cfg, 0x2C) == (abi.SUBSYSTEM_VENDOR_ID, abi.SUBSYSTEM_ID)
    assert struct.unpack_from("<I", cfg, 0x10)[0] == 0x0 and struct.unpack_from("<I", cfg, 0x18)[0] == 0xC
    assert cfg[0x3D] == 1 and cfg[0x06] & 0x10 and cfg[cfg[0x34]] == 0x05     # INTA, MSI first
    rig.cfg_write(0x30, 4, 0xFFFFF800)               # QEMU's ROM sizing: no ROM
    assert rig.cfg(0x30, 4) == 0
    rig.cfg_write(0x18, 4, 0xFFFFFFFF)
    assert rig.cfg(0x18, 4) == 0xFFFF000C


def test_region_and_irq_info(rig: Rig) -> None:
    sizes = []
    for index in range(9):
        info, fd = rig.c.region_info(index)
        assert fd is None and not info.flags & RegionFlags.MMAP
        sizes.append(info.size)
    assert sizes == [abi.BAR0_SIZE, 0, abi.BAR2_SIZE, 0, 0, 0, 0, 256, 0]
    counts = [(rig.c.irq_info(i).count, rig.c.irq_info(i).flags) for i in range(5)]
    assert counts == [(1, 7), (1, 9), (0, 1), (1, 1), (0, 1)]


def test_registers_and_scratch_bar(rig: Rig) -> None:
    assert rig.reg(abi.MAGIC) == abi.MAGIC_VALUE and rig.reg(abi.VERSION) == abi.VERSION_VALUE
    rig.set_reg(abi.SCRATCH, 0x1122334455667788, 8)
    assert rig.reg(abi.SCRATCH, 8) == 0x1122334455667788 and rig.reg(abi.SCRATCH2) == 0x11223344
    rig.c.region_write(2, 0x100, b"second bar")
    assert rig.c.region_read(2, 0x100, 10) == b"second bar"


def test_dma_commands_on_shared_guest_ram(rig: Rig) -> None:
    data = os.urandom(256 << 10)
    rig.ram.write(0x3000, data)
    assert rig.dma(abi.DMA_CMD_READ, RAM_BASE + 0x3000, len(data)) == abi.DMA_OK
    assert rig.reg(abi.DMA_RESULT) == zlib.crc32(data)
    assert rig.dma(abi.DMA_CMD_FILL_PATTERN, RAM_BASE + 7, abi.MAX_DMA_LEN) == abi.DMA_OK
    assert rig.ram.read(7, abi.MAX_DMA_LEN) == abi.pattern(abi.MAX_DMA_LEN)
    assert rig.dma(abi.DMA_CMD_INVERT, RAM_BASE + 7, 4096) == abi.DMA_OK
    assert rig.ram.read(7, 4096) == bytes(b ^ 0xFF for b in abi.pattern(4096))
    assert rig.dma(abi.DMA_CMD_READ, RAM_BASE + RAM_SIZE - 16, 32) == abi.DMA_BAD_ADDRESS
    assert rig.dma(abi.DMA_CMD_READ, RAM_BASE, abi.MAX_DMA_LEN + 1) == abi.DMA_BAD_LEN
    rig.cfg_write(0x04, 2, 0x0002)                                  # bus master off
    assert rig.dma(abi.DMA_CMD_FILL_PATTERN, RAM_BASE, 16) == abi.DMA_NO_BUS_MASTER


def test_dma_on_message_only_ram(rig: Rig) -> None:
    rig.msg_ram.write(0, b"through messages")
    assert rig.dma(abi.DMA_CMD_READ, MSG_RAM_BASE, 16) == abi.DMA_OK
    assert rig.reg(abi.DMA_RESULT) == zlib.crc32(b"through messages")
    assert rig.dma(abi.DMA_CMD_INVERT, MSG_RAM_BASE, 16) == abi.DMA_OK
    assert rig.msg_ram.read(0, 16) == bytes(b ^ 0xFF for b in b"through messages")
    assert rig.dma(abi.DMA_CMD_FILL_PATTERN, MSG_RAM_BASE + 100, 3000) == abi.DMA_OK
    assert rig.msg_ram.read(100, 3000) == abi.pattern(3000)


def test_interrupts_reach_eventfds(rig: Rig) -> None:
    intx, msi = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        rig.c.set_irqs(0, TRIGGER_EVENTFD, 0, 1, [intx])
        rig.set_reg(abi.IRQ_RAISE, 0)                               # INTx while MSI is off
        assert rig.reg(abi.IRQ_COUNT) == 1 and os.eventfd_read(intx) == 1
        msi_cap = rig.cfg(0x34, 1)
        rig.cfg_write(msi_cap + 2, 2, 0x0001)                       # guest enables MSI ...
        rig.c.set_irqs(0, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 0)   # ... QEMU: INTx off
        rig.c.set_irqs(1, TRIGGER_EVENTFD, 0, 1, [msi])                  # ... MSI eventfd
        rig.set_reg(abi.IRQ_ENABLE, abi.IRQ_ENABLE_DMA_DONE)
        assert rig.dma(abi.DMA_CMD_READ, RAM_BASE, 64) == abi.DMA_OK
        rig.set_reg(abi.IRQ_RAISE, 1)                               # only 1 MSI vector: ignored
        assert rig.reg(abi.IRQ_COUNT) == 2 and os.eventfd_read(msi) == 1
    finally:
        os.close(intx)
        os.close(msi)


def test_device_reset_keeps_dma_maps_and_counts(rig: Rig) -> None:
    start = rig.reg(abi.RESET_COUNT)
    rig.set_reg(abi.SCRATCH, 0xABCD)
    rig.c.reset()
    assert rig.cfg(0x04, 2) == 0                                    # command cleared
    rig.cfg_write(0x04, 2, 0x0006)
    assert rig.reg(abi.RESET_COUNT) == start + 1 and rig.reg(abi.SCRATCH) == 0
    rig.ram.write(0, b"still mapped")
    assert rig.dma(abi.DMA_CMD_READ, RAM_BASE, 12) == abi.DMA_OK      # QEMU does not re-map
    assert rig.reg(abi.DMA_RESULT) == zlib.crc32(b"still mapped")


def test_bar_access_errors_reach_the_client(rig: Rig) -> None:
    from vxpu.vfio_server.errors import ProtocolError
    with pytest.raises(ProtocolError) as exc:
        rig.c.region_read(0, abi.SCRATCH + 1, 4)                  # unaligned register access
    assert exc.value.errno == 22
    rig.cfg_write(0x04, 2, 0x0000)
    with pytest.raises(ProtocolError) as exc:
        rig.c.region_read(0, abi.MAGIC, 4)                        # memory decode off
    assert exc.value.errno == 5
