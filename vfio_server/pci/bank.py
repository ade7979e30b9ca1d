"""What sits behind a BAR: register banks and plain memory.

A BAR is served by a :class:`BarHandler`: ``read(offset, count)`` / ``write(offset, data)`` with
offsets relative to the BAR (or to the window of the BAR the handler was given), plus
``reset()``. Two handlers cover most devices:

* :class:`RegisterBank` — a declarative table of registers. Each :class:`Register` has an
  offset, a name, an :class:`Access` (RO, RW, W1C, WO), a width (1, 2, 4 or 8 bytes), a reset
  value and optional side-effect callbacks. Accesses must be 1, 2, 4 or 8 bytes and naturally
  aligned (QEMU never sends anything else for MMIO); one access may span several registers,
  e.g. a 64-bit access over two 32-bit registers, which are then handled in ascending order.
  Offsets with no register read as zero and ignore writes, like reserved registers in hardware.
  Partial writes merge the written bytes into the register's current value (write-only
  registers merge into zero); the write callback sees the merged value.
* :class:`RamRegion` — plain read/write memory of any access size.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from vxpu.vfio_server.errors import ProtocolError
from vxpu.vfio_server.pci.config import DeviceDefinitionError

log = logging.getLogger(__name__)

REGISTER_ACCESS_SIZES = (1, 2, 4, 8)


class BarHandler(Protocol):
    """Serves accesses to one BAR, or to one window of it. The caller has checked that
    ``[offset, offset + count)`` lies inside the handler's window."""

    def read(self, offset: int, count: int) -> bytes:
        """Return exactly ``count`` bytes.

        Raises:
            ProtocolError: (EINVAL) an access size or alignment the handler refuses.
        """

    def write(self, offset: int, data: bytes) -> None:
        """Apply a write.

        Raises:
            ProtocolError: (EINVAL) an access size or alignment the handler refuses.
        """

    def reset(self) -> None:
        """Return to the reset state (device reset)."""


def check_register_access(offset: int, count: int, size: int) -> None:
    """Refuse what a register window cannot serve.

    Raises:
        ProtocolError: EINVAL when ``count`` is not 1, 2, 4 or 8, ``offset`` is not a multiple
            of ``count``, or the access leaves the ``size``-byte window.
    """
    if count not in REGISTER_ACCESS_SIZES:
        raise ProtocolError(errno.EINVAL, f"register access of {count} bytes (1, 2, 4 or 8 only)")
    if offset % count:
        raise ProtocolError(errno.EINVAL, f"unaligned {count}-byte register access at {offset:#x}")
    if offset < 0 or offset + count > size:
        raise ProtocolError(errno.EINVAL, f"register access {offset:#x}+{count} outside {size:#x} bytes")


class Access(enum.Enum):
    """How the guest may access a register."""

    RO = "ro"      # reads the value; writes ignored (the device changes it)
    RW = "rw"      # reads back what was written (through ``Register.wmask``)
    W1C = "w1c"    # reads the value; a 1 written clears that bit
    WO = "wo"      # reads 0; a write hands the value to ``on_write``


@dataclass(frozen=True)
class Register:
    """One register of a :class:`RegisterBank`.

    Args:
        offset: byte offset in the bank, a multiple of ``width``.
        name: unique name, used by the device through :meth:`RegisterBank.get`/``set``.
        access: see :class:`Access`.
        reset: value after power-on and after reset.
        width: 1, 2, 4 or 8 bytes.
        on_write: called with the register's new value after each guest write to it.
        on_read: computes the value on each guest read (instead of the stored value).
        keep_on_reset: the value survives :meth:`RegisterBank.reset` (e.g. a reset counter).
        wmask: writable bits of an RW register (default: all).
    """

    offset: int
    name: str
    access: Access = Access.RW
    reset: int = 0
    width: int = 4
    on_write: Callable[[int], None] | None = None
    on_read: Callable[[], int] | None = None
    keep_on_reset: bool = False
    wmask: int | None = None


