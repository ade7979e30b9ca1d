"""The range allocator and the memory pool: best fit, coalescing, chunking and statistics."""

from __future__ import annotations

import random

import pytest
from vxpu.accel.backend import BackendError, Status
from vxpu.accel.pool import MemoryPool, RangeAllocator


class FakeDevice:
    """A device allocator with a byte budget, recording every call (unit test of pool logic)."""

    def __init__(self, budget: int = 1 << 40) -> None:
        self.budget = budget
        self.live: dict[int, int] = {}
        self.next = 1 << 32
        self.calls: list[tuple[str, int]] = []

    def alloc(self, size: int) -> int:
        self.calls.append(("alloc", size))
        if sum(self.live.values()) + size > self.budget:
            raise BackendError(Status.OUT_OF_MEMORY, "fake device full")
        address, self.next = self.next, self.next + size + 4096
        self.live[address] = size
        return address

    def free(self, address: int) -> None:
        self.calls.append(("free", address))
        del self.live[address]


def test_range_allocator_best_fit_and_coalescing():
    r = RangeAllocator(0, 4096, alignment=256)
    a, b, c, d = (r.alloc(256) for _ in range(4))
    assert (a, b, c, d) == (0, 256, 512, 768)
    r.free(b)
    r.free(d)                             # free: [256,512) and [768,4096)
    assert r.alloc(200) == 256            # best fit picks the small hole, not the big tail
    r.free(256)
    r.free(c)                             # merges [256,512)+[512,768)+[768,4096)
    assert r.free_blocks == 1 and r.largest_free == 4096 - 256
    r.free(a)
    assert r.free_blocks == 1 and r.largest_free == 4096 and r.used_bytes == 0
    with pytest.raises(KeyError):
        r.free(a)


def test_range_allocator_exhaustion_and_random_churn():
    r = RangeAllocator(1 << 16, 1 << 20, alignment=256)
    rng = random.Random(7)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and rng.random() < 0.45:
            addr = rng.choice(list(live))
            assert r.free(addr) == live.pop(addr)
        else:
            size = rng.randrange(1, 20000)
            addr = r.alloc(size)
            if addr is None:
                continue
            rounded = (size + 255) & ~255
            # no overlap with any live block, inside the range
            assert r.contains(addr) and addr + rounded <= r.base + r.size
            for other, osz in live.items():
                assert addr + rounded <= other or other + osz <= addr
            live[addr] = rounded
    for addr in list(live):
        r.free(addr)
    assert r.free_blocks == 1 and r.free_bytes == r.size
    assert r.alloc(r.size + 1) is None


def test_pool_sub_allocates_from_one_chunk():
    dev = FakeDevice()
    pool = MemoryPool(dev.alloc, dev.free, chunk_size=1 << 20)
    addrs = [pool.alloc(1000) for _ in range(100)]
    assert len(set(addrs)) == 100
    assert dev.calls == [("alloc", 1 << 20)]
    s = pool.stats()
    assert s.bytes_in_use == 100 * 1024 and s.live_allocations == 100 and s.chunks == 1
    assert s.total_allocations == 100 and s.device_allocations == 1
    for a in addrs:
        pool.free(a)
    s = pool.stats()
    assert s.bytes_in_use == 0 and s.peak_bytes_in_use == 100 * 1024 and s.total_frees == 100
    assert s.chunks == 1 and s.fragmentation == 0.0      # one idle chunk kept, fully coalesced


def test_pool_large_allocations_go_direct():
    dev = FakeDevice()
    pool = MemoryPool(dev.alloc, dev.free, chunk_size=1 << 20)
    big = pool.alloc(3 << 20)
    assert dev.calls == [("alloc", 3 << 20)]
    assert pool.stats().direct_allocations == 1 and pool.size_of(big) == 3 << 20
    pool.free(big)
    assert dev.calls[-1] == ("free", big) and pool.stats().bytes_reserved == 0


