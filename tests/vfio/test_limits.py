"""Per-connection resource limits (issue 7): each attack is refused or the client dropped, the
server serves the next client, and the process's fd count and RSS return to where they were.

The server runs in this process (see conftest), so ``/proc/self/fd`` and ``/proc/self/statm``
count what it holds.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time

import pytest
from vxpu.vfio_server import dma as D
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server import transport as T
from vxpu.vfio_server.client import GuestMemory, VfioUserClient
from vxpu.vfio_server.errors import PeerClosed
from vxpu.vfio_server.server import VfioUserServer

from .conftest import CMD_MEM_BME, CONFIG, MmapTestDevice, expect_error, nfds, ping, raw, refused

RW = P.DMA_READ_FLAG | P.DMA_WRITE_FLAG
TIB = 1 << 40


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sealed_memfd(size: int) -> int:
    """A sparse memfd of ``size`` bytes, sealed like QEMU's memory-backend-memfd (no RAM used)."""
    fd = os.memfd_create("sparse-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def wait_disconnected(server: VfioUserServer) -> None:
    for _ in range(500):
        if server.conn is None:
            return
        time.sleep(0.01)
    raise AssertionError("the server did not drop the client")


def next_client_is_served(server: VfioUserServer) -> None:
    wait_disconnected(server)
    with VfioUserClient(server.path, timeout=3.0) as c:
        c.handshake()
        ping(c)
    wait_disconnected(server)


def connect(server: VfioUserServer) -> VfioUserClient:
    """A negotiated client with memory decode and bus mastering on."""
    c = VfioUserClient(server.path, timeout=5.0)
    c.handshake()
    c.region_write(CONFIG, 4, CMD_MEM_BME)
    return c


@pytest.fixture
def baseline(server):
    """fd count and RSS after one full client session (so lazily built state is counted)."""
    next_client_is_served(server)
    return nfds(), rss_bytes()


def back_to_baseline(baseline: tuple[int, int]) -> None:
    fds, rss = baseline
    assert nfds() == fds, "fd leak"
    assert rss_bytes() - rss < 16 << 20, "RSS did not come back"


# --- address space ----------------------------------------------------------------------------

def test_sparse_64_tib_maps_then_a_1_mib_write(server, baseline):
    """96 DMA_MAPs of one sparse, sealed 64 TiB memfd, then a 1 MiB REGION_WRITE: used to exhaust
    the address space so that the write's buffer raised MemoryError and the server exited."""
    fd = sealed_memfd(64 * TIB)
    try:
        with VfioUserClient(server.path, timeout=5.0) as c:
            c.handshake()
            for i in range(96):
                refused(c, errno.ENOSPC, lambda i=i: c.dma_map((i + 1) * 64 * TIB, 64 * TIB, fd))
            assert server.conn is not None and server.conn.dma.mapped_bytes == 0
            msg_id = c.next_id()
            c.send_raw(raw(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 1 << 20) + bytes(1 << 20),
                           msg_id=msg_id))
            expect_error(c, errno.EINVAL, msg_id=msg_id)          # past BAR0's size, but parsed
            ping(c)
    finally:
        os.close(fd)
    next_client_is_served(server)
    back_to_baseline(baseline)


def test_mapped_bytes_are_counted_and_released(tmp_path):
    dev = MmapTestDevice()
    srv = VfioUserServer(tmp_path / "s.sock", dev, max_dma_bytes=3 * 0x10000).start()
    try:
        with GuestMemory(0x40000) as mem, VfioUserClient(srv.path, timeout=3.0) as c:
            c.handshake()
            c.map_guest_ram(mem, 0x100000, size=0x20000)
            c.map_guest_ram(mem, 0x200000, offset=0x20000, size=0x10000)
            refused(c, errno.ENOSPC, lambda: c.map_guest_ram(mem, 0x300000, offset=0x30000, size=0x10000))
            c.dma_map(0x400000, 0x100000)                        # message-only: no address space
            c.dma_unmap(0x100000, 0x20000)
            c.map_guest_ram(mem, 0x300000, offset=0x30000, size=0x10000)
            assert srv.conn is not None and srv.conn.dma.mapped_bytes == 0x20000
    finally:
        srv.stop()
        dev.close()


def test_map_count_is_capped():
    space = D.DmaSpace(max_maps=4)
    try:
        for i in range(4):
            space.map(0x100000 * (i + 1), 0x1000, 0, RW, None)
        with pytest.raises(Exception) as info:
            space.map(0x900000, 0x1000, 0, RW, None)
        assert getattr(info.value, "errno", None) == errno.ENOSPC
    finally:
        space.close()


