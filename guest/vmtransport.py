"""The in-VM transport: the vxpu accelerator as a sysfs PCI function plus pinned huge-page RAM.

:class:`VmTransport` implements :class:`vxpu.guest.transport.Transport` inside a Linux guest,
as root, with no kernel module:

* **Finding the device.** By default the first function with the accelerator's IDs
  (:data:`vxpu.abi.xpu.VENDOR_ID`/:data:`~vxpu.abi.xpu.DEVICE_ID`). QEMU's ``x-pci-*``
  properties can change what the guest sees, so the IDs (``ids="vvvv:dddd"`` or
  ``VXPU_PCI_ID``) or the exact function (``bdf=`` or ``VXPU_PCI_BDF``) can be given. When
  nothing matches the default IDs, every function of class 0x12 (processing accelerator) with
  a 4 KiB BAR0 and no BAR2 is probed: BAR0 must read :data:`~vxpu.abi.xpu.MAGIC_VALUE`, the ABI
  major version and :data:`~vxpu.abi.xpu.MAX_RING_ENTRIES` (which tells it from the test
  device, whose magic is the same).
* **Registers.** ``enable`` through sysfs (memory decode), Bus Master Enable in the command
  register, and ``resource0`` mmap'd; each register access traps to QEMU (tens of µs under TCG),
  so the SDK touches registers only for set-up, reset and the doorbell when the device asks.
* **DMA memory.** 2 MiB huge pages (``MAP_SHARED | MAP_HUGETLB | MAP_POPULATE``): each one is
  physically contiguous and never swapped or migrated in normal operation, and
  ``MADV_DONTFORK`` keeps a child process from turning them copy-on-write (which would move the
  parent's pages under the device). Guest-physical addresses come from ``/proc/self/pagemap``.
  Small requests (≤ :data:`ARENA_MAX`) are carved out of shared arena pages; larger ones get
  their own mapping of whole huge pages, whose runs are usually adjacent and merge. Every
  allocation starts 4 KiB aligned, which covers every alignment the ABI asks for (the queue
  header's 4 KiB included). Huge pages are reserved on demand through
  ``/proc/sys/vm/nr_hugepages``.

Measured in the guest under TCG (2-core host): a 2 MiB huge-page mapping plus its pagemap
lookup takes about 4 ms (23 ms the first time, when the pool grows) and is one run; the same
2 MiB as locked 4 KiB pages (:mod:`vxpu.guest.dma`) takes 17-24 ms and came back in 146-368
physical pieces, each a scatter-gather segment. A 64 MiB buffer took 0.2 s and was one run.

Closing (or interpreter exit, through :func:`weakref.finalize`) stops a running queue and
clears Bus Master Enable *before* the memory goes back to the kernel, so the device can no
longer write into pages that another process may get. A process killed outright cannot do
that: its queue keeps pointing at pages the kernel has taken back. The next transport to open
the device finds the queue still enabled (or fatal), resets the device (``Control.RESET``,
waiting for ``REG_RESET_COUNT`` to move) and says so in :attr:`VmTransport.recovered`; until
then the device may still touch those pages, which no guest-side code can prevent without a
kernel driver.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from vxpu.guest.errors import DeviceNotFound, GuestError
from vxpu.guest.pci import RES_MEM, SYSFS_PCI, Bar, PciFunction
from vxpu.guest.transport import DmaMemory

from vxpu.abi import xpu

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 4096
ARENA_MAX = 1 << 20             # requests up to this size share arena pages
ENV_BDF = "VXPU_PCI_BDF"
ENV_IDS = "VXPU_PCI_ID"
QUEUE_STOP_TIMEOUT_S = 5.0
RESET_TIMEOUT_S = 5.0
_MAP_HUGETLB = 0x40000
_MAP_POPULATE = 0x8000
_MADV_DONTFORK = getattr(mmap, "MADV_DONTFORK", 10)
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63
_NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
_MEMINFO = Path("/proc/meminfo")


# -- finding the device -----------------------------------------------------------------------

def parse_ids(text: str) -> tuple[int, int]:
    """``"vvvv:dddd"`` (hex) -> ``(vendor, device)``.

    Raises:
        GuestError: not two 16-bit hex numbers separated by a colon.
    """
    try:
        vendor, device = (int(part, 16) for part in text.split(":"))
    except ValueError:
        raise GuestError(f"bad PCI ids {text!r}: write them as vvvv:dddd in hex, e.g. 5850:0100") from None
    if not (0 <= vendor <= 0xFFFF and 0 <= device <= 0xFFFF):
        raise GuestError(f"bad PCI ids {text!r}: each id is 16 bits")
    return vendor, device


def _looks_like_accelerator(fn: PciFunction) -> bool:
    """Class 0x12, a 4 KiB memory BAR0 and no BAR2, and BAR0 answers like the accelerator.

    A function that was disabled is enabled only for the probe and disabled again.
    """
    try:
        if fn.class_code >> 16 != xpu.CLASS_CODE >> 16:
            return False
        res = fn.resources()
        if len(res) < 3 or res[0].size != xpu.BAR0_SIZE or not res[0].flags & RES_MEM or res[2].size:
            return False
        was_enabled = (fn.path / "enable").read_text().strip() not in ("", "0")
        fn.enable()
        try:
            with fn.map_bar(0) as bar:
                return (bar.read32(xpu.REG_MAGIC) == xpu.MAGIC_VALUE
                        and bar.read32(xpu.REG_VERSION) >> 16 == xpu.ABI_MAJOR
                        and bar.read32(xpu.REG_MAX_RING_ENTRIES) == xpu.MAX_RING_ENTRIES)
        finally:
            if not was_enabled:
                (fn.path / "enable").write_text("0")
    except (OSError, ValueError, GuestError):
        return False


def find_function(bdf: str | None = None, ids: str | None = None, root: Path = SYSFS_PCI) -> PciFunction:
    """The accelerator's PCI function, chosen as the module docstring says.

    Args:
        bdf: an exact function (``0000:00:03.0``); default ``$VXPU_PCI_BDF``.
        ids: ``"vvvv:dddd"`` to look for instead of the ABI's IDs; default ``$VXPU_PCI_ID``.
        root: the sysfs PCI device directory.

    Raises:
        DeviceNotFound: nothing matches (the message says what was looked for).
        GuestError: ``ids`` is malformed.
    """
    bdf = bdf or os.environ.get(ENV_BDF) or None
    ids = ids or os.environ.get(ENV_IDS) or None
    if bdf:
        path = root / bdf
        if not (path / "config").exists():
            raise DeviceNotFound(f"no PCI function {bdf} in {root} (check {ENV_BDF} / bdf=)")
        return PciFunction(path)
    if ids:
        vendor, device = parse_ids(ids)
        return PciFunction.find_one(vendor, device, root)
    found = PciFunction.find(xpu.VENDOR_ID, xpu.DEVICE_ID, root)
    if found:
        return found[0]
    candidates = [PciFunction(p) for p in sorted(root.iterdir())] if root.is_dir() else []
    for fn in candidates:
        if _looks_like_accelerator(fn):
            return fn
    raise DeviceNotFound(f"no vxpu accelerator in {root}: no {xpu.VENDOR_ID:04x}:{xpu.DEVICE_ID:04x} function and "
                         f"no class-0x12 function answering like one; attach the device to the VM (vxpu vm run), "
                         f"or name it with {ENV_BDF}=<bdf> or {ENV_IDS}=vvvv:dddd")


# -- huge-page memory -------------------------------------------------------------------------

def _meminfo(key: str) -> int:
    for line in _MEMINFO.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reserve_huge_pages(free_wanted: int) -> None:
    """Grow the kernel's huge-page pool until ``free_wanted`` pages are free (best effort)."""
    try:
        free = _meminfo("HugePages_Free")
        if free >= free_wanted:
            return
        total = int(_NR_HUGEPAGES.read_text())
        _NR_HUGEPAGES.write_text(str(total + free_wanted - free))
    except (OSError, ValueError):
        return


