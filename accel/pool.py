"""Device memory pooling: sub-allocation from a few large device allocations.

Two pieces:

* :class:`RangeAllocator` manages one address range ``[base, base + size)`` with a best-fit
  free list and coalescing of neighbours on free. It knows nothing of devices; the CPU and NPU
  backends use it directly over their host arena, and the pool uses one per chunk.
* :class:`MemoryPool` sits on a backend's ``alloc``/``free``: small requests are carved out of
  large chunks (``chunk_size``, default 32 MiB) so that a guest doing thousands of small
  allocations costs the device a handful of real ones; requests of ``large_threshold`` bytes
  or more go to the backend directly. Fully free chunks beyond ``max_idle_chunks`` go back to
  the device. :meth:`MemoryPool.stats` reports bytes in use, peak, reserved bytes,
  fragmentation and allocation counts.

Sizes are rounded up to ``alignment`` (256 bytes: enough for any vector load on every backend).
After a context reset every device allocation is gone: :meth:`MemoryPool.forget` drops the
bookkeeping without calling the backend.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass

from vxpu.accel.backend import BackendError, Status

log = logging.getLogger(__name__)

DEFAULT_ALIGNMENT = 256
DEFAULT_CHUNK_SIZE = 32 << 20
DEFAULT_MAX_IDLE_CHUNKS = 1


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


class RangeAllocator:
    """Best-fit allocation with coalescing inside one address range.

    Free blocks live in a list sorted by ``(size, start)`` (best fit = first entry that is big
    enough, found by bisection) plus two maps, start→size and end→start, that find the
    neighbours of a freed block in O(1) so adjacent free blocks merge at once.
    """

    def __init__(self, base: int, size: int, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        if base % alignment or size < alignment:
            raise ValueError(f"range base {base:#x} must be aligned to {alignment} and size {size} at least that")
        self.base = base
        self.size = size - size % alignment
        self.alignment = alignment
        self.used: dict[int, int] = {}
        self.used_bytes = 0
        self._by_size: list[tuple[int, int]] = []
        self._start_size: dict[int, int] = {}
        self._end_start: dict[int, int] = {}
        self._insert_free(base, self.size)

    def _insert_free(self, start: int, size: int) -> None:
        bisect.insort(self._by_size, (size, start))
        self._start_size[start] = size
        self._end_start[start + size] = start

    def _remove_free(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self._by_size, (size, start))
        del self._by_size[i]
        del self._start_size[start]
        del self._end_start[start + size]

    def alloc(self, size: int) -> int | None:
        """Allocate ``size`` bytes (rounded up to the alignment); ``None`` when nothing fits."""
        size = align_up(max(size, 1), self.alignment)
        i = bisect.bisect_left(self._by_size, (size, -1))
        if i == len(self._by_size):
            return None
        block_size, start = self._by_size[i]
        self._remove_free(start, block_size)
        if block_size > size:
            self._insert_free(start + size, block_size - size)
        self.used[start] = size
        self.used_bytes += size
        return start

    def free(self, start: int) -> int:
        """Free the block that starts at ``start``; returns its size.

        Raises:
            KeyError: ``start`` is not the start of a live block.
        """
        own_size = size = self.used.pop(start)
        self.used_bytes -= size
        end = start + size
        prev_start = self._end_start.get(start)
        if prev_start is not None:
            prev_size = self._start_size[prev_start]
            self._remove_free(prev_start, prev_size)
            start, size = prev_start, size + prev_size
        next_size = self._start_size.get(end)
        if next_size is not None:
            self._remove_free(end, next_size)
            size += next_size
        self._insert_free(start, size)
        return own_size

    def contains(self, address: int) -> bool:
        """Whether ``address`` lies inside this allocator's range."""
        return self.base <= address < self.base + self.size

    @property
    def free_bytes(self) -> int:
        return self.size - self.used_bytes

    @property
    def largest_free(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    @property
    def free_blocks(self) -> int:
        return len(self._by_size)

    def reset(self) -> None:
        """Free everything at once."""
        self.used.clear()
        self.used_bytes = 0
        self._by_size.clear()
        self._start_size.clear()
        self._end_start.clear()
        self._insert_free(self.base, self.size)


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's figures (all sizes in bytes, after alignment)."""

    bytes_in_use: int          # held by live allocations
    peak_bytes_in_use: int
    bytes_reserved: int        # held from the device: chunks plus direct allocations
    peak_bytes_reserved: int
    live_allocations: int
    total_allocations: int
    total_frees: int
    chunks: int
    direct_allocations: int
    device_allocations: int    # calls to the backend's alloc
    device_frees: int
    free_blocks: int           # free fragments across all chunks
    fragmentation: float       # 1 - largest free block / free bytes, over the chunks (0 = none)


class MemoryPool:
    """Sub-allocates device memory from large chunks obtained through ``device_alloc``.

    Args:
        device_alloc: the backend's ``alloc(size) -> address``; raises BackendError.
        device_free: the backend's ``free(address)``.
        chunk_size: size of each chunk requested from the device.
        large_threshold: requests of at least this size bypass the chunks.
        alignment: allocation granularity (power of two).
        max_idle_chunks: fully free chunks kept for reuse; more go back to the device.
        reserve_limit: the most bytes the pool may hold from the device (chunks plus direct
            allocations), or ``None``. Fragmentation strands free space inside chunks, so a
            client's quota on bytes *in use* alone does not bound what it holds; past the limit
            a small request falls back to an exact-size allocation, then QUOTA_EXCEEDED.
    """

    def __init__(self, device_alloc: Callable[[int], int], device_free: Callable[[int], None], *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, large_threshold: int | None = None,
                 alignment: int = DEFAULT_ALIGNMENT, max_idle_chunks: int = DEFAULT_MAX_IDLE_CHUNKS,
                 reserve_limit: int | None = None) -> None:
        if chunk_size < alignment or chunk_size % alignment:
            raise ValueError(f"chunk_size {chunk_size} must be a positive multiple of the alignment {alignment}")
        self._device_alloc = device_alloc
        self._device_free = device_free
        self.chunk_size = chunk_size
        self.large_threshold = large_threshold if large_threshold is not None else chunk_size // 2
        self.alignment = alignment
        self.max_idle_chunks = max_idle_chunks
        self.reserve_limit = reserve_limit
        self._chunks: dict[int, RangeAllocator] = {}     # chunk base -> allocator
        self._chunk_bases: list[int] = []                # sorted, to find a chunk by address
        self._owner: dict[int, RangeAllocator | None] = {}  # allocation -> chunk (None = direct)
        self._direct: dict[int, int] = {}
        self._in_use = self._peak = self._reserved = self._peak_reserved = 0
        self._allocs = self._frees = self._dev_allocs = self._dev_frees = 0

    # -- allocation -------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """Allocate ``size`` bytes; returns the device address.

        Raises:
            BackendError: INVALID_ARGUMENT for a size < 1; QUOTA_EXCEEDED past ``reserve_limit``;
                OUT_OF_MEMORY from the device.
        """
        if size < 1:
            raise BackendError(Status.INVALID_ARGUMENT, f"allocation size must be positive, got {size}")
        size = align_up(size, self.alignment)
        if size >= self.large_threshold:
            address = self._alloc_direct(size)
        else:
            address = self._alloc_small(size)
        self._allocs += 1
        self._in_use += size
        self._peak = max(self._peak, self._in_use)
        return address

    def _fits_reserve(self, size: int) -> bool:
        return self.reserve_limit is None or self._reserved + size <= self.reserve_limit

    def _alloc_direct(self, size: int) -> int:
        if not self._fits_reserve(size):
            raise BackendError(Status.QUOTA_EXCEEDED,
                               f"the pool already holds {self._reserved} of its {self.reserve_limit} device bytes "
                               f"(fragmented free space counts); free memory to allocate {size} more")
        address = self._device_alloc(size)
        self._dev_allocs += 1
        self._direct[address] = size
        self._owner[address] = None
        self._reserve(size)
        return address

    def _alloc_small(self, size: int) -> int:
        best: tuple[int, int] | None = None
        for base in self._chunk_bases:          # few chunks: pick the one with the tightest fit
            chunk = self._chunks[base]
            if chunk.largest_free >= size and (best is None or chunk.largest_free < best[0]):
                best = (chunk.largest_free, base)
        if best is None:
            if not self._fits_reserve(self.chunk_size):
                return self._alloc_direct(size)     # a new chunk would pass the limit: exact size only
            try:
                base = self._device_alloc(self.chunk_size)
            except BackendError as exc:
                if exc.status != Status.OUT_OF_MEMORY:
                    raise
                return self._alloc_direct(size)     # no room for a chunk: exact size may still fit
            self._dev_allocs += 1
            self._chunks[base] = RangeAllocator(base, self.chunk_size, self.alignment)
            bisect.insort(self._chunk_bases, base)
            self._reserve(self.chunk_size)
            best = (self.chunk_size, base)
        chunk = self._chunks[best[1]]
        address = chunk.alloc(size)
        assert address is not None
        self._owner[address] = chunk
        return address

    def _reserve(self, size: int) -> None:
        self._reserved += size
        self._peak_reserved = max(self._peak_reserved, self._reserved)

    def free(self, address: int) -> int:
        """Free an allocation; returns its (aligned) size.

        Raises:
            BackendError: INVALID_HANDLE when ``address`` is not a live allocation of this pool.
        """
        if address not in self._owner:
            raise BackendError(Status.INVALID_HANDLE, f"{address:#x} is not a live allocation")
        chunk = self._owner.pop(address)
        if chunk is None:
            size = self._direct.pop(address)
            self._release(address, size)
        else:
            size = chunk.free(address)
            if chunk.used_bytes == 0:
                self._maybe_release_chunk(chunk)
        self._frees += 1
        self._in_use -= size
        return size

    def _maybe_release_chunk(self, chunk: RangeAllocator) -> None:
        idle = sum(1 for c in self._chunks.values() if c.used_bytes == 0)
        if idle > self.max_idle_chunks:
            del self._chunks[chunk.base]
            self._chunk_bases.remove(chunk.base)
            self._release(chunk.base, chunk.size)

    def _release(self, address: int, size: int) -> None:
        self._reserved -= size
        self._dev_frees += 1
        try:
            self._device_free(address)
        except BackendError as exc:
            log.warning("device free of %#x (%d bytes) failed: %s", address, size, exc)

    def size_of(self, address: int) -> int | None:
        """The aligned size of the live allocation at ``address``, or ``None``."""
        if address not in self._owner:
            return None
        chunk = self._owner[address]
        return self._direct[address] if chunk is None else chunk.used[address]

    # -- whole-pool operations --------------------------------------------------------
    def trim(self) -> None:
        """Give every fully free chunk back to the device."""
        for chunk in [c for c in self._chunks.values() if c.used_bytes == 0]:
            del self._chunks[chunk.base]
            self._chunk_bases.remove(chunk.base)
            self._release(chunk.base, chunk.size)

    def release(self) -> None:
        """Free every allocation and chunk on the device (client teardown)."""
        for address, size in list(self._direct.items()):
            self._release(address, size)
        for chunk in list(self._chunks.values()):
            self._release(chunk.base, chunk.size)
        self.forget()

    def forget(self) -> None:
        """Drop all bookkeeping without touching the device (its context was reset)."""
        self._chunks.clear()
        self._chunk_bases.clear()
        self._owner.clear()
        self._direct.clear()
        self._in_use = self._reserved = 0

    def stats(self) -> PoolStats:
        """A snapshot of the pool's figures."""
        free_total = sum(c.free_bytes for c in self._chunks.values())
        largest = max((c.largest_free for c in self._chunks.values()), default=0)
        return PoolStats(
            bytes_in_use=self._in_use, peak_bytes_in_use=self._peak,
            bytes_reserved=self._reserved, peak_bytes_reserved=self._peak_reserved,
            live_allocations=len(self._owner), total_allocations=self._allocs, total_frees=self._frees,
            chunks=len(self._chunks), direct_allocations=len(self._direct),
            device_allocations=self._dev_allocs, device_frees=self._dev_frees,
            free_blocks=sum(c.free_blocks for c in self._chunks.values()),
            fragmentation=(1.0 - largest / free_total) if free_total else 0.0,
        )
