"""MEM_ALLOC, MEM_FREE, MEM_SET and the three copies (docs/device-abi.md §4.5-4.6), with hostile
variants: SG entries outside guest RAM or crossing a mapping's edge, read-only and
message-only RAM, zero, huge and overflowing lengths, foreign, freed and stale device
addresses. Every one ends in its status and the device keeps serving.
"""

from __future__ import annotations

import os

import pytest
from vxpu.accel.quota import Quota
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import GuestMemory

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import Opcode

from .ringdriver import DATA_OFF, RAM_BASE, XpuRig, desc

U64 = (1 << 64) - 1


def test_alloc_copy_roundtrip_and_free(rig):
    data = os.urandom(100_000)
    dev = rig.alloc(len(data))
    assert rig.htod(dev, data).status == Status.OK
    assert rig.dtoh(dev, len(data), off=DATA_OFF + 0x40000) == data
    assert rig.cmd(Opcode.MEM_FREE, [dev]).status == Status.OK
    assert rig.cmd(Opcode.MEM_FREE, [dev]).status == Status.INVALID_HANDLE           # double free


def test_memset_and_dtod(rig):
    a, b = rig.alloc(4096), rig.alloc(4096)
    assert rig.cmd(Opcode.MEM_SET, [a, 0xAB, 4096]).status == Status.OK
    assert rig.cmd(Opcode.MEM_SET, [a + 100, 0x01, 10]).status == Status.OK
    assert rig.cmd(Opcode.MEM_COPY_DTOD, [b, a, 4096]).status == Status.OK
    got = rig.dtoh(b, 4096)
    assert got[:100] == b"\xab" * 100 and got[100:110] == b"\x01" * 10 and got[110:] == b"\xab" * 3986
    assert rig.cmd(Opcode.MEM_COPY_DTOD, [a + 1, a, 4000]).status == Status.OK        # overlap is fine


def test_indirect_sg_gathers_and_scatters_in_order(rig):
    dev = rig.alloc(3 * 4096)
    parts = [os.urandom(4096) for _ in range(3)]
    offs = [DATA_OFF + 0x30000, DATA_OFF + 0x10000, DATA_OFF + 0x50000]      # out of address order
    for off, p in zip(offs, parts, strict=True):
        rig.write(off, p)
    lst = rig.sg_list(DATA_OFF, [(rig.addr(o), 4096) for o in offs])
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(lst, 3)).status == Status.OK
    assert rig.dtoh(dev, 3 * 4096, off=DATA_OFF + 0x80000) == b"".join(parts)
    outs = [DATA_OFF + 0xA0000 + 0x2000 * i for i in range(3)]
    lst = rig.sg_list(DATA_OFF + 0x100, [(rig.addr(o), 4096) for o in outs])
    assert rig.cmd(Opcode.MEM_COPY_DTOH, [dev], indirect=(lst, 3)).status == Status.OK
    assert [rig.read(o, 4096) for o in outs] == parts


def test_adjacent_entries_are_coalesced(rig):
    dev = rig.alloc(8192)
    data = os.urandom(8192)
    rig.write(DATA_OFF, data)
    entries = [(rig.addr(DATA_OFF + 512 * i), 512) for i in range(16)]
    lst = rig.sg_list(DATA_OFF + 0x10000, entries)
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(lst, 16)).status == Status.OK
    assert rig.dtoh(dev, 8192, off=DATA_OFF + 0x20000) == data


@pytest.mark.parametrize("sg", [
    (0x0, 16),                                   # below guest RAM
    (RAM_BASE + (8 << 20), 16),                  # just past it
    (RAM_BASE + (8 << 20) - 8, 16),              # crosses its end
    (U64 - 7, 16),                               # wraps 2^64
    (U64, 1),
])
def test_htod_and_dtoh_outside_guest_ram(rig, sg):
    dev = rig.alloc(64)
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=sg).status == Status.OUT_OF_RANGE
    assert rig.cmd(Opcode.MEM_COPY_DTOH, [dev], sg=sg).status == Status.OUT_OF_RANGE
    rig.alive()


