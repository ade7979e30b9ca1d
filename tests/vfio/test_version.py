"""VERSION (command 1): negotiation, reply shape and size, hostile JSON."""

from __future__ import annotations

import errno
import json

import pytest
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import QEMU_CAPS

from .conftest import expect_error, nfds, ping, raw


def _qemu_request(msg_id: int = 300) -> bytes:
    return raw(P.Command.VERSION, P.client_version_payload(QEMU_CAPS), msg_id=msg_id)


def test_qemu_request_is_214_bytes_and_reply_fits(raw_client):
    req = _qemu_request()
    assert len(req) == 214
    raw_client.send_raw(req)
    msg = raw_client.recv_message()
    assert msg.header.type == P.TYPE_REPLY and not msg.header.is_error
    assert msg.header.id == 300 and msg.header.command == P.Command.VERSION
    assert msg.header.size <= 214 and msg.header.size == P.HEADER_SIZE + len(msg.body)
    major, minor, caps = P.parse_server_version(msg.body)
    assert (major, minor) == (0, 0)
    assert msg.body.endswith(b"\0")
    assert caps["max_msg_fds"] == P.MAX_MSG_FDS and caps["max_msg_fds"] <= 16
    assert caps["max_data_xfer_size"] == P.MAX_DATA_XFER_SIZE
    assert caps["max_dma_maps"] <= 65535 and caps["pgsizes"] & 0xFFF == 0
    assert "write_multiple" not in caps


def test_smaller_request_gets_the_minimal_reply(raw_client):
    text = json.dumps({"capabilities": {"max_msg_fds": 4}}).encode()
    payload = P.VERSION_HDR.pack(0, 0) + text + b" " * (100 - 21 - len(text)) + b"\0"
    raw_client.send_raw(raw(P.Command.VERSION, payload))
    msg = raw_client.recv_message()
    assert not msg.header.is_error
    assert msg.header.size <= P.HEADER_SIZE + len(payload) == 100
    caps = P.parse_server_version(msg.body)[2]
    assert caps == {"max_msg_fds": P.MAX_MSG_FDS, "max_data_xfer_size": P.MAX_DATA_XFER_SIZE}


def test_minor_version_is_always_zero(raw_client):
    payload = P.VERSION_HDR.pack(0, 7) + b'{"capabilities":{}}' + b" " * 200 + b"\0"
    raw_client.send_raw(raw(P.Command.VERSION, payload))
    msg = raw_client.recv_message()
    assert msg.body[:4] == P.VERSION_HDR.pack(0, 0)


def test_no_json_is_accepted(raw_client):
    raw_client.send_raw(raw(P.Command.VERSION, P.VERSION_HDR.pack(0, 0)))
    msg = raw_client.recv_message()
    assert not msg.header.is_error
    ping(raw_client)


def _bad(raw_client, payload: bytes, err: int, renegotiate: bool = True) -> None:
    before = nfds()
    raw_client.send_raw(raw(P.Command.VERSION, payload))
    expect_error(raw_client, err, cmd=P.Command.VERSION)
    if not renegotiate:
        return
    raw_client.version()          # the server keeps serving and can still negotiate
    ping(raw_client)
    assert nfds() == before


def test_major_version_mismatch(raw_client):
    _bad(raw_client, P.VERSION_HDR.pack(1, 0) + b'{"capabilities":{}}\0', errno.ENOTSUP)


def test_json_not_nul_terminated(raw_client):
    _bad(raw_client, P.VERSION_HDR.pack(0, 0) + b'{"capabilities":{}}', errno.EINVAL)


def test_json_malformed(raw_client):
    _bad(raw_client, P.VERSION_HDR.pack(0, 0) + b'{"capabilities":\0', errno.EINVAL)


def test_json_not_an_object(raw_client):
    _bad(raw_client, P.VERSION_HDR.pack(0, 0) + b'[1, 2]\0', errno.EINVAL)


def test_json_too_deep(raw_client):
    _bad(raw_client, P.VERSION_HDR.pack(0, 0) + b"[" * 2000 + b"]" * 2000 + b"\0", errno.EINVAL)


def test_json_too_long(raw_client):
    _bad(raw_client, P.VERSION_HDR.pack(0, 0) + b" " * P.MAX_VERSION_JSON + b"{}\0", errno.E2BIG)


def test_capability_of_wrong_type(raw_client):
    for caps in ({"max_msg_fds": "8"}, {"max_data_xfer_size": -1}, {"max_data_xfer_size": 1 << 40},
                 {"write_multiple": 1}, {"migration": []}, {"pgsizes": True}):
        _bad(raw_client, P.client_version_payload(caps), errno.EINVAL, renegotiate=False)
    _bad(raw_client, P.VERSION_HDR.pack(0, 0) + b'{"capabilities":5}\0', errno.EINVAL)


def test_truncated_payload(raw_client):
    _bad(raw_client, b"\0\0", errno.EINVAL)


def test_commands_before_version_are_refused(raw_client):
    raw_client.send_raw(raw(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0)))
    expect_error(raw_client, errno.EINVAL)
    raw_client.version()
    ping(raw_client)


def test_second_version_is_refused(client):
    client.send_raw(_qemu_request(7))
    expect_error(client, errno.EINVAL, msg_id=7)
    ping(client)


# -- formerly test_review_version.py -----------------------------------------
# Review finding: the VERSION reply must never be larger than the client's VERSION request
# (QEMU sizes its receive buffer from its own request; a larger reply desyncs the stream).
# When not even the minimal capability JSON fits, the reply carries the version alone.

@pytest.mark.parametrize("request_size", [20, 24, 40, 60, 79])
def test_reply_never_exceeds_a_small_request(raw_client, request_size):
    if request_size == 20:
        payload = P.VERSION_HDR.pack(0, 0)                       # no JSON at all
    else:
        text = b"{}"
        payload = P.VERSION_HDR.pack(0, 0) + text + b" " * (request_size - 16 - 4 - len(text) - 1) + b"\0"
    assert P.HEADER_SIZE + len(payload) == request_size
    raw_client.send_raw(raw(P.Command.VERSION, payload))
    msg = raw_client.recv_message()
    assert not msg.header.is_error
    assert msg.header.size <= request_size, f"{msg.header.size}-byte reply to a {request_size}-byte request"
    major, minor, _caps = P.parse_server_version(msg.body)
    assert (major, minor) == (0, 0)
    ping(raw_client)


def test_build_version_payload_bounds():
    for size in range(20, 300):
        payload = P.build_version_payload(size)
        assert P.HEADER_SIZE + len(payload) <= size
        assert payload[:4] == P.VERSION_HDR.pack(0, 0)
        if len(payload) > 4:
            assert json.loads(payload[4:-1])["capabilities"]["max_msg_fds"] == P.MAX_MSG_FDS
