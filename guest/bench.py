"""In-guest MMIO latency benchmark: ``python3 -m vxpu.guest.bench [-n N]``.

Times single accesses from guest Python with ``time.perf_counter_ns`` around each one:

* ``bar_read``   a trapped 32-bit BAR0 read (SCRATCH): guest exit -> QEMU -> REGION_READ to the
  vxpu server and back; the full round trip;
* ``bar_write``  a posted 32-bit BAR0 write (SCRATCH): QEMU sends REGION_WRITE with NO_REPLY and
  resumes the guest without waiting for the server;
* ``config_read`` a 4-byte config-space read through sysfs (syscall + REGION_READ of region 7);
* ``ram_read``   the same loop on ordinary guest RAM, the floor of Python + timer overhead.

Prints one line ``VXPU-BENCH {"bar_read": {"median_us": ..., "p99_us": ...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from collections.abc import Callable

from vxpu.guest.pci import PciFunction

from vxpu.abi import testdev as abi

MARKER = "VXPU-BENCH"


def _stats(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    n = len(s)
    return {"n": n, "median_us": s[n // 2] / 1000, "p99_us": s[min(n - 1, (n * 99) // 100)] / 1000,
            "min_us": s[0] / 1000, "mean_us": round(sum(s) / n / 1000, 3)}


def _time(op: Callable[[], object], n: int, warmup: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        op()
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        t0 = clock()
        op()
        samples[i] = clock() - t0
    return _stats(samples)


def run(n: int) -> dict[str, dict[str, float]]:
    """Measure every access kind ``n`` times against the first test device."""
    fn = PciFunction.find_one(abi.VENDOR_ID, abi.DEVICE_ID)
    fn.enable()
    results = {}
    with fn.map_bar(0) as bar0:
        regs = bar0.u32
        idx = abi.SCRATCH >> 2
        results["bar_read"] = _time(lambda: regs[idx], n)

        def write() -> None:
            regs[idx] = 0x1234

        results["bar_write"] = _time(write, n)
        bar0.read32(abi.MAGIC)  # drain posted writes before the next measurement
    fd = os.open(fn.path / "config", os.O_RDONLY)
    try:
        results["config_read"] = _time(lambda: os.pread(fd, 4, 0), max(n // 4, 100))
    finally:
        os.close(fd)
    ram = mmap.mmap(-1, 4096)
    view = memoryview(ram).cast("I")
    results["ram_read"] = _time(lambda: view[2], n)
    view.release()
    ram.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m vxpu.guest.bench", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--iterations", type=int, default=2000, help="samples per access kind")
    args = parser.parse_args(argv)
    sys.stdout.write(f"{MARKER} {json.dumps(run(args.iterations), separators=(',', ':'))}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
