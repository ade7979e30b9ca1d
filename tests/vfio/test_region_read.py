"""REGION_READ (command 9): config space and BARs, bounds, sizes, device failures."""

from __future__ import annotations

import errno
import struct

from vxpu.vfio_server import protocol as P

from vxpu.abi import testdev as abi

from .conftest import CONFIG, eventfds, expect_error, raw


def test_whole_config_space_in_one_read(client, device, no_leak):
    data = client.region_read(CONFIG, 0, device.config_size)
    assert struct.unpack_from("<HH", data, 0) == (abi.VENDOR_ID, abi.DEVICE_ID)


def test_reply_shape(client, no_leak):
    reply = client.request(P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4))
    assert reply is not None
    assert reply.header.size == 16 + 16 + 4
    assert P.REGION_ACCESS.unpack_from(reply.body, 0) == (0, 0, 4)
    assert reply.body[16:] == b"VXPU"


def test_access_sizes(client, no_leak):
    for size in (1, 2, 4, 8):
        assert len(client.region_read(0, abi.SCRATCH, size)) == size


def test_zero_length_read(client, no_leak):
    assert client.region_read(CONFIG, 0x10, 0) == b""


def _bad(client, offset: int, region: int, count: int, err: int = errno.EINVAL) -> None:
    client.send_raw(raw(P.Command.REGION_READ, P.REGION_ACCESS.pack(offset, region, count)))
    expect_error(client, err)


def test_out_of_bounds(client, device, no_leak):
    _bad(client, 0x1000, 0, 4)                          # past BAR0's end
    _bad(client, 0xFFE, 0, 4)                           # straddles the end
    _bad(client, (1 << 64) - 2, 0, 4)                   # offset + count wraps
    _bad(client, device.config_size, CONFIG, 1)
    _bad(client, 0, 1, 4)                               # region with size 0
    _bad(client, 0, 9, 4)                               # no such region
    _bad(client, 0, 0xFFFFFFFF, 4)
    _bad(client, 0, 2, P.MAX_DATA_XFER_SIZE + 1, errno.E2BIG)


def test_malformed(client, no_leak):
    client.send_raw(raw(P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4)[:12]))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4) + b"junk"))
    expect_error(client, errno.EINVAL)
    with eventfds(1) as fds:
        client.send_raw(raw(P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4)), fds)
        expect_error(client, errno.EINVAL)


def test_device_refusal_keeps_its_errno(client, no_leak):
    client.region_write(CONFIG, 4, b"\0\0")             # memory decode off: the device says EIO
    _bad(client, 0, 0, 4, errno.EIO)


def test_device_bug_is_eio(client, caplog, no_leak):
    _bad(client, 0, 4, 4, errno.EIO)
    assert any("RuntimeError" in r.getMessage() for r in caplog.records)


def test_device_returning_the_wrong_length_is_eio(client, device, monkeypatch, no_leak):
    monkeypatch.setattr(device, "region_read", lambda index, offset, count: b"\0" * (count + 1))
    _bad(client, 0, 0, 4, errno.EIO)


def test_no_reply_read_is_not_answered(client, no_leak):
    client.send_raw(raw(P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4), flags=P.FLAG_NO_REPLY))
    client.send_raw(raw(P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 9, 4), flags=P.FLAG_NO_REPLY))
    client.expect_silence(0.1)
