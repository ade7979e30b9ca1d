"""Native copies from the two kinds of pinned host memory, in one run: ``cuMemHostAlloc``
memory (what bench_sdk's native side copies from) against a memfd mapped shared and pinned with
``cuMemHostRegister`` (what guest RAM is to the CUDA backend). Same stream, same sizes and batch
shapes as bench_sdk (64 KiB x64, 1 MiB x16, 16 MiB x4, then a stream synchronize), alternated
in blocks; prints the median time per batch of each and their ratio. It separates what the kind
of memory costs the driver and the copy engines from what the device path adds.

    python benchmarks/bench_hostmem.py [--reps 200] [--json FILE]
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

from cuda.bindings import driver as drv

SHAPES = ((64 << 10, 64), (1 << 20, 16), (16 << 20, 4))


def ok(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json")
    ap.add_argument("--thp", action="store_true", help="madvise(MADV_HUGEPAGE) the memfd mapping first")
    args = ap.parse_args()
    ok(drv.cuInit(0))
    ctx = ok(drv.cuDevicePrimaryCtxRetain(ok(drv.cuDeviceGet(0))))
    ok(drv.cuCtxSetCurrent(ctx))
    stream = ok(drv.cuStreamCreate(1))
    size = max(s for s, _ in SHAPES)
    pinned = ok(drv.cuMemHostAlloc(size, 0))
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    if args.thp:                    # transparent huge pages for the memfd, where the host allows them
        mm.madvise(mmap.MADV_HUGEPAGE)
    mm.write(b"\0" * size)
    reg = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    ok(drv.cuMemHostRegister(reg, size, drv.CU_MEMHOSTREGISTER_PORTABLE))
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as fh:
            thp = fh.read().strip()
    except OSError:
        thp = "?"
    with open(f"/proc/{os.getpid()}/smaps_rollup") as fh:
        smaps = fh.read()
    shmem_huge = next((ln.split()[1] for ln in smaps.splitlines() if ln.startswith("ShmemPmdMapped")), "?")
    print(f"shmem_enabled: {thp}; madvise(MADV_HUGEPAGE): {args.thp}; ShmemPmdMapped: {shmem_huge} kB", flush=True)
    dev = ok(drv.cuMemAlloc(size))
    rows = []
    for nbytes, k in SHAPES:
        for direction in ("htod", "dtoh"):
            def batch(host: int, k: int = k, direction: str = direction, nbytes: int = nbytes) -> float:
                t0 = time.perf_counter()
                for _ in range(k):
                    if direction == "htod":
                        ok(drv.cuMemcpyHtoDAsync(dev, host, nbytes, stream))
                    else:
                        ok(drv.cuMemcpyDtoHAsync(host, dev, nbytes, stream))
                ok(drv.cuStreamSynchronize(stream))
                return time.perf_counter() - t0
            reps = max(10, args.reps // k * 4)
            ta, tb = [], []
            for _ in range(3):
                batch(int(pinned)), batch(reg)
            for i in range(0, reps, 10):
                ta += [batch(int(pinned)) for _ in range(10)]
                tb += [batch(reg) for _ in range(10)]
            a, b = statistics.median(ta), statistics.median(tb)
            rows.append({"what": f"{direction} {nbytes >> 10} KiB x{k}", "hostalloc_us": a * 1e6,
                         "registered_memfd_us": b * 1e6, "ratio": a / b})
            print(f"{rows[-1]['what']:>22}: cuMemHostAlloc {a * 1e6:9.1f} us, registered memfd {b * 1e6:9.1f} us, "
                  f"ratio {a / b:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    ok(drv.cuMemHostUnregister(reg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
