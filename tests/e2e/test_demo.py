"""The README's main job, as a user runs it: ``vxpu vm run --selftest`` exits 0 and reports PASS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary

pytestmark = pytest.mark.qemu


def test_vm_run_selftest_passes(qemu_binary: QemuBinary, guest_image: GuestImage) -> None:
    accel = os.environ.get("VXPU_E2E_ACCEL", "auto")
    res = subprocess.run([sys.executable, "-m", "vxpu", "vm", "run", "--selftest", "--accel", accel, "--timeout", "240"],
                         capture_output=True, check=False, text=True, timeout=300, stdin=subprocess.DEVNULL)
    report = f"rc={res.returncode}\n[stdout]\n{res.stdout}\n[stderr]\n{res.stderr[-6000:]}"
    assert res.returncode == 0, report
    assert "PASS: 7/7 checks passed in the guest" in res.stdout, report
    for check in ("identity", "bars", "capabilities", "registers", "dma_page", "dma_hugepage", "msi"):
        assert f"ok    {check}" in res.stdout, report
