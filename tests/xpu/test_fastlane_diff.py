"""Differential test of the native fast lane: the same random descriptor streams (valid, hostile,
mixed opcodes) through a device with the lane and one without, on two identical fake GPUs
(test_fastlane.FakeGpu), give the same completions, the same guest memory, the same device
memory, the same driver calls in the same order, and the same statistics and session accounting.
"""

from __future__ import annotations

import ctypes
import random
import struct
from dataclasses import replace
from typing import Any

import pytest
from vxpu.accel.quota import DEFAULT_QUOTA
from vxpu.vfio_server.xpu import fastlane

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import DescFlags, Opcode

from .ringdriver import DATA_OFF, XpuRig, desc
from .test_fastlane import ARG_OFF, lane, rig_for, setup_kernels

SLOTS = 12                       # argument blobs in guest RAM, rewritten now and then
GUEST = DATA_OFF + 0x20_0000     # copies' guest buffers: [GUEST, GUEST + 1 MiB)
RAM = 8 << 20


class Stream:
    """A seeded generator of descriptor chunks over the state both devices share."""

    def __init__(self, seed: int, inc: int, empty: int, allocs: list[tuple[int, int]]) -> None:
        self.rnd = random.Random(seed)
        self.inc, self.empty = inc, empty
        self.allocs = allocs            # (address, size) of live allocations
        self.freed: list[tuple[int, int]] = []
        self.tag = 0
        self.pending_alloc = 0

    def _dev(self) -> tuple[int, int]:
        r = self.rnd
        if self.freed and r.random() < 0.1:
            return r.choice(self.freed)
        return r.choice(self.allocs)

    def slot_bytes(self) -> tuple[int, bytes]:
        """A slot to (re)write with an ``inc`` argument blob: usually in bounds, sometimes not."""
        r = self.rnd
        addr, size = self._dev()
        off = r.choice((0, 4, size - 4, size - 2, size, 1 << 20)) if r.random() < 0.2 else 4 * r.randrange(size // 4)
        return r.randrange(SLOTS), struct.pack("<QI4x", addr + off, r.randrange(1, 5))

    def one(self) -> bytes:
        r = self.rnd
        self.tag += 1
        tag = self.tag
        kind = r.choices(["nop", "inc", "empty", "htod", "dtoh", "fence", "hostile", "other", "alloc", "free"],
                         [8, 30, 8, 14, 14, 8, 10, 4, 1, 1])[0]
        dims = list(abi.pack_launch_dims((r.randrange(1, 3), 1, 1), (32, 1, 1), 0))
        if kind == "nop":
            return desc(Opcode.NOP, tag=tag, flags=DescFlags.IRQ if r.random() < 0.2 else 0)
        if kind == "inc":
            slot = r.randrange(SLOTS)
            return desc(Opcode.LAUNCH, [self.inc, *dims], sg=(RAM_BASE + ARG_OFF + 64 * slot, 16), tag=tag)
        if kind == "empty":
            return desc(Opcode.LAUNCH, [self.empty, *dims], tag=tag)
        if kind in ("htod", "dtoh"):
            addr, size = self._dev()
            n = r.choice((4, 64, 256, 4096, size))
            n = min(n, size) if r.random() < 0.9 else n + r.randrange(1, 64)
            dev = addr + r.randrange(0, max(1, size - n + 1)) // 4 * 4
            g = GUEST + r.randrange(0, (1 << 20) - max(n, 1)) // 16 * 16 if n < (1 << 20) else GUEST
            op = Opcode.MEM_COPY_HTOD if kind == "htod" else Opcode.MEM_COPY_DTOH
            return desc(op, [dev], sg=(RAM_BASE + g, n), tag=tag)
        if kind == "fence":
            return desc(Opcode.FENCE, tag=tag)
        if kind == "alloc":
            self.pending_alloc += 1
            return desc(Opcode.MEM_ALLOC, [r.choice((256, 4096, 65536))], tag=tag)
        if kind == "free" and len(self.allocs) > 2:
            victim = self.allocs.pop(r.randrange(len(self.allocs)))
            self.freed.append(victim)
            return desc(Opcode.MEM_FREE, [victim[0]], tag=tag)
        if kind == "other":
            addr, size = self._dev()
            return r.choice([desc(Opcode.MEM_SET, [addr, r.randrange(256), min(64, size)], tag=tag),
                             desc(Opcode.MEM_COPY_DTOD, [addr, addr + size // 2, size // 4], tag=tag),
                             desc(0x77, tag=tag)])
        return self.hostile(tag, dims)

    def copy(self, to_device: bool) -> bytes:
        """A valid 256-byte HTOD or DTOH between the first allocation and the copies' buffers."""
        self.tag += 1
        addr, _size = self.allocs[0]
        op = Opcode.MEM_COPY_HTOD if to_device else Opcode.MEM_COPY_DTOH
        return desc(op, [addr], sg=(RAM_BASE + GUEST + 256 * self.rnd.randrange(4096), 256), tag=self.tag)

    def hostile(self, tag: int, dims: list[int]) -> bytes:
        r = self.rnd
        addr, size = self._dev()
        top = (1 << 64) - 8
        choices = [
            desc(Opcode.NOP, tag=tag, sg=(RAM_BASE, 16)),                                  # NOP takes no SG
            desc(Opcode.NOP, tag=tag, flags=0x8),                                           # reserved flag
            desc(Opcode.LAUNCH, [self.inc, *dims], sg=(top, 16), tag=tag),                  # args not RAM
            desc(Opcode.LAUNCH, [self.inc, *dims], sg=(RAM_BASE + ARG_OFF, 4097), tag=tag),  # blob too big
            desc(Opcode.LAUNCH, [self.inc, *dims], sg=(RAM_BASE + ARG_OFF, 8), tag=tag),    # wrong size
            desc(Opcode.LAUNCH, [self.inc ^ 0xFF, *dims], sg=(RAM_BASE + ARG_OFF, 16), tag=tag),  # foreign handle
            desc(Opcode.LAUNCH, [self.inc, 0, 0, 0], sg=(RAM_BASE + ARG_OFF, 16), tag=tag),   # zero dims
            desc(Opcode.LAUNCH, [self.empty, *dims], sg_count=0, sg=(RAM_BASE, 0), tag=tag),
            desc(Opcode.LAUNCH, [self.empty, *dims], tag=tag, flags=DescFlags.SG_INDIRECT),
            desc(Opcode.MEM_COPY_HTOD, [addr], sg=(RAM_BASE + RAM - 8, 16), tag=tag),     # crosses RAM's end
            desc(Opcode.MEM_COPY_DTOH, [addr], sg=(top, 64), tag=tag),                     # wraps 2^64
            desc(Opcode.MEM_COPY_HTOD, [top], sg=(RAM_BASE + GUEST, 16), tag=tag),         # device near 2^64
            desc(Opcode.MEM_COPY_HTOD, [addr + size], sg=(RAM_BASE + GUEST, 1), tag=tag),  # just past it
            desc(Opcode.MEM_COPY_HTOD, [addr], sg=(RAM_BASE + GUEST, 0), tag=tag),         # zero length
            desc(Opcode.MEM_COPY_DTOH, [addr], sg=(RAM_BASE + GUEST, 1 << 33), tag=tag),   # over the limit
            desc(Opcode.MEM_COPY_HTOD, [addr], sg=(RAM_BASE + GUEST, 16), sg_count=2, tag=tag),
            desc(Opcode.MEM_COPY_HTOD, [addr], indirect=(RAM_BASE + GUEST, 1), tag=tag),
            desc(Opcode.FENCE, tag=tag, sg=(RAM_BASE + GUEST, 4)),
        ]
        return r.choice(choices)


RAM_BASE = 0x1000_0000


def _explain(chunk: list[bytes], on: list[Any], off: list[Any]) -> str:
    """The descriptors around the first differing completion (fast lane on vs off)."""
    first = next(i for i, (a, b) in enumerate(zip(on, off)) if a != b)
    lines = []
    for j in range(max(0, first - 10), min(len(chunk), first + 2)):
        op, flags, count, tag, *args, sg_addr, sg_len = abi.DESCRIPTOR.unpack(chunk[j])
        lines.append(f"{j}: op {op:#x} flags {flags} sg {count}/{sg_addr:#x}+{sg_len} tag {tag} "
                     f"args {[hex(a) for a in args]}: on {on[j].status} off {off[j].status}")
    return "\n".join(lines)


def _snapshot(rig: XpuRig) -> dict[str, Any]:
    poller = rig.device.poller
    s = poller.session
    fake = rig.device.backend.dev
    st = poller.stats
    device = {a: ctypes.string_at(ctypes.addressof(b), ctypes.sizeof(b)) for a, b in fake.bufs.items()}
    return {"commands": dict(st.commands), "errors": dict(st.errors),
            "bytes": (st.bytes_htod, st.bytes_dtoh, st.bytes_dtod, st.bytes_memset),
            "session": (s.stats.launches, s.stats.bytes_htod, s.stats.bytes_dtoh, s.stats.faults,
                        dict(s.stats.errors), s.usage.memory_bytes, s.usage.allocations),
            "backend": (rig.device.backend.stats.launches, rig.device.backend.stats.bytes_htod,
                        rig.device.backend.stats.bytes_dtoh, rig.device.backend.stats.faults),
            "queued": poller.executor.queued, "guest": rig.read(DATA_OFF, RAM - DATA_OFF),
            "device": device, "log": list(fake.log)}


def _setup(rigs: tuple[XpuRig, XpuRig]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Kernels and allocations, the same on both devices."""
    kernels = [setup_kernels(r) for r in rigs]
    assert kernels[0] == kernels[1]
    allocs = [[(r.alloc(size), size) for size in (256, 4096, 65536, 1 << 20)] for r in rigs]
    assert allocs[0] == allocs[1]
    for r in rigs:                                  # every argument slot starts valid
        for slot in range(SLOTS):
            addr, _size = allocs[0][slot % 4]
            r.write(ARG_OFF + 64 * slot, struct.pack("<QI4x", addr, 1))
    return kernels[0], allocs[0]


@pytest.mark.parametrize("seed,depth,resets,poll",
                         [(s, 0, False, True) for s in range(6)] + [(6, 6, False, True), (7, 3, False, True),
                                                                    (8, 0, True, True), (9, 5, True, True)]
                         + [(0, 0, False, False), (1, 0, False, False), (7, 3, False, False), (9, 5, True, False)])
def test_the_lane_changes_nothing_the_guest_or_host_can_see(tmp_path, monkeypatch, seed, depth, resets, poll):
    """``depth``: a queue-depth quota that small (the lane's queue-room stops and Python's waits
    interleave); ``resets``: now and then a chunk with the RESET command in it (a new session
    under the lane: its tables, plans, queue and record all go), then set up again; ``poll``:
    the lane's native poll loop runs the queue (False: ``VXPU_FASTLANE_POLL=0``, the lane runs
    only inside Python's cycles)."""
    rnd = random.Random(1000 + seed)
    kw: dict[str, Any] = {"quota": replace(DEFAULT_QUOTA, queue_depth=depth)} if depth else {}
    monkeypatch.setenv(fastlane.POLL_ENV, "1" if poll else "0")
    with rig_for(tmp_path, "on", fastlane_on=True, sq_entries=128, **kw) as on, \
            rig_for(tmp_path, "off", fastlane_on=False, sq_entries=128, **kw) as off:
        assert off.device.poller.fastlane is None
        assert on.device.poller.native_polling == poll
        rigs = (on, off)
        kernels, allocs = _setup(rigs)
        fill = rnd.randbytes(1 << 20)
        for r in rigs:
            r.write(GUEST, fill)
        stream = Stream(seed, *kernels, allocs)
        for _chunk in range(25):
            for _ in range(rnd.randrange(0, 3)):
                slot, blob = stream.slot_bytes()
                for r in rigs:
                    r.write(ARG_OFF + 64 * slot, blob)
            reset = resets and rnd.random() < 0.25
            if rnd.random() < 0.2:                     # a burst of copies longer than one batch
                chunk = [stream.copy(rnd.random() < 0.5) for _ in range(rnd.randrange(65, 120))]
            else:
                chunk = [stream.one() for _ in range(rnd.randrange(1, 100))]
            if reset:                                  # the guest's state goes mid-chunk
                at = rnd.randrange(len(chunk) + 1)
                chunk[at:at] = [desc(Opcode.RESET, tag=0xEEEE)]
            chunk.append(desc(Opcode.FENCE, tag=0xFFFF))
            got = [r.run(chunk, timeout=30) for r in rigs]
            assert got[0] == got[1], _explain(chunk, got[0], got[1])
            for c, d in zip(got[0], chunk):
                if abi.DESCRIPTOR.unpack(d)[0] == Opcode.MEM_ALLOC and c.status == 0:
                    stream.allocs.append((c.result, abi.DESCRIPTOR.unpack(d)[4]))
            if reset:
                kernels, allocs = _setup(rigs)
                stream.inc, stream.empty = kernels
                stream.allocs, stream.freed = allocs, []
        on.settle()                                    # a native poll's counters are applied when it returns
        a, b = _snapshot(on), _snapshot(off)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == b[key], key
        taken = lane(on).taken
        assert taken > (200 if not depth else 40), lane(on).stops     # the lane really ran much of the common path
        assert (sum(lane(on).polls.values()) > 0) == poll, lane(on).polls
