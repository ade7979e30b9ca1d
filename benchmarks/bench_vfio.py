"""Benchmark: vfio-user server turnaround, measured from the in-process client that plays QEMU.

What a guest pays per trapped access, minus QEMU's own share:

* ``REGION_READ`` of a 4-byte BAR0 register and of a 4-byte config-space dword: one round trip
  (send request, server parses, device answers, reply read back).
* synchronous ``REGION_WRITE`` (4 bytes): one round trip.
* posted ``REGION_WRITE`` (NO_REPLY, what QEMU sends for trapped BAR writes): the client-side
  cost per write (time to hand the message to the socket), and the sustained server cost per
  write (a burst of N posted writes fenced by one read, divided by N).
* ``REGION_READ`` of 4 KiB from BAR2 (bulk trapped access).
* with a server process: the server's own CPU time per REGION_READ and per posted write
  (from ``/proc/PID/schedstat``), which excludes the wake-up latency both ends pay per message.

The server runs the real TestDevice in a separate process (``--server process``, default: no
GIL sharing, like QEMU and ``vxpu serve``) or in a thread of this process (``--server thread``).
Prints a table of median / p99 / mean in µs; ``--json FILE`` also writes the numbers.

Usage: ``python benchmarks/bench_vfio.py [--iterations N] [--server process|thread] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vxpu.vfio_server.client import VfioUserClient

from vxpu.abi import testdev as abi

CONFIG = 7


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def measure(fn: Callable[[], object], iterations: int, warmup: int = 200) -> dict[str, float]:
    """Time ``fn`` ``iterations`` times; µs statistics."""
    for _ in range(warmup):
        fn()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    samples.sort()
    return {"median_us": _percentile(samples, 0.5), "p99_us": _percentile(samples, 0.99),
            "mean_us": statistics.fmean(samples) / 1000.0, "n": iterations}


def posted_burst(client: VfioUserClient, writes: int, rounds: int) -> dict[str, float]:
    """Server cost per posted write: ``writes`` posted writes then one fencing read, per round."""
    per_write = []
    data = struct.pack("<I", 0x1234)
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(writes):
            client.region_write(0, abi.SCRATCH, data, posted=True)
        client.region_read(0, abi.SCRATCH, 4)
        per_write.append((time.perf_counter_ns() - t0) / writes)
    per_write.sort()
    return {"median_us": per_write[len(per_write) // 2] / 1000.0,
            "p99_us": _percentile([int(x) for x in per_write], 0.99),
            "mean_us": statistics.fmean(per_write) / 1000.0, "n": writes * rounds}


def server_cpu_ns(pid: int) -> int:
    """CPU time the server's main thread has run, in ns (``/proc/PID/schedstat``)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def cpu_per_op(pid: int, fn: Callable[[], object], iterations: int) -> float:
    """Server CPU µs per call of ``fn`` (excludes wake-up and scheduling latency)."""
    start = server_cpu_ns(pid)
    for _ in range(iterations):
        fn()
    return (server_cpu_ns(pid) - start) / iterations / 1000.0


def _wait_listening(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vxpu serve exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                time.sleep(0.05)
    raise SystemExit("vxpu serve did not listen within 30 s")


def run(iterations: int, mode: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="vxpu-bench-"))
    path = tmp / "bench.sock"
    proc = None
    server = None
    cpu: dict[str, float] = {}
    if mode == "process":
        proc = subprocess.Popen([sys.executable, "-m", "vxpu", "--log-level", "WARNING", "serve", "--socket",
                                 str(path)], stdin=subprocess.DEVNULL)
        _wait_listening(path, proc)
    else:
        from vxpu.vfio_server.server import VfioUserServer
        from vxpu.vfio_server.testdev import TestDevice
        server = VfioUserServer(path, TestDevice()).start()
    try:
        with VfioUserClient(path) as c:
            c.handshake()
            c.region_write(CONFIG, 4, struct.pack("<H", 0x0006))
            data = struct.pack("<I", 7)
            results = {
                "region_read_bar0_4B": measure(lambda: c.region_read(0, abi.MAGIC, 4), iterations),
                "region_read_config_4B": measure(lambda: c.region_read(CONFIG, 0, 4), iterations),
                "region_read_bar2_4KiB": measure(lambda: c.region_read(2, 0, 4096), iterations),
                "region_write_sync_4B": measure(lambda: c.region_write(0, abi.SCRATCH, data), iterations),
                "region_write_posted_send_4B": measure(
                    lambda: c.region_write(0, abi.SCRATCH, data, posted=True), min(iterations, 2000)),
            }
            c.region_read(0, abi.SCRATCH, 4)            # drain the posted writes above
            results["region_write_posted_server_4B"] = posted_burst(c, 100, max(iterations // 100, 20))
            if proc is not None:
                cpu = {"region_read_bar0_4B": cpu_per_op(proc.pid, lambda: c.region_read(0, abi.MAGIC, 4),
                                                         iterations)}
                cpu["region_write_posted_4B"] = cpu_per_op(
                    proc.pid, lambda: c.region_write(0, abi.SCRATCH, data, posted=True), iterations)
                c.region_read(0, abi.SCRATCH, 4)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        if server is not None:
            server.stop()
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return {"server": mode, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "results": results, "server_cpu_us_per_op": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=20000, help="samples per measurement (default 20000)")
    ap.add_argument("--server", choices=("process", "thread"), default="process")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    out = run(args.iterations, args.server)
    print(f"vfio-user server turnaround ({out['server']} server, Python {out['python']}, {out['cpu_count']} CPUs)")
    print(f"{'operation':34} {'median µs':>10} {'p99 µs':>10} {'mean µs':>10} {'n':>8}")
    for name, r in out["results"].items():
        print(f"{name:34} {r['median_us']:10.1f} {r['p99_us']:10.1f} {r['mean_us']:10.1f} {r['n']:8d}")
    for name, us in out["server_cpu_us_per_op"].items():
        print(f"server CPU per {name}: {us:.1f} µs")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
