"""Benchmark: the CPU backend through a Session, against numpy doing the same work.

Three questions, each answered by a ratio to a numpy baseline measured in the same process
(alternating rounds, so noise and clock changes hit both sides):

1. **Launch latency.** ``Session.launch`` + ``Session.synchronize`` of a kernel that does no
   work (its guard ``i < n`` is false), in µs; the baseline is an empty Python call, so the
   figure is the whole dispatch cost (checks, queue hand-off to the worker thread, native call).
2. **saxpy throughput** ``y = a * x + y`` on ``--elements`` f32 values, in GB/s of memory
   traffic (12 bytes per element); the baseline is numpy's ``y += a * x`` on arrays of the
   same size (ratio > 1: the backend is faster).
3. **Copy bandwidth.** ``copy_htod`` and ``copy_dtoh`` of ``--copy-bytes`` between a host
   buffer and device memory, against ``numpy.copyto`` (memcpy) of the same size.

Usage: ``python benchmarks/bench_cpu_backend.py [--threads N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from vxpu.accel.registry import open_backend
from vxpu.accel.session import Session
from vxpu.ir import binary, text

SAXPY = """
module @bench
kernel @saxpy(%n: i32, %a: f32, %x: ptr<global>, %y: ptr<global>) {
^entry:
  %b = block_id.x
  %d = block_dim.x
  %base = mul %b, %d : i32
  %t = thread_id.x
  %i = add %base, %t : i32
  %ok = icmp slt %i, %n
  cbr %ok, ^body, ^exit
^body:
  %px = offset %x, %i : f32
  %py = offset %y, %i : f32
  %vx = load %px : f32
  %vy = load %py : f32
  %ax = fmul %a, %vx : f32
  %r = fadd %ax, %vy : f32
  store %r, %py
  br ^exit
^exit:
  ret
}
"""


def timed(fn: Callable[[], None], repeat: int) -> float:
    """Median seconds of ``repeat`` calls (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def interleaved(ours: Callable[[], None], base: Callable[[], None], repeat: int, rounds: int) -> tuple[float, float]:
    """Median of per-round medians for both sides, alternating rounds."""
    a, b = [], []
    for _ in range(rounds):
        a.append(timed(ours, repeat))
        b.append(timed(base, repeat))
    return statistics.median(a), statistics.median(b)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    spec = "cpu" + (f",threads={args.threads}" if args.threads else "") + ",arena=2G"
    backend = open_backend(spec)
    session = Session(backend)
    try:
        kernel, _ = session.get_kernel(session.load_module(binary.encode(text.parse(SAXPY))), "saxpy")
        n = args.elements
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
        dx, dy = session.alloc(4 * n), session.alloc(4 * n)
        session.copy_htod(dx, memoryview(x))
        session.copy_htod(dy, memoryview(y))
        results: dict[str, Any] = {"backend": spec, "threads": backend.threads, "cpu": backend.properties().name}

        empty_args = struct.pack("<ifQQ", 0, 2.0, dx, dy)

        def launch_sync() -> None:
            session.launch(kernel, (1,), (1,), empty_args)
            session.synchronize()

        ours, base = interleaved(launch_sync, lambda: None, args.repeat * 20, args.rounds)
        results["launch_sync_us"] = ours * 1e6
        results["empty_python_call_us"] = base * 1e6

        block = 256
        saxpy_args = struct.pack("<ifQQ", n, 2.0, dx, dy)

        def saxpy() -> None:
            session.launch(kernel, ((n + block - 1) // block,), (block,), saxpy_args)
            session.synchronize()

        ynp = y.copy()
        tmp = np.empty_like(x)

        def saxpy_numpy() -> None:
            np.multiply(x, np.float32(2.0), out=tmp)
            np.add(ynp, tmp, out=ynp)

        ours, base = interleaved(saxpy, saxpy_numpy, args.repeat, args.rounds)
        results["saxpy_gbps"] = 12 * n / ours / 1e9
        results["saxpy_numpy_gbps"] = 12 * n / base / 1e9
        results["saxpy_ratio"] = base / ours
        check = np.empty(16, np.float32)
        session.copy_dtoh(memoryview(check), dy)
        session.synchronize()
        results["saxpy_finite"] = bool(np.isfinite(check).all())

        nbytes = args.copy_bytes
        host_src = np.ones(nbytes, np.uint8)
        host_dst = np.empty(nbytes, np.uint8)
        dbuf = session.alloc(nbytes)
        other = np.empty(nbytes, np.uint8)

        def htod() -> None:
            session.copy_htod(dbuf, memoryview(host_src))
            session.synchronize()

        def dtoh() -> None:
            session.copy_dtoh(memoryview(host_dst), dbuf)
            session.synchronize()

        for name, fn in (("htod", htod), ("dtoh", dtoh)):
            ours, base = interleaved(fn, lambda: np.copyto(other, host_src), args.repeat, args.rounds)
            results[f"copy_{name}_gbps"] = nbytes / ours / 1e9
            results[f"copy_{name}_memcpy_gbps"] = nbytes / base / 1e9
            results[f"copy_{name}_ratio"] = base / ours
        results["elements"] = n
        results["copy_bytes"] = nbytes
        return results
    finally:
        session.close()
        backend.close()


def table(r: dict[str, Any]) -> str:
    rows = [
        ("launch + synchronize (no work)", f"{r['launch_sync_us']:.1f} µs",
         f"empty Python call {r['empty_python_call_us']:.2f} µs"),
        (f"saxpy, {r['elements']:,} f32", f"{r['saxpy_gbps']:.2f} GB/s",
         f"numpy {r['saxpy_numpy_gbps']:.2f} GB/s, ratio {r['saxpy_ratio']:.2f}"),
    ]
    for d in ("htod", "dtoh"):
        rows.append((f"copy_{d} {r['copy_bytes'] / 2**20:.0f} MiB", f"{r[f'copy_{d}_gbps']:.2f} GB/s",
                     f"numpy memcpy {r[f'copy_{d}_memcpy_gbps']:.2f} GB/s, ratio {r[f'copy_{d}_ratio']:.2f}"))
    w = max(len(a) for a, _, _ in rows)
    head = f"CPU backend ({r['backend']}, {r['threads']} block threads, {r['cpu']})"
    return "\n".join([head] + [f"  {a:<{w}}  {b:>14}   {c}" for a, b, c in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="block worker threads (default: CPU count)")
    p.add_argument("--elements", type=int, default=1 << 24, help="saxpy length (default 16 Mi)")
    p.add_argument("--copy-bytes", type=int, default=64 << 20, help="copy size (default 64 MiB)")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    results = bench(args)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
