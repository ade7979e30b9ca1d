"""PCI capabilities: MSI, MSI-X, PCI Express and power management.

Capabilities live in config space as a linked list that starts at the pointer at 0x34 (status
bit 4 says the list exists). :func:`install_chain` lays them out from 0x40, dword aligned, in
the order given, and links them; each capability then writes its registers and write masks
into the :class:`~vxpu.vfio_server.pci.config.ConfigSpace` and keeps its offset. After a guest
config write that touches a capability, the device calls :meth:`Capability.written`, which
lets the capability enforce rules the masks cannot express (MSI's multiple-message-enable
clamp, PM's unsupported power states).

QEMU emulates the MSI and MSI-X capabilities and the MSI-X table itself; it still forwards
config writes to us, so the capability state here mirrors what the guest programmed. Only
the MSI-X PBA is read from the server (see :class:`MsixCapability`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from vxpu.vfio_server.errors import ProtocolError
from vxpu.vfio_server.pci.config import (
    CAPABILITY_LIST,
    CONFIG_SIZE_PCI,
    HEADER_END,
    STATUS,
    ConfigSpace,
    DeviceDefinitionError,
    FieldSpec,
    MaskedBytes,
    Status,
)

log = logging.getLogger(__name__)


class CapId:
    """Standard capability IDs."""

    PM = 0x01
    MSI = 0x05
    PCIE = 0x10
    MSIX = 0x11


class Capability:
    """Base class: a capability of ``size`` bytes with ID ``cap_id``."""

    cap_id: int = 0
    size: int = 0

    def __init__(self) -> None:
        self.offset = 0
        self._cfg: ConfigSpace | None = None

    @property
    def cfg(self) -> ConfigSpace:
        assert self._cfg is not None, "capability used before install_chain"
        return self._cfg

    def install(self, cfg: ConfigSpace, offset: int, next_ptr: int) -> None:
        """Write the header (ID and next pointer, read-only) and the body at ``offset``."""
        self._cfg = cfg
        self.offset = offset
        cfg.define(FieldSpec(offset, 1, self.cap_id))
        cfg.define(FieldSpec(offset + 1, 1, next_ptr))
        self.define_body(cfg, offset)

    def define_body(self, cfg: ConfigSpace, base: int) -> None:
        """Write the registers after the 2-byte header."""
        raise NotImplementedError

    def written(self) -> None:
        """A guest write touched this capability (already applied through the masks)."""

    def reset(self) -> None:
        """Config space was reset; drop any state kept outside it."""


def install_chain(cfg: ConfigSpace, caps: Sequence[Capability]) -> None:
    """Lay ``caps`` out from 0x40 (dword aligned), link them from 0x34, set status bit 4.

    Raises:
        DeviceDefinitionError: they do not fit below 0x100.
    """
    offset = HEADER_END
    placed = []
    for cap in caps:
        placed.append(offset)
        offset += (cap.size + 3) & ~3
    if offset > CONFIG_SIZE_PCI:
        raise DeviceDefinitionError(f"capabilities need {offset - HEADER_END} bytes; only 192 fit below 0x100")
    for i, cap in enumerate(caps):
        nxt = placed[i + 1] if i + 1 < len(caps) else 0
        cap.install(cfg, placed[i], nxt)
    if caps:
        cfg.define(FieldSpec(CAPABILITY_LIST, 1, placed[0]))
        cfg.set(STATUS, 2, cfg.get(STATUS, 2) | Status.CAP_LIST)


def walk_chain(cfg: ConfigSpace) -> list[tuple[int, int]]:
    """Return ``[(offset, cap_id), ...]`` by following the list from 0x34, as a guest does.

    Raises:
        DeviceDefinitionError: the list loops or points outside 0x40-0xff.
    """
    found: list[tuple[int, int]] = []
    if not cfg.get(STATUS, 2) & Status.CAP_LIST:
        return found
    ptr = cfg.get(CAPABILITY_LIST, 1) & ~3
    while ptr:
        if ptr < HEADER_END or ptr > CONFIG_SIZE_PCI - 4 or len(found) > 48:
            raise DeviceDefinitionError(f"capability list broken at {ptr:#x}")
        found.append((ptr, cfg.get(ptr, 1)))
        ptr = cfg.get(ptr + 1, 1) & ~3
    return found


# -- MSI -------------------------------------------------------------------------------------

MSI_CTRL = 0x02
MSI_ADDR_LO = 0x04
MSI_ADDR_HI = 0x08
MSI_DATA = 0x0C
MSI_MASK = 0x10
MSI_PENDING = 0x14

MSI_CTRL_ENABLE = 0x0001
MSI_CTRL_MMC_SHIFT = 1
MSI_CTRL_MME_SHIFT = 4
MSI_CTRL_MME_MASK = 0x0070
MSI_CTRL_64BIT = 0x0080
MSI_CTRL_PVM = 0x0100


class MsiCapability(Capability):
    """MSI with a 64-bit address and 1-32 vectors (power of two).

    Args:
        vectors: vectors the device can use (Multiple Message Capable).
        per_vector_mask: add the mask and pending registers.

    Raises:
        DeviceDefinitionError: ``vectors`` is not a power of two in 1..32.
    """

    cap_id = CapId.MSI

    def __init__(self, vectors: int = 1, per_vector_mask: bool = False) -> None:
        super().__init__()
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise DeviceDefinitionError(f"MSI vectors must be a power of two in 1..32, not {vectors}")
        self.vectors = vectors
        self.per_vector_mask = per_vector_mask
        self.mmc = vectors.bit_length() - 1
        self.size = 0x18 if per_vector_mask else 0x0E

    def define_body(self, cfg: ConfigSpace, base: int) -> None:
        ctrl = (self.mmc << MSI_CTRL_MMC_SHIFT) | MSI_CTRL_64BIT | (MSI_CTRL_PVM if self.per_vector_mask else 0)
        cfg.define(FieldSpec(base + MSI_CTRL, 2, ctrl, wmask=MSI_CTRL_ENABLE | MSI_CTRL_MME_MASK))
        cfg.define(FieldSpec(base + MSI_ADDR_LO, 4, 0, wmask=0xFFFFFFFC))
        cfg.define(FieldSpec(base + MSI_ADDR_HI, 4, 0, wmask=0xFFFFFFFF))
        cfg.define(FieldSpec(base + MSI_DATA, 2, 0, wmask=0xFFFF))
        if self.per_vector_mask:
            cfg.define(FieldSpec(base + MSI_MASK, 4, 0, wmask=(1 << self.vectors) - 1))
            cfg.define(FieldSpec(base + MSI_PENDING, 4, 0))

    def written(self) -> None:
        # Software must not enable more vectors than the device has; clamp like QEMU does.
        ctrl = self.cfg.get(self.offset + MSI_CTRL, 2)
        mme = (ctrl & MSI_CTRL_MME_MASK) >> MSI_CTRL_MME_SHIFT
        if mme > self.mmc:
            ctrl = (ctrl & ~MSI_CTRL_MME_MASK) | (self.mmc << MSI_CTRL_MME_SHIFT)
            self.cfg.set(self.offset + MSI_CTRL, 2, ctrl)

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.get(self.offset + MSI_CTRL, 2) & MSI_CTRL_ENABLE)

    @property
    def enabled_vectors(self) -> int:
        """Vectors the guest allocated (Multiple Message Enable); 0 while MSI is off."""
        if not self.enabled:
            return 0
        return 1 << ((self.cfg.get(self.offset + MSI_CTRL, 2) & MSI_CTRL_MME_MASK) >> MSI_CTRL_MME_SHIFT)

    @property
    def address(self) -> int:
        return self.cfg.get(self.offset + MSI_ADDR_LO, 8)

    @property
    def data(self) -> int:
        return self.cfg.get(self.offset + MSI_DATA, 2)

    def masked(self, vector: int) -> bool:
        """Whether the guest masked ``vector`` (always False without per-vector masking)."""
        if not self.per_vector_mask:
            return False
        return bool(self.cfg.get(self.offset + MSI_MASK, 4) >> vector & 1)

    @property
    def pending_bits(self) -> int:
        """The pending register (0 without per-vector masking)."""
        if not self.per_vector_mask:
            return 0
        return self.cfg.get(self.offset + MSI_PENDING, 4)

    def set_pending(self, vector: int, pending: bool) -> None:
        """Record a masked vector's pending state (only with per-vector masking)."""
        if not self.per_vector_mask:
            return
        bits = self.cfg.get(self.offset + MSI_PENDING, 4)
        bits = bits | (1 << vector) if pending else bits & ~(1 << vector)
        self.cfg.set(self.offset + MSI_PENDING, 4, bits)

    def reset(self) -> None:
        if self.per_vector_mask:
            self.cfg.set(self.offset + MSI_PENDING, 4, 0)


