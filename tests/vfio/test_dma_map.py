"""DMA_MAP (command 2): fd-backed and message-only maps, and every way to get it wrong."""

from __future__ import annotations

import errno
import os
import struct
import zlib

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import GuestMemory

from vxpu.abi import testdev as abi

from .conftest import eventfds, expect_error, ping, raw, refused

MiB = 1 << 20


def _dma(client, cmd: int, addr: int, length: int) -> int:
    client.region_write(0, abi.DMA_ADDR_LO, struct.pack("<QI", addr, length)[:8])
    client.region_write(0, abi.DMA_LEN, struct.pack("<I", length))
    client.region_write(0, abi.DMA_CMD, struct.pack("<I", cmd))
    return struct.unpack("<I", client.region_read(0, abi.DMA_STATUS, 4))[0]


def test_fd_backed_map_is_shared_memory(client, server, no_leak):
    with GuestMemory(2 * MiB) as mem:
        client.map_guest_ram(mem, 0x100000)
        mem.write(0x1000, b"hello guest")
        assert _dma(client, abi.DMA_CMD_READ, 0x101000, 11) == abi.DMA_OK
        assert struct.unpack("<I", client.region_read(0, abi.DMA_RESULT, 4))[0] == zlib.crc32(b"hello guest")
        assert _dma(client, abi.DMA_CMD_FILL_PATTERN, 0x102000, 64) == abi.DMA_OK
        assert mem.read(0x2000, 64) == abi.pattern(64)
        client.dma_unmap(0x100000, 2 * MiB)


def test_file_offset_is_honoured(client, no_leak):
    with GuestMemory(4 * MiB) as mem:
        client.map_guest_ram(mem, 0x100000, offset=MiB, size=MiB)  # guest 0x100000 = file offset 1 MiB
        mem.write(MiB + 16, b"at offset")
        assert _dma(client, abi.DMA_CMD_READ, 0x100010, 9) == abi.DMA_OK
        assert struct.unpack("<I", client.region_read(0, abi.DMA_RESULT, 4))[0] == zlib.crc32(b"at offset")
        client.dma_unmap(0x100000, MiB)


def test_read_only_map_refuses_device_writes(client, no_leak):
    with GuestMemory(MiB) as mem:
        client.map_guest_ram(mem, 0xC0000, size=0x20000, flags=P.DMA_READ_FLAG)
        assert _dma(client, abi.DMA_CMD_FILL_PATTERN, 0xC0000, 16) == abi.DMA_BAD_ADDRESS
        assert _dma(client, abi.DMA_CMD_READ, 0xC0000, 16) == abi.DMA_OK
        client.dma_unmap(0xC0000, 0x20000)


def test_identical_remap_is_accepted(client, server, no_leak):
    with GuestMemory(MiB) as mem:
        client.map_guest_ram(mem, 0x100000)
        client.dma_map(0x100000, MiB, mem.fd, 0)            # same range, offset, flags and file
        client.dma_map(0xFFFC0000, 0x40000, None, 0, P.DMA_READ_FLAG)
        client.dma_map(0xFFFC0000, 0x40000, None, 0, P.DMA_READ_FLAG)
        assert len(server.conn.dma) == 2
        client.dma_unmap(0x100000, MiB)
        client.dma_unmap(0xFFFC0000, 0x40000)


def test_overlapping_map_is_eexist(client, server, no_leak):
    with GuestMemory(4 * MiB) as mem:
        client.map_guest_ram(mem, 0x100000, size=MiB)
        for addr, size in ((0x100000, 0x2000), (0xFF000, 0x2000), (0x1FF000, 0x2000), (0, 0x200000)):
            refused(client, errno.EEXIST, lambda a=addr, n=size: client.dma_map(a, n, mem.fd, a))
        refused(client, errno.EEXIST, lambda: client.dma_map(0x100000, MiB, mem.fd, 0x1000))   # other offset
        refused(client, errno.EEXIST, lambda: client.dma_map(0x100000, MiB, None))            # no fd now
        assert len(server.conn.dma) == 1
        client.dma_map(0x200000, 0x1000, mem.fd, 0x100000)                                     # adjacent is fine
        client.dma_unmap(0x100000, MiB)
        client.dma_unmap(0x200000, 0x1000)


def test_unaligned_zero_or_wrapping_is_einval(client, no_leak):
    with GuestMemory(MiB) as mem:
        for addr, size, off in ((0x100800, 0x1000, 0), (0x100000, 0x800, 0), (0x100000, 0, 0),
                                ((1 << 64) - 0x1000, 0x2000, 0), (0x100000, 0x1000, (1 << 64) - 0x800)):
            refused(client, errno.EINVAL, lambda a=addr, n=size, o=off: client.dma_map(a, n, mem.fd, o))
            if off == 0:
                refused(client, errno.EINVAL, lambda a=addr, n=size: client.dma_map(a, n, None, 0))
    ping(client)


def test_bad_flags_is_einval(client, no_leak):
    for flags in (0, P.DMA_WRITE_FLAG, 0x4 | 0x3, 0x80000003):
        refused(client, errno.EINVAL, lambda f=flags: client.dma_map(0x100000, 0x1000, None, 0, f))


def test_fd_smaller_than_the_map_is_einval(client, no_leak):
    with GuestMemory(0x10000) as mem:   # would SIGBUS the server if mapped past EOF
        refused(client, errno.EINVAL, lambda: client.dma_map(0x100000, 0x20000, mem.fd, 0))
        refused(client, errno.EINVAL, lambda: client.dma_map(0x100000, 0x10000, mem.fd, 0x1000))


def test_fd_that_is_not_a_file_is_einval(client, no_leak):
    with eventfds(1) as (efd,):
        refused(client, errno.EINVAL, lambda: client.dma_map(0x100000, 0x1000, efd, 0))
    r, w = os.pipe()
    try:
        refused(client, errno.EINVAL, lambda: client.dma_map(0x100000, 0x1000, r, 0))
    finally:
        os.close(r)
        os.close(w)


def test_two_fds_is_einval(client, no_leak):
    with GuestMemory(0x10000) as a, GuestMemory(0x10000) as b:
        payload = P.DMA_MAP.pack(32, 3, 0, 0x100000, 0x10000)
        client.send_raw(raw(P.Command.DMA_MAP, payload), [a.fd, b.fd])
        expect_error(client, errno.EINVAL)


def test_short_payload_and_argsz(client, no_leak):
    client.send_raw(raw(P.Command.DMA_MAP, P.DMA_MAP.pack(32, 3, 0, 0x100000, 0x1000)[:24]))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DMA_MAP, P.DMA_MAP.pack(16, 3, 0, 0x100000, 0x1000)))
    expect_error(client, errno.EINVAL)


def test_map_table_is_capped(client, server, no_leak):
    dma = server.conn.dma
    dma.max_maps = 8                      # the same check as MAX_DMA_MAPS, at a test-friendly size
    for i in range(8):
        client.dma_map(0x100000 + i * 0x2000, 0x1000)
    refused(client, errno.ENOSPC, lambda: client.dma_map(0x800000, 0x1000))
    client.dma_unmap(0, 0, P.DMA_UNMAP_ALL)
    assert len(dma) == 0


def test_posted_map_errors_are_not_answered(client, no_leak):
    client.send_raw(raw(P.Command.DMA_MAP, P.DMA_MAP.pack(32, 3, 0, 0x100800, 0x1000), flags=P.FLAG_NO_REPLY))
    client.expect_silence(0.1)
