"""The SDK without numpy (a minimal guest): bytes in, bytearray out, dtypes as names, and a
kernel launched on arrays made that way. numpy is blocked in a child process; the server child
it starts is an ordinary process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent('''
    import struct, sys
    class NoNumpy:
        def find_spec(self, name, path=None, target=None):
            if name == "numpy" or name.startswith("numpy."):
                raise ImportError("numpy is blocked in this test")
    sys.meta_path.insert(0, NoNumpy())
    from importlib.resources import files
    from vxpu.guest import Device
    assert "numpy" not in sys.modules
    saxpy = files("vxpu.ir").joinpath("sample_kernels/saxpy.vxir").read_text()
    with Device.local("cpu", ram_size=16 << 20, sq_entries=16) as dev:
        n = 1000
        x = dev.to_device(struct.pack(f"<{n}f", *range(n)))
        y = dev.empty(n, "float32")
        y.copy_from(struct.pack(f"<{n}f", *([1.0] * n)))
        mod = dev.load_module(saxpy)
        mod.saxpy[(n + 255) // 256, 256](n, 2.0, x, y)
        out = y.to_host()
        assert isinstance(out, bytearray) and len(out) == 4 * n
        assert struct.unpack(f"<{n}f", out) == tuple(2.0 * i + 1.0 for i in range(n))
        assert bytes(x.to_host()) == struct.pack(f"<{n}f", *range(n))
    assert "numpy" not in sys.modules
    print("ok without numpy")
''')


@pytest.mark.timeout(120)
def test_sdk_runs_without_numpy():
    proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=110,
                          check=False)
    assert proc.returncode == 0 and "ok without numpy" in proc.stdout, proc.stdout + proc.stderr
