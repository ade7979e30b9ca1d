"""Benchmark: the guest SDK through the host transport against native calls, in one run.

The SDK side is ``Device.local(backend)``: a ``vxpu serve`` child, memfd guest RAM, commands
through the rings. The native side runs in this process on the same hardware:

* ``--backend cpu``: direct calls on an accel ``Session`` over the CPU backend (what the
  device model itself calls), copies from a memfd mapping;
* ``--backend cuda``: ``cuda.bindings.driver`` on pinned ``cuMemAllocHost`` memory and a
  non-blocking stream, with a PTX empty kernel.

Figures, each an SDK/native ratio:

1. **Bandwidth** guest-RAM→device and device→guest-RAM at 64 KiB, 1 MiB and 16 MiB: the SDK
   posts ``k`` copies between a pinned :class:`HostArray` and a device array, then
   ``synchronize()``; native issues ``k`` async copies then one sync. At 64 KiB also one copy at
   a time (``k = 1``) against a synchronous native copy. Ratio = SDK / native bandwidth.
2. **Empty-kernel LAUNCH + completion**: ``kernel[1, 32]()`` + ``synchronize()`` (a LAUNCH and a
   FENCE, waiting for the FENCE's completion) against native launch + sync. Ratio = SDK / native
   time (lower is better).
3. **Batched launch throughput**: 1,000 launches posted without waiting, then one
   ``synchronize()``, against 1,000 native async launches and one sync. Ratio = native / SDK
   time per launch (throughput ratio, higher is better). Also reported: the guest-side time the
   SDK takes to post one of those launches (no native counterpart).

``--buffers N`` spreads each size's copies over N host buffers on each side, one whole batch
per buffer in turn, and reports the time per batch: device→host copies on the H200 run up to
~1.5 % slower or faster depending on the virtual address of the host buffer they write (the
same one each time; ``benchmarks/probe_va_sweep.py``), for ``cuMemAllocHost`` memory and guest
RAM alike, so one buffer a side compares two draws of that lottery rather than the paths.

Also reported: the device's STATS counters (batches, sleeps, doorbells, busy time) and, when
the server runs with ``VXPU_XPU_PROFILE=1`` (inherited by the ``vxpu serve`` child), its
per-phase profile (:mod:`vxpu.vfio_server.xpu.profile`); ``--old-wait`` makes the SDK's waiter
back off after 1 ms as before ``guest.ring.BUSY_SPIN_S`` (an A/B switch).

``--trace FILE`` then runs 300 more LAUNCH + completion round trips and 20 batches each of 1 MiB
x16 and 64 KiB x64 copies to the device and 1 MiB x16 from it with the guest's post/return times (``perf_counter_ns``) written to FILE; with
``VXPU_XPU_TRACE`` set too, the server writes its per-call timings on the same clock, so
both sides of each round trip line up (``benchmarks/trace_devpath.py`` reads the two).

Usage: ``python benchmarks/bench_sdk.py [--backend cpu|cuda] [--quick] [--old-wait] [--trace FILE]
[--buffers N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from vxpu.guest import Device, DeviceError, ring
from vxpu.ir import encode, parse

KiB, MiB = 1 << 10, 1 << 20
SIZES = (64 * KiB, 1 * MiB, 16 * MiB)
BATCH = {64 * KiB: 64, 1 * MiB: 16, 16 * MiB: 4}
PAUSES = (0.001, 0.003)          # idle gaps before a LAUNCH + completion (the poller's adaptive spin)
LAUNCHES = 1000
EMPTY_IR = """module @bench
kernel @empty() {
^entry:
  ret
}
"""
EMPTY_PTX = b"""
.version 8.0
.target sm_90
.address_size 64
.visible .entry empty() { ret; }
"""


def timed(fn: Callable[[], None], reps: int) -> list[float]:
    clock = time.perf_counter
    out = []
    for _ in range(reps):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def after_pause(fn: Callable[[], None], pause: float, reps: int) -> float:
    """Median seconds of ``fn`` when each call follows ``pause`` seconds of idleness (the
    device's poller may have gone to sleep: see vfio_server/xpu/poller.py, adaptive spin)."""
    out = []
    for _ in range(reps):
        time.sleep(pause)
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def interleave(a: Callable[[], None], b: Callable[[], None], reps: int, block: int) -> tuple[float, float]:
    """Median seconds per call of ``a`` and ``b``, alternating blocks of ``block`` calls."""
    ta: list[float] = []
    tb: list[float] = []
    timed(a, min(reps, 5))
    timed(b, min(reps, 5))
    done = 0
    while done < reps:
        n = min(block, reps - done)
        ta += timed(a, n)
        tb += timed(b, n)
        done += n
    return statistics.median(ta), statistics.median(tb)


# -- the SDK side ---------------------------------------------------------------------------------
class SdkSide:
    def __init__(self, dev: Device, buffers: int = 1) -> None:
        self.dev = dev
        self.buffers = buffers
        self.sub: dict[int, tuple[list[Any], Any]] = {}
        self.launcher: Any = None
        self.post_times: list[float] = []       # guest-side seconds per posted launch

    def prepare_launches(self) -> None:
        """Load the empty kernel (raises DeviceError when the backend cannot run it)."""
        self.launcher = self.dev.load_module(EMPTY_IR).empty[1, 32]

    def pair(self, size: int) -> tuple[list[Any], Any]:
        if size not in self.sub:
            self.sub[size] = ([self.dev.pinned(size, np.uint8) for _ in range(self.buffers)],
                              self.dev.empty(size, np.uint8))
        return self.sub[size]

    def copies(self, direction: str, size: int, k: int, buffers: int | None = None) -> Callable[[], None]:
        """One batch of ``k`` copies and a synchronize() per host buffer (the first ``buffers``
        of them, default all), in turn."""
        hosts, arr = self.pair(size)
        hosts = hosts[:buffers]
        dev = self.dev
        if direction == "htod":
            def run() -> None:
                for host in hosts:
                    for _ in range(k):
                        dev.copy_to_device(arr, host)
                    dev.synchronize()
        else:
            def run() -> None:
                for host in hosts:
                    for _ in range(k):
                        dev.copy_to_host(host, arr, blocking=False)
                    dev.synchronize()
        return run

    def launch_sync(self) -> None:
        self.launcher()
        self.dev.synchronize()

    def launch_batch(self) -> None:
        launcher = self.launcher
        t0 = time.perf_counter()
        for _ in range(LAUNCHES):
            launcher()
        self.post_times.append((time.perf_counter() - t0) / LAUNCHES)
        self.dev.synchronize()

    def traced(self, path: str) -> None:
        """The ``--trace`` runs: guest-side timestamps of each post and round trip, to ``path``."""
        ring, clock, events = self.dev.ring, time.perf_counter_ns, []
        post = ring.post

        def traced_post(opcode: int, *args: Any, **kwargs: Any) -> int:
            seq = post(opcode, *args, **kwargs)
            events.append(("post", int(opcode), clock()))
            return seq
        poll = ring.poll

        def traced_poll() -> int:
            t0 = clock()
            n = poll()
            if n:
                events.append(("poll", n, t0))
                events.append(("polled", n, clock()))
            return n
        ring.post = traced_post  # type: ignore[method-assign]
        ring.poll = traced_poll  # type: ignore[method-assign]
        try:
            for _ in range(300):
                events.append(("start", 0, clock()))
                self.launch_sync()
                events.append(("end", 0, clock()))
            for kind, (direction, size, k) in enumerate((("htod", MiB, 16), ("htod", 64 * KiB, 64),
                                                         ("dtoh", MiB, 16)), start=1):
                run = self.copies(direction, size, k, buffers=1)     # (the traced batches: one buffer)
                for _ in range(20):
                    events.append(("start", kind, clock()))
                    run()
                    events.append(("end", kind, clock()))
        finally:
            del ring.post, ring.poll
        with open(path, "w") as fh:
            json.dump(events, fh)


# -- native: a Session over an in-process backend ----------------------------------------------
class SessionNative:
    name = "direct Session calls"

    def __init__(self, spec: str, buffers: int = 1) -> None:
        from vxpu.accel import registry
        from vxpu.accel.session import Session

        self.session = Session(registry.open_backend(spec))
        fd = os.memfd_create("bench-ram")
        os.ftruncate(fd, max(SIZES) * buffers)
        self.region = mmap.mmap(fd, max(SIZES) * buffers, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fd)
        self.view = memoryview(self.region)
        self.buffers = buffers
        self.dptr = self.session.alloc(max(SIZES))
        module = self.session.load_module(encode(parse(EMPTY_IR)))
        self.kernel, _ = self.session.get_kernel(module, "empty")

    def copies(self, direction: str, size: int, k: int) -> Callable[[], None]:
        s, d = self.session, self.dptr
        views = [self.view[i * max(SIZES):i * max(SIZES) + size] for i in range(self.buffers)]

        def run() -> None:
            for v in views:
                for _ in range(k):
                    if direction == "htod":
                        s.copy_htod(d, v)
                    else:
                        s.copy_dtoh(v, d)
                s.synchronize()
        return run

    def launch_sync(self) -> None:
        self.session.launch(self.kernel, (1, 1, 1), (32, 1, 1), b"")
        self.session.synchronize()

    def launch_batch(self) -> None:
        s, k = self.session, self.kernel
        for _ in range(LAUNCHES):
            s.launch(k, (1, 1, 1), (32, 1, 1), b"")
        s.synchronize()


# -- native: the CUDA driver API --------------------------------------------------------------------
class CudaNative:
    name = "native CUDA driver (pinned cuMemAllocHost, async on one stream)"

    def __init__(self, buffers: int = 1) -> None:
        from cuda.bindings import driver as drv

        self.drv = drv
        self._ok(drv.cuInit(0))
        dev = self._ok(drv.cuDeviceGet(0))
        self.ctx = self._ok(drv.cuDevicePrimaryCtxRetain(dev))
        self._ok(drv.cuCtxSetCurrent(self.ctx))
        self.hosts = [int(self._ok(drv.cuMemAllocHost(max(SIZES)))) for _ in range(buffers)]
        self.dptr = int(self._ok(drv.cuMemAlloc(max(SIZES))))
        self.stream = self._ok(drv.cuStreamCreate(drv.CUstream_flags.CU_STREAM_NON_BLOCKING))
        self.module = self._ok(drv.cuModuleLoadData(EMPTY_PTX + b"\0"))
        self.func = self._ok(drv.cuModuleGetFunction(self.module, b"empty"))
        name = self._ok(drv.cuDeviceGetName(64, dev))
        self.device_name = bytes(name).split(b"\0")[0].decode()
        for host in self.hosts:
            ctypes.memset(host, 1, max(SIZES))

    @staticmethod
    def _ok(result: Any) -> Any:
        err = result[0]
        if int(err):
            raise RuntimeError(f"CUDA call failed: {err}")
        return result[1] if len(result) > 1 else None

    def copies(self, direction: str, size: int, k: int) -> Callable[[], None]:
        drv, hosts, d, st = self.drv, self.hosts, self.dptr, self.stream
        if k == 1:                       # the plain synchronous pinned copy
            if direction == "htod":
                def one() -> None:
                    for h in hosts:
                        drv.cuMemcpyHtoD(d, h, size)
            else:
                def one() -> None:
                    for h in hosts:
                        drv.cuMemcpyDtoH(h, d, size)
            return one
        copy = drv.cuMemcpyHtoDAsync if direction == "htod" else drv.cuMemcpyDtoHAsync

        def run() -> None:
            for h in hosts:
                for _ in range(k):
                    if direction == "htod":
                        copy(d, h, size, st)
                    else:
                        copy(h, d, size, st)
                drv.cuStreamSynchronize(st)
        return run

    def launch_sync(self) -> None:
        self.drv.cuLaunchKernel(self.func, 1, 1, 1, 32, 1, 1, 0, self.stream, 0, 0)
        self.drv.cuStreamSynchronize(self.stream)

    def launch_batch(self) -> None:
        drv, f, st = self.drv, self.func, self.stream
        for _ in range(LAUNCHES):
            drv.cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, st, 0, 0)
        drv.cuStreamSynchronize(st)


