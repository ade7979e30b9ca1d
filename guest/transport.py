"""The transport contract under the SDK: BAR0 registers plus DMA memory with guest addresses.

The SDK (:mod:`vxpu.guest.sdk`) is written once against :class:`Transport`; two
implementations carry it:

* the **VM transport** (:mod:`vxpu.guest.vmtransport`): inside a Linux guest, BAR0 is the
  sysfs ``resource0`` mapping (each access traps to QEMU, which forwards it to the server) and
  DMA memory is pinned guest RAM whose guest-physical addresses come from
  ``/proc/self/pagemap``;
* the **host transport** (:mod:`vxpu.guest.local`): outside any VM, a ``vxpu serve`` child
  process is driven through the in-process vfio-user client, with a memfd playing guest RAM
  (the DMA address space is that memfd, mapped at :data:`LOCAL_RAM_BASE`).

A transport moves no command data itself: the SDK writes descriptors into rings that live in
:class:`DmaMemory` and reads completions from there; registers are only touched for set-up,
reset and doorbells. Everything here is stdlib-only, like the rest of the guest package.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from vxpu.guest.errors import GuestError

#: Where the host transport maps its memfd "guest RAM" in the device's DMA address space.
LOCAL_RAM_BASE = 0x1_0000_0000


class DmaMemory:
    """A CPU-visible buffer and the guest-physical runs behind it.

    ``runs`` lists ``(offset, address, length)`` in offset order, covering ``[0, size)`` with no
    gaps; adjacent physically contiguous runs are already merged. The buffer belongs to the
    transport that made it, which frees it in :meth:`Transport.free_dma` or at close.

    Args:
        view: writable memory the CPU uses (length ``size``).
        runs: the guest-physical layout, as above.

    Raises:
        GuestError: the runs do not cover the view exactly.
    """

    def __init__(self, view: memoryview, runs: Sequence[tuple[int, int, int]]) -> None:
        pos = 0
        for off, _addr, length in runs:
            if off != pos or length <= 0:
                raise GuestError(f"DMA runs must tile the buffer: a run starts at {off}, expected {pos}")
            pos += length
        if pos != len(view):
            raise GuestError(f"DMA runs cover {pos} bytes of a {len(view)}-byte buffer")
        self.view = view
        self.size = len(view)
        self.runs = tuple(runs)
        self._starts = [r[0] for r in self.runs]

    @property
    def contiguous(self) -> bool:
        """True when the whole buffer is one physically contiguous run."""
        return len(self.runs) == 1

    def address(self, offset: int = 0) -> int:
        """The guest-physical address of byte ``offset``.

        Raises:
            GuestError: ``offset`` is outside the buffer.
        """
        if not 0 <= offset < self.size:
            raise GuestError(f"offset {offset} is outside a {self.size}-byte DMA buffer")
        i = bisect.bisect_right(self._starts, offset) - 1
        off, addr, _length = self.runs[i]
        return addr + (offset - off)

    def segments(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """The ``(address, length)`` scatter-gather list of ``[offset, offset + length)``.

        Raises:
            GuestError: the range is not inside the buffer.
        """
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0 or offset + length > self.size:
            raise GuestError(f"range [{offset}, {offset}+{length}) is outside a {self.size}-byte DMA buffer")
        out: list[tuple[int, int]] = []
        if length == 0:
            return out
        i = bisect.bisect_right(self._starts, offset) - 1
        end = offset + length
        while offset < end:
            off, addr, run = self.runs[i]
            take = min(end, off + run) - offset
            out.append((addr + offset - off, take))
            offset += take
            i += 1
        return out


@runtime_checkable
class Transport(Protocol):
    """What the SDK needs from the world below it."""

    name: str                  # "vm" or "local"

    def read_reg(self, offset: int) -> int:
        """Read the 32-bit BAR0 register at ``offset`` (one trapped access in a VM)."""

    def write_reg(self, offset: int, value: int) -> None:
        """Write the 32-bit BAR0 register at ``offset`` (posted by QEMU: it does not wait)."""

    def alloc_dma(self, size: int, *, contiguous: bool = False) -> DmaMemory:
        """Memory the device may DMA to and from, at least ``size`` bytes (zeroed).

        ``contiguous=True`` asks for one physically contiguous run (rings need it).

        Raises:
            GuestError: no such memory is available (the message says what to change).
        """

    def free_dma(self, mem: DmaMemory) -> None:
        """Give ``mem`` back. The SDK never frees memory the device may still access."""

    def close(self) -> None:
        """Release the device and all DMA memory (idempotent)."""
