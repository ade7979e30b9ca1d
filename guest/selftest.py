"""The guest-side check of the vxpu test device: ``python3 -m vxpu.guest.selftest``.

Runs inside the VM as root, with nothing but sysfs, mmap and /proc. Each check records what it
saw, and a failing check does not stop the others. The result is one line on stdout::

    VXPU-SELFTEST {"ok": true, "checks": [{"name": "identity", "ok": true, ...}, ...], ...}

Checks: the device is in sysfs with its IDs and class; BAR sizes and flags (``resource``);
the capability list holds MSI; BAR0 registers read and write (MAGIC, VERSION, SCRATCH) and
BAR2 memory answers; the server reads a buffer in guest RAM (CRC32 after DMA_CMD=READ at the
buffer's guest-physical address), writes one (FILL_PATTERN) and modifies one in place
(INVERT), for one locked page and for a 64 KiB huge-page buffer; a server-raised MSI reaches the
CPU (counted through the kernel's "No irq handler for vector" records); RESET_COUNT is reported
so the host can compare it across a reset.

``--watch-hotplug`` then stays up and reports the device leaving and coming back (ACPI
hot-plug), one ``VXPU-EVENT {...}`` line per change, checking the re-plugged device's registers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

from vxpu.guest.dma import DmaBuffer
from vxpu.guest.errors import GuestError
from vxpu.guest.irq import DEFAULT_TEST_VECTOR, KmsgWatcher, disable_msi, enable_msi
from vxpu.guest.pci import CAP_ID_MSI, RES_MEM, RES_MEM_64, RES_PREFETCH, Bar, PciFunction

from vxpu.abi import testdev as abi

RESULT_MARKER = "VXPU-SELFTEST"
EVENT_MARKER = "VXPU-EVENT"
IRQ_RAISES = 3
DMA_TIMEOUT_S = 5.0
SCRATCH_VALUES = (0x12345678, 0xFFFFFFFF, 0x0, 0xA5A55A5A)
_INVERT = bytes(255 - i for i in range(256))

Check = dict[str, Any]


def _dma(bar: Bar, cmd: int, addr: int, length: int) -> int:
    """Run one DMA command and wait for its status (BUSY only with message-based DMA)."""
    bar.write32(abi.DMA_ADDR_LO, addr & 0xFFFFFFFF)
    bar.write32(abi.DMA_ADDR_HI, addr >> 32)
    bar.write32(abi.DMA_LEN, length)
    bar.write32(abi.DMA_CMD, cmd)
    deadline = time.monotonic() + DMA_TIMEOUT_S
    while (status := bar.read32(abi.DMA_STATUS)) == abi.DMA_BUSY and time.monotonic() < deadline:
        time.sleep(0.001)
    return status


def check_identity(fn: PciFunction) -> Check:
    return {"bdf": fn.bdf, "vendor": fn.vendor, "device": fn.device, "class": fn.class_code,
            "ok": fn.vendor == abi.VENDOR_ID and fn.device == abi.DEVICE_ID
            and fn.class_code >> 8 == abi.CLASS_CODE >> 8}


def check_bars(fn: PciFunction) -> Check:
    res = fn.resources()
    bar0, bar2 = res[0], res[2]
    return {"bar0_size": bar0.size, "bar2_size": bar2.size, "bar0_flags": bar0.flags, "bar2_flags": bar2.flags,
            "ok": bar0.size == abi.BAR0_SIZE and bar2.size == abi.BAR2_SIZE and bool(bar0.flags & RES_MEM)
            and bool(bar2.flags & RES_MEM_64) and bool(bar2.flags & RES_PREFETCH)}


def check_caps(fn: PciFunction) -> Check:
    caps = fn.capabilities()
    return {"caps": [[cid, off] for cid, off in caps], "ok": any(cid == CAP_ID_MSI for cid, _ in caps)}


def check_registers(fn: PciFunction, bar0: Bar) -> Check:
    magic, version = bar0.read32(abi.MAGIC), bar0.read32(abi.VERSION)
    readback = []
    for value in SCRATCH_VALUES:
        bar0.write32(abi.SCRATCH, value)
        readback.append(bar0.read32(abi.SCRATCH))
    with fn.map_bar(2) as bar2:
        bar2.write32(0x100, 0xC0FFEE11)
        bar2_back = bar2.read32(0x100)
    return {"magic": magic, "version": version, "scratch": readback, "bar2_readback": bar2_back,
            "ok": magic == abi.MAGIC_VALUE and version == abi.VERSION_VALUE
            and readback == list(SCRATCH_VALUES) and bar2_back == 0xC0FFEE11}


def check_dma(bar0: Bar, buf: DmaBuffer, length: int) -> Check:
    """READ (server computes CRC32), FILL_PATTERN (server writes), INVERT (server modifies)."""
    addr = buf.address
    data = os.urandom(length)
    buf.view[:length] = data
    st_read = _dma(bar0, abi.DMA_CMD_READ, addr, length)
    crc_dev, crc_guest = bar0.read32(abi.DMA_RESULT), zlib.crc32(data)
    st_fill = _dma(bar0, abi.DMA_CMD_FILL_PATTERN, addr, length)
    filled = bytes(buf.view[:length]) == abi.pattern(length)
    st_inv = _dma(bar0, abi.DMA_CMD_INVERT, addr, length)
    inverted = bytes(buf.view[:length]) == abi.pattern(length).translate(_INVERT)
    return {"address": addr, "length": length, "huge": buf.huge, "status": [st_read, st_fill, st_inv],
            "crc_device": crc_dev, "crc_guest": crc_guest, "fill_ok": filled, "invert_ok": inverted,
            "ok": (st_read, st_fill, st_inv) == (abi.DMA_OK,) * 3 and crc_dev == crc_guest and filled and inverted}


def check_msi(fn: PciFunction, bar0: Bar, vector: int = DEFAULT_TEST_VECTOR) -> Check:
    """Raise IRQ_RAISES interrupts one at a time (eventfd signals coalesce, so each waits for
    the previous one's delivery) and count their arrival at the CPU."""
    with KmsgWatcher() as kmsg:
        enable_msi(fn, vector)
        before = bar0.read32(abi.IRQ_COUNT)
        latencies = []
        for i in range(1, IRQ_RAISES + 1):
            t0 = time.monotonic()
            bar0.write32(abi.IRQ_RAISE, 0)
            deadline = t0 + 5.0
            while kmsg.unhandled_vectors(vector) < i and time.monotonic() < deadline:
                time.sleep(0.002)
            latencies.append(round((time.monotonic() - t0) * 1000, 2))
        after = bar0.read32(abi.IRQ_COUNT)
        seen = kmsg.unhandled_vectors(vector)
        disable_msi(fn)
    return {"vector": vector, "raised": IRQ_RAISES, "irq_count_delta": after - before, "delivered": seen,
            "latency_ms": latencies, "ok": after - before == IRQ_RAISES and seen == IRQ_RAISES}


def _run(checks: list[Check], name: str, fn: Callable[[], Check]) -> None:
    t0 = time.monotonic()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - a check that breaks is a failed check; the others still run
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["name"] = name
    result["ms"] = round((time.monotonic() - t0) * 1000, 1)
    checks.append(result)


def run_selftest() -> dict[str, Any]:
    """Run every check against the first test device; returns the result document."""
    checks: list[Check] = []
    t0 = time.monotonic()
    try:
        fn = PciFunction.find_one(abi.VENDOR_ID, abi.DEVICE_ID)
    except GuestError as exc:
        return {"ok": False, "error": str(exc), "checks": []}
    _run(checks, "identity", lambda: check_identity(fn))
    _run(checks, "bars", lambda: check_bars(fn))
    _run(checks, "capabilities", lambda: check_caps(fn))
    fn.enable()
    fn.set_bus_master(True)
    reset_count = None
    with fn.map_bar(0) as bar0:
        _run(checks, "registers", lambda: check_registers(fn, bar0))
        with DmaBuffer(4096) as page:
            _run(checks, "dma_page", lambda: check_dma(bar0, page, 4096))
        _run(checks, "dma_hugepage", lambda: _dma_huge(bar0))
        _run(checks, "msi", lambda: check_msi(fn, bar0))
        reset_count = bar0.read32(abi.RESET_COUNT)
    return {"ok": all(c["ok"] for c in checks), "bdf": fn.bdf, "reset_count": reset_count,
            "checks": checks, "ms": round((time.monotonic() - t0) * 1000, 1)}


def _dma_huge(bar0: Bar) -> Check:
    with DmaBuffer(64 << 10, huge=True) as buf:
        return check_dma(bar0, buf, 64 << 10)


def _emit(marker: str, doc: dict[str, Any]) -> None:
    sys.stdout.write(f"{marker} {json.dumps(doc, separators=(',', ':'))}\n")
    sys.stdout.flush()


def _probe_device() -> dict[str, Any] | None:
    """If the device is present: its BDF and a quick MAGIC/SCRATCH check (mapping closed again)."""
    found = PciFunction.find(abi.VENDOR_ID, abi.DEVICE_ID)
    if not found:
        return None
    fn = found[0]
    doc: dict[str, Any] = {"bdf": fn.bdf}
    deadline = time.monotonic() + 5.0  # sysfs shows the function before its BARs are assigned
    while not (fn.path / "resource0").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        fn.enable()
        with fn.map_bar(0) as bar0:
            bar0.write32(abi.SCRATCH, 0x5A5A0001)
            doc.update(magic=bar0.read32(abi.MAGIC), scratch=bar0.read32(abi.SCRATCH),
                       reset_count=bar0.read32(abi.RESET_COUNT))
        doc["ok"] = doc["magic"] == abi.MAGIC_VALUE and doc["scratch"] == 0x5A5A0001
    except (GuestError, OSError) as exc:
        doc.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    return doc


def watch_hotplug(timeout: float, poll_s: float = 0.01) -> None:
    """Report device arrival/removal (``VXPU-EVENT``) until ``timeout`` seconds pass."""
    present = bool(PciFunction.find(abi.VENDOR_ID, abi.DEVICE_ID))
    _emit(EVENT_MARKER, {"event": "watching", "present": present})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = bool(PciFunction.find(abi.VENDOR_ID, abi.DEVICE_ID))
        if now != present:
            present = now
            doc = _probe_device() if now else None
            _emit(EVENT_MARKER, {"event": "added" if now else "removed", **(doc or {})})
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m vxpu.guest.selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--watch-hotplug", type=float, metavar="SECONDS", default=0.0,
                        help="after the checks, report hot-plug events for this long")
    parser.add_argument("--skip-checks", action="store_true", help="only watch hot-plug events")
    args = parser.parse_args(argv)
    result = {"ok": True, "skipped": True, "checks": []} if args.skip_checks else run_selftest()
    if not args.skip_checks:
        _emit(RESULT_MARKER, result)
    if args.watch_hotplug:
        watch_hotplug(args.watch_hotplug)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
