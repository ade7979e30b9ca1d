"""Benchmark: the CUDA backend against raw ``cuda.bindings.driver`` calls on the same GPU.

Three questions, each answered by a ratio to a native baseline measured in the same process,
interleaved in blocks so that clock drift and noise hit both sides alike:

1. **Copies from guest RAM.** A memfd ``MAP_SHARED`` mapping (what QEMU hands the server) is
   registered through :meth:`CudaBackend.register_host`; ``copy_htod``/``copy_dtoh`` on slices of
   it are timed against ``cuMemcpyHtoD``/``DtoH`` on ``cuMemAllocHost`` memory with integer
   addresses, 4 KiB to 256 MiB. Ratio = backend bandwidth / native bandwidth (target ≥ 0.97).
2. **Launch latency.** Backend ``launch`` + ``synchronize(queue)`` against raw ``cuLaunchKernel`` +
   ``cuStreamSynchronize`` on a non-blocking stream, same empty kernel (with no arguments and
   with one pointer argument). Ratio = backend / native time (target ≤ 1.2). The async submit
   cost (launch only, many back to back) is reported too.
3. **Registration cost** of a 1 GiB memfd mapping: ``register_host`` and ``unregister_host``.

Usage: ``python benchmarks/bench_cuda_backend.py [--json FILE] [--quick]``. Needs an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import struct
import sys
import time
from typing import Any

from vxpu.accel.backend import ModuleKind
from vxpu.accel.cuda import CudaBackend

PTX = b"""
.version 8.0
.target sm_90
.address_size 64
.visible .entry empty() { ret; }
.visible .entry empty1(.param .u64 p) { ret; }
"""

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 256 * MiB)


def reps_for(size: int, quick: bool) -> int:
    reps = 4000 if size <= 64 * KiB else 400 if size <= 1 * MiB else 60 if size <= 16 * MiB else 12
    return max(reps // 8, 4) if quick else reps


def check(result: tuple[Any, ...]) -> Any:
    err = result[0]
    if err:
        raise RuntimeError(f"CUDA call failed: {err.name}")
    return result[1] if len(result) == 2 else result[1:]


def interleave(funcs: list[Any], reps: int, block: int) -> list[list[float]]:
    """Per-call wall times of each function, running them in alternating blocks of ``block``."""
    times: list[list[float]] = [[] for _ in funcs]
    clock = time.perf_counter
    done = 0
    while done < reps:
        n = min(block, reps - done)
        for f, out in zip(funcs, times):
            for _ in range(n):
                t0 = clock()
                f()
                out.append(clock() - t0)
        done += n
    return times


def memfd_map(size: int) -> mmap.mmap:
    fd = os.memfd_create("vxpu-bench-guest-ram")
    os.ftruncate(fd, size)
    region = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    for off in range(0, size, 1 << 20):  # fault the pages in, as a running guest's RAM would be
        region[off] = 1
    return region


def bench_copies(gpu: CudaBackend, drv: Any, quick: bool) -> list[dict[str, Any]]:
    top = max(SIZES)
    region = memfd_map(top)
    view = memoryview(region)
    token = gpu.register_host(view)
    native_host = int(check(drv.cuMemAllocHost(top)))
    dptr = gpu.alloc(top)
    rows = []
    try:
        for size in SIZES:
            reps = reps_for(size, quick)
            sl = view[:size]
            for direction in ("htod", "dtoh"):
                if direction == "htod":
                    def ours(s=sl, d=dptr) -> None:
                        gpu.copy_htod(d, s)

                    def ours_addr(h=token.address, d=dptr, n=size) -> None:
                        gpu.copy_htod_address(d, h, n)

                    def native(h=native_host, d=dptr, n=size) -> None:
                        drv.cuMemcpyHtoD(d, h, n)

                    def raw_memfd(h=token.address, d=dptr, n=size) -> None:
                        drv.cuMemcpyHtoD(d, h, n)
                else:
                    def ours(s=sl, d=dptr) -> None:
                        gpu.copy_dtoh(s, d)

                    def ours_addr(h=token.address, d=dptr, n=size) -> None:
                        gpu.copy_dtoh_address(h, d, n)

                    def native(h=native_host, d=dptr, n=size) -> None:
                        drv.cuMemcpyDtoH(h, d, n)

                    def raw_memfd(h=token.address, d=dptr, n=size) -> None:
                        drv.cuMemcpyDtoH(h, d, n)
                funcs = [ours, ours_addr, native, raw_memfd]
                interleave(funcs, min(reps, 20), 5)  # warm-up
                t_ours, t_addr, t_native, t_raw = interleave(funcs, reps, max(reps // 10, 2))
                m_ours, m_addr, m_native, m_raw = (statistics.median(t) for t in (t_ours, t_addr, t_native, t_raw))
                rows.append({
                    "size": size, "direction": direction, "pinned": bool(token.pinned),
                    "backend_gbps": size / m_ours / 1e9, "backend_addr_gbps": size / m_addr / 1e9,
                    "native_gbps": size / m_native / 1e9,
                    "backend_us": m_ours * 1e6, "backend_addr_us": m_addr * 1e6, "native_us": m_native * 1e6,
                    "raw_memfd_us": m_raw * 1e6, "raw_memfd_gbps": size / m_raw / 1e9,
                    "ratio": m_native / m_ours, "ratio_addr": m_native / m_addr, "reps": reps,
                })
            sl.release()
    finally:
        gpu.free(dptr)
        drv.cuMemFreeHost(native_host)
        gpu.unregister_host(token)
        view.release()
        region.close()
    return rows


def bench_launch(gpu: CudaBackend, drv: Any, quick: bool) -> list[dict[str, Any]]:
    import ctypes

    reps = 4000 if quick else 20000
    module = gpu.load_module(PTX, ModuleKind.PTX)
    queue = gpu.create_queue()
    raw_mod = check(drv.cuModuleLoadData(PTX + b"\0"))
    raw_stream = check(drv.cuStreamCreate(drv.CUstream_flags.CU_STREAM_NON_BLOCKING))
    dev = gpu.alloc(256)
    rows = []
    for kname, args in (("empty", b""), ("empty1", struct.pack("<Q", dev))):
        kernel, _ = gpu.get_kernel(module, kname)
        raw_f = check(drv.cuModuleGetFunction(raw_mod, kname.encode()))
        holder = ctypes.c_uint64(dev)
        ptrs = (ctypes.c_void_p * 1)(ctypes.addressof(holder))
        raw_params = ctypes.addressof(ptrs) if args else 0

        def ours(k=kernel, a=args) -> None:
            gpu.launch(k, (1, 1, 1), (32, 1, 1), a, 0, queue)
            gpu.synchronize(queue)

        def native(f=raw_f, p=raw_params) -> None:
            drv.cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, raw_stream, p, 0)
            drv.cuStreamSynchronize(raw_stream)

        interleave([ours, native], 500, 50)
        t_ours, t_native = interleave([ours, native], reps, 500)
        rows.append(_launch_row(f"{kname}: launch+sync", t_ours, t_native, reps))

        def ours_async(k=kernel, a=args) -> None:
            gpu.launch(k, (1, 1, 1), (32, 1, 1), a, 0, queue)

        def native_async(f=raw_f, p=raw_params) -> None:
            drv.cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, raw_stream, p, 0)

        batch = 1000
        t_ours, t_native = [], []
        for _ in range(reps // batch):
            t0 = time.perf_counter()
            for _ in range(batch):
                ours_async()
            t_ours.append((time.perf_counter() - t0) / batch)
            gpu.synchronize(queue)
            t0 = time.perf_counter()
            for _ in range(batch):
                native_async()
            t_native.append((time.perf_counter() - t0) / batch)
            drv.cuStreamSynchronize(raw_stream)
        rows.append(_launch_row(f"{kname}: async submit", t_ours, t_native, reps))
    gpu.free(dev)
    gpu.destroy_queue(queue)
    gpu.unload_module(module)
    drv.cuStreamDestroy(raw_stream)
    drv.cuModuleUnload(raw_mod)
    return rows


def _launch_row(what: str, t_ours: list[float], t_native: list[float], reps: int) -> dict[str, Any]:
    t_ours.sort()
    t_native.sort()
    return {
        "what": what, "reps": reps,
        "backend_us": statistics.median(t_ours) * 1e6, "native_us": statistics.median(t_native) * 1e6,
        "backend_p99_us": t_ours[int(len(t_ours) * 0.99) - 1] * 1e6,
        "native_p99_us": t_native[int(len(t_native) * 0.99) - 1] * 1e6,
        "ratio": statistics.median(t_ours) / statistics.median(t_native),
    }


def bench_register(gpu: CudaBackend, quick: bool) -> dict[str, Any]:
    size = 256 * MiB if quick else 1 * GiB
    region = memfd_map(size)
    view = memoryview(region)
    reg, unreg = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        token = gpu.register_host(view)
        t1 = time.perf_counter()
        pinned = token.pinned
        gpu.unregister_host(token)
        t2 = time.perf_counter()
        if not pinned:
            raise RuntimeError("cuMemHostRegister refused the region; see the log")
        reg.append(t1 - t0)
        unreg.append(t2 - t1)
    view.release()
    region.close()
    scale = GiB / size
    return {"size": size, "register_ms_per_gib": statistics.median(reg) * 1e3 * scale,
            "unregister_ms_per_gib": statistics.median(unreg) * 1e3 * scale}


def print_table(result: dict[str, Any]) -> None:
    print(f"device: {result['device']}  driver {result['driver_version']}  cuda-bindings {result['bindings']}")
    print("\ncopies (registered memfd via backend vs cuMemAllocHost via raw driver), wall clock, median")
    print("(view: copy_htod/copy_dtoh on a memoryview slice; addr: copy_*_address on the registered region;")
    print(" raw-memfd: raw cuMemcpy* on the same registered memfd address, i.e. the cost of the memory itself)")
    print(f"{'size':>9} {'dir':>5} {'view GB/s':>10} {'addr GB/s':>10} {'native GB/s':>12} {'ratio':>6} "
          f"{'r.addr':>6} {'view us':>8} {'addr us':>8} {'native us':>10} {'raw-memfd us':>12}")
    for r in result["copies"]:
        print(f"{_size(r['size']):>9} {r['direction']:>5} {r['backend_gbps']:10.2f} {r['backend_addr_gbps']:10.2f} "
              f"{r['native_gbps']:12.2f} {r['ratio']:6.3f} {r['ratio_addr']:6.3f} {r['backend_us']:8.2f} "
              f"{r['backend_addr_us']:8.2f} {r['native_us']:10.2f} {r['raw_memfd_us']:12.2f}")
    print("\nlaunch (1 block x 32 threads, non-blocking stream), median per launch")
    print(f"{'path':>24} {'backend us':>11} {'native us':>10} {'ratio':>6} {'b p99':>7} {'n p99':>7}")
    for r in result["launch"]:
        print(f"{r['what']:>24} {r['backend_us']:11.2f} {r['native_us']:10.2f} {r['ratio']:6.3f} "
              f"{r['backend_p99_us']:7.2f} {r['native_p99_us']:7.2f}")
    reg = result["register"]
    print(f"\nregistration ({_size(reg['size'])} memfd): register {reg['register_ms_per_gib']:.2f} ms/GiB, "
          f"unregister {reg['unregister_ms_per_gib']:.2f} ms/GiB")


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    args = parser.parse_args(argv)
    from importlib.metadata import version

    from cuda.bindings import driver

    gpu = CudaBackend(0)
    gpu.open()
    result: dict[str, Any] = {"device": gpu.properties().name, "driver_version": gpu.driver_version,
                              "bindings": version("cuda-bindings")}
    result["register"] = bench_register(gpu, args.quick)
    result["copies"] = bench_copies(gpu, driver, args.quick)
    result["launch"] = bench_launch(gpu, driver, args.quick)
    gpu.close()
    print_table(result)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
