"""Where ``attach`` plugs a device, what happens when there is no room, and an attach that is
interrupted: on bare QEMU machines (no OS; the machine shape is what matters), each case ends
with no vxpu server running and no socket or record left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary
from vxpu.images.vm import Vm, VmSpec
from vxpu.qmp import sync
from vxpu.qmp.errors import NoFreeSlot, QmpBusy, QmpUnreachable
from vxpu.qmp.runtime import VmState, pid_start_time, process_alive
from vxpu.qmp.server import stop_server

from tests.e2e.operators import bare_qemu, leftovers, servers_under
from vxpu.abi import testdev as abi

pytestmark = pytest.mark.qemu
ACCEL = os.environ.get("VXPU_E2E_ACCEL", "auto")
BOOT_TIMEOUT_S = float(os.environ.get("VXPU_E2E_BOOT_TIMEOUT", "180"))


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="vxrt-", dir="/tmp"))
    monkeypatch.setenv("VXPU_RUNTIME_DIR", str(root))
    yield root
    for pid in servers_under(root):  # only after a failed test: QEMU is gone by now
        stop_server(pid, pid_start_time(pid))
    shutil.rmtree(root, ignore_errors=True)


def _stop_all(qmp: Path) -> None:
    """Stop every server vxpu recorded for this (already exited) QEMU."""
    state = VmState(qmp)
    for rec in state.records():
        stop_server(rec.pid, rec.pid_start)
        state.remove(rec.id)


def test_q35_uses_free_hotpluggable_root_ports(qemu_binary: QemuBinary, runtime: Path, tmp_path: Path) -> None:
    ports = ("-device", "pcie-root-port,id=rp1,chassis=1,slot=1", "-device", "pcie-root-port,id=rp2,chassis=2,slot=2",
             "-device", "pcie-root-port,id=rp3,chassis=3,slot=3,hotplug=off")
    try:
        with bare_qemu(qemu_binary, tmp_path, *ports, machine="q35") as qmp:
            first = sync.attach(qmp, device="test")
            second = sync.attach(qmp, device="test")
            assert {first.bus, second.bus} == {"rp1", "rp2"}, (first, second)
            assert first.slot != second.slot, (first, second)  # "01:00.0", or "rp1/00.0" before SeaBIOS numbers buses
            with pytest.raises(NoFreeSlot, match="empty pcie-root-port .* -device pcie-root-port,id=rpN"):
                sync.attach(qmp, device="test")
            assert sorted(servers_under(runtime)) == sorted([first.pid, second.pid])
            assert {(d.id, d.health, d.slot) for d in sync.list_devices(qmp)} == \
                {(first.id, "ok", first.slot), (second.id, "ok", second.slot)}
    finally:
        _stop_all(tmp_path / "bare.qmp")
    assert servers_under(runtime) == [] and leftovers(runtime) == []


def test_pc_with_every_slot_taken(qemu_binary: QemuBinary, runtime: Path, tmp_path: Path) -> None:
    fill = [arg for slot in range(2, 32) for arg in ("-device", f"pci-testdev,addr={slot:#x}")]
    with bare_qemu(qemu_binary, tmp_path, *fill) as qmp:
        t0 = time.monotonic()
        with pytest.raises(NoFreeSlot, match="all 31 slots of the pc bus are taken"):
            sync.attach(qmp, device="test")
        assert time.monotonic() - t0 < 2.0  # refused before any server started
        assert servers_under(runtime) == [] and leftovers(runtime) == []


def _attach_cli(qmp: Path, runtime: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vxpu", "attach", "--qmp", str(qmp), "--id", "cut0"],
                            env={**os.environ, "VXPU_RUNTIME_DIR": str(runtime)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _wait_for_record(runtime: Path, cli: subprocess.Popen[str]) -> Path:
    """The record appears right after the server is spawned, long before it listens."""
    deadline = time.monotonic() + 30
    while not (found := list(runtime.glob("vm-*/cut0.json"))):
        assert cli.poll() is None and time.monotonic() < deadline, cli.communicate()
        time.sleep(0.005)
    return found[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_attach_leaves_nothing(qemu_binary: QemuBinary, runtime: Path, tmp_path: Path,
                                           sig: signal.Signals) -> None:
    with bare_qemu(qemu_binary, tmp_path) as qmp:
        cli = _attach_cli(qmp, runtime)
        record = _wait_for_record(runtime, cli)
        pid = json.loads(record.read_text())["pid"]
        cli.send_signal(sig)
        out, err = cli.communicate(timeout=30)
        assert cli.returncode == 130, (out, err)
        assert not process_alive(pid, None), f"the interrupted attach left server {pid} running"
        assert servers_under(runtime) == [] and leftovers(runtime) == []
        assert sync.list_devices(qmp) == []


def test_killed_attach_is_reported_and_cleaned_by_detach(qemu_binary: QemuBinary, runtime: Path,
                                                         tmp_path: Path) -> None:
    with bare_qemu(qemu_binary, tmp_path) as qmp:
        cli = _attach_cli(qmp, runtime)
        record = _wait_for_record(runtime, cli)
        cli.kill()  # no clean-up can run: the record is how the server is found again
        cli.communicate(timeout=30)
        pid = json.loads(record.read_text())["pid"]
        rows = sync.list_devices(qmp)
        assert [(r.id, r.pid) for r in rows] == [("cut0", pid)]
        assert rows[0].health in ("not-in-vm", "not-listening"), rows
        done = sync.detach(qmp, "cut0")
        assert (done.server, done.unplugged) == ("terminated", False)
        assert not process_alive(pid, None)
        assert servers_under(runtime) == [] and leftovers(runtime) == []


def test_q35_guest_sees_a_device_in_a_root_port_come_and_go(qemu_binary: QemuBinary, guest_image: GuestImage,
                                                             runtime: Path, tmp_path: Path) -> None:
    """On q35 the device goes into a pcie-root-port; Linux takes it through ACPI hot-plug there too."""
    spec = VmSpec(cmd="python3 -m vxpu.guest.selftest --skip-checks --watch-hotplug 600", accel=ACCEL,
                  extra_args=("-machine", "q35", "-device", "pcie-root-port,id=rp1,chassis=1,slot=1"))
    with Vm(qemu_binary, guest_image, spec, tmp_path / "vm") as vm:
        vm.console.wait_for(r'^VXPU-EVENT \{"event":"watching"', BOOT_TIMEOUT_S, vm.problem)
        qmp = vm.release_monitor()
        handle = sync.attach(qmp, device="test")
        try:
            assert handle.bus == "rp1"
            added = json.loads(vm.console.wait_for(r'^VXPU-EVENT (\{"event":"added".*\})$', 30, vm.problem).group(1))
            assert added["ok"] and added["magic"] == abi.MAGIC_VALUE, (added, vm.log_tail())
            with pytest.raises(NoFreeSlot):
                sync.attach(qmp, device="test")
        finally:
            t0 = time.monotonic()
            done = sync.detach(qmp, handle.id, timeout=30)
        vm.console.wait_for(r'^VXPU-EVENT \{"event":"removed"', 30, vm.problem)
        assert (done.server, done.unplugged) == ("terminated", True)
        print(f"\nq35 root-port detach took {time.monotonic() - t0:.2f} s")
    assert servers_under(runtime) == [] and leftovers(runtime) == []


def test_servers_of_a_vm_that_exited_are_reported_and_stopped(qemu_binary: QemuBinary, runtime: Path,
                                                              tmp_path: Path) -> None:
    with bare_qemu(qemu_binary, tmp_path) as qmp:
        handle = sync.attach(qmp, id="orphan0", device="test")
    # QEMU is gone; its server still runs (it would have served a re-plug)
    assert process_alive(handle.pid, None)
    with pytest.raises(QmpUnreachable, match=r"servers recorded for this VM \(orphan0\).*vxpu detach"):
        sync.list_devices(qmp)
    done = sync.detach(qmp, "orphan0")
    assert (done.server, done.pid, done.unplugged) == ("terminated", handle.pid, False)
    assert servers_under(runtime) == [] and leftovers(runtime) == []
    with pytest.raises(QmpUnreachable, match="no QMP socket at"):
        sync.detach(qmp, "orphan0")  # nothing recorded any more: the plain error


def test_a_stopped_qemu_is_named_as_the_cause(qemu_binary: QemuBinary, runtime: Path, tmp_path: Path) -> None:
    """A QEMU stopped with SIGSTOP accepts connections but greets nobody, like a held socket."""
    with bare_qemu(qemu_binary, tmp_path) as qmp:
        assert sync.list_devices(qmp) == []
        time.sleep(0.3)  # QEMU drops that client and listens again
        qemu_pid = next(p for p in servers_under(tmp_path))  # the bare QEMU's command line names tmp_path
        os.kill(qemu_pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(QmpBusy, match=f"its QEMU \\(pid {qemu_pid}\\) is stopped.*kill -CONT {qemu_pid}"):
                sync.attach(qmp, device="test")
            assert time.monotonic() - t0 < 3.0
        finally:
            os.kill(qemu_pid, signal.SIGCONT)
        assert servers_under(runtime) == [] and leftovers(runtime) == []


def test_attach_passes_quotas_to_the_server(qemu_binary: QemuBinary, runtime: Path, tmp_path: Path) -> None:
    env = {**os.environ, "VXPU_RUNTIME_DIR": str(runtime)}
    pid = None
    try:
        with bare_qemu(qemu_binary, tmp_path) as qmp:
            def attach(*extra: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([sys.executable, "-m", "vxpu", "attach", "--qmp", str(qmp), "--json", *extra],
                                      capture_output=True, text=True, timeout=60, env=env, check=False)
            bad = attach("--quota", "memory_bytes=lots")
            assert bad.returncode == 2 and "expected NAME=INTEGER" in json.loads(bad.stdout)["error"], bad
            assert servers_under(runtime) == [] and leftovers(runtime) == []
            good = attach("--quota", "memory_bytes=67108864")
            assert good.returncode == 0, good
            pid = json.loads(good.stdout)["pid"]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            at = argv.index(b"--quota")
            assert argv[at:at + 2] == [b"--quota", b"memory_bytes=67108864"]
    finally:  # QEMU has gone first: a server must never vanish under its device
        _stop_all(tmp_path / "bare.qmp")
    assert pid is not None and not process_alive(pid, None)


def test_concurrent_attaches_queue_instead_of_failing(qemu_binary: QemuBinary, runtime: Path,
                                                      tmp_path: Path) -> None:
    """QEMU serves one QMP client at a time; vxpu commands on one VM wait for each other."""
    env = {**os.environ, "VXPU_RUNTIME_DIR": str(runtime)}
    try:
        with bare_qemu(qemu_binary, tmp_path) as qmp:
            clis = [subprocess.Popen([sys.executable, "-m", "vxpu", "attach", "--qmp", str(qmp), "--json"],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for _ in range(4)]
            results = [cli.communicate(timeout=120) for cli in clis]
            assert [cli.returncode for cli in clis] == [0] * 4, results
            ids = sorted(json.loads(out)["id"] for out, _ in results)
            assert ids == ["vxpu0", "vxpu1", "vxpu2", "vxpu3"]
            assert sorted((d.id, d.health) for d in sync.list_devices(qmp)) == [(i, "ok") for i in ids]
    finally:
        _stop_all(tmp_path / "bare.qmp")
    assert servers_under(runtime) == [] and leftovers(runtime) == []
