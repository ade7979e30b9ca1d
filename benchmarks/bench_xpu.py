"""Benchmark: the accelerator device through raw descriptors, against direct Session calls.

The server is ``vxpu serve`` (the accelerator on the CPU backend) in its own process, like
under QEMU; this process plays QEMU and the guest driver with the in-process vfio-user client,
a memfd as guest RAM, and descriptors packed by hand (no SDK). Measured:

* **NOP ring round trip**: one NOP submitted (doorbell only when need-wakeup is set), its
  completion polled; median / p99 µs. Also sustained NOPs per second in batches of 64.
* **Trapped register read** (REG_SCRATCH, one REGION_READ round trip) while the device is idle
  and while its ring is kept busy by a feeder *process* (forked, sharing the guest RAM) that
  streams NOP batches, so the poller thread competes with the serve loop for the server's GIL.
* **H2D / D2H bandwidth** at 64 KiB, 1 MiB and 16 MiB: a batch of copies (fenced), bytes per
  second, against the same copies made with direct ``Session.copy_htod`` / ``copy_dtoh``
  calls from a memfd mapping in this process (the device's own cost floor on this backend).

Usage: ``python benchmarks/bench_xpu.py [--quick] [--backend cpu|cuda] [--json FILE]``
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
from pathlib import Path
from typing import Any

from vxpu.vfio_server.client import GuestMemory, VfioUserClient

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import DeviceStatus, Opcode

RAM_BASE = 0x1000_0000
RAM_SIZE = 96 << 20
SQ_OFF, CQ_OFF, DATA_OFF = 0x1000, 0x20000, 0x100000
ENTRIES = 1024
_U32 = struct.Struct("<I")


class Ring:
    """A minimal raw-descriptor driver over a VfioUserClient and a GuestMemory."""

    def __init__(self, client: VfioUserClient, mem: GuestMemory) -> None:
        self.c, self.mem, self.view = client, mem, mem.view
        self.u32 = mem.view.cast("I")        # index stores must be single 32-bit stores
        self.sq_tail = self.cq_head = 0
        self.spin = True
        mem.write(0, bytes(abi.QUEUE_HEADER_SIZE))
        for reg, value in ((abi.REG_QUEUE_BASE_LO, RAM_BASE), (abi.REG_SQ_BASE_LO, RAM_BASE + SQ_OFF),
                           (abi.REG_CQ_BASE_LO, RAM_BASE + CQ_OFF), (abi.REG_SQ_ENTRIES, ENTRIES),
                           (abi.REG_CQ_ENTRIES, ENTRIES), (abi.REG_QUEUE_ENABLE, 1)):
            self.set_reg(reg, value)
        while not self.reg(abi.REG_STATUS) & DeviceStatus.ENABLED:
            time.sleep(0.001)

    def reg(self, off: int) -> int:
        return int(_U32.unpack(self.c.region_read(0, off, 4))[0])

    def set_reg(self, off: int, value: int) -> None:
        self.c.region_write(0, off, _U32.pack(value), posted=True)

    def submit(self, descs: list[bytes]) -> None:
        for i, d in enumerate(descs):
            self.view[SQ_OFF + ((self.sq_tail + i) % ENTRIES) * 64:][:64] = d
        self.sq_tail = (self.sq_tail + len(descs)) & abi.INDEX_MASK
        self.u32[abi.QH_SQ_TAIL // 4] = self.sq_tail
        if _U32.unpack_from(self.view, abi.QH_FLAGS)[0] & abi.FLAG_NEED_WAKEUP:
            self.set_reg(abi.REG_DOORBELL, 1)

    def wait(self, n: int) -> list[int]:
        """Consume ``n`` completions; returns their statuses. Polls without pause when
        :attr:`spin` is set (latency runs), else every 50 µs (throughput runs: on 2 cores a
        spinning client would take a core from the server)."""
        out: list[int] = []
        while len(out) < n:
            tail = _U32.unpack_from(self.view, abi.QH_CQ_TAIL)[0]
            if tail == self.cq_head and not self.spin:
                time.sleep(50e-6)
                continue
            while self.cq_head != tail and len(out) < n:
                slot = CQ_OFF + (self.cq_head % ENTRIES) * 32
                out.append(_U32.unpack_from(self.view, slot + 24)[0])
                self.cq_head = (self.cq_head + 1) & abi.INDEX_MASK
            self.u32[abi.QH_CQ_HEAD // 4] = self.cq_head
        return out

    def run(self, descs: list[bytes]) -> list[int]:
        """Submit (in chunks that fit the ring, the next while the last runs) and wait for all."""
        out: list[int] = []
        chunk = ENTRIES // 2
        outstanding = 0
        for i in range(0, len(descs), chunk):
            part = descs[i:i + chunk]
            self.submit(part)
            if outstanding:
                out += self.wait(outstanding)
            outstanding = len(part)
        return out + self.wait(outstanding)

    def cmd(self, opcode: int, args: list[int] | None = None, sg: tuple[int, int] | None = None) -> tuple[int, int]:
        self.submit([desc(opcode, args, sg)])
        tail = self.cq_head
        (status,) = self.wait(1)
        result = struct.unpack_from("<Q", self.view, CQ_OFF + (tail % ENTRIES) * 32 + 8)[0]
        return status, result


def desc(opcode: int, args: list[int] | None = None, sg: tuple[int, int] | None = None) -> bytes:
    a = (args or []) + [0] * (4 - len(args or []))
    addr, length = sg or (0, 0)
    return abi.DESCRIPTOR.pack(opcode, 0, 1 if sg else 0, 0, *a, addr, length)


def _stats(samples: list[int]) -> dict[str, float]:
    samples.sort()
    return {"median_us": samples[len(samples) // 2] / 1e3, "p99_us": samples[int(0.99 * len(samples))] / 1e3,
            "mean_us": statistics.fmean(samples) / 1e3, "n": len(samples)}


def nop_round_trip(ring: Ring, n: int) -> dict[str, float]:
    nop = [desc(Opcode.NOP)]
    for _ in range(200):
        ring.run(nop)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        ring.run(nop)
        samples.append(time.perf_counter_ns() - t0)
    return _stats(samples)


def nop_throughput(ring: Ring, batches: int) -> dict[str, float]:
    """Batches of 64 NOPs (the client polls every 50 µs); also the device's own busy time per
    NOP, from STATS."""
    batch = [desc(Opcode.NOP)] * 64
    before = device_stats(ring)
    ring.spin = False
    t0 = time.perf_counter()
    for _ in range(batches):
        ring.run(batch)
    elapsed = time.perf_counter() - t0
    ring.spin = True
    after = device_stats(ring)
    nops = after["commands"]["NOP"] - before["commands"].get("NOP", 0)
    return {"nops_per_s": 64 * batches / elapsed,
            "device_busy_us_per_nop": (after["busy_ns"] - before["busy_ns"]) / nops / 1e3}


def device_stats(ring: Ring) -> dict[str, Any]:
    addr = RAM_BASE + DATA_OFF + (80 << 20)
    status, size = ring.cmd(Opcode.STATS, sg=(addr, abi.MAX_STATS_BYTES))
    assert status == 0, status
    off = addr - RAM_BASE
    return json.loads(bytes(ring.view[off:off + size]))["device"]  # type: ignore[no-any-return]


def register_reads(ring: Ring, n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        ring.reg(abi.REG_SCRATCH)
        samples.append(time.perf_counter_ns() - t0)
    return _stats(samples)


FEEDER = """
import mmap, select, struct, sys
from vxpu.abi import xpu as abi
path, sq_tail, cq_head, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
SQ_OFF, CQ_OFF, ENTRIES = {sq}, {cq}, {entries}
with open(path, "r+b") as f:
    mm = mmap.mmap(f.fileno(), size)
