"""PCI functions seen from inside a Linux guest, through sysfs only (no kernel driver).

A :class:`PciFunction` is one ``/sys/bus/pci/devices/<bdf>`` directory: identity from the
``vendor``/``device``/``class`` attributes, BAR sizes and flags from ``resource``, config space
through ``config`` (pread/pwrite, which works without a bound driver), the capability list, and
memory BARs mapped from ``resourceN``. Memory BARs support mmap only (pread gives EIO). A
:class:`Bar` exposes 32-bit register access through a ``memoryview`` cast to ``"I"``; every
access is one MMIO access, which QEMU traps and forwards to the vxpu server.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from vxpu.guest.errors import DeviceNotFound, GuestError

SYSFS_PCI = Path("/sys/bus/pci/devices")

# Config-space offsets and bits (PCI Local Bus spec).
CFG_COMMAND = 0x04
CFG_STATUS = 0x06
CFG_CAP_PTR = 0x34
CMD_MEMORY = 0x2
CMD_BUS_MASTER = 0x4
STATUS_CAP_LIST = 0x10
CAP_ID_MSI = 0x05
CAP_ID_MSIX = 0x11
_MAX_CAPS = 48  # (256 - 64) / 4: a longer chain is a loop

# IORESOURCE_* flags of the sysfs ``resource`` file.
RES_IO = 0x100
RES_MEM = 0x200
RES_PREFETCH = 0x2000
RES_MEM_64 = 0x100000


@dataclass(frozen=True)
class Resource:
    """One line of the sysfs ``resource`` file: ``[start, end]`` and IORESOURCE flags."""

    start: int
    end: int
    flags: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1 if self.end > self.start else 0


def _hex_attr(path: Path) -> int:
    return int(path.read_text().strip(), 16)


class PciFunction:
    """A PCI function in sysfs.

    Args:
        path: its ``/sys/bus/pci/devices/<bdf>`` directory (or a fixture copy).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bdf = path.name

    @classmethod
    def find(cls, vendor: int, device: int, root: Path = SYSFS_PCI) -> list[PciFunction]:
        """Every function with these IDs, in bus order."""
        found = []
        for entry in sorted(root.iterdir()) if root.is_dir() else ():
            try:
                if _hex_attr(entry / "vendor") == vendor and _hex_attr(entry / "device") == device:
                    found.append(cls(entry))
            except (OSError, ValueError):
                continue
        return found

    @classmethod
    def find_one(cls, vendor: int, device: int, root: Path = SYSFS_PCI) -> PciFunction:
        """The first function with these IDs.

        Raises:
            DeviceNotFound: there is none.
        """
        found = cls.find(vendor, device, root)
        if not found:
            raise DeviceNotFound(f"no PCI device {vendor:04x}:{device:04x} in {root}; attach one to the VM")
        return found[0]

    @property
    def vendor(self) -> int:
        return _hex_attr(self.path / "vendor")

    @property
    def device(self) -> int:
        return _hex_attr(self.path / "device")

    @property
    def class_code(self) -> int:
        """The 24-bit class code (base class, subclass, programming interface)."""
        return _hex_attr(self.path / "class")

    def resources(self) -> list[Resource]:
        """BAR0-5, ROM and bridge windows as listed in the ``resource`` file."""
        out = []
        for line in (self.path / "resource").read_text().splitlines():
            start, end, flags = (int(x, 16) for x in line.split())
            out.append(Resource(start, end, flags))
        return out

    def config_read(self, offset: int, size: int = 4) -> int:
        """Read a 1-, 2- or 4-byte little-endian config-space field.

        Raises:
            GuestError: a bad size/offset, or sysfs returned short data.
        """
        if size not in (1, 2, 4) or offset < 0 or offset % size:
            raise GuestError(f"bad config access: {size} bytes at {offset:#x}")
        fd = os.open(self.path / "config", os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise GuestError(f"{self.bdf}: config read at {offset:#x} returned {len(data)} bytes (needs root)")
        return int.from_bytes(data, "little")

    def config_write(self, offset: int, value: int, size: int = 4) -> None:
        """Write a 1-, 2- or 4-byte little-endian config-space field (root only).

        Raises:
            GuestError: a bad size/offset/value, or sysfs refused the write.
        """
        if size not in (1, 2, 4) or offset < 0 or offset % size or not 0 <= value < 1 << (8 * size):
            raise GuestError(f"bad config write: {size} bytes of {value:#x} at {offset:#x}")
        fd = os.open(self.path / "config", os.O_WRONLY)
        try:
            if os.pwrite(fd, value.to_bytes(size, "little"), offset) != size:
                raise GuestError(f"{self.bdf}: short config write at {offset:#x}")
        finally:
            os.close(fd)

    def capabilities(self) -> list[tuple[int, int]]:
        """The standard capability list as ``(cap_id, offset)`` pairs, walked safely.

        Raises:
            GuestError: the chain loops or points into the header.
        """
        if not self.config_read(CFG_STATUS, 2) & STATUS_CAP_LIST:
            return []
        caps: list[tuple[int, int]] = []
        ptr = self.config_read(CFG_CAP_PTR, 1) & 0xFC
        while ptr:
            if ptr < 0x40 or len(caps) >= _MAX_CAPS:
                raise GuestError(f"{self.bdf}: broken capability chain at {ptr:#x}")
            word = self.config_read(ptr, 2)
            caps.append((word & 0xFF, ptr))
            ptr = (word >> 8) & 0xFC
        return caps

    def find_capability(self, cap_id: int) -> int | None:
        """Offset of the first capability ``cap_id``, or None."""
        return next((off for cid, off in self.capabilities() if cid == cap_id), None)

    def enable(self) -> None:
        """Enable the device (memory decoding) through the sysfs ``enable`` attribute.

        Raises:
            GuestError: sysfs refused (not root?).
        """
        try:
            (self.path / "enable").write_text("1")
        except OSError as exc:
            raise GuestError(f"{self.bdf}: cannot enable: {exc} (needs root)") from exc

    def set_bus_master(self, on: bool = True) -> None:
        """Set or clear Bus Master Enable (needed for DMA and for MSI delivery)."""
        cmd = self.config_read(CFG_COMMAND, 2)
        new = (cmd | CMD_BUS_MASTER | CMD_MEMORY) if on else (cmd & ~CMD_BUS_MASTER)
        if new != cmd:
            self.config_write(CFG_COMMAND, new, 2)

    def map_bar(self, index: int) -> Bar:
        """mmap memory BAR ``index``.

        Raises:
            GuestError: the BAR does not exist, is an I/O BAR, or cannot be mapped.
        """
        res = self.resources()
        if not 0 <= index < 6 or index >= len(res) or res[index].size == 0:
            raise GuestError(f"{self.bdf}: BAR{index} does not exist")
        if not res[index].flags & RES_MEM:
            raise GuestError(f"{self.bdf}: BAR{index} is not a memory BAR")
        return Bar(self.path / f"resource{index}", res[index].size)


class Bar:
    """A memory BAR mapped into this process, with 32-bit register access.

    Args:
        path: the sysfs ``resourceN`` file.
        size: the BAR size in bytes.

    Raises:
        GuestError: the mapping failed.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.size = size
        try:
            fd = os.open(path, os.O_RDWR | os.O_SYNC)
        except OSError as exc:
            raise GuestError(f"cannot open {path}: {exc} (enable the device first; needs root)") from exc
        try:
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise GuestError(f"cannot mmap {path}: {exc}") from exc
        finally:
            os.close(fd)
        self.u32 = memoryview(self._mm).cast("I")

    def _index(self, offset: int) -> int:
        if offset % 4 or not 0 <= offset < self.size:
            raise GuestError(f"bad register offset {offset:#x} (BAR is {self.size:#x} bytes, 4-byte aligned)")
        return offset >> 2

    def read32(self, offset: int) -> int:
        """One 32-bit MMIO read at ``offset``."""
        return self.u32[self._index(offset)]

    def write32(self, offset: int, value: int) -> None:
        """One 32-bit MMIO write at ``offset``."""
        self.u32[self._index(offset)] = value & 0xFFFFFFFF

    def close(self) -> None:
        """Unmap (the memoryview is released first, or mmap.close raises BufferError)."""
        if self._mm.closed:
            return
        self.u32.release()
        self._mm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
