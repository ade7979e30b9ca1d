"""Host VFIO passthrough logic against a fixture sysfs tree (no real device is touched): the
plan, the refusals (IOMMU off, group not viable, host using the device) and the memory of the
original driver. A real kernel does the same in tests/e2e/test_operators_passthrough.py."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from vxpu.qmp import passthrough as pt
from vxpu.qmp.connection import Qmp
from vxpu.qmp.errors import PassthroughError, QmpError, UnknownDevice

BDF = "0000:01:00.0"
SIBLING = "0000:01:00.1"


def _device(sysfs: Path, bdf: str, driver: str | None, group: int | None) -> Path:
    dev = sysfs / "devices/pci0000:00" / bdf
    dev.mkdir(parents=True)
    (dev / "driver_override").write_text("(null)\n")
    (sysfs / "bus/pci/devices").mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(dev, sysfs / "bus/pci/devices"), sysfs / "bus/pci/devices" / bdf)
    if driver:
        drv = sysfs / "bus/pci/drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        (drv / "unbind").touch()
        os.symlink(os.path.relpath(drv, dev), dev / "driver")
    if group is not None:
        grp = sysfs / "kernel/iommu_groups" / str(group)
        (grp / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(grp, dev), dev / "iommu_group")
        os.symlink(os.path.relpath(dev, grp / "devices"), grp / "devices" / bdf)
    return dev


@pytest.fixture(autouse=True)
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VXPU_RUNTIME_DIR", str(tmp_path / "rt"))
    return tmp_path / "rt"


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    (tmp_path / "bus/pci/drivers/vfio-pci").mkdir(parents=True)
    (tmp_path / "bus/pci/drivers/vfio-pci/unbind").touch()
    (tmp_path / "bus/pci/drivers_probe").touch()
    return tmp_path


def test_plan_for_a_device_on_a_host_driver(sysfs: Path) -> None:
    _device(sysfs, BDF, "nvidia", 7)
    plan = pt.plan_bind("01:00.0", sysfs)
    assert (plan.bdf, plan.iommu_group, plan.current_driver) == (BDF, 7, "nvidia")
    assert plan.vfio_device == "/dev/vfio/7"
    assert [(str(w.path.relative_to(sysfs)), w.value) for w in plan.writes] == [
        (f"bus/pci/devices/{BDF}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/nvidia/unbind", BDF),
        ("bus/pci/drivers_probe", BDF),
    ]


def test_apply_writes_in_order(sysfs: Path) -> None:
    dev = _device(sysfs, BDF, "nvidia", 7)
    pt.apply(pt.plan_bind(BDF, sysfs).writes)
    assert (dev / "driver_override").read_text() == "vfio-pci"
    assert (sysfs / "bus/pci/drivers/nvidia/unbind").read_text() == BDF
    assert (sysfs / "bus/pci/drivers_probe").read_text() == BDF


def test_unbound_device_needs_no_unbind(sysfs: Path) -> None:
    _device(sysfs, BDF, None, 3)
    assert [w.path.name for w in pt.plan_bind(BDF, sysfs).writes] == ["driver_override", "drivers_probe"]


def test_already_on_vfio_is_a_no_op(sysfs: Path) -> None:
    _device(sysfs, BDF, "vfio-pci", 3)
    assert pt.plan_bind(BDF, sysfs).writes == ()


def test_bind_reports_a_probe_that_did_not_take(sysfs: Path) -> None:
    _device(sysfs, BDF, "nvidia", 7)  # the fixture has no kernel, so the driver link never changes
    with pytest.raises(PassthroughError, match="bound to nvidia instead of vfio-pci"):
        pt.bind_vfio(BDF, sysfs, settle_s=0.1)


def test_iommu_off_names_the_kernel_parameter(sysfs: Path) -> None:
    _device(sysfs, BDF, "nvidia", None)
    with pytest.raises(PassthroughError, match="intel_iommu=on"):
        pt.plan_bind(BDF, sysfs)


def test_group_sibling_on_a_host_driver_is_refused(sysfs: Path) -> None:
    _device(sysfs, BDF, "nvidia", 7)
    sib = _device(sysfs, SIBLING, "snd_hda_intel", None)
    grp = sysfs / "kernel/iommu_groups/7"
    os.symlink(os.path.relpath(grp, sib), sib / "iommu_group")
    os.symlink(os.path.relpath(sib, grp / "devices"), grp / "devices" / SIBLING)
    with pytest.raises(PassthroughError, match=f"group 7 is not viable: {SIBLING} shares it .* snd_hda_intel"):
        pt.plan_bind(BDF, sysfs)


def test_group_sibling_bridge_on_pcieport_is_viable(sysfs: Path) -> None:
    _device(sysfs, BDF, "nvidia", 7)
    sib = _device(sysfs, SIBLING, "pcieport", None)
    grp = sysfs / "kernel/iommu_groups/7"
    os.symlink(os.path.relpath(grp, sib), sib / "iommu_group")
    os.symlink(os.path.relpath(sib, grp / "devices"), grp / "devices" / SIBLING)
    assert pt.plan_bind(BDF, sysfs).iommu_group == 7


def test_boot_display_is_refused_unless_forced(sysfs: Path) -> None:
    dev = _device(sysfs, BDF, "nvidia", 7)
    (dev / "boot_vga").write_text("1\n")
    with pytest.raises(PassthroughError, match="host is using 0000:01:00.0 .*boot display.*--force"):
        pt.plan_bind(BDF, sysfs)
    assert len(pt.plan_bind(BDF, sysfs, force=True).writes) == 3


def test_network_interface_up_is_refused(sysfs: Path) -> None:
    dev = _device(sysfs, BDF, "e1000e", 7)
    (dev / "net/eth0").mkdir(parents=True)
    (dev / "net/eth0/flags").write_text("0x1003\n")
    with pytest.raises(PassthroughError, match="interface eth0 is up .*ip link set eth0 down"):
        pt.plan_bind(BDF, sysfs)
    (dev / "net/eth0/flags").write_text("0x1002\n")
    assert pt.plan_bind(BDF, sysfs).current_driver == "e1000e"


def test_mounted_block_device_is_refused(sysfs: Path, tmp_path: Path) -> None:
    dev = _device(sysfs, BDF, "nvme", 7)
    (dev / "nvme/nvme0/block/nvme0n1/nvme0n1p2").mkdir(parents=True)
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n/dev/nvme0n1p2 / ext4 rw 0 0\n")
    with pytest.raises(PassthroughError, match="/dev/nvme0n1p2 is mounted"):
        pt.plan_bind(BDF, sysfs, mounts=mounts)
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert pt.plan_bind(BDF, sysfs, mounts=mounts).writes


def test_bind_remembers_the_original_driver(sysfs: Path, runtime: Path) -> None:
    _device(sysfs, BDF, "nvidia", 7)
    with pytest.raises(PassthroughError):  # the fixture has no kernel to re-probe
        pt.bind(BDF, sysfs, settle_s=0.05)
    assert pt.original_driver(BDF) == "nvidia"
    assert (runtime / "passthrough" / f"{BDF}.json").is_file()


def test_unbind_reports_an_original_driver_that_did_not_come_back(sysfs: Path, runtime: Path) -> None:
    _device(sysfs, BDF, "vfio-pci", 7)
    (runtime / "passthrough").mkdir(parents=True)
    (runtime / "passthrough" / f"{BDF}.json").write_text(json.dumps({"bdf": BDF, "driver": "e1000e"}))
    with pytest.raises(PassthroughError, match="went to vfio-pci instead of its original driver e1000e"):
        pt.unbind(BDF, sysfs, settle_s=0.05)
    assert (sysfs / f"devices/pci0000:00/{BDF}/driver_override").read_text() == "\n"


def test_vfio_pci_not_loaded(sysfs: Path) -> None:
    _device(sysfs, BDF, "nvidia", 7)
    (sysfs / "bus/pci/drivers/vfio-pci/unbind").unlink()
    (sysfs / "bus/pci/drivers/vfio-pci").rmdir()
    with pytest.raises(PassthroughError, match="modprobe vfio-pci"):
        pt.plan_bind(BDF, sysfs)


@pytest.mark.parametrize("bad", ["", "01:00", "0000:01:00.8", "zz:00.0", "0000:01:00.0/../x"])
def test_bad_addresses_are_refused(sysfs: Path, bad: str) -> None:
    with pytest.raises(PassthroughError, match="not a PCI address"):
        pt.plan_bind(bad, sysfs)


def test_missing_device(sysfs: Path) -> None:
    with pytest.raises(PassthroughError, match="no PCI device 0000:02:00.0"):
        pt.plan_bind("0000:02:00.0", sysfs)


def test_unbind_plan_clears_override_and_reprobes(sysfs: Path) -> None:
    _device(sysfs, BDF, "vfio-pci", 7)
    writes = pt.plan_unbind(BDF, sysfs)
    assert [(w.path.name, w.value) for w in writes] == [
        ("driver_override", "\n"), ("unbind", BDF), ("drivers_probe", BDF)]


def test_device_json() -> None:
    assert pt.passthrough_device("01:00.0", "gpu0") == {"driver": "vfio-pci", "host": BDF, "id": "gpu0"}


class FakeQmp(Qmp):
    """A QMP session that answers from a table and records commands (no QEMU)."""

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        super().__init__(Path("/fake.qmp"), None, None)  # type: ignore[arg-type]
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse = refuse
        self.devices = [{"name": "hostdev0", "type": "child<vfio-pci>"}]

    async def execute(self, command: str, timeout: float = 15.0, **arguments: Any) -> Any:
        self.calls.append((command, arguments))
        if command in self.refuse:
            raise QmpError(f"QMP {command} failed: vfio 0000:01:00.0: group 7 is not viable", "GenericError")
        answers = {"qom-get": "pc-i440fx-11.1-machine" if arguments.get("property") == "type" else BDF,
                   "query-pci": [{"bus": 0, "devices": [{"bus": 0, "slot": 0, "function": 0}]}],
                   "qom-list": self.devices}
        return answers.get(command, {})

    @contextmanager
    def listen(self, name: str, match: Any = None) -> Iterator[Any]:
        yield name

    @staticmethod
    async def next_event(listener: Any, timeout: float) -> dict[str, Any] | None:
        return {"event": "DEVICE_DELETED"}


def test_attach_host_adds_the_json_device_on_a_free_bus(sysfs: Path) -> None:
    _device(sysfs, BDF, "vfio-pci", 7)
    qmp = FakeQmp()
    plan = asyncio.run(pt.attach_host(qmp, BDF, "gpu0", sysfs))
    assert plan.vfio_device == "/dev/vfio/7"
    assert qmp.calls[-1] == ("device_add", {"driver": "vfio-pci", "host": BDF, "id": "gpu0", "bus": "pci.0"})


def test_attach_host_refused_by_qemu_gives_the_device_back(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _device(sysfs, BDF, "nvidia", 7)
    plan = pt.plan_bind(BDF, sysfs)
    monkeypatch.setattr(pt, "bind", lambda *a, **k: plan)
    undone: list[str] = []
    monkeypatch.setattr(pt, "unbind", lambda bdf, *a, **k: undone.append(bdf))
    with pytest.raises(QmpError, match="refused to add 0000:01:00.0 as gpu0: .*not viable; .*given back to nvidia"):
        asyncio.run(pt.attach_host(FakeQmp(refuse=frozenset({"device_add"})), BDF, "gpu0", sysfs))
    assert undone == [BDF]


def test_detach_host_returns_the_host_address() -> None:
    qmp = FakeQmp()
    assert asyncio.run(pt.detach_host(qmp, "hostdev0")) == BDF
    assert ("device_del", {"id": "hostdev0"}) in qmp.calls


def test_detach_host_refuses_a_device_that_is_not_passthrough() -> None:
    qmp = FakeQmp()
    qmp.devices = [{"name": "vxpu0", "type": "child<vfio-user-pci>"}]
    with pytest.raises(UnknownDevice, match="'vxpu0' is a vfio-user-pci, not a vfio-pci passthrough device"):
        asyncio.run(pt.detach_host(qmp, "vxpu0"))
