"""DMA_UNMAP (command 3): exact matches, unmap-all, reply shape, and unmapping under a device."""

from __future__ import annotations

import errno

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import GuestMemory

from .conftest import eventfds, expect_error, raw, refused

MiB = 1 << 20


def test_reply_echoes_the_request(client, no_leak):
    client.dma_map(0x100000, 0x4000)
    reply = client.request(P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0x100000, 0x4000))
    assert reply is not None and len(reply.body) == 24 and reply.header.size <= 40
    assert P.DMA_UNMAP.unpack(reply.body) == (24, 0, 0x100000, 0x4000)


def test_must_match_exactly(client, server, no_leak):
    with GuestMemory(MiB) as mem:
        client.map_guest_ram(mem, 0x100000)
        for addr, size in ((0x100000, 0x1000), (0x101000, MiB - 0x1000), (0x200000, MiB), (0, 0)):
            refused(client, errno.ENOENT, lambda a=addr, n=size: client.dma_unmap(a, n))
        assert len(server.conn.dma) == 1
        client.dma_unmap(0x100000, MiB)
        refused(client, errno.ENOENT, lambda: client.dma_unmap(0x100000, MiB))       # twice
        assert len(server.conn.dma) == 0


def test_unmap_all(client, server, no_leak):
    with GuestMemory(MiB) as mem:
        client.map_guest_ram(mem, 0x100000)
        client.dma_map(0, 0xA0000)
        refused(client, errno.EINVAL, lambda: client.dma_unmap(0x100000, 0, P.DMA_UNMAP_ALL))
        client.dma_unmap(0, 0, P.DMA_UNMAP_ALL)
        assert len(server.conn.dma) == 0


def test_dirty_bitmap_and_unknown_flags_are_einval(client, no_leak):
    client.dma_map(0x100000, 0x1000)
    for flags in (P.DMA_UNMAP_GET_DIRTY_BITMAP, 0x8, 0x3):
        refused(client, errno.EINVAL, lambda f=flags: client.dma_unmap(0x100000, 0x1000, f))
    client.dma_unmap(0x100000, 0x1000)


def test_short_payload_argsz_and_fds(client, no_leak):
    client.send_raw(raw(P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0x100000, 0x1000)[:20]))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(8, 0, 0x100000, 0x1000)))
    expect_error(client, errno.EINVAL)
    with eventfds(1) as fds:
        client.send_raw(raw(P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0x100000, 0x1000)), fds)
        expect_error(client, errno.EINVAL)


def test_unmap_releases_the_mapping(client, server, no_leak):
    with GuestMemory(MiB) as mem:
        client.map_guest_ram(mem, 0x100000)
        region = server.conn.dma.find(0x100000)
        assert region is not None and region.view is not None
        client.dma_unmap(0x100000, MiB)
        assert region.view is None and region._mm is None


def test_unmap_while_a_device_holds_a_view(client, server, no_leak):
    with GuestMemory(MiB) as mem:
        client.map_guest_ram(mem, 0x100000)
        held = server.conn.dma.translate(0x100000, 16, write=True)   # a device that forgot to release
        client.dma_unmap(0x100000, MiB)                                # still answered, no crash
        held[:4] = b"safe"                                             # pages stay mapped while held
        assert mem.read(0, 4) == b"safe"
        held.release()
