"""Fuzzing: random well-framed messages never crash the server, never get a reply when they
carry NO_REPLY or are replies themselves, always get exactly one reply otherwise, and leave no
fd behind. Also: the payload parsers only ever raise ProtocolError."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.errors import ProtocolError

from .conftest import nfds, ping

COMMANDS = st.one_of(st.sampled_from([int(c) for c in P.Command]), st.integers(0, 0xFFFF))
FLAGS = st.sampled_from([P.TYPE_COMMAND, P.TYPE_COMMAND | P.FLAG_NO_REPLY, P.TYPE_REPLY,
                         P.TYPE_REPLY | P.FLAG_ERROR, 0x7, P.FLAG_ERROR])


def _payload(cmd: int) -> st.SearchStrategy[bytes]:
    """Random bytes, or a plausible struct with random fields for the command."""
    fixed = {P.Command.DMA_MAP: P.DMA_MAP, P.Command.DMA_UNMAP: P.DMA_UNMAP,
             P.Command.DEVICE_GET_INFO: P.DEVICE_INFO, P.Command.DEVICE_GET_REGION_INFO: P.REGION_INFO,
             P.Command.DEVICE_GET_IRQ_INFO: P.IRQ_INFO, P.Command.DEVICE_SET_IRQS: P.SET_IRQS,
             P.Command.REGION_READ: P.REGION_ACCESS, P.Command.REGION_WRITE: P.REGION_ACCESS}.get(cmd)
    noise = st.binary(max_size=64)
    if fixed is None:
        return noise
    fields = st.tuples(*[st.integers(0, (1 << (8 * struct_size)) - 1) for struct_size in _sizes(fixed.format)])
    small = st.tuples(*[st.integers(0, 64) for _ in _sizes(fixed.format)])
    return st.one_of(noise, st.builds(lambda f, tail: fixed.pack(*f) + tail, st.one_of(fields, small),
                                      st.binary(max_size=16)))


def _sizes(fmt: str) -> list[int]:
    return [{"H": 2, "I": 4, "Q": 8}[ch] for ch in fmt if ch in "HIQ"]


MESSAGES = st.lists(COMMANDS.flatmap(lambda c: st.tuples(st.just(c), FLAGS, _payload(c))), min_size=1,
                    max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=MESSAGES, with_fd=st.booleans())
def test_random_messages(client, messages, with_fd):
    ping(client)
    before = nfds()
    for cmd, flags, payload in messages:
        msg_id = client.next_id()
        size = P.HEADER_SIZE + len(payload)
        fds = [os.eventfd(0, os.EFD_CLOEXEC)] if with_fd else []
        try:
            client.send_raw(P.pack_header(msg_id, cmd, size, flags) + payload, fds)
        finally:
            for fd in fds:
                os.close(fd)
        if flags & 0xF == P.TYPE_REPLY or flags & P.FLAG_NO_REPLY:
            continue
        try:
            reply = client.wait_reply(msg_id, cmd)
            for fd in reply.fds:
                os.close(fd)
        except ProtocolError as exc:
            assert exc.errno > 0
    client.expect_silence(0.0)
    ping(client)
    client.dma_unmap(0, 0, P.DMA_UNMAP_ALL)           # random maps hold no fds, but tidy up
    for index in range(5):
        client.set_irqs(index, P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER, 0, 0)
    assert nfds() <= before


@given(st.binary(max_size=300))
def test_parsers_raise_only_protocol_errors(data):
    for parse in (P.parse_version, P.parse_region_info, P.parse_server_version):
        try:
            parse(data)
        except ProtocolError:
            pass
