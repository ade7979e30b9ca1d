"""Guest program: start work on the accelerator, reboot in the middle of it, compute on the next boot.

Runs on every boot of one VM (QEMU without -no-reboot; tests/e2e/test_guest_reboot.py). A byte
of the RTC's CMOS RAM, which survives a machine reset, tells the boots apart:

* boot 1: load sgemm, allocate 256x256 matrices, post launches and copies without waiting,
  print ``VXPU-REBOOT {"boot": 1, ...}`` and ``reboot -f`` with the work in flight;
* boot 2: read BAR0 before opening (the queue must be off and not fatal, RESET_COUNT higher),
  open the device (no allocation may be left from boot 1: as many as a fresh open makes), run saxpy and check it against
  numpy, print ``VXPU-REBOOT {"boot": 2, ...}`` and power off.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import vxpu.ir
from vxpu.guest.sdk import Device
from vxpu.guest.vmtransport import find_function

from vxpu.abi import xpu

CMOS_INDEX = 0x7E          # a CMOS byte neither SeaBIOS nor Linux uses
BOOT2 = 0xA5
KERNELS = Path(vxpu.ir.__path__[0]) / "sample_kernels"


def cmos(value: int | None = None) -> int:
    """Read (or write, then read) the CMOS byte through /dev/port."""
    fd = os.open("/dev/port", os.O_RDWR)
    try:
        os.pwrite(fd, bytes([CMOS_INDEX]), 0x70)
        if value is not None:
            os.pwrite(fd, bytes([value]), 0x71)
            os.pwrite(fd, bytes([CMOS_INDEX]), 0x70)
        return os.pread(fd, 1, 0x71)[0]
    finally:
        os.close(fd)


def registers() -> dict[str, int]:
    fn = find_function()
    fn.enable()
    with fn.map_bar(0) as bar:
        return {"status": bar.read32(xpu.REG_STATUS), "reset_count": bar.read32(xpu.REG_RESET_COUNT),
                "fatal_code": bar.read32(xpu.REG_FATAL_CODE)}


def report(doc: dict) -> None:
    print("VXPU-REBOOT " + json.dumps(doc), flush=True)


def boot1() -> None:
    regs = registers()
    dev = Device.open()
    baseline = dev.stats()["session"]["vxpu_session_live_allocations"]   # the SDK's own (e.g. a sentinel)
    mod = dev.load_module((KERNELS / "sgemm.vxir").read_text())
    n = 256
    rng = np.random.default_rng(3)
    a = dev.to_device(rng.standard_normal((n, n), dtype=np.float32))
    b = dev.to_device(rng.standard_normal((n, n), dtype=np.float32))
    c = dev.empty((n, n), np.float32)
    host = dev.pinned((n, n), np.float32)
    live = dev.stats()["session"]["vxpu_session_live_allocations"]    # before the work: it must stay in flight
    for _ in range(8):
        mod.sgemm[(n // 16, n // 16, 1), (16, 16, 1)](n, n, n, a, b, c)
        dev.copy_to_device(a, host)
    cmos(BOOT2)
    report({"boot": 1, **regs, "in_flight": dev.ring.in_flight, "baseline_allocations": baseline,
            "live_allocations": live})
    os.execv("/bin/busybox", ["reboot", "-f"])   # no close, no atexit: the work is still running


def boot2() -> None:
    cmos(0)
    regs = registers()
    doc = {"boot": 2, **regs}
    with Device.open() as dev:
        stats = dev.stats()
        doc["live_allocations"] = stats["session"]["vxpu_session_live_allocations"]
        doc["resets"] = stats["device"]["resets"]
        x = np.arange(4096, dtype=np.float32)
        y = np.ones(4096, dtype=np.float32)
        mod = dev.load_module((KERNELS / "saxpy.vxir").read_text())
        dx, dy = dev.to_device(x), dev.to_device(y)
        mod.saxpy[16, 256](4096, 2.0, dx, dy)
        doc["saxpy_ok"] = bool(np.array_equal(dy.to_host(), np.float32(2.0) * x + y))
    report(doc)


def main() -> int:
    if cmos() == BOOT2:
        boot2()
    else:
        boot1()
    return 0


if __name__ == "__main__":
    sys.exit(main())
