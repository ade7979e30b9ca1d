"""DmaSpace unit tests: translation bounds, scatter-gather coalescing, listeners, message DMA."""

from __future__ import annotations

import errno
import os

import pytest
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.dma import MAX_PENDING_DMA, DmaSpace
from vxpu.vfio_server.errors import DmaError, ProtocolError

from .conftest import nfds

PAGE = 4096
RW = P.DMA_READ_FLAG | P.DMA_WRITE_FLAG


@pytest.fixture
def memfd():
    fd = os.memfd_create("dma-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * PAGE)
    os.pwrite(fd, bytes(range(256)) * 64, 0)
    yield fd
    os.close(fd)


@pytest.fixture
def space(memfd):
    s = DmaSpace()
    s.map(0x10000, 4 * PAGE, 0, RW, memfd)                 # [0x10000, 0x14000) = file [0, 4 pages)
    s.map(0x14000, 4 * PAGE, 8 * PAGE, RW, memfd)          # adjacent GPA, other file offset
    s.map(0x20000, 2 * PAGE, 0, P.DMA_READ_FLAG, memfd)    # read-only alias
    s.map(0x30000, 2 * PAGE, 0, RW, None)                  # message-only
    yield s
    s.close()


def _raises(err: int, fn) -> None:
    with pytest.raises(DmaError) as info:
        fn()
    assert info.value.errno == err


def test_translate_inside_a_map(space, memfd):
    view = space.translate(0x10010, 16, write=True)
    assert bytes(view) == bytes(range(16, 32))
    view[:] = b"X" * 16
    assert os.pread(memfd, 16, 16) == b"X" * 16
    view.release()
    assert bytes(space.translate(0x14000, 4, write=False)) == os.pread(memfd, 4, 8 * PAGE)
    assert bytes(space.translate(0x13FFF, 1, write=False)) == os.pread(memfd, 1, 4 * PAGE - 1)
    assert len(space.translate(0x10000, 0, write=False)) == 0


def test_translate_bounds(space):
    _raises(errno.EFAULT, lambda: space.translate(0x0FFFF, 2, write=False))        # starts before
    _raises(errno.EFAULT, lambda: space.translate(0x13FFF, 2, write=False))        # crosses into next map
    _raises(errno.EFAULT, lambda: space.translate(0x18000, 1, write=False))        # gap
    _raises(errno.EFAULT, lambda: space.translate(0x30000, 8, write=False))        # message-only
    _raises(errno.EPERM, lambda: space.translate(0x20000, 8, write=True))          # read-only
    _raises(errno.EINVAL, lambda: space.translate((1 << 64) - 4, 8, write=False))  # wraps
    _raises(errno.EINVAL, lambda: space.translate(-1, 8, write=False))
    _raises(errno.EINVAL, lambda: space.translate(0x10000, -1, write=False))
    space.translate(0x10010, 4, write=False)                                       # warm the lookup cache
    _raises(errno.EINVAL, lambda: space.translate(0x10020, -8, write=False))       # ... and miss it
    _raises(errno.EINVAL, lambda: space.translate(1 << 70, 1, write=False))


def test_scatter_gather_coalesces_within_a_map(space):
    views = space.translate_sg([(0x10000, 16), (0x10010, 16), (0x10020, 32), (0x11000, 8),
                                (0x13FF0, 16), (0x14000, 16), (0x10000, 0)], write=False)
    assert [len(v) for v in views] == [64, 8, 16, 16]                # GPA-adjacent maps are not merged
    assert bytes(views[0]) == bytes(range(64))
    _raises(errno.EFAULT, lambda: space.translate_sg([(0x10000, 8), (0x18000, 8)], write=False))
    _raises(errno.EPERM, lambda: space.translate_sg([(0x20000, 8)], write=True))


def test_listeners_see_maps_before_unmap(memfd):
    events: list[tuple[str, int, bool]] = []
    s = DmaSpace()
    s.map(0x10000, PAGE, 0, RW, memfd)
    s.add_listener(lambda r: events.append(("map", r.addr, r.view is not None)),
                   lambda r: events.append(("unmap", r.addr, r.view is not None)))
    s.map(0x20000, PAGE, 0, RW, None)
    s.unmap(0x10000, PAGE)
    s.close()
    assert events == [("map", 0x10000, True), ("map", 0x20000, False), ("unmap", 0x10000, True),
                      ("unmap", 0x20000, False)]


def test_listener_exceptions_do_not_break_the_table(memfd):
    s = DmaSpace()
    s.add_listener(lambda r: 1 / 0, lambda r: 1 / 0)
    s.map(0x10000, PAGE, 0, RW, memfd)
    assert s.unmap(0x10000, PAGE) == 1
    assert len(s) == 0


def test_many_maps_and_lookups(memfd):
    s = DmaSpace()
    for i in range(0, 1000, 2):
        s.map(i * PAGE, PAGE, 0, RW, None)
    assert len(s) == 500
    assert s.find(998 * PAGE + 5).addr == 998 * PAGE
    assert s.find(999 * PAGE) is None
    with pytest.raises(ProtocolError) as info:
        s.map(3 * PAGE, 2 * PAGE, 0, RW, None)
    assert info.value.errno == errno.EEXIST
    s.close()


def test_close_unmaps_and_refuses(memfd):
    before = nfds()
    s = DmaSpace()
    s.map(0x10000, PAGE, 0, RW, memfd)
    assert nfds() == before + 1          # the mapping holds its own reference to the file
    s.close()
    assert nfds() == before
    with pytest.raises(ProtocolError) as info:
        s.map(0x10000, PAGE, 0, RW, memfd)
    assert info.value.errno == errno.ENODEV
    _raises(errno.EFAULT, lambda: s.translate(0x10000, 1, write=False))


class FakeChannel:
    """Records DMA requests; the test answers them."""

    max_chunk = 1000

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, int, bytes | None, object]] = []

    def dma_request(self, command, addr, count, data, done) -> None:
        self.sent.append((command, addr, count, None if data is None else bytes(data), done))

    def dma_pending(self) -> int:
        return len(self.sent)