@dataclass
class _Mapping:
    """One mmap of whole huge pages and its guest-physical runs."""

    mm: mmap.mmap
    vaddr: int
    size: int
    runs: list[tuple[int, int, int]]            # (offset, address, length), merged
    free: list[tuple[int, int]] = field(default_factory=list)   # arena only: (offset, length)
    used: dict[int, int] = field(default_factory=dict)          # arena only: offset -> length

    def slice_runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """The runs of ``[offset, offset + length)``, re-based to offset 0."""
        out = []
        end = offset + length
        for off, addr, run in self.runs:
            lo, hi = max(off, offset), min(off + run, end)
            if lo < hi:
                out.append((lo - offset, addr + lo - off, hi - lo))
        return out


def _map_huge(pages: int) -> _Mapping:
    size = pages * HUGE_PAGE
    reserve_huge_pages(pages)
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | _MAP_HUGETLB | _MAP_POPULATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        raise GuestError(f"cannot get {pages} huge page(s) of 2 MiB for DMA ({exc.strerror}; "
                         f"{_meminfo('HugePages_Free')} free of {_meminfo('HugePages_Total')}): give the VM more "
                         f"memory (vxpu vm run --memory) or free DMA buffers") from exc
    try:
        mm.madvise(_MADV_DONTFORK)
        anchor = ctypes.c_char.from_buffer(mm)
        vaddr = ctypes.addressof(anchor)
        del anchor
        runs = _translate(vaddr, size)
    except BaseException:
        mm.close()
        raise
    return _Mapping(mm, vaddr, size, runs)


