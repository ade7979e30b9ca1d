"""The fast lane's C library on its own (vfio_server/xpu/native/fastlane.c through its ctypes
binding): the table checks at their edges, with a recording fake driver and rings in a plain
buffer. What Python would refuse the lane must never take; a range exactly at an edge it takes.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

import pytest
from vxpu.vfio_server.xpu import fastlane

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import Opcode

from .test_fastlane import DTOH_FN, HTOD_FN, LAUNCH_FN, QUERY_FN, SYNC_FN

GPA = 0x1_0000_0000             # guest-physical base of the fake RAM
RAM = 1 << 20
SQ_OFF, CQ_OFF, HDR_OFF, DATA_OFF = 0x0, 0x2000, 0x3000, 0x10000
ENTRIES = 64
DEV = 0x7000_0000              # the one allocation: [DEV, DEV + 4096)


class Lib:
    """A lane context over a fake driver that records calls, and RAM in one ctypes buffer."""

    def __init__(self) -> None:
        lib = fastlane.load()
        assert lib is not None, fastlane.unavailable()
        self.lib = lib
        self.calls: list[tuple[Any, ...]] = []
        self.fail = False

        def launch(f: int, *a: Any) -> int:
            self.calls.append(("launch", f, a[:7]))
            return 1 if self.fail else 0

        def htod(d: int, s: int, n: int, st: int) -> int:
            self.calls.append(("htod", d, s - self.base, n))
            return 1 if self.fail else 0

        def dtoh(d: int, s: int, n: int, st: int) -> int:
            self.calls.append(("dtoh", s, d - self.base, n))
            return 1 if self.fail else 0
        self._fns = [LAUNCH_FN(launch), HTOD_FN(htod), DTOH_FN(dtoh), SYNC_FN(lambda: 0), QUERY_FN(lambda _s: 0)]
        self.driver = fastlane.Driver(*(ctypes.cast(f, ctypes.c_void_p).value for f in self._fns))
        self.ctx = ctypes.c_void_p(lib.fl_new(ctypes.byref(self.driver)))
        self.ram = (ctypes.c_char * RAM)()
        self.base = ctypes.addressof(self.ram)
        self.batch = fastlane.Batch()
        self.head = 0
        self.regions([(GPA, GPA + RAM, True, True)])
        allocs = (fastlane.Alloc * 1)(fastlane.Alloc(DEV, 4096))
        assert lib.fl_set_allocs(self.ctx, allocs, 1) == 0
        lib.fl_set_copy_stream(self.ctx, 0x77, 1)

    def close(self) -> None:
        self.lib.fl_free(self.ctx)

    def regions(self, spans: list[tuple[int, int, bool, bool]]) -> int:
        table = (fastlane.Region * max(1, len(spans)))(
            *(fastlane.Region(a, e, self.base + (a - GPA), int(w), int(r)) for a, e, w, r in spans))
        return int(self.lib.fl_set_regions(self.ctx, table, len(spans)))

    def write(self, off: int, data: bytes) -> None:
        ctypes.memmove(self.base + off, data, len(data))

    def run(self, descs: list[bytes]) -> fastlane.Batch:
        for i, d in enumerate(descs):
            self.write(SQ_OFF + ((self.head + i) % ENTRIES) * 64, d)
        b = self.batch
        b.start, b.pending, b.queued, b.depth = 1, 0, 0, 1024
        b.sq, b.cq, b.hdr = self.base + SQ_OFF, self.base + CQ_OFF, self.base + HDR_OFF
        b.sq_mask = b.cq_mask = ENTRIES - 1
        b.sq_entries, b.sq_head, b.cq_index, b.max, b.cq_room, b.reread = ENTRIES, self.head, self.head, len(descs), 0, 0
        self.lib.fl_run(self.ctx, ctypes.addressof(b))
        self.head += b.consumed
        return b


@pytest.fixture
def lib():
    got = Lib()
    yield got
    got.close()


def _copy(op: int, dev: int, gpa: int, n: int) -> bytes:
    return abi.DESCRIPTOR.pack(op, 0, 1, 9, dev, 0, 0, 0, gpa, n)


@pytest.mark.parametrize("op", [Opcode.MEM_COPY_HTOD, Opcode.MEM_COPY_DTOH])
@pytest.mark.parametrize(("gpa", "n", "dev", "taken"), [
    (GPA, RAM, DEV, False),                         # longer than the allocation
    (GPA, 4096, DEV, True),                         # the whole allocation
    (GPA + RAM - 16, 16, DEV, True),                # ends exactly at RAM's end
    (GPA + RAM - 16, 17, DEV, False),               # one byte past it
    (GPA - 1, 2, DEV, False),                       # starts before RAM
    (GPA + RAM, 1, DEV, False),                     # starts at its end
    ((1 << 64) - 8, 8, DEV, False),                 # the top of the address space
    (GPA, 1 << 32, DEV, False),                     # the transfer limit ...
    (GPA, (1 << 32) + 1, DEV, False),               # ... and past it
    (GPA, 8, DEV + 4088, True),                     # ends at the allocation's end
    (GPA, 9, DEV + 4088, False),
    (GPA, 8, DEV - 8, False),                       # before the allocation
    (GPA, 8, (1 << 64) - 4, False),                 # device range wraps
    (GPA, 0, DEV, False),                           # zero length: BAD_DESCRIPTOR in Python
])
def test_copy_edges(lib, op, gpa, n, dev, taken):
    b = lib.run([_copy(op, dev, gpa, n)])
    assert (b.consumed == 1) is taken
    assert bool(lib.calls) is taken
    if not taken:
        assert b.stop == fastlane.STOP_OTHER and b.python_run == 1


def test_unregistered_or_read_only_ram(lib):
    assert lib.regions([(GPA, GPA + RAM // 2, True, False), (GPA + RAM // 2, GPA + RAM, False, True)]) == 0
    assert lib.run([_copy(Opcode.MEM_COPY_HTOD, DEV, GPA, 16)]).consumed == 0          # not registered
    assert lib.run([_copy(Opcode.MEM_COPY_DTOH, DEV, GPA + RAM // 2, 16)]).consumed == 0   # read-only
    assert lib.run([_copy(Opcode.MEM_COPY_HTOD, DEV, GPA + RAM // 2, 16)]).consumed == 1   # reading it is fine
    assert lib.run([_copy(Opcode.MEM_COPY_HTOD, DEV, GPA + RAM // 2 - 8, 16)]).consumed == 0  # across the seam


def test_bad_tables_are_refused_and_then_match_nothing(lib):
    assert lib.regions([(GPA + 100, GPA + 200, True, True), (GPA, GPA + 150, True, True)]) == -1   # unsorted
    assert lib.run([_copy(Opcode.MEM_COPY_HTOD, DEV, GPA + 120, 8)]).consumed == 0
    assert lib.regions([(GPA, GPA, True, True)]) == -1                                  # empty
    assert lib.regions([(GPA, GPA + RAM, True, True)]) == 0
    bad = (fastlane.Alloc * 2)(fastlane.Alloc(DEV, 4096), fastlane.Alloc(DEV + 100, 8))   # overlapping
    assert lib.lib.fl_set_allocs(lib.ctx, bad, 2) == -1
    assert lib.run([_copy(Opcode.MEM_COPY_HTOD, DEV, GPA, 8)]).consumed == 0
    wrap = (fastlane.Alloc * 1)(fastlane.Alloc((1 << 64) - 8, 16))
    assert lib.lib.fl_set_allocs(lib.ctx, wrap, 1) == -1


def _plan(lib: Lib, key: tuple[int, ...], blob: bytes, offsets: tuple[int, ...] = (0,), params: bytes = bytes(16)) -> int:
    words = (ctypes.c_uint64 * 4)(*key)
    dims = (ctypes.c_uint32 * 7)(1, 1, 1, 32, 1, 1, 0)
    offs = (ctypes.c_uint32 * max(1, len(offsets)))(*offsets)
    return int(lib.lib.fl_plan_add(lib.ctx, words, blob, len(blob), 0x1234, 0x77, dims, params, len(params), offs,
                                   len(offsets), 1))


def _launch(key: tuple[int, ...], gpa: int = 0, n: int = 0, flags: int = 0) -> bytes:
    return abi.DESCRIPTOR.pack(Opcode.LAUNCH, flags, 1 if n else 0, 5, *key, gpa, n)


def test_plans_match_key_and_bytes_only(lib):
    key = (0x4B45 << 48 | 1, 2, 3, 4)
    blob = struct.pack("<QQ", DEV, 7)
    assert _plan(lib, key, blob) == 0
    lib.write(DATA_OFF, blob)
    assert lib.run([_launch(key, GPA + DATA_OFF, 16)]).consumed == 1
    lib.write(DATA_OFF, struct.pack("<QQ", DEV, 8))                     # other bytes: a miss
    b = lib.run([_launch(key, GPA + DATA_OFF, 16)])
    assert b.consumed == 0 and b.stop == fastlane.STOP_MISS
    lib.write(DATA_OFF, blob)
    assert lib.run([_launch((key[0], 2, 3, 5), GPA + DATA_OFF, 16)]).consumed == 0     # other dims words
    assert lib.run([_launch(key, GPA + DATA_OFF, 15)]).consumed == 0                   # a prefix of the bytes
    assert lib.run([_launch(key, GPA + RAM - 8, 16)]).consumed == 0                    # blob across RAM's end
    assert lib.run([_launch(key, GPA + DATA_OFF, 4097)]).consumed == 0                 # over MAX_ARG_BYTES
    assert lib.run([_launch(key, GPA + DATA_OFF, 16, flags=1)]).consumed == 0          # SG_INDIRECT
    assert lib.run([_launch(key, GPA + DATA_OFF, 16, flags=4)]).consumed == 0          # a reserved flag
    assert lib.run([_launch(key, GPA + DATA_OFF, 16, flags=2)]).consumed == 1          # IRQ is fine
    assert [c[0] for c in lib.calls] == ["launch", "launch"]


def test_plan_table_refusals(lib):
    assert _plan(lib, (1, 2, 3, 4), b"", offsets=(16,)) == -1        # an offset outside the parameters
    assert _plan(lib, (1, 2, 3, 4), bytes(4097)) == -1               # a blob over MAX_ARG_BYTES
    for i in range(fastlane.MAX_PLANS):
        assert _plan(lib, (i, 2, 3, 4), b"") == 0
    assert _plan(lib, (10_000, 2, 3, 4), b"") == -2                  # full: the caller clears it
    assert _plan(lib, (5, 2, 3, 4), b"") == -2                       # (a replacement too, once full)
    assert lib.lib.fl_plan_count(lib.ctx) == fastlane.MAX_PLANS
    lib.lib.fl_plans_clear(lib.ctx)
    assert lib.lib.fl_plan_count(lib.ctx) == 0


def test_queue_room_and_driver_errors_stop_before_the_descriptor(lib):
    key = (7, 2, 3, 4)
    assert _plan(lib, key, b"") == 0
    b = lib.batch
    descs = [_launch(key) for _ in range(5)]
    for i, d in enumerate(descs):
        lib.write(SQ_OFF + i * 64, d)
    b.start, b.pending, b.queued, b.depth = 1, 0, 0, 3
    b.sq, b.cq, b.hdr = lib.base + SQ_OFF, lib.base + CQ_OFF, lib.base + HDR_OFF
    b.sq_mask = b.cq_mask = ENTRIES - 1
    b.sq_entries, b.sq_head, b.cq_index, b.max, b.cq_room, b.reread = ENTRIES, 0, 0, 5, 0, 0
    lib.lib.fl_run(lib.ctx, ctypes.addressof(b))
    assert b.consumed == 3 and b.stop == fastlane.STOP_ROOM and b.pending == 3
    lib.fail = True
    b2 = lib.run([_copy(Opcode.MEM_COPY_HTOD, DEV, GPA, 8)])
    assert b2.consumed == 0 and b2.stop == fastlane.STOP_DRIVER and b2.driver_error == 1


def test_completions_land_in_their_slots_and_nothing_else_is_written(lib):
    key = (9, 2, 3, 4)
    assert _plan(lib, key, b"") == 0
    lib.write(CQ_OFF, b"\xee" * (ENTRIES * 32))
    lib.head = ENTRIES - 2                                            # wraps the rings
    b = lib.run([_launch(key), abi.DESCRIPTOR.pack(Opcode.NOP, 0, 0, 6, 0, 0, 0, 0, 0, 0), _launch(key)])
    assert b.consumed == 3
    cq = ctypes.string_at(lib.base + CQ_OFF, ENTRIES * 32)
    slots = {i: abi.COMPLETION.unpack_from(cq, i * 32) for i in range(ENTRIES)}
    assert [slots[i][0] for i in (ENTRIES - 2, ENTRIES - 1, 0)] == [5, 6, 5]
    assert all(slots[i][1:] == (0, 0, 0, 0) for i in (ENTRIES - 2, ENTRIES - 1, 0))
    assert all(cq[i * 32:(i + 1) * 32] == b"\xee" * 32 for i in range(1, ENTRIES - 2))
