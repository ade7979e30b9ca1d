"""The accelerator as a guest sees it, under QEMU: ring round trip vs trapped register, copy
bandwidth, and the demo's cold start. ``python benchmarks/bench_guest_ring.py [--backend cpu]``.

One ``vxpu serve`` and one VM: the guest runs ``benchmarks/guest_ring_probe.py`` (copied in for
the boot) and the host prints one JSON document with the ratios computed from that single run.
``--cold-start`` also times ``vxpu demo --json`` end to end (QEMU and image cached). The host's
load average is recorded, because every number here is latency on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vxpu.images.guest import current_image
from vxpu.images.qemu import find_qemu
from vxpu.images.vm import Vm, VmSpec
from vxpu.qmp.devices import vfio_user_device
from vxpu.qmp.server import ServerProcess

PROBE = Path(__file__).with_name("guest_ring_probe.py")


def probe(backend: str, accel: str, memory: str) -> dict:
    """Boot once and run the guest probe; its document plus the host's view."""
    work = Path(tempfile.mkdtemp(prefix="vxpu-bench-ring-"))
    server = ServerProcess(work / "s.sock", work / "server.log", ["--device", "xpu", "--backend", backend]).start()
    spec = VmSpec(cmd="python3 /root/probe.py", accel=accel, memory=memory, devices=[vfio_user_device("v0", work / "s.sock")],
                  extra_files={"root/probe.py": PROBE.read_bytes()})
    try:
        with Vm(find_qemu(), current_image(quiet=True), spec, work / "vm") as vm:
            m = vm.console.wait_for(r"^VXPU-RING (\{.*\})$", 600, vm.problem)
            doc = json.loads(m.group(1))
            doc["accel"] = vm.accel
    finally:
        server.stop()
    rt, trap = doc["noop_fresh"]["median_us"], doc["trapped_read"]["median_us"]
    doc["ratio_noop_to_trapped_read"] = rt / trap
    doc["ratio_noop_after_launch_to_trapped_read"] = doc["noop_after_launch"]["median_us"] / trap
    doc["ratio_noop_lean_to_trapped_read"] = doc["noop_lean"]["median_us"] / trap
    return doc


def cold_start(backend: str) -> dict:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "vxpu", "demo", "--json", "--backend", backend],
                         capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    doc = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {"ok": False, "stderr": res.stderr[-2000:]}
    return {"wall_s": wall, "ok": doc.get("ok"), "guest_s": doc.get("guest_s"), "rc": res.returncode}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--cold-start", action="store_true", help="also time 'vxpu demo --json' (caches warm)")
    args = ap.parse_args()
    out = {"loadavg_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    out["probe"] = probe(args.backend, args.accel, args.memory)
    if args.cold_start:
        out["demo_cold_start"] = cold_start(args.backend)
    out["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