# -- the run ------------------------------------------------------------------------------------------
def bench(sdk: SdkSide, native: Any, quick: bool, block: int = 0, scale: int = 1) -> list[dict[str, Any]]:
    rows, nbuf = [], sdk.buffers
    for size in SIZES:
        for direction in ("htod", "dtoh"):
            for k in ((1, BATCH[size]) if size == min(SIZES) else (BATCH[size],)):
                reps = max(5, (400 if size <= MiB else 40) * scale // k // (4 if quick else 1) // nbuf)
                t_sdk, t_nat = interleave(sdk.copies(direction, size, k), native.copies(direction, size, k),
                                          reps, max(2, reps // 5, min(block, reps)))
                t_sdk, t_nat = t_sdk / nbuf, t_nat / nbuf           # per batch
                rows.append({"what": f"{'guest-RAM->device' if direction == 'htod' else 'device->guest-RAM'} "
                                     f"{_size(size)} x{k}",
                             "sdk_gbps": k * size / t_sdk / 1e9, "native_gbps": k * size / t_nat / 1e9,
                             "ratio": t_nat / t_sdk, "better": "higher"})
    try:
        sdk.prepare_launches()
    except DeviceError as exc:
        rows.append({"what": "empty LAUNCH + completion / batched launches", "error": str(exc)})
        return rows
    reps = 300 if quick else 2000
    t_sdk, t_nat = interleave(sdk.launch_sync, native.launch_sync, reps, 100)
    rows.append({"what": "empty LAUNCH + completion (us)", "sdk": t_sdk * 1e6, "native": t_nat * 1e6,
                 "ratio": t_sdk / t_nat, "better": "lower"})
    for pause in PAUSES:
        t_sdk, t_nat = after_pause(sdk.launch_sync, pause, 50 if quick else 200), \
            after_pause(native.launch_sync, pause, 50 if quick else 200)
        rows.append({"what": f"  the same after a {pause * 1e3:g} ms pause (us)", "sdk": t_sdk * 1e6,
                     "native": t_nat * 1e6, "ratio": t_sdk / t_nat, "better": "lower"})
    reps = 3 if quick else 10
    t_sdk, t_nat = interleave(sdk.launch_batch, native.launch_batch, reps, 1)
    rows.append({"what": f"batched launches, {LAUNCHES} then sync (us/launch)", "sdk": t_sdk / LAUNCHES * 1e6,
                 "native": t_nat / LAUNCHES * 1e6, "ratio": t_nat / t_sdk, "better": "higher"})
    rows.append({"what": "  of which the SDK posting one launch (us)", "sdk": statistics.median(sdk.post_times) * 1e6,
                 "native": None, "ratio": None, "better": "info"})
    return rows


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def print_table(result: dict[str, Any]) -> None:
    print(f"SDK via Device.local({result['backend']!r}) vs {result['native']} on {result['device']}")
    print(f"{'measure':<44} {'SDK':>10} {'native':>10} {'ratio':>7}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['what']:<44} not measured: {r['error']}")
        elif "sdk_gbps" in r:
            print(f"{r['what'] + ' (GB/s)':<44} {r['sdk_gbps']:>10.2f} {r['native_gbps']:>10.2f} {r['ratio']:>7.3f}")
        elif r["native"] is None:
            print(f"{r['what']:<44} {r['sdk']:>10.2f} {'-':>10} {'-':>7}")
        else:
            print(f"{r['what']:<44} {r['sdk']:>10.2f} {r['native']:>10.2f} {r['ratio']:>7.3f}")
    print(f"doorbells rung: {result['doorbells']} for {result['commands']} commands")
    dev = result.get("stats", {}).get("device", {})
    if dev:
        print(f"device: {dev.get('batches')} batches (max {dev.get('max_batch')}), {dev.get('sleeps')} sleeps, "
              f"busy {dev.get('busy_ns', 0) / 1e6:.1f} ms of {dev.get('uptime_ns', 0) / 1e6:.0f} ms")
    for key, entry in result.get("stats", {}).get("profile", {}).items():
        print(f"  profile {key:<28} {entry['count']:>9} x {entry['mean_us']:8.2f} us = {entry['total_us'] / 1e3:9.1f} ms")
    for line in result.get("server_warnings", []):
        print(f"  server: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--old-wait", action="store_true", help="SDK waiter without the busy-device spin (A/B)")
    parser.add_argument("--trace", metavar="FILE", help="guest-side timestamps of traced round trips")
    parser.add_argument("--block", type=int, default=0,
                        help="copies: at least this many repetitions per interleaved block (the device's "
                             "poller sleeps during the native block, so each SDK block's first one pays a wake-up)")
    parser.add_argument("--reps-scale", type=int, default=1, metavar="N",
                        help="copies: N times the repetitions (a tighter median on a noisy machine)")
    parser.add_argument("--buffers", type=int, default=1, metavar="N",
                        help="copies: N host buffers a side, one batch each in turn (averages the per-address "
                             "speed of device->host copies; see the module docstring)")
    parser.add_argument("--poll-idle-us", type=int, metavar="US",
                        help="the server's 'vxpu serve --poll-idle-us' (adaptive idle spin ceiling; passed to the "
                             "child as VXPU_POLL_IDLE_US; 200 gives the fixed spin of before)")
    args = parser.parse_args(argv)
    if args.poll_idle_us is not None:
        os.environ["VXPU_POLL_IDLE_US"] = str(args.poll_idle_us)
    if args.old_wait:
        ring.BUSY_SPIN_S = 0.0
    nbuf = max(1, args.buffers)
    native = CudaNative(nbuf) if args.backend.startswith("cuda") else SessionNative(args.backend, nbuf)
    with Device.local(args.backend, ram_size=max(SIZES) * (nbuf + 3) + (64 << 20)) as dev:
        sdk = SdkSide(dev, nbuf)
        ident = dev.identify()
        rows = bench(sdk, native, args.quick, args.block, max(1, args.reps_scale))
        if args.trace and sdk.launcher is not None:
            sdk.traced(args.trace)
        result = {"backend": args.backend, "block": args.block, "buffers": nbuf, "native": native.name, "device": ident.get("name"),
                  "rows": rows, "doorbells": dev.ring.doorbells, "commands": dev.ring.submitted,
                  "old_wait": args.old_wait, "poll_idle_us": os.environ.get("VXPU_POLL_IDLE_US"),
                  "stats": dev.stats()}
        log = getattr(dev.transport, "server_log", None)
        if callable(log):
            result["server_warnings"] = [ln for ln in log().splitlines() if "WARNING" in ln or "ERROR" in ln][-10:]
    print_table(result)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
