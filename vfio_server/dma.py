"""The guest's DMA address space as seen by the server: a table of DMA_MAP regions.

Each DMA_MAP that brings an fd is ``mmap``-ed (``MAP_SHARED``, so the server and the guest see
the same pages) and indexed by its guest-physical range ``[addr, addr + size)``. A map without
an fd is remembered as *message-only*: its bytes can only be reached with DMA_READ/DMA_WRITE
messages to the client (:meth:`DmaSpace.read_async`, :meth:`DmaSpace.write_async`), which never
block the serve loop.

Device models translate guest-physical ranges with :meth:`DmaSpace.translate` (one range, one
``memoryview``) or :meth:`DmaSpace.translate_sg` (a scatter-gather list, coalescing ranges that
are contiguous inside one mapping). A backend that registers host memory with its runtime
(``cuMemHostRegister`` ...) hooks :meth:`DmaSpace.add_listener`: ``on_map`` runs after a region
is mapped, ``on_unmap`` before it is unmapped.

Rules (checked before anything is mapped; errnos follow the vfio-user spec and libvfio-user):
unknown flags, zero size, unaligned address or size, or a range that wraps 2^64 → EINVAL; an
fd that is not a regular file or is smaller than ``offset + size`` (a later access would
SIGBUS; checked after the file is sealed against shrinking, where it can be) → EINVAL; a range overlapping an existing map → EEXIST, except an identical re-map
(same range, offset, flags and file), which is accepted as libvfio-user does; with
``require_sealed``, a file that cannot be sealed against shrinking → EINVAL; more than
:data:`~vxpu.vfio_server.protocol.MAX_DMA_MAPS` maps → ENOSPC; fd-backed maps totalling more
than :data:`MAX_DMA_MAPPED_BYTES` of address space → ENOSPC (a sparse 64 TiB memfd costs no
RAM, but a few such maps exhaust the server's address space, and the next allocation anywhere
in the server fails). Unmaps must match a map exactly (else ENOENT).
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.errors import DmaError, ProtocolError

log = logging.getLogger(__name__)

MAX_PENDING_DMA = 256          # outstanding DMA_READ/DMA_WRITE messages per client
#: Address space the fd-backed maps of one client may take together (4 TiB: far above any guest
#: RAM here, 1/32 of the 128 TiB user address space of x86-64).
MAX_DMA_MAPPED_BYTES = 1 << 42
MAX_SG_ENTRIES = 1 << 16       # scatter-gather list entries accepted by translate_sg

ReadDone = Callable[[bytes | None, DmaError | None], None]
WriteDone = Callable[[DmaError | None], None]
MapListener = Callable[["DmaRegion"], None]


@dataclass(eq=False)
class DmaRegion:
    """One DMA_MAP: guest-physical ``[addr, addr + size)``; ``view`` is None when message-only."""

    addr: int
    size: int
    offset: int
    prot: int
    view: memoryview | None = None
    file_id: tuple[int, int] | None = None
    sealed: bool = False
    _mm: mmap.mmap | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.addr + self.size

    @property
    def writable(self) -> bool:
        return bool(self.prot & P.DMA_WRITE_FLAG)


class DmaChannel(Protocol):
    """How a DmaSpace sends DMA_READ/DMA_WRITE to the client (the server connection)."""

    max_chunk: int

    def dma_request(self, command: int, addr: int, count: int, data: bytes | memoryview | None,
                    done: Callable[[bytes | None, ProtocolError | None], None]) -> None: ...

    def dma_pending(self) -> int: ...


class DmaSpace:
    """The DMA map table of one client connection.

    Args:
        max_maps: cap on the number of maps (against rogue clients).
        logger: where to log (the connection's logger).
        require_sealed: refuse fd-backed maps whose file cannot be sealed against shrinking
            (a peer that shrinks such a file makes the next access SIGBUS the server).
        max_mapped_bytes: cap on the address space of all fd-backed maps together.

    Attributes:
        mapped_bytes: the address space the fd-backed maps take now.
    """

    def __init__(self, max_maps: int = P.MAX_DMA_MAPS, logger: logging.Logger | None = None,
                 require_sealed: bool = False, max_mapped_bytes: int = MAX_DMA_MAPPED_BYTES) -> None:
        self.max_maps = max_maps
        self.max_mapped_bytes = max_mapped_bytes
        self.mapped_bytes = 0
        self.require_sealed = require_sealed
        self.log = logger or log
        self._starts: list[int] = []
        self._regions: list[DmaRegion] = []
        self._last: DmaRegion | None = None
        self._listeners: list[tuple[MapListener | None, MapListener | None]] = []
        self.channel: DmaChannel | None = None
        self.closed = False

    # --- table -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._regions)

    def regions(self) -> list[DmaRegion]:
        """A snapshot of the current maps, sorted by address."""
        return list(self._regions)

    def add_listener(self, on_map: MapListener | None, on_unmap: MapListener | None) -> None:
        """Call ``on_map(region)`` after every new map (and now, for maps that already exist)
        and ``on_unmap(region)`` before every unmap. Listener exceptions are logged, not raised."""
        self._listeners.append((on_map, on_unmap))
        if on_map is not None:
            for region in list(self._regions):
                self._notify(on_map, region)

    def remove_listener(self, on_map: MapListener | None, on_unmap: MapListener | None) -> None:
        self._listeners.remove((on_map, on_unmap))

    def _notify(self, fn: MapListener, region: DmaRegion) -> None:
        try:
            fn(region)
        except Exception:   # a listener bug must not break the map table
            self.log.error("DMA listener %r failed for [%#x, +%#x)", fn, region.addr, region.size,
                           exc_info=self.log.isEnabledFor(logging.DEBUG))

    def map(self, addr: int, size: int, offset: int, flags: int, fd: int | None) -> DmaRegion:
        """Add a DMA_MAP. ``fd`` stays owned by the caller (the mapping keeps its own reference).

        Raises:
            ProtocolError: EINVAL, EEXIST or ENOSPC as described in the module docstring, or
                the errno of a failed ``mmap``.
        """
        if self.closed:
            raise ProtocolError(errno.ENODEV, "DMA_MAP after the connection closed")
        _check_map_args(addr, size, offset, flags)
        sealed = False
        file_id = None
        if fd is not None:
            # Seal first, then check the size: checked before the seal, a peer could shrink the
            # file in between and leave a "sealed" map that SIGBUSes on first access.
            sealed = shrink_sealed(fd)
            if not sealed and self.require_sealed:
                raise ProtocolError(errno.EINVAL, "DMA_MAP: the file cannot be sealed against shrinking; use "
                                    "memory-backend-memfd with seal=on (QEMU's default) for guest RAM")
            file_id = _file_identity(fd, offset, size)
        i = bisect.bisect_right(self._starts, addr) - 1
        for j in (i, i + 1):
            if 0 <= j < len(self._regions):
                old = self._regions[j]
                if old.addr < addr + size and addr < old.end:
                    if (old.addr, old.size, old.offset, old.prot, old.file_id) == (addr, size, offset, flags,
                                                                                    file_id):
                        return old
                    raise ProtocolError(errno.EEXIST, f"DMA_MAP [{addr:#x}, +{size:#x}) overlaps "
                                        f"[{old.addr:#x}, +{old.size:#x})")
        if len(self._regions) >= self.max_maps:
            raise ProtocolError(errno.ENOSPC, f"DMA_MAP: table full ({self.max_maps} maps)")
        if fd is not None and size > self.max_mapped_bytes - self.mapped_bytes:
            raise ProtocolError(errno.ENOSPC, f"DMA_MAP [{addr:#x}, +{size:#x}): fd-backed maps would take "
                                f"{self.mapped_bytes + size:#x} bytes of address space, more than the "
                                f"limit {self.max_mapped_bytes:#x}")
        region = DmaRegion(addr, size, offset, flags, file_id=file_id)
        if fd is not None:
            _mmap_region(region, fd)
            self.mapped_bytes += size
            region.sealed = sealed
            if not sealed:
                self.log.debug("DMA map [%#x, +%#x): file cannot be sealed against shrinking", addr, size)
        self._starts.insert(i + 1, addr)
        self._regions.insert(i + 1, region)
        for on_map, _ in self._listeners:
            if on_map is not None:
                self._notify(on_map, region)
        return region

    def unmap(self, addr: int, size: int, flags: int = 0) -> int:
        """Remove the map that matches ``[addr, addr + size)`` exactly (or every map with
        ``flags == DMA_UNMAP_ALL`` and ``addr == size == 0``). Returns the number removed.

        Raises:
            ProtocolError: EINVAL for unknown flags (dirty bitmaps are not supported) or a
                malformed unmap-all; ENOENT when no map matches.
        """
        if flags == P.DMA_UNMAP_ALL:
            if addr or size:
                raise ProtocolError(errno.EINVAL, "DMA_UNMAP ALL needs addr == size == 0")
            return self.clear()
        if flags:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP: unsupported flags {flags:#x}")
        i = bisect.bisect_left(self._starts, addr)
        if i == len(self._starts) or self._starts[i] != addr or self._regions[i].size != size:
            raise ProtocolError(errno.ENOENT, f"DMA_UNMAP [{addr:#x}, +{size:#x}) matches no map")
        self._remove(i)
        return 1

    def _remove(self, i: int) -> None:
        region = self._regions[i]
        for _, on_unmap in self._listeners:
            if on_unmap is not None:
                self._notify(on_unmap, region)
        del self._starts[i]
        del self._regions[i]
        if self._last is region:
            self._last = None
        if region.view is not None:
            self.mapped_bytes -= region.size
        _release(region, self.log)

    def clear(self) -> int:
        """Unmap everything (client disconnect or unmap-all). Returns the number removed."""
        n = len(self._regions)
        while self._regions:
            self._remove(len(self._regions) - 1)
        return n

    def close(self) -> None:
        """Unmap everything and refuse further maps and message DMA (connection closed)."""
        self.clear()
        self.closed = True
        self.channel = None

    # --- translation ---------------------------------------------------------------------------
    def find(self, gpa: int) -> DmaRegion | None:
        """The map containing guest-physical address ``gpa``, if any."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            if gpa < region.end:
                return region
        return None

    def _lookup(self, gpa: int, length: int) -> DmaRegion:
        region = self._last
        if region is None or not (region.addr <= gpa and 0 <= length and gpa + length <= region.end):
            if gpa < 0 or length < 0 or gpa + length > P.U64_LIMIT:
                raise DmaError(f"invalid DMA range [{gpa:#x}, +{length:#x})", errno.EINVAL)
            region = self.find(gpa)
            if region is None:
                raise DmaError(f"DMA range [{gpa:#x}, +{length:#x}) is not mapped")
            if gpa + length > region.end:
                raise DmaError(f"DMA range [{gpa:#x}, +{length:#x}) crosses the end of map "
                               f"[{region.addr:#x}, +{region.size:#x})")
            self._last = region
        return region

    def translate(self, gpa: int, length: int, write: bool) -> memoryview:
        """Host memory for guest-physical ``[gpa, gpa + length)``, inside one fd-backed map.

        Raises:
            DmaError: EINVAL for a negative or wrapping range; EFAULT when the range is not
                mapped, crosses a map's end or is message-only; EPERM for a write to a
                read-only map.
        """
        region = self._lookup(gpa, length)
        view = region.view
        if view is None:
            raise DmaError(f"DMA range [{gpa:#x}, +{length:#x}) has no fd; use read_async/write_async")
        if write and not region.prot & P.DMA_WRITE_FLAG:
            raise DmaError(f"DMA write to read-only map at {gpa:#x}", errno.EPERM)
        off = gpa - region.addr
        return view[off:off + length]

    def translate_sg(self, ranges: Iterable[tuple[int, int]], write: bool) -> list[memoryview]:
        """Translate a scatter-gather list; ranges contiguous inside one map are coalesced.

        Raises:
            DmaError: as :meth:`translate`, for the first bad range; E2BIG for more than
                MAX_SG_ENTRIES entries.
        """
        out: list[memoryview] = []
        cur: DmaRegion | None = None
        start = end = 0
        for n, (gpa, length) in enumerate(ranges):
            if n >= MAX_SG_ENTRIES:
                raise DmaError(f"scatter-gather list longer than {MAX_SG_ENTRIES}", errno.E2BIG)
            if length == 0:
                continue
            self.translate(gpa, length, write)          # validates the range and permissions
            region = self._last
            if region is cur and gpa - region.addr == end:   # type: ignore[union-attr]
                end += length
                continue
            if cur is not None:
                out.append(cur.view[start:end])          # type: ignore[index]
            cur, start = region, gpa - region.addr       # type: ignore[union-attr]
            end = start + length
        if cur is not None:
            out.append(cur.view[start:end])              # type: ignore[index]
        return out

    # --- message-based DMA -------------------------------------------------------------------
    def _message_region(self, gpa: int, length: int) -> DmaRegion:
        region = self._lookup(gpa, length)
        if self.channel is None:
            raise DmaError("no client connected for message-based DMA", errno.ENODEV)
        return region

    def read_async(self, gpa: int, length: int, done: ReadDone) -> None:
        """Read guest memory and call ``done(data, None)`` or ``done(None, error)``.

        Fd-backed ranges are copied at once (``done`` runs before this returns). Message-only
        ranges are read with DMA_READ messages of at most the negotiated chunk size; ``done``
        runs on the serve loop when the last reply arrives. Never blocks.

        Raises:
            DmaError: the range is not inside one map, no client is connected, or too many
                DMA messages are outstanding (EAGAIN). When this raises, ``done`` never runs,
                even for chunks that were already sent before a later one was refused.
        """
        region = self._message_region(gpa, length)
        if region.view is not None:
            off = gpa - region.addr
            done(bytes(region.view[off:off + length]), None)
            return
        channel = self.channel
        assert channel is not None
        _reserve(channel, _chunk_count(length, channel.max_chunk))     # before building anything
        chunks = _chunks(gpa, length, channel.max_chunk)
        parts: list[bytes] = [b""] * len(chunks)
        state = {"left": len(chunks), "failed": False}

        def one(i: int) -> Callable[[bytes | None, ProtocolError | None], None]:
            def cb(data: bytes | None, err: ProtocolError | None) -> None:
                if state["failed"]:
                    return
                if err is not None:
                    state["failed"] = True
                    done(None, err if isinstance(err, DmaError) else DmaError(str(err), err.errno))
                    return
                parts[i] = data or b""
                state["left"] -= 1
                if state["left"] == 0:
                    done(b"".join(parts), None)
            return cb

        try:
            for i, (addr, count) in enumerate(chunks):
                channel.dma_request(P.Command.DMA_READ, addr, count, None, one(i))
        except DmaError:
            state["failed"] = True      # we raise: replies to chunks already sent must not call done
            raise

    def write_async(self, gpa: int, data: bytes | memoryview, done: WriteDone) -> None:
        """Write ``data`` to guest memory; ``done(None)`` on success or ``done(error)``.

        Same rules as :meth:`read_async` (direct copy for fd-backed maps, DMA_WRITE messages
        otherwise). ``data`` is copied before this returns.

        Raises:
            DmaError: as :meth:`read_async`, or EPERM for a read-only map.
        """
        length = len(data)
        region = self._message_region(gpa, length)
        if not region.prot & P.DMA_WRITE_FLAG:
            raise DmaError(f"DMA write to read-only map at {gpa:#x}", errno.EPERM)
        if region.view is not None:
            off = gpa - region.addr
            region.view[off:off + length] = data
            done(None)
            return
        channel = self.channel
        assert channel is not None
        _reserve(channel, _chunk_count(length, channel.max_chunk))     # before building anything
        chunks = _chunks(gpa, length, channel.max_chunk)
        blob = bytes(data)
        state = {"left": len(chunks), "failed": False}

        def cb(_data: bytes | None, err: ProtocolError | None) -> None:
            if state["failed"]:
                return
            if err is not None:
                state["failed"] = True
                done(err if isinstance(err, DmaError) else DmaError(str(err), err.errno))
                return
            state["left"] -= 1
            if state["left"] == 0:
                done(None)

        try:
            for addr, count in chunks:
                off = addr - gpa
                channel.dma_request(P.Command.DMA_WRITE, addr, count, blob[off:off + count], cb)
        except DmaError:
            state["failed"] = True      # we raise: replies to chunks already sent must not call done
            raise


def _chunk_count(length: int, chunk: int) -> int:
    """How many messages :func:`_chunks` makes (a zero-length access is one message)."""
    return max(1, -(-length // chunk))


def _chunks(gpa: int, length: int, chunk: int) -> list[tuple[int, int]]:
    if length == 0:
        return [(gpa, 0)]
    return [(gpa + off, min(chunk, length - off)) for off in range(0, length, chunk)]


def _reserve(channel: DmaChannel, n: int) -> None:
    if channel.dma_pending() + n > MAX_PENDING_DMA:
        raise DmaError(f"too many outstanding DMA messages (limit {MAX_PENDING_DMA})", errno.EAGAIN)


def _check_map_args(addr: int, size: int, offset: int, flags: int) -> None:
    if flags & ~P.DMA_MAP_FLAGS or not flags & P.DMA_READ_FLAG:
        raise ProtocolError(errno.EINVAL, f"DMA_MAP: bad flags {flags:#x} (READ needed, WRITE optional)")
    if size == 0 or addr % P.PAGE_SIZE or size % P.PAGE_SIZE:
        raise ProtocolError(errno.EINVAL, f"DMA_MAP [{addr:#x}, +{size:#x}): zero or not page-aligned")
    if addr + size > P.U64_LIMIT or offset + size > P.U64_LIMIT:
        raise ProtocolError(errno.EINVAL, f"DMA_MAP [{addr:#x}, +{size:#x}) offset {offset:#x} wraps 2^64")


def _file_identity(fd: int, offset: int, size: int) -> tuple[int, int]:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ProtocolError(exc.errno or errno.EBADF, "DMA_MAP: cannot stat the fd") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(errno.EINVAL, "DMA_MAP: fd is not a regular file or memfd")
    if st.st_size < offset + size:
        raise ProtocolError(errno.EINVAL, f"DMA_MAP: fd holds {st.st_size:#x} bytes, map needs "
                            f"{offset + size:#x} (use share=on RAM of the full size)")
    return (st.st_dev, st.st_ino)


def shrink_sealed(fd: int) -> bool:
    """Make sure the file behind ``fd`` can no longer shrink (a shrink under a live mapping
    would SIGBUS the server): True when it carries F_SEAL_SHRINK, adding the seal if the memfd
    allows sealing. QEMU's ``memory-backend-memfd`` seals by default (``seal=on``); plain files
    and hugetlbfs cannot be sealed, and stay trusted to keep their size."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            return True
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return True
    except OSError:
        return False


def _mmap_region(region: DmaRegion, fd: int) -> None:
    base = region.offset - region.offset % mmap.ALLOCATIONGRANULARITY
    delta = region.offset - base
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if region.prot & P.DMA_WRITE_FLAG else 0)
    try:
        mm = mmap.mmap(fd, region.size + delta, flags=mmap.MAP_SHARED, prot=prot, offset=base)
    except OSError as exc:
        raise ProtocolError(exc.errno or errno.ENOMEM, f"DMA_MAP: mmap failed: {exc.strerror}") from None
    except (ValueError, OverflowError) as exc:
        raise ProtocolError(errno.EINVAL, f"DMA_MAP: mmap refused: {exc}") from None
    region._mm = mm
    region.view = memoryview(mm)[delta:delta + region.size]


def _release(region: DmaRegion, logger: logging.Logger) -> None:
    view, mm = region.view, region._mm
    region.view = None
    region._mm = None
    if view is not None:
        view.release()
    if mm is not None:
        try:
            mm.close()
        except BufferError:
            # A device still holds a view; the pages stay mapped until it drops the view.
            logger.warning("DMA map [%#x, +%#x) unmapped while a device still uses it",
                           region.addr, region.size)
