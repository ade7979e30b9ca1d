"""saxpy on a vxpu accelerator: the same program on the host and inside a VM.

    python examples/guest/saxpy.py             # host: starts its own `vxpu serve` (CPU backend)
    python examples/guest/saxpy.py --vm        # inside a VM that has the vxpu device
    VXPU_BACKEND=cuda python examples/guest/saxpy.py

Exits 0 when the device's result matches numpy.
"""

import os
import sys
from importlib.resources import files

import numpy as np
from vxpu.guest import Device

SAXPY = files("vxpu.ir").joinpath("sample_kernels/saxpy.vxir").read_text()   # y = a*x + y, IR text


def main() -> int:
    in_vm = "--vm" in sys.argv
    dev = Device.open() if in_vm else Device.local(os.environ.get("VXPU_BACKEND", "cpu"))
    with dev:
        n = 1 << 20
        rng = np.random.default_rng(0)
        x, y = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)

        mod = dev.load_module(SAXPY)                    # compiled on the host for its accelerator
        dx, dy = dev.to_device(x), dev.to_device(y)
        start, end = dev.event(), dev.event()
        start.record()
        mod.saxpy[(n + 255) // 256, 256](n, 2.0, dx, dy)   # grid, block; then the kernel's arguments
        end.record()
        result = dy.to_host()                           # waits for the kernel, copies back

        ok = np.array_equal(result, np.float32(2.0) * x + y)
        where = "VM" if in_vm else "host"
        print(f"saxpy, n={n}, on {dev.identify()['name']} ({where}): "
              f"{'correct' if ok else 'WRONG'}, kernel {dev.elapsed_ms(start, end):.3f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