# -- MSI-X -----------------------------------------------------------------------------------

MSIX_CTRL = 0x02
MSIX_TABLE = 0x04
MSIX_PBA = 0x08
MSIX_CTRL_ENABLE = 0x8000
MSIX_CTRL_FUNCTION_MASK = 0x4000
MSIX_ENTRY_SIZE = 16
MSIX_MAX_VECTORS = 2048


@dataclass(frozen=True)
class MsixLayout:
    """Where the MSI-X table and PBA live: BAR index and byte offset (8-byte aligned) of each."""

    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8


def _check_table_access(offset: int, count: int, size: int) -> None:
    """MSI-X table and PBA take aligned 4- and 8-byte accesses only (PCI spec 6.8.2).

    Raises:
        ProtocolError: EINVAL otherwise.
    """
    if count not in (4, 8) or offset % count or offset + count > size:
        raise ProtocolError(errno.EINVAL, f"MSI-X table/PBA access {offset:#x}+{count} (aligned 4 or 8 bytes only)")


class MsixTable:
    """The MSI-X vector table as a :class:`~vxpu.vfio_server.pci.bank.BarHandler`.

    QEMU emulates the table and never forwards its accesses; this copy serves other clients
    (the in-process test client) with the architected reset state: all vectors masked.
    """

    def __init__(self, vectors: int) -> None:
        self.size = vectors * MSIX_ENTRY_SIZE
        self._mem = MaskedBytes(self.size)
        for v in range(vectors):
            base = v * MSIX_ENTRY_SIZE
            self._mem.define(FieldSpec(base, 4, 0, wmask=0xFFFFFFFC))     # address low
            self._mem.define(FieldSpec(base + 4, 4, 0, wmask=0xFFFFFFFF))  # address high
            self._mem.define(FieldSpec(base + 8, 4, 0, wmask=0xFFFFFFFF))  # data
            self._mem.define(FieldSpec(base + 12, 4, 1, wmask=0x1))        # vector control: masked
        self._mem.freeze_reset_image()

    def read(self, offset: int, count: int) -> bytes:
        _check_table_access(offset, count, self.size)
        return self._mem.read(offset, count)

    def write(self, offset: int, data: bytes) -> None:
        _check_table_access(offset, len(data), self.size)
        self._mem.write(offset, data)

    def reset(self) -> None:
        self._mem.reset()


