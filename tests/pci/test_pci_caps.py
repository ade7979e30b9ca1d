"""Capabilities: the chain from 0x34, MSI, MSI-X (table, PBA, pending bits), PCIe and PM."""

from __future__ import annotations

import errno

import pytest
from vxpu.vfio_server.errors import ProtocolError
from vxpu.vfio_server.pci import Bar, DeviceDefinitionError, MsixLayout, PciDevice, PciIds, RamRegion
from vxpu.vfio_server.pci.caps import CapId, MsiCapability, walk_chain
from vxpu.vfio_server.testdev import TestDevice

from tests.pci.pcihelpers import FakeContext, bar_read, bar_write, cfg_read, cfg_write, enable
from vxpu.abi import testdev as abi

IDS = PciIds(vendor_id=0x1234, device_id=0x5678, class_code=0x120000)


def chain(dev: PciDevice) -> list[int]:
    """Walk the list through region reads, exactly as a guest does."""
    ids, ptr, seen = [], cfg_read(dev, 0x34, 1), set()
    assert cfg_read(dev, 0x06, 2) & 0x10
    while ptr:
        assert 0x40 <= ptr <= 0xFC and ptr % 4 == 0 and ptr not in seen
        seen.add(ptr)
        ids.append(cfg_read(dev, ptr, 1))
        ptr = cfg_read(dev, ptr + 1, 1)
    return ids


def test_chain_default_is_msi_only() -> None:
    assert chain(TestDevice()) == [CapId.MSI]


def test_chain_with_all_options_terminates() -> None:
    dev = TestDevice(msix=True, pcie=True, pm=True)
    assert chain(dev) == [CapId.PM, CapId.MSI, CapId.MSIX, CapId.PCIE]
    assert [cid for _, cid in walk_chain(dev.config)] == chain(dev)


def test_no_capabilities_means_no_list() -> None:
    dev = PciDevice(IDS, [], msi_vectors=0)
    assert not cfg_read(dev, 0x06, 2) & 0x10 and cfg_read(dev, 0x34, 1) == 0
    assert walk_chain(dev.config) == []


def test_msi_control_and_fields() -> None:
    dev = PciDevice(IDS, [], msi_vectors=4)
    msi = dev.msi
    assert msi is not None
    base = msi.offset
    ctrl = cfg_read(dev, base + 2, 2)
    assert ctrl & 0x80 and (ctrl >> 1) & 7 == 2 and not ctrl & 0x100   # 64-bit, MMC=4, no PVM
    cfg_write(dev, base + 4, 4, 0xFEE0_0003)                 # low two address bits are 0
    cfg_write(dev, base + 8, 4, 0x1)
    cfg_write(dev, base + 12, 2, 0x4041)
    assert msi.address == 0x1_FEE0_0000 and msi.data == 0x4041
    cfg_write(dev, base + 2, 2, 0x0071)                      # enable, ask for 128 vectors
    assert msi.enabled and msi.enabled_vectors == 4          # clamped to MMC
    assert (cfg_read(dev, base + 2, 2) >> 4) & 7 == 2
    cfg_write(dev, base + 2, 2, 0x0011)
    assert msi.enabled_vectors == 2


def test_msi_per_vector_masking_and_pending() -> None:
    dev, ctx = PciDevice(IDS, [], msi_vectors=2, msi_per_vector_mask=True), FakeContext()
    dev.attach(ctx)
    msi = dev.msi
    assert msi is not None and cfg_read(dev, msi.offset + 2, 2) & 0x100
    cfg_write(dev, msi.offset + 0x10, 4, 0xFFFFFFFF)
    assert cfg_read(dev, msi.offset + 0x10, 4) == 0x3        # only existing vectors
    cfg_write(dev, msi.offset + 2, 2, 0x0011)
    assert dev.raise_irq(1) is False and ctx.raised == []
    assert cfg_read(dev, msi.offset + 0x14, 4) == 0x2        # pending, read-only
    cfg_write(dev, msi.offset + 0x10, 4, 0x0)               # unmask: the held vector goes out
    assert ctx.raised == [1] and cfg_read(dev, msi.offset + 0x14, 4) == 0
    assert dev.raise_irq(1) is True and ctx.raised == [1, 1]
    assert dev.raise_irq(2) is False                         # beyond enabled vectors


