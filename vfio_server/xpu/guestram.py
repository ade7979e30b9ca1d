"""Guest RAM as the accelerator's poller thread sees it: a locked snapshot of the DMA maps.

The serve loop owns the connection's :class:`~vxpu.vfio_server.dma.DmaSpace`; its tables are
mutated on the loop without a lock, so another thread must never look them up. The device
keeps this snapshot instead: the DMA map listeners (which run on the loop, ``on_map`` after a
region is mapped, ``on_unmap`` *before* it is unmapped) add and remove regions while holding
:attr:`GuestRam.lock`, and the poller holds the same lock whenever it touches guest memory (the
fast lane's C poll loop, which does not, is stopped first: ``Poller._quiesce``). So an unmap
waits until the poller is out of guest memory, and the poller never sees a region that is being
released (no use-after-unmap). Every change bumps :attr:`GuestRam.generation`;
the poller re-translates its cached ring views when it changes.

Only fd-backed (mmap-ed) maps are listed: message-only RAM (no ``share=on``) cannot be reached
from the poller thread, and commands that name it fail with OUT_OF_RANGE.

Each region is also registered with the backend through the session, on the poller thread
(:meth:`GuestRam.register_pending`, so a slow ``cuMemHostRegister`` never holds up the loop)
(:meth:`vxpu.accel.session.Session.register_host`: ``cuMemHostRegister`` on CUDA, the
address-copy table on the CPU backend), so copies are zero-copy and may use the raw-address
fast path. Unregistering waits for the backend's queues, so no queued copy outlives the map.

Translation is overflow-safe: a range is accepted only when ``0 <= addr``, ``0 < length``,
``addr + length <= 2**64`` and the whole range lies inside one region (with write permission
for device writes); anything else raises :class:`GuestFault` with OUT_OF_RANGE.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from vxpu.vfio_server.dma import DmaRegion

from vxpu.abi.status import Status
from vxpu.log import LogBudget

log = logging.getLogger(__name__)

U64_LIMIT = 1 << 64
_budget = LogBudget(16, 60.0, "further host-registration failures are logged at DEBUG")

Register = Callable[[memoryview, bool], object]
Unregister = Callable[[object], None]


class GuestFault(Exception):
    """A guest-supplied address or length that the device refuses; ``status`` is what the
    command completes with."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class RamRegion:
    """One fd-backed DMA map: guest-physical ``[addr, end)``, host memory ``view`` at
    ``host_base``, and the backend registration ``token`` (None when not registered)."""

    addr: int
    end: int
    view: memoryview
    writable: bool
    host_base: int
    source: DmaRegion
    token: object | None = None
    tried: bool = False                # registration attempted


def host_address(view: memoryview) -> int:
    """The host virtual address of the first byte of ``view`` (a contiguous byte view)."""
    arr = np.frombuffer(view, dtype=np.uint8)
    try:
        return int(arr.ctypes.data)
    finally:
        del arr


class GuestRam:
    """The poller's view of guest RAM (see the module docstring for the locking rules)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.lock = threading.Lock()
        self.generation = 0
        self.log = logger or log
        self._starts: list[int] = []
        self._regions: list[RamRegion] = []
        self.unregistered = False          # some region still waits for register_pending()

    def __len__(self) -> int:
        return len(self._regions)

    # -- loop side (listeners) -----------------------------------------------------------------
    def add(self, region: DmaRegion) -> RamRegion | None:
        """Add an fd-backed map (caller holds :attr:`lock`); :meth:`register_pending` registers
        it with the backend later, on the poller thread. Message-only maps are ignored."""
        if region.view is None:
            return None
        view = region.view[:]              # our own view object: released at remove()
        ram = RamRegion(region.addr, region.end, view, region.writable, host_address(view), region)
        i = bisect.bisect_right(self._starts, ram.addr)
        self._starts.insert(i, ram.addr)
        self._regions.insert(i, ram)
        self.generation += 1
        self.unregistered = True
        return ram

    def remove(self, region: DmaRegion, unregister: Unregister | None) -> RamRegion | None:
        """Forget the map ``region`` (caller holds :attr:`lock`); unregisters it first, which
        waits for the backend's queued copies. Returns what was removed, or None."""
        for i, ram in enumerate(self._regions):
            if ram.source is region:
                break
        else:
            return None
        if ram.token is not None and unregister is not None:
            try:
                unregister(ram.token)
            except Exception as exc:       # noqa: BLE001 -- the map goes away regardless
                self.log.error("unregistering guest RAM [%#x, +%#x) failed: %s", ram.addr, ram.end - ram.addr, exc)
        ram.token = None
        del self._starts[i]
        del self._regions[i]
        ram.view.release()
        self.generation += 1
        return ram

    def regions(self) -> list[RamRegion]:
        """A snapshot of the current regions, by address."""
        return list(self._regions)

    def forget_registrations(self) -> None:
        """The session that held the registrations is gone (caller holds the lock): register
        every region again with the next one."""
        for ram in self._regions:
            ram.token = None
            ram.tried = False
        self.unregistered = bool(self._regions)

    def register_pending(self, register: Register) -> None:
        """Register the regions not tried yet (caller holds the lock). A failure is logged and
        leaves the region on the plain-view copy path."""
        for ram in self._regions:
            if ram.tried:
                continue
            ram.tried = True
            try:
                ram.token = register(ram.view, not ram.writable)
            except Exception as exc:       # noqa: BLE001 -- the copies fall back to plain views
                _budget.log(self.log, logging.WARNING, "registering guest RAM [%#x, +%#x) with the backend "
                            "failed (copies use the slow path): %s", ram.addr, ram.end - ram.addr, exc)
        self.unregistered = False

    # -- poller side (caller holds the lock) ---------------------------------------------------
    def find(self, addr: int, length: int, write: bool) -> tuple[RamRegion, int]:
        """The region holding ``[addr, addr + length)`` and the offset of ``addr`` in it.

        Raises:
            GuestFault: OUT_OF_RANGE for a negative, empty or wrapping range, one that is not
                inside one fd-backed map, or a device write to a read-only map.
        """
        if addr < 0 or length <= 0 or addr + length > U64_LIMIT:
            raise GuestFault(Status.OUT_OF_RANGE, f"guest range {addr:#x}+{length:#x} is empty or wraps 2^64")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            raise GuestFault(Status.OUT_OF_RANGE, f"guest address {addr:#x} is not in DMA-mapped RAM")
        ram = self._regions[i]
        if addr + length > ram.end:
            raise GuestFault(Status.OUT_OF_RANGE, f"guest range {addr:#x}+{length:#x} is not inside one "
                             f"DMA map (map [{ram.addr:#x}, {ram.end:#x}))")
        if write and not ram.writable:
            raise GuestFault(Status.OUT_OF_RANGE, f"device write to read-only guest memory at {addr:#x}")
        return ram, addr - ram.addr

    def view(self, addr: int, length: int, write: bool) -> memoryview:
        """Host memory for ``[addr, addr + length)``; release it before dropping the lock.

        Raises:
            GuestFault: as :meth:`find`.
        """
        ram, off = self.find(addr, length, write)
        return ram.view[off:off + length]

    def read(self, addr: int, length: int) -> bytes:
        """A copy of ``length`` guest bytes at ``addr``.

        Raises:
            GuestFault: as :meth:`find`.
        """
        ram, off = self.find(addr, length, False)
        return bytes(ram.view[off:off + length])
