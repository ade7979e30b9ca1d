"""DEVICE_GET_INFO (command 4)."""

from __future__ import annotations

import errno

from vxpu.vfio_server import protocol as P

from .conftest import eventfds, expect_error, raw


def test_reply_is_what_qemu_needs(client, no_leak):
    info = client.get_info()
    assert info.flags == P.DEVICE_FLAGS_PCI | P.DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)
    reply = client.request(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0))
    assert reply is not None and reply.header.size == 32 and P.DEVICE_INFO.unpack(reply.body)[0] == 16


def test_no_reset_flag_without_reset(client, device, no_leak):
    device.reset_supported = False
    assert client.get_info().flags == P.DEVICE_FLAGS_PCI


def test_larger_argsz_is_fine(client, no_leak):
    reply = client.request(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(64, 0, 0, 0) + bytes(48))
    assert reply is not None and len(reply.body) == 16


def test_hostile(client, no_leak):
    client.send_raw(raw(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0)[:12]))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(8, 0, 0, 0)))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DEVICE_GET_INFO, b""))
    expect_error(client, errno.EINVAL)
    with eventfds(1) as fds:
        client.send_raw(raw(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0)), fds)
        expect_error(client, errno.EINVAL)
