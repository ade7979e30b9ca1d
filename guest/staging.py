"""Moving bytes between host memory and device memory: copy commands and a staging pool.

The device reads and writes only DMA memory (guest RAM with known guest-physical addresses).
Two paths lead there:

* **Zero-copy**: the data already lives in DMA memory (a pinned :class:`~vxpu.guest.array.HostArray`);
  :func:`post_copy` turns the range into copy commands straight away.
* **Staged**: the data is an ordinary buffer (a numpy array, bytes). :class:`StagingPool` keeps
  ``count`` bounce buffers of ``chunk`` bytes, allocated once and reused for every transfer
  (no allocation on the hot path). A big transfer is cut into chunks and pipelined: while the
  device copies chunk *k*, the CPU fills (host→device) or empties (device→host) another slot.
  An HTOD completes once the device has read its source (docs/device-abi.md §4.7), so a slot
  is refilled as soon as the copy that last used it completed, with no FENCE in between. A
  DTOH completes when its bytes are in guest memory.

A range that is not physically contiguous needs a scatter-gather list. Up to
:data:`~vxpu.guest.ring.SIDE_SG_ENTRIES` segments go into the command's side area
(``SG_INDIRECT``); a longer list is split into several commands at segment boundaries.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from vxpu.guest.errors import GuestError
from vxpu.guest.ring import SIDE_SG_ENTRIES, Ring
from vxpu.guest.transport import DmaMemory, Transport

from vxpu.abi import xpu

_HTOD = int(xpu.Opcode.MEM_COPY_HTOD)
_DTOH = int(xpu.Opcode.MEM_COPY_DTOH)


def post_segments(ring: Ring, opcode: int, device_addr: int, segments: Sequence[tuple[int, int]], *,
                  waited: bool) -> list[int]:
    """Post copy commands moving ``segments`` (guest addresses, lengths) at ``device_addr``.

    Returns:
        the sequence numbers of the commands posted (one per group of segments).

    Raises:
        DeviceError: a fatal device error while waiting for ring space.
    """
    seqs = []
    for start in range(0, len(segments), SIDE_SG_ENTRIES):
        group = segments[start:start + SIDE_SG_ENTRIES]
        if len(group) == 1:
            addr, length = group[0]
            seqs.append(ring.post(opcode, device_addr, sg_addr=addr, sg_len=length, waited=waited))
        else:
            seq = ring.reserve()
            side, side_addr = ring.side(seq)
            length = 0
            for i, (addr, seg) in enumerate(group):
                xpu.SG_ENTRY.pack_into(side, i * xpu.SG_ENTRY.size, addr, seg)
                length += seg
            seqs.append(ring.post(opcode, device_addr, flags=xpu.DescFlags.SG_INDIRECT, sg_addr=side_addr,
                                  sg_len=0, sg_count=len(group), waited=waited))
        device_addr += sum(seg for _, seg in group)
    return seqs


def post_single(ring: Ring, opcode: int, segments: Sequence[tuple[int, int]], *args: int, waited: bool) -> int:
    """Post ONE command whose SG list is ``segments`` (for commands that cannot be split:
    MODULE_LOAD, KERNEL_GET, IDENTIFY ...): inline for one segment, in the side area for a few,
    else in DMA memory of its own that is freed when the command completes.

    Raises:
        GuestError: more than MAX_SG_ENTRIES segments. DeviceError: a fatal device error.
    """
    if len(segments) <= 1:
        addr, length = segments[0] if segments else (0, 0)
        return ring.post(opcode, *args, sg_addr=addr, sg_len=length, waited=waited)
    if len(segments) > xpu.MAX_SG_ENTRIES:
        raise GuestError(f"{len(segments)} scatter-gather segments (limit {xpu.MAX_SG_ENTRIES})")
    hold = None
    seq = ring.reserve()
    if len(segments) <= SIDE_SG_ENTRIES:
        table, table_addr = ring.side(seq)
    else:
        hold = ring.transport.alloc_dma(len(segments) * xpu.SG_ENTRY.size, contiguous=True)
        table, table_addr = hold.view, hold.address(0)
    for i, (addr, length) in enumerate(segments):
        xpu.SG_ENTRY.pack_into(table, i * xpu.SG_ENTRY.size, addr, length)
    return ring.post(opcode, *args, flags=xpu.DescFlags.SG_INDIRECT, sg_addr=table_addr, sg_count=len(segments),
                     waited=waited, hold=hold)


def post_copy(ring: Ring, opcode: int, device_addr: int, mem: DmaMemory, offset: int, length: int, *,
              waited: bool) -> list[int]:
    """Post the copy of ``mem[offset:offset+length]`` to or from ``device_addr``.

    ``opcode`` is MEM_COPY_HTOD or MEM_COPY_DTOH. Returns the sequence numbers posted.

    Raises:
        GuestError: the range is outside ``mem``.
        DeviceError: a fatal device error while waiting for ring space.
    """
    if mem.contiguous:
        return [ring.post(opcode, device_addr, sg_addr=mem.runs[0][1] + offset, sg_len=length, waited=waited)]
    return post_segments(ring, opcode, device_addr, mem.segments(offset, length), waited=waited)


class StagingPool:
    """Bounce buffers reused across transfers, and the pipelined staged copies through them.

    Args:
        ring: the device's ring.
        transport: where the bounce buffers come from.
        chunk: bytes per bounce buffer (one copy command each, or a few if not contiguous).
        count: number of bounce buffers (the pipeline depth).

    Raises:
        GuestError: the transport has no DMA memory for the pool.
    """

    def __init__(self, ring: Ring, transport: Transport, chunk: int = 1 << 20, count: int = 4) -> None:
        self.ring, self.transport, self.chunk = ring, transport, chunk
        self.slots: list[DmaMemory] = []
        try:
            for _ in range(count):
                self.slots.append(transport.alloc_dma(chunk))
        except BaseException:
            self.close()
            raise
        self._pending: list[list[int]] = [[] for _ in self.slots]
        self._next_slot = 0
        self.transfers = 0

    def forget(self) -> None:
        """Drop the sequence numbers of earlier commands (the ring restarted at 0 after a
        device reset, which also dropped those commands)."""
        self._pending = [[] for _ in self.slots]

    def close(self) -> None:
        """Give the bounce buffers back (no copy may be in flight)."""
        for mem in self.slots:
            self.transport.free_dma(mem)
        self.slots = []

    def _check_copies(self, slot: int) -> GuestError | None:
        """Wait for the copy commands that last used ``slot``; the first failure, if any."""
        seqs, self._pending[slot] = self._pending[slot], []
        first_error = None
        for seq in seqs:
            try:
                self.ring.check(seq)
            except GuestError as exc:      # keep waiting for the rest; report the first
                first_error = first_error or exc
        return first_error

    def _settle(self, slot: int) -> None:
        """Make ``slot`` reusable: wait for the copies that last used it (raising the first that
        failed). Their completions say the device is done with the slot's bytes: an HTOD
        completes once it has read its source, a DTOH once its bytes are in guest memory."""
        first_error = self._check_copies(slot)
        if first_error is not None:
            raise first_error

    def settle_all(self, *, quiet: bool = False) -> None:
        """Wait for every staged command; raise the first failure unless ``quiet`` (used while
        another error is already on its way, so that no slot stays busy)."""
        errors = []
        for slot in range(len(self.slots)):
            try:
                self._settle(slot)
            except GuestError as exc:
                errors.append(exc)
        if errors and not quiet:
            raise errors[0]

    def upload(self, device_addr: int, src: memoryview) -> None:
        """Copy ``src`` (bytes, format 'B') to ``device_addr``, pipelined. Returns once every
        copy completed (was checked and its bytes read by the device), so ``src`` and the
        staging slots may change and a failure is raised here.

        Raises:
            DeviceError: a copy failed (OUT_OF_RANGE for a range outside the allocation ...).
        """
        n, chunk, nslots = len(src), self.chunk, len(self.slots)
        if 0 < n <= chunk and not any(self._pending):      # one chunk, nothing else in flight:
            self.transfers += 1                             # the loop below, unrolled
            slot = self._next_slot
            self._next_slot = (slot + 1) % nslots
            mem = self.slots[slot]
            try:
                mem.view[:n] = src
                self._pending[slot] = post_copy(self.ring, _HTOD, device_addr, mem, 0, n, waited=True)
            except BaseException:
                self.settle_all(quiet=True)
                raise
            self._settle(slot)
            return
        self.transfers += 1
        first = self._next_slot              # rotate, so back-to-back small uploads do not wait
        self._next_slot = (first + -(-n // chunk)) % nslots          # for each other's copies
        try:
            for i, off in enumerate(range(0, n, chunk)):
                slot = (first + i) % nslots
                self._settle(slot)
                m = min(chunk, n - off)
                mem = self.slots[slot]
                mem.view[:m] = src[off:off + m]
                self._pending[slot] = post_copy(self.ring, xpu.Opcode.MEM_COPY_HTOD, device_addr + off, mem, 0, m,
                                                waited=True)
        except BaseException:
            self.settle_all(quiet=True)
            raise
        errors = [e for e in map(self._check_copies, range(nslots)) if e is not None]
        if errors:
            raise errors[0]

    def download(self, dst: memoryview, device_addr: int) -> None:
        """Copy ``len(dst)`` bytes from ``device_addr`` into ``dst`` (writable, format 'B').

        Raises:
            DeviceError: a copy failed.
        """
        n, chunk, nslots = len(dst), self.chunk, len(self.slots)
        if 0 < n <= chunk:                   # one chunk: the loop below, unrolled (slot 0)
            self.transfers += 1
            mem = self.slots[0]
            try:
                self._pending[0] = post_copy(self.ring, _DTOH, device_addr, mem, 0, n, waited=True)
                self._settle(0)
                dst[:n] = mem.view[:n]
            except BaseException:
                self.settle_all(quiet=True)
                raise
            return
        self.transfers += 1
        offsets = deque(range(0, n, chunk))
        queued: deque[tuple[int, int, int]] = deque()        # slot, offset, length
        try:
            while offsets or queued:
                while offsets and len(queued) < nslots:
                    off = offsets.popleft()
                    slot = (off // chunk) % nslots
                    m = min(chunk, n - off)
                    self._pending[slot] = post_copy(self.ring, xpu.Opcode.MEM_COPY_DTOH, device_addr + off,
                                                    self.slots[slot], 0, m, waited=True)
                    queued.append((slot, off, m))
                slot, off, m = queued.popleft()
                self._settle(slot)
                dst[off:off + m] = self.slots[slot].view[:m]
        except BaseException:
            self.settle_all(quiet=True)
            raise
