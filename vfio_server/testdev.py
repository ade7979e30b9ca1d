"""The vxpu test device: a small PCI function that proves the stack end to end.

It exercises everything a real device model needs, with nothing accelerator-specific:
identity and BAR sizing (BAR0 registers, BAR2 64-bit prefetchable scratch memory), register
accesses of every size, DMA through the guest's mapped memory (CRC32 of a buffer, filling a
pattern, inverting in place), interrupts (MSI by default, MSI-X as an option, INTx as the
fallback), and reset semantics. The register map lives in :mod:`vxpu.abi.testdev`
(shared with the guest) and is documented in docs/device-abi.md.

DMA runs synchronously inside the DMA_CMD register write, straight on the mmap'd guest RAM
(fd-backed DMA maps). A range reachable only through DMA_READ/DMA_WRITE messages (guest RAM
without ``share=on``) is handled asynchronously: DMA_STATUS reads BUSY until the last reply
arrives, because waiting for a reply inside a register write would deadlock QEMU.
"""

from __future__ import annotations

import errno
import logging
import zlib

import numpy as np
from vxpu.vfio_server.errors import DmaError
from vxpu.vfio_server.pci import (
    Access,
    Bar,
    BarKind,
    MsixLayout,
    PciDevice,
    PciIds,
    RamRegion,
    Register,
    RegisterBank,
)

from vxpu.abi import testdev as abi

log = logging.getLogger(__name__)

_INVERT = bytes(255 - i for i in range(256))
_U32 = 0xFFFFFFFF
_FULL_PATTERN: bytes | None = None


def _pattern_view(length: int) -> memoryview:
    """The first ``length`` FILL_PATTERN bytes, built once (at most MAX_DMA_LEN)."""
    global _FULL_PATTERN
    if _FULL_PATTERN is None:
        _FULL_PATTERN = abi.pattern(abi.MAX_DMA_LEN)
    return memoryview(_FULL_PATTERN)[:length]


def _invert_in_place(view: memoryview) -> None:
    """XOR every byte of a writable view with 0xff, vectorized, without keeping an export."""
    arr = np.frombuffer(view, dtype=np.uint8)
    np.bitwise_not(arr, out=arr)
    del arr


