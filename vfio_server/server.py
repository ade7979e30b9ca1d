"""The vfio-user server: a listening socket, one client connection at a time, and dispatch.

:class:`VfioUserServer` serves one device model (a :class:`~vxpu.vfio_server.device.VfioDevice`)
on one AF_UNIX socket. It runs a single-threaded selector loop (the device model runs on it
too, so a device never needs locks): accept a client, read its messages, validate each
header and payload, call the device, reply. Device state survives a disconnect; the
connection's DMA maps and interrupt eventfds do not. While a client is connected further
clients wait in the listen backlog (QEMU connects once per device instance; a hot re-plug
connects again after the old socket closed). A client that sends no VERSION within
:data:`HANDSHAKE_TIMEOUT` is dropped, so a stuck probe cannot block the next QEMU.

Per message: the transport already bounded its size; :meth:`Connection.handle` checks the
type bits (client replies go to the pending DMA_READ/DMA_WRITE table), the fd count, that
VERSION came first, then runs the command's handler, which parses (sizes, argsz, indexes,
overflow-safe ranges), acts, and returns the reply. A
:class:`~vxpu.vfio_server.errors.ProtocolError` becomes a header-only ERROR reply with its
errno; any other exception from a device is a bug, logged with its traceback at DEBUG, and
answered with EIO. Messages flagged NO_REPLY are never answered, not even with an error.
Unmatched replies from the client are logged and dropped. Every fd received and not kept
is closed.

Per-connection resource limits (named constants, listed in docs/device-abi.md, "Server limits
per connection"): message size (``protocol.MAX_MESSAGE_SIZE``; a larger size field is answered
E2BIG and the connection closed), fds held by one message (``transport.MAX_PENDING_FDS``), DMA
maps (``protocol.MAX_DMA_MAPS``) and their address space (``dma.MAX_DMA_MAPPED_BYTES``), unsent
reply bytes (:data:`BACKLOG_LIMIT`) and outstanding DMA messages (``dma.MAX_PENDING_DMA``). An
allocation failure (``MemoryError``) while serving a client drops that client with one log
line; the server keeps listening for the next.

Use :meth:`VfioUserServer.serve_forever` in a process of its own (``vxpu serve``), or
:meth:`VfioUserServer.start` / :meth:`VfioUserServer.stop` (or ``with server:``) to run it
in a background thread, as the tests do.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.device import NUM_IRQS, NUM_REGIONS, RegionFlags, VfioDevice
from vxpu.vfio_server.dma import MAX_DMA_MAPPED_BYTES, DmaSpace
from vxpu.vfio_server.errors import DmaError, PeerClosed, ProtocolError
from vxpu.vfio_server.irq import IrqTable
from vxpu.vfio_server.transport import Incoming, Transport

from vxpu.errors import ConfigError
from vxpu.log import LogBudget

log = logging.getLogger(__name__)

BACKLOG_LIMIT = 8 << 20        # stop reading requests while this many reply bytes are unsent
BATCH_LIMIT = 64               # messages handled per readiness event before polling others
_SUN_PATH_MAX = 108            # sizeof(sockaddr_un.sun_path), NUL included
HANDSHAKE_TIMEOUT = 10.0       # seconds a new client has to send VERSION (QEMU sends it at once)
ACCEPT_BACKOFF = 0.1           # seconds to wait after a failed accept (fd exhaustion)
WARN_BUDGET = 64               # hostile-input warnings (all connections together) before they go to DEBUG
WARN_REFILL_S = 60.0           # the warning budget regains one warning per this many seconds

_READ = int(RegionFlags.READ)     # plain ints: IntFlag arithmetic is slow on the hot path
_WRITE = int(RegionFlags.WRITE)
Reply = tuple[list[Any], list[int]]
_EMPTY: Reply = ([], [])
DmaCallback = Callable[[bytes | None, ProtocolError | None], None]


def _einval(what: str) -> ProtocolError:
    return ProtocolError(errno.EINVAL, what)


class Connection:
    """One connected client: its transport, DMA map table, eventfds and pending DMA requests.

    It is also the :class:`~vxpu.vfio_server.device.DeviceContext` handed to the device
    (``dma``, ``log``, ``raise_irq``) and the DMA message channel of its DmaSpace.
    """

    def __init__(self, server: VfioUserServer, sock: socket.socket, number: int) -> None:
        self.server = server
        self.device = server.device
        self.number = number
        self.connected_at = time.monotonic()
        self.log = server.conn_log
        self.transport = Transport(sock)
        self.dma = DmaSpace(logger=self.log, require_sealed=server.require_sealed_ram,
                            max_mapped_bytes=server.max_dma_bytes)
        self.irqs = IrqTable(self.device, self.log)
        self.irqs.on_resample_change = server.follow_resample
        self.caps = P.ClientCaps()
        self.max_chunk = P.MAX_DATA_XFER_SIZE
        self.negotiated = False
        self.attached = False
        self._next_id = 0
        self._pending: dict[int, tuple[int, int, int, DmaCallback]] = {}
        self._regions = [(0, 0)] * NUM_REGIONS   # (size, flags), filled at VERSION
        self._handlers: dict[int, Callable[[Incoming], Reply]] = {
            P.Command.VERSION: self._version,
            P.Command.DMA_MAP: self._dma_map,
            P.Command.DMA_UNMAP: self._dma_unmap,
            P.Command.DEVICE_GET_INFO: self._get_info,
            P.Command.DEVICE_GET_REGION_INFO: self._region_info,
            P.Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            P.Command.DEVICE_SET_IRQS: self._set_irqs,
            P.Command.REGION_READ: self._region_read,
            P.Command.REGION_WRITE: self._region_write,
            P.Command.REGION_WRITE_MULTI: self._write_multi,
            P.Command.DEVICE_RESET: self._reset,
            P.Command.DEVICE_FEATURE: self._feature,
        }

    # --- DeviceContext ---------------------------------------------------------------------------
    def raise_irq(self, vector: int = 0) -> bool:
        """Signal ``vector`` on MSI-X, MSI or INTx (whichever the guest enabled, in that order)."""
        return self.irqs.raise_irq(vector)

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the serve loop (for backends that complete work on other threads)."""
        self.server.call_soon_threadsafe(fn)

    # --- dispatch ---------------------------------------------------------------------------------
    def handle(self, msg: Incoming) -> None:
        """Handle one message completely; never raises except PeerClosed (also after answering
        a message whose framing makes the rest of the stream untrustworthy) and MemoryError."""
        hdr = msg.header
        if msg.fatal:
            try:
                self._refuse(hdr, ProtocolError(msg.error, msg.reason))
            finally:
                msg.close_fds()
            raise PeerClosed(f"framing error: {msg.reason}")
        try:
            if hdr.type == P.TYPE_REPLY:
                self._on_reply(msg)
                return
            reply = self._dispatch(msg)
            if not hdr.no_reply:
                parts, fds = reply
                size = P.HEADER_SIZE + sum(len(p) for p in parts)
                self.transport.send([P.HEADER.pack(hdr.id, hdr.command, size, P.TYPE_REPLY, 0), *parts], fds)
        except (PeerClosed, MemoryError):
            raise
        except ProtocolError as exc:
            self._refuse(hdr, exc)
        except Exception as exc:  # noqa: BLE001 -- a device bug must never kill the server
            self._warn("conn %d: %s failed: %s: %s", self.number, hdr.command_name(), type(exc).__name__, exc,
                       level=logging.ERROR, exc_info=self.log.isEnabledFor(logging.DEBUG))
            self._refuse(hdr, None)
        finally:
            msg.close_fds()

    def _dispatch(self, msg: Incoming) -> Reply:
        hdr = msg.header
        if hdr.type != P.TYPE_COMMAND:
            raise _einval(f"message type {hdr.type} is neither command nor reply")
        if msg.error:
            raise ProtocolError(msg.error, msg.reason)
        if msg.fds_truncated or len(msg.fds) > P.MAX_MSG_FDS:
            raise _einval(f"too many fds on one message (limit {P.MAX_MSG_FDS})")
        handler = self._handlers.get(hdr.command)
        if handler is None:
            raise ProtocolError(errno.ENOTSUP, f"unsupported command {hdr.command_name()}")
        if not self.negotiated and hdr.command != P.Command.VERSION:
            raise _einval(f"{hdr.command_name()} before VERSION")
        return handler(msg)

    def _refuse(self, hdr: P.Header, exc: ProtocolError | None) -> None:
        err = exc.errno if exc is not None else errno.EIO
        if exc is not None:
            self._warn("conn %d: refused %s id=%d: %s%s", self.number, hdr.command_name(), hdr.id, exc,
                       " (NO_REPLY: not answered)" if hdr.no_reply else "")
        if not hdr.no_reply and hdr.type != P.TYPE_REPLY:
            self.transport.send([P.error_header(hdr, err)])

    def _warn(self, fmt: str, *args: Any, level: int = logging.WARNING, exc_info: bool = False) -> None:
        """Log hostile input (or a device failure it caused) at ``level`` while the server's
        :class:`~vxpu.log.LogBudget` lasts; then at DEBUG, so a client cannot flood the log (not even by
        reconnecting)."""
        self.server.warn_budget.log(self.log, level, fmt, *args, exc_info=exc_info)

    @staticmethod
    def _no_fds(msg: Incoming) -> None:
        if msg.fds:
            raise _einval(f"{msg.header.command_name()} takes no fds ({len(msg.fds)} sent)")

    # --- VERSION and device info ---------------------------------------------------------------------
    def _version(self, msg: Incoming) -> Reply:
        self._no_fds(msg)
        if self.negotiated:
            raise _einval("VERSION sent twice")
        major, minor, caps = P.parse_version(msg.body)
        if major != P.VERSION_MAJOR:
            raise ProtocolError(errno.ENOTSUP, f"client protocol {major}.{minor}; this server speaks 0.x")
        self.caps = caps
        self.max_chunk = min(caps.max_data_xfer_size, P.MAX_DATA_XFER_SIZE)
        self._regions = [self._region_limits(i) for i in range(NUM_REGIONS)]
        self.dma.channel = self
        self.device.attach(self)          # a failure here is EIO and leaves us un-negotiated
        self.attached = True
        self.negotiated = True
        self.log.info("conn %d: client speaks vfio-user %d.%d", self.number, major, minor)
        return [P.build_version_payload(msg.header.size)], []

    def _region_limits(self, index: int) -> tuple[int, int]:
        info = self.device.region_info(index)
        return (info.size, int(info.flags)) if info.size > 0 else (0, 0)

    def _get_info(self, msg: Incoming) -> Reply:
        self._no_fds(msg)
        P.need(msg.body, P.DEVICE_INFO.size, "DEVICE_GET_INFO")
        argsz = P.DEVICE_INFO.unpack_from(msg.body, 0)[0]
        P.check_argsz(argsz, P.DEVICE_INFO.size, "DEVICE_GET_INFO")
        flags = P.DEVICE_FLAGS_PCI | (P.DEVICE_FLAGS_RESET if self.device.reset_supported else 0)
        return [P.DEVICE_INFO.pack(P.DEVICE_INFO.size, flags, NUM_REGIONS, NUM_IRQS)], []

    def _region_info(self, msg: Incoming) -> Reply:
        self._no_fds(msg)
        P.need(msg.body, P.REGION_INFO.size, "GET_REGION_INFO")
        argsz, _flags, index = P.REGION_INFO.unpack_from(msg.body, 0)[:3]
        P.check_argsz(argsz, P.REGION_INFO.size, "GET_REGION_INFO")
        if index >= NUM_REGIONS:
            raise _einval(f"GET_REGION_INFO: region {index} >= {NUM_REGIONS}")
        info = self.device.region_info(index)
        flags = int(info.flags) & ~int(RegionFlags.MMAP) if info.size else 0
        fds: list[int] = []
        sparse = None
        if info.size and info.mmap_fd is not None:
            flags |= int(RegionFlags.MMAP)
            sparse = [(a.offset, a.size) for a in info.sparse] or [(0, info.size)]
            fds = [info.mmap_fd]
        data = P.build_region_info(index, flags, info.size, info.mmap_offset if fds else 0, sparse)
        return [data[:argsz]], fds

    def _irq_info(self, msg: Incoming) -> Reply:
        self._no_fds(msg)
        P.need(msg.body, P.IRQ_INFO.size, "GET_IRQ_INFO")
        argsz, _flags, index, _count = P.IRQ_INFO.unpack_from(msg.body, 0)
        P.check_argsz(argsz, P.IRQ_INFO.size, "GET_IRQ_INFO")
        if index >= NUM_IRQS:
            raise _einval(f"GET_IRQ_INFO: irq index {index} >= {NUM_IRQS}")
        info = self.device.irq_info(index)
        return [P.IRQ_INFO.pack(P.IRQ_INFO.size, info.flags, index, info.count)], []

    def _set_irqs(self, msg: Incoming) -> Reply:
        body = msg.body
        P.need(body, P.SET_IRQS.size, "SET_IRQS")
        argsz, flags, index, start, count = P.SET_IRQS.unpack_from(body, 0)
        P.check_argsz(argsz, P.SET_IRQS.size, "SET_IRQS")
        if argsz > len(body):
            raise _einval(f"SET_IRQS: argsz {argsz} > payload {len(body)}")
        data = b""
        if flags & P.IRQ_DATA_BOOL:
            end = P.SET_IRQS.size + count
            if argsz < end:
                raise _einval(f"SET_IRQS: {count} bools need argsz {end}, got {argsz}")
            data = bytes(body[P.SET_IRQS.size:end])
        self.irqs.set_irqs(flags, index, start, count, data, msg.fds)
        return _EMPTY

    def _reset(self, msg: Incoming) -> Reply:
        self._no_fds(msg)
        if not self.device.reset_supported:
            raise ProtocolError(errno.ENOTSUP, "DEVICE_RESET: the device has no reset")
        self.device.reset()
        return _EMPTY

    def _feature(self, msg: Incoming) -> Reply:
        raise ProtocolError(errno.ENOTTY, "DEVICE_FEATURE: no features (migration, dirty logging) supported")

    # --- DMA map table ----------------------------------------------------------------------------
    def _dma_map(self, msg: Incoming) -> Reply:
        P.need(msg.body, P.DMA_MAP.size, "DMA_MAP")
        argsz, flags, offset, addr, size = P.DMA_MAP.unpack_from(msg.body, 0)
        P.check_argsz(argsz, P.DMA_MAP.size, "DMA_MAP")
        if len(msg.fds) > 1:
            raise _einval(f"DMA_MAP: {len(msg.fds)} fds (at most one)")
        region = self.dma.map(addr, size, offset, flags, msg.fds[0] if msg.fds else None)
        self.log.debug("conn %d: DMA_MAP [%#x, +%#x) flags=%#x %s", self.number, addr, size, flags,
                       "mmap" if region.view is not None else "message-only")
        return _EMPTY

    def _dma_unmap(self, msg: Incoming) -> Reply:
        self._no_fds(msg)
        P.need(msg.body, P.DMA_UNMAP.size, "DMA_UNMAP")
        argsz, flags, addr, size = P.DMA_UNMAP.unpack_from(msg.body, 0)
        P.check_argsz(argsz, P.DMA_UNMAP.size, "DMA_UNMAP")
        self.dma.unmap(addr, size, flags)
        return [P.DMA_UNMAP.pack(P.DMA_UNMAP.size, flags, addr, size)], []

    # --- region access ---------------------------------------------------------------------------
    def _check_access(self, region: int, offset: int, count: int, need: int) -> None:
        if region >= NUM_REGIONS:
            raise _einval(f"region {region} >= {NUM_REGIONS}")
        if count > P.MAX_DATA_XFER_SIZE:
            raise ProtocolError(errno.E2BIG, f"access of {count} bytes > max_data_xfer_size")
        size, flags = self._regions[region]
        if offset > size or count > size - offset:
            raise _einval(f"region {region} access [{offset:#x}, +{count:#x}) past its size {size:#x}")
        if count and not flags & need:
            raise _einval(f"region {region} is not {'readable' if need == _READ else 'writable'}")

    def _region_read(self, msg: Incoming) -> Reply:
        self._no_fds(msg)
        body = msg.body
        if len(body) != P.REGION_ACCESS.size:
            raise _einval(f"REGION_READ: payload of {len(body)} bytes, expected {P.REGION_ACCESS.size}")
        offset, region, count = P.REGION_ACCESS.unpack_from(body, 0)
        self._check_access(region, offset, count, _READ)
        data = self.device.region_read(region, offset, count)
        if len(data) != count:
            raise ProtocolError(errno.EIO, f"device returned {len(data)} bytes for a {count}-byte read")
        return [body, data], []

    def _region_write(self, msg: Incoming) -> Reply:
        self._no_fds(msg)
        body = msg.body
        P.need(body, P.REGION_ACCESS.size, "REGION_WRITE")
        offset, region, count = P.REGION_ACCESS.unpack_from(body, 0)
        if len(body) != P.REGION_ACCESS.size + count:
            raise _einval(f"REGION_WRITE: count {count} but {len(body) - P.REGION_ACCESS.size} data bytes")
        self._check_access(region, offset, count, _WRITE)
        self.device.region_write(region, offset, bytes(memoryview(body)[P.REGION_ACCESS.size:]))
        return [memoryview(body)[:P.REGION_ACCESS.size]], []

    def _write_multi(self, msg: Incoming) -> Reply:
        self._no_fds(msg)
        body = msg.body
        P.need(body, P.WRITE_MULTI_HDR.size, "REGION_WRITE_MULTI")
        (n,) = P.WRITE_MULTI_HDR.unpack_from(body, 0)
        if n > P.MAX_WRITE_MULTI or len(body) != P.WRITE_MULTI_HDR.size + n * P.WRITE_MULTI_ENTRY.size:
            raise _einval(f"REGION_WRITE_MULTI: {n} entries in {len(body)} bytes (limit {P.MAX_WRITE_MULTI})")
        writes = [P.WRITE_MULTI_ENTRY.unpack_from(body, P.WRITE_MULTI_HDR.size + i * P.WRITE_MULTI_ENTRY.size)
                  for i in range(n)]
        for offset, region, count, _data in writes:
            if count > 8:
                raise _einval(f"REGION_WRITE_MULTI: entry of {count} bytes (at most 8)")
            self._check_access(region, offset, count, _WRITE)
        for offset, region, count, data in writes:
            self.device.region_write(region, offset, data[:count])
        return _EMPTY

    # --- server -> client DMA --------------------------------------------------------------------
    def dma_pending(self) -> int:
        return len(self._pending)

    def dma_request(self, command: int, addr: int, count: int, data: bytes | memoryview | None,
                    done: DmaCallback) -> None:
        """Send DMA_READ/DMA_WRITE without waiting; ``done`` runs when the reply arrives.

        Raises:
            DmaError: ENODEV when the client is gone; E2BIG for a chunk above the client's limit.
        """
        if self.transport.closed:
            raise DmaError("client disconnected", errno.ENODEV)
        if count > self.max_chunk:
            raise DmaError(f"DMA message of {count} bytes > client's max_data_xfer_size", errno.E2BIG)
        if self.transport.backlog >= BACKLOG_LIMIT:
            raise DmaError("the client is not reading; DMA message refused", errno.EAGAIN)
        msg_id = self._next_id
        while msg_id in self._pending:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_id = (msg_id + 1) & 0xFFFF
        payload = P.DMA_ACCESS.pack(addr, count)
        parts: list[Any] = [payload] if data is None else [payload, data]
        size = P.HEADER_SIZE + P.DMA_ACCESS.size + (0 if data is None else len(data))
        self._pending[msg_id] = (command, addr, count, done)
        try:
            self.transport.send([P.pack_header(msg_id, command, size, P.TYPE_COMMAND), *parts])
        except PeerClosed:
            del self._pending[msg_id]
            raise DmaError("client disconnected", errno.ENODEV) from None

    def _on_reply(self, msg: Incoming) -> None:
        hdr = msg.header
        entry = self._pending.get(hdr.id)
        if entry is None or entry[0] != hdr.command:
            self._warn("conn %d: unexpected reply id=%d %s dropped", self.number, hdr.id, hdr.command_name())
            return
        del self._pending[hdr.id]
        command, addr, count, done = entry
        err: ProtocolError | None = None
        data: bytes | None = None
        if msg.error:
            err = DmaError(f"malformed DMA reply: {msg.reason}", msg.error)
        elif hdr.is_error:
            err = DmaError(f"client refused {hdr.command_name()} at {addr:#x}", hdr.error or errno.EIO)
        elif command == P.Command.DMA_READ:
            body = msg.body
            if len(body) != P.DMA_ACCESS.size + count or P.DMA_ACCESS.unpack_from(body, 0) != (addr, count):
                err = DmaError(f"DMA_READ reply of {len(body)} bytes does not match the request", errno.EINVAL)
            else:
                data = bytes(body[P.DMA_ACCESS.size:])
        if msg.fds:
            self._warn("conn %d: %d fds on a DMA reply closed", self.number, len(msg.fds))
        self._complete(done, data, err)

    def _complete(self, done: DmaCallback, data: bytes | None, err: ProtocolError | None) -> None:
        try:
            done(data, err)
        except Exception:
            self.log.error("conn %d: DMA completion callback failed", self.number,
                           exc_info=self.log.isEnabledFor(logging.DEBUG))

    # --- teardown -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop DMA maps, eventfds and pending DMA; detach the device; close the socket."""
        self.transport.close()
        pending, self._pending = self._pending, {}
        for _cmd, _addr, _count, done in pending.values():
            self._complete(done, None, DmaError("client disconnected", errno.ENODEV))
        self.dma.close()
        self.irqs.close()
        if self.attached:
            self.attached = False
            try:
                self.device.detach()
            except Exception:
                self.log.exception("conn %d: device detach failed", self.number)