def test_message_read_is_chunked_and_reassembled(space):
    chan = FakeChannel()
    space.channel = chan
    got: list[object] = []
    space.read_async(0x30000, 2500, lambda data, err: got.append((data, err)))
    assert [(c, a, n) for c, a, n, _, _ in chan.sent] == [(P.Command.DMA_READ, 0x30000, 1000),
                                                          (P.Command.DMA_READ, 0x30000 + 1000, 1000),
                                                          (P.Command.DMA_READ, 0x30000 + 2000, 500)]
    for i in (2, 0, 1):                                    # replies may come in any order
        _c, _a, n, _d, done = chan.sent[i]
        done(bytes([i]) * n, None)
    assert got == [(b"\0" * 1000 + b"\1" * 1000 + b"\2" * 500, None)]


def test_message_write_failure_reports_once(space):
    chan = FakeChannel()
    space.channel = chan
    got: list[object] = []
    space.write_async(0x30000, b"z" * 1500, got.append)
    assert [d for *_, d, _ in chan.sent] == [b"z" * 1000, b"z" * 500]
    chan.sent[0][4](None, DmaError("nope", errno.ENODEV))
    chan.sent[1][4](None, None)
    assert len(got) == 1 and isinstance(got[0], DmaError) and got[0].errno == errno.ENODEV


def test_async_on_fd_backed_memory_completes_at_once(space, memfd):
    got: list[object] = []
    space.channel = FakeChannel()
    space.write_async(0x10000, b"direct", got.append)
    space.read_async(0x10000, 6, lambda d, e: got.append(d))
    assert got == [None, b"direct"]


def test_async_refusals(space):
    _raises(errno.ENODEV, lambda: space.read_async(0x30000, 8, lambda d, e: None))    # no client
    chan = FakeChannel()
    space.channel = chan
    _raises(errno.EFAULT, lambda: space.read_async(0x40000, 8, lambda d, e: None))    # unmapped
    _raises(errno.EPERM, lambda: space.write_async(0x20000, b"x", lambda e: None))    # read-only
    chan.max_chunk = 1
    _raises(errno.EAGAIN, lambda: space.read_async(0x30000, MAX_PENDING_DMA + 1, lambda d, e: None))
    assert not chan.sent


def test_maps_are_sealed_against_shrinking():
    fd = os.memfd_create("sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 4 * PAGE)
        s = DmaSpace()
        region = s.map(0x10000, 4 * PAGE, 0, RW, fd)
        assert region.sealed
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PAGE)              # would SIGBUS the server if it were allowed
        s.close()
    finally:
        os.close(fd)


# -- formerly test_review_dma_async.py ---------------------------------------
# Review findings in message-based DMA (DmaSpace.read_async / write_async).
#
# Contract under test: a call either raises (and ``done`` never runs) or returns and ``done``
# runs exactly once later. A channel that refuses a chunk half-way through a multi-chunk
# request (the client stopped reading: EAGAIN; the client went away: ENODEV) must not leave the
# already-sent chunks able to complete the request afterwards. The channel here is a unit-test
# fake: it records requests and lets the test answer them in any order.

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
