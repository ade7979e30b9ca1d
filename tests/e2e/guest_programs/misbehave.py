"""Guest program: misbehave through the SDK's lower layer (Device.raw), then compute correctly;
last, a process that owns the device is killed with work in flight and the next one computes.

Runs inside the VM (copied in by tests/e2e/test_guest_misbehave.py). Each case prints one line
``VXPU-CASE {json}``: the DeviceError it got (status name, fatal code) and whether a correct
kernel completed on the same device right after it. The last line is ``VXPU-DONE``.
"""

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import vxpu.ir
from vxpu.guest.errors import DeviceError
from vxpu.guest.sdk import Device

from vxpu.abi import xpu

SAXPY = (Path(vxpu.ir.__path__[0]) / "sample_kernels" / "saxpy.vxir").read_text()


def correct_kernel(dev: Device) -> bool:
    """saxpy on 4096 floats, checked exactly against numpy."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(4096, dtype=np.float32)
    y = rng.standard_normal(4096, dtype=np.float32)
    with dev.load_module(SAXPY) as mod:
        dx, dy = dev.to_device(x), dev.to_device(y)
        mod.saxpy[16, 256](4096, 3.0, dx, dy)
        got = dy.to_host()
        dx.free(), dy.free()
    return bool(np.array_equal(got, np.float32(3.0) * x + y))


def double_free(dev: Device) -> None:
    raw = dev.raw
    addr = raw.call(xpu.Opcode.MEM_ALLOC, 4096)[0]
    raw.call(xpu.Opcode.MEM_FREE, addr)
    raw.call(xpu.Opcode.MEM_FREE, addr)


def stale_module_launch(dev: Device) -> None:
    mod = dev.load_module(SAXPY)
    kernel = mod.kernel("saxpy")
    handle, blob_size = kernel.handle, kernel.signature.args_size
    mod.unload()
    dev.synchronize()
    blob = dev.raw.dma(max(blob_size, 1))
    try:
        dev.raw.call(xpu.Opcode.LAUNCH, handle, *xpu.pack_launch_dims((1, 1, 1), (1, 1, 1), 0),
                     sg=(blob.address(0), blob_size))
    finally:
        dev.raw.free_dma(blob)


def stale_module_kernel_get(dev: Device) -> None:
    mod = dev.load_module(SAXPY)
    handle = mod.handle
    mod.unload()
    dev.synchronize()
    dev.kernel_get(handle, "saxpy")


def address_outside_ram(dev: Device) -> None:
    target = dev.alloc(4096)
    try:
        dev.raw.call(xpu.Opcode.MEM_COPY_HTOD, target, sg=(1 << 40, 4096))
    finally:
        dev.free_address(target)
        dev.synchronize()


def fills_ring_without_waiting(dev: Device) -> None:
    ring = dev.ring
    ring.drain()
    dev.raw.set_sq_tail(ring.submitted + ring.sq_entries + 1)   # more descriptors than the ring holds
    deadline = time.monotonic() + 5.0   # let the device see that tail before the SDK posts again
    while not dev.raw.read_reg(xpu.REG_STATUS) & xpu.DeviceStatus.FATAL and time.monotonic() < deadline:
        time.sleep(0.001)
    dev.call(xpu.Opcode.NOP)


def floods_within_flow_control(dev: Device) -> None:
    """3x the ring's size of NOPs posted without waiting: flow control keeps it legal."""
    ring = dev.ring
    for _ in range(3 * ring.sq_entries):
        ring.post(xpu.Opcode.NOP)
    dev.synchronize()


KILLED_OWNER = """
import os, signal
import numpy as np
from vxpu.guest.sdk import Device
dev = Device.open()
x = dev.to_device(np.ones(1 << 20, np.float32))
for _ in range(64):
    dev.memset(x, 7)
print("CHILD-POSTED", dev.ring.in_flight, flush=True)
os.kill(os.getpid(), signal.SIGKILL)   # no close, no finalizers: the queue stays enabled
"""


def killed_owner() -> dict:
    """A process dies with work in flight; the next one to open the device computes."""
    child = subprocess.run([sys.executable, "-c", KILLED_OWNER], capture_output=True, text=True, check=False)
    out = {"case": "killed_owner", "error": None, "child_rc": child.returncode,
           "child_posted": "CHILD-POSTED" in child.stdout}
    with Device.open() as dev:
        out["recovered"] = dev.transport.recovered
        out["after_ok"] = correct_kernel(dev)
    return out


CASES = [double_free, stale_module_launch, stale_module_kernel_get, address_outside_ram,
         fills_ring_without_waiting, floods_within_flow_control]


def main() -> int:
    with Device.open(sq_entries=64) as dev:
        print("VXPU-CASE " + json.dumps({"case": "baseline", "error": None, "after_ok": correct_kernel(dev)}))
        for case in CASES:
            out = {"case": case.__name__, "error": None}
            try:
                case(dev)
            except DeviceError as exc:
                out.update(error="DeviceError", status=exc.name, fatal=exc.fatal, message=str(exc))
            except Exception as exc:  # noqa: BLE001 - reported to the test as a wrong outcome
                out.update(error=type(exc).__name__, message=str(exc), trace=traceback.format_exc()[-1500:])
            if out.get("fatal"):
                dev.reset()
            try:
                out["after_ok"] = correct_kernel(dev)
            except Exception as exc:  # noqa: BLE001
                out.update(after_ok=False, after_error=f"{type(exc).__name__}: {exc}")
            print("VXPU-CASE " + json.dumps(out), flush=True)
    try:
        out = killed_owner()
    except Exception as exc:  # noqa: BLE001
        out = {"case": "killed_owner", "error": type(exc).__name__, "message": str(exc), "after_ok": False,
               "trace": traceback.format_exc()[-1500:]}
    print("VXPU-CASE " + json.dumps(out), flush=True)
    print("VXPU-DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
