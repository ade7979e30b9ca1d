"""REGION_WRITE_MULTI (command 15): parsed and applied, though never advertised."""

from __future__ import annotations

import errno
import struct

from vxpu.vfio_server import protocol as P

from vxpu.abi import testdev as abi

from .conftest import expect_error, raw


def _multi(entries: list[tuple[int, int, bytes]], n: int | None = None) -> bytes:
    body = P.WRITE_MULTI_HDR.pack(len(entries) if n is None else n)
    for offset, region, data in entries:
        body += P.WRITE_MULTI_ENTRY.pack(offset, region, len(data), data.ljust(8, b"\0"))
    return body


def test_not_advertised(raw_client):
    assert "write_multiple" not in raw_client.version()


def test_posted_batch_is_applied(client, no_leak):
    entries = [(abi.SCRATCH, 0, b"\1\1\1\1"), (abi.SCRATCH2, 0, b"\2\2"), (abi.SCRATCH, 0, b"\3")]
    client.send_raw(raw(P.Command.REGION_WRITE_MULTI, _multi(entries), flags=P.FLAG_NO_REPLY))
    client.expect_silence(0.1)
    assert client.region_read(0, abi.SCRATCH, 8) == b"\3\1\1\1\2\2\0\0"


def test_reply_when_asked(client, no_leak):
    reply = client.request(P.Command.REGION_WRITE_MULTI, _multi([(abi.SCRATCH, 0, struct.pack("<I", 7))]))
    assert reply is not None and reply.body == b""


def test_hostile(client, no_leak):
    bad = [_multi([(abi.SCRATCH, 0, b"x")], n=2),                              # count disagrees with size
           _multi([(abi.SCRATCH, 0, b"x")] * (P.MAX_WRITE_MULTI + 1)),         # too many entries
           _multi([]).replace(b"\0" * 8, struct.pack("<Q", 1 << 63)),          # absurd count
           P.WRITE_MULTI_HDR.pack(1) + P.WRITE_MULTI_ENTRY.pack(abi.SCRATCH, 0, 9, bytes(8)),   # > 8 bytes
           _multi([(abi.SCRATCH, 0, b"ok"), (0x1000, 0, b"past")]),            # one entry out of bounds
           _multi([(0, 9, b"x")]),
           b"\0\0\0"]
    for payload in bad:
        client.send_raw(raw(P.Command.REGION_WRITE_MULTI, payload))
        expect_error(client, errno.EINVAL)
    assert client.region_read(0, abi.SCRATCH, 2) != b"ok"                    # validated before applying