# --- fds held by one incomplete message -------------------------------------------------------

def _send_with_fds(c: VfioUserClient, data: bytes, fds: list[int]) -> None:
    """sendmsg that waits out ETOOMANYREFS (the kernel's cap on fds in flight per user)."""
    for _ in range(2000):
        try:
            c.send_raw(data, fds)
            return
        except OSError as exc:
            if exc.errno not in (errno.ETOOMANYREFS, errno.EAGAIN):
                raise
            time.sleep(0.001)
    raise AssertionError("could not send a chunk")


def test_a_write_in_4095_chunks_of_64_fds_pins_at_most_the_cap(server, baseline):
    """A 1 MiB REGION_WRITE sent in 4,095 pieces, each carrying 64 fds: the server keeps at most
    MAX_PENDING_FDS of them, closes the rest on arrival and refuses the message."""
    count = P.MAX_DATA_XFER_SIZE                    # 1 MiB of data after the 16-byte access header
    message = raw(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, count) + bytes(count), msg_id=0x77)
    chunks = 4095
    step = -(-len(message) // chunks)
    client = connect(server)
    donor = os.eventfd(0, os.EFD_CLOEXEC)
    peak = 0
    before = nfds()
    try:
        for i in range(chunks):
            piece = message[i * step:(i + 1) * step]
            if not piece:
                break
            _send_with_fds(client, piece, [donor] * P.MAX_RX_FDS)
            if i % 64 == 0:
                peak = max(peak, nfds() - before)
        expect_error(client, errno.EINVAL, msg_id=0x77)
    finally:
        os.close(donor)
    # One recvmsg can deliver MAX_RX_FDS before the extras are closed; unbounded, the message
    # held all 262,080 (the process hit its fd limit).
    assert peak <= T.MAX_PENDING_FDS + P.MAX_RX_FDS, peak
    ping(client)
    client.close()
    next_client_is_served(server)
    back_to_baseline(baseline)


# --- framing ------------------------------------------------------------------------------------

def test_a_4_gib_size_field_closes_the_connection(server, baseline):
    """E2BIG, then the server closes: it neither allocates nor reads and discards 4 GiB."""
    client = connect(server)
    client.send_raw(raw(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 16), size=0xFFFF_FFFF, msg_id=9))
    expect_error(client, errno.E2BIG, msg_id=9)
    start = time.monotonic()
    with pytest.raises((PeerClosed, ConnectionResetError, BrokenPipeError)):
        client.recv_message(timeout=3.0)
    assert time.monotonic() - start < 2.0
    client.close()
    next_client_is_served(server)
    back_to_baseline(baseline)


# --- allocation failure -------------------------------------------------------------------------

def test_memory_error_while_receiving_drops_only_that_client(server, baseline, monkeypatch, caplog):
    """The issue's crash site: the body buffer's allocation fails. One ERROR line, client gone."""
    client = connect(server)
    def no_memory(*args: object) -> bytearray:
        raise MemoryError

    monkeypatch.setattr(T, "bytearray", no_memory, raising=False)
    with caplog.at_level(logging.ERROR, logger="vxpu.vfio_server.server"):
        client.send_raw(raw(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 4) + b"abcd"))
        with pytest.raises((PeerClosed, ConnectionResetError)):
            client.recv_message(timeout=3.0)
        wait_disconnected(server)
    monkeypatch.undo()
    lines = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    assert server._thread is not None and server._thread.is_alive()
    client.close()
    next_client_is_served(server)
    back_to_baseline(baseline)


def test_memory_error_in_the_device_drops_only_that_client(server, device, baseline, monkeypatch):
    client = connect(server)
    def no_memory(*args: object) -> None:
        raise MemoryError

    monkeypatch.setattr(device, "region_write", no_memory)
    client.send_raw(raw(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(8, 0, 4) + b"abcd"))
    with pytest.raises((PeerClosed, ConnectionResetError)):
        client.recv_message(timeout=3.0)
    monkeypatch.undo()
    client.close()
    next_client_is_served(server)
    back_to_baseline(baseline)
    with VfioUserClient(server.path, timeout=3.0) as c:
        c.handshake()
        c.region_write(CONFIG, 4, CMD_MEM_BME)
        c.region_write(0, 8, b"\x01\x02\x03\x04")
        assert c.region_read(0, 8, 4) == b"\x01\x02\x03\x04"
