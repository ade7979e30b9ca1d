"""Review finding: the VERSION reply must never be larger than the client's VERSION request
(QEMU sizes its receive buffer from its own request; a larger reply desyncs the stream).
When not even the minimal capability JSON fits, the reply carries the version alone."""

from __future__ import annotations

import json

import pytest
from vxpu.vfio_server import protocol as P

from .conftest import ping, raw


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
