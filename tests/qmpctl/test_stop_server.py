"""Stopping a server: a real ``vxpu serve`` ends on SIGTERM, whichever of its threads the kernel
hands the signal to, and writes its thread stacks on SIGUSR1; a process that ignores SIGTERM is
asked for its stacks, then killed."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vxpu.qmp import sync
from vxpu.qmp.runtime import DeviceRecord, VmState, pid_start_time, process_alive
from vxpu.qmp.server import ServerProcess, ask_for_stacks, stop_server

# Ignores SIGTERM, dumps its stacks on SIGUSR1 as vxpu serve does, and says when it is ready.
STUBBORN = """
import faulthandler, signal, sys, threading, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
faulthandler.register(signal.SIGUSR1, all_threads=True)
def stuck_in_teardown():
    time.sleep(60)
threading.Thread(target=stuck_in_teardown, daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""


def _wait_for(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}:\n{log[-2000:]}"
        time.sleep(0.05)
    return log


def test_real_server_writes_stacks_on_sigusr1_and_ends_on_sigterm(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "vu.sock", tmp_path / "server.log", ["--device", "test"]).start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        _wait_for(server.log_path, "serving")
        ask_for_stacks(pid)
        log = _wait_for(server.log_path, "serve_forever")     # the main thread's frame, by name
        assert "Thread 0x" in log or "Current thread" in log, log[-2000:]
        assert server.alive(), "SIGUSR1 must not stop the server"
        t0 = time.monotonic()
        assert stop_server(pid, pid_start_time(pid)) == "terminated"
        assert time.monotonic() - t0 < 3.0
        assert not server.socket_path.exists()
    finally:
        server.stop()


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to thread ``tid`` of process ``pid`` (glibc >= 2.30)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):
        pytest.skip("this libc has no tgkill() (glibc 2.30 added it)")
    if libc.tgkill(pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig})")


def test_sigterm_taken_by_a_worker_thread_still_stops_the_server(tmp_path: Path) -> None:
    """The kernel may hand SIGTERM to any thread; CPython runs the handler in the main thread
    only, which sleeps in select() with no timeout: the server must wake up all the same."""
    server = ServerProcess(tmp_path / "vu.sock", tmp_path / "server.log", ["--device", "xpu"]).start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        _wait_for(server.log_path, "serving")
        workers = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        assert workers, "the accelerator's poller thread should be running"
        time.sleep(0.2)                                        # the main thread is in select() by now
        _tgkill(pid, workers[0], signal.SIGTERM)
        assert server.proc.wait(3.0) == 0, server.log_tail()
        assert "SIGTERM: shutting down" in server.log_path.read_text()
        assert not server.socket_path.exists()
    finally:
        server.stop()


def test_process_ignoring_sigterm_is_asked_for_stacks_then_killed(tmp_path: Path) -> None:
    log_path = tmp_path / "stubborn.log"
    with log_path.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        _wait_for(log_path, "ready")
        start = pid_start_time(child.pid)
        t0 = time.monotonic()
        assert stop_server(child.pid, start, grace=0.5) == "killed"
        assert 0.5 <= time.monotonic() - t0 < 3.0
        assert not process_alive(child.pid, start)
        assert "stuck_in_teardown" in log_path.read_text(errors="replace")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_detach_keeps_the_log_of_a_server_it_had_to_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The VM has exited (its QMP socket is gone) and the device's server ignores SIGTERM: detach
    kills it, removes record and socket, and keeps the log that holds its thread stacks."""
    monkeypatch.setenv("VXPU_RUNTIME_DIR", str(tmp_path / "rt"))
    qemu = subprocess.Popen([sys.executable, "-c", "pass"])
    qemu.wait()                                             # the VM's QEMU: exited
    state = VmState(tmp_path / "vm.qmp")
    _, sock, log_path = state.paths("vxpu0")
    state.dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_for(log_path, "ready")
        state.write(DeviceRecord(id="vxpu0", qmp=state.qmp, qemu_pid=qemu.pid, backend="cpu", device=None,
                                 pid=server.pid, pid_start=pid_start_time(server.pid), socket=str(sock),
                                 log=str(log_path), state="attached"))
        done = sync.detach(tmp_path / "vm.qmp", "vxpu0", grace=0.5)
        assert (done.server, done.pid, done.unplugged) == ("killed", server.pid, False), done
        assert state.read("vxpu0") is None
        assert "stuck_in_teardown" in log_path.read_text(errors="replace")
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def test_gone_process_is_reported_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert stop_server(child.pid, None) == "gone"