class RegisterBank:
    """A table of registers serving one BAR window.

    Args:
        size: window size in bytes.
        registers: the registers; naturally aligned, inside the window, not overlapping.

    Raises:
        DeviceDefinitionError: a register is misaligned, outside the window, overlaps another,
            repeats a name, or has a reset value wider than itself.
    """

    def __init__(self, size: int, registers: Iterable[Register]) -> None:
        self.size = size
        self._by_offset: dict[int, Register] = {}
        self._by_name: dict[str, Register] = {}
        self._values: dict[str, int] = {}
        end = 0
        for reg in sorted(registers, key=lambda r: r.offset):
            self._check_definition(reg, end)
            end = reg.offset + reg.width
            self._by_offset[reg.offset] = reg
            self._by_name[reg.name] = reg
            self._values[reg.name] = reg.reset

    def _check_definition(self, reg: Register, previous_end: int) -> None:
        if reg.width not in REGISTER_ACCESS_SIZES or reg.offset % reg.width:
            raise DeviceDefinitionError(f"register {reg.name}: width {reg.width} at {reg.offset:#x}")
        if reg.offset < previous_end or reg.offset + reg.width > self.size:
            raise DeviceDefinitionError(f"register {reg.name} at {reg.offset:#x} overlaps or leaves the bank")
        if reg.name in self._by_name:
            raise DeviceDefinitionError(f"register name {reg.name} used twice")
        if reg.reset >> (8 * reg.width):
            raise DeviceDefinitionError(f"register {reg.name}: reset value wider than the register")

    # -- device side ---------------------------------------------------------------------------

    def get(self, name: str) -> int:
        """The stored value of register ``name`` (KeyError for an unknown name: a bug)."""
        return self._values[name]

    def set(self, name: str, value: int) -> None:
        """Store ``value`` in register ``name``, bypassing the access rules (device side)."""
        reg = self._by_name[name]
        self._values[name] = value & ((1 << (8 * reg.width)) - 1)

    def reset(self) -> None:
        """Every register not marked ``keep_on_reset`` goes back to its reset value."""
        for name, reg in self._by_name.items():
            if not reg.keep_on_reset:
                self._values[name] = reg.reset

    # -- guest side ----------------------------------------------------------------------------

    def _guest_value(self, reg: Register) -> int:
        if reg.access is Access.WO:
            return 0
        if reg.on_read is not None:
            return reg.on_read() & ((1 << (8 * reg.width)) - 1)
        return self._values[reg.name]

    def _overlapping(self, offset: int, count: int) -> list[Register]:
        # Registers are naturally aligned and at most 8 bytes wide, so any register that
        # overlaps [offset, offset+count) starts in [offset & ~7, offset + count).
        found = []
        for start in range(offset & ~7, offset + count):
            reg = self._by_offset.get(start)
            if reg is not None and start + reg.width > offset:
                found.append(reg)
        return found

    def read(self, offset: int, count: int) -> bytes:
        """Serve a guest read (see the module docstring for the rules).

        Raises:
            ProtocolError: EINVAL for a bad size, alignment or range.
        """
        check_register_access(offset, count, self.size)
        reg = self._by_offset.get(offset)
        if reg is not None and reg.width == count:
            return self._guest_value(reg).to_bytes(count, "little")
        value = 0
        for reg in self._overlapping(offset, count):
            lo, hi = max(offset, reg.offset), min(offset + count, reg.offset + reg.width)
            part = (self._guest_value(reg) >> (8 * (lo - reg.offset))) & ((1 << (8 * (hi - lo))) - 1)
            value |= part << (8 * (lo - offset))
        return value.to_bytes(count, "little")

    def write(self, offset: int, data: bytes) -> None:
        """Serve a guest write (see the module docstring for the rules).

        Raises:
            ProtocolError: EINVAL for a bad size, alignment or range.
        """
        count = len(data)
        check_register_access(offset, count, self.size)
        value = int.from_bytes(data, "little")
        reg = self._by_offset.get(offset)
        if reg is not None and reg.width == count:
            self._store(reg, value, (1 << (8 * count)) - 1)
            return
        for reg in self._overlapping(offset, count):
            lo, hi = max(offset, reg.offset), min(offset + count, reg.offset + reg.width)
            shift = 8 * (lo - reg.offset)
            field_mask = ((1 << (8 * (hi - lo))) - 1) << shift
            field = ((value >> (8 * (lo - offset))) << shift) & field_mask
            self._store(reg, field, field_mask)

    def _store(self, reg: Register, field: int, field_mask: int) -> None:
        """Merge the written bytes ``field`` (covering ``field_mask``) into ``reg``."""
        access = reg.access
        if access is Access.RO:
            log.debug("write to read-only register %s ignored", reg.name)
            return
        cur = self._values[reg.name]
        if access is Access.RW:
            wm = field_mask if reg.wmask is None else field_mask & reg.wmask
            new = (cur & ~wm) | (field & wm)
        elif access is Access.W1C:
            new = cur & ~field
        else:  # WO
            new = field
        self._values[reg.name] = new
        if reg.on_write is not None:
            reg.on_write(new)


class RamRegion:
    """Plain read/write memory of ``size`` bytes; any access size; zeroed on reset."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._mem = bytearray(size)

    def read(self, offset: int, count: int) -> bytes:
        """Return ``count`` bytes at ``offset``."""
        return bytes(self._mem[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset``."""
        self._mem[offset:offset + len(data)] = data

    def reset(self) -> None:
        """Zero the memory."""
        self._mem[:] = bytes(self.size)
