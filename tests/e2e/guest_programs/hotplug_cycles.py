"""Guest program: for each hot-plugged accelerator, complete commands through the SDK, then let go.

Runs inside the VM (copied in by tests/e2e/test_operators_lifecycle.py). ``argv[1]`` cycles;
in each: wait until the accelerator appears, ``Device.open()`` it (which checks BAR0's magic),
run IDENTIFY and STATS, close it, print ``VXPU-CYCLE {json}``; then wait until the host has
unplugged it and print ``VXPU-GONE {json}``. A failure prints ``VXPU-CYCLE`` with an ``error``
and the program goes on to the next cycle.
"""

import json
import sys
import time
from pathlib import Path

from vxpu.guest.sdk import Device

from vxpu.abi import xpu

SYSFS = Path("/sys/bus/pci/devices")


def present() -> str | None:
    for dev in sorted(SYSFS.iterdir()):
        try:
            ids = (int((dev / "vendor").read_text(), 16), int((dev / "device").read_text(), 16))
        except (OSError, ValueError):
            continue
        if ids == (xpu.VENDOR_ID, xpu.DEVICE_ID):
            return dev.name
    return None


def wait(want: bool, timeout: float = 120.0) -> str | None:
    end = time.monotonic() + timeout
    while (bdf := present()) is None if want else (bdf := present()) is not None:
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for the accelerator to {'appear' if want else 'go'}")
        time.sleep(0.01)
    return bdf


def emit(marker: str, doc: dict) -> None:
    print(f"{marker} {json.dumps(doc)}", flush=True)


print("VXPU-READY", flush=True)
for cycle in range(int(sys.argv[1])):
    bdf = wait(True)
    doc = {"cycle": cycle, "bdf": bdf}
    time.sleep(0.05)  # sysfs lists the function a moment before its BARs are assigned
    try:
        with Device.open() as dev:
            ident = dev.identify()
            stats = dev.stats()
        doc.update(ok=True, backend=ident.get("backend"), commands=stats.get("device", {}).get("commands"))
    except Exception as exc:  # noqa: BLE001 (report any failure and go on: the host asserts on the line)
        doc.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    emit("VXPU-CYCLE", doc)
    wait(False)
    emit("VXPU-GONE", {"cycle": cycle})