class MsixPba:
    """The MSI-X pending bit array as a BarHandler: read-only, answered from pending bits."""

    def __init__(self, vectors: int) -> None:
        self.size = ((vectors + 63) // 64) * 8
        self.pending = 0

    def read(self, offset: int, count: int) -> bytes:
        _check_table_access(offset, count, self.size)
        return ((self.pending >> (8 * offset)) & ((1 << (8 * count)) - 1)).to_bytes(count, "little")

    def write(self, offset: int, data: bytes) -> None:
        _check_table_access(offset, len(data), self.size)
        log.debug("write to MSI-X PBA ignored")

    def reset(self) -> None:
        self.pending = 0


class MsixCapability(Capability):
    """MSI-X: control, table and PBA pointers; the table and PBA handlers for the BARs.

    Args:
        layout: vector count and where the table and PBA are.

    Raises:
        DeviceDefinitionError: vector count outside 1..2048 or misaligned offsets.
    """

    cap_id = CapId.MSIX
    size = 0x0C

    def __init__(self, layout: MsixLayout) -> None:
        super().__init__()
        if not 1 <= layout.vectors <= MSIX_MAX_VECTORS:
            raise DeviceDefinitionError(f"MSI-X vectors must be 1..2048, not {layout.vectors}")
        if layout.table_offset % 8 or layout.pba_offset % 8:
            raise DeviceDefinitionError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.layout = layout
        self.table = MsixTable(layout.vectors)
        self.pba = MsixPba(layout.vectors)

    def define_body(self, cfg: ConfigSpace, base: int) -> None:
        lay = self.layout
        cfg.define(FieldSpec(base + MSIX_CTRL, 2, lay.vectors - 1,
                             wmask=MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK))
        cfg.define(FieldSpec(base + MSIX_TABLE, 4, lay.table_offset | lay.table_bar))
        cfg.define(FieldSpec(base + MSIX_PBA, 4, lay.pba_offset | lay.pba_bar))

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.get(self.offset + MSIX_CTRL, 2) & MSIX_CTRL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.cfg.get(self.offset + MSIX_CTRL, 2) & MSIX_CTRL_FUNCTION_MASK)

    def set_pending(self, vector: int, pending: bool) -> None:
        """Set or clear ``vector``'s bit in the PBA."""
        if pending:
            self.pba.pending |= 1 << vector
        else:
            self.pba.pending &= ~(1 << vector)

    def written(self) -> None:
        if not self.enabled:
            self.pba.pending = 0

    def reset(self) -> None:
        self.table.reset()
        self.pba.reset()


# -- PCI Express -----------------------------------------------------------------------------

