"""DEVICE_RESET (command 13): device state resets; DMA maps and eventfds stay."""

from __future__ import annotations

import errno
import struct

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import GuestMemory

from vxpu.abi import testdev as abi

from .conftest import CMD_MEM_BME, CONFIG, eventfds, expect_error, raw, read_eventfd, refused


def test_reset_keeps_dma_maps_and_eventfds(client, server, no_leak):
    with GuestMemory(0x10000) as mem, eventfds(1) as (efd,):
        client.map_guest_ram(mem, 0x100000)
        client.set_irqs(0, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_TRIGGER, 0, 1, [efd])
        client.region_write(0, abi.SCRATCH, b"\xaa" * 4)
        client.reset()
        assert server.conn.dma.find(0x100000) is not None
        client.region_write(CONFIG, 4, CMD_MEM_BME)                   # reset cleared the command register
        assert client.region_read(0, abi.SCRATCH, 4) == b"\0" * 4
        assert struct.unpack("<I", client.region_read(0, abi.RESET_COUNT, 4))[0] == 1
        client.region_write(0, abi.IRQ_RAISE, struct.pack("<I", 0))
        assert read_eventfd(efd) == 1
        mem.write(0, b"after reset")
        client.region_write(0, abi.DMA_ADDR_LO, struct.pack("<Q", 0x100000))
        client.region_write(0, abi.DMA_LEN, struct.pack("<I", 11))
        client.region_write(0, abi.DMA_CMD, struct.pack("<I", abi.DMA_CMD_READ))
        assert struct.unpack("<I", client.region_read(0, abi.DMA_STATUS, 4))[0] == abi.DMA_OK
        client.set_irqs(0, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 0)
        client.dma_unmap(0x100000, 0x10000)


def test_reset_without_support_is_enotsup(client, device, no_leak):
    device.reset_supported = False
    refused(client, errno.ENOTSUP, client.reset)


def test_fds_on_reset(client, no_leak):
    with eventfds(1) as fds:
        client.send_raw(raw(P.Command.DEVICE_RESET), fds)
        expect_error(client, errno.EINVAL)