class VfioUserServer:
    """Serve ``device`` on the AF_UNIX socket ``socket_path`` (one client at a time).

    Args:
        socket_path: where to listen. A stale socket there (nobody listening) is replaced;
            a live one or a non-socket file is an error. The socket file gets mode 0600.
        device: the device model; its state outlives connections.
        logger: parent logger (default ``vxpu.vfio_server.server``).
        require_sealed_ram: refuse DMA_MAP files that cannot be sealed against shrinking
            (see :class:`~vxpu.vfio_server.dma.DmaSpace`); QEMU's memory-backend-memfd passes.
            On by default: a peer that shrinks an unsealed mapped file would SIGBUS the server.
        max_dma_bytes: address space one client's fd-backed DMA maps may take together.
    """

    def __init__(self, socket_path: str | os.PathLike[str], device: VfioDevice,
                 logger: logging.Logger | None = None, require_sealed_ram: bool = True,
                 max_dma_bytes: int = MAX_DMA_MAPPED_BYTES) -> None:
        self.path = Path(socket_path)
        self.device = device
        self.require_sealed_ram = require_sealed_ram
        self.max_dma_bytes = max_dma_bytes
        self.log = logger or log
        self.conn_log = self.log.getChild("conn")
        self.conn: Connection | None = None
        self.connections_served = 0
        self.warn_budget = LogBudget(WARN_BUDGET, WARN_REFILL_S, "further refused client input is logged at DEBUG")
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_fd = -1
        self._calls: collections.deque[Callable[[], object]] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._signal_fds: tuple[int, int] | None = None
        self._old_wakeup_fd = -1

    # --- lifecycle ----------------------------------------------------------------------------------
    def bind(self) -> None:
        """Create the listening socket (idempotent).

        Raises:
            ConfigError: the path is a live socket, not a socket, or cannot be bound.
        """
        if self._listener is not None:
            return
        _remove_stale_socket(self.path)
        listener = _listen(self.path)
        self._listener = listener
        self._sel = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_fd, selectors.EVENT_READ, "wake")
        self.log.info("listening on %s", self.path)

    def wake_on_signals(self) -> None:
        """Main thread (binds first): any signal wakes the serve loop, so that the Python
        handler for it (a SIGTERM handler calling :meth:`stop`) runs at once.

        CPython runs signal handlers in the main thread only, and the kernel may hand a
        process-directed signal to any thread: to the poller, say, while the main thread sleeps
        in ``select()`` with no timeout, which then never returns. The C-level handler writes
        each signal's number to the pipe registered here (:func:`signal.set_wakeup_fd`), and
        that wakes ``select()``. Undone when the loop ends, when it ran in the main thread.

        Raises:
            ValueError: not called from the main thread.
        """
        self.bind()
        assert self._sel is not None
        if self._signal_fds is not None:
            return
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._old_wakeup_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            raise
        self._signal_fds = (r, w)
        self._sel.register(r, selectors.EVENT_READ, "signal")

    def serve_forever(self) -> None:
        """Run the serve loop in this thread until :meth:`stop`; then close everything."""
        self.bind()
        assert self._sel is not None
        try:
            while not self._stopping:
                for key, mask in self._sel.select(self._handshake_left()):
                    try:
                        self._on_event(key.data, mask)
                    except MemoryError:
                        self._out_of_memory(key.data)
                    if self._stopping:
                        break
                self._check_handshake()
        finally:
            self._shutdown()

    def start(self) -> VfioUserServer:
        """Bind, then run :meth:`serve_forever` in a daemon thread. Returns self."""
        self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name=f"vfio-user:{self.path.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to stop; thread- and signal-safe. Joins the thread of :meth:`start`."""
        self._stopping = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the serve loop as soon as possible (callable from any thread)."""
        self._calls.append(fn)
        self._wake()

    def _wake(self) -> None:
        if self._wake_fd >= 0:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    def _shutdown(self) -> None:
        if self.conn is not None:
            self._drop(self.conn, "server stopping")
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except OSError:
                pass
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
        if self._signal_fds is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._old_wakeup_fd)       # (elsewhere it cannot: the pipe stays open)
            for fd in self._signal_fds:
                os.close(fd)
            self._signal_fds = None
        self.log.info("stopped")

    # --- events -------------------------------------------------------------------------------------
    def _on_event(self, kind: str, mask: int) -> None:
        if kind == "accept":
            self._accept()
        elif kind == "wake":
            self._run_calls()
        elif kind == "signal":
            self._drain_signal_pipe()
        elif kind == "resample":
            if self.conn is not None:
                self.conn.irqs.on_resample()
        elif self.conn is not None:
            self._service(self.conn, mask)

    def _out_of_memory(self, kind: str) -> None:
        """An allocation failed while serving ``kind``: drop the client (its maps and buffers go
        with it) and keep listening; the server itself never exits on MemoryError."""
        conn = self.conn
        if conn is not None:
            self.log.error("conn %d: out of memory while serving the client; dropped", conn.number)
            self._drop(conn, "out of memory")
        else:
            self.log.error("out of memory while handling %s; no client to drop", kind)

    def _drain_signal_pipe(self) -> None:
        """The signal numbers are not needed: returning to Python runs the handlers."""
        assert self._signal_fds is not None
        try:
            while os.read(self._signal_fds[0], 256):
                pass
        except BlockingIOError:
            pass

    def _run_calls(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                self.log.exception("scheduled call %r failed", fn)

    def _handshake_left(self) -> float | None:
        """Seconds until the connected client must have sent VERSION (None: no deadline)."""
        conn = self.conn
        if conn is None or conn.negotiated:
            return None
        return max(0.0, conn.connected_at + HANDSHAKE_TIMEOUT - time.monotonic())

    def _check_handshake(self) -> None:
        conn = self.conn
        if conn is not None and not conn.negotiated and self._handshake_left() == 0.0:
            self.log.warning("conn %d: no VERSION within %.0f s; dropped so the next client can connect",
                             conn.number, HANDSHAKE_TIMEOUT)
            self._drop(conn, "handshake timeout")

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:      # EMFILE/ENFILE/ENOBUFS: back off instead of spinning
            self.log.error("accept failed: %s; retrying in %.1f s", exc, ACCEPT_BACKOFF)
            time.sleep(ACCEPT_BACKOFF)
            return
        self.connections_served += 1
        self.conn = Connection(self, sock, self.connections_served)
        self._sel.unregister(self._listener)          # one client at a time; others wait
        self._sel.register(self.conn.transport.sock, selectors.EVENT_READ, "conn")
        self.log.info("client connected", extra={"conn": self.connections_served})

    def _service(self, conn: Connection, mask: int) -> None:
        transport = conn.transport
        try:
            if mask & selectors.EVENT_WRITE:
                transport.flush()
            if mask & selectors.EVENT_READ:
                for _ in range(BATCH_LIMIT):
                    if transport.backlog >= BACKLOG_LIMIT:
                        break
                    msg = transport.receive()
                    if msg is None:
                        break
                    conn.handle(msg)
                    if transport.closed:
                        break
        except PeerClosed as exc:
            self._drop(conn, str(exc))
            return
        self._update_interest(conn)

    def _update_interest(self, conn: Connection) -> None:
        if conn.transport.closed or self._sel is None:
            return
        events = selectors.EVENT_WRITE if conn.transport.wants_write else 0
        if conn.transport.backlog < BACKLOG_LIMIT:
            events |= selectors.EVENT_READ
        key = self._sel.get_key(conn.transport.sock)
        if events and key.events != events:
            self._sel.modify(conn.transport.sock, events, "conn")

    def follow_resample(self, old: int | None, new: int | None) -> None:
        """Poll the INTx resample eventfd that SET_IRQS installed (called before it changes)."""
        if self._sel is None:
            return
        if old is not None:
            self._sel.unregister(old)
        if new is not None:
            self._sel.register(new, selectors.EVENT_READ, "resample")

    def _drop(self, conn: Connection, why: str) -> None:
        if self._sel is not None:
            try:
                self._sel.unregister(conn.transport.sock)
            except (KeyError, ValueError):
                pass
        conn.close()
        self.conn = None
        self.log.info("client disconnected: %s", why, extra={"conn": conn.number})
        if self._sel is not None and self._listener is not None and not self._stopping:
            self._sel.register(self._listener, selectors.EVENT_READ, "accept")


def _listen(path: Path) -> socket.socket:
    """A non-blocking listening socket at ``path`` that appears there already listening and
    with mode 0600: bound in a private directory beside ``path``, then renamed into place.

    Raises:
        ConfigError: the directory is missing or not writable, or the path is too long.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    tmpdir = None
    try:
        tmpdir = tempfile.mkdtemp(prefix=".vxpu-", dir=path.parent)
        tmp = os.path.join(tmpdir, "s")
        direct = len(os.fsencode(tmp)) >= _SUN_PATH_MAX
        where = str(path) if direct else tmp
        listener.bind(where)
        os.chmod(where, 0o600)
        listener.listen(4)
        if not direct:
            os.rename(tmp, path)
    except OSError as exc:
        listener.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}; check that the directory "
                          f"exists and is writable and the path is shorter than {_SUN_PATH_MAX} bytes") from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    listener.setblocking(False)
    return listener


def _remove_stale_socket(path: Path) -> None:
    """Unlink ``path`` if it is a socket nobody listens on.

    Raises:
        ConfigError: ``path`` exists and is not a socket, or a server is listening there.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; choose another --socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    except OSError as exc:
        raise ConfigError(f"cannot probe {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"another server is listening on {path}; stop it or choose another --socket path")
