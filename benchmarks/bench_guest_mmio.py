#!/usr/bin/env python3
"""Trapped BAR reads and posted BAR writes, measured inside a real guest under QEMU.

Boots the Debian guest with the vxpu test device (a real ``vxpu serve`` process), runs
``python3 -m vxpu.guest.bench`` in it, and prints median/p99 latencies in µs per access kind,
for each accelerator asked for (TCG, and KVM where this host's KVM can run the guest)::

    .venv/bin/python benchmarks/bench_guest_mmio.py [--accel tcg,kvm] [-n 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vxpu.images.guest import current_image
from vxpu.images.qemu import find_qemu
from vxpu.images.vm import Vm, VmSpec
from vxpu.qmp.devices import vfio_user_device
from vxpu.qmp.server import ServerProcess

from vxpu.errors import Error

KINDS = ("bar_read", "bar_write", "config_read", "ram_read")


def measure(accel: str, iterations: int, timeout: float) -> dict[str, Any]:
    """Boot once under ``accel`` and return the guest's numbers (or the reason it could not run)."""
    qemu, image = find_qemu(quiet=True), current_image(quiet=True)
    with tempfile.TemporaryDirectory(prefix="vxpu-bench-") as tmp:
        work = Path(tmp)
        with ServerProcess(work / "vxpu0.sock", work / "server.log") as server:
            spec = VmSpec(cmd=f"python3 -m vxpu.guest.bench -n {iterations}", accel=accel,
                          devices=[vfio_user_device("vxpu0", server.socket_path)])
            t0 = time.monotonic()
            try:
                with Vm(qemu, image, spec, work / "vm") as vm:
                    m = vm.console.wait_for(r"^VXPU-BENCH (\{.*\})$", timeout, vm.problem)
                    results = json.loads(m.group(1))
            except Error as exc:
                return {"accel": accel, "error": str(exc).split("\n")[0]}
            return {"accel": accel, "qemu": qemu.version_str, "iterations": iterations,
                    "wall_s": round(time.monotonic() - t0, 2), "results": results}


def print_table(runs: list[dict[str, Any]]) -> None:
    print(f"{'accel':<6} {'access':<12} {'median µs':>10} {'p99 µs':>10} {'min µs':>9}")
    for run in runs:
        if "error" in run:
            print(f"{run['accel']:<6} unavailable: {run['error']}")
            continue
        for kind in KINDS:
            r = run["results"][kind]
            print(f"{run['accel']:<6} {kind:<12} {r['median_us']:>10.2f} {r['p99_us']:>10.2f} {r['min_us']:>9.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accel", default="tcg,kvm", help="comma-separated accelerators (default tcg,kvm)")
    parser.add_argument("-n", "--iterations", type=int, default=2000, help="samples per access kind")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per boot")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    runs = [measure(a.strip(), args.iterations, args.timeout) for a in args.accel.split(",") if a.strip()]
    if args.json:
        print(json.dumps(runs, indent=2))
    else:
        print_table(runs)
    return 0 if any("results" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
