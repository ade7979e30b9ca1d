"""The contract between the vfio-user protocol layer and a device model.

The protocol layer (:mod:`vxpu.vfio_server.server`) owns the socket, message parsing, the DMA
map table and the interrupt eventfds. A device model (a :class:`VfioDevice`, normally a
:class:`vxpu.vfio_server.pci.PciDevice` subclass) owns registers and behaviour. Nothing
protocol-level leaks into a device: it sees region indexes and offsets (already bounds-checked
against the region size), a :class:`DeviceContext` for DMA and interrupts, and nothing else.

Region indexes follow VFIO's PCI layout: 0-5 are BAR0-BAR5, 6 the expansion ROM, 7 the config
space, 8 VGA. Irq indexes: 0 INTx, 1 MSI, 2 MSI-X, 3 ERR, 4 REQ.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import logging

    from vxpu.vfio_server.dma import DmaSpace

NUM_REGIONS = 9
CONFIG_REGION = 7
ROM_REGION = 6


class IrqIndex(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_IRQS = 5


class RegionFlags(enum.IntFlag):
    READ = 1
    WRITE = 2
    MMAP = 4
    CAPS = 8


@dataclass(frozen=True)
class SparseArea:
    """An mmap-able window ``[offset, offset + size)`` of a region."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    """What GET_REGION_INFO reports for one region index.

    ``size == 0`` means the region does not exist (it is still answered, with flags 0).
    When ``mmap_fd`` is set, ``flags`` includes MMAP, ``mmap_offset`` is the offset of the region
    inside that fd, and ``sparse`` lists the mmap-able windows (empty: the whole region).
    """

    size: int = 0
    flags: RegionFlags = field(default_factory=lambda: RegionFlags(0))
    mmap_fd: int | None = None
    mmap_offset: int = 0
    sparse: tuple[SparseArea, ...] = ()


@dataclass(frozen=True)
class IrqInfo:
    """What GET_IRQ_INFO reports for one irq index: ``count`` vectors and VFIO irq flags
    (EVENTFD 1, MASKABLE 2, AUTOMASKED 4, NORESIZE 8)."""

    count: int = 0
    flags: int = 1


class DeviceContext(Protocol):
    """What the protocol layer gives a device while a client is connected."""

    @property
    def dma(self) -> DmaSpace:
        """The guest's DMA map table: translate guest-physical ranges to host memory views."""

    @property
    def log(self) -> logging.Logger:
        """The per-connection logger."""

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the serve loop. ``raise_irq`` and the DMA space must only be used on
        that loop, so work finishing on another thread (a GPU queue, say) hands over here."""

    def raise_irq(self, vector: int = 0) -> bool:
        """Signal interrupt ``vector`` on whichever of MSI-X, MSI or INTx the guest enabled
        (checked in that order). Returns False when the guest has no eventfd for it (interrupts
        disabled or masked); never raises for guest-caused conditions."""


@runtime_checkable
class VfioDevice(Protocol):
    """A device model served over vfio-user.

    All offsets/counts passed in are already validated: ``0 <= offset`` and
    ``offset + count <= region size`` (and ``count <= max_data_xfer_size``). A device raises
    :class:`vxpu.vfio_server.errors.ProtocolError` (with an errno) for accesses it refuses;
    any other exception is a bug, is logged, and the client gets EIO.
    """

    reset_supported: bool

    def region_info(self, index: int) -> RegionInfo:
        """Describe region ``index`` (0 <= index < NUM_REGIONS)."""

    def irq_info(self, index: int) -> IrqInfo:
        """Describe irq index ``index`` (0 <= index < NUM_IRQS)."""

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes; must return exactly ``count`` bytes."""

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def attach(self, ctx: DeviceContext) -> None:
        """A client connected (after VERSION). Keep ``ctx`` for DMA and interrupts."""

    def detach(self) -> None:
        """The client disconnected: DMA maps and eventfds are already gone; device state stays."""

    def reset(self) -> None:
        """DEVICE_RESET: reset device-internal state. DMA maps stay valid."""


@dataclass
class IrqState:
    """Per-index eventfd table kept by the protocol layer (exposed for tests and debugging)."""

    eventfds: dict[int, int] = field(default_factory=dict)   # subindex -> fd
    masked: set[int] = field(default_factory=set)
