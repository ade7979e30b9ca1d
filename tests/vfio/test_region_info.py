"""DEVICE_GET_REGION_INFO (command 5): sizes, flags, the sparse-mmap capability, the one fd,
and replies truncated to the request's argsz."""

from __future__ import annotations

import errno
import mmap
import os

from vxpu.vfio_server import protocol as P

from .conftest import BAR2, CONFIG, eventfds, expect_error, raw


def test_every_index_is_answered(client, device, no_leak):
    sizes = {}
    for index in range(9):
        info, fd = client.region_info(index)
        assert info.index == index
        sizes[index] = (info.size, info.flags)
        if fd is not None:
            os.close(fd)
    assert sizes[0] == (0x1000, 3)
    assert sizes[1] == (0, 0) and sizes[3] == (0, 0) and sizes[6] == (0, 0) and sizes[8] == (0, 0)
    assert sizes[CONFIG] == (device.config_size, 3)


def test_qemu_retry_with_larger_argsz(client, no_leak):
    reply = client.request(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, BAR2, 0, 0, 0))
    assert reply is not None
    assert len(reply.body) == 32 and reply.header.size == 48          # truncated to argsz
    argsz, flags, _index, cap_offset, size, _offset = P.REGION_INFO.unpack(reply.body)
    assert argsz == 32 + 8 + 8 + 2 * 16                                # full size announced
    assert flags == 1 | 2 | 4 | 8 and cap_offset == 32 and size == 0x10000
    assert len(reply.fds) == 1
    os.close(reply.fds[0])
    info, fd = client.region_info(BAR2)                                # the client retries with argsz 64
    assert info.sparse == ((0, 0x1000), (0x2000, 0x2000))
    assert fd is not None
    mm = mmap.mmap(fd, 0x1000, mmap.MAP_SHARED, offset=info.offset)   # the fd really maps the BAR
    mm[:4] = b"bar2"
    assert os.pread(fd, 4, info.offset) == b"bar2"
    mm.close()
    os.close(fd)


def test_trapped_region_has_no_fd_and_no_caps(client, no_leak):
    reply = client.request(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(64, 0, 0, 0, 0, 0))
    assert reply is not None and not reply.fds and len(reply.body) == 32
    assert P.REGION_INFO.unpack(reply.body)[:4] == (32, 3, 0, 0)


def test_hostile(client, no_leak):
    client.send_raw(raw(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 9, 0, 0, 0)))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 0xFFFFFFFF, 0, 0, 0)))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(16, 0, 0, 0, 0, 0)))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 0, 0, 0, 0)[:20]))
    expect_error(client, errno.EINVAL)
    with eventfds(1) as fds:
        client.send_raw(raw(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 0, 0, 0, 0)), fds)
        expect_error(client, errno.EINVAL)


def test_huge_argsz_gets_only_the_real_reply(client, no_leak):
    reply = client.request(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(0xFFFFFFFF, 0, BAR2, 0, 0, 0))
    assert reply is not None and len(reply.body) == 80
    for fd in reply.fds:
        os.close(fd)
