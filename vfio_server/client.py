"""A vfio-user client that plays QEMU: for tests, benchmarks and the out-of-VM guest driver.

It speaks the same wire format as QEMU 11.1.3's ``vfio-user-pci`` (same VERSION request, same
argsz retry for GET_REGION_INFO, posted REGION_WRITEs with NO_REPLY, eventfds for SET_IRQS)
over a blocking socket. "Guest RAM" is :class:`GuestMemory`, a memfd that is both mmap-ed here
and passed to the server with DMA_MAP, exactly like ``memory-backend-memfd,share=on``. While
waiting for a reply the client answers the server's DMA_READ/DMA_WRITE requests from the guest
RAM it mapped (including RAM mapped *without* an fd, to exercise message-based DMA), and
:meth:`VfioUserClient.serve_dma` does so while idle.

The ``send_raw`` / ``recv_message`` pair sends hand-built bytes and fds, for hostile tests.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.errors import PeerClosed, ProtocolError
from vxpu.vfio_server.transport import ancillary_for, close_fds, fds_from_ancillary

# What QEMU 11.1.3 sends (214 bytes with the header).
QEMU_CAPS: dict[str, Any] = {
    "pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, "max_data_xfer_size": 1048576,
    "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, "write_multiple": True,
}
_ANC = socket.CMSG_SPACE(P.MAX_RX_FDS * 4)


class GuestMemory:
    """A memfd of ``size`` bytes, mmap-ed shared: guest RAM for an in-process client.

    Raises:
        OSError: memfd_create/ftruncate/mmap failed.
    """

    def __init__(self, size: int, name: str = "vxpu-guest-ram") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            # like QEMU's memory-backend-memfd (seal=on): the size is fixed for good
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self.view = memoryview(self.mm)

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.view[offset:offset + count])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.view[offset:offset + len(data)] = data

    def close(self) -> None:
        if self.fd >= 0:
            self.view.release()
            self.mm.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int


@dataclass(frozen=True)
class IrqInfoReply:
    flags: int
    index: int
    count: int


@dataclass
class Message:
    """A message received by the client."""

    header: P.Header
    body: bytes
    fds: list[int]


@dataclass
class _RamMap:
    addr: int
    size: int
    view: memoryview
    writable: bool


class VfioUserClient:
    """A blocking vfio-user client.

    Args:
        path: the server's socket.
        timeout: seconds to wait for any reply (QEMU's ``x-msg-timeout`` is 5 s).
        first_id: the first message id (QEMU's ids are process-wide and wrap).
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 5.0, first_id: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        try:
            self.sock.connect(os.fspath(path))
        except OSError:
            self.sock.close()
            raise
        self._next_id = first_id & 0xFFFF
        self._ram: list[_RamMap] = []
        self.bus_master = True          # False: refuse server DMA with ENODEV, like QEMU without BME
        self.server_caps: dict[str, Any] = {}
        self.dma_requests_served = 0

    def close(self) -> None:
        """Close the socket and forget the guest RAM mapped through this client."""
        self.sock.close()
        for ram in self._ram:
            ram.view.release()
        self._ram = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- raw ---------------------------------------------------------------------------------------
    def next_id(self) -> int:
        msg_id = self._next_id
        self._next_id = (msg_id + 1) & 0xFFFF
        return msg_id

    def send_raw(self, data: bytes | Sequence[bytes], fds: Sequence[int] = ()) -> None:
        """Send bytes (one buffer or a list sent in one sendmsg) with ``fds`` attached."""
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        total = sum(len(p) for p in parts)
        sent = self.sock.sendmsg(parts, ancillary_for(fds))
        if sent < total:
            self.sock.sendall(b"".join(bytes(p) for p in parts)[sent:])

    def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k, anc, _flags, _ = self.sock.recvmsg_into([view[got:]], _ANC, socket.MSG_CMSG_CLOEXEC)
            fds.extend(fds_from_ancillary(anc))
            if k == 0:
                close_fds(fds)
                raise PeerClosed("server closed the connection")
            got += k
        return bytes(buf)

    def recv_message(self, timeout: float | None = None) -> Message:
        """Receive one message of any kind.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` (default: the client's timeout).
            PeerClosed: the server closed the connection.
            ProtocolError: E2BIG for a size field above MAX_MESSAGE_SIZE (nothing is allocated
                for it; the stream cannot be resynchronised, so close the client).
        """
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        fds: list[int] = []
        try:
            try:
                hdr = P.parse_header(self._recv_exact(P.HEADER_SIZE, fds))
            except BlockingIOError:         # timeout 0 makes the socket non-blocking
                raise TimeoutError("no message") from None
            if hdr.size > P.MAX_MESSAGE_SIZE:
                close_fds(fds)
                raise ProtocolError(errno.E2BIG, f"server message of {hdr.size} bytes "
                                    f"(limit {P.MAX_MESSAGE_SIZE}); close this client")
            self.sock.settimeout(self.timeout)
            body = self._recv_exact(hdr.size - P.HEADER_SIZE, fds) if hdr.size > P.HEADER_SIZE else b""
        finally:
            self.sock.settimeout(self.timeout)
        return Message(hdr, body, fds)

    def expect_silence(self, seconds: float = 0.2) -> None:
        """Assert that the server sends nothing for ``seconds`` (e.g. after a NO_REPLY message).

        Raises:
            AssertionError: a message arrived.
        """
        try:
            msg = self.recv_message(timeout=seconds)
        except TimeoutError:
            return
        close_fds(msg.fds)
        raise AssertionError(f"unexpected message from server: {msg.header}")

    def request(self, command: int, payload: bytes | Sequence[bytes] = b"", fds: Sequence[int] = (),
                no_reply: bool = False) -> Message | None:
        """Send a command and wait for its reply, serving server DMA requests meanwhile.

        Returns:
            the reply (None with ``no_reply``). Fds in the reply belong to the caller.

        Raises:
            ProtocolError: the server replied with ERROR (``.errno`` is its errno).
            TimeoutError, PeerClosed: no reply.
        """
        parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
        size = P.HEADER_SIZE + sum(len(p) for p in parts)
        msg_id = self.next_id()
        flags = P.TYPE_COMMAND | (P.FLAG_NO_REPLY if no_reply else 0)
        self.send_raw([P.pack_header(msg_id, command, size, flags), *parts], fds)
        if no_reply:
            return None
        return self.wait_reply(msg_id, command)

    def wait_reply(self, msg_id: int, command: int) -> Message:
        """Wait for the reply to ``msg_id`` (serving server requests meanwhile).

        Raises:
            ProtocolError: an ERROR reply, or a reply that does not match the request.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self.recv_message(max(0.0, deadline - time.monotonic()))
            if msg.header.type == P.TYPE_COMMAND:
                self._serve_request(msg)
                continue
            if msg.header.id != msg_id or msg.header.command != command:
                close_fds(msg.fds)
                raise ProtocolError(errno.EPROTO, f"reply {msg.header} does not match request id {msg_id}")
            if msg.header.is_error:
                close_fds(msg.fds)
                raise ProtocolError(msg.header.error, f"server refused {msg.header.command_name()}")
            return msg

    # --- server -> client DMA ---------------------------------------------------------------------
    def serve_dma(self, timeout: float = 0.5, count: int = 1) -> int:
        """Answer up to ``count`` server requests arriving within ``timeout``; returns how many."""
        served = 0
        deadline = time.monotonic() + timeout
        while served < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = self.recv_message(left)
            except TimeoutError:
                break
            if msg.header.type != P.TYPE_COMMAND:
                close_fds(msg.fds)
                raise ProtocolError(errno.EPROTO, f"unexpected reply {msg.header} while idle")
            self._serve_request(msg)
            served += 1
        return served

    def _serve_request(self, msg: Message) -> None:
        hdr = msg.header
        close_fds(msg.fds)
        try:
            if msg.fds:
                raise ProtocolError(errno.EINVAL, "fds on a server request")
            if hdr.command not in (P.Command.DMA_READ, P.Command.DMA_WRITE):
                raise ProtocolError(errno.ENOTSUP, f"server sent {hdr.command_name()}")
            P.need(msg.body, P.DMA_ACCESS.size, "DMA request")
            addr, count = P.DMA_ACCESS.unpack_from(msg.body, 0)
            if not self.bus_master:
                raise ProtocolError(errno.ENODEV, "bus master disabled")
            view = self._ram_view(addr, count, hdr.command == P.Command.DMA_WRITE)
            if hdr.command == P.Command.DMA_READ:
                reply = [P.DMA_ACCESS.pack(addr, count), bytes(view)]
            else:
                if len(msg.body) != P.DMA_ACCESS.size + count:
                    raise ProtocolError(errno.EINVAL, "DMA_WRITE data length != count")
                view[:] = msg.body[P.DMA_ACCESS.size:]
                reply = [P.DMA_ACCESS.pack(addr, count)]
        except ProtocolError as exc:
            self.send_raw(P.error_header(hdr, exc.errno))
            return
        size = P.HEADER_SIZE + sum(len(p) for p in reply)
        self.send_raw([P.HEADER.pack(hdr.id, hdr.command, size, P.TYPE_REPLY, 0), *reply])
        self.dma_requests_served += 1

    def _ram_view(self, addr: int, count: int, write: bool) -> memoryview:
        for ram in self._ram:
            if ram.addr <= addr and addr + count <= ram.addr + ram.size:
                if write and not ram.writable:
                    raise ProtocolError(errno.EPERM, "DMA write to read-only memory")
                off = addr - ram.addr
                return ram.view[off:off + count]
        raise ProtocolError(errno.ENODEV, f"address {addr:#x} is not guest RAM")

    # --- commands --------------------------------------------------------------------------------------
    def version(self, caps: dict[str, Any] | None = None) -> dict[str, Any]:
        """Negotiate (QEMU's capabilities by default); returns the server's capabilities.

        Raises:
            ProtocolError: refused, or a malformed or non-0.0 reply.
        """
        reply = self.request(P.Command.VERSION, P.client_version_payload(QEMU_CAPS if caps is None else caps))
        assert reply is not None
        major, minor, server_caps = P.parse_server_version(reply.body)
        if (major, minor) != (0, 0):
            raise ProtocolError(errno.EPROTO, f"server replied version {major}.{minor}, QEMU needs 0.0")
        self.server_caps = server_caps
        return server_caps

    def dma_map(self, addr: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = P.DMA_MAP_FLAGS) -> None:
        """DMA_MAP ``[addr, addr + size)``, backed by ``fd`` at ``offset`` (or message-only)."""
        payload = P.DMA_MAP.pack(P.DMA_MAP.size, flags, offset, addr, size)
        self.request(P.Command.DMA_MAP, payload, [fd] if fd is not None else [])

    def map_guest_ram(self, mem: GuestMemory, addr: int, offset: int = 0, size: int | None = None,
                      with_fd: bool = True, flags: int = P.DMA_MAP_FLAGS) -> None:
        """Map ``mem[offset:offset+size]`` at guest-physical ``addr``; without ``with_fd`` the
        server must reach it through DMA_READ/DMA_WRITE, which this client answers."""
        size = mem.size - offset if size is None else size
        self.dma_map(addr, size, mem.fd if with_fd else None, offset if with_fd else 0, flags)
        self._ram.append(_RamMap(addr, size, mem.view[offset:offset + size], bool(flags & P.DMA_WRITE_FLAG)))

    def dma_unmap(self, addr: int, size: int, flags: int = 0) -> None:
        self.request(P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(P.DMA_UNMAP.size, flags, addr, size))
        keep = []
        for ram in self._ram:
            if flags == P.DMA_UNMAP_ALL or (ram.addr, ram.size) == (addr, size):
                ram.view.release()
            else:
                keep.append(ram)
        self._ram = keep

    def get_info(self) -> DeviceInfo:
        reply = self.request(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(P.DEVICE_INFO.size, 0, 0, 0))
        assert reply is not None
        _argsz, flags, nreg, nirq = P.DEVICE_INFO.unpack_from(reply.body, 0)
        return DeviceInfo(flags, nreg, nirq)

    def region_info(self, index: int, argsz: int = P.REGION_INFO.size) -> tuple[P.RegionInfoReply, int | None]:
        """GET_REGION_INFO with QEMU's retry when the reply needs a larger argsz.

        Returns:
            the decoded info and the region's mmap fd (owned by the caller), if one came.
        """
        while True:
            payload = P.REGION_INFO.pack(argsz, 0, index, 0, 0, 0)
            reply = self.request(P.Command.DEVICE_GET_REGION_INFO, payload)
            assert reply is not None
            info = P.parse_region_info(reply.body)
            if len(reply.fds) > 1:
                close_fds(reply.fds)
                raise ProtocolError(errno.EPROTO, "more than one fd in a GET_REGION_INFO reply")
            if len(reply.body) > argsz:
                close_fds(reply.fds)
                raise ProtocolError(errno.EPROTO, "GET_REGION_INFO reply larger than argsz")
            if info.argsz > argsz:
                close_fds(reply.fds)
                argsz = info.argsz
                continue
            return info, (reply.fds[0] if reply.fds else None)

    def irq_info(self, index: int) -> IrqInfoReply:
        reply = self.request(P.Command.DEVICE_GET_IRQ_INFO, P.IRQ_INFO.pack(P.IRQ_INFO.size, 0, index, 0))
        assert reply is not None
        _argsz, flags, idx, count = P.IRQ_INFO.unpack_from(reply.body, 0)
        return IrqInfoReply(flags, idx, count)

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 0, fds: Sequence[int] = (),
                 data: bytes = b"") -> None:
        payload = P.SET_IRQS.pack(P.SET_IRQS.size + len(data), flags, index, start, count) + data
        self.request(P.Command.DEVICE_SET_IRQS, payload, fds)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.request(P.Command.REGION_READ, P.REGION_ACCESS.pack(offset, region, count))
        assert reply is not None
        if len(reply.body) != P.REGION_ACCESS.size + count:
            raise ProtocolError(errno.EPROTO, f"REGION_READ reply of {len(reply.body)} bytes for {count}")
        return reply.body[P.REGION_ACCESS.size:]

    def region_write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None:
        """REGION_WRITE; ``posted`` sends it with NO_REPLY (as QEMU does for trapped BAR writes)."""
        self.request(P.Command.REGION_WRITE, [P.REGION_ACCESS.pack(offset, region, len(data)), data],
                     no_reply=posted)

    def reset(self) -> None:
        self.request(P.Command.DEVICE_RESET)

    def handshake(self) -> DeviceInfo:
        """VERSION then DEVICE_GET_INFO, as QEMU starts a realize."""
        self.version()
        return self.get_info()