@pytest.mark.parametrize("vectors", [0, 3, 64])
def test_msi_vector_count_must_be_power_of_two(vectors: int) -> None:
    with pytest.raises(DeviceDefinitionError):
        MsiCapability(vectors)


def test_msix_capability_registers() -> None:
    dev = TestDevice(msix=True)
    msix = dev.msix
    assert msix is not None
    base = msix.offset
    assert cfg_read(dev, base + 2, 2) == abi.MSIX_VECTORS - 1
    assert cfg_read(dev, base + 4, 4) == abi.MSIX_TABLE_OFFSET | 0   # BIR 0
    assert cfg_read(dev, base + 8, 4) == abi.MSIX_PBA_OFFSET | 0
    cfg_write(dev, base + 4, 4, 0xFFFFFFFF)                            # read-only
    assert cfg_read(dev, base + 4, 4) == abi.MSIX_TABLE_OFFSET
    cfg_write(dev, base + 2, 2, 0xFFFF)
    assert cfg_read(dev, base + 2, 2) == 0xC000 | (abi.MSIX_VECTORS - 1)
    assert msix.enabled and msix.function_masked


def test_msix_table_and_pba_in_bar0() -> None:
    dev, ctx = TestDevice(msix=True), FakeContext()
    dev.attach(ctx)
    enable(dev)
    table = abi.MSIX_TABLE_OFFSET
    assert bar_read(dev, 0, table + 12) == 1                 # vector control: masked at reset
    bar_write(dev, 0, table + 16, 0xFEE0_0000_FFFF_FFFF, 8)  # address of vector 1 (low bits RO)
    assert bar_read(dev, 0, table + 16, 8) == 0xFEE0_0000_FFFF_FFFC
    assert bar_read(dev, 0, abi.MSIX_PBA_OFFSET, 8) == 0
    assert bar_read(dev, 0, abi.MAGIC) == abi.MAGIC_VALUE     # registers still reachable
    for bad in ((table, 2), (table + 2, 4), (abi.MSIX_PBA_OFFSET, 1)):
        with pytest.raises(ProtocolError) as exc:
            dev.region_read(0, *bad)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError) as exc:                # straddles the end of the table
        dev.region_read(0, table + 2 * 16 - 4, 8)
    assert exc.value.errno == errno.EINVAL


def test_msix_pending_bits_follow_delivery() -> None:
    dev, ctx = TestDevice(msix=True), FakeContext()
    dev.attach(ctx)
    enable(dev)
    base = dev.msix.offset  # type: ignore[union-attr]
    cfg_write(dev, base + 2, 2, 0xC000)                      # enabled, function-masked
    assert dev.raise_irq(1) is False and ctx.raised == []
    assert bar_read(dev, 0, abi.MSIX_PBA_OFFSET) == 0b10
    bar_write(dev, 0, abi.MSIX_PBA_OFFSET, 0)                # PBA is read-only
    assert bar_read(dev, 0, abi.MSIX_PBA_OFFSET) == 0b10
    cfg_write(dev, base + 2, 2, 0x8000)                      # unmask: vector 1 is redelivered
    assert ctx.raised == [1] and bar_read(dev, 0, abi.MSIX_PBA_OFFSET) == 0
    ctx.deliver = False                                      # client has no eventfd for it
    assert dev.raise_irq(0) is False
    assert bar_read(dev, 0, abi.MSIX_PBA_OFFSET) == 0b01
    ctx.deliver = True
    assert dev.raise_irq(1) is True and ctx.raised == [1, 1]
    assert bar_read(dev, 0, abi.MSIX_PBA_OFFSET) == 0b01     # vector 0 still pending
    cfg_write(dev, base + 2, 2, 0xC000)
    cfg_write(dev, base + 2, 2, 0x8000)                      # an unmask retries vector 0
    assert ctx.raised == [1, 1, 0] and bar_read(dev, 0, abi.MSIX_PBA_OFFSET) == 0
    dev.raise_irq(0)
    ctx.deliver = False
    dev.raise_irq(1)
    assert bar_read(dev, 0, abi.MSIX_PBA_OFFSET) == 0b10
    assert dev.interrupt_vectors == abi.MSIX_VECTORS and dev.raise_irq(2) is False
    cfg_write(dev, base + 2, 2, 0x0000)                      # disabling clears pending bits
    assert bar_read(dev, 0, abi.MSIX_PBA_OFFSET) == 0


