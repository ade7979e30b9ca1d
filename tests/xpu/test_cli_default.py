"""``vxpu serve`` without ``--device`` serves the accelerator on the CPU backend (a real
process): the config space shows 0x5850:0x0100, BAR0 the accelerator's registers, and a ring
round trip works; ``--device test`` still gives the test device."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vxpu.vfio_server.client import VfioUserClient

from vxpu.abi import testdev
from vxpu.abi import xpu as abi


def _serve(path: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "vxpu", "serve", "--socket", str(path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                return proc
            except OSError:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"vxpu serve exited early: {proc.stdout.read() if proc.stdout else ''}")
        assert time.monotonic() < deadline, "vxpu serve did not listen"
        time.sleep(0.05)


def _ids(path: Path) -> tuple[int, int, int]:
    with VfioUserClient(path) as c:
        c.handshake()
        c.region_write(7, 4, struct.pack("<H", 0x0006))
        vendor, device = struct.unpack("<HH", c.region_read(7, 0, 4))
        version = struct.unpack("<I", c.region_read(0, 0x04, 4))[0]
        return vendor, device, version


def test_default_device_is_the_accelerator(tmp_path):
    path = tmp_path / "xpu.sock"
    proc = _serve(path)
    try:
        assert _ids(path) == (abi.VENDOR_ID, abi.DEVICE_ID, abi.VERSION_VALUE)
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_device_test_keeps_the_test_device(tmp_path):
    path = tmp_path / "test.sock"
    proc = _serve(path, "--device", "test")
    try:
        assert _ids(path) == (testdev.VENDOR_ID, testdev.DEVICE_ID, testdev.VERSION_VALUE)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_stats_file_is_kept_up_to_date(tmp_path):
    path, stats = tmp_path / "xpu.sock", tmp_path / "xpu.stats.json"
    proc = _serve(path, "--stats-file", str(stats))
    try:
        doc = json.loads(stats.read_bytes())                     # written before the socket listens
        assert doc["abi"] == "1.0" and doc["device"]["fatal_errors"] == 0 and "session" in doc
        first = doc["device"]["uptime_ns"]
        deadline = time.monotonic() + 10
        while json.loads(stats.read_bytes())["device"]["uptime_ns"] == first:
            assert time.monotonic() < deadline, "the stats file was not rewritten"
            time.sleep(0.2)
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_quota_and_native_kind_options(backend):
    from argparse import Namespace

    from vxpu.vfio_server import cli

    from vxpu.errors import ConfigError

    args = Namespace(msix=False, quota=["memory_bytes=1048576", "events = 7"], allow_native=["ptx"])
    dev = cli._xpu_device(args, backend)
    try:
        assert dev.quota.memory_bytes == 1 << 20 and dev.quota.events == 7
        has_ptx = "ptx" in backend.properties().features            # allowed; set if the backend has it
        assert bool(dev.features & abi.Feature.PTX) == has_ptx
        doc = json.loads(dev._identity())
        assert doc["quota"]["memory_bytes"] == 1 << 20
    finally:
        dev.close()
    for bad in (["memory_bytes"], ["memory_bytes=-1"], ["nope=1"], ["events=0"], ["events=1.5"]):
        with pytest.raises(ConfigError):
            cli.quota_from_args(Namespace(quota=bad))


def test_bad_quota_fails_before_serving(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vxpu", "serve", "--socket", str(tmp_path / "q.sock"),
                          "--quota", "no_such_limit=5"], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and "--quota" in res.stderr and not (tmp_path / "q.sock").exists()
