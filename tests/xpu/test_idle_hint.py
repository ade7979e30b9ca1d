"""Rings.idle_hint: the poller's lock-free "nothing new" check (a hint, never a decision)."""

from __future__ import annotations

import mmap
import struct

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.dma import DmaRegion
from vxpu.vfio_server.xpu.guestram import GuestRam
from vxpu.vfio_server.xpu.queue import QueueConfig, Rings

from vxpu.abi import xpu as abi

BASE = 1 << 32
SIZE = 1 << 20


def _rings() -> tuple[GuestRam, Rings, mmap.mmap, DmaRegion]:
    mm = mmap.mmap(-1, SIZE)
    ram = GuestRam()
    region = DmaRegion(BASE, SIZE, 0, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, memoryview(mm))
    with ram.lock:
        ram.add(region)
        rings = Rings(QueueConfig(BASE, BASE + 4096, BASE + 4096 + 64 * 64, 64, 64))
        rings.attach(ram)
        rings.start()
    return ram, rings, mm, region


def _set_sq_tail(mm: mmap.mmap, value: int) -> None:
    struct.pack_into("<I", mm, abi.QH_SQ_TAIL, value)


def test_idle_only_while_sq_tail_equals_sq_head():
    ram, rings, mm, _region = _rings()
    assert rings.idle_hint(ram.generation)
    _set_sq_tail(mm, 3)
    assert not rings.idle_hint(ram.generation)
    with ram.lock:
        assert len(rings.take(3)) == 3
    assert rings.idle_hint(ram.generation)
    _set_sq_tail(mm, 0xFFFF_FFFF)               # a bogus tail is "not idle": the locked cycle judges it
    assert not rings.idle_hint(ram.generation)


def test_not_idle_with_stale_or_released_views():
    ram, rings, _mm, region = _rings()
    assert not rings.idle_hint(ram.generation + 1)       # a map changed: re-attach under the lock first
    hdr = rings._hdr
    assert hdr is not None
    hdr.release()                                         # released under the poller's feet
    assert not rings.idle_hint(ram.generation)
    with ram.lock:
        rings.release()
        ram.remove(region, None)
    assert not rings.idle_hint(ram.generation)
