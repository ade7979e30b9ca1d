"""``vxpu devices``: list the host's accelerators (or every PCI function) from sysfs.

The table shows accelerators (GPUs, NPUs, other processing accelerators) by default; ``--all``
lists every PCI function with its classification; ``--json`` prints a JSON list instead (each
entry has at least ``bdf``, ``vendor_id``, ``device_id``, ``class``, ``kind``, ``driver``,
``iommu_group`` and ``numa_node``). Runtime facts (CUDA, HIP, ONNX Runtime) are merged in
when those runtimes work here; ``--no-runtimes`` skips them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``devices`` sub-command."""
    parser = subparsers.add_parser("devices", help="list host accelerators (sysfs PCI + runtimes)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--type", choices=("gpu", "npu", "accelerator"), help="only this kind")
    parser.add_argument("--all", action="store_true", help="every PCI function, with its classification")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument("--root", default=None, help="sysfs PCI devices directory (default /sys/bus/pci/devices)")
    parser.add_argument("--no-runtimes", action="store_true", help="do not ask CUDA/HIP/ONNX Runtime")
    parser.set_defaults(func=run_devices)


def run_devices(args: argparse.Namespace) -> int:
    """Print the device list; returns 0 (an empty list is not an error)."""
    from vxpu.accel.enumerate import DEFAULT_ROOT, merge_runtimes, scan_pci

    devices = scan_pci(args.root or DEFAULT_ROOT)
    if not args.no_runtimes:
        merge_runtimes(devices)
    if args.type:
        devices = [d for d in devices if d.kind == args.type]
    elif not args.all:
        devices = [d for d in devices if d.is_accelerator]
    if args.json:
        json.dump([d.to_dict() for d in devices], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not devices:
        what = args.type or ("PCI devices" if args.all else "accelerators")
        print(f"no {what} found (use --all to list every PCI function)")
        return 0
    rows = [_row(d) for d in devices]
    head = ("BDF", "KIND", "VENDOR", "ID", "CLASS", "DRIVER", "IOMMU", "NUMA", "DETAILS")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head[:-1])]
    for line in [head, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + "  " + line[-1])
    return 0


def _row(d: Any) -> tuple[str, ...]:
    ident = f"{_hex(d.vendor_id)}:{_hex(d.device_id)}"
    details: list[str] = []
    cuda = d.runtime.get("cuda")
    if cuda:
        details.append(f"cuda:{cuda['index']} {cuda['name']} {cuda['architecture']}")
    hip = d.runtime.get("hip")
    if hip:
        details.append(f"hip:{hip['index']} {hip['name']} {hip['architecture']}")
    for ep in d.runtime.get("onnxruntime", []):
        details.append(f"ort:{ep['ep']}")
    if d.problems:
        details.append("problems: " + "; ".join(d.problems))
    return (d.bdf, d.kind, d.vendor, ident, d.class_name, d.driver or "-",
            "-" if d.iommu_group is None else str(d.iommu_group),
            "-" if d.numa_node is None else str(d.numa_node), ", ".join(details))


def _hex(value: int | None) -> str:
    return "????" if value is None else f"{value:04x}"