u32 = memoryview(mm).cast("I")
nop = abi.DESCRIPTOR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    for i in range(256):
        off = SQ_OFF + ((sq_tail + i) % ENTRIES) * 64
        mm[off:off + 64] = nop
    sq_tail = (sq_tail + 256) & abi.INDEX_MASK
    u32[abi.QH_SQ_TAIL // 4] = sq_tail
    while cq_head != sq_tail:
        cq_head = u32[abi.QH_CQ_TAIL // 4]
    u32[abi.QH_CQ_HEAD // 4] = cq_head
print(sq_tail, cq_head, flush=True)
"""


def busy_register_reads(ring: Ring, n: int) -> dict[str, Any]:
    """Register reads while another process (sharing the guest RAM through /proc/PID/fd) keeps
    the ring full of NOPs; it never rings the doorbell, so the device stays awake polling."""
    code = FEEDER.format(sq=SQ_OFF, cq=CQ_OFF, entries=ENTRIES)
    child = subprocess.Popen([sys.executable, "-c", code, f"/proc/{os.getpid()}/fd/{ring.mem.fd}",
                              str(ring.sq_tail), str(ring.cq_head), str(ring.mem.size)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    before = _U32.unpack_from(ring.view, abi.QH_CQ_TAIL)[0]
    t0 = time.perf_counter()
    out: dict[str, Any] = register_reads(ring, n)
    done = (_U32.unpack_from(ring.view, abi.QH_CQ_TAIL)[0] - before) & abi.INDEX_MASK
    out["nops_per_s_meanwhile"] = done / (time.perf_counter() - t0)
    child.stdin.write("stop\n")
    child.stdin.flush()
    sq_tail, cq_head = (int(v) for v in child.stdout.readline().split())
    child.wait(10)
    ring.sq_tail, ring.cq_head = sq_tail, cq_head
    return out


def ring_bandwidth(ring: Ring, size: int, total: int) -> dict[str, float]:
    status, dev = ring.cmd(Opcode.MEM_ALLOC, [size])
    assert status == 0, status
    src = (RAM_BASE + DATA_OFF, size)
    reps = max(1, total // size)
    out = {}
    ring.spin = False
    for name, op in (("htod", Opcode.MEM_COPY_HTOD), ("dtoh", Opcode.MEM_COPY_DTOH)):
        ring.run([desc(op, [dev], src)] * 2 + [desc(Opcode.FENCE)])
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            statuses = ring.run([desc(op, [dev], src)] * reps + [desc(Opcode.FENCE)])
            best = min(best, time.perf_counter() - t0)
            assert not any(statuses), statuses
        out[name] = size * reps / best / 1e9
    ring.spin = True
    ring.cmd(Opcode.MEM_FREE, [dev])
    return out


def direct_bandwidth(size: int, total: int, spec: str = "cpu") -> dict[str, float]:
    """Direct Session copies from a memfd view registered with the backend, as the device does."""
    from vxpu.accel import registry
    from vxpu.accel.session import Session
    backend = registry.open_backend(spec)
    mem = GuestMemory(max(size, 1 << 20))
    view = mem.view[:size]
    try:
        with Session(backend) as s:
            dev = s.alloc(size)
            s.register_host(view)
            reps = max(1, total // size)
            out = {}
            for name, fn in (("htod", lambda: s.copy_htod(dev, view)), ("dtoh", lambda: s.copy_dtoh(view, dev))):
                fn()
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    s.synchronize()
                    best = min(best, time.perf_counter() - t0)
                out[name] = size * reps / best / 1e9
            return out
    finally:
        backend.close()
        view.release()
        mem.close()


def start_server(path: Path, spec: str = "cpu") -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "vxpu", "--log-level", "WARNING", "serve", "--socket", str(path),
                             "--backend", spec])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as s:
            if s.connect_ex(str(path)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("vxpu serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--backend", default="cpu", help="the server's backend and the direct one (default cpu)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    n = 500 if args.quick else 3000
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(Path(tmp) / "xpu.sock", args.backend)
        try:
            results = run(Path(tmp) / "xpu.sock", n, args.quick)
        finally:
            proc.terminate()
            proc.wait(10)
    results["direct"] = {str(size): direct_bandwidth(size, (16 << 20) if args.quick else (64 << 20), args.backend)
                         for size in (64 << 10, 1 << 20, 16 << 20)}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "backend": args.backend}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run(path: Path, n: int, quick: bool) -> dict[str, Any]:
    with VfioUserClient(path, timeout=10.0) as c, GuestMemory(RAM_SIZE) as mem:
        c.handshake()
        c.region_write(7, 4, struct.pack("<H", 0x0006))
        c.map_guest_ram(mem, RAM_BASE)
        ring = Ring(c, mem)
        out: dict[str, Any] = {"nop_round_trip": nop_round_trip(ring, n),
                               "nop_batched": nop_throughput(ring, 50 if quick else 300),
                               "register_read_idle": register_reads(ring, n)}
        time.sleep(0.1)
        out["register_read_idle_asleep"] = register_reads(ring, n)
        out["register_read_busy"] = busy_register_reads(ring, n)
        out["ring"] = {str(size): ring_bandwidth(ring, size, (16 << 20) if quick else (64 << 20))
                       for size in (64 << 10, 1 << 20, 16 << 20)}
        ring.set_reg(abi.REG_QUEUE_ENABLE, 0)
        while ring.reg(abi.REG_STATUS) & DeviceStatus.ENABLED:
            time.sleep(0.001)
        c.dma_unmap(RAM_BASE, RAM_SIZE)
        ring.u32.release()
        return out


if __name__ == "__main__":
    main()
