"""The vfio-user byte stream: an AF_UNIX SOCK_STREAM socket carrying messages and SCM_RIGHTS fds.

:class:`Transport` is the server's non-blocking end. It reassembles messages from the stream
(header first, then ``size - 16`` body bytes) using ``recvmsg`` for every read, so file
descriptors are never lost and are attributed to the message whose bytes carried them. It
never allocates more than :data:`~vxpu.vfio_server.protocol.MAX_MESSAGE_SIZE` for a body: a
larger size field is reported as an E2BIG message marked *fatal*, and the server closes the
connection after answering it (reading and discarding up to 4 GiB of a stream whose framing
is already a lie would only let the client hold the server); a size field below the header size
is reported as EINVAL (the message is taken to be its header alone).

At most :data:`MAX_PENDING_FDS` fds are held for one message while it is being received, however
many chunks (each with up to :data:`~vxpu.vfio_server.protocol.MAX_RX_FDS` fds) it arrives in:
extras are closed as soon as they arrive, and the message is refused (EINVAL, as for fds the
kernel truncated), so a slow message cannot pin thousands of fds.

Ownership of fds: every fd received belongs to the :class:`Incoming` message it came with. A
handler that keeps an fd removes it with :meth:`Incoming.take_fd`; the dispatcher closes the
rest with :meth:`Incoming.close_fds`. Sending is queued when the socket is full; the caller
stops reading while :attr:`Transport.backlog` exceeds its limit (back-pressure on a client that
does not read its replies).
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.errors import PeerClosed

_ANC_SIZE = socket.CMSG_SPACE(P.MAX_RX_FDS * 4)
_SEND_FLAGS = socket.MSG_NOSIGNAL
#: fds kept for one message being received; more is refused (the protocol allows MAX_MSG_FDS).
MAX_PENDING_FDS = P.MAX_MSG_FDS


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Extract SCM_RIGHTS file descriptors from ``recvmsg`` ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def ancillary_for(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """SCM_RIGHTS ancillary data for ``sendmsg`` (empty list for no fds)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass(slots=True)
class Incoming:
    """One received message.

    Attributes:
        header: the parsed header.
        body: the ``size - 16`` bytes after the header (empty when ``error`` is set).
        fds: fds that arrived with the message; owned by it until taken.
        error: non-zero when the transport already found the message malformed (reply this errno).
        reason: why, for the log.
        fds_truncated: fds were dropped: more than MAX_RX_FDS in one read (by the kernel) or
            more than MAX_PENDING_FDS for the message (closed here).
        fatal: the stream cannot be trusted after this message; answer it, then close.
    """

    header: P.Header
    body: bytes | bytearray | memoryview
    fds: list[int] = field(default_factory=list)
    error: int = 0
    reason: str = ""
    fds_truncated: bool = False
    fatal: bool = False

    def take_fd(self, i: int = 0) -> int:
        """Remove fd number ``i`` from the message and hand its ownership to the caller."""
        return self.fds.pop(i)

    def close_fds(self) -> None:
        close_fds(self.fds)
        self.fds.clear()


