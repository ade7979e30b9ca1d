"""The operator's lifecycle on real QEMU 11 with a real Linux guest: 20 attach/detach cycles of
the accelerator on one running VM (the guest opens each with the SDK and completes IDENTIFY and
STATS), and every failure an operator can meet, each with a clear error and no orphan process,
socket or QEMU fd left behind.

One VM (module fixture, running ``guest_programs/hotplug_cycles.py``) serves the cycles and the
error cases; a second QEMU with no OS (no guest answers ACPI hot-plug) shows a detach the guest
never completes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
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
from vxpu.qmp.errors import IdInUse, QmpBusy, QmpUnreachable, ServerError, UnknownDevice, UnplugTimeout
from vxpu.qmp.runtime import DeviceRecord, VmState, pid_start_time, process_alive
from vxpu.qmp.server import stop_server

from tests.e2e.operators import bare_qemu, leftovers, servers_under

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT_S = float(os.environ.get("VXPU_E2E_BOOT_TIMEOUT", "180"))
ACCEL = os.environ.get("VXPU_E2E_ACCEL", "auto")
CYCLES = 20
CYCLE = r"^VXPU-CYCLE (\{.*\})$"
GONE = r"^VXPU-GONE (\{.*\})$"
PROGRAM = Path(__file__).parent / "guest_programs" / "hotplug_cycles.py"


@pytest.fixture(scope="module")
def runtime() -> Iterator[Path]:
    """A private runtime directory (short, so socket paths fit in sun_path)."""
    root = Path(tempfile.mkdtemp(prefix="vxrt-", dir="/tmp"))
    old = os.environ.get("VXPU_RUNTIME_DIR")
    os.environ["VXPU_RUNTIME_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("VXPU_RUNTIME_DIR", None)
    else:
        os.environ["VXPU_RUNTIME_DIR"] = old
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def vm(qemu_binary: QemuBinary, guest_image: GuestImage, runtime: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    spec = VmSpec(cmd=f"python3 /root/hotplug_cycles.py {CYCLES}; sleep 3600", accel=ACCEL,
                  extra_files={"root/hotplug_cycles.py": PROGRAM.read_bytes()})
    with Vm(qemu_binary, guest_image, spec, tmp_path_factory.mktemp("opvm")) as machine:
        machine.console.wait_for(r"^VXPU-READY", BOOT_TIMEOUT_S, machine.problem)
        machine.release_monitor()
        yield machine


def qemu_fds(vm: Vm) -> list[str]:
    """What QEMU's fds point at, socket/eventfd inode numbers dropped (a QMP client's socket is
    a new inode each time)."""
    assert vm.proc is not None
    fd_dir = Path(f"/proc/{vm.proc.pid}/fd")
    out = []
    for fd in fd_dir.iterdir():
        try:
            out.append(re.sub(r":\[\d+\]$", "", os.readlink(fd)))
        except OSError:
            continue
    return sorted(out)


def _settled_fds(vm: Vm, want: int, timeout: float = 5.0) -> list[str]:
    """QEMU's fds, once their count is back to ``want`` (QEMU closes some from its main loop)."""
    deadline = time.monotonic() + timeout
    fds = qemu_fds(vm)
    while len(fds) != want and time.monotonic() < deadline:
        time.sleep(0.05)
        fds = qemu_fds(vm)
    return fds


def test_twenty_attach_detach_cycles(vm: Vm, runtime: Path) -> None:
    qmp = str(vm.qmp_path)
    assert sync.list_devices(qmp) == []
    time.sleep(0.5)  # QEMU closes the last QMP client's socket from its main loop
    baseline = qemu_fds(vm)
    attach_s, detach_s, fd_counts = [], [], []
    t0 = time.monotonic()
    for cycle in range(CYCLES):
        handle = sync.attach(qmp, backend="cpu")  # the accelerator, vxpu serve's default device
        attach_s.append(handle.seconds)
        seen = json.loads(vm.console.wait_for(CYCLE, 60, vm.problem).group(1))
        assert seen["ok"] and seen["cycle"] == cycle, (seen, vm.log_tail(), Path(handle.log).read_text()[-2000:])
        assert seen["backend"] == "cpu" and seen["commands"].get("IDENTIFY") == 1, seen
        assert seen["bdf"].endswith(handle.slot), (cycle, seen, handle)
        rows = sync.list_devices(qmp)
        assert [(d.id, d.health) for d in rows] == [(handle.id, "ok")]
        assert rows[0].stats is not None and rows[0].stats["age_s"] < 5, rows  # the server's STATS file

        done = sync.detach(qmp, handle.id)
        detach_s.append(done.seconds)
        assert (done.server, done.unplugged) == ("terminated", True), \
            (cycle, done, Path(handle.log).read_text(errors="replace")[-4000:])
        assert json.loads(vm.console.wait_for(GONE, 30, vm.problem).group(1))["cycle"] == cycle
        assert not process_alive(handle.pid, None), f"cycle {cycle}: server {handle.pid} still runs"
        assert not Path(handle.socket).exists(), f"cycle {cycle}: {handle.socket} left behind"
        assert sync.list_devices(qmp) == []
        fds = _settled_fds(vm, len(baseline))
        fd_counts.append(len(fds))
        assert fds == baseline, f"cycle {cycle}: QEMU fds {len(baseline)} -> {len(fds)}: " \
                                f"{sorted(set(fds) ^ set(baseline))}"
        assert servers_under(runtime) == [] and leftovers(runtime) == []
    total = time.monotonic() - t0
    print(f"\n{CYCLES} cycles in {total:.1f} s; attach median {sorted(attach_s)[CYCLES // 2] * 1000:.0f} ms "
          f"(max {max(attach_s) * 1000:.0f}), detach median {sorted(detach_s)[CYCLES // 2] * 1000:.0f} ms "
          f"(max {max(detach_s) * 1000:.0f}); QEMU fds {len(baseline)} before, {fd_counts[-1]} after")
    assert vm.problem() is None


