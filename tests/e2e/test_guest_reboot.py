"""A guest reboots with accelerator work in flight; the device comes back clean and the second
boot computes (guest_programs/reboot.py; QEMU runs without -no-reboot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary

from tests.e2e.guestvm import guest_program
from vxpu.abi.xpu import DeviceStatus

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def boots(qemu_binary: QemuBinary, guest_image: GuestImage,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], bool, str]:
    work: Path = tmp_path_factory.mktemp("reboot")
    with guest_program(qemu_binary, guest_image, work, "reboot.py", reboot=True) as run:
        try:
            reports = run.lines("VXPU-REBOOT", r"VXPU-REBOOT \{\"boot\": 2")
            run.vm.wait_exit(60)
        except Exception as exc:  # noqa: BLE001 - every test reports the logs
            reports = [{"error": f"{type(exc).__name__}: {exc}"}]
        return reports, run.server.alive(), run.explain()


def _boot(boots: tuple[list[dict[str, Any]], bool, str], n: int) -> dict[str, Any]:
    reports, _alive, logs = boots
    found = [r for r in reports if r.get("boot") == n]
    assert len(found) == 1, f"boot {n}: {reports}\n{logs}"
    return found[0]


def test_first_boot_reboots_with_work_in_flight(boots: tuple[list[dict[str, Any]], bool, str]) -> None:
    first = _boot(boots, 1)
    assert first["in_flight"] > 0, first


def test_device_comes_back_clean(boots: tuple[list[dict[str, Any]], bool, str]) -> None:
    first, second = _boot(boots, 1), _boot(boots, 2)
    assert second["status"] & (DeviceStatus.ENABLED | DeviceStatus.FATAL) == 0, second
    assert second["fatal_code"] == 0, second
    assert second["reset_count"] > first["reset_count"], (first, second)
    assert first["live_allocations"] > first["baseline_allocations"], first   # boot 1 really left some
    assert second["live_allocations"] == first["baseline_allocations"], (first, second)


def test_second_boot_computes(boots: tuple[list[dict[str, Any]], bool, str]) -> None:
    assert _boot(boots, 2)["saxpy_ok"], boots[2]
    assert boots[1], f"the server died\n{boots[2]}"
