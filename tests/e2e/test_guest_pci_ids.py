"""QEMU's x-pci-* overrides: the accelerator shows up with IDs the ABI does not list, beside the
test device (same class 0x12, same BAR0 magic). The VM transport's class probe must pick the
accelerator, and VXPU_PCI_ID must find it directly (guest_programs/pci_ids.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary
from vxpu.images.vm import Vm, VmSpec
from vxpu.qmp.devices import vfio_user_device
from vxpu.qmp.server import ServerProcess

from tests.e2e.guestvm import ACCEL, BOOT_TIMEOUT_S, PROGRAMS

pytestmark = pytest.mark.qemu

OVERRIDE_DEVICE_ID = 0x4242


@pytest.fixture(scope="module")
def report(qemu_binary: QemuBinary, guest_image: GuestImage,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    work: Path = tmp_path_factory.mktemp("pci-ids")
    test_dev = ServerProcess(work / "test.sock", work / "test.log", ["--device", "test"]).start()
    xpu_dev = ServerProcess(work / "xpu.sock", work / "xpu.log", ["--device", "xpu"]).start()
    devices = [vfio_user_device("testdev", work / "test.sock"),   # first in bus order
               vfio_user_device("vxpu0", work / "xpu.sock", **{"x-pci-device-id": OVERRIDE_DEVICE_ID})]
    spec = VmSpec(cmd="python3 /root/pci_ids.py", accel=ACCEL, devices=devices,
                  extra_files={"root/pci_ids.py": (PROGRAMS / "pci_ids.py").read_bytes()})
    vm = Vm(qemu_binary, guest_image, spec, work / "vm")
    try:
        vm.start()
        m = vm.console.wait_for(r"^VXPU-IDS (\{.*\})$", BOOT_TIMEOUT_S, vm.problem)
        return json.loads(m.group(1)), vm.log_tail()
    except Exception as exc:  # noqa: BLE001 - reported by each test
        return {"error": f"{type(exc).__name__}: {exc}"}, vm.log_tail()
    finally:
        vm.stop()
        test_dev.stop()
        xpu_dev.stop()


def test_class_probe_finds_the_accelerator_under_overridden_ids(report: tuple[dict[str, Any], str]) -> None:
    doc, logs = report
    fallback = doc.get("fallback", {})
    assert fallback.get("ids") == f"5850:{OVERRIDE_DEVICE_ID:04x}", f"{doc}\n{logs}"
    assert fallback.get("nop") is True, doc


def test_vxpu_pci_id_finds_it_directly(report: tuple[dict[str, Any], str]) -> None:
    doc, logs = report
    assert doc.get("by_env", {}).get("nop") is True, f"{doc}\n{logs}"
    assert doc["by_env"]["bdf"] == doc["fallback"]["bdf"], doc
