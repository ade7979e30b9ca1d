"""The copyable SDK example (examples/guest/saxpy.py) runs unchanged inside a VM, copied in with
``vxpu vm run --file`` (its host run is tests/sdk' concern)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary

pytestmark = pytest.mark.qemu

EXAMPLE = Path(__file__).parents[2] / "examples" / "guest" / "saxpy.py"


def test_example_runs_in_the_vm(qemu_binary: QemuBinary, guest_image: GuestImage) -> None:
    accel = os.environ.get("VXPU_E2E_ACCEL", "auto")
    res = subprocess.run([sys.executable, "-m", "vxpu", "vm", "run", "--accel", accel, "--timeout", "240",
                          "--file", str(EXAMPLE), "--cmd", "python3 /root/saxpy.py --vm"],
                         capture_output=True, check=False, text=True, timeout=300, stdin=subprocess.DEVNULL)
    report = f"rc={res.returncode}\n[stdout]\n{res.stdout[-6000:]}\n[stderr]\n{res.stderr[-4000:]}"
    assert res.returncode == 0, report
    assert "(VM): correct" in res.stdout, report
