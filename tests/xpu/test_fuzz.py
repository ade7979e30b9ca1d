"""A ring fuzzer: 100,000 random descriptors against the CPU backend.

Each descriptor is random in every field, biased towards the interesting: real opcodes, live
device addresses and handles (and nearby, freed or made-up ones), SG entries in the guest's
data area, at a mapping's edges, outside guest RAM and wrapping 2^64, inline and indirect
lists, zero, small, huge and overflowing lengths, reserved flag bits. Guest-RAM addresses stay
outside the queue memory (a guest that scribbles over its own rings gets a fatal error, which
test_queue.py covers). Per batch: exactly one completion per descriptor, in order, with a
status from the table, no fatal error, no hang. At the end the device still computes and
the process holds no more fds and not much more memory than after a warm-up.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter

import pytest
from vxpu.accel.quota import Quota
from vxpu.ir.workers import sandbox_pool

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import DescFlags, DeviceStatus, Opcode

from .ringdriver import CONFIG, DATA_OFF, RAM_BASE, XpuRig

TOTAL = 100_000
WARMUP = 5_000
BATCH = 128
RAM = 8 << 20
U64 = (1 << 64) - 1
OPCODES = [int(o) for o in Opcode]
WITH_SG = {Opcode.IDENTIFY, Opcode.MEM_COPY_HTOD, Opcode.MEM_COPY_DTOH, Opcode.MODULE_LOAD, Opcode.KERNEL_GET,
           Opcode.LAUNCH, Opcode.INFER, Opcode.STATS}
STATUSES = {int(s) for s in Status}
SG_LIST_OFF = DATA_OFF + (5 << 20)        # indirect lists live here; data SG never reaches it ...
DATA_END = SG_LIST_OFF                    # ... except through random addresses, which is fine (read-only use)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fd_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


class Fuzzer:
    def __init__(self, rig: XpuRig, seed: int) -> None:
        self.rig = rig
        self.rnd = random.Random(seed)
        self.handles: list[int] = [0, 1, U64]
        self.list_slot = 0

    def number(self) -> int:
        r = self.rnd
        choice = r.random()
        if choice < 0.35 and self.handles:
            return (r.choice(self.handles) + r.choice((0, 0, 0, 1, -1, 4096))) & U64
        if choice < 0.6:
            return r.randrange(0, 1 << 16)
        if choice < 0.7:
            return r.choice((0, 1, U64, 1 << 63, (1 << 32) - 1, 1 << 32))
        return r.getrandbits(64)

    def segment(self) -> tuple[int, int]:
        r = self.rnd
        choice = r.random()
        if choice < 0.6:
            off = r.randrange(DATA_OFF, DATA_END - 1)
            return RAM_BASE + off, r.randrange(1, min(1 << 16, DATA_END - off) + 1)
        if choice < 0.7:
            return RAM_BASE + RAM - r.randrange(1, 64), r.randrange(1, 256)      # the mapping's end
        if choice < 0.8:
            return RAM_BASE - r.randrange(1, 64), r.randrange(1, 256)            # across its start
        if choice < 0.9:
            return r.getrandbits(64), r.choice((1, 16, 1 << 20, U64, 1 << 63))
        return RAM_BASE + DATA_OFF, r.choice((0, 1 << 33, U64))

    def sg(self) -> tuple[int, int, int, int]:
        """(flags, sg_count, sg_addr, sg_len)."""
        r = self.rnd
        choice = r.random()
        if choice < 0.35:
            return 0, 0, 0, 0
        if choice < 0.7:
            addr, length = self.segment()
            return 0, 1, addr, length
        if choice < 0.9:
            n = r.randrange(1, 9)
            off = SG_LIST_OFF + (self.list_slot % 4096) * 256
            self.list_slot += 1
            self.rig.write(off, b"".join(abi.SG_ENTRY.pack(*self.segment()) for _ in range(n)))
            return DescFlags.SG_INDIRECT, r.choice((n, n, n, 0, n + 1, 5000)), RAM_BASE + off, 0
        return r.getrandbits(16), r.getrandbits(32), r.getrandbits(64), r.getrandbits(64)

    def descriptor(self, tag: int) -> bytes:
        r = self.rnd
        opcode = r.choice(OPCODES) if r.random() < 0.9 else r.getrandbits(16)
        if opcode == Opcode.MEM_ALLOC and r.random() < 0.8:
            args = [r.randrange(1, 1 << 16), 0, 0, 0]
        elif opcode == Opcode.RESET and r.random() < 0.9:
            opcode = Opcode.NOP                                     # keep some state alive between resets
            args = [0, 0, 0, 0]
        else:
            args = [self.number() for _ in range(4)]
        flags, count, addr, length = self.sg() if opcode in WITH_SG or r.random() < 0.15 else (0, 0, 0, 0)
        if r.random() < 0.05:
            flags |= 1 << r.randrange(2, 16)
        return abi.DESCRIPTOR.pack(opcode, flags & 0xFFFF, count, tag, *args, addr, length)

    def run(self, n: int) -> None:
        tag = 0
        while n > 0:
            k = min(BATCH, n)
            descs = [self.descriptor(tag + i) for i in range(k)]
            got = self.rig.run(descs, timeout=30)
            assert [c.tag for c in got] == list(range(tag, tag + k))
            for c, raw in zip(got, descs, strict=True):
                assert c.status in STATUSES, c
                if c.status == 0 and raw[:2] in (b"\x10\x00", b"\x41\x00"):    # MEM_ALLOC, EVENT_CREATE
                    self.handles.append(c.result)
            self.handles = self.handles[-256:]
            assert not self.rig.reg(abi.REG_STATUS) & DeviceStatus.FATAL
            tag += k
            n -= k


@pytest.mark.slow
def test_random_descriptors_do_not_crash_hang_or_leak(tmp_path, backend):
    quota = Quota(memory_bytes=64 << 20, max_allocations=4096, events=256, module_bytes=1 << 20)
    with XpuRig(tmp_path / "fuzz.sock", backend, ram_size=RAM, sq_entries=256, quota=quota) as rig:
        fuzz = Fuzzer(rig, seed=0x5850)
        fuzz.run(WARMUP)
        assert rig.cmd(Opcode.RESET).status == 0
        fds, rss = _nfds(), _rss()
        t0 = time.monotonic()
        fuzz.run(TOTAL - WARMUP)
        elapsed = time.monotonic() - t0
        assert rig.cmd(Opcode.RESET).status == 0
        rig.alive()
        dev = rig.alloc(64)
        assert rig.htod(dev, b"still works").status == 0 and rig.dtoh(dev, 11) == b"still works"
        assert _nfds() == fds
        growth = _rss() - rss
        assert growth < 32 << 20, f"RSS grew by {growth >> 20} MiB over {TOTAL - WARMUP} descriptors"
        print(f"fuzz: {TOTAL - WARMUP} descriptors in {elapsed:.1f} s, RSS {growth / 1e6:+.1f} MB")


@pytest.mark.slow
def test_random_register_traffic_with_the_ring_running(tmp_path, backend):
    """Random BAR0 accesses (every register, odd sizes, resets, enable/disable storms, queue
    reconfiguration, doorbells) interleaved with hostile index updates and descriptor batches:
    the server answers every access, never dies, and a clean reset brings the queue back."""
    rnd = random.Random(int(os.environ.get("VXPU_FUZZ_SEED", "256")))
    regs = list(range(0, 0x60, 4)) + [0x100, 0x7FC, 0xFFC]
    with XpuRig(tmp_path / "regs.sock", backend, ram_size=RAM, sq_entries=64) as rig:
        sandbox_pool()                  # the process-wide compile workers (pipes, logs) start once
        fds, before_fds = _nfds(), Counter(_fd_targets())
        fuzz = Fuzzer(rig, seed=7)
        for i in range(10_000):
            op = rnd.random()
            if op < 0.45:
                size = rnd.choice((1, 2, 4, 4, 4, 8))
                off = rnd.choice(regs) & ~(size - 1)
                value = rnd.getrandbits(8 * size)
                rig.client.region_write(0, off, value.to_bytes(size, "little"), posted=rnd.random() < 0.8)
            elif op < 0.75:
                size = rnd.choice((1, 2, 4, 8))
                off = rnd.choice(regs) & ~(size - 1)
                assert len(rig.client.region_read(0, off, size)) == size
            elif op < 0.9:
                slot = rnd.randrange(rig.sq_entries)
                rig.write(0x1000 + slot * abi.SQ_ENTRY_SIZE, fuzz.descriptor(i))
                rig.set_hdr(abi.QH_SQ_TAIL, rig.hdr(abi.QH_SQ_HEAD) + rnd.randrange(0, 70))
                if rnd.random() < 0.2:
                    rig.set_hdr(abi.QH_CQ_HEAD, rig.hdr(abi.QH_CQ_TAIL) - rnd.randrange(0, 3))
            elif op < 0.95:
                rig.enable()
            elif op < 0.97:
                rig.set_reg(abi.REG_CONTROL, 1)
            elif op < 0.985:
                rig.client.region_write(CONFIG, 4, struct.pack("<H", rnd.choice((0x2, 0x6))))    # bus master
            else:
                rig.client.dma_unmap(RAM_BASE, RAM)                  # the rings' memory goes and comes back
                rig.client.map_guest_ram(rig.mem, RAM_BASE)
        rig.client.region_write(CONFIG, 4, struct.pack("<H", 0x6))
        before = rig.reg(abi.REG_RESET_COUNT)
        rig.set_reg(abi.REG_IRQ_CONTROL, 0)
        rig.set_reg(abi.REG_CONTROL, 1)
        deadline = time.monotonic() + 30
        while rig.reg(abi.REG_RESET_COUNT) == before:
            assert time.monotonic() < deadline, "Control.RESET never completed"
            time.sleep(0.01)
        assert rig.enable() & DeviceStatus.ENABLED
        rig.alive()
        assert _nfds() == fds, Counter(_fd_targets()) - before_fds
