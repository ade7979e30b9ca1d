"""Shared fixtures for the vfio-user protocol tests.

The server runs in-process (a background thread) with the real TestDevice, and the client is
the real :class:`~vxpu.vfio_server.client.VfioUserClient` over a real AF_UNIX socket. Because
both ends live in this process, ``/proc/self/fd`` counts every fd either side holds: the
``no_leak`` fixture asserts that a test leaves exactly as many as it found.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterator

import pytest
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import VfioUserClient
from vxpu.vfio_server.device import RegionFlags, RegionInfo, SparseArea
from vxpu.vfio_server.server import VfioUserServer
from vxpu.vfio_server.testdev import TestDevice

CONFIG = 7
BAR0 = 0
BAR2 = 2
CMD_MEM_BME = struct.pack("<H", 0x0006)


def nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


class MmapTestDevice(TestDevice):
    """The test device, plus what it lacks for protocol tests: BAR2 offered as mmap-able from a
    memfd (two sparse windows), and region 4 whose reads fail with a device bug (RuntimeError)."""

    __test__ = False

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)   # type: ignore[arg-type]
        self.memfd = os.memfd_create("bar2", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, 0x10000)

    def region_info(self, index: int) -> RegionInfo:
        if index == BAR2:
            return RegionInfo(size=0x10000, flags=RegionFlags.READ | RegionFlags.WRITE, mmap_fd=self.memfd,
                              mmap_offset=0, sparse=(SparseArea(0, 0x1000), SparseArea(0x2000, 0x2000)))
        if index == 4:
            return RegionInfo(size=0x1000, flags=RegionFlags.READ | RegionFlags.WRITE)
        return super().region_info(index)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == 4:
            raise RuntimeError("simulated device bug")
        return super().region_read(index, offset, count)

    def close(self) -> None:
        os.close(self.memfd)


@pytest.fixture
def device() -> Iterator[MmapTestDevice]:
    dev = MmapTestDevice()
    yield dev
    dev.close()


@pytest.fixture
def server(tmp_path, device) -> Iterator[VfioUserServer]:
    srv = VfioUserServer(tmp_path / "vxpu.sock", device)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def raw_client(server) -> Iterator[VfioUserClient]:
    """Connected, nothing negotiated (synchronised: the server has accepted the connection)."""
    with VfioUserClient(server.path, timeout=3.0) as c:
        c.send_raw(raw(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0), msg_id=1))
        expect_error(c, errno.EINVAL, msg_id=1)     # "VERSION first"
        yield c


@pytest.fixture
def client(raw_client) -> VfioUserClient:
    """Negotiated (VERSION + DEVICE_GET_INFO), memory decode and bus mastering enabled."""
    raw_client.handshake()
    raw_client.region_write(CONFIG, 4, CMD_MEM_BME)
    return raw_client


def ping(c: VfioUserClient) -> None:
    """A valid request that must still work (the server kept serving)."""
    assert c.get_info().flags & P.DEVICE_FLAGS_PCI


@pytest.fixture
def no_leak(client) -> Iterator[None]:
    """Assert the test leaves the process fd count unchanged (checked after a final ping)."""
    ping(client)
    before = nfds()
    yield
    ping(client)
    assert nfds() == before, "fd leak"


def raw(cmd: int, payload: bytes = b"", *, msg_id: int = 0x4242, flags: int = P.TYPE_COMMAND,
        size: int | None = None) -> bytes:
    """A hand-built message; ``size`` overrides the header's size field."""
    return P.pack_header(msg_id, cmd, P.HEADER_SIZE + len(payload) if size is None else size, flags) + payload


def expect_error(c: VfioUserClient, err: int, msg_id: int = 0x4242, cmd: int | None = None) -> None:
    """Receive the next message and assert it is a header-only ERROR reply with ``err``."""
    msg = c.recv_message()
    assert msg.header.type == P.TYPE_REPLY
    assert msg.header.flags & P.FLAG_ERROR, msg.header
    assert msg.header.error == err, f"errno {errno.errorcode.get(msg.header.error)}, wanted {errno.errorcode[err]}"
    assert msg.header.size == P.HEADER_SIZE and msg.body == b""
    assert msg.header.id == msg_id
    if cmd is not None:
        assert msg.header.command == cmd
    assert not msg.fds


def refused(c: VfioUserClient, err: int, fn: Callable[[], object]) -> None:
    """Assert a client call fails with ProtocolError ``err``."""
    from vxpu.vfio_server.errors import ProtocolError
    with pytest.raises(ProtocolError) as info:
        fn()
    assert info.value.errno == err, info.value


@contextlib.contextmanager
def eventfds(n: int) -> Iterator[list[int]]:
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def read_eventfd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
