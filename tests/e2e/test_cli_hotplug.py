"""``vxpu attach``, ``vxpu ls`` and ``vxpu detach`` on a running VM, as an operator types them.

The guest (booted without a vxpu device) sees the device arrive with working registers, then
leave; ``ls`` reports it healthy in between; detach stops the server and leaves no socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary
from vxpu.images.vm import Vm, VmSpec
from vxpu.qmp.runtime import process_alive

from vxpu.abi import testdev as abi

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT_S = float(os.environ.get("VXPU_E2E_BOOT_TIMEOUT", "180"))


@pytest.fixture
def runtime() -> Iterator[Path]:
    """A private runtime directory (short, so socket paths fit in sun_path)."""
    root = Path(tempfile.mkdtemp(prefix="vxrt-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _vxpu(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vxpu", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False, env=env)


def test_attach_ls_detach_commands(qemu_binary: QemuBinary, guest_image: GuestImage, tmp_path: Path,
                                   runtime: Path) -> None:
    env = {**os.environ, "VXPU_RUNTIME_DIR": str(runtime)}
    spec = VmSpec(cmd=f"python3 -m vxpu.guest.selftest --skip-checks --watch-hotplug {BOOT_TIMEOUT_S + 60:.0f}",
                  accel=os.environ.get("VXPU_E2E_ACCEL", "auto"))
    with Vm(qemu_binary, guest_image, spec, tmp_path / "vm") as vm:
        def explain(res: subprocess.CompletedProcess[str] | None = None) -> str:
            out = f"rc={res.returncode}\n{res.stdout}\n{res.stderr}\n" if res else ""
            logs = "".join(f"\n[{p.name}]\n{p.read_text()}" for p in runtime.rglob("*.log"))
            return out + vm.log_tail() + logs

        watching = vm.console.wait_for(r'^VXPU-EVENT (\{"event":"watching".*\})$', BOOT_TIMEOUT_S, vm.problem)
        assert json.loads(watching.group(1))["present"] is False
        qmp = str(vm.release_monitor())
        res = _vxpu(env, "attach", "--qmp", qmp, "--id", "hot0", "--device", "test", "--json")
        assert res.returncode == 0, explain(res)
        handle = json.loads(res.stdout)
        assert handle["id"] == "hot0" and Path(handle["socket"]).is_socket(), handle
        added = json.loads(vm.console.wait_for(r'^VXPU-EVENT (\{"event":"added".*\})$', 30, vm.problem).group(1))
        assert added["ok"] and added["magic"] == abi.MAGIC_VALUE, explain()
        assert added["bdf"].endswith(handle["slot"]), (added, handle)

        res = _vxpu(env, "ls", "--qmp", qmp, "--json")
        assert res.returncode == 0, explain(res)
        rows = json.loads(res.stdout)
        assert [(r["id"], r["pid"], r["health"], r["slot"]) for r in rows] == \
            [("hot0", handle["pid"], "ok", handle["slot"])]
        res = _vxpu(env, "ls", "--qmp", qmp)
        assert "hot0" in res.stdout and " ok" in res.stdout, explain(res)

        res = _vxpu(env, "detach", "--qmp", qmp, "--id", "hot0", "--json")
        assert res.returncode == 0, explain(res)
        assert json.loads(res.stdout)["server"] == "terminated"
        vm.console.wait_for(r'^VXPU-EVENT \{"event":"removed"', 30, vm.problem)
        assert not process_alive(handle["pid"], None)
        assert not Path(handle["socket"]).exists()
        assert json.loads(_vxpu(env, "ls", "--qmp", qmp, "--json").stdout) == []

        res = _vxpu(env, "detach", "--qmp", qmp, "--id", "hot0")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "does not exist" in res.stderr, explain(res)


def test_vm_run_prints_a_qmp_socket_that_vxpu_can_use(runtime: Path) -> None:
    """``vxpu vm run`` keeps its QMP socket free and prints it; attach/ls/detach work through it."""
    env = {**os.environ, "VXPU_RUNTIME_DIR": str(runtime)}
    cmd = "python3 -m vxpu.guest.selftest --skip-checks --watch-hotplug 60"
    run = subprocess.Popen([sys.executable, "-m", "vxpu", "vm", "run", "--no-device", "--accel",
                            os.environ.get("VXPU_E2E_ACCEL", "auto"), "--cmd", cmd, "--timeout", "240"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                           env=env)
    try:
        assert run.stderr is not None and run.stdout is not None
        qmp = None
        for line in run.stderr:
            if line.startswith("vxpu: QMP socket "):
                qmp = line.split()[3]
                break
        assert qmp and Path(qmp).is_socket(), run.stderr.read()
        for line in run.stdout:  # the console: wait until the guest watches for hot-plug
            if '"event":"watching"' in line:
                break
        res = _vxpu(env, "attach", "--qmp", qmp, "--device", "test", "--json")
        assert res.returncode == 0, res.stderr
        pid = json.loads(res.stdout)["pid"]
        for line in run.stdout:
            if '"event":"added"' in line:
                assert '"ok":true' in line.replace(" ", ""), line
                break
        assert [r["health"] for r in json.loads(_vxpu(env, "ls", "--qmp", qmp, "--json").stdout)] == ["ok"]
        res = _vxpu(env, "detach", "--qmp", qmp, "--id", "vxpu0")
        assert res.returncode == 0 and "terminated" in res.stdout, res.stderr
        assert not process_alive(pid, None)
    finally:
        run.send_signal(signal.SIGINT)  # vm run stops its QEMU on the way out (SIGKILL would orphan it)
        try:
            run.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            run.kill()
            run.communicate()