def test_pool_fragmentation_statistic():
    dev = FakeDevice()
    pool = MemoryPool(dev.alloc, dev.free, chunk_size=1 << 16, large_threshold=1 << 16)
    blocks = [pool.alloc(4096) for _ in range(16)]     # fills the 64 KiB chunk exactly
    for a in blocks[::2]:
        pool.free(a)                                   # 8 separate 4 KiB holes
    s = pool.stats()
    assert s.free_blocks == 8
    assert s.fragmentation == pytest.approx(1 - 4096 / (8 * 4096))
    for a in blocks[1::2]:
        pool.free(a)
    assert pool.stats().fragmentation == 0.0 and pool.stats().free_blocks == 1


def test_pool_releases_idle_chunks_beyond_the_limit():
    dev = FakeDevice()
    pool = MemoryPool(dev.alloc, dev.free, chunk_size=1 << 16, large_threshold=1 << 16, max_idle_chunks=1)
    a = [pool.alloc(1 << 15) for _ in range(6)]       # 3 chunks
    assert pool.stats().chunks == 3
    for x in a:
        pool.free(x)
    s = pool.stats()
    assert s.chunks == 1 and s.device_frees == 2 and s.bytes_reserved == 1 << 16
    pool.trim()
    assert pool.stats().chunks == 0 and not dev.live


def test_pool_falls_back_to_exact_size_when_no_chunk_fits():
    dev = FakeDevice(budget=100_000)
    pool = MemoryPool(dev.alloc, dev.free, chunk_size=1 << 20)
    addr = pool.alloc(50_000)
    assert pool.size_of(addr) == 50_176 and pool.stats().direct_allocations == 1
    with pytest.raises(BackendError) as e:
        pool.alloc(60_000)
    assert e.value.status == Status.OUT_OF_MEMORY


def test_pool_errors_and_teardown():
    dev = FakeDevice()
    pool = MemoryPool(dev.alloc, dev.free, chunk_size=1 << 20)
    a = pool.alloc(10)
    pool.free(a)
    with pytest.raises(BackendError) as e:
        pool.free(a)
    assert e.value.status == Status.INVALID_HANDLE
    with pytest.raises(BackendError) as e:
        pool.alloc(0)
    assert e.value.status == Status.INVALID_ARGUMENT
    pool.alloc(10)
    pool.alloc(5 << 20)
    pool.release()
    assert not dev.live and pool.stats().live_allocations == 0
    pool.alloc(10)
    pool.forget()                                      # context reset: nothing freed on the device
    assert len(dev.live) == 1 and pool.stats().bytes_reserved == 0


def test_reserve_limit_falls_back_to_exact_size_then_refuses():
    """Past ``reserve_limit`` no new chunk is taken: a small request gets an exact-size device
    allocation while that fits, then QUOTA_EXCEEDED; the device never holds more than the limit."""
    dev = FakeDevice()
    pool = MemoryPool(dev.alloc, dev.free, chunk_size=1 << 20, reserve_limit=(1 << 20) + 4096)
    first = pool.alloc(600 << 10)              # takes the one chunk the limit allows
    second = pool.alloc(300 << 10)             # still fits in that chunk
    third = pool.alloc(4096)                   # the chunk has 124 KiB left: 4 KiB fits
    with pytest.raises(BackendError) as exc:
        pool.alloc(200 << 10)                  # a new chunk would pass the limit, exact size too
    assert exc.value.status == Status.QUOTA_EXCEEDED
    assert sum(dev.live.values()) <= pool.reserve_limit
    pool.free(third)
    tail = pool.alloc(100 << 10)               # the chunk's tail serves it again
    assert pool.stats().bytes_reserved <= pool.reserve_limit
    for a in (first, second, tail):
        pool.free(a)


def test_exact_size_fallback_when_a_chunk_would_not_fit_the_limit():
    dev = FakeDevice()
    pool = MemoryPool(dev.alloc, dev.free, chunk_size=1 << 20, reserve_limit=512 << 10)
    a = pool.alloc(4096)                       # a whole chunk would pass the limit: exact size
    assert ("alloc", 4096) in dev.calls and ("alloc", 1 << 20) not in dev.calls
    pool.free(a)
