"""Guest PCI access (identity, resources, config space, capability walk, MSI programming) on a
fixture sysfs tree: sysfs ``config`` behaves like a file for pread/pwrite, so a regular file
stands in for it. The real thing runs in the QEMU end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from vxpu.guest.errors import DeviceNotFound, GuestError
from vxpu.guest.irq import _NO_HANDLER, MSI_ADDRESS, KmsgWatcher, disable_msi, enable_msi
from vxpu.guest.pci import PciFunction

BDF = "0000:00:03.0"


def _config(caps: list[tuple[int, int, int]], msi_ctrl: int = 0x0080) -> bytearray:
    cfg = bytearray(256)
    cfg[0:4] = (0x00015850).to_bytes(4, "little")
    cfg[0x06] = 0x10  # capability list present
    cfg[0x34] = caps[0][1] if caps else 0
    for cid, off, nxt in caps:
        cfg[off], cfg[off + 1] = cid, nxt
        if cid == 0x05:
            cfg[off + 2:off + 4] = msi_ctrl.to_bytes(2, "little")
    return cfg


def _device(root: Path, bdf: str = BDF, vendor: int = 0x5850, device: int = 0x0001,
            caps: list[tuple[int, int, int]] | None = None, msi_ctrl: int = 0x0080) -> Path:
    dev = root / bdf
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(f"{vendor:#06x}\n")
    (dev / "device").write_text(f"{device:#06x}\n")
    (dev / "class").write_text("0x120000\n")
    (dev / "resource").write_text(
        "0x00000000febf0000 0x00000000febf0fff 0x0000000000040200\n"
        "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
        "0x00000000fe000000 0x00000000fe00ffff 0x000000000014220c\n")
    (dev / "config").write_bytes(bytes(_config(caps if caps is not None else [(0x05, 0x40, 0)], msi_ctrl)))
    return dev


def test_find_by_ids_and_read_identity(tmp_path: Path) -> None:
    _device(tmp_path / "devices", "0000:00:02.0", vendor=0x1234, device=0x1111)
    _device(tmp_path / "devices")
    fn = PciFunction.find_one(0x5850, 0x0001, tmp_path / "devices")
    assert (fn.bdf, fn.vendor, fn.device, fn.class_code) == (BDF, 0x5850, 0x0001, 0x120000)
    with pytest.raises(DeviceNotFound, match="5850:0002"):
        PciFunction.find_one(0x5850, 0x0002, tmp_path / "devices")


def test_resources(tmp_path: Path) -> None:
    fn = PciFunction(_device(tmp_path))
    res = fn.resources()
    assert [r.size for r in res] == [0x1000, 0, 0x10000]
    assert res[2].flags & 0x100000 and res[2].flags & 0x2000


def test_capability_walk(tmp_path: Path) -> None:
    fn = PciFunction(_device(tmp_path, caps=[(0x01, 0x40, 0x50), (0x05, 0x50, 0x60), (0x10, 0x60, 0)]))
    assert fn.capabilities() == [(0x01, 0x40), (0x05, 0x50), (0x10, 0x60)]
    assert fn.find_capability(0x05) == 0x50
    assert fn.find_capability(0x11) is None


@pytest.mark.parametrize("caps", [[(0x05, 0x40, 0x40)], [(0x05, 0x40, 0x10)]], ids=["loop", "into-header"])
def test_hostile_capability_chain(tmp_path: Path, caps: list[tuple[int, int, int]]) -> None:
    fn = PciFunction(_device(tmp_path, caps=caps))
    with pytest.raises(GuestError, match="broken capability chain"):
        fn.capabilities()


def test_config_access_checks(tmp_path: Path) -> None:
    fn = PciFunction(_device(tmp_path))
    assert fn.config_read(0, 2) == 0x5850
    fn.config_write(0x08, 0xAABBCCDD)
    assert fn.config_read(0x08, 1) == 0xDD and fn.config_read(0x0A, 2) == 0xAABB
    for bad in ((0x3, 2), (0x1, 4), (0x0, 3)):
        with pytest.raises(GuestError, match="bad config"):
            fn.config_read(*bad)
    with pytest.raises(GuestError, match="bad config write"):
        fn.config_write(0x10, 1 << 16, 2)


@pytest.mark.parametrize("ctrl,data_off", [(0x0080, 0x4C), (0x0000, 0x48), (0x0180, 0x4C)])
def test_enable_msi_programs_address_data_and_enable(tmp_path: Path, ctrl: int, data_off: int) -> None:
    fn = PciFunction(_device(tmp_path, msi_ctrl=ctrl))
    assert enable_msi(fn, 0xD0) == 0x40
    assert fn.config_read(0x44) == MSI_ADDRESS
    assert fn.config_read(data_off, 2) == 0xD0
    assert fn.config_read(0x42, 2) & 0x1
    assert fn.config_read(0x04, 2) & 0x4  # bus master on: QEMU drops MSIs otherwise
    if ctrl & 0x100:
        assert fn.config_read(data_off + 4) == 0
    disable_msi(fn)
    assert not fn.config_read(0x42, 2) & 0x1


def test_enable_msi_refuses_bad_vector_and_missing_cap(tmp_path: Path) -> None:
    fn = PciFunction(_device(tmp_path, caps=[(0x01, 0x40, 0)]))
    with pytest.raises(GuestError, match="no MSI capability"):
        enable_msi(fn, 0xD0)
    with pytest.raises(GuestError, match="outside"):
        enable_msi(fn, 0xFF)


@pytest.mark.parametrize("line,vector", [("No irq handler for 0.208", 208),
                                         ("__common_interrupt: 1.33 No irq handler for vector", 33)])
def test_unhandled_vector_message_formats(line: str, vector: int) -> None:
    m = _NO_HANDLER.search(line)
    assert m and int(m.group(2) or m.group(4)) == vector


def test_kmsg_watcher_needs_dev_kmsg_or_says_so() -> None:
    try:
        watcher = KmsgWatcher()
    except GuestError as exc:
        assert "/dev/kmsg" in str(exc)
    else:
        watcher.poll()
        watcher.close()
