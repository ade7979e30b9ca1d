"""REGION_WRITE (command 10): synchronous and posted (NO_REPLY) writes, bounds, hostile sizes."""

from __future__ import annotations

import errno
import struct

import pytest
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.errors import PeerClosed

from vxpu.abi import testdev as abi

from .conftest import CONFIG, eventfds, expect_error, raw


def test_sync_write_reply_echoes_the_access(client, no_leak):
    reply = client.request(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(abi.SCRATCH, 0, 4) + b"\1\2\3\4")
    assert reply is not None and reply.header.size == 32
    assert P.REGION_ACCESS.unpack(reply.body) == (abi.SCRATCH, 0, 4)
    assert client.region_read(0, abi.SCRATCH, 4) == b"\1\2\3\4"


def test_posted_writes_are_never_answered(client, no_leak):
    for i in range(100):
        client.region_write(0, abi.SCRATCH, struct.pack("<I", i), posted=True)
    client.expect_silence(0.1)
    assert client.region_read(0, abi.SCRATCH, 4) == struct.pack("<I", 99)


def test_posted_errors_are_logged_not_answered(client, caplog, no_leak):
    bad = [P.REGION_ACCESS.pack(0x2000, 0, 4) + b"abcd",          # past the end
           P.REGION_ACCESS.pack(0, 9, 4) + b"abcd",               # no such region
           P.REGION_ACCESS.pack(0, 0, 8) + b"abcd",               # count disagrees with the data
           P.REGION_ACCESS.pack(0, 0, 4)[:8]]                     # truncated
    for payload in bad:
        client.send_raw(raw(P.Command.REGION_WRITE, payload, flags=P.FLAG_NO_REPLY))
    client.expect_silence(0.1)
    assert sum("NO_REPLY" in r.getMessage() for r in caplog.records) == len(bad)


def test_config_write_masks_apply(client, no_leak):
    client.region_write(CONFIG, 0, b"\xff\xff")                   # vendor ID is read-only
    assert struct.unpack("<H", client.region_read(CONFIG, 0, 2))[0] == abi.VENDOR_ID


def _bad(client, payload: bytes, err: int = errno.EINVAL) -> None:
    client.send_raw(raw(P.Command.REGION_WRITE, payload))
    expect_error(client, err)


def test_hostile(client, device, no_leak):
    _bad(client, P.REGION_ACCESS.pack(0xFFC, 0, 8) + bytes(8))
    _bad(client, P.REGION_ACCESS.pack((1 << 64) - 4, 0, 8) + bytes(8))
    _bad(client, P.REGION_ACCESS.pack(0, 9, 4) + bytes(4))
    _bad(client, P.REGION_ACCESS.pack(0, 5, 4) + bytes(4))            # size-0 region
    _bad(client, P.REGION_ACCESS.pack(0, 0, 4) + bytes(3))            # short data
    _bad(client, P.REGION_ACCESS.pack(0, 0, 4) + bytes(5))            # extra data
    _bad(client, P.REGION_ACCESS.pack(0, 0, 0xFFFFFFFF) + bytes(4))
    _bad(client, P.REGION_ACCESS.pack(0, 0, 4)[:15])
    _bad(client, P.REGION_ACCESS.pack(device.config_size - 2, CONFIG, 4) + bytes(4))
    with eventfds(1) as fds:
        client.send_raw(raw(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(abi.SCRATCH, 0, 4) + bytes(4)), fds)
        expect_error(client, errno.EINVAL)


def test_max_size_write_is_accepted_and_one_more_is_e2big(client):
    # BAR2 is 64 KiB, so a 1 MiB write is out of bounds after the size check passes.
    _bad(client, P.REGION_ACCESS.pack(0, 2, P.MAX_DATA_XFER_SIZE) + bytes(P.MAX_DATA_XFER_SIZE))
    client.region_write(2, 0, bytes(0x10000))
    client.send_raw(raw(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 2, P.MAX_DATA_XFER_SIZE + 1),
                        size=32 + P.MAX_DATA_XFER_SIZE + 1))
    expect_error(client, errno.E2BIG)
    with pytest.raises((PeerClosed, ConnectionResetError)):      # framing error: connection closed
        client.recv_message()
