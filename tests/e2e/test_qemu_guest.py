"""End to end: a Debian guest under QEMU 11 drives the vxpu test device served by `vxpu serve`.

One VM run serves every check, in this order (each phase records its result; a failed phase
stops the later ones and every test reports the logs):

1. boot with the device cold-plugged; the guest selftest checks identity, BARs, MSI
   capability, registers, DMA both ways (locked page and huge page) and MSI delivery;
2. QMP ``device_del`` (DEVICE_DELETED; the guest sees the device leave), then ``device_add``
   on the same server socket (the guest sees it come back and its registers answer);
3. QMP ``system_reset``: the guest reboots, QEMU resets the device (DEVICE_RESET), and the
   selftest runs again; RESET_COUNT must have grown and every check must pass again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary
from vxpu.images.vm import Vm, VmSpec
from vxpu.qmp.devices import attach, detach, vfio_user_device
from vxpu.qmp.errors import QmpError
from vxpu.qmp.server import ServerProcess

from vxpu.abi import testdev as abi
from vxpu.errors import Error

pytestmark = pytest.mark.qemu

RESULT = r"^VXPU-SELFTEST (\{.*\})$"
EVENT = r"^VXPU-EVENT (\{.*\"event\":\"{}\".*\})$"
HOTPLUG_S = 30.0
BOOT_TIMEOUT_S = float(os.environ.get("VXPU_E2E_BOOT_TIMEOUT", "180"))
ACCEL = os.environ.get("VXPU_E2E_ACCEL", "auto")


class Scenario:
    """Results of the one VM run, plus everything needed to explain a failure."""

    def __init__(self) -> None:
        self.boot1: dict[str, Any] | None = None
        self.removed: dict[str, Any] | None = None
        self.added: dict[str, Any] | None = None
        self.boot2: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}
        self.error = ""
        self.logs = ""
        self.server_alive_after = False
        self.duplicate_refused: tuple[str, str] | None = None
        self.console = ""
        self.accel = ""

    def require(self, phase: str) -> dict[str, Any]:
        value = getattr(self, phase)
        assert value is not None, f"phase {phase} did not complete: {self.error}\n{self.logs}"
        return value

    def explain(self) -> str:
        return f"accel={self.accel} timings={self.timings}\n{self.error}\n{self.logs}"


def _json(m: Any) -> dict[str, Any]:
    return json.loads(m.group(1))


def _run(vm: Vm, server: ServerProcess, sock: Path, sc: Scenario) -> None:
    t0 = time.monotonic()
    sc.accel = vm.accel
    sc.boot1 = _json(vm.console.wait_for(RESULT, BOOT_TIMEOUT_S, vm.problem))
    sc.timings["boot1_s"] = time.monotonic() - t0
    vm.console.wait_for(EVENT.replace("{}", "watching"), 30, vm.problem)
    assert vm.monitor is not None
    t1 = time.monotonic()
    detach(vm.monitor, "vxpu0", timeout=HOTPLUG_S)
    sc.timings["device_del_s"] = time.monotonic() - t1
    sc.removed = _json(vm.console.wait_for(EVENT.replace("{}", "removed"), HOTPLUG_S, vm.problem))
    t2 = time.monotonic()
    attach(vm.monitor, "vxpu0", sock)
    sc.added = _json(vm.console.wait_for(EVENT.replace("{}", "added"), HOTPLUG_S, vm.problem))
    sc.timings["device_add_s"] = time.monotonic() - t2
    try:
        attach(vm.monitor, "vxpu0", sock)
    except QmpError as exc:
        sc.duplicate_refused = (exc.klass, str(exc))
    t3 = time.monotonic()
    vm.monitor.execute("system_reset")
    sc.boot2 = _json(vm.console.wait_for(RESULT, BOOT_TIMEOUT_S, vm.problem))
    sc.timings["reboot_s"] = time.monotonic() - t3
    sc.server_alive_after = server.alive()


@pytest.fixture(scope="module")
def scenario(qemu_binary: QemuBinary, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    work = tmp_path_factory.mktemp("e2e")
    sock = work / "vxpu0.sock"
    sc = Scenario()
    server = ServerProcess(sock, work / "server.log", ["--device", "test"]).start()
    spec = VmSpec(cmd=f"python3 -m vxpu.guest.selftest --watch-hotplug {BOOT_TIMEOUT_S + 120:.0f}",
                  accel=ACCEL, devices=[vfio_user_device("vxpu0", sock)], reboot=True)
    vm = Vm(qemu_binary, guest_image, spec, work / "vm")
    try:
        vm.start()
        _run(vm, server, sock, sc)
    except (Error, AssertionError, OSError, ValueError) as exc:  # reported by every test that needs the phase
        sc.error = f"{type(exc).__name__}: {exc}"
    finally:
        sc.console = vm.console.text
        sc.logs = f"{vm.log_tail(6000)}\n[server log]\n{server.log_tail(6000)}"
        vm.stop()
        server.stop()
    return sc


def _check(result: dict[str, Any], name: str, sc: Scenario) -> dict[str, Any]:
    check = next((c for c in result["checks"] if c["name"] == name), None)
    assert check is not None, f"no {name} check in {result}\n{sc.explain()}"
    assert check["ok"], f"{name} failed: {check}\n{sc.explain()}"
    return check


def test_guest_finds_device_with_ids_bars_and_msi_cap(scenario: Scenario) -> None:
    r = scenario.require("boot1")
    ident = _check(r, "identity", scenario)
    assert (ident["vendor"], ident["device"]) == (abi.VENDOR_ID, abi.DEVICE_ID)
    assert ident["class"] >> 8 == 0x1200
    bars = _check(r, "bars", scenario)
    assert (bars["bar0_size"], bars["bar2_size"]) == (abi.BAR0_SIZE, abi.BAR2_SIZE)
    caps = _check(r, "capabilities", scenario)
    assert 0x05 in [cid for cid, _ in caps["caps"]]


def test_guest_reads_and_writes_bar0_registers(scenario: Scenario) -> None:
    regs = _check(scenario.require("boot1"), "registers", scenario)
    assert regs["magic"] == abi.MAGIC_VALUE
    assert regs["version"] == abi.VERSION_VALUE
    assert regs["scratch"] == [0x12345678, 0xFFFFFFFF, 0x0, 0xA5A55A5A]


@pytest.mark.parametrize("name", ["dma_page", "dma_hugepage"])
def test_server_reads_and_writes_guest_ram(scenario: Scenario, name: str) -> None:
    dma = _check(scenario.require("boot1"), name, scenario)
    assert dma["status"] == [abi.DMA_OK] * 3
    assert dma["crc_device"] == dma["crc_guest"]      # the server read what the guest wrote
    assert dma["fill_ok"] and dma["invert_ok"]         # the guest read what the server wrote


def test_server_raised_msi_reaches_the_guest_cpu(scenario: Scenario) -> None:
    msi = _check(scenario.require("boot1"), "msi", scenario)
    assert msi["irq_count_delta"] == msi["raised"] == msi["delivered"] == 3


def test_hot_unplug_and_replug(scenario: Scenario) -> None:
    scenario.require("removed")
    added = scenario.require("added")
    assert added["ok"], f"re-plugged device did not answer: {added}\n{scenario.explain()}"
    assert added["magic"] == abi.MAGIC_VALUE


def test_duplicate_attach_is_refused_with_qemus_error(scenario: Scenario) -> None:
    scenario.require("added")
    assert scenario.duplicate_refused is not None, scenario.explain()
    klass, message = scenario.duplicate_refused
    assert klass == "GenericError" and "vxpu0" in message, scenario.duplicate_refused


def test_reset_increments_reset_count_and_device_still_works(scenario: Scenario) -> None:
    before = scenario.require("added")["reset_count"]
    after = scenario.require("boot2")
    assert after["reset_count"] > before, scenario.explain()
    assert after["ok"], f"selftest after reset failed: {after}\n{scenario.explain()}"


def test_guest_kernel_stays_clean(scenario: Scenario) -> None:
    scenario.require("boot2")
    for bad in ("Oops", "BUG:", "Kernel panic", "general protection fault", "Call Trace"):
        assert bad not in scenario.console, f"{bad!r} on the guest console\n{scenario.explain()}"


def test_server_survives_the_whole_run(scenario: Scenario) -> None:
    scenario.require("boot2")
    assert scenario.server_alive_after, scenario.explain()
    assert "Traceback" not in scenario.logs, scenario.explain()
