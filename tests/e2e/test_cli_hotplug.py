"""``vxpu attach --start-server`` and ``vxpu detach --stop-server`` on a running VM, as a user
types them: the guest (booted without a vxpu device) sees the device arrive with working
registers, then leave; the server started by attach is stopped by detach."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary
from vxpu.images.vm import Vm, VmSpec

from vxpu.abi import testdev as abi

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT_S = float(os.environ.get("VXPU_E2E_BOOT_TIMEOUT", "180"))


def _vxpu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vxpu", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


def test_attach_and_detach_commands(qemu_binary: QemuBinary, guest_image: GuestImage, tmp_path: Path) -> None:
    sock = tmp_path / "hot0.sock"
    spec = VmSpec(cmd=f"python3 -m vxpu.guest.selftest --skip-checks --watch-hotplug {BOOT_TIMEOUT_S + 60:.0f}",
                  accel=os.environ.get("VXPU_E2E_ACCEL", "auto"))
    with Vm(qemu_binary, guest_image, spec, tmp_path / "vm") as vm:
        def explain(res: subprocess.CompletedProcess[str] | None = None) -> str:
            out = f"rc={res.returncode}\n{res.stdout}\n{res.stderr}\n" if res else ""
            server_log = sock.with_suffix(".log")
            return out + vm.log_tail() + (f"\n[server]\n{server_log.read_text()}" if server_log.exists() else "")

        watching = vm.console.wait_for(r'^VXPU-EVENT (\{"event":"watching".*\})$', BOOT_TIMEOUT_S, vm.problem)
        assert json.loads(watching.group(1))["present"] is False
        qmp = vm.release_monitor()
        res = _vxpu("attach", "--qmp", str(qmp), "--socket", str(sock), "--id", "hot0", "--start-server")
        assert res.returncode == 0, explain(res)
        pid = int(Path(f"{sock}.pid").read_text())
        added = json.loads(vm.console.wait_for(r'^VXPU-EVENT (\{"event":"added".*\})$', 30, vm.problem).group(1))
        assert added["ok"] and added["magic"] == abi.MAGIC_VALUE, explain()
        res = _vxpu("detach", "--qmp", str(qmp), "--id", "hot0", "--stop-server", str(sock))
        assert res.returncode == 0, explain(res)
        vm.console.wait_for(r'^VXPU-EVENT \{"event":"removed"', 30, vm.problem)
        assert not Path(f"{sock}.pid").exists()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail(f"detach --stop-server left server pid {pid} running")
