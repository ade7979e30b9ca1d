"""DMA_READ / DMA_WRITE (commands 11, 12, server -> client): message-based DMA for guest RAM
without an fd. The server sends them without waiting, matches replies by id, and never lets a
hostile or missing reply break it."""

from __future__ import annotations

import struct
import zlib

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import QEMU_CAPS, GuestMemory, VfioUserClient

from vxpu.abi import testdev as abi

from .conftest import CMD_MEM_BME, CONFIG, ping, raw

RAM = 0x200000


def _start(client, cmd: int, addr: int, length: int, posted: bool = True) -> None:
    client.region_write(0, abi.DMA_ADDR_LO, struct.pack("<Q", addr))
    client.region_write(0, abi.DMA_LEN, struct.pack("<I", length))
    client.region_write(0, abi.DMA_CMD, struct.pack("<I", cmd), posted=posted)


def _status(client) -> int:
    return struct.unpack("<I", client.region_read(0, abi.DMA_STATUS, 4))[0]


def test_read_through_messages(client, no_leak):
    with GuestMemory(0x10000) as mem:
        client.map_guest_ram(mem, RAM, with_fd=False)
        mem.write(0x100, b"message based dma")
        _start(client, abi.DMA_CMD_READ, RAM + 0x100, 17, posted=False)   # request arrives before the reply
        assert client.dma_requests_served == 1
        assert _status(client) == abi.DMA_OK
        assert struct.unpack("<I", client.region_read(0, abi.DMA_RESULT, 4))[0] == zlib.crc32(b"message based dma")
        client.dma_unmap(RAM, 0x10000)


def test_write_through_messages_in_chunks(raw_client):
    c = raw_client
    c.version(dict(QEMU_CAPS, max_data_xfer_size=4096))       # the client accepts 4 KiB per message
    c.region_write(CONFIG, 4, CMD_MEM_BME)
    with GuestMemory(0x20000) as mem:
        c.map_guest_ram(mem, RAM, with_fd=False)
        _start(c, abi.DMA_CMD_FILL_PATTERN, RAM + 0x10, 10000)
        assert c.serve_dma(timeout=2.0, count=3) == 3              # 4096 + 4096 + 1808
        assert _status(c) == abi.DMA_OK
        assert mem.read(0x10, 10000) == abi.pattern(10000)
        c.dma_unmap(RAM, 0x20000)


def test_client_refusal_reaches_the_device(client, no_leak):
    with GuestMemory(0x10000) as mem:
        client.map_guest_ram(mem, RAM, with_fd=False)
        client.bus_master = False                                  # QEMU answers ENODEV without BME
        _start(client, abi.DMA_CMD_READ, RAM, 64)
        client.serve_dma(timeout=2.0)
        assert _status(client) == abi.DMA_BAD_ADDRESS
        client.bus_master = True
        _start(client, abi.DMA_CMD_READ, RAM, 64)
        client.serve_dma(timeout=2.0)
        assert _status(client) == abi.DMA_OK
        client.dma_unmap(RAM, 0x10000)


def _request(client) -> P.Header:
    msg = client.recv_message()
    assert msg.header.type == P.TYPE_COMMAND and msg.header.command == P.Command.DMA_READ
    assert P.DMA_ACCESS.unpack_from(msg.body, 0) == (RAM, 64) and not msg.fds
    return msg.header


def test_malformed_replies(client, no_leak):
    with GuestMemory(0x10000) as mem:
        client.map_guest_ram(mem, RAM, with_fd=False)
        bad_bodies = [P.DMA_ACCESS.pack(RAM, 64) + b"short",            # wrong length
                      P.DMA_ACCESS.pack(RAM + 8, 64) + bytes(64),      # wrong address
                      b"\0" * 4]                                        # truncated
        for body in bad_bodies:
            _start(client, abi.DMA_CMD_READ, RAM, 64)
            hdr = _request(client)
            client.send_raw(raw(P.Command.DMA_WRITE, body, msg_id=hdr.id, flags=P.TYPE_REPLY))   # wrong command:
            client.send_raw(raw(P.Command.DMA_READ, body, msg_id=hdr.id, flags=P.TYPE_REPLY))    # dropped; then bad
            assert _status(client) == abi.DMA_BAD_ADDRESS
        _start(client, abi.DMA_CMD_READ, RAM, 64)
        hdr = _request(client)
        client.send_raw(raw(P.Command.DMA_READ, b"", msg_id=hdr.id, flags=P.TYPE_REPLY | P.FLAG_ERROR))
        assert _status(client) == abi.DMA_BAD_ADDRESS     # an ERROR reply with errno 0 is still an error
        client.send_raw(raw(P.Command.DMA_READ, P.DMA_ACCESS.pack(RAM, 64) + bytes(64), msg_id=hdr.id,
                            flags=P.TYPE_REPLY))            # a second reply to the same id: dropped
        ping(client)
        client.dma_unmap(RAM, 0x10000)


def test_disconnect_with_dma_in_flight(server, device):
    with GuestMemory(0x10000) as mem:
        c = VfioUserClient(server.path)
        c.handshake()
        c.region_write(CONFIG, 4, CMD_MEM_BME)
        c.map_guest_ram(mem, RAM, with_fd=False)
        _start(c, abi.DMA_CMD_READ, RAM, 64)
        _request(c)                       # never answered
        c.close()
    with VfioUserClient(server.path) as c2:
        c2.handshake()
        c2.region_write(CONFIG, 4, CMD_MEM_BME)
        assert _status(c2) == abi.DMA_BAD_ADDRESS       # the device learned the DMA cannot finish
        with GuestMemory(0x10000) as mem:
            c2.map_guest_ram(mem, RAM, with_fd=False)
            _start(c2, abi.DMA_CMD_READ, RAM, 64, posted=False)
            assert _status(c2) == abi.DMA_OK
            c2.dma_unmap(RAM, 0x10000)


def test_server_ids_are_its_own(client, no_leak):
    with GuestMemory(0x10000) as mem:
        client.map_guest_ram(mem, RAM, with_fd=False)
        seen = set()
        for _ in range(3):
            _start(client, abi.DMA_CMD_READ, RAM, 64)
            hdr = _request(client)
            seen.add(hdr.id)
            client.send_raw(raw(P.Command.DMA_READ, P.DMA_ACCESS.pack(RAM, 64) + bytes(64), msg_id=hdr.id,
                                flags=P.TYPE_REPLY))
            assert _status(client) == abi.DMA_OK
        assert len(seen) == 3
        client.dma_unmap(RAM, 0x10000)
