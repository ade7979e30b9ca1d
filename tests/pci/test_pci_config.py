"""Config space semantics of PciDevice: IDs, masks, W1C, BAR sizing, ROM, command, reset, infos."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vxpu.vfio_server.device import CONFIG_REGION, NUM_IRQS, NUM_REGIONS, IrqIndex, RegionFlags
from vxpu.vfio_server.errors import ProtocolError
from vxpu.vfio_server.pci import (
    INTX_PIN_NONE,
    Bar,
    BarKind,
    Command,
    DeviceDefinitionError,
    PciDevice,
    PciIds,
    RamRegion,
    Status,
)
from vxpu.vfio_server.testdev import TestDevice

from tests.pci.pcihelpers import FakeContext, bar_read, cfg_read, cfg_write, enable
from vxpu.abi import testdev as abi

IDS = PciIds(vendor_id=0x1234, device_id=0x5678, class_code=0x120000, revision=3)


def make(bars: list[Bar], **kw: object) -> PciDevice:
    return PciDevice(IDS, bars, **kw)  # type: ignore[arg-type]


def test_identity_fields_read_and_are_read_only() -> None:
    dev = TestDevice()
    assert cfg_read(dev, 0x00, 2) == abi.VENDOR_ID
    assert cfg_read(dev, 0x02, 2) == abi.DEVICE_ID
    assert cfg_read(dev, 0x08, 1) == abi.REVISION
    assert cfg_read(dev, 0x08, 4) >> 8 == abi.CLASS_CODE
    assert cfg_read(dev, 0x0E, 1) == 0                      # type-0 header, single function
    assert cfg_read(dev, 0x2C, 2) == abi.SUBSYSTEM_VENDOR_ID
    assert cfg_read(dev, 0x2E, 2) == abi.SUBSYSTEM_ID
    before = dev.region_read(CONFIG_REGION, 0, 256)
    for off in (0x00, 0x08, 0x0C, 0x2C, 0x34, 0x3C):
        cfg_write(dev, off, 4, 0xFFFFFFFF)
    after = dev.region_read(CONFIG_REGION, 0, 256)
    # Only cache line size (0x0C), latency timer (0x0D) and interrupt line (0x3C) changed.
    changed = [i for i in range(256) if before[i] != after[i]]
    assert changed == [0x0C, 0x0D, 0x3C]


def test_config_size_is_256_or_4096_with_pcie() -> None:
    assert TestDevice().config_size == 256
    assert TestDevice(pcie=True).config_size == 4096
    assert len(TestDevice(pcie=True).region_read(CONFIG_REGION, 0, 4096)) == 4096


def test_command_register_bits_and_properties() -> None:
    dev = TestDevice()
    assert not dev.memory_enabled and not dev.bus_master_enabled
    cfg_write(dev, 0x04, 2, 0xFFFF)
    # No I/O BAR: the I/O space bit is hardwired to 0.
    expected = Command.MEMORY | Command.BUS_MASTER | Command.PARITY | Command.SERR | Command.INTX_DISABLE
    assert cfg_read(dev, 0x04, 2) == expected
    assert dev.memory_enabled and dev.bus_master_enabled and not dev.io_enabled
    cfg_write(dev, 0x04, 1, Command.MEMORY)      # byte write: bus master off
    assert dev.memory_enabled and not dev.bus_master_enabled
    io = make([Bar(0, 16, RamRegion(16), BarKind.IO)])
    cfg_write(io, 0x04, 2, Command.IO)
    assert io.io_enabled


def test_command_changed_hook_sees_old_and_new() -> None:
    seen = []

    class Dev(PciDevice):
        def command_changed(self, old: int, new: int) -> None:
            seen.append((old, new))

    dev = Dev(IDS, [Bar(0, 4096, RamRegion(4096))])
    enable(dev)
    enable(dev)                                   # same value: no call
    assert seen == [(0, Command.MEMORY | Command.BUS_MASTER)]


def test_status_write_one_to_clear_and_cap_list_read_only() -> None:
    dev = TestDevice()
    assert cfg_read(dev, 0x06, 2) & Status.CAP_LIST
    dev.config.set(0x06, 2, dev.config.status | Status.REC_MASTER_ABORT | Status.DETECTED_PARITY)
    cfg_write(dev, 0x06, 2, 0)                    # writing 0 changes nothing
    assert cfg_read(dev, 0x06, 2) & Status.REC_MASTER_ABORT
    cfg_write(dev, 0x06, 2, Status.REC_MASTER_ABORT | Status.CAP_LIST)
    status = cfg_read(dev, 0x06, 2)
    assert not status & Status.REC_MASTER_ABORT
    assert status & Status.DETECTED_PARITY and status & Status.CAP_LIST


def test_bar_sizing_32bit_non_prefetchable() -> None:
    dev = TestDevice()
    assert cfg_read(dev, 0x10, 4) == 0x0                    # memory, 32-bit, non-prefetchable
    cfg_write(dev, 0x10, 4, 0xFFFFFFFF)
    assert cfg_read(dev, 0x10, 4) == 0xFFFFF000              # 4 KiB
    cfg_write(dev, 0x10, 4, 0xFEBF3000)
    assert cfg_read(dev, 0x10, 4) == 0xFEBF3000
    cfg_write(dev, 0x10, 4, 0xFEBF3ABC)                      # bits below the size are read-only
    assert cfg_read(dev, 0x10, 4) == 0xFEBF3000


def test_bar_sizing_64bit_prefetchable_pair() -> None:
    dev = TestDevice()
    assert cfg_read(dev, 0x18, 4) == 0xC                     # 64-bit (0x4) + prefetchable (0x8)
    cfg_write(dev, 0x18, 4, 0xFFFFFFFF)
    cfg_write(dev, 0x1C, 4, 0xFFFFFFFF)
    assert cfg_read(dev, 0x18, 4) == 0xFFFF000C              # 64 KiB
    assert cfg_read(dev, 0x1C, 4) == 0xFFFFFFFF
    cfg_write(dev, 0x18, 8, 0x0000_0008_0001_0000)           # one 8-byte write of the pair
    assert cfg_read(dev, 0x18, 8) == 0x0000_0008_0001_000C


def test_bar_sizing_large_64bit_and_io_bars() -> None:
    dev = make([Bar(0, 1 << 34, RamRegion(16), BarKind.MEM64),
                Bar(2, 32, RamRegion(32), BarKind.IO),
                Bar(3, 1 << 31, RamRegion(16))])
    cfg_write(dev, 0x10, 8, (1 << 64) - 1)
    assert cfg_read(dev, 0x10, 4) == 0x4 and cfg_read(dev, 0x14, 4) == 0xFFFFFFFC
    cfg_write(dev, 0x18, 4, 0xFFFFFFFF)
    assert cfg_read(dev, 0x18, 4) == 0xFFFFFFE1              # I/O, 32 bytes
    cfg_write(dev, 0x1C, 4, 0xFFFFFFFF)
    assert cfg_read(dev, 0x1C, 4) == 0x80000000              # 2 GiB, 32-bit


def test_unused_bars_and_rom_bar_read_zero() -> None:
    dev = TestDevice()
    for off in (0x14, 0x20, 0x24):                          # BAR1, BAR4, BAR5 unused
        cfg_write(dev, off, 4, 0xFFFFFFFF)
        assert cfg_read(dev, off, 4) == 0
    cfg_write(dev, 0x30, 4, 0xFFFFF800)                     # QEMU's ROM sizing write
    assert cfg_read(dev, 0x30, 4) == 0
    cfg_write(dev, 0x30, 4, 0xFFFFFFFF)
    assert cfg_read(dev, 0x30, 4) == 0


def test_interrupt_line_rw_and_pin() -> None:
    dev = TestDevice()
    cfg_write(dev, 0x3C, 1, 0x0B)
    assert cfg_read(dev, 0x3C, 1) == 0x0B
    assert cfg_read(dev, 0x3D, 1) == 1                      # INTA
    cfg_write(dev, 0x3D, 1, 4)
    assert cfg_read(dev, 0x3D, 1) == 1
    assert cfg_read(make([], interrupt_pin=INTX_PIN_NONE), 0x3D, 1) == 0


def test_reset_clears_writable_state_and_keeps_identity() -> None:
    dev = TestDevice(msix=True, pm=True)
    pristine = dev.region_read(CONFIG_REGION, 0, 256)
    enable(dev, 0x0547 & ~Command.IO)
    cfg_write(dev, 0x10, 4, 0xFEBF3000)
    cfg_write(dev, 0x18, 8, 0x8_0000_0000)
    cfg_write(dev, 0x3C, 1, 0x0B)
    msi = dev.msi
    assert msi is not None
    cfg_write(dev, msi.offset + 2, 2, 0x0001)
    assert msi.enabled
    dev.reset()
    assert dev.region_read(CONFIG_REGION, 0, 256) == pristine
    assert dev.command == 0 and not msi.enabled


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 255), data=st.binary(min_size=1, max_size=8))
def test_random_writes_never_change_read_only_bits(offset: int, data: bytes) -> None:
    dev = TestDevice(msix=True, pm=True)
    data = data[:256 - offset]
    before = bytes(dev.config.data)
    dev.region_write(CONFIG_REGION, offset, data)
    after = bytes(dev.config.data)
    changeable = bytes(a | b for a, b in zip(dev.config.wmask, dev.config.w1c, strict=True))
    for i in range(256):
        assert (before[i] ^ after[i]) & ~changeable[i] == 0, f"read-only bit changed at {i:#x}"


def test_config_access_outside_the_space_is_einval() -> None:
    dev = TestDevice()
    with pytest.raises(ProtocolError) as exc:
        dev.region_read(CONFIG_REGION, 254, 4)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError) as exc:
        dev.region_write(CONFIG_REGION, 256, b"\0")
    assert exc.value.errno == errno.EINVAL


def test_region_info_for_all_indexes() -> None:
    dev = TestDevice()
    infos = [dev.region_info(i) for i in range(NUM_REGIONS)]
    assert [i.size for i in infos] == [abi.BAR0_SIZE, 0, abi.BAR2_SIZE, 0, 0, 0, 0, 256, 0]
    rw = RegionFlags.READ | RegionFlags.WRITE
    assert [i.flags for i in infos] == [rw, 0, rw, 0, 0, 0, 0, rw, 0]
    assert all(i.mmap_fd is None for i in infos)


def test_irq_info_for_all_indexes() -> None:
    plain, with_msix = TestDevice(), TestDevice(msix=True)
    got = [(plain.irq_info(i).count, plain.irq_info(i).flags) for i in range(NUM_IRQS)]
    assert got == [(1, 7), (1, 9), (0, 1), (1, 1), (0, 1)]
    assert (with_msix.irq_info(IrqIndex.MSIX).count, with_msix.irq_info(IrqIndex.MSIX).flags) == (2, 9)
    no_pin = make([], interrupt_pin=INTX_PIN_NONE, msi_vectors=0)
    assert [no_pin.irq_info(i).count for i in range(NUM_IRQS)] == [0, 0, 0, 1, 0]


@pytest.mark.parametrize("bars, why", [
    ([Bar(0, 3000, RamRegion(3000))], "power of two"),
    ([Bar(0, 8, RamRegion(8))], "16 bytes"),
    ([Bar(0, 4096, RamRegion(16), BarKind.MEM64), Bar(1, 4096, RamRegion(16))], "collides"),
    ([Bar(5, 4096, RamRegion(16), BarKind.MEM64)], "does not fit"),
    ([Bar(0, 512, RamRegion(16), BarKind.IO)], "4..256"),
    ([Bar(0, 16, RamRegion(16), BarKind.IO, prefetchable=True)], "prefetchable"),
])
def test_bad_bar_declarations_are_refused(bars: list[Bar], why: str) -> None:
    with pytest.raises(DeviceDefinitionError, match=why):
        make(bars)


def test_bar_access_needs_memory_decode_and_existing_region() -> None:
    dev = TestDevice()
    with pytest.raises(ProtocolError) as exc:
        bar_read(dev, 0, abi.MAGIC)
    assert exc.value.errno == errno.EIO
    enable(dev, Command.MEMORY)
    assert bar_read(dev, 0, abi.MAGIC) == abi.MAGIC_VALUE
    for missing in (1, 3, 6, 8):          # BAR2's upper half, unused BAR, ROM, VGA
        with pytest.raises(ProtocolError) as exc:
            dev.region_read(missing, 0, 4)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError) as exc:
        dev.region_read(0, abi.BAR0_SIZE - 2, 4)
    assert exc.value.errno == errno.EINVAL


def test_attach_detach_tracks_context() -> None:
    dev, ctx = TestDevice(), FakeContext()
    dev.attach(ctx)
    assert dev.context is ctx
    dev.detach()
    assert dev.context is None
    assert dev.raise_irq(0) is False
