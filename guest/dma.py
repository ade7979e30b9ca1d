"""Pinned guest memory with known guest-physical addresses, for a device to DMA into.

A :class:`DmaBuffer` is an anonymous mapping that stays resident at fixed physical pages:
either one 2 MiB huge page (``MAP_HUGETLB``; physically contiguous) or ordinary pages locked
with ``MAP_LOCKED | MAP_POPULATE`` (each page resident, but scattered). Guest-physical
addresses come from ``/proc/self/pagemap`` (root only: bits 0-54 are the PFN, bit 63 means
present). :meth:`DmaBuffer.segments` gives the coalesced ``(address, length)`` list a
scatter-gather command needs; :attr:`DmaBuffer.address` is the single address of a contiguous
buffer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path
from typing import Self

from vxpu.guest.errors import GuestError

PAGE_SIZE = mmap.PAGESIZE
HUGE_PAGE_SIZE = 2 << 20
MAP_LOCKED = 0x2000
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63
_NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
_COMPACT_UNEVICTABLE = Path("/proc/sys/vm/compact_unevictable_allowed")


def reserve_huge_pages(count: int) -> int:
    """Make sure at least ``count`` 2 MiB huge pages are reserved; returns how many exist."""
    try:
        have = int(_NR_HUGEPAGES.read_text())
        if have < count:
            _NR_HUGEPAGES.write_text(str(count))
            have = int(_NR_HUGEPAGES.read_text())
    except (OSError, ValueError):
        return 0
    return have


def _pin_locked_pages() -> None:
    # Compaction may migrate mlock'd pages unless told not to; a migrated page would change
    # its guest-physical address under the device. Best effort: needs root.
    try:
        _COMPACT_UNEVICTABLE.write_text("0")
    except OSError:
        pass


class DmaBuffer:
    """A pinned buffer for device DMA.

    Args:
        size: bytes wanted (rounded up to the page size).
        huge: use one 2 MiB huge page (size must fit in it); reserves one if needed.

    Raises:
        GuestError: the memory cannot be mapped, or its addresses cannot be read (needs root).
    """

    def __init__(self, size: int, huge: bool = False) -> None:
        if size <= 0:
            raise GuestError(f"DMA buffer size must be positive, not {size}")
        self.huge = huge
        if huge:
            if size > HUGE_PAGE_SIZE:
                raise GuestError(f"a huge-page DMA buffer holds at most {HUGE_PAGE_SIZE} bytes")
            if reserve_huge_pages(1) < 1:
                raise GuestError("no huge pages available (write to /proc/sys/vm/nr_hugepages as root)")
            self.size = HUGE_PAGE_SIZE
            flags = mmap.MAP_PRIVATE | MAP_HUGETLB | MAP_POPULATE
        else:
            _pin_locked_pages()
            self.size = -(-size // PAGE_SIZE) * PAGE_SIZE
            flags = mmap.MAP_PRIVATE | MAP_LOCKED | MAP_POPULATE
        try:
            self._mm = mmap.mmap(-1, self.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise GuestError(f"cannot allocate a {'huge-page ' if huge else ''}DMA buffer of {self.size} bytes: "
                             f"{exc}") from exc
        anchor = ctypes.c_char.from_buffer(self._mm)
        self.vaddr = ctypes.addressof(anchor)
        del anchor
        self._mm[:] = bytes(self.size)  # touch every page so each one is present
        self.view = memoryview(self._mm)
        self._segments = self._translate()

    def _translate(self) -> list[tuple[int, int]]:
        step = HUGE_PAGE_SIZE if self.huge else PAGE_SIZE
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        except OSError as exc:
            raise GuestError(f"cannot open /proc/self/pagemap: {exc}") from exc
        segs: list[tuple[int, int]] = []
        try:
            for off in range(0, self.size, step):
                vpn = (self.vaddr + off) // PAGE_SIZE
                (entry,) = struct.unpack("<Q", os.pread(fd, 8, vpn * 8))
                pfn = entry & _PFN_MASK
                if not entry & _PRESENT or pfn == 0:
                    raise GuestError("pagemap hides physical addresses (run as root) or the page is absent")
                phys = pfn * PAGE_SIZE
                if segs and segs[-1][0] + segs[-1][1] == phys:
                    segs[-1] = (segs[-1][0], segs[-1][1] + step)
                else:
                    segs.append((phys, step))
        finally:
            os.close(fd)
        return segs

    def segments(self) -> list[tuple[int, int]]:
        """Physically contiguous ``(guest_physical_address, length)`` runs, in buffer order."""
        return list(self._segments)

    @property
    def address(self) -> int:
        """The guest-physical address of a physically contiguous buffer.

        Raises:
            GuestError: the buffer spans discontiguous pages (use :meth:`segments`).
        """
        if len(self._segments) != 1:
            raise GuestError(f"buffer is in {len(self._segments)} physical pieces; use segments()")
        return self._segments[0][0]

    def close(self) -> None:
        """Release the memory (the view first)."""
        if not self._mm.closed:
            self.view.release()
            self._mm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
