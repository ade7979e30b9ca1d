"""The README's first command as a user runs it: ``vxpu demo --json`` boots a VM with the
accelerator (CPU backend) and every kernel the guest runs is correct against numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary

KERNELS = {"saxpy", "dot", "sgemm", "softmax"}
pytestmark = pytest.mark.qemu

NUMBERS = ("bandwidth_h2d_gbps", "bandwidth_d2h_gbps", "noop_roundtrip_us", "trapped_read_us")


def test_vxpu_demo_json_reports_every_kernel_correct(qemu_binary: QemuBinary, guest_image: GuestImage) -> None:
    accel = os.environ.get("VXPU_E2E_ACCEL", "auto")
    res = subprocess.run([sys.executable, "-m", "vxpu", "demo", "--json", "--accel", accel, "--timeout", "300"],
                         capture_output=True, check=False, text=True, timeout=420, stdin=subprocess.DEVNULL)
    report = f"rc={res.returncode}\n[stdout]\n{res.stdout[-6000:]}\n[stderr]\n{res.stderr[-6000:]}"
    doc = json.loads(res.stdout)
    assert res.returncode == 0 and doc["ok"] is True, report
    assert doc["backend"] == "cpu" and doc["qemu"].startswith(qemu_binary.version_str), report
    assert {k["name"] for k in doc["kernels"]} == KERNELS, report
    for k in doc["kernels"]:
        assert k["ok"] is True and isinstance(k["max_rel_err"], float | int) and k["max_rel_err"] >= 0, k
        assert isinstance(k["guest_ms"], float | int) and k["guest_ms"] > 0, k
    for key in NUMBERS:
        assert isinstance(doc[key], float | int) and doc[key] > 0, (key, report)

