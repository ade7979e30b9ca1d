"""PCI configuration space: bytes plus per-byte write masks.

A type-0 configuration space is modelled the way QEMU and libvfio-user do it: three byte arrays
of the same size (256 bytes for conventional PCI, 4096 with a PCI Express capability):

* ``data``  — what a read returns;
* ``wmask`` — bits a write may change (everything else is read-only);
* ``w1c``   — write-1-to-clear bits (a 1 written clears the bit, a 0 leaves it).

A write therefore computes ``new = (old & ~wmask) | (val & wmask)`` and then
``new &= ~(val & w1c)``, on whole slices at once (as Python integers, never byte by byte).
BAR sizing falls out of the masks: a BAR's address bits below its size are read-only zeros, so
writing all-ones reads back the size mask with the read-only type bits.

The contents of the header (IDs, class, BARs, interrupt pin) are filled in by
:class:`vxpu.vfio_server.pci.device.PciDevice`; capabilities by :mod:`.caps`.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from vxpu.errors import Error

log = logging.getLogger(__name__)

CONFIG_SIZE_PCI = 256
CONFIG_SIZE_PCIE = 4096

# Type-0 header offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09          # 3 bytes: prog-if, subclass, base class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F
HEADER_END = 0x40          # first byte available to capabilities
EXT_CAP_START = 0x100      # first extended capability (PCIe config space only)

NUM_BARS = 6


class Command(enum.IntFlag):
    """Command register bits (0x04)."""

    IO = 0x0001
    MEMORY = 0x0002
    BUS_MASTER = 0x0004
    PARITY = 0x0040
    SERR = 0x0100
    INTX_DISABLE = 0x0400


class Status(enum.IntFlag):
    """Status register bits (0x06)."""

    INTERRUPT = 0x0008
    CAP_LIST = 0x0010
    MASTER_DATA_PARITY = 0x0100
    SIG_TARGET_ABORT = 0x0800
    REC_TARGET_ABORT = 0x1000
    REC_MASTER_ABORT = 0x2000
    SIG_SYSTEM_ERROR = 0x4000
    DETECTED_PARITY = 0x8000


# Error-reporting status bits are write-1-to-clear.
STATUS_W1C = (Status.MASTER_DATA_PARITY | Status.SIG_TARGET_ABORT | Status.REC_TARGET_ABORT
              | Status.REC_MASTER_ABORT | Status.SIG_SYSTEM_ERROR | Status.DETECTED_PARITY)


class DeviceDefinitionError(Error):
    """A device model declared something PCI cannot express (bad BAR size, overlapping
    registers, config space too small for its capabilities). Fix the device definition."""


@dataclass(frozen=True)
class FieldSpec:
    """One config-space field: ``size`` bytes at ``offset`` with a value and its masks."""

    offset: int
    size: int
    value: int = 0
    wmask: int = 0
    w1c: int = 0


class MaskedBytes:
    """Bytes with a write mask and a write-1-to-clear mask, reset to a remembered image.

    Args:
        size: number of bytes.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1c = bytearray(size)
        self._reset_image = bytes(size)

    # -- definition time -----------------------------------------------------------------------

    def define(self, spec: FieldSpec) -> None:
        """Set a field's value and masks (device definition time).

        Raises:
            DeviceDefinitionError: the field leaves the space, or a bit is both writable and
                write-1-to-clear.
        """
        end = spec.offset + spec.size
        if spec.offset < 0 or spec.size not in (1, 2, 3, 4, 8) or end > self.size:
            raise DeviceDefinitionError(f"field {spec.offset:#x}+{spec.size} outside a {self.size}-byte space")
        if spec.wmask & spec.w1c:
            raise DeviceDefinitionError(f"field {spec.offset:#x}: bits both RW and W1C")
        self.data[spec.offset:end] = spec.value.to_bytes(spec.size, "little")
        self.wmask[spec.offset:end] = spec.wmask.to_bytes(spec.size, "little")
        self.w1c[spec.offset:end] = spec.w1c.to_bytes(spec.size, "little")

    def freeze_reset_image(self) -> None:
        """Remember the current contents as the power-on/reset state."""
        self._reset_image = bytes(self.data)

    def reset(self) -> None:
        """Return every writable and write-1-to-clear bit to its reset value.

        Read-only bits keep their current value (they may be device-maintained, like a pending
        bit or a status bit), so this implements reset for software-visible state.
        """
        cur = int.from_bytes(self.data, "little")
        img = int.from_bytes(self._reset_image, "little")
        changeable = int.from_bytes(self.wmask, "little") | int.from_bytes(self.w1c, "little")
        new = (cur & ~changeable) | (img & changeable)
        self.data[:] = new.to_bytes(self.size, "little")

    # -- accesses ------------------------------------------------------------------------------

    def read(self, offset: int, count: int) -> bytes:
        """Return ``count`` bytes at ``offset`` (the caller bounds-checked the range)."""
        return bytes(self.data[offset:offset + count])

    def write(self, offset: int, value: bytes) -> None:
        """Apply a write through the write and write-1-to-clear masks (caller bounds-checked)."""
        end = offset + len(value)
        old = int.from_bytes(self.data[offset:end], "little")
        wm = int.from_bytes(self.wmask[offset:end], "little")
        c = int.from_bytes(self.w1c[offset:end], "little")
        v = int.from_bytes(value, "little")
        new = ((old & ~wm) | (v & wm)) & ~(v & c)
        self.data[offset:end] = new.to_bytes(len(value), "little")

    # -- device-side helpers (bypass the masks) ------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        """Read a little-endian field of ``size`` bytes."""
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Store a little-endian field of ``size`` bytes, ignoring the write masks."""
        self.data[offset:offset + size] = value.to_bytes(size, "little")


class ConfigSpace(MaskedBytes):
    """The bytes of a type-0 configuration space and their write masks.

    Args:
        size: 256 (conventional PCI) or 4096 (PCI Express).

    Raises:
        DeviceDefinitionError: for any other size.
    """

    def __init__(self, size: int = CONFIG_SIZE_PCI) -> None:
        if size not in (CONFIG_SIZE_PCI, CONFIG_SIZE_PCIE):
            raise DeviceDefinitionError(f"config space size must be 256 or 4096, not {size}")
        super().__init__(size)

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    @property
    def status(self) -> int:
        return self.get(STATUS, 2)


def overlaps(offset: int, count: int, start: int, size: int) -> bool:
    """Whether ``[offset, offset+count)`` intersects ``[start, start+size)``."""
    return offset < start + size and start < offset + count
