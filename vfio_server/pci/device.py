"""PciDevice: a PCI function served over vfio-user, built from a declaration.

A device model subclasses :class:`PciDevice` and declares what the guest sees:

* :class:`PciIds` — vendor/device/subsystem IDs, class code, revision;
* :class:`Bar` s — index, size (a power of two), kind (32/64-bit memory or I/O), prefetchable,
  and the :class:`~vxpu.vfio_server.pci.bank.BarHandler` that serves it (usually a
  :class:`~vxpu.vfio_server.pci.bank.RegisterBank`);
* interrupts — the INTx pin (INTA or none), MSI (on by default, 1 vector), optional MSI-X
  (table and PBA inside a BAR), and the optional PCI Express and power-management capabilities.

From that, this class implements :class:`vxpu.vfio_server.device.VfioDevice`: the type-0 config
space with write masks (region 7), BAR routing (regions 0-5), region and irq info, reset, and
the guards a real function has — BAR accesses need memory (or I/O) decode, DMA needs bus
mastering, interrupts go out only on what the guest enabled. The device never sees the
protocol: it gets offsets inside its BARs, and a DeviceContext for DMA and interrupts.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vxpu.vfio_server.device import CONFIG_REGION, DeviceContext, IrqIndex, IrqInfo, RegionFlags, RegionInfo
from vxpu.vfio_server.errors import DmaError, ProtocolError
from vxpu.vfio_server.pci import caps as capmod
from vxpu.vfio_server.pci import config as c
from vxpu.vfio_server.pci.bank import BarHandler
from vxpu.vfio_server.pci.config import Command, ConfigSpace, DeviceDefinitionError, FieldSpec, overlaps

from vxpu.errors import StateError

if TYPE_CHECKING:
    from vxpu.vfio_server.dma import DmaSpace

log = logging.getLogger(__name__)

IRQ_EVENTFD = 1
IRQ_MASKABLE = 2
IRQ_AUTOMASKED = 4
IRQ_NORESIZE = 8

INTX_PIN_NONE = 0
INTX_PIN_A = 1

# Plain ints for the hot paths (IntFlag arithmetic builds enum members on every use).
_CMD_IO = int(Command.IO)
_CMD_MEMORY = int(Command.MEMORY)
_CMD_BUS_MASTER = int(Command.BUS_MASTER)
_CMD_INTX_DISABLE = int(Command.INTX_DISABLE)


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass(frozen=True)
class PciIds:
    """The identity a device shows in config space (all read-only to the guest)."""

    vendor_id: int
    device_id: int
    class_code: int                 # 24 bits: base class, subclass, programming interface
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0


@dataclass(frozen=True)
class Bar:
    """One BAR: ``size`` bytes (a power of two) served by ``handler``."""

    index: int
    size: int
    handler: BarHandler
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False


class BusMasterDisabled(StateError):
    """The device tried to DMA while the guest has bus mastering off (or the function is in
    D3hot). The guest driver must set the command register's Bus Master bit first."""

    def __init__(self) -> None:
        super().__init__("DMA refused", current="bus master disabled", required="bus master enabled")


@dataclass(frozen=True)
class _Window:
    start: int
    end: int
    handler: BarHandler


def _check_bar(bar: Bar) -> None:
    """Raises DeviceDefinitionError for a BAR PCI cannot express."""
    size, kind = bar.size, bar.kind
    if size <= 0 or size & (size - 1):
        raise DeviceDefinitionError(f"BAR{bar.index} size {size:#x} is not a power of two")
    if kind is BarKind.IO and not 4 <= size <= 256:
        raise DeviceDefinitionError(f"I/O BAR{bar.index}: size must be 4..256 bytes")
    if kind is BarKind.IO and bar.prefetchable:
        raise DeviceDefinitionError(f"I/O BAR{bar.index} cannot be prefetchable")
    if kind is BarKind.MEM32 and not 16 <= size <= 1 << 31:
        raise DeviceDefinitionError(f"32-bit BAR{bar.index}: size must be 16 bytes..2 GiB")
    if kind is BarKind.MEM64 and not 16 <= size <= 1 << 63:
        raise DeviceDefinitionError(f"64-bit BAR{bar.index}: size must be 16 bytes..8 EiB")
    last = bar.index + (1 if kind is BarKind.MEM64 else 0)
    if not 0 <= bar.index or last >= c.NUM_BARS:
        raise DeviceDefinitionError(f"BAR{bar.index} ({kind.value}) does not fit in BAR0-5")