def test_range_crossing_two_adjacent_maps_is_refused(rig):
    extra = GuestMemory(1 << 20)
    try:
        rig.client.map_guest_ram(extra, RAM_BASE + rig.mem.size)      # adjacent to the first map
        dev = rig.alloc(4096)
        edge = RAM_BASE + rig.mem.size - 2048
        assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=(edge, 4096)).status == Status.OUT_OF_RANGE
        # the same bytes as two entries, one per map, are fine
        lst = rig.sg_list(DATA_OFF, [(edge, 2048), (edge + 2048, 2048)])
        assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(lst, 2)).status == Status.OK
        extra.write(0, b"\x5a" * 2048)
        assert rig.cmd(Opcode.MEM_COPY_DTOH, [dev], indirect=(lst, 2)).status == Status.OK
        rig.client.dma_unmap(RAM_BASE + rig.mem.size, extra.size)
        assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(lst, 2)).status == Status.OUT_OF_RANGE
    finally:
        extra.close()
    rig.alive()


def test_read_only_and_message_only_ram(rig):
    ro, msg = GuestMemory(1 << 20), GuestMemory(1 << 20)
    try:
        rig.client.map_guest_ram(ro, 0x4000_0000, flags=P.DMA_READ_FLAG)
        rig.client.map_guest_ram(msg, 0x5000_0000, with_fd=False)
        dev = rig.alloc(4096)
        ro.write(0, b"\x11" * 4096)
        assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=(0x4000_0000, 4096)).status == Status.OK
        assert rig.cmd(Opcode.MEM_COPY_DTOH, [dev], sg=(0x4000_0000, 4096)).status == Status.OUT_OF_RANGE
        assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=(0x5000_0000, 4096)).status == Status.OUT_OF_RANGE
        assert rig.dtoh(dev, 4096) == b"\x11" * 4096
        rig.client.dma_unmap(0x4000_0000, ro.size)
        rig.client.dma_unmap(0x5000_0000, msg.size)
    finally:
        ro.close()
        msg.close()
    rig.alive()


@pytest.mark.parametrize(("args", "status"), [
    ([0], Status.INVALID_ARGUMENT),                      # zero bytes
    ([U64], Status.QUOTA_EXCEEDED),                      # huge
    ([1 << 40], Status.QUOTA_EXCEEDED),
])
def test_alloc_zero_and_huge(rig, args, status):
    assert rig.cmd(Opcode.MEM_ALLOC, args).status == status
    rig.alive()


def test_alloc_quota(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, quota=Quota(memory_bytes=1 << 20, max_allocations=4)) as r:
        assert r.cmd(Opcode.MEM_ALLOC, [2 << 20]).status == Status.QUOTA_EXCEEDED
        handles = [r.alloc(4096) for _ in range(4)]
        assert r.cmd(Opcode.MEM_ALLOC, [4096]).status == Status.QUOTA_EXCEEDED
        assert r.cmd(Opcode.MEM_FREE, [handles[0]]).status == Status.OK
        assert r.alloc(4096)


@pytest.mark.parametrize(("op", "make"), [
    (Opcode.MEM_SET, lambda a: [a, 0, 4097]),                 # one byte past the allocation
    (Opcode.MEM_SET, lambda a: [a + 4096, 0, 1]),
    (Opcode.MEM_SET, lambda a: [a, 0, U64]),                  # length overflow
    (Opcode.MEM_SET, lambda a: [U64, 0, 2]),                  # address + length wraps
    (Opcode.MEM_COPY_DTOD, lambda a: [a, a + 1, 4096]),
    (Opcode.MEM_COPY_DTOD, lambda a: [a + 4000, a, 200]),
    (Opcode.MEM_COPY_DTOD, lambda a: [a, a, U64]),
    (Opcode.MEM_COPY_DTOD, lambda a: [0, a, 16]),
])
def test_device_ranges_outside_one_allocation(rig, op, make):
    a = rig.alloc(4096)
    assert rig.cmd(op, make(a)).status == Status.OUT_OF_RANGE
    rig.alive()


def test_copy_longer_than_the_allocation(rig):
    a = rig.alloc(100)
    assert rig.htod(a, b"x" * 101).status == Status.OUT_OF_RANGE
    assert rig.cmd(Opcode.MEM_COPY_DTOH, [a], sg=(rig.addr(DATA_OFF), 101)).status == Status.OUT_OF_RANGE


def test_memset_value_must_be_a_byte(rig):
    a = rig.alloc(64)
    assert rig.cmd(Opcode.MEM_SET, [a, 256, 1]).status == Status.INVALID_ARGUMENT


