"""Native 1 MiB x16 device->host copies into the same memfd pages through N mappings at
different virtual addresses (each 2 MiB aligned and registered with ``cuMemHostRegister``), and
into one ``cuMemAllocHost`` buffer: the median time per batch of each mapping in three rounds.

On the H200 (session 5) each mapping keeps its own speed round after round, 339-345 us for the
same pages, and so does ``cuMemAllocHost`` memory; host->device copies do not vary. This is why
``bench_sdk.py --buffers N`` spreads copies over several buffers a side.

Usage: ``N=32 python benchmarks/probe_va_sweep.py`` (needs ``cuda-python`` and a GPU).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from typing import Any

from cuda.bindings import driver as drv

MiB, M2 = 1 << 20, 2 << 20
BATCH, SIZE, ROUNDS, REPS = 16, 16 * MiB, 3, 8
PROT_NONE, PROT_RW = 0, 3
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20


def ok(result: Any) -> Any:
    if int(result[0]):
        raise RuntimeError(f"CUDA call failed: {result[0]}")
    return result[1] if len(result) > 1 else None


def aligned_mapping(libc: ctypes.CDLL, fd: int) -> int:
    """``fd``'s first SIZE bytes mapped shared at a fresh 2 MiB-aligned address."""
    spare = libc.mmap(None, SIZE + 2 * M2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    addr = (spare + M2 - 1) // M2 * M2
    if libc.mmap(addr, SIZE, PROT_RW, MAP_SHARED | MAP_FIXED, fd, 0) != addr:
        raise OSError(ctypes.get_errno(), "mmap MAP_FIXED failed")
    return addr


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    ok(drv.cuInit(0))
    ok(drv.cuCtxSetCurrent(ok(drv.cuDevicePrimaryCtxRetain(ok(drv.cuDeviceGet(0))))))
    stream = ok(drv.cuStreamCreate(1))
    dptr = int(ok(drv.cuMemAlloc(MiB)))
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    targets = []
    for i in range(int(os.environ.get("N", "32"))):
        addr = aligned_mapping(libc, fd)
        if i == 0:
            ctypes.memset(addr, 0, SIZE)
        ok(drv.cuMemHostRegister(addr, SIZE, drv.CU_MEMHOSTREGISTER_PORTABLE))
        targets.append(addr + 4 * MiB)
    alloc = int(ok(drv.cuMemAllocHost(MiB)))
    targets.append(alloc)

    def batch(host: int) -> float:
        t0 = time.perf_counter()
        for _ in range(BATCH):
            drv.cuMemcpyDtoHAsync(host, dptr, MiB, stream)
        drv.cuStreamSynchronize(stream)
        return time.perf_counter() - t0

    times: dict[int, list[float]] = {host: [] for host in targets}
    for _ in range(ROUNDS):
        for host, samples in times.items():
            batch(host)
            samples += [batch(host) for _ in range(REPS)]
    print(f"device buffer {dptr:#x}; cuMemAllocHost buffer {alloc:#x} (last line)")
    for host, samples in times.items():
        rounds = [statistics.median(samples[r * REPS:(r + 1) * REPS]) * 1e6 for r in range(ROUNDS)]
        print(f"{host:#x}", " ".join(f"{us:.1f}" for us in rounds), "us per batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