PCIE_CAP_SIZE = 0x3C
PCIE_FLAGS = 0x02
PCIE_DEVCAP = 0x04
PCIE_DEVCTL = 0x08
PCIE_DEVSTA = 0x0A
PCIE_LNKCAP = 0x0C
PCIE_LNKCTL = 0x10
PCIE_LNKSTA = 0x12
PCIE_DEVCAP2 = 0x24
PCIE_DEVCTL2 = 0x28
PCIE_LNKCAP2 = 0x2C
PCIE_LNKCTL2 = 0x30

PCIE_DEVCAP_RBER = 0x8000              # role-based error reporting (required for v2)
# Error reporting enables, relaxed ordering, max payload, no snoop, max read request.
PCIE_DEVCTL_WMASK = 0x000F | 0x0010 | 0x00E0 | 0x0800 | 0x7000
PCIE_DEVCTL_RESET = 0x2810             # relaxed ordering + no snoop on, 512-byte read requests
PCIE_DEVSTA_W1C = 0x000F               # correctable / non-fatal / fatal / unsupported request
PCIE_LINK_2_5GT_X1 = 0x0011            # speed 2.5 GT/s, width x1 (link cap and link status)
PCIE_LNKCTL_WMASK = 0x0003 | 0x0040 | 0x0080   # ASPM control, common clock, extended synch


class PcieCapability(Capability):
    """A PCI Express capability (version 2) of an endpoint with a 2.5 GT/s x1 link.

    It needs the 4096-byte config space; the extended capability list at 0x100 is empty.
    """

    cap_id = CapId.PCIE
    size = PCIE_CAP_SIZE

    def define_body(self, cfg: ConfigSpace, base: int) -> None:
        cfg.define(FieldSpec(base + PCIE_FLAGS, 2, 0x0002))            # version 2, endpoint (type 0)
        cfg.define(FieldSpec(base + PCIE_DEVCAP, 4, PCIE_DEVCAP_RBER))  # 128-byte max payload
        cfg.define(FieldSpec(base + PCIE_DEVCTL, 2, PCIE_DEVCTL_RESET, wmask=PCIE_DEVCTL_WMASK))
        cfg.define(FieldSpec(base + PCIE_DEVSTA, 2, 0, w1c=PCIE_DEVSTA_W1C))
        cfg.define(FieldSpec(base + PCIE_LNKCAP, 4, PCIE_LINK_2_5GT_X1))
        cfg.define(FieldSpec(base + PCIE_LNKCTL, 2, 0, wmask=PCIE_LNKCTL_WMASK))
        cfg.define(FieldSpec(base + PCIE_LNKSTA, 2, PCIE_LINK_2_5GT_X1))
        cfg.define(FieldSpec(base + PCIE_LNKCAP2, 4, 0x0002))            # supports 2.5 GT/s
        cfg.define(FieldSpec(base + PCIE_LNKCTL2, 2, 0x0001))            # target speed 2.5 GT/s


# -- Power management ------------------------------------------------------------------------

PM_PMC = 0x02
PM_PMCSR = 0x04
PM_PMC_VERSION_3 = 0x0003
PM_PMCSR_STATE_MASK = 0x0003
PM_PMCSR_NO_SOFT_RESET = 0x0008
PM_D0 = 0
PM_D3HOT = 3


class PmCapability(Capability):
    """Power management (version 3): D0 and D3hot only, no PME, No_Soft_Reset set (so
    D3hot -> D0 keeps the device's state). Writes of an unsupported state are discarded."""

    cap_id = CapId.PM
    size = 0x08

    def __init__(self) -> None:
        super().__init__()
        self._state = PM_D0

    def define_body(self, cfg: ConfigSpace, base: int) -> None:
        cfg.define(FieldSpec(base + PM_PMC, 2, PM_PMC_VERSION_3))
        cfg.define(FieldSpec(base + PM_PMCSR, 2, PM_PMCSR_NO_SOFT_RESET, wmask=PM_PMCSR_STATE_MASK))

    @property
    def power_state(self) -> int:
        """0 = D0, 3 = D3hot."""
        return self._state

    def written(self) -> None:
        csr = self.cfg.get(self.offset + PM_PMCSR, 2)
        state = csr & PM_PMCSR_STATE_MASK
        if state in (PM_D0, PM_D3HOT):
            self._state = state
        else:   # D1/D2 unsupported: the write completes but the state does not change
            self.cfg.set(self.offset + PM_PMCSR, 2, (csr & ~PM_PMCSR_STATE_MASK) | self._state)

    def reset(self) -> None:
        self._state = PM_D0
