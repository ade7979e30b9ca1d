"""``vxpu serve`` as a real process: listens 0600, serves, survives a disconnect, and shuts
down cleanly on SIGTERM/SIGINT (socket removed, exit 0)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from vxpu.vfio_server.client import VfioUserClient

from vxpu.abi import testdev as abi

from .conftest import CMD_MEM_BME, CONFIG


def _start(path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "vxpu", "serve", "--socket", str(path), "--device", "test", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not _listening(path):
        if proc.poll() is not None:
            raise AssertionError(f"vxpu serve exited early: {proc.stdout.read()}")
        assert time.monotonic() < deadline, "vxpu serve did not listen"
        time.sleep(0.05)
    return proc


def _listening(path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_and_shut_down(tmp_path, sig):
    path = tmp_path / "vu0.sock"
    proc = _start(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for _ in range(2):                                   # a re-plug gets a fresh connection
            with VfioUserClient(path) as c:
                c.handshake()
                c.region_write(CONFIG, 4, CMD_MEM_BME)
                assert c.region_read(0, abi.MAGIC, 4) == b"VXPU"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert not path.exists()
    assert "client connected" in out and "stopped" in out


def test_msix_option(tmp_path):
    path = tmp_path / "x.sock"
    proc = _start(path, "--msix")
    try:
        with VfioUserClient(path) as c:
            c.handshake()
            assert c.irq_info(2).count == abi.MSIX_VECTORS
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_stale_socket_replaced_live_socket_refused(tmp_path):
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    proc = _start(path)
    try:
        second = subprocess.run([sys.executable, "-m", "vxpu", "serve", "--socket", str(path)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 2
        assert "another server is listening" in second.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_bad_backend_spec_and_bad_path(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "vxpu", "serve", "--socket", str(tmp_path / "a.sock"),
                          "--backend", "no such thing!"], capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 2 and "--backend" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "vxpu", "serve", "--socket", str(tmp_path / "no" / "a.sock")],
                             capture_output=True, text=True, timeout=30, check=False)
    assert missing.returncode == 2 and "cannot listen" in missing.stderr


def test_compile_worker_flags_override_the_environment(monkeypatch):
    import argparse

    from vxpu.ir.workers import WorkerLimits
    from vxpu.vfio_server import cli as serve_cli

    from vxpu.errors import ConfigError

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    monkeypatch.setenv("VXPU_COMPILE_WORKERS", "3")
    monkeypatch.setenv("VXPU_COMPILE_CPU_S", "7")
    args = parser.parse_args(["serve", "--socket", "s", "--compile-memory", "512", "--compile-timeout", "4.5"])
    assert serve_cli.compile_config(args) == (3, WorkerLimits(512 << 20, 7, 4.5))
    args = parser.parse_args(["serve", "--socket", "s", "--compile-workers", "0"])
    assert serve_cli.compile_config(args)[0] == 0
    for bad in (["--compile-timeout", "0"], ["--compile-workers", "-1"], ["--compile-cpu", "0"]):
        with pytest.raises(ConfigError, match="compile"):
            serve_cli.compile_config(parser.parse_args(["serve", "--socket", "s", *bad]))
    for bad, flag in ((["--compile-timeout", "0"], "--compile-timeout"), (["--compile-idle", "-1"], "--compile-idle"),
                      (["--compile-cpu", "0"], "--compile-cpu"), (["--compile-memory", "0"], "--compile-memory")):
        with pytest.raises(ConfigError, match=flag):        # the message names the setting to fix
            serve_cli.compile_config(parser.parse_args(["serve", "--socket", "s", *bad]))
    monkeypatch.setenv("VXPU_COMPILE_MEMORY_MB", "lots")
    with pytest.raises(ConfigError, match="compile workers"):
        serve_cli.compile_config(parser.parse_args(["serve", "--socket", "s"]))
