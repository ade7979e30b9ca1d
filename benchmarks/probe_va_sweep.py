"""Native 1 MiB x16 device->host copies on the H200: how their speed depends on where the host
buffer lies, in three sweeps, each the median time per batch of every buffer in three rounds:

* **mappings**: the same memfd pages through N mappings at different virtual addresses (each
  2 MiB aligned and registered with ``cuMemHostRegister``), and one ``cuMemAllocHost`` buffer;
* **offsets**: one registered 256 MiB mapping, a buffer every 4 MiB (different pages);
* **fine**: one 1 MiB buffer at 16 offsets 64 KiB apart inside that mapping.

On the H200 (sessions 5 and 6; the offset sweeps in 6) each buffer keeps its own speed round after round: 338-347 us
per batch for the same pages through different mappings, the same spread across a mapping's
offsets, and 3-5 us between the fastest and slowest of 16 start offsets 64 KiB apart; a
registered buffer's device pointer is its host address (unified addressing), so the
device-side address is what differs.
Host->device copies do not vary. This is why ``bench_sdk.py --buffers N`` spreads copies over
several buffers a side.

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

KiB, MiB, M2 = 1 << 10, 1 << 20, 2 << 20
BATCH, SIZE, BIG, ROUNDS, REPS = 16, 16 * MiB, 256 * MiB, 3, 8
PROT_NONE, PROT_RW = 0, 3
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20


def ok(result: Any) -> Any:
    if int(result[0]):
        raise RuntimeError(f"CUDA call failed: {result[0]}")
    return result[1] if len(result) > 1 else None


def aligned_mapping(libc: ctypes.CDLL, fd: int, size: int) -> int:
    """``fd``'s first ``size`` bytes mapped shared at a fresh 2 MiB-aligned address."""
    spare = libc.mmap(None, size + 2 * M2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    addr = (spare + M2 - 1) // M2 * M2
    if libc.mmap(addr, size, PROT_RW, MAP_SHARED | MAP_FIXED, fd, 0) != addr:
        raise OSError(ctypes.get_errno(), "mmap MAP_FIXED failed")
    return addr


def measure(batch: Any, targets: list[int]) -> dict[int, list[float]]:
    """Each target's median microseconds per batch in each of ROUNDS rounds."""
    times: dict[int, list[float]] = {host: [] for host in targets}
    for _ in range(ROUNDS):
        for host, rounds in times.items():
            batch(host)
            rounds.append(statistics.median(batch(host) for _ in range(REPS)) * 1e6)
    return times


def report(name: str, times: dict[int, list[float]]) -> None:
    print(f"== {name}")
    for host, rounds in times.items():
        print(f"{host:#x}", " ".join(f"{us:.1f}" for us in rounds), "us per batch")
    medians = sorted(statistics.median(rounds) for rounds in times.values())
    print(f"   min {medians[0]:.1f}  median {statistics.median(medians):.1f}  max {medians[-1]:.1f} us")


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    ok(drv.cuInit(0))
    ok(drv.cuCtxSetCurrent(ok(drv.cuDevicePrimaryCtxRetain(ok(drv.cuDeviceGet(0))))))
    stream = ok(drv.cuStreamCreate(1))
    dptr = int(ok(drv.cuMemAlloc(MiB)))
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, BIG)
    mappings = []
    for i in range(int(os.environ.get("N", "32"))):
        addr = aligned_mapping(libc, fd, SIZE)
        if i == 0:
            ctypes.memset(addr, 0, SIZE)
        ok(drv.cuMemHostRegister(addr, SIZE, drv.CU_MEMHOSTREGISTER_PORTABLE))
        mappings.append(addr + 4 * MiB)
    alloc = int(ok(drv.cuMemAllocHost(MiB)))
    big = aligned_mapping(libc, fd, BIG)
    ctypes.memset(big, 0, BIG)
    ok(drv.cuMemHostRegister(big, BIG, drv.CU_MEMHOSTREGISTER_PORTABLE))

    def batch(host: int) -> float:
        t0 = time.perf_counter()
        for _ in range(BATCH):
            drv.cuMemcpyDtoHAsync(host, dptr, MiB, stream)
        drv.cuStreamSynchronize(stream)
        return time.perf_counter() - t0

    print(f"device buffer {dptr:#x}; a registered buffer's device pointer is its host address: "
          f"{int(ok(drv.cuMemHostGetDevicePointer(big, 0))) == big}")
    report(f"mappings: the same pages at {len(mappings)} addresses; cuMemAllocHost last",
           measure(batch, mappings + [alloc]))
    report("offsets: one mapping, a buffer every 4 MiB", measure(batch, [big + i * 4 * MiB for i in range(60)]))
    report("fine: one buffer at start offsets 64 KiB apart", measure(batch, [big + 8 * MiB + j * 64 * KiB
                                                                             for j in range(16)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
