"""Review findings in message-based DMA (DmaSpace.read_async / write_async).

Contract under test: a call either raises (and ``done`` never runs) or returns and ``done``
runs exactly once later. A channel that refuses a chunk half-way through a multi-chunk
request (the client stopped reading: EAGAIN; the client went away: ENODEV) must not leave the
already-sent chunks able to complete the request afterwards. The channel here is a unit-test
fake: it records requests and lets the test answer them in any order.
"""

from __future__ import annotations

import errno

import pytest
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.dma import DmaSpace
from vxpu.vfio_server.errors import DmaError, ProtocolError

RAM = 0x100000


class _Channel:
    """Accepts ``accept`` requests, then refuses every further one with EAGAIN."""

    def __init__(self, max_chunk: int, accept: int) -> None:
        self.max_chunk = max_chunk
        self.accept = accept
        self.sent: list[tuple[int, int, int, object]] = []

    def dma_request(self, command, addr, count, data, done) -> None:
        if len(self.sent) >= self.accept:
            raise DmaError("the client is not reading; DMA message refused", errno.EAGAIN)
        self.sent.append((command, addr, count, done))

    def dma_pending(self) -> int:
        return len(self.sent)


def _space(channel: _Channel) -> DmaSpace:
    space = DmaSpace()
    space.map(RAM, 0x10000, 0, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, None)   # message-only
    space.channel = channel
    return space


def test_write_refused_midway_never_completes_later():
    ch = _Channel(max_chunk=4096, accept=2)
    space = _space(ch)
    calls: list[object] = []
    with pytest.raises(DmaError) as info:
        space.write_async(RAM, bytes(4 * 4096), calls.append)
    assert info.value.errno == errno.EAGAIN
    # The client answers the chunks it did get: one with an error, one with success.
    ch.sent[0][3](None, ProtocolError(errno.EFAULT, "bad address"))
    ch.sent[1][3](None, None)
    assert calls == [], "done ran after write_async had already raised"


def test_read_refused_midway_never_completes_later():
    ch = _Channel(max_chunk=4096, accept=2)
    space = _space(ch)
    calls: list[object] = []
    with pytest.raises(DmaError):
        space.read_async(RAM, 4 * 4096, lambda data, err: calls.append((data, err)))
    ch.sent[0][3](None, ProtocolError(errno.EFAULT, "bad address"))
    ch.sent[1][3](bytes(4096), None)
    assert calls == [], "done ran after read_async had already raised"


def test_complete_request_still_completes_once():
    ch = _Channel(max_chunk=4096, accept=100)
    space = _space(ch)
    calls: list[object] = []
    space.write_async(RAM, bytes(3 * 4096), calls.append)
    for _cmd, _addr, _count, cb in ch.sent:
        cb(None, None)
    assert calls == [None]


def test_oversized_request_is_refused_before_building_chunks():
    """The chunk count is checked against MAX_PENDING_DMA before any per-chunk bookkeeping is
    built: a client that negotiated a tiny max_data_xfer_size (16 bytes) and a huge message-only
    map must not make one read cost memory in proportion to length / chunk."""
    import tracemalloc

    ch = _Channel(max_chunk=16, accept=1 << 30)
    space = DmaSpace()
    space.map(1 << 32, 1 << 30, 0, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, None)   # message-only, 1 GiB
    space.channel = ch
    tracemalloc.start()
    try:
        with pytest.raises(DmaError) as info:
            space.read_async(1 << 32, 1 << 20, lambda data, err: None)       # 65536 chunks of 16 bytes
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.errno == errno.EAGAIN
    assert ch.sent == []
    assert peak < 256 << 10, f"{peak} bytes allocated to refuse the request"