def _translate(vaddr: int, size: int) -> list[tuple[int, int, int]]:
    """Guest-physical runs of a populated huge-page mapping, from /proc/self/pagemap."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError as exc:
        raise GuestError(f"cannot open /proc/self/pagemap: {exc.strerror} (run as root)") from exc
    runs: list[tuple[int, int, int]] = []
    try:
        for off in range(0, size, HUGE_PAGE):
            (entry,) = struct.unpack("<Q", os.pread(fd, 8, (vaddr + off) // mmap.PAGESIZE * 8))
            pfn = entry & _PFN_MASK
            if not entry & _PRESENT or pfn == 0:
                raise GuestError("/proc/self/pagemap hides physical addresses: run as root")
            addr = pfn * mmap.PAGESIZE
            if runs and runs[-1][1] + runs[-1][2] == addr:
                o, a, n = runs[-1]
                runs[-1] = (o, a, n + HUGE_PAGE)
            else:
                runs.append((off, addr, HUGE_PAGE))
    finally:
        os.close(fd)
    return runs


def _close_mapping(m: _Mapping) -> None:
    try:
        m.mm.close()
    except BufferError:
        pass  # a caller still holds a view (e.g. a numpy array): the pages stay until it goes


class HugePageAllocator:
    """DMA memory from 2 MiB huge pages, as the module docstring describes. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arenas: list[_Mapping] = []
        self._owner: dict[int, tuple[_Mapping, int, int, bool]] = {}   # id(DmaMemory) -> (map, off, len, arena)
        self._closed = False

    def alloc(self, size: int, contiguous: bool = False) -> DmaMemory:
        """Zeroed memory of at least ``size`` bytes (rounded up to 4 KiB).

        Raises:
            GuestError: a bad size, a contiguous request above 2 MiB that the kernel could not
                place in adjacent pages, or no huge pages.
        """
        if self._closed:
            raise GuestError("DMA memory requested from a closed transport")
        if size <= 0:
            raise GuestError(f"DMA size must be positive, not {size}")
        length = -(-size // ALIGN) * ALIGN
        with self._lock:
            if length <= ARENA_MAX:
                m, off = self._arena_alloc(length)
                ctypes.memset(m.vaddr + off, 0, length)
                arena = True
            else:
                m = _map_huge(-(-length // HUGE_PAGE))
                off, arena = 0, False
                if contiguous and len(m.runs) != 1:
                    _close_mapping(m)
                    raise GuestError(f"{length} bytes of physically contiguous DMA memory are not available; "
                                     f"contiguous buffers are guaranteed up to {HUGE_PAGE} bytes")
            mem = DmaMemory(memoryview(m.mm)[off:off + length], m.slice_runs(off, length))
            self._owner[id(mem)] = (m, off, length, arena)
        return mem

    def _arena_alloc(self, length: int) -> tuple[_Mapping, int]:
        for m in self._arenas:
            for i, (off, free) in enumerate(m.free):
                if free >= length:
                    m.free[i:i + 1] = [(off + length, free - length)] if free > length else []
                    m.used[off] = length
                    return m, off
        m = _map_huge(1)
        m.free = [(length, HUGE_PAGE - length)]
        m.used = {0: length}
        self._arenas.append(m)
        return m, 0

    def free(self, mem: DmaMemory) -> None:
        """Return ``mem``.

        After :meth:`close` this does nothing (finalizers of arrays may run after the device
        closed).

        Raises:
            GuestError: ``mem`` is not live memory of this allocator (freed twice, or foreign).
        """
        with self._lock:
            if self._closed:
                return
            entry = self._owner.pop(id(mem), None)
            if entry is None:
                raise GuestError("this DMA buffer is not allocated here (freed twice, or from another transport)")
            m, off, length, arena = entry
            try:
                mem.view.release()
            except BufferError:
                pass
            if not arena:
                _close_mapping(m)
                return
            del m.used[off]
            m.free.append((off, length))
            m.free.sort()
            merged: list[tuple[int, int]] = []
            for o, n in m.free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((o, n))
            m.free = merged
            if not m.used and len(self._arenas) > 1:
                self._arenas.remove(m)
                _close_mapping(m)

    def close(self) -> None:
        """Unmap everything (callers must have stopped the device first)."""
        with self._lock:
            self._closed = True
            for m, _off, _len, arena in self._owner.values():
                if not arena:
                    _close_mapping(m)
            for m in self._arenas:
                _close_mapping(m)
            self._owner.clear()
            self._arenas.clear()

    @property
    def live(self) -> int:
        """Buffers currently allocated."""
        return len(self._owner)


# -- the transport ----------------------------------------------------------------------------

def _quiesce(fn: PciFunction, bar: Bar | None, alloc: HugePageAllocator) -> None:
    """Stop the queue, clear bus mastering, then free the memory (the finalizer's body)."""
    if bar is not None:
        try:
            if bar.read32(xpu.REG_STATUS) & xpu.DeviceStatus.ENABLED:
                bar.write32(xpu.REG_QUEUE_ENABLE, 0)
                deadline = time.monotonic() + QUEUE_STOP_TIMEOUT_S
                while bar.read32(xpu.REG_STATUS) & xpu.DeviceStatus.ENABLED and time.monotonic() < deadline:
                    time.sleep(0.001)
        except GuestError:
            pass
        bar.close()
    try:
        fn.set_bus_master(False)
    except (OSError, GuestError):
        pass
    alloc.close()


class VmTransport:
    """The accelerator inside a VM (see the module docstring).

    Args:
        fn: the PCI function (from :func:`find_function`).

    Raises:
        GuestError: the function cannot be enabled or mapped (not root?), or BAR0 does not
            answer with the accelerator's magic.
    """

    name = "vm"

    def __init__(self, fn: PciFunction) -> None:
        self.function = fn
        self.bdf = fn.bdf
        fn.enable()
        fn.set_bus_master(True)
        self._bar = fn.map_bar(0)
        self._regs = self._bar.u32
        self._dma = HugePageAllocator()
        self._finalizer = weakref.finalize(self, _quiesce, fn, self._bar, self._dma)
        magic = self._bar.read32(xpu.REG_MAGIC)
        if magic != xpu.MAGIC_VALUE:
            self.close()
            raise GuestError(f"{fn.bdf}: BAR0 magic is {magic:#010x}, not {xpu.MAGIC_VALUE:#010x}: not a vxpu "
                             f"accelerator (is the server running?)")
        #: the queue was left running (or fatal) by an owner that died; it was reset at open
        self.recovered = False
        status = self._bar.read32(xpu.REG_STATUS)
        if status & (xpu.DeviceStatus.ENABLED | xpu.DeviceStatus.FATAL):
            self._reset_abandoned(status)

    def _reset_abandoned(self, status: int) -> None:
        """Reset a device whose previous owner died with its queue running.

        Raises:
            GuestError: the reset did not finish within :data:`RESET_TIMEOUT_S`.
        """
        log.warning("%s: the queue was left %s by an earlier user; resetting the device", self.bdf,
                    "fatal" if status & xpu.DeviceStatus.FATAL else "running")
        before = self._bar.read32(xpu.REG_RESET_COUNT)
        self._bar.write32(xpu.REG_CONTROL, int(xpu.Control.RESET))
        deadline = time.monotonic() + RESET_TIMEOUT_S
        while self._bar.read32(xpu.REG_RESET_COUNT) == before:
            if time.monotonic() > deadline:
                self.close()
                raise GuestError(f"{self.bdf}: the device did not finish its reset within {RESET_TIMEOUT_S:g} s")
            time.sleep(0.001)
        self.recovered = True

    @classmethod
    def open(cls, bdf: str | None = None, ids: str | None = None, root: Path = SYSFS_PCI) -> VmTransport:
        """Find the accelerator (see :func:`find_function`) and open it.

        Raises:
            DeviceNotFound: no accelerator is attached.
            GuestError: as the constructor.
        """
        return cls(find_function(bdf, ids, root))

    def read_reg(self, offset: int) -> int:
        """One trapped 32-bit BAR0 read."""
        return self._regs[self._reg_index(offset)]

    def write_reg(self, offset: int, value: int) -> None:
        """One posted 32-bit BAR0 write."""
        self._regs[self._reg_index(offset)] = value & 0xFFFF_FFFF

    @staticmethod
    def _reg_index(offset: int) -> int:
        if offset % 4 or not 0 <= offset < xpu.BAR0_SIZE:
            raise GuestError(f"bad register offset {offset:#x} (BAR0 is {xpu.BAR0_SIZE:#x} bytes, 4-byte aligned)")
        return offset >> 2

    def alloc_dma(self, size: int, *, contiguous: bool = False) -> DmaMemory:
        """Zeroed, pinned huge-page memory (see :meth:`HugePageAllocator.alloc`)."""
        if not self._finalizer.alive:
            raise GuestError("the VM transport is closed")
        return self._dma.alloc(size, contiguous)

    def free_dma(self, mem: DmaMemory) -> None:
        """Give ``mem`` back (see :meth:`HugePageAllocator.free`)."""
        self._dma.free(mem)

    @property
    def live_dma(self) -> int:
        """DMA buffers currently allocated."""
        return self._dma.live

    def close(self) -> None:
        """Stop the queue, clear bus mastering, unmap BAR0 and free all DMA memory (idempotent)."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["HugePageAllocator", "VmTransport", "find_function", "parse_ids", "reserve_huge_pages"]
