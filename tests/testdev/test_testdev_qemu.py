"""The PCI model under the real QEMU 11.1.3: realize, SeaBIOS enumeration, BAR assignment.

No guest kernel is booted (the guest-side checks are tests/e2e's). QEMU parses our config
space at realize (BAR types, the capability chain, MSI/MSI-X/PM/PCIe layouts) and aborts
realize on anything it dislikes; then SeaBIOS sizes and assigns the BARs through forwarded
config writes and enables memory decode. Every capability option is switched on, so
QEMU's capability parsing sees all of them.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vxpu.vfio_server.pci import Command
from vxpu.vfio_server.server import VfioUserServer
from vxpu.vfio_server.testdev import TestDevice

from vxpu.abi import testdev as abi
from vxpu.errors import Error

pytestmark = pytest.mark.qemu


def _qemu():  # type: ignore[no-untyped-def]
    from vxpu.images.qemu import find_qemu
    try:
        return find_qemu(fetch=False, quiet=True)
    except Error as exc:
        pytest.skip(f"no QEMU with vfio-user-pci in the cache or on PATH ({exc}); run ./scripts/test once")


@pytest.fixture
def realized(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[TestDevice, str]]:
    """The test device served to a QEMU that has run SeaBIOS; yields it and ``info pci``."""
    from vxpu.qmp.monitor import Monitor

    qemu = _qemu()
    dev = TestDevice(**request.param)
    sock, qmp = tmp_path / "dev.sock", tmp_path / "qmp.sock"
    device = {"driver": "vfio-user-pci", "id": "vxpu0", "socket": {"type": "unix", "path": str(sock)}}
    argv = qemu.argv("-accel", "tcg", "-m", "128M", "-machine", "pc,memory-backend=mem",
                     "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
                     "-nographic", "-nic", "none", "-qmp", f"unix:{qmp},server=on,wait=off",
                     "-device", json.dumps(device))
    with VfioUserServer(sock, dev), (tmp_path / "qemu.log").open("wb") as err:
        proc = subprocess.Popen(argv, env=qemu.environ(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            mon = Monitor(qmp, timeout=20.0)
            deadline = time.monotonic() + 20.0
            while not dev.command & Command.MEMORY and time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "qemu.log").read_text()
                time.sleep(0.05)
            info = str(mon.execute("human-monitor-command", **{"command-line": "info pci"}))
            mon.close()
            yield dev, info
        finally:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("realized", [{}, {"msix": True, "pm": True, "pcie": True}], indirect=True,
                         ids=["default", "all-capabilities"])
def test_qemu_realizes_and_firmware_assigns_bars(realized: tuple[TestDevice, str]) -> None:
    dev, info = realized
    block = info[info.index("PCI device 5850:0001"):]
    assert "PCI subsystem 5850:0001" in block and "pin A" in block
    assert "BAR0: 32 bit memory at" in block and "[0x" in block
    assert "BAR2: 64 bit prefetchable memory at" in block
    assert dev.memory_enabled                                   # SeaBIOS enabled decode
    bar0 = dev.config.get(0x10, 4)
    assert bar0 & ~0xFFF and bar0 & 0xFFF == 0                  # assigned, 4 KiB aligned
    assert f"{bar0:#010x}" in block
    assert dev.regs.get("RESET_COUNT") == 1                    # QEMU's realize-time reset
    assert dev.region_read(0, abi.MAGIC, 4) == b"VXPU"