def test_huge_and_overflowing_sg_totals(rig):
    a = rig.alloc(64)
    lst = rig.sg_list(DATA_OFF, [(rig.addr(DATA_OFF), 1 << 63), (rig.addr(DATA_OFF), 1 << 63)])
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [a], indirect=(lst, 2)).status == Status.INVALID_ARGUMENT
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [a], sg=(rig.addr(DATA_OFF), abi.MAX_TRANSFER_BYTES + 1)).status \
        == Status.INVALID_ARGUMENT
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [a], sg=(rig.addr(DATA_OFF), 1 << 20)).status == Status.OUT_OF_RANGE
    rig.alive()


def test_zero_length_copy_without_sg(rig):
    a = rig.alloc(64)
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [a]).status == Status.OK
    assert rig.cmd(Opcode.MEM_COPY_DTOH, [a]).status == Status.OK
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [12345]).status == Status.OUT_OF_RANGE     # still a device range
    assert rig.cmd(Opcode.MEM_COPY_DTOD, [a, a, 0]).status == Status.OK


def test_freed_and_stale_addresses(rig):
    a = rig.alloc(4096)
    assert rig.cmd(Opcode.MEM_FREE, [a]).status == Status.OK
    assert rig.cmd(Opcode.MEM_SET, [a, 0, 16]).status == Status.OUT_OF_RANGE
    assert rig.htod(a, b"123").status == Status.OUT_OF_RANGE
    b = rig.alloc(4096)
    assert rig.cmd(Opcode.RESET).status == Status.OK                # drops every allocation
    assert rig.cmd(Opcode.MEM_SET, [b, 0, 16]).status == Status.OUT_OF_RANGE
    assert rig.cmd(Opcode.MEM_FREE, [b]).status == Status.INVALID_HANDLE
    assert rig.cmd(Opcode.MEM_FREE, [b + 8]).status == Status.INVALID_HANDLE
    rig.alive()


def test_foreign_addresses_belong_to_another_guest(tmp_path, backend):
    with XpuRig(tmp_path / "a", backend) as a, XpuRig(tmp_path / "b", backend) as b:
        mine = a.alloc(4096)
        assert a.htod(mine, b"secret").status == Status.OK
        assert b.cmd(Opcode.MEM_COPY_DTOH, [mine], sg=(b.addr(DATA_OFF), 6)).status == Status.OUT_OF_RANGE
        assert b.cmd(Opcode.MEM_SET, [mine, 0, 6]).status == Status.OUT_OF_RANGE
        assert b.cmd(Opcode.MEM_FREE, [mine]).status == Status.INVALID_HANDLE
        assert a.dtoh(mine, 6) == b"secret"


def test_batch_of_copies_in_one_submission(rig):
    dev = rig.alloc(64 * 256)
    chunks = [os.urandom(256) for _ in range(64)]
    descs = []
    for i, c in enumerate(chunks):
        rig.write(DATA_OFF + i * 256, c)
        descs.append(desc(Opcode.MEM_COPY_HTOD, [dev + i * 256], sg=(rig.addr(DATA_OFF + i * 256), 256), tag=i))
    assert all(c.status == 0 for c in rig.run(descs))
    assert rig.dtoh(dev, 64 * 256, off=DATA_OFF + 0x100000) == b"".join(chunks)


def test_batch_of_dtohs_completes_with_the_bytes_in_guest_ram(rig):
    """DTOHs in one batch share one synchronization; each completion still means "the bytes
    are in guest RAM", and the completions stay in order with the commands between them."""
    dev = rig.alloc(32 * 512)
    data = os.urandom(32 * 512)
    assert rig.htod(dev, data).status == Status.OK
    descs = []
    for i in range(32):
        descs.append(desc(Opcode.MEM_COPY_DTOH, [dev + i * 512], sg=(rig.addr(DATA_OFF + 0x100000 + i * 1024), 512),
                          tag=2 * i))
        descs.append(desc(Opcode.NOP, tag=2 * i + 1))
    got = rig.run(descs)
    assert [c.tag for c in got] == list(range(64)) and all(c.status == 0 for c in got)
    assert b"".join(rig.read(DATA_OFF + 0x100000 + i * 1024, 512) for i in range(32)) == data
