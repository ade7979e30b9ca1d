"""Probe: what each layer of the accelerator's command path costs, in one process.

No server and no SDK: the device model's :class:`Executor` runs descriptors against a
:class:`Session` over memfd "guest RAM" registered with the backend, so each layer's cost is
measured apart from the two process hand-offs that ``bench_sdk.py`` adds:

* ``raw``      — the CUDA driver call itself (``cuLaunchKernel``/``cuMemcpy*Async`` through
  cuda.bindings, the empty kernel as PTX; copies from ``cuMemAllocHost`` memory and from the
  registered memfd);
* ``backend``  — :meth:`Backend.launch` / ``synchronize(queue)`` (the checked IR empty kernel:
  hidden arguments, fault-record check), with the fault record read three ways;
* ``session``  — :meth:`Session.launch` / ``synchronize()`` (handles, quotas, bounds);
* ``executor`` — :meth:`Executor.execute` per descriptor, as the poller calls it (LAUNCH, FENCE,
  MEM_COPY_HTOD/DTOH with inline SG and one synchronization per batch).

Then a cProfile of the executor's launch and copy loops (functions by own time), and on CUDA
a contained out-of-bounds saxpy through the backend's fault record (mapped pinned host memory
since the record moved there), twice, then an in-bounds launch.

Usage: ``python benchmarks/probe_devpath.py [--backend cpu|cuda] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import mmap
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from vxpu.accel import registry
from vxpu.accel.session import Session
from vxpu.ir import encode, parse
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.dma import DmaRegion
from vxpu.vfio_server.xpu.commands import Executor
from vxpu.vfio_server.xpu.guestram import GuestRam
from vxpu.vfio_server.xpu.stats import DeviceStats

from vxpu.abi import xpu as abi

KiB, MiB = 1 << 10, 1 << 20
RAM_BASE = 1 << 32
EMPTY_IR = "module @probe\nkernel @empty() {\n^entry:\n  ret\n}\n"
EMPTY_PTX = b".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry empty() { ret; }\n\0"
LAUNCHES = 1000
COPIES = ((64 * KiB, 64), (1 * MiB, 16), (16 * MiB, 4))


def median_us(fn: Callable[[], None], reps: int, per: int = 1) -> float:
    """Median microseconds per call (``per`` operations per call), after a warm-up."""
    for _ in range(min(5, reps)):
        fn()
    out = []
    clock = time.perf_counter
    for _ in range(reps):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return statistics.median(out) * 1e6 / per


class Probe:
    def __init__(self, spec: str) -> None:
        self.backend = registry.open_backend(spec)
        self.cuda = self.backend.name == "cuda"
        self.session = Session(self.backend)
        self.ram_size = 2 * max(n for n, _ in COPIES)
        fd = os.memfd_create("probe-ram")
        os.ftruncate(fd, self.ram_size)
        self.mm = mmap.mmap(fd, self.ram_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fd)
        self.mm[:] = b"\1" * self.ram_size
        self.ram = GuestRam()
        region = DmaRegion(RAM_BASE, self.ram_size, 0, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, memoryview(self.mm))
        with self.ram.lock:
            self.ram.add(region)
            self.ram.register_pending(self.session.register_host)
        regions = self.ram.regions()
        self.pinned = [getattr(r.token, "pinned", None) for r in regions]
        self.host_base = regions[0].host_base
        self.executor = Executor(self.ram, lambda: self.session, lambda: 0, int(abi.Feature.IR),
                                 lambda: b"{}", lambda: b"{}", lambda: None, DeviceStats())
        self.dptr = self.session.alloc(max(n for n, _ in COPIES))
        module = self.session.load_module(encode(parse(EMPTY_IR)))
        self.khandle, _ = self.session.get_kernel(module, "empty")
        kern = self.session._kernels[self.khandle]
        self.btoken = kern.token
        self.bqueue = self.backend.create_queue()
        self.results: dict[str, Any] = {"backend": spec, "guest_ram_pinned": self.pinned}
        if self.cuda:
            self._raw_setup()

    def _raw_setup(self) -> None:
        drv = self.backend._drv               # type: ignore[attr-defined]
        self.drv = drv
        _err, self.raw_stream = drv.cuStreamCreate(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)
        _err, self.raw_module = drv.cuModuleLoadData(EMPTY_PTX)
        _err, self.raw_func = drv.cuModuleGetFunction(self.raw_module, b"empty")
        _err, host = drv.cuMemAllocHost(max(n for n, _ in COPIES))
        self.raw_host = int(host)
        self.results["batch_api"] = hasattr(drv, "cuMemcpyBatchAsync")

    # -- descriptors -------------------------------------------------------------------------
    def _desc(self, op: int, a0: int = 0, a1: int = 0, a2: int = 0, a3: int = 0, sg: tuple[int, int] | None = None,
              tag: int = 0) -> tuple[int, ...]:
        addr, length = sg if sg else (0, 0)
        return (int(op), 0, 1 if sg else 0, tag, a0, a1, a2, a3, addr, length)

    # -- launches ----------------------------------------------------------------------------
    def launches(self) -> None:
        r = self.results
        be, s, ex = self.backend, self.session, self.executor
        tok, bq = self.btoken, self.bqueue
        g, b = (1, 1, 1), (32, 1, 1)
        a1, a2, a3 = abi.pack_launch_dims(g, b, 0)
        launch = self._desc(abi.Opcode.LAUNCH, self.khandle, a1, a2, a3)
        fence = self._desc(abi.Opcode.FENCE)
        q = ex.queue
        if self.cuda:
            drv, f, st = self.drv, self.raw_func, self.raw_stream

            def raw_one() -> None:
                drv.cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, st, 0, 0)
                drv.cuStreamSynchronize(st)

            def raw_batch() -> None:
                for _ in range(LAUNCHES):
                    drv.cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, st, 0, 0)
                drv.cuStreamSynchronize(st)
            r["raw launch+sync us"] = median_us(raw_one, 2000)
            r["raw batched us/launch"] = median_us(raw_batch, 10, LAUNCHES)
            r["raw sync (idle stream) us"] = median_us(lambda: drv.cuStreamSynchronize(st), 2000)
            r["raw cuCtxSynchronize (idle) us"] = median_us(lambda: drv.cuCtxSynchronize(), 2000)

        def backend_one() -> None:
            be.launch(tok, g, b, b"", 0, bq, bounds=())
            be.synchronize(bq)
        mapped = bool(getattr(be, "_record_host", 0))
        r[f"backend launch+sync(queue) us [record: {'mapped host' if mapped else 'default'}]"] = \
            median_us(backend_one, 2000)
        r["backend launch only us"] = median_us(lambda: be.launch(tok, g, b, b"", 0, bq, bounds=()), 2000)
        be.synchronize(None)
        ops = getattr(be, "_ops", {})
        if isinstance(ops, dict) and "host_alloc" in ops:
            # the other record placements, as a backend without mapped host memory has them
            # (each a fresh record: the old one is left allocated, this is a probe)
            saved = {key: ops.pop(key) for key in ("host_alloc_mapped", "host_alloc") if key in ops}
            ops["host_alloc"] = saved["host_alloc"]
            be._record = be._mirror = None       # type: ignore[attr-defined]
            r["backend launch+sync(queue) us [record: device + pinned mirror]"] = median_us(backend_one, 2000)
            del ops["host_alloc"]
            be._record = be._mirror = None       # type: ignore[attr-defined]
            r["backend launch+sync(queue) us [record: device, sync copy after]"] = median_us(backend_one, 2000)
            ops.update(saved)
            be._record = be._mirror = None       # type: ignore[attr-defined]
            be.launch(tok, g, b, b"", 0, bq, bounds=())
            be.synchronize(None)
        if hasattr(be, "_checked_pending"):
            def backend_nocheck() -> None:
                be.launch(tok, g, b, b"", 0, bq, bounds=())
                be._checked_pending = False      # type: ignore[attr-defined]
                be.synchronize(bq)
            r["backend launch+sync(queue) us [record: not read]"] = median_us(backend_nocheck, 2000)

        def backend_batch() -> None:
            for _ in range(LAUNCHES):
                be.launch(tok, g, b, b"", 0, bq, bounds=())
            be.synchronize(bq)
        r["backend batched us/launch"] = median_us(backend_batch, 10, LAUNCHES)

        def session_one() -> None:
            s.launch(self.khandle, g, b, b"", 0, q)
            s.synchronize()
        r["session launch+sync() us"] = median_us(session_one, 2000)
        r["session launch only us"] = median_us(lambda: s.launch(self.khandle, g, b, b"", 0, q), 2000)
        s.synchronize()

        def session_batch() -> None:
            for _ in range(LAUNCHES):
                s.launch(self.khandle, g, b, b"", 0, q)
            s.synchronize()
        r["session batched us/launch"] = median_us(session_batch, 10, LAUNCHES)

        def exec_one() -> None:
            ex.execute(launch)
            ex.execute(fence)
        r["executor LAUNCH+FENCE us"] = median_us(exec_one, 2000)
        r["executor LAUNCH only us"] = median_us(lambda: ex.execute(launch), 2000)
        ex.execute(fence)
        plans = getattr(ex, "max_plans", None)         # None: a tree before the plan cache
        if plans is not None:
            ex.max_plans = 0                             # every LAUNCH checked in full
            ex.forget_plans()
            r["executor LAUNCH only us [no plan cache]"] = median_us(lambda: ex.execute(launch), 2000)
            ex.max_plans = plans
            ex.execute(fence)
        r["executor FENCE (nothing issued) us"] = median_us(lambda: ex.execute(fence), 2000)

        def exec_batch() -> None:
            for _ in range(LAUNCHES):
                ex.execute(launch)
            ex.execute(fence)
        r["executor batched us/launch"] = median_us(exec_batch, 10, LAUNCHES)
        r["profile executor batched launches"] = profile(exec_batch, 3)
        r["profile executor LAUNCH+FENCE"] = profile(lambda: [exec_one() for _ in range(300)], 1)

    # -- copies ------------------------------------------------------------------------------
    def copies(self) -> None:
        r = self.results
        s, ex, d = self.session, self.executor, self.dptr
        q = ex.queue
        for direction, op in (("htod", abi.Opcode.MEM_COPY_HTOD), ("dtoh", abi.Opcode.MEM_COPY_DTOH)):
            small = self._desc(op, d, sg=(RAM_BASE, 64))        # 64 bytes: the per-command cost

            def exec_small(desc: tuple[int, ...] = small) -> None:
                ex.defer_sync = True
                for _ in range(64):
                    ex.execute(desc)
                ex.sync_pending = False
                ex.synchronize_deferred()
                ex.defer_sync = False
            r[f"executor {direction} 64 B x64 us/copy"] = median_us(exec_small, 200, 64)
        for size, k in COPIES:
            tag = f"{size // KiB} KiB x{k}" if size < MiB else f"{size // MiB} MiB x{k}"
            reps = max(5, 400 // k)
            for direction in ("htod", "dtoh"):
                op = abi.Opcode.MEM_COPY_HTOD if direction == "htod" else abi.Opcode.MEM_COPY_DTOH
                desc = self._desc(op, d, sg=(RAM_BASE, size))

                def exec_batch(desc: tuple[int, ...] = desc, k: int = k) -> None:
                    ex.defer_sync = True
                    for _ in range(k):
                        ex.execute(desc)
                    ex.sync_pending = False
                    ex.synchronize_deferred()
                    ex.defer_sync = False
                r[f"executor {direction} {tag} GB/s"] = k * size / median_us(exec_batch, reps) / 1e3
                fn = s.copy_htod_address if direction == "htod" else s.copy_dtoh_address
                hb = self.host_base

                def session_batch(fn: Any = fn, size: int = size, k: int = k, direction: str = direction,
                                  hb: int = hb) -> None:
                    for _ in range(k):
                        if direction == "htod":
                            fn(d, hb, size, q)
                        else:
                            fn(hb, d, size, q)
                    s.synchronize()
                r[f"session {direction} {tag} GB/s"] = k * size / median_us(session_batch, reps) / 1e3
                if self.cuda:
                    drv, st = self.drv, self.raw_stream
                    for label, host in (("cuMemAllocHost", self.raw_host), ("registered memfd", hb)):
                        copy = drv.cuMemcpyHtoDAsync if direction == "htod" else drv.cuMemcpyDtoHAsync

                        def raw_batch(copy: Any = copy, host: int = host, size: int = size, k: int = k,
                                      direction: str = direction, drv: Any = drv, st: Any = st) -> None:
                            for _ in range(k):
                                if direction == "htod":
                                    copy(d, host, size, st)
                                else:
                                    copy(host, d, size, st)
                            drv.cuStreamSynchronize(st)
                        r[f"raw {label} {direction} {tag} GB/s"] = k * size / median_us(raw_batch, reps) / 1e3
                if size == 64 * KiB and direction == "htod":
                    r[f"profile executor {direction} {tag}"] = profile(lambda f=exec_batch: [f() for _ in range(20)], 1)


    def host_record(self) -> None:
        """A contained fault through the backend's record (CUDA: mapped host memory), twice, then
        an in-bounds launch that must not fault."""
        import struct

        from vxpu.accel.backend import KernelFaultError
        r, be = self.results, self.backend
        with open(os.path.join(os.path.dirname(__file__), "..", "examples", "kernels", "saxpy.vxir")) as fh:
            saxpy = fh.read()
        module = be.load_module(encode(parse(saxpy)))
        kernel, info = be.get_kernel(module, "saxpy")
        n = 1024
        x, y = be.alloc(4 * n), be.alloc(4 * n)
        args = bytearray(info.args_size)
        struct.pack_into("<i", args, info.param_offsets[0], 2 * n)
        struct.pack_into("<f", args, info.param_offsets[1], 2.0)
        struct.pack_into("<Q", args, info.param_offsets[2], x)
        struct.pack_into("<Q", args, info.param_offsets[3], y)
        r["fault record in mapped host memory"] = bool(getattr(be, "_record_host", 0))
        for name, bounds in (("OOB saxpy", ((x, 4 * n), (y, 4 * n))), ("OOB saxpy again", ((x, 4 * n), (y, 4 * n)))):
            be.launch(kernel, (8, 1, 1), (256, 1, 1), bytes(args), 0, self.bqueue, bounds=bounds)
            try:
                be.synchronize(self.bqueue)
                r[f"record: {name}"] = "NOT reported"
            except KernelFaultError as exc:
                r[f"record: {name}"] = f"reported: {exc}"
        struct.pack_into("<i", args, info.param_offsets[0], n)          # in bounds: no fault
        be.launch(kernel, (8, 1, 1), (256, 1, 1), bytes(args), 0, self.bqueue, bounds=((x, 4 * n), (y, 4 * n)))
        be.synchronize(self.bqueue)
        r["record: in-bounds saxpy after"] = "no fault"


def profile(fn: Callable[[], Any], reps: int, top: int = 14) -> str:
    """The top functions by own time over ``reps`` calls of ``fn``."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
    return "\n".join(lines[start:start + top + 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    probe = Probe(args.backend)
    probe.launches()
    probe.copies()
    if probe.cuda:
        probe.host_record()
    for key, value in probe.results.items():
        if isinstance(value, str):
            print(f"== {key}\n{value}")
        elif isinstance(value, float):
            print(f"{key:<58} {value:10.2f}")
        else:
            print(f"{key:<58} {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(probe.results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
