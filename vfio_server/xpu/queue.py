"""The accelerator's queue: configuration checks, ring views, index validation, completions.

A :class:`QueueConfig` is what the guest wrote to the queue registers, latched when it writes
``REG_QUEUE_ENABLE = 1``. :func:`check_config` decides whether it makes sense (sizes, alignment,
every byte of the header and both rings inside DMA-mapped guest RAM, writable where the device
writes) and names the problem (:class:`vxpu.abi.xpu.ConfigProblem`) otherwise.

:class:`Rings` holds the host views of the header and the two rings while the queue runs. It
is only used by the poller thread with :attr:`GuestRam.lock` held; the views are re-made from
the config whenever the guest-RAM generation changes (a map changed), and released before the
lock is dropped for good (reset, unmap). Indices are free-running ``u32`` counters
(:data:`~vxpu.abi.xpu.INDEX_MASK`), compared modulo 2^32:

* ``sq_tail`` (guest) may run at most ``sq_entries`` ahead of the device's ``sq_head``;
  further is :attr:`FatalCode.BAD_SQ_TAIL`.
* ``cq_head`` (guest) may only move forward, and never past the device's ``cq_tail``;
  anything else is :attr:`FatalCode.BAD_CQ_HEAD`.

A guest must store each index with one aligned 32-bit store. One that writes it byte by byte
(Python's ``struct.pack_into`` clears the field first) can be read half-written; such a value
always looks invalid (or unchanged), so an invalid-looking index is re-read for
:data:`REREAD_S` before it is fatal.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from vxpu.vfio_server.xpu.guestram import GuestFault, GuestRam

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import ConfigProblem, FatalCode

MASK = abi.INDEX_MASK
REREAD_S = 0.01                  # how long an invalid-looking index is re-read before it is fatal
REREAD_STEP_S = 0.0005
_U64 = struct.Struct("<Q")
_SQ_TAIL = abi.QH_SQ_TAIL // 4
_CQ_HEAD = abi.QH_CQ_HEAD // 4
_SQ_HEAD = abi.QH_SQ_HEAD // 4
_CQ_TAIL = abi.QH_CQ_TAIL // 4
_FLAGS = abi.QH_FLAGS // 4
_ERRORS = abi.QH_ERRORS // 4
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class QueueConfig:
    """The queue registers as latched at enable."""

    header: int
    sq_base: int
    cq_base: int
    sq_entries: int
    cq_entries: int


class QueueFatal(Exception):
    """The guest broke the queue protocol: the device enters the fatal state."""

    def __init__(self, code: FatalCode, info: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.info = info & MASK


def check_config(cfg: QueueConfig, ram: GuestRam) -> tuple[ConfigProblem, str] | None:
    """The first problem of ``cfg`` (caller holds ``ram.lock``), or None when it is usable."""
    if not abi.is_valid_ring_size(cfg.sq_entries) or not abi.is_valid_ring_size(cfg.cq_entries):
        return ConfigProblem.RING_SIZE, (f"ring sizes {cfg.sq_entries}/{cfg.cq_entries} are not powers of "
                                         f"two in {abi.MIN_RING_ENTRIES}..{abi.MAX_RING_ENTRIES}")
    if cfg.cq_entries < cfg.sq_entries:
        return ConfigProblem.CQ_TOO_SMALL, (f"completion ring ({cfg.cq_entries}) smaller than the "
                                            f"submission ring ({cfg.sq_entries})")
    if cfg.header % abi.QUEUE_HEADER_ALIGN or cfg.sq_base % abi.SQ_ENTRY_SIZE or cfg.cq_base % abi.CQ_ENTRY_SIZE:
        return ConfigProblem.ALIGNMENT, "queue header, submission or completion ring misaligned"
    spans = ((ConfigProblem.HEADER, cfg.header, abi.QUEUE_HEADER_SIZE, True),
             (ConfigProblem.SQ, cfg.sq_base, abi.ring_bytes(cfg.sq_entries, abi.SQ_ENTRY_SIZE), False),
             (ConfigProblem.CQ, cfg.cq_base, abi.ring_bytes(cfg.cq_entries, abi.CQ_ENTRY_SIZE), True))
    for problem, addr, size, write in spans:
        try:
            ram.find(addr, size, write)
        except GuestFault as exc:
            return problem, str(exc)
    return None


class Rings:
    """Host views of one running queue plus the device's indices (poller thread only)."""

    def __init__(self, cfg: QueueConfig) -> None:
        self.cfg = cfg
        self.sq_mask = cfg.sq_entries - 1
        self.cq_mask = cfg.cq_entries - 1
        self.sq_head = 0
        self.cq_tail = 0
        self.cq_head = 0
        self.completed = 0
        self.errors = 0                  # completions with a status other than OK (QH_ERRORS)
        self.generation = -1
        self._raw: memoryview | None = None
        self._hdr: memoryview | None = None
        self._sq: memoryview | None = None
        self._cq: memoryview | None = None

    # -- views ---------------------------------------------------------------------------------
    def attach(self, ram: GuestRam) -> None:
        """(Re)make the views for the current guest-RAM generation (caller holds the lock).

        Raises:
            QueueFatal: RING_UNMAPPED when a ring or the header is no longer in guest RAM.
        """
        if self.generation == ram.generation and self._hdr is not None:
            return
        self.release()
        cfg = self.cfg
        try:
            raw = ram.view(cfg.header, abi.QUEUE_HEADER_SIZE, True)
            sq = ram.view(cfg.sq_base, abi.ring_bytes(cfg.sq_entries, abi.SQ_ENTRY_SIZE), False)
            cq = ram.view(cfg.cq_base, abi.ring_bytes(cfg.cq_entries, abi.CQ_ENTRY_SIZE), True)
        except GuestFault as exc:
            raise QueueFatal(FatalCode.RING_UNMAPPED, 0, f"queue memory is gone: {exc}") from None
        self._raw, self._sq, self._cq = raw, sq, cq
        self._hdr = raw.cast("I")
        self.generation = ram.generation

    def release(self) -> None:
        """Drop every view (before the lock is released for an unmap or a reset)."""
        for view in (self._hdr, self._raw, self._sq, self._cq):
            if view is not None:
                view.release()
        self._hdr = self._raw = self._sq = self._cq = None
        self.generation = -1

    @property
    def attached(self) -> bool:
        return self._hdr is not None

    # -- header --------------------------------------------------------------------------------
    def start(self) -> None:
        """Publish the initial device indices (enable): all zero, need-wakeup clear."""
        hdr = self._hdr
        assert hdr is not None and self._raw is not None
        hdr[_SQ_HEAD] = hdr[_CQ_TAIL] = hdr[_FLAGS] = hdr[_ERRORS] = 0
        _U64.pack_into(self._raw, abi.QH_COMPLETED, 0)

    def _stable(self, index: int, valid: Callable[[int], bool]) -> int:
        """The guest's index word ``index``, re-read for up to :data:`REREAD_S` while it looks
        invalid (a store torn by a guest that writes it byte by byte settles in nanoseconds)."""
        hdr = self._hdr
        assert hdr is not None
        value = hdr[index]
        deadline = 0.0
        while not valid(value):
            now = time.monotonic()
            if not deadline:
                deadline = now + REREAD_S
            elif now > deadline:
                break
            time.sleep(REREAD_STEP_S)
            value = hdr[index]
        return value

    def pending(self) -> int:
        """Validated ``sq_tail - sq_head``: descriptors submitted and not yet consumed.

        Raises:
            QueueFatal: BAD_SQ_TAIL.
        """
        entries, head = self.cfg.sq_entries, self.sq_head
        assert self._hdr is not None
        tail = self._hdr[_SQ_TAIL]
        n = (tail - head) & MASK
        if n <= entries:
            return n
        tail = self._stable(_SQ_TAIL, lambda t: (t - head) & MASK <= entries)
        n = (tail - head) & MASK
        if n > entries:
            raise QueueFatal(FatalCode.BAD_SQ_TAIL, tail, f"sq_tail {tail} is {n} ahead of sq_head "
                             f"{head} (ring of {entries})")
        return n

    def cq_free(self) -> int:
        """Validated free completion slots.

        Raises:
            QueueFatal: BAD_CQ_HEAD.
        """
        prev, tail = self.cq_head, self.cq_tail
        assert self._hdr is not None
        head = self._hdr[_CQ_HEAD]
        if (head - prev) & MASK > (tail - prev) & MASK:
            head = self._stable(_CQ_HEAD, lambda h: (h - prev) & MASK <= (tail - prev) & MASK)
        if (head - prev) & MASK > (tail - prev) & MASK:
            raise QueueFatal(FatalCode.BAD_CQ_HEAD, head, f"cq_head {head} moved back or past cq_tail "
                             f"{tail} (previous cq_head {prev})")
        self.cq_head = head
        return self.cfg.cq_entries - ((tail - head) & MASK)

    def idle_hint(self, generation: int) -> bool:
        """Without the lock: True when the views are those of guest-RAM ``generation`` and the
        guest has posted nothing since the last :meth:`take` (``sq_tail == sq_head``). Only a hint
        for a spinning poller, which then skips its locked cycle: the locked :meth:`pending`
        decides everything else. A view that an unmap released meanwhile reads as not idle."""
        hdr = self._hdr
        if hdr is None or self.generation != generation:
            return False
        try:
            return bool(hdr[_SQ_TAIL] == self.sq_head)
        except (ValueError, IndexError):       # released under the lock by the loop thread
            return False

    def set_need_wakeup(self, on: bool) -> None:
        assert self._hdr is not None
        self._hdr[_FLAGS] = abi.FLAG_NEED_WAKEUP if on else 0

    # -- descriptors and completions -----------------------------------------------------------
    def take(self, n: int) -> list[tuple[int, ...]]:
        """Read the next ``n`` descriptors (copies) and advance ``sq_head`` past them."""
        sq, hdr = self._sq, self._hdr
        assert sq is not None and hdr is not None
        unpack, size, mask = abi.DESCRIPTOR.unpack_from, abi.SQ_ENTRY_SIZE, self.sq_mask
        head = self.sq_head
        out = [unpack(sq, ((head + i) & mask) * size) for i in range(n)]
        self.sq_head = (head + n) & MASK
        hdr[_SQ_HEAD] = self.sq_head
        return out

    def consume(self, n: int) -> None:
        """Advance ``sq_head`` past ``n`` descriptors a native issuer read itself (the caller
        checked :meth:`pending`)."""
        hdr = self._hdr
        assert hdr is not None
        self.sq_head = (self.sq_head + n) & MASK
        hdr[_SQ_HEAD] = self.sq_head

    def publish(self, n: int) -> None:
        """Publish ``n`` completions a native issuer wrote from ``cq_tail`` on, with one
        ``cq_tail`` store (the caller checked :meth:`cq_free`)."""
        hdr, raw = self._hdr, self._raw
        assert hdr is not None and raw is not None
        self.cq_tail = (self.cq_tail + n) & MASK
        self.completed += n
        hdr[_CQ_TAIL] = self.cq_tail
        _U64.pack_into(raw, abi.QH_COMPLETED, self.completed & _U64_MAX)

    def complete(self, tag: int, status: int, result: int, result2: int) -> None:
        """Write one completion and publish it (the caller checked :meth:`cq_free`)."""
        cq, hdr, raw = self._cq, self._hdr, self._raw
        assert cq is not None and hdr is not None and raw is not None
        abi.COMPLETION.pack_into(cq, (self.cq_tail & self.cq_mask) * abi.CQ_ENTRY_SIZE,
                                 tag, result & 0xFFFF_FFFF_FFFF_FFFF, result2 & 0xFFFF_FFFF_FFFF_FFFF, status, 0)
        if status:                       # (before cq_tail: a guest that sees the completion sees it counted)
            self.errors = (self.errors + 1) & MASK
            hdr[_ERRORS] = self.errors
        self.cq_tail = (self.cq_tail + 1) & MASK
        self.completed += 1
        hdr[_CQ_TAIL] = self.cq_tail
        _U64.pack_into(raw, abi.QH_COMPLETED, self.completed & 0xFFFF_FFFF_FFFF_FFFF)

    def complete_many(self, results: list[tuple[int, int, int, int, int, int, bool]]) -> None:
        """Write the completions ``(tag, status, result, result2, ...)`` (further items are the
        caller's), then publish them with one ``cq_tail`` store (the caller checked
        :meth:`cq_free`)."""
        cq, hdr, raw = self._cq, self._hdr, self._raw
        assert cq is not None and hdr is not None and raw is not None
        pack, size, mask, tail = abi.COMPLETION.pack_into, abi.CQ_ENTRY_SIZE, self.cq_mask, self.cq_tail
        errors = self.errors
        for entry in results:
            pack(cq, (tail & mask) * size, entry[0], entry[2] & _U64_MAX, entry[3] & _U64_MAX, entry[1], 0)
            tail += 1
            if entry[1]:
                errors += 1
        if errors != self.errors:        # (before cq_tail, as in complete)
            self.errors = errors & MASK
            hdr[_ERRORS] = self.errors
        self.cq_tail = tail & MASK
        self.completed += len(results)
        hdr[_CQ_TAIL] = self.cq_tail
        _U64.pack_into(raw, abi.QH_COMPLETED, self.completed & _U64_MAX)

    def unread(self) -> list[tuple[int, ...]]:
        """Every submitted, unconsumed descriptor that fits the completion ring (for aborts);
        an invalid ``sq_tail`` or ``cq_head`` gives none."""
        try:
            n = min(self.pending(), self.cq_free())
        except QueueFatal:
            return []
        return self.take(n)