class TestDevice(PciDevice):
    """The test device (vendor 0x5850, device 0x0001).

    Args:
        msix: add an MSI-X capability with 2 vectors (table at BAR0+0x800, PBA at BAR0+0xC00)
            besides MSI. Off by default: QEMU 11.1.3 aborts when a device with MSI-X is
            hot-unplugged.
        pcie: add a PCI Express endpoint capability (4096-byte config space).
        pm: add a power-management capability.
    """

    __test__ = False    # not a pytest test class

    def __init__(self, *, msix: bool = False, pcie: bool = False, pm: bool = False) -> None:
        self.regs = RegisterBank(abi.BAR0_SIZE, self._registers())
        self.scratch = RamRegion(abi.BAR2_SIZE)
        self._dma_gen = 0
        self._dma_busy = False
        ids = PciIds(vendor_id=abi.VENDOR_ID, device_id=abi.DEVICE_ID, class_code=abi.CLASS_CODE,
                     revision=abi.REVISION, subsystem_vendor_id=abi.SUBSYSTEM_VENDOR_ID,
                     subsystem_id=abi.SUBSYSTEM_ID)
        layout = MsixLayout(abi.MSIX_VECTORS, 0, abi.MSIX_TABLE_OFFSET, 0, abi.MSIX_PBA_OFFSET) if msix else None
        super().__init__(
            ids,
            [Bar(0, abi.BAR0_SIZE, self.regs),
             Bar(2, abi.BAR2_SIZE, self.scratch, BarKind.MEM64, prefetchable=True)],
            msi_vectors=abi.MSI_VECTORS, msix=layout, pcie=pcie, pm=pm)

    def _registers(self) -> list[Register]:
        ro, rw, wo = Access.RO, Access.RW, Access.WO
        return [
            Register(abi.MAGIC, "MAGIC", ro, abi.MAGIC_VALUE),
            Register(abi.VERSION, "VERSION", ro, abi.VERSION_VALUE),
            Register(abi.SCRATCH, "SCRATCH", rw),
            Register(abi.SCRATCH2, "SCRATCH2", rw),
            Register(abi.DMA_ADDR_LO, "DMA_ADDR_LO", rw),
            Register(abi.DMA_ADDR_HI, "DMA_ADDR_HI", rw),
            Register(abi.DMA_LEN, "DMA_LEN", rw),
            Register(abi.DMA_CMD, "DMA_CMD", wo, on_write=self._dma_command),
            Register(abi.DMA_STATUS, "DMA_STATUS", ro),
            Register(abi.DMA_RESULT, "DMA_RESULT", ro),
            Register(abi.IRQ_RAISE, "IRQ_RAISE", wo, on_write=self._irq_raise),
            Register(abi.IRQ_COUNT, "IRQ_COUNT", ro),
            Register(abi.IRQ_ENABLE, "IRQ_ENABLE", rw),
            Register(abi.RESET_COUNT, "RESET_COUNT", ro, keep_on_reset=True),
        ]

    # -- DMA -----------------------------------------------------------------------------------

    def _dma_command(self, cmd: int) -> None:
        if self._dma_busy:
            log.debug("DMA_CMD %d ignored: a command is still in flight", cmd)
            return
        status = self._start_dma(cmd)
        if status is not None:
            self._dma_done(self._dma_gen, status)

    def _dma_done(self, gen: int, status: int) -> None:
        """A command finished: publish its status and raise vector 0 if enabled."""
        if gen != self._dma_gen:
            return          # completion of a command from before a reset or disconnect
        self._dma_busy = False
        self.regs.set("DMA_STATUS", status)
        if status != abi.DMA_OK:
            log.debug("DMA command failed with status %d", status)
        if self.regs.get("IRQ_ENABLE") & abi.IRQ_ENABLE_DMA_DONE:
            self._raise(0)

    def _start_dma(self, cmd: int) -> int | None:
        """Run a command on fd-backed memory (returns its status) or start it on message-only
        memory (returns None; :meth:`_dma_done` runs when the last reply arrives)."""
        if cmd not in (abi.DMA_CMD_READ, abi.DMA_CMD_FILL_PATTERN, abi.DMA_CMD_INVERT):
            return abi.DMA_BAD_CMD
        if not self.bus_master_enabled:
            return abi.DMA_NO_BUS_MASTER
        length = self.regs.get("DMA_LEN")
        if not 1 <= length <= abi.MAX_DMA_LEN:
            return abi.DMA_BAD_LEN
        addr = self.regs.get("DMA_ADDR_LO") | (self.regs.get("DMA_ADDR_HI") << 32)
        try:
            view = self.dma_view(addr, length, write=cmd != abi.DMA_CMD_READ)
        except DmaError as exc:
            if exc.errno != errno.EFAULT:
                return abi.DMA_BAD_ADDRESS
            return self._start_message_dma(cmd, addr, length)
        try:
            if cmd == abi.DMA_CMD_READ:
                self.regs.set("DMA_RESULT", zlib.crc32(view))
            elif cmd == abi.DMA_CMD_FILL_PATTERN:
                view[:] = _pattern_view(length)
            else:
                _invert_in_place(view)
        finally:
            view.release()     # never keep an export of the mapping (DMA_UNMAP must munmap it)
        return abi.DMA_OK

    def _start_message_dma(self, cmd: int, addr: int, length: int) -> int | None:
        """The range may be message-only: go through DMA_READ/DMA_WRITE without blocking."""
        gen = self._dma_gen
        self._dma_busy = True
        self.regs.set("DMA_STATUS", abi.DMA_BUSY)
        try:
            dma = self.dma_space()
            if cmd == abi.DMA_CMD_READ:
                dma.read_async(addr, length, lambda data, err: self._read_done(gen, data, err))
            elif cmd == abi.DMA_CMD_FILL_PATTERN:
                dma.write_async(addr, _pattern_view(length), lambda err: self._write_done(gen, err))
            else:
                dma.read_async(addr, length, lambda data, err: self._invert_read_done(gen, addr, data, err))
        except DmaError as exc:          # unmapped, crossing maps, too many in flight
            log.debug("message DMA to %#x+%#x refused: %s", addr, length, exc)
            self._dma_busy = False
            return abi.DMA_BAD_ADDRESS
        return None

    def _read_done(self, gen: int, data: bytes | None, err: DmaError | None) -> None:
        if data is not None and err is None and gen == self._dma_gen:
            self.regs.set("DMA_RESULT", zlib.crc32(data))
        self._dma_done(gen, abi.DMA_OK if err is None else abi.DMA_BAD_ADDRESS)

    def _write_done(self, gen: int, err: DmaError | None) -> None:
        self._dma_done(gen, abi.DMA_OK if err is None else abi.DMA_BAD_ADDRESS)

    def _invert_read_done(self, gen: int, addr: int, data: bytes | None, err: DmaError | None) -> None:
        if err is not None or data is None or gen != self._dma_gen:
            self._dma_done(gen, abi.DMA_BAD_ADDRESS)
            return
        if not self.bus_master_enabled:
            self._dma_done(gen, abi.DMA_NO_BUS_MASTER)
            return
        try:
            self.dma_space().write_async(addr, data.translate(_INVERT), lambda e: self._write_done(gen, e))
        except DmaError as exc:
            log.debug("message DMA write-back to %#x refused: %s", addr, exc)
            self._dma_done(gen, abi.DMA_BAD_ADDRESS)

    # -- interrupts ----------------------------------------------------------------------------

    def _irq_raise(self, vector: int) -> None:
        if vector < self.interrupt_vectors:
            self._raise(vector)

    def _raise(self, vector: int) -> None:
        if self.raise_irq(vector):
            self.regs.set("IRQ_COUNT", (self.regs.get("IRQ_COUNT") + 1) & _U32)

    # -- reset ---------------------------------------------------------------------------------

    def _abandon_dma(self) -> None:
        self._dma_gen += 1       # late completions of in-flight message DMA are dropped
        self._dma_busy = False

    def detach(self) -> None:
        """The client left: an in-flight message DMA can no longer complete."""
        if self._dma_busy:
            self.regs.set("DMA_STATUS", abi.DMA_BAD_ADDRESS)
        self._abandon_dma()
        super().detach()

    def device_reset(self) -> None:
        """Registers are back at their reset values (done by the base class); count it."""
        self._abandon_dma()
        self.regs.set("RESET_COUNT", (self.regs.get("RESET_COUNT") + 1) & _U32)