class PciDevice:
    """Base class of vfio-user PCI device models (implements ``VfioDevice``).

    Args:
        ids: the PCI identity.
        bars: the BARs; indexes distinct, a 64-bit BAR also takes the next index.
        interrupt_pin: ``INTX_PIN_A`` or ``INTX_PIN_NONE``.
        msi_vectors: MSI vectors (power of two up to 32); 0 for no MSI capability.
        msi_per_vector_mask: give MSI the mask and pending registers.
        msix: MSI-X layout, or None for no MSI-X capability.
        pcie: add a PCI Express endpoint capability (and a 4096-byte config space).
        pm: add a power-management capability.

    Raises:
        DeviceDefinitionError: anything PCI cannot express (see the messages).
    """

    reset_supported = True

    def __init__(self, ids: PciIds, bars: Sequence[Bar], *, interrupt_pin: int = INTX_PIN_A,
                 msi_vectors: int = 1, msi_per_vector_mask: bool = False,
                 msix: capmod.MsixLayout | None = None, pcie: bool = False, pm: bool = False) -> None:
        if interrupt_pin not in (INTX_PIN_NONE, INTX_PIN_A):
            raise DeviceDefinitionError("interrupt_pin must be INTX_PIN_A or INTX_PIN_NONE")
        self.ids = ids
        self.interrupt_pin = interrupt_pin
        self._bars: dict[int, Bar] = {}
        for bar in bars:
            self._add_bar(bar)
        self.pm = capmod.PmCapability() if pm else None
        self.msi = capmod.MsiCapability(msi_vectors, msi_per_vector_mask) if msi_vectors else None
        self.msix = capmod.MsixCapability(msix) if msix is not None else None
        self.pcie = capmod.PcieCapability() if pcie else None
        self.capabilities: list[capmod.Capability] = [
            cap for cap in (self.pm, self.msi, self.msix, self.pcie) if cap is not None]
        self.config = ConfigSpace(c.CONFIG_SIZE_PCIE if pcie else c.CONFIG_SIZE_PCI)
        self._define_header()
        capmod.install_chain(self.config, self.capabilities)
        self.config.freeze_reset_image()
        self._windows = self._build_windows()
        self._ctx: DeviceContext | None = None
        self._warned_decode = False

    # -- definition ----------------------------------------------------------------------------

    def _add_bar(self, bar: Bar) -> None:
        _check_bar(bar)
        taken = {bar.index, bar.index + 1} if bar.kind is BarKind.MEM64 else {bar.index}
        for other in self._bars.values():
            other_taken = {other.index, other.index + 1} if other.kind is BarKind.MEM64 else {other.index}
            if taken & other_taken:
                raise DeviceDefinitionError(f"BAR{bar.index} collides with BAR{other.index}")
        self._bars[bar.index] = bar

    def _define_header(self) -> None:
        cfg, ids = self.config, self.ids
        cfg.define(FieldSpec(c.VENDOR_ID, 2, ids.vendor_id))
        cfg.define(FieldSpec(c.DEVICE_ID, 2, ids.device_id))
        cmd_mask = Command.MEMORY | Command.BUS_MASTER | Command.PARITY | Command.SERR | Command.INTX_DISABLE
        if any(b.kind is BarKind.IO for b in self._bars.values()):
            cmd_mask |= Command.IO
        cfg.define(FieldSpec(c.COMMAND, 2, 0, wmask=cmd_mask))
        cfg.define(FieldSpec(c.STATUS, 2, 0, w1c=c.STATUS_W1C))
        cfg.define(FieldSpec(c.REVISION_ID, 1, ids.revision))
        cfg.define(FieldSpec(c.CLASS_PROG, 3, ids.class_code))
        cfg.define(FieldSpec(c.CACHE_LINE_SIZE, 1, 0, wmask=0xFF))
        # PCI Express functions hardwire the latency timer to 0.
        cfg.define(FieldSpec(c.LATENCY_TIMER, 1, 0, wmask=0 if self.pcie else 0xFF))
        cfg.define(FieldSpec(c.HEADER_TYPE, 1, 0))
        for bar in self._bars.values():
            self._define_bar(bar)
        cfg.define(FieldSpec(c.SUBSYSTEM_VENDOR_ID, 2, ids.subsystem_vendor_id))
        cfg.define(FieldSpec(c.SUBSYSTEM_ID, 2, ids.subsystem_id))
        cfg.define(FieldSpec(c.ROM_ADDRESS, 4, 0))          # no expansion ROM: reads 0, ignores writes
        cfg.define(FieldSpec(c.INTERRUPT_LINE, 1, 0, wmask=0xFF))
        cfg.define(FieldSpec(c.INTERRUPT_PIN, 1, self.interrupt_pin))

    def _define_bar(self, bar: Bar) -> None:
        off = c.BAR0 + 4 * bar.index
        addr_mask = ~(bar.size - 1)
        if bar.kind is BarKind.IO:
            self.config.define(FieldSpec(off, 4, 0x1, wmask=addr_mask & 0xFFFFFFFC))
            return
        flags = (0x4 if bar.kind is BarKind.MEM64 else 0x0) | (0x8 if bar.prefetchable else 0x0)
        self.config.define(FieldSpec(off, 4, flags, wmask=addr_mask & 0xFFFFFFF0))
        if bar.kind is BarKind.MEM64:
            self.config.define(FieldSpec(off + 4, 4, 0, wmask=(addr_mask >> 32) & 0xFFFFFFFF))

    def _build_windows(self) -> dict[int, list[_Window]]:
        """Per BAR: the MSI-X table/PBA windows first, then the BAR's own handler."""
        windows: dict[int, list[_Window]] = {i: [] for i in self._bars}
        if self.msix is not None:
            lay = self.msix.layout
            for bar_idx, start, handler in ((lay.table_bar, lay.table_offset, self.msix.table),
                                            (lay.pba_bar, lay.pba_offset, self.msix.pba)):
                bar = self._bars.get(bar_idx)
                if bar is None or bar.kind is BarKind.IO or start + handler.size > bar.size:
                    raise DeviceDefinitionError(f"MSI-X structure at BAR{bar_idx}+{start:#x} is outside a memory BAR")
                win = _Window(start, start + handler.size, handler)
                if any(overlaps(w.start, w.end - w.start, win.start, handler.size) for w in windows[bar_idx]):
                    raise DeviceDefinitionError("MSI-X table and PBA overlap")
                windows[bar_idx].append(win)
        for idx, bar in self._bars.items():
            windows[idx].append(_Window(0, bar.size, bar.handler))
        return windows

    # -- state the device model uses -----------------------------------------------------------

    @property
    def config_size(self) -> int:
        return self.config.size

    @property
    def command(self) -> int:
        return self.config.get(c.COMMAND, 2)

    @property
    def memory_enabled(self) -> bool:
        """Memory decode (command bit 1)."""
        return bool(self.config.data[c.COMMAND] & _CMD_MEMORY)

    @property
    def io_enabled(self) -> bool:
        return bool(self.config.data[c.COMMAND] & _CMD_IO)

    @property
    def bus_master_enabled(self) -> bool:
        """Bus mastering (command bit 2) and the function in D0: the device may DMA."""
        powered = self.pm is None or self.pm.power_state == capmod.PM_D0
        return bool(self.config.data[c.COMMAND] & _CMD_BUS_MASTER) and powered

    @property
    def context(self) -> DeviceContext | None:
        """The connected client's context, or None while no client is connected."""
        return self._ctx

    @property
    def interrupt_vectors(self) -> int:
        """How many vectors :meth:`raise_irq` can signal now: MSI-X table size when MSI-X is
        on, the allocated MSI vectors when MSI is on, 1 for INTx, 0 when nothing is usable."""
        if self.msix is not None and self.msix.enabled:
            return self.msix.layout.vectors
        if self.msi is not None and self.msi.enabled:
            return self.msi.enabled_vectors
        if self.interrupt_pin and not self.command & _CMD_INTX_DISABLE:
            return 1
        return 0

    def bar(self, index: int) -> Bar | None:
        return self._bars.get(index)

    def dma_space(self) -> DmaSpace:
        """The guest's DMA map table, for device DMA (translate, translate_sg, read_async ...).

        Raises:
            BusMasterDisabled: the guest has not enabled bus mastering (or is in D3hot).
            DmaError: no client is connected (ENODEV).
        """
        if not self.bus_master_enabled:
            raise BusMasterDisabled()
        ctx = self._ctx
        if ctx is None:
            raise DmaError("no client connected: no guest memory is mapped", errno.ENODEV)
        return ctx.dma

    def dma_view(self, addr: int, length: int, *, write: bool) -> memoryview:
        """Host memory for guest-physical ``[addr, addr + length)``, for device DMA. Release
        the view when done: a view kept past DMA_UNMAP pins the mapping.

        Raises:
            BusMasterDisabled: the guest has not enabled bus mastering (or is in D3hot).
            DmaError: no client is connected (ENODEV), or the range is not inside one fd-backed
                mapping (EFAULT: unmapped, crossing mappings, message-DMA only; EPERM: a write
                to a read-only map).
        """
        return self.dma_space().translate(addr, length, write)

    def raise_irq(self, vector: int = 0) -> bool:
        """Signal ``vector`` on whatever the guest enabled (MSI-X, MSI, else INTx).

        Returns True when the interrupt went out. A vector beyond what is enabled, a masked
        vector (its pending bit is set then), INTx disabled, or no client: False.
        """
        ctx = self._ctx
        if ctx is None or vector < 0:
            return False
        msix, msi = self.msix, self.msi
        if msix is not None and msix.enabled:
            if vector >= msix.layout.vectors:
                return False
            sent = not msix.function_masked and ctx.raise_irq(vector)
            msix.set_pending(vector, not sent)
            return sent
        if msi is not None and msi.enabled:
            if vector >= msi.enabled_vectors:
                return False
            if msi.masked(vector):
                msi.set_pending(vector, True)
                return False
            return ctx.raise_irq(vector)
        if vector == 0 and self.interrupt_pin and not self.command & _CMD_INTX_DISABLE:
            return ctx.raise_irq(0)
        return False

    # -- hooks for subclasses ------------------------------------------------------------------

    def command_changed(self, old: int, new: int) -> None:
        """The guest changed the command register (memory decode, bus master ...)."""
        log.debug("command %#06x -> %#06x", old, new)

    def device_reset(self) -> None:
        """Reset device-internal state beyond the BAR handlers (subclasses extend)."""

    # -- VfioDevice ----------------------------------------------------------------------------

    def region_info(self, index: int) -> RegionInfo:
        """Config space: R/W, not mmap-able. BARs: their size, R/W. Everything else: size 0."""
        if index == CONFIG_REGION:
            return RegionInfo(size=self.config.size, flags=RegionFlags.READ | RegionFlags.WRITE)
        bar = self._bars.get(index)
        if bar is None:
            return RegionInfo()
        return RegionInfo(size=bar.size, flags=RegionFlags.READ | RegionFlags.WRITE)

    def irq_info(self, index: int) -> IrqInfo:
        """INTx 1 (maskable, automasked) with a pin; MSI and MSI-X their vector counts; ERR 1; REQ 0."""
        if index == IrqIndex.INTX:
            if self.interrupt_pin:
                return IrqInfo(1, IRQ_EVENTFD | IRQ_MASKABLE | IRQ_AUTOMASKED)
            return IrqInfo(0, IRQ_EVENTFD)
        if index == IrqIndex.MSI:
            return IrqInfo(self.msi.vectors, IRQ_EVENTFD | IRQ_NORESIZE) if self.msi else IrqInfo(0, IRQ_EVENTFD)
        if index == IrqIndex.MSIX:
            if self.msix is not None:
                return IrqInfo(self.msix.layout.vectors, IRQ_EVENTFD | IRQ_NORESIZE)
            return IrqInfo(0, IRQ_EVENTFD)
        if index == IrqIndex.ERR:
            return IrqInfo(1, IRQ_EVENTFD)
        return IrqInfo(0, IRQ_EVENTFD)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Serve a read of region ``index``.

        Raises:
            ProtocolError: EINVAL for a region that does not exist, a range outside it, or an
                access size/alignment the register handler refuses; EIO for a BAR whose decode
                (memory or I/O) the guest has turned off.
        """
        if index == CONFIG_REGION:
            self._check_range(index, offset, count, self.config.size)
            return self.config.read(offset, count)
        win, rel = self._route(index, offset, count)
        return win.handler.read(rel, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Serve a write to region ``index``.

        Raises:
            ProtocolError: as for :meth:`region_read`.
        """
        if index == CONFIG_REGION:
            self._check_range(index, offset, len(data), self.config.size)
            self._config_write(offset, data)
            return
        win, rel = self._route(index, offset, len(data))
        win.handler.write(rel, data)

    def attach(self, ctx: DeviceContext) -> None:
        self._ctx = ctx

    def detach(self) -> None:
        self._ctx = None

    def reset(self) -> None:
        """PCI function reset: writable config bits back to their reset values (command 0,
        BARs unassigned, MSI/MSI-X off, D0), BAR handlers and device state reset."""
        self.config.reset()
        for cap in self.capabilities:
            cap.reset()
        for windows in self._windows.values():
            for win in windows:
                win.handler.reset()
        self.device_reset()

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _check_range(index: int, offset: int, count: int, size: int) -> None:
        if offset < 0 or count < 0 or offset + count > size:
            raise ProtocolError(errno.EINVAL, f"region {index} access {offset:#x}+{count} outside {size:#x}")

    def _route(self, index: int, offset: int, count: int) -> tuple[_Window, int]:
        bar = self._bars.get(index)
        if bar is None:
            raise ProtocolError(errno.EINVAL, f"region {index} does not exist")
        self._check_range(index, offset, count, bar.size)
        decoding = self.io_enabled if bar.kind is BarKind.IO else self.memory_enabled
        if not decoding or (self.pm is not None and self.pm.power_state != capmod.PM_D0):
            self._refuse_undecoded(index)
        for win in self._windows[index]:
            if win.start <= offset and offset + count <= win.end:
                return win, offset - win.start
            if overlaps(offset, count, win.start, win.end - win.start):
                raise ProtocolError(errno.EINVAL, f"BAR{index} access {offset:#x}+{count} straddles a window")
        raise ProtocolError(errno.EINVAL, f"BAR{index} access {offset:#x}+{count} not served")

    def _refuse_undecoded(self, index: int) -> None:
        if not self._warned_decode:
            self._warned_decode = True
            log.warning("BAR%d access while the guest has decode off (or D3hot); refused", index)
        raise ProtocolError(errno.EIO, f"BAR{index} access with decode disabled")

    def _config_write(self, offset: int, data: bytes) -> None:
        old_cmd = self.command
        self.config.write(offset, data)
        touched = False
        for cap in self.capabilities:
            if overlaps(offset, len(data), cap.offset, cap.size):
                cap.written()
                touched = True
        if touched:
            self._redeliver_pending()
        new_cmd = self.command
        if new_cmd != old_cmd:
            self.command_changed(old_cmd, new_cmd)

    def _redeliver_pending(self) -> None:
        """Send vectors that became deliverable: MSI-X pending while the function was masked,
        MSI pending under a per-vector mask that the guest has now cleared. (QEMU emulates these
        masks itself, so an interrupt we held back would otherwise be lost.)"""
        ctx = self._ctx
        if ctx is None:
            return
        msix, msi = self.msix, self.msi
        if msix is not None and msix.enabled and not msix.function_masked:
            for vector in _bits(msix.pba.pending):
                if ctx.raise_irq(vector):
                    msix.set_pending(vector, False)
        elif msi is not None and msi.enabled and msi.per_vector_mask:
            for vector in _bits(msi.pending_bits):
                if not msi.masked(vector) and ctx.raise_irq(vector):
                    msi.set_pending(vector, False)


def _bits(mask: int) -> list[int]:
    """Indexes of the set bits of ``mask``, lowest first."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out
