"""The protocol layer against the real QEMU 11.1.3 client, driven through QEMU's qtest accelerator.

The vCPUs stay stopped (``-S``, so no firmware touches the device): the test itself plays the guest, through port I/O to the PCI config
ports and MMIO/RAM accesses. QEMU still does everything a real VM does on the vfio-user side
(realize handshake, DMA maps of guest RAM, region accesses, SET_IRQS, interrupt delivery),
so these tests prove the server against QEMU in seconds, without booting a kernel:

* fd-backed guest RAM (``memory-backend-memfd,share=on``): DMA straight on the mapping;
* anonymous guest RAM: DMA_MAP without fds, so every DMA goes through DMA_READ/DMA_WRITE
  messages that the server must send without blocking QEMU;
* an MSI whose address points at guest RAM, so a server-raised interrupt becomes a visible
  memory write (eventfd → QEMU → msi_notify → bus-master write);
* the MSI-X variant of the test device realizes, and its PBA reads are served.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from vxpu.vfio_server.server import VfioUserServer
from vxpu.vfio_server.testdev import TestDevice

from vxpu.abi import testdev as abi

pytestmark = pytest.mark.qemu

BAR0_ADDR = 0xFE000000
RAM_BUF = 0x200000
MSI_SINK = 0x300000
MSI_DATA = 0x4A5B


class QTest:
    """A QEMU under the qtest accelerator, with the vfio-user device on ``sock``."""

    def __init__(self, qemu, workdir: Path, sock: Path, memfd: bool) -> None:
        qpath = workdir / "qtest.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(qpath))
        self.listener.listen(1)
        self.listener.settimeout(30)
        device = {"driver": "vfio-user-pci", "id": "vxpu0", "socket": {"type": "unix", "path": str(sock)}}
        memory = (["-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-machine", "pc,memory-backend=mem"]
                  if memfd else ["-machine", "pc"])
        self.log = (workdir / "qemu.log").open("w+")
        self.proc = subprocess.Popen(qemu.argv(*memory, "-m", "64M", "-S", "-qtest", f"unix:{qpath}", "-display", "none",
                                               "-nodefaults", "-device", json.dumps(device)),
                                     env=qemu.environ(), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        try:
            self.conn, _ = self.listener.accept()
        except TimeoutError:
            self.stop()
            raise AssertionError(f"QEMU did not start: {self.output()}") from None
        self.conn.settimeout(30)
        self.f = self.conn.makefile("rw")
        self.slot = self._find_device()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def cmd(self, line: str) -> str:
        self.f.write(line + "\n")
        self.f.flush()
        while True:
            reply = self.f.readline()
            if not reply:
                raise AssertionError(f"QEMU closed qtest on {line!r}: {self.output()}")
            if not reply.startswith("IRQ"):
                break
        assert reply.startswith("OK"), f"{line!r} -> {reply!r}"
        return reply[2:].strip()

    def _cfg_addr(self, slot: int, reg: int) -> str:
        return hex(0x80000000 | slot << 11 | (reg & 0xFC))

    def cfg_read(self, reg: int, size: int = 4, slot: int | None = None) -> int:
        self.cmd(f"outl 0xcf8 {self._cfg_addr(self.slot if slot is None else slot, reg)}")
        op = {1: "inb", 2: "inw", 4: "inl"}[size]
        return int(self.cmd(f"{op} {hex(0xCFC + (reg & 3))}"), 16)

    def cfg_write(self, reg: int, value: int, size: int = 4) -> None:
        self.cmd(f"outl 0xcf8 {self._cfg_addr(self.slot, reg)}")
        op = {1: "outb", 2: "outw", 4: "outl"}[size]
        self.cmd(f"{op} {hex(0xCFC + (reg & 3))} {hex(value)}")

    def _find_device(self) -> int:
        for slot in range(32):
            if self.cfg_read(0, 4, slot) == abi.DEVICE_ID << 16 | abi.VENDOR_ID:
                return slot
        raise AssertionError(f"vxpu device not found on bus 0: {self.output()}")

    def readl(self, addr: int) -> int:
        return int(self.cmd(f"readl {hex(addr)}"), 16)

    def writel(self, addr: int, value: int) -> None:
        self.cmd(f"writel {hex(addr)} {hex(value)}")

    def write(self, addr: int, data: bytes) -> None:
        self.cmd(f"write {hex(addr)} {hex(len(data))} 0x{data.hex()}")

    def read(self, addr: int, size: int) -> bytes:
        return bytes.fromhex(self.cmd(f"read {hex(addr)} {hex(size)}")[2:])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.listener.close()
        self.log.close()


@pytest.fixture(scope="module")
def qemu():
    if os.environ.get("VXPU_SKIP_QEMU") == "1":
        pytest.skip("QEMU tests disabled by VXPU_SKIP_QEMU=1")
    from vxpu.images.qemu import find_qemu
    return find_qemu()


def _machine(qemu, tmp_path: Path, memfd: bool, msix: bool = False) -> Iterator[tuple[QTest, VfioUserServer]]:
    sock = tmp_path / "vxpu.sock"
    server = VfioUserServer(sock, TestDevice(msix=msix)).start()
    qt = QTest(qemu, tmp_path, sock, memfd)
    try:
        qt.cfg_write(0x10, BAR0_ADDR)
        qt.cfg_write(0x04, 0x0006, 2)                         # memory decode + bus master
        yield qt, server
    finally:
        qt.stop()
        server.stop()


@pytest.fixture(params=[True, False], ids=["memfd", "anonymous-ram"])
def machine(request, qemu, tmp_path):
    yield from _machine(qemu, tmp_path, memfd=request.param)


def _dma(qt: QTest, cmd: int, addr: int, length: int) -> int:
    qt.writel(BAR0_ADDR + abi.DMA_ADDR_LO, addr)
    qt.writel(BAR0_ADDR + abi.DMA_ADDR_HI, 0)
    qt.writel(BAR0_ADDR + abi.DMA_LEN, length)
    qt.writel(BAR0_ADDR + abi.DMA_CMD, cmd)                  # a posted REGION_WRITE
    for _ in range(500):
        status = qt.readl(BAR0_ADDR + abi.DMA_STATUS)
        if status != abi.DMA_BUSY:
            return status
        time.sleep(0.01)
    raise AssertionError("DMA stayed busy")


def test_registers(machine):
    qt, server = machine
    assert qt.readl(BAR0_ADDR + abi.MAGIC) == abi.MAGIC_VALUE
    qt.writel(BAR0_ADDR + abi.SCRATCH, 0xCAFEF00D)
    assert qt.readl(BAR0_ADDR + abi.SCRATCH) == 0xCAFEF00D
    assert server.conn is not None and len(server.conn.dma) >= 2     # QEMU mapped its RAM


def test_dma_both_ways(machine):
    qt, server = machine
    direct = any(r.view is not None for r in server.conn.dma.regions())
    data = bytes((i * 7 + 3) & 0xFF for i in range(3000))
    qt.write(RAM_BUF, data)
    assert _dma(qt, abi.DMA_CMD_READ, RAM_BUF, len(data)) == abi.DMA_OK
    assert qt.readl(BAR0_ADDR + abi.DMA_RESULT) == zlib.crc32(data)
    assert _dma(qt, abi.DMA_CMD_FILL_PATTERN, RAM_BUF, 5000) == abi.DMA_OK
    assert qt.read(RAM_BUF, 5000) == abi.pattern(5000)
    assert _dma(qt, abi.DMA_CMD_INVERT, RAM_BUF, 5000) == abi.DMA_OK
    assert qt.read(RAM_BUF, 5000) == bytes(b ^ 0xFF for b in abi.pattern(5000))
    assert direct == (qt.proc.args.count("memory-backend-memfd,id=mem,size=64M,share=on") == 1)


def test_msi_reaches_qemu(machine):
    qt, _server = machine
    cap = qt.cfg_read(0x34, 1)
    while cap and qt.cfg_read(cap, 1) != 0x05:
        cap = qt.cfg_read(cap + 1, 1)
    assert cap, "no MSI capability"
    ctrl = qt.cfg_read(cap + 2, 2)
    qt.cfg_write(cap + 4, MSI_SINK)                                   # MSI address: plain guest RAM
    data_off = 12 if ctrl & 0x80 else 8
    if ctrl & 0x80:
        qt.cfg_write(cap + 8, 0)
    qt.cfg_write(cap + data_off, MSI_DATA, 2)
    qt.cfg_write(cap + 2, ctrl | 1, 2)                                # enable: QEMU sends SET_IRQS
    qt.writel(BAR0_ADDR + abi.IRQ_RAISE, 0)
    for _ in range(200):
        if int.from_bytes(qt.read(MSI_SINK, 4), "little") == MSI_DATA:
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"MSI never arrived: {qt.output()}")
    assert qt.readl(BAR0_ADDR + abi.IRQ_COUNT) == 1


def test_msix_device_realizes_and_serves_the_pba(qemu, tmp_path):
    for qt, server in _machine(qemu, tmp_path, memfd=True, msix=True):
        assert server.conn.irqs.device.irq_info(2).count == abi.MSIX_VECTORS
        assert qt.readl(BAR0_ADDR + abi.MAGIC) == abi.MAGIC_VALUE
        assert qt.readl(BAR0_ADDR + abi.MSIX_PBA_OFFSET) == 0
