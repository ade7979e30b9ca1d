"""Native 1 MiB x16 device->host copies into the same memfd pages through N mappings at
different virtual addresses (each 2 MiB aligned and registered with ``cuMemHostRegister``), and
into one ``cuMemAllocHost`` buffer: the median time per batch of each mapping in three rounds.

On the H200 (session 5) each mapping keeps its own speed round after round, 339-345 us for the
same pages, and so does ``cuMemAllocHost`` memory; host->device copies do not vary. This is why
``bench_sdk.py --buffers N`` spreads copies over several buffers a side.
    N=32 python benchmarks/probe_va_sweep.py
"""
import ctypes, mmap, os, statistics, time
from cuda.bindings import driver as drv

def ok(r):
    if int(r[0]): raise RuntimeError(r[0])
    return r[1] if len(r) > 1 else None
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
MiB, K, M2 = 1 << 20, 16, 2 << 20
N = int(os.environ.get("N", "32"))
SIZE = 16 * MiB
ok(drv.cuInit(0)); ctx = ok(drv.cuDevicePrimaryCtxRetain(ok(drv.cuDeviceGet(0)))); ok(drv.cuCtxSetCurrent(ctx))
st = ok(drv.cuStreamCreate(1))
dptr = int(ok(drv.cuMemAlloc(MiB)))
fd = os.memfd_create("ram", os.MFD_CLOEXEC); os.ftruncate(fd, SIZE)
maps = []
for i in range(N):
    res = libc.mmap(None, SIZE + 2 * M2, 0, 0x22, -1, 0)
    addr = (res + M2 - 1) // M2 * M2
    assert libc.mmap(addr, SIZE, 3, 0x11, fd, 0) == addr
    if i == 0: ctypes.memset(addr, 0, SIZE)
    ok(drv.cuMemHostRegister(addr, SIZE, drv.CU_MEMHOSTREGISTER_PORTABLE))
    maps.append(addr + 4 * MiB)
alloc = int(ok(drv.cuMemAllocHost(MiB)))
def batch(h):
    for _ in range(K): drv.cuMemcpyDtoHAsync(h, dptr, MiB, st)
    drv.cuStreamSynchronize(st)
t = {a: [] for a in maps + [alloc]}
for rnd in range(3):
    for a in t:
        batch(a)
        for _ in range(8):
            t0 = time.perf_counter(); batch(a); t[a].append(time.perf_counter() - t0)
print("dptr", hex(dptr), "alloc", hex(alloc))
for a, v in t.items():
    r = [statistics.median(v[i * 8:(i + 1) * 8]) * 1e6 for i in range(3)]
    print(f"{a:#x} bits21-31 {(a >> 21) & 0x7ff:#05x}", " ".join(f"{x:.1f}" for x in r))
