"""vxpu.vfio_server.pci: the PCI function model under the vfio-user protocol layer.

* :mod:`.config` — type-0 config space bytes with write / write-1-to-clear masks;
* :mod:`.caps` — MSI, MSI-X (table + PBA), PCI Express and power-management capabilities;
* :mod:`.bank` — what serves a BAR: declarative register banks and plain memory;
* :mod:`.device` — :class:`PciDevice`, the base class of device models (a ``VfioDevice``).
"""

from vxpu.vfio_server.pci.bank import Access, BarHandler, RamRegion, Register, RegisterBank
from vxpu.vfio_server.pci.caps import MsixLayout
from vxpu.vfio_server.pci.config import Command, ConfigSpace, DeviceDefinitionError, Status
from vxpu.vfio_server.pci.device import (
    INTX_PIN_A,
    INTX_PIN_NONE,
    Bar,
    BarKind,
    BusMasterDisabled,
    PciDevice,
    PciIds,
)

__all__ = [
    "INTX_PIN_A",
    "INTX_PIN_NONE",
    "Access",
    "Bar",
    "BarHandler",
    "BarKind",
    "BusMasterDisabled",
    "Command",
    "ConfigSpace",
    "DeviceDefinitionError",
    "MsixLayout",
    "PciDevice",
    "PciIds",
    "RamRegion",
    "Register",
    "RegisterBank",
    "Status",
]