def test_dead_qmp_socket_fails_fast(runtime: Path, tmp_path: Path) -> None:
    dead = tmp_path / "dead.qmp"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()  # the socket file stays, nobody listens: what a crashed QEMU leaves
    t0 = time.monotonic()
    with pytest.raises(QmpUnreachable, match="nothing listens .* has exited"):
        sync.attach(dead, device="test")
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(QmpUnreachable, match="no QMP socket at"):
        sync.list_devices(tmp_path / "missing.qmp")
    assert servers_under(runtime) == [] and leftovers(runtime) == []


def test_qmp_socket_held_by_another_client(vm: Vm, runtime: Path) -> None:
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.connect(str(vm.qmp_path))
    try:
        assert b"QMP" in holder.recv(4096)  # QEMU greeted the holder
        t0 = time.monotonic()
        with pytest.raises(QmpBusy, match="another client holds it"):
            sync.attach(vm.qmp_path, device="test")
        took = time.monotonic() - t0
        assert took < 3.0, f"busy QMP detected after {took:.1f}s"
        assert servers_under(runtime) == [] and leftovers(runtime) == []
    finally:
        holder.close()
    time.sleep(0.2)  # QEMU notices the hang-up and accepts the next client
    assert sync.list_devices(vm.qmp_path) == []


def test_duplicate_id_is_refused(vm: Vm, runtime: Path) -> None:
    first = sync.attach(vm.qmp_path, id="dup0", device="test")
    try:
        with pytest.raises(IdInUse, match="already has a device with id 'dup0'"):
            sync.attach(vm.qmp_path, id="dup0", device="test")
        assert servers_under(runtime) == [first.pid]
        assert [(d.id, d.health) for d in sync.list_devices(vm.qmp_path)] == [("dup0", "ok")]
    finally:
        done = sync.detach(vm.qmp_path, "dup0")
    assert (done.server, done.unplugged) == ("terminated", True)
    assert servers_under(runtime) == [] and leftovers(runtime) == []


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"device": "no-such-model"}, "invalid choice: 'no-such-model'"),
    ({"backend": "hip:99"}, "--backend hip:99: UNAVAILABLE"),  # no host has a 100th AMD GPU
])
def test_server_that_fails_to_start(vm: Vm, runtime: Path, kwargs: dict[str, str], says: str) -> None:
    with pytest.raises(ServerError, match=r"exited before listening(.|\n)*" + re.escape(says)):
        sync.attach(vm.qmp_path, id="bad0", **kwargs)
    assert servers_under(runtime) == [] and leftovers(runtime) == []
    assert sync.list_devices(vm.qmp_path) == []


def test_detach_of_unknown_id(vm: Vm, runtime: Path) -> None:
    with pytest.raises(UnknownDevice, match="'ghost7' does not exist in this VM"):
        sync.detach(vm.qmp_path, "ghost7")


def test_stale_record_is_reported_and_cleaned(vm: Vm, runtime: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = VmState(vm.qmp_path)
    record, sock, logf = state.paths("stale0")
    state.write(DeviceRecord(id="stale0", qmp=state.qmp, qemu_pid=None, backend="cpu", device="test",
                             pid=dead.pid, pid_start=None, socket=str(sock), log=str(logf)))
    assert [(d.id, d.health) for d in sync.list_devices(vm.qmp_path)] == [("stale0", "server-exited")]
    done = sync.detach(vm.qmp_path, "stale0")
    assert (done.server, done.unplugged) == ("gone", False)
    assert not record.exists() and sync.list_devices(vm.qmp_path) == []


def test_guest_that_never_releases_the_device(qemu_binary: QemuBinary, runtime: Path, tmp_path: Path) -> None:
    """QEMU with no OS: SeaBIOS finds nothing to boot, so nobody answers the ACPI eject."""
    handle = None
    try:
        with bare_qemu(qemu_binary, tmp_path) as qmp:
            handle = sync.attach(qmp, id="stuck0", device="test")
            t0 = time.monotonic()
            with pytest.raises(UnplugTimeout, match="did not release stuck0 within 2s(.|\n)*keeps running"):
                sync.detach(qmp, "stuck0", timeout=2)
            assert 2 <= time.monotonic() - t0 < 5
            assert process_alive(handle.pid, None) and Path(handle.socket).is_socket()
            assert [(d.id, d.health) for d in sync.list_devices(qmp)] == [("stuck0", "ok")]
            with pytest.raises(UnplugTimeout):  # a retry finds the unplug still pending and waits again
                sync.detach(qmp, "stuck0", timeout=1)
            assert process_alive(handle.pid, None)
            cli = subprocess.run([sys.executable, "-m", "vxpu", "detach", "--qmp", str(qmp), "--id", "stuck0",
                                  "--timeout", "1", "--json"], capture_output=True, text=True, timeout=60,
                                 check=False)
            assert cli.returncode == 3, cli  # its own exit status, so scripts can retry later
            assert json.loads(cli.stdout)["kind"] == "UnplugTimeout"
            assert process_alive(handle.pid, None)
    finally:
        if handle is not None:  # QEMU has gone first: a server must never vanish under its device
            stop_server(handle.pid, pid_start_time(handle.pid))
            VmState(handle.qmp).remove("stuck0")
    assert servers_under(runtime) == [] and leftovers(runtime) == []
