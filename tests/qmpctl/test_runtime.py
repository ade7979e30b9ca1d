"""The runtime directory: atomic device records, process identity, listening detection."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vxpu.qmp import runtime as rt

from vxpu.errors import ConfigError


def _record(state: rt.VmState, dev_id: str, pid: int) -> rt.DeviceRecord:
    _, sock, logf = state.paths(dev_id)
    return rt.DeviceRecord(id=dev_id, qmp=state.qmp, qemu_pid=None, backend="cpu", device=None, pid=pid,
                           pid_start=rt.pid_start_time(pid), socket=str(sock), log=str(logf))


def test_root_follows_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VXPU_RUNTIME_DIR", "/x/y")
    assert rt.runtime_root() == Path("/x/y")
    monkeypatch.delenv("VXPU_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert rt.runtime_root() == Path("/run/user/1000/vxpu")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert rt.runtime_root() == (Path("/run/vxpu") if os.geteuid() == 0 else Path(f"/tmp/vxpu-{os.geteuid()}"))


def test_records_round_trip_and_removal_leaves_nothing(tmp_path: Path) -> None:
    state = rt.VmState(tmp_path / "vm.qmp", root=tmp_path / "rt")
    state.write(_record(state, "vxpu1", os.getpid()))
    state.write(_record(state, "vxpu0", os.getpid()))
    assert [r.id for r in state.records()] == ["vxpu0", "vxpu1"]
    got = state.read("vxpu0")
    assert got is not None and got.pid == os.getpid() and got.qmp == str((tmp_path / "vm.qmp").resolve())
    assert not list(state.dir.glob(".*.tmp"))  # the atomic write left no temporary file
    (state.dir / "vxpu1.json").write_text("{not json")
    assert [r.id for r in state.records()] == ["vxpu0"]
    state.remove("vxpu0")
    state.remove("vxpu1")
    assert not state.dir.exists()


def test_same_qmp_socket_same_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    a = rt.VmState(tmp_path / "d" / "vm.qmp", root=tmp_path)
    b = rt.VmState(tmp_path / "d" / ".." / "d" / "vm.qmp", root=tmp_path)
    assert a.dir == b.dir != rt.VmState(tmp_path / "other.qmp", root=tmp_path).dir


@pytest.mark.parametrize("bad", ["", "0abc", "a b", "a/b", "x" * 65, "../etc"])
def test_bad_ids_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="not valid"):
        rt.check_id(bad)


def test_too_long_socket_path_names_the_fix(tmp_path: Path) -> None:
    state = rt.VmState(tmp_path / "vm.qmp", root=tmp_path / ("d" * 100))
    with pytest.raises(ConfigError, match="VXPU_RUNTIME_DIR"):
        state.paths("vxpu0")


def test_process_identity_and_zombies() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = rt.pid_start_time(child.pid)
        assert rt.process_alive(child.pid, start)
        assert not rt.process_alive(child.pid, (start or 0) + 1)  # a recycled pid is another process
    finally:
        child.kill()
    time.sleep(0.2)  # now a zombie until reaped: dead all the same (process_alive reaps it)
    assert not rt.process_alive(child.pid, start)
    assert rt.pid_start_time(child.pid) is None


def test_server_listening_needs_a_listening_socket_held_by_the_pid(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    assert not rt.server_listening(os.getpid(), path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    assert not rt.server_listening(os.getpid(), path)  # bound, not listening
    s.listen(1)
    assert rt.server_listening(os.getpid(), path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not rt.server_listening(other.pid, path)  # the socket exists, but that process holds none
    finally:
        other.kill()
        other.wait()
    s.close()
    assert not rt.server_listening(os.getpid(), path)


def test_vm_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    state = rt.VmState(tmp_path / "vm.qmp", root=tmp_path / "rt")
    fd = state.try_lock()
    assert fd is not None and state.lock_holder() == os.getpid()
    assert state.try_lock() is None  # a second holder waits, even in the same process
    os.close(fd)
    again = state.try_lock()
    assert again is not None
    os.close(again)
    assert state.lock_path.exists() and not state.dir.exists()  # the lock file stays; no VM folder needed