class Transport:
    """Non-blocking message transport over a connected AF_UNIX stream socket.

    Args:
        sock: the connected socket (set non-blocking here; the transport owns and closes it).
        max_message_size: the largest message body + header read into memory.
    """

    def __init__(self, sock: socket.socket, max_message_size: int = P.MAX_MESSAGE_SIZE) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.max_message_size = max_message_size
        self._hbuf = bytearray(P.HEADER_SIZE)
        self._hview = memoryview(self._hbuf)
        self._hgot = 0
        self._cur: P.Header | None = None
        self._body: bytearray | None = None
        self._bgot = 0
        self._fds: list[int] = []
        self._ctrunc = False
        self._outq: deque[tuple[memoryview, list[int]]] = deque()
        self.backlog = 0
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # --- receiving -----------------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> int | None:
        """One ``recvmsg_into``; returns bytes read, None when it would block.

        Raises:
            PeerClosed: on EOF or a reset connection.
        """
        try:
            n, anc, flags, _ = self.sock.recvmsg_into([view], _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise PeerClosed(f"connection broke: {exc}") from None
        if anc:
            fds = fds_from_ancillary(anc)
            room = MAX_PENDING_FDS - len(self._fds)
            if len(fds) > room:
                close_fds(fds[max(room, 0):])
                fds = fds[:max(room, 0)]
                self._ctrunc = True
            self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self._ctrunc = True
        if n == 0:
            raise PeerClosed()
        return n

    def _finish(self, header: P.Header, body: bytes | bytearray, error: int = 0, reason: str = "") -> Incoming:
        msg = Incoming(header, body, self._fds, error, reason, self._ctrunc)
        self._fds = []
        self._ctrunc = False
        return msg

    def receive(self) -> Incoming | None:
        """Read until one whole message is available; None when the socket has no more data now.

        Raises:
            PeerClosed: the peer closed the connection (a partial message is dropped, its fds closed).
        """
        while True:
            if self._body is None:
                n = self._recv_into(self._hview[self._hgot:])
                if n is None:
                    return None
                self._hgot += n
                if self._hgot < P.HEADER_SIZE:
                    continue
                self._hgot = 0
                msg = self._start_body(P.parse_header(self._hbuf))
                if msg is not None:
                    return msg
                continue
            n = self._recv_into(memoryview(self._body)[self._bgot:])
            if n is None:
                return None
            self._bgot += n
            if self._bgot == len(self._body):
                body, self._body = self._body, None
                assert self._cur is not None
                return self._finish(self._cur, body)

    def _start_body(self, hdr: P.Header) -> Incoming | None:
        """Decide what follows a complete header; returns a message when it is already complete."""
        if hdr.size < P.HEADER_SIZE:
            return self._finish(hdr, b"", errno.EINVAL, f"size field {hdr.size} is smaller than the header")
        if hdr.size > self.max_message_size:
            msg = self._finish(hdr, b"", errno.E2BIG, f"size field {hdr.size} exceeds the limit "
                               f"{self.max_message_size}; the connection is closed")
            msg.fatal = True
            return msg
        if hdr.size == P.HEADER_SIZE:
            return self._finish(hdr, b"")
        self._cur = hdr
        self._body = bytearray(hdr.size - P.HEADER_SIZE)
        self._bgot = 0
        return None

    # --- sending -------------------------------------------------------------------------------
    def send(self, parts: Sequence[bytes | bytearray | memoryview], fds: Sequence[int] = ()) -> None:
        """Send one message (its parts are concatenated on the wire), with ``fds`` attached.

        The fds stay owned by the caller; they must stay open until the message is sent
        (the device's region fds do). Queues what the socket does not take now.

        Raises:
            PeerClosed: the peer is gone.
        """
        if self.closed:
            raise PeerClosed("send on a closed transport")
        if self._outq:
            self._queue(b"".join(parts), list(fds))
            return
        total = sum(len(p) for p in parts)
        sent = self._sendmsg(parts, fds)
        if sent < total:
            rest = memoryview(b"".join(parts))[sent:]
            self._queue(rest, list(fds) if sent == 0 else [])

    def _queue(self, data: bytes | memoryview, fds: list[int]) -> None:
        view = memoryview(data)
        self._outq.append((view, fds))
        self.backlog += len(view)

    def _sendmsg(self, parts: Sequence[bytes | bytearray | memoryview], fds: Sequence[int]) -> int:
        try:
            return self.sock.sendmsg(parts, ancillary_for(fds), _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerClosed(f"send failed: {exc}") from None

    def flush(self) -> bool:
        """Send queued data; returns True when the queue is empty.

        Raises:
            PeerClosed: the peer is gone.
        """
        while self._outq:
            view, fds = self._outq[0]
            sent = self._sendmsg([view], fds)
            if sent == 0:
                return False
            self.backlog -= sent
            if sent < len(view):
                self._outq[0] = (view[sent:], [])
                return False
            self._outq.popleft()
        return True

    @property
    def wants_write(self) -> bool:
        return bool(self._outq)

    def close(self) -> None:
        """Close the socket and every fd of a partially received message."""
        if self.closed:
            return
        self.closed = True
        close_fds(self._fds)
        self._fds = []
        self._outq.clear()
        self.backlog = 0
        try:
            self.sock.close()
        except OSError:
            pass