def test_msix_layout_must_fit_a_memory_bar() -> None:
    bars = [Bar(0, 4096, RamRegion(4096))]
    with pytest.raises(DeviceDefinitionError, match="outside"):
        PciDevice(IDS, bars, msix=MsixLayout(4, 0, 0xFF8, 0, 0x800))
    with pytest.raises(DeviceDefinitionError, match="overlap"):
        PciDevice(IDS, bars, msix=MsixLayout(4, 0, 0x800, 0, 0x810))
    with pytest.raises(DeviceDefinitionError, match="aligned"):
        PciDevice(IDS, bars, msix=MsixLayout(4, 0, 0x804, 0, 0xC00))


def test_pcie_capability_endpoint() -> None:
    dev = TestDevice(pcie=True)
    pcie = dev.pcie
    assert pcie is not None
    base = pcie.offset
    assert cfg_read(dev, base + 2, 2) == 0x0002              # version 2, endpoint
    assert cfg_read(dev, 0x100, 4) == 0                      # empty extended capability list
    cfg_write(dev, base + 8, 2, 0xFFFF)                      # device control
    assert cfg_read(dev, base + 8, 2) == 0x78FF              # no FLR, no extended tags
    dev.config.set(base + 0xA, 2, 0x0005)                    # errors detected
    cfg_write(dev, base + 0xA, 2, 0x0001)
    assert cfg_read(dev, base + 0xA, 2) == 0x0004            # W1C
    cfg_write(dev, 0x0D, 1, 0xFF)
    assert cfg_read(dev, 0x0D, 1) == 0                       # latency timer hardwired on PCIe
    cfg_write(dev, 0x200, 4, 0xFFFFFFFF)                     # extended space has no writable bits
    assert cfg_read(dev, 0x200, 4) == 0


def test_pm_capability_d3hot_blocks_bar_and_dma() -> None:
    dev, ctx = TestDevice(pm=True), FakeContext()
    dev.attach(ctx)
    enable(dev)
    pm = dev.pm
    assert pm is not None
    base = pm.offset
    assert cfg_read(dev, base + 2, 2) & 0x7 == 3             # PM version 3
    assert cfg_read(dev, base + 4, 2) & 0x8                  # No_Soft_Reset
    cfg_write(dev, base + 4, 2, 0x1)                         # D1 unsupported: discarded
    assert pm.power_state == 0 and cfg_read(dev, base + 4, 2) & 3 == 0
    cfg_write(dev, base + 4, 2, 0x3)
    assert pm.power_state == 3 and not dev.bus_master_enabled
    with pytest.raises(ProtocolError) as exc:
        bar_read(dev, 0, abi.MAGIC)
    assert exc.value.errno == errno.EIO
    cfg_write(dev, base + 4, 2, 0x0)                         # back to D0: state kept
    assert dev.bus_master_enabled and bar_read(dev, 0, abi.MAGIC) == abi.MAGIC_VALUE
    cfg_write(dev, base + 4, 2, 0x3)
    dev.reset()
    assert pm.power_state == 0 and cfg_read(dev, base + 4, 2) & 3 == 0
