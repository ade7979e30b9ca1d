"""Tests of sysfs PCI enumeration and ``vxpu devices`` against fixture trees and the real /sys.

Fixture trees (``fixtures/sysfs/<layout>``) are real files and symlinks shaped like
``/sys/bus/pci/devices``: an NVIDIA host, an AMD host (GPU, its HDMI audio, an Instinct
accelerator and an XDNA NPU), an NPU zoo (Intel, Huawei, Qualcomm, Habana, the vxpu device)
and a broken tree (garbage, missing files, a dangling link, a non-BDF name).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from vxpu.accel.enumerate import classify, merge_runtimes, normalize_bdf, read_device, scan_pci

from vxpu.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"


def by_bdf(layout: str) -> dict[str, object]:
    return {d.bdf: d for d in scan_pci(str(FIXTURES / layout))}


def test_nvidia_layout() -> None:
    devs = by_bdf("nvidia")
    h100 = devs["0000:00:06.0"]
    assert (h100.vendor_id, h100.device_id, h100.class_code) == (0x10DE, 0x2330, 0x030200)
    assert (h100.kind, h100.vendor, h100.driver, h100.iommu_group, h100.numa_node) == \
        ("gpu", "NVIDIA", "nvidia", 12, 0)
    assert (h100.subsystem_vendor_id, h100.subsystem_device_id) == (0x10DE, 0x16C1)
    assert not h100.problems
    assert devs["0000:41:00.0"].driver == "vfio-pci" and devs["0000:41:00.0"].numa_node == 1
    assert devs["0000:00:03.0"].kind == "other" and devs["0000:00:00.0"].driver is None
    assert devs["0000:00:00.0"].numa_node is None  # -1 means "no NUMA affinity"


def test_amd_layout() -> None:
    devs = by_bdf("amd")
    assert devs["0000:03:00.0"].kind == "gpu"
    assert devs["0000:03:00.1"].kind == "other"       # the GPU's HDMI audio function
    assert devs["0000:c1:00.0"].kind == "gpu"         # Instinct: processing-accelerator class
    xdna = devs["0000:c5:00.1"]
    assert (xdna.kind, xdna.vendor, xdna.driver) == ("npu", "AMD", "amdxdna")


def test_npu_layout() -> None:
    devs = by_bdf("npu")
    kinds = {bdf: d.kind for bdf, d in devs.items()}
    assert kinds == {
        "0000:00:02.0": "gpu", "0000:00:0b.0": "npu", "0000:81:00.0": "npu",
        "0000:41:00.0": "npu", "0000:51:00.0": "accelerator", "0000:00:05.0": "accelerator",
    }
    assert devs["0000:00:05.0"].vendor == "vxpu"
    assert devs["0000:81:00.0"].vendor == "Huawei"


def test_broken_entries_are_reported_not_fatal() -> None:
    devs = by_bdf("broken")
    assert len(devs) == 7
    assert not devs["0000:00:06.0"].problems and devs["0000:00:06.0"].kind == "gpu"
    garbage = devs["0000:00:1f.0"]
    assert garbage.vendor_id is None and garbage.class_code is None and garbage.kind == "other"
    assert any("vendor" in p for p in garbage.problems)
    assert any("iommu_group" in p for p in garbage.problems)
    assert any("numa_node" in p for p in garbage.problems)
    assert devs["0000:00:1f.1"].problems == ["missing class"]
    assert devs["0000:00:1f.2"].problems == ["not a directory (dangling link?)"]
    assert any("out of range" in p for p in devs["0000:00:1f.3"].problems)
    assert devs["0000:00:1f.4"].vendor_id is None and devs["0000:00:1f.4"].iommu_group == 7
    assert "name is not a PCI address" in devs["not-a-bdf"].problems


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads mode-000 files")
def test_unreadable_attribute(tmp_path: Path) -> None:
    entry = tmp_path / "0000:00:07.0"
    entry.mkdir()
    (entry / "vendor").write_text("0x10de\n")
    (entry / "device").write_text("0x2330\n")
    (entry / "class").write_text("0x030200\n")
    (entry / "class").chmod(0)
    dev = read_device(str(tmp_path), "0000:00:07.0")
    assert dev.class_code is None and any(p.startswith("unreadable class") for p in dev.problems)


def test_missing_root_is_empty() -> None:
    assert scan_pci("/nonexistent/sys/bus/pci/devices") == []


@pytest.mark.parametrize(("vendor", "device", "cls", "kind"), [
    (0x10DE, 0x2330, 0x030200, "gpu"), (0x10DE, 0x22A3, 0x068000, "other"),
    (0x1002, 0x744C, 0x030000, "gpu"), (0x1022, 0x1502, 0x118000, "npu"), (0x1022, 0x1480, 0x060000, "other"),
    (0x8086, 0x7D55, 0x030000, "gpu"), (0x8086, 0x643E, 0x048000, "npu"), (0x8086, 0x1237, 0x060000, "other"),
    (0x19E5, 0xD801, 0x120000, "npu"), (0x19E5, 0x1822, 0x020000, "other"),
    (0x17CB, 0xA100, 0x120000, "npu"), (0x17CB, 0x1103, 0x028000, "other"),
    (0x1E52, 0x401E, 0x120000, "accelerator"), (0x1234, 0x1111, 0x0B4000, "accelerator"),
    (0x1234, 0x1111, None, "other"),
])
def test_classify(vendor: int, device: int, cls: int | None, kind: str) -> None:
    assert classify(vendor, device, cls) == kind


def test_normalize_bdf() -> None:
    assert normalize_bdf("00000000:00:06.0") == "0000:00:06.0"
    assert normalize_bdf("0000:C1:00.1") == "0000:c1:00.1"
    assert normalize_bdf("10000:00:01.0") == "10000:00:01.0"
    for bad in ("", "00:06.0", "0000:00:06.8", "zz00:00:06.0", "0000:00:06.0\n0"):
        assert normalize_bdf(bad) is None


def test_merge_runtimes_never_fails() -> None:
    devs = scan_pci(str(FIXTURES / "nvidia"))
    answered = merge_runtimes(devs)
    assert set(answered) <= {"cuda", "hip", "onnxruntime"}
    # No runtime here knows these fixture BDFs, unless the machine really has them.
    for d in devs:
        assert set(d.runtime) <= {"cuda", "hip", "onnxruntime"}


def test_real_sysfs() -> None:
    if not os.path.isdir("/sys/bus/pci/devices"):
        pytest.skip("no /sys/bus/pci on this machine")
    devs = scan_pci()
    names = os.listdir("/sys/bus/pci/devices")
    assert len(devs) == len(names)
    for d in devs:
        assert d.kind in ("gpu", "npu", "accelerator", "other")
        assert normalize_bdf(d.bdf) == d.bdf
        assert d.vendor_id is not None, d.problems
    merge_runtimes(devs)  # whatever runtimes exist here, this must not raise
    for d in devs:
        if "cuda" in d.runtime:
            assert d.vendor_id == 0x10DE and d.kind == "gpu"


def test_cli_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    root = str(FIXTURES / "amd")
    assert main(["devices", "--root", root, "--no-runtimes"]) == 0
    table = capsys.readouterr().out
    assert "0000:c5:00.1" in table and "0000:03:00.1" not in table and "amdxdna" in table
    assert main(["devices", "--root", root, "--no-runtimes", "--all"]) == 0
    assert "0000:03:00.1" in capsys.readouterr().out
    assert main(["devices", "--root", root, "--no-runtimes", "--json", "--type", "gpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["bdf"] for d in data] == ["0000:03:00.0", "0000:c1:00.0"]
    for key in ("bdf", "vendor_id", "device_id", "class", "kind", "driver", "iommu_group", "numa_node"):
        assert key in data[0]
    assert data[0]["class"] == "0x030000" and data[0]["vendor_id"] == "0x1002"
    assert main(["devices", "--root", str(FIXTURES / "nvidia"), "--no-runtimes", "--type", "npu"]) == 0
    assert "no npu found" in capsys.readouterr().out


def test_cli_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--all", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list)
