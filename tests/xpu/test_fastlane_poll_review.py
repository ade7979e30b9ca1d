"""Review of the fast lane's native poll loop (``fl_poll`` and its quiesce handshake, commits
01cde2a, 7d179be, 255d201, 3bce788): tests of the holes it found (each failed before its fix:
768d2f8 batch count, bf2e1f7 interrupt ahead of a FENCE and the query spin's budget) and
regression tests for the properties the review verified.

Two levels:

* :class:`Ring`: the C library on its own (``fl_poll`` in a thread over rings in one ctypes
  buffer, a fake driver whose ``sync``/``query`` the test drives), to pin down the handshake
  deterministically: what ``fl_quiesce`` waits for, that nothing is written to guest memory once
  it returned, that every way out of ``fl_poll`` clears ``busy``, hostile indices, the
  completion room and the group bound.
* :class:`~tests.xpu.ringdriver.XpuRig` with :class:`~tests.xpu.test_fastlane.FakeGpu`: the
  poller around the loop (accounting, hand-offs), against the Python path.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from vxpu.vfio_server.xpu import fastlane

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import Opcode

from .ringdriver import SQ_OFF as RIG_SQ_OFF
from .ringdriver import XpuRig, desc
from .test_commands import _msi
from .test_fastlane import DTOH_FN, HTOD_FN, LAUNCH_FN, NOT_READY, QUERY_FN, SYNC_FN, FakeGpu, setup_kernels

GPA = 0x1_0000_0000             # guest-physical base of the fake RAM
RAM = 1 << 20
SQ_OFF, CQ_OFF, HDR_OFF, DATA_OFF = 0x0, 0x10000, 0x20000, 0x30000   # rings up to 1024 / 2048 entries
ENTRIES = 64
DEV = 0x7000_0000              # the one allocation: [DEV, DEV + 1 MiB)
FILL = b"\xee" * 32            # an unwritten completion slot
_U32 = struct.Struct("<I")


def _nop(tag: int) -> bytes:
    return abi.DESCRIPTOR.pack(Opcode.NOP, 0, 0, tag, 0, 0, 0, 0, 0, 0)


def _htod(tag: int, n: int = 16) -> bytes:
    return abi.DESCRIPTOR.pack(Opcode.MEM_COPY_HTOD, 0, 1, tag, DEV, 0, 0, 0, GPA + DATA_OFF, n)


def _memset(tag: int) -> bytes:         # an opcode the lane never takes
    return abi.DESCRIPTOR.pack(Opcode.MEM_SET, 0, 0, tag, DEV, 0, 16, 0, 0, 0)


class Ring:
    """One lane context over a fake driver, rings and data in one ctypes buffer, and fl_poll
    run in a thread (GIL released) as the poller runs it."""

    def __init__(self, entries: int = ENTRIES, cq_entries: int | None = None) -> None:
        lib = fastlane.load()
        assert lib is not None, fastlane.unavailable()
        self.lib = lib
        self.entries = entries
        self.cq_entries = cq_entries or entries
        self.calls: list[tuple[Any, ...]] = []
        self.queries = 0
        self.query_result = NOT_READY          # what the stream query answers
        self.sync_result = 0
        self.sync_gate: threading.Event | None = None    # a blocking wait holds until it is set
        self.in_sync = threading.Event()
        self.launched = threading.Event()
        self.launch_s = 0.0                      # each launch takes this long (a driver call)

        def launch(f: int, *a: Any) -> int:
            self.calls.append(("launch", f))
            self.launched.set()
            if self.launch_s:
                time.sleep(self.launch_s)
            return 0

        def htod(d: int, s: int, n: int, st: int) -> int:
            self.calls.append(("htod", d, s - self.base, n))
            return 0

        def dtoh(d: int, s: int, n: int, st: int) -> int:
            self.calls.append(("dtoh", s, d - self.base, n))
            return 0

        def sync() -> int:
            self.calls.append(("sync",))
            self.in_sync.set()
            gate = self.sync_gate
            if gate is not None:
                gate.wait(10)
            return self.sync_result

        def query(_stream: int) -> int:
            self.queries += 1
            return self.query_result
        self._fns = [LAUNCH_FN(launch), HTOD_FN(htod), DTOH_FN(dtoh), SYNC_FN(sync), QUERY_FN(query)]
        self.driver = fastlane.Driver(*(ctypes.cast(f, ctypes.c_void_p).value for f in self._fns))
        self.ctx = ctypes.c_void_p(lib.fl_new(ctypes.byref(self.driver)))
        assert self.ctx
        self.ram = (ctypes.c_char * RAM)()
        self.base = ctypes.addressof(self.ram)
        ctypes.memmove(self.base + CQ_OFF, FILL * self.cq_entries, 32 * self.cq_entries)
        table = (fastlane.Region * 1)(fastlane.Region(GPA, GPA + RAM, self.base, 1, 1))
        assert lib.fl_set_regions(self.ctx, table, 1) == 0
        allocs = (fastlane.Alloc * 1)(fastlane.Alloc(DEV, 1 << 20))
        assert lib.fl_set_allocs(self.ctx, allocs, 1) == 0
        lib.fl_set_copy_stream(self.ctx, 0x77, 1)
        lib.fl_set_fence(self.ctx, 1, 0)          # FENCEs native, no fault record to read
        self.batch = fastlane.Batch()
        self.poll = fastlane.Poll()
        self.sq_head = self.cq_tail = self.cq_head = 0
        self.tail = 0
        self.completed = 0
        self.thread: threading.Thread | None = None
        self.returned = threading.Event()

    def close(self) -> None:
        if self.sync_gate is not None:
            self.sync_gate.set()
        if self.thread is not None:             # (a test that failed with the poll running)
            self.query_result = 0
            self.lib.fl_halt(self.ctx)
            self.thread.join(10)
            if self.thread.is_alive():
                return                          # never free a context a poll still runs on
        self.lib.fl_free(self.ctx)

    # -- guest side ------------------------------------------------------------------------
    def hdr(self, off: int) -> int:
        return int(_U32.unpack(ctypes.string_at(self.base + HDR_OFF + off, 4))[0])

    def set_hdr(self, off: int, value: int) -> None:
        ctypes.c_uint32.from_address(self.base + HDR_OFF + off).value = value & 0xFFFF_FFFF

    def post(self, descs: list[bytes]) -> None:
        for d in descs:
            ctypes.memmove(self.base + SQ_OFF + (self.tail % self.entries) * 64, d, 64)
            self.tail += 1
        self.set_hdr(abi.QH_SQ_TAIL, self.tail)

    def slots(self) -> list[bytes]:
        raw = ctypes.string_at(self.base + CQ_OFF, 32 * self.cq_entries)
        return [raw[i * 32:(i + 1) * 32] for i in range(self.cq_entries)]

    def snapshot(self) -> bytes:
        return ctypes.string_at(self.base, DATA_OFF)   # header, rings

    # -- the poller side -------------------------------------------------------------------
    def start(self, first_s: float = 5.0, spin_s: float = 5.0, run_s: float = 10.0, irq: bool = False,
              queued: int = 0, depth: int = 1024) -> None:
        b, p = self.batch, self.poll
        b.sq, b.cq, b.hdr = self.base + SQ_OFF, self.base + CQ_OFF, self.base + HDR_OFF
        b.sq_mask, b.cq_mask, b.sq_entries = self.entries - 1, self.cq_entries - 1, self.entries
        b.sq_head = self.sq_head
        b.start, b.pending, b.queued, b.depth = 1, 0, queued, depth
        p.first_ns, p.spin_ns, p.run_ns = int(first_s * 1e9), int(spin_s * 1e9), int(run_s * 1e9)
        p.cq_entries, p.irq = self.cq_entries, int(irq)
        p.cq_tail, p.cq_head, p.completed = self.cq_tail, self.cq_head, self.completed
        self.returned.clear()
        self.lib.fl_resume(self.ctx)

        def run() -> None:
            self.lib.fl_poll(self.ctx, ctypes.addressof(self.batch), ctypes.addressof(self.poll))
            self.returned.set()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 10.0) -> fastlane.Poll:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "fl_poll did not return"
        self.thread = None
        p = self.poll
        self.sq_head, self.cq_tail, self.cq_head, self.completed = self.batch.sq_head, p.cq_tail, p.cq_head, p.completed
        return p

    def quiesce(self, timeout: float = 5.0) -> float:
        """fl_quiesce from another thread (as the serve loop calls it); the seconds it took.
        Fails (leaving a spinning daemon thread) when it does not return: ``busy`` stuck."""
        done = threading.Event()
        t0 = time.monotonic()

        def run() -> None:
            self.lib.fl_quiesce(self.ctx)
            done.set()
        threading.Thread(target=run, daemon=True).start()
        assert done.wait(timeout), "fl_quiesce did not return: busy left set"
        return time.monotonic() - t0


@pytest.fixture
def ring():
    got = Ring()
    yield got
    got.close()


def _wait(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.0005)


# -- the handshake ---------------------------------------------------------------------------------
def test_quiesce_during_the_copy_query_spin_returns_before_the_blocking_wait_and_nothing_is_written_after(ring):
    """255d201: while a group's copies wait, the loop spins on cuStreamQuery with ``busy`` set.
    A quiesce must end that spin (stop is checked there), and return while the loop's blocking
    wait is still in progress (made with busy clear); after it returned the loop writes nothing
    to guest memory (no sq_head, no completion, no cq_tail), and hands the open group back."""
    ring.sync_gate = threading.Event()                # the device wait holds until released
    ring.post([_htod(1), _htod(2)])
    ring.start()
    _wait(lambda: ring.queries > 20)                  # in the query spin (the fake never finishes)
    took = ring.quiesce()
    before = ring.snapshot()                          # quiesce has returned
    assert took < 2.0
    assert ring.in_sync.wait(2)                       # the loop is in its blocking wait now
    assert not ring.returned.is_set()
    ring.sync_gate.set()
    p = ring.join()
    assert ring.snapshot() == before                  # nothing written after quiesce returned
    assert p.reason == fastlane.PR_GROUP and ring.batch.group == 2 and ring.batch.syncs == 0
    assert p.waits == 1 and p.posted == 0
    assert ring.hdr(abi.QH_CQ_TAIL) == 0 and ring.slots()[2:] == [FILL] * (ENTRIES - 2)


def test_after_quiesce_and_before_resume_a_poll_touches_nothing(ring):
    """A quiesce with no poll running leaves ``stop`` set: a poll started without fl_resume
    returns PR_QUIESCE before it reads or writes anything (the poller resumes under the lock)."""
    assert ring.quiesce() < 1.0
    ring.post([_nop(1)])
    before = ring.snapshot()
    b, p = ring.batch, ring.poll
    b.sq, b.cq, b.hdr = ring.base + SQ_OFF, ring.base + CQ_OFF, ring.base + HDR_OFF
    b.sq_mask = b.cq_mask = ENTRIES - 1
    b.sq_entries, b.depth = ENTRIES, 64
    p.first_ns = p.spin_ns = p.run_ns = 10**9
    p.cq_entries = ENTRIES
    assert ring.lib.fl_poll(ring.ctx, ctypes.addressof(b), ctypes.addressof(p)) == fastlane.PR_QUIESCE
    assert ring.snapshot() == before and not ring.calls


@pytest.mark.parametrize("case", ["idle", "budget", "index", "handoff", "posted", "group_sync_error",
                                  "fence", "fence_sync_error", "cq_full"])
def test_every_way_out_of_the_poll_clears_busy(ring, case):
    """A return that left ``busy`` set would hang the next quiescer (an unmap, a reset) for good."""
    kw: dict[str, Any] = {"first_s": 0.02, "spin_s": 0.02, "run_s": 5.0}
    if case == "budget":
        kw = {"first_s": 5.0, "spin_s": 5.0, "run_s": 0.02}
    elif case == "index":
        ring.set_hdr(abi.QH_SQ_TAIL, ENTRIES + 1)
    elif case == "handoff":
        ring.post([_nop(1), _memset(2)])
    elif case == "posted":
        ring.post([_nop(1)])
        kw["irq"] = True
    elif case == "group_sync_error":
        ring.query_result = 700                        # the query errs: the blocking wait decides
        ring.sync_result = 700
        ring.post([_htod(1)])
    elif case == "fence":
        ring.post([_nop(1), abi.DESCRIPTOR.pack(Opcode.FENCE, 0, 0, 9, 0, 0, 0, 0, 0, 0)])
        kw["queued"] = 1
    elif case == "fence_sync_error":
        ring.sync_result = 700
        ring.post([_nop(1), abi.DESCRIPTOR.pack(Opcode.FENCE, 0, 0, 9, 0, 0, 0, 0, 0, 0)])
        kw["queued"] = 1
    elif case == "cq_full":
        ring.cq_tail = ENTRIES                        # the guest consumed nothing of a full ring
        ring.completed = ENTRIES
        ring.sq_head = ring.tail = ENTRIES
        ring.set_hdr(abi.QH_CQ_TAIL, ENTRIES)
        ring.post([_nop(1)])
    ring.start(**kw)
    p = ring.join()
    want = {"idle": fastlane.PR_IDLE, "budget": fastlane.PR_BUDGET, "index": fastlane.PR_INDEX,
            "handoff": fastlane.PR_HANDOFF, "posted": fastlane.PR_POSTED, "group_sync_error": fastlane.PR_GROUP,
            "fence": fastlane.PR_IDLE, "fence_sync_error": fastlane.PR_GROUP, "cq_full": fastlane.PR_IDLE}[case]
    assert p.reason == want
    assert ring.quiesce() < 1.0


# -- hostile indices, the completion room, the group bound ----------------------------------------
@pytest.mark.parametrize("tail", [ENTRIES + 1, 0xFFFF_FFFF, 0x8000_0000])
def test_a_hostile_sq_tail_at_the_start_is_pr_index_and_nothing_is_read_or_written(ring, tail):
    ring.set_hdr(abi.QH_SQ_TAIL, tail)
    before = ring.snapshot()
    ring.start(first_s=0.5)
    p = ring.join()
    assert p.reason == fastlane.PR_INDEX and p.taken == 0 and not ring.calls
    assert ring.snapshot() == before


@pytest.mark.parametrize("head", [5, 0xFFFF_FFFF])
def test_a_hostile_cq_head_while_copies_wait_posts_the_group_then_pr_index(ring, head):
    """cq_head moved past cq_tail (or back) while the group's copies wait: nothing more joins
    the group, PR_INDEX follows for Python's validation (today after the group is posted: its
    room was validated before; the Python path would stop the queue without posting it), and
    no slot beyond the group's is written."""
    ring.post([_htod(1), _htod(2), _htod(3)])
    ring.start()
    _wait(lambda: ring.queries > 5)
    ring.set_hdr(abi.QH_CQ_HEAD, head)                 # cq_tail is 0: any other value is invalid
    ring.post([_nop(4)])                               # (would join the group if it validated)
    p = ring.join()
    assert p.reason == fastlane.PR_INDEX and p.posted in (0, 3) and ring.hdr(abi.QH_CQ_TAIL) == p.posted
    assert [s[:8] for s in ring.slots()[:3]] == [struct.pack("<Q", t) for t in (1, 2, 3)]    # (unposted or posted)
    assert ring.slots()[3:] == [FILL] * (ENTRIES - 3)
    assert ring.hdr(abi.QH_SQ_HEAD) == 3


def test_a_full_completion_ring_gets_no_write_until_the_guest_consumes():
    """The guest consumed nothing of a full completion ring and posts more: the loop writes no
    slot; each slot the guest then frees is written once, in order (never an unread one)."""
    ring = Ring(entries=16, cq_entries=16)
    try:
        ring.cq_tail = ring.completed = ring.sq_head = ring.tail = 16
        ring.set_hdr(abi.QH_CQ_TAIL, 16)
        ring.set_hdr(abi.QH_SQ_HEAD, 16)
        ring.post([_nop(100 + i) for i in range(16)])
        before = ring.snapshot()
        ring.start(first_s=0.05, spin_s=0.05)
        p = ring.join()
        assert p.reason == fastlane.PR_IDLE and p.taken == 0 and ring.snapshot() == before
        for freed in (3, 10, 16):
            ring.set_hdr(abi.QH_CQ_HEAD, freed)
            ring.start(first_s=0.05, spin_s=0.05)
            p = ring.join()
            assert ring.cq_tail == 16 + freed and ring.hdr(abi.QH_CQ_TAIL) == 16 + freed
            slots = ring.slots()
            assert [struct.unpack_from("<Q", slots[i])[0] for i in range(freed)] == list(range(100, 100 + freed))
            assert slots[freed:] == [FILL] * (16 - freed)
    finally:
        ring.close()


def test_a_group_grown_while_copies_wait_stops_at_256_and_stays_in_its_room():
    """While the copies' query says "running", the loop keeps taking what the guest posts
    (255d201): the group never passes FL_GROUP (tags/ops/flags arrays), and every completion
    lands in a slot the guest has consumed."""
    ring = Ring(entries=512, cq_entries=1024)
    try:
        ring.post([_htod(0)])
        ring.start()
        _wait(lambda: ring.queries > 3)
        for r in range(8):                              # 8 x 60 more, posted while it spins
            ring.post([_nop(1 + 60 * r + i) for i in range(60)])
            time.sleep(0.01)
        _wait(lambda: ring.batch.group >= fastlane.GROUP or ring.returned.is_set(), 5)
        ring.query_result = 0                           # the copies are done
        p = ring.join() if ring.returned.is_set() else None
        if p is None:
            _wait(lambda: ring.hdr(abi.QH_CQ_TAIL) >= fastlane.GROUP)
            ring.lib.fl_halt(ring.ctx)
            p = ring.join()
        assert ring.hdr(abi.QH_CQ_TAIL) >= fastlane.GROUP
        first = ring.slots()[:fastlane.GROUP]
        assert [struct.unpack_from("<Q", s)[0] for s in first] == list(range(fastlane.GROUP))
        assert p.max_batch <= 64
    finally:
        ring.close()


# -- the poller around the loop --------------------------------------------------------------------
def _rig(tmp_path: Path, name: str, **kw: Any) -> XpuRig:
    return XpuRig(tmp_path / f"{name}.sock", FakeGpu(), fastlane=True, **kw)


def test_a_hand_off_counts_one_batch_as_the_python_path_does(tmp_path, monkeypatch):
    got = {}
    for mode in ("poll", "issue"):
        monkeypatch.setenv(fastlane.POLL_ENV, "1" if mode == "poll" else "0")
        with _rig(tmp_path, mode) as rig:
            _inc, _empty = setup_kernels(rig)
            dev = rig.alloc(4096)
            assert rig.htod(dev, b"warm").status == 0
            rig.settle()
            st = rig.device.poller.stats
            before = st.batches
            for _ in range(10):           # one NOP for the lane, a MEM_SET it hands to Python
                got_ = rig.run([desc(Opcode.NOP, tag=1), desc(Opcode.MEM_SET, [dev, 1, 16], tag=2)])
                assert [c.status for c in got_] == [0, 0]
                time.sleep(0.003)         # (each pair arrives as one batch)
            rig.settle()
            got[mode] = st.batches - before
            if mode == "poll":
                assert lane_polls(rig, fastlane.PR_HANDOFF) >= 5
    assert got["poll"] == got["issue"]


def lane_polls(rig: XpuRig, reason: int) -> int:
    rig.settle()
    ln = rig.device.poller.fastlane
    assert ln is not None
    return ln.polls.get(reason, 0)


# -- a randomized run of the loop against a consuming guest ---------------------------------------
def _emulate_python(ring: Ring, p: fastlane.Poll) -> None:
    """What the poller does with an open group / FENCE handed back after a wait (no error, no
    stop reason of its own here): post the group's completions C wrote, then the FENCE's."""
    b = ring.batch
    tail = p.cq_tail
    if b.group:
        tail += b.group
        b.group = 0
    if p.fence:
        slot = ring.base + CQ_OFF + (tail % ring.cq_entries) * 32
        ctypes.memmove(slot, struct.pack("<QQQII", b.stop_tag, 0, 0, 0, 0), 32)
        tail += 1
    ring.set_hdr(abi.QH_CQ_TAIL, tail)
    ring.cq_tail = tail & 0xFFFF_FFFF


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_streams_with_quiesces_complete_each_descriptor_once_in_order_into_consumed_slots(seed):
    """A guest posts random lane-only streams (NOP, HTOD, DTOH, FENCE) in random chunks and
    consumes completions at random, poisoning each slot it read; the device's stream query says
    "running" at random; a quiescer stops the loop at random moments, checks that nothing is
    written while it is stopped, and the poller resumes it. Every completion is read exactly
    once, in submission order, OK (C never wrote into a slot the guest had not consumed, never
    lost or repeated one)."""
    import random
    rnd = random.Random(seed)
    ring = Ring(entries=64, cq_entries=128)
    try:
        ops = {"nop": lambda t: _nop(t), "htod": lambda t: _htod(t),
               "dtoh": lambda t: abi.DESCRIPTOR.pack(Opcode.MEM_COPY_DTOH, 0, 1, t, DEV, 0, 0, 0,
                                                     GPA + DATA_OFF, 16),
               "fence": lambda t: abi.DESCRIPTOR.pack(Opcode.FENCE, 0, 0, t, 0, 0, 0, 0, 0, 0)}
        next_tag, expect = 1, 1
        consumed = 0                                    # the guest's cq_head
        total = 1500
        seen: dict[int, int] = {}
        ring.start(first_s=5.0, spin_s=5.0, run_s=10.0)
        while expect <= total:
            ring.query_result = rnd.choice([0, NOT_READY, NOT_READY])
            room = ring.entries - (next_tag - 1 - ring.hdr(abi.QH_SQ_HEAD)) % (1 << 32)
            if next_tag <= total and room > 0 and rnd.random() < 0.6:
                k = min(room, rnd.randrange(1, 40), total - next_tag + 1)
                ring.post([ops[rnd.choice(["nop", "nop", "htod", "dtoh", "fence"])](next_tag + i) for i in range(k)])
                next_tag += k
            tail = ring.hdr(abi.QH_CQ_TAIL)
            n = (tail - consumed) % (1 << 32)
            assert n <= ring.cq_entries
            take = rnd.randrange(0, n + 1)
            for _ in range(take):
                slot = ring.base + CQ_OFF + (consumed % ring.cq_entries) * 32
                tag, r1, r2, status, _res = struct.unpack("<QQQII", ctypes.string_at(slot, 32))
                assert (tag, r1, r2, status) == (expect, 0, 0, 0), (tag, expect)
                ctypes.memmove(slot, FILL, 32)          # read: a later write here must be a new one
                consumed += 1
                expect += 1
            ring.set_hdr(abi.QH_CQ_HEAD, consumed)
            if rnd.random() < 0.08:                     # the serve loop: quiesce, check, resume
                ring.quiesce()
                frozen = ring.snapshot()
                time.sleep(0.02)
                assert ring.snapshot() == frozen
                p = ring.join()
                seen[p.reason] = seen.get(p.reason, 0) + 1
                assert p.reason in (fastlane.PR_QUIESCE, fastlane.PR_GROUP), p.reason
                if p.reason == fastlane.PR_GROUP:
                    assert ring.batch.syncs == 0       # the wait was made; only the post is left
                    _emulate_python(ring, p)
                ring.start(first_s=5.0, spin_s=5.0, run_s=10.0)
            elif ring.returned.is_set():
                p = ring.join()
                assert p.reason in (fastlane.PR_GROUP,), p.reason
                _emulate_python(ring, p)
                ring.start(first_s=5.0, spin_s=5.0, run_s=10.0)
            time.sleep(rnd.random() * 0.0005)
        ring.lib.fl_halt(ring.ctx)
        ring.join()
        assert expect == total + 1
        assert seen.get(fastlane.PR_QUIESCE, 0) + seen.get(fastlane.PR_GROUP, 0) >= 5, seen
    finally:
        ring.close()


class QueryHeldGpu(FakeGpu):
    """A FakeGpu whose stream query (the poll loop's copy wait, 255d201) answers "running" while
    :attr:`hold` is set: the loop then spins in its query loop with ``busy`` set."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.held_queries = 0

    def native_driver(self) -> dict[str, int] | None:
        table = super().native_driver()
        assert table is not None
        inner = QUERY_FN(table["query"])

        def query(stream: Any) -> int:
            if self.hold:
                self.held_queries += 1
                return NOT_READY
            return int(inner(stream))
        fn = QUERY_FN(query)
        self.dev.keep.append(fn)
        table["query"] = ctypes.cast(fn, ctypes.c_void_p).value or 0
        return table


@pytest.mark.parametrize("what", ["reset", "unmap", "irq"])
def test_the_copy_query_spin_ends_at_once_for_a_control_request_an_unmap_or_new_irq_settings(
        tmp_path, monkeypatch, what):
    """While a group's copies are "running" the loop spins on the stream query with ``busy``
    set, unbounded by the poll's budget: a control request, a DMA unmap (its quiesce, under
    GuestRam.lock) and an interrupt setting must still end it at once."""
    from vxpu.vfio_server.client import GuestMemory
    from vxpu.vfio_server.xpu import poller_native

    from vxpu.abi.xpu import Control, DeviceStatus, IrqControl
    monkeypatch.setattr(poller_native, "POLL_RUN_S", 10.0)
    backend = QueryHeldGpu()
    with GuestMemory(1 << 20) as extra, XpuRig(tmp_path / f"qh{what}.sock", backend, fastlane=True) as rig:
        rig.client.map_guest_ram(extra, 0x4000_0000)
        dev = rig.alloc(4096)
        assert rig.htod(dev, b"warm").status == 0
        poller = rig.device.poller
        p = poller
        p.min_spin_s = p.max_spin_s = p.spin_s = 5.0
        assert rig.run([desc(Opcode.NOP)])[0].status == 0
        _wait(lambda: poller.native_poll_active, 2.0)
        backend.hold = True
        rig.submit([desc(Opcode.MEM_COPY_HTOD, [dev + 64 * i], sg=(rig.addr(0x30_0000), 64), tag=10 + i)
                    for i in range(3)])
        _wait(lambda: backend.held_queries > 50)
        t0 = time.monotonic()
        if what == "reset":
            before = rig.reg(abi.REG_RESET_COUNT)
            rig.set_reg(abi.REG_CONTROL, Control.RESET, posted=False)
            _wait(lambda: rig.reg(abi.REG_RESET_COUNT) != before)
            got = rig.completions(3)
            assert [c.tag for c in got] == [10, 11, 12]
        elif what == "unmap":
            rig.client.dma_unmap(0x4000_0000, 1 << 20)
            got = rig.completions(3)
            assert [(c.tag, c.status) for c in got] == [(10, 0), (11, 0), (12, 0)]
        else:
            rig.set_reg(abi.REG_IRQ_CONTROL, IrqControl.COMPLETION, posted=False)
            got = rig.completions(3)
            assert [(c.tag, c.status) for c in got] == [(10, 0), (11, 0), (12, 0)]
        took = time.monotonic() - t0
        backend.hold = False
        assert took < 1.0, f"{what} took {took * 1e3:.0f} ms with the loop in its query spin"
        if what == "reset":
            assert rig.enable() & DeviceStatus.ENABLED
        rig.alive()


def _first_irq_after_a_slow_fence(tmp_path: Path, name: str) -> tuple[float, float]:
    """[LAUNCH, NOP|IRQ, FENCE] with a device wait of 0.5 s: (when the NOP's completion was
    visible, when vector 0 fired), in seconds after the submit."""
    import select

    from vxpu.abi.xpu import DescFlags, IrqControl

    from .test_fastlane import empty_desc
    with XpuRig(tmp_path / f"{name}.sock", FakeGpu(), fastlane=True) as rig:
        _inc, empty = setup_kernels(rig)
        dev = rig.alloc(4096)
        assert rig.htod(dev, b"warm").status == 0
        assert all(c.status == 0 for c in rig.run([empty_desc(empty), desc(Opcode.FENCE)]))   # the plan
        fd = _msi(rig)
        try:
            rig.set_reg(abi.REG_IRQ_COALESCE_COUNT, 1000)         # only the IRQ flag signals
            rig.set_reg(abi.REG_IRQ_COALESCE_USEC, 100_000)
            rig.set_reg(abi.REG_IRQ_CONTROL, int(IrqControl.COMPLETION), posted=False)
            time.sleep(0.05)
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            fake = rig.device.backend.dev
            inner = fake.sync

            def slow(stream: Any = None) -> int:
                if stream is None:                 # the device-wide wait (FENCE's)
                    time.sleep(0.5)
                return int(inner(stream))
            fake.sync = slow                       # type: ignore[method-assign]
            t0 = time.monotonic()
            rig.submit([empty_desc(empty, tag=1), desc(Opcode.NOP, tag=2, flags=DescFlags.IRQ),
                        desc(Opcode.FENCE, tag=3)])
            t_nop = t_irq = None
            while time.monotonic() - t0 < 5 and (t_nop is None or t_irq is None):
                if t_nop is None and (rig.hdr(abi.QH_CQ_TAIL) - rig.cq_head) & 0xFFFF_FFFF >= 2:
                    t_nop = time.monotonic() - t0
                ready, _, _ = select.select([fd], [], [], 0.001)
                if ready and t_irq is None:
                    t_irq = time.monotonic() - t0
            assert t_nop is not None and t_irq is not None
            assert [c.tag for c in rig.completions(3)] == [1, 2, 3]
            fake.sync = inner                      # type: ignore[method-assign]
            return t_nop, t_irq
        finally:
            os.close(fd)


def test_the_python_path_signals_a_group_before_the_fence_waits(tmp_path, monkeypatch):
    """Reference for the next test: without the poll loop, the IRQ flag's interrupt comes right
    after its group, not after the FENCE's device wait."""
    monkeypatch.setenv(fastlane.POLL_ENV, "0")
    t_nop, t_irq = _first_irq_after_a_slow_fence(tmp_path, "irqissue")
    assert t_nop < 0.3 and t_irq < 0.3, (t_nop, t_irq)


def test_an_interrupt_due_before_a_fence_is_not_held_by_the_fence_s_wait(tmp_path, monkeypatch):
    """pollreview (fixed in bf2e1f7): fl_poll's STOP_FENCE branch posted the group, then made
    the FENCE's device wait before returning PR_POSTED, so the group's interrupt (DescFlags.IRQ,
    coalesce count) waited for the FENCE's wait (0.5 s here; 0.6 ms on the Python path)."""
    monkeypatch.setenv(fastlane.POLL_ENV, "1")
    t_nop, t_irq = _first_irq_after_a_slow_fence(tmp_path, "irqpoll")
    assert t_nop < 0.3, t_nop                      # the completion itself is posted at once ...
    assert t_irq < 0.3, (t_nop, t_irq)             # ... its interrupt must be too


@pytest.mark.parametrize("index", ["sq_tail", "cq_head"])
def test_an_index_invalid_for_a_moment_while_the_loop_spins_is_reread_not_fatal(tmp_path, monkeypatch, index):
    """PR_INDEX hands the decision to Python, which re-reads an invalid-looking index for
    REREAD_S (a guest storing it byte by byte): one that is valid again within that is not
    fatal, with the loop spinning as without it."""
    from vxpu.vfio_server.xpu import queue

    from vxpu.abi.xpu import DeviceStatus
    monkeypatch.setattr(queue, "REREAD_S", 0.5)          # (a loaded 2-core box: the 20 ms below may stretch)
    with _rig(tmp_path, "torn" + index) as rig:
        dev = rig.alloc(256)
        assert rig.htod(dev, b"warm").status == 0
        poller = rig.device.poller
        poller.min_spin_s = poller.max_spin_s = poller.spin_s = 5.0     # it stays in the C loop meanwhile
        for r in range(10):
            assert rig.run([desc(Opcode.NOP, tag=r)])[0].status == 0
            _wait(lambda: poller.native_poll_active, 2.0)
            if index == "cq_head":
                rig.set_hdr(abi.QH_CQ_HEAD, rig.cq_head + 7)        # past cq_tail: invalid
                rig.submit([desc(Opcode.NOP, tag=100 + r)], doorbell=False)
                time.sleep(0.02)
                rig.set_hdr(abi.QH_CQ_HEAD, rig.cq_head)
            else:
                good = rig.sq_tail
                rig.write(RIG_SQ_OFF + (good % rig.sq_entries) * abi.SQ_ENTRY_SIZE, desc(Opcode.NOP, tag=100 + r))
                rig.set_hdr(abi.QH_SQ_TAIL, good + rig.sq_entries + 3)   # too far ahead: invalid
                time.sleep(0.02)
                rig.sq_tail = good + 1
                rig.set_hdr(abi.QH_SQ_TAIL, rig.sq_tail)
            got = rig.completions(1)
            assert got[0].tag == 100 + r and got[0].status == 0
            assert not rig.reg(abi.REG_STATUS) & DeviceStatus.FATAL
        assert lane_polls(rig, fastlane.PR_INDEX) >= 1      # (the loop saw it: Python decided)


def test_quiesce_mid_run_waits_for_one_launch_and_nothing_runs_or_is_written_after(ring):
    """3bce788: fl_run ends at the next descriptor once a quiescer set `stop`: the quiescer
    waits for the driver call in progress (and the post of what was taken), then no driver call
    and no guest-memory write happens until resume; the rest stays on the ring for later."""
    from .test_fastlane_native import _plan
    key = (0x99, 2, 3, 4)
    assert _plan(ring, key, b"") == 0        # type: ignore[arg-type]  # duck-typed: .lib, .ctx
    ring.launch_s = 0.03
    launch = abi.DESCRIPTOR.pack(Opcode.LAUNCH, 0, 0, 0, *key, 0, 0)
    ring.post([launch[:8] + struct.pack("<Q", 1 + i) + launch[16:] for i in range(12)])
    ring.start()
    assert ring.launched.wait(5)
    ring.quiesce()
    calls = len(ring.calls)
    frozen = ring.snapshot()
    time.sleep(0.1)
    assert len(ring.calls) == calls and ring.snapshot() == frozen
    assert calls <= 2, calls
    p = ring.join()
    assert p.reason == fastlane.PR_QUIESCE and p.taken == calls
    assert ring.hdr(abi.QH_SQ_HEAD) == calls and ring.hdr(abi.QH_CQ_TAIL) == calls   # what ran, posted
    ring.launch_s = 0.0
    ring.start(first_s=0.05, spin_s=0.05)                                         # resumed: the rest
    p = ring.join()
    assert ring.hdr(abi.QH_CQ_TAIL) == 12 and len(ring.calls) == 12


def test_the_copy_query_spin_keeps_the_poll_budget(ring):
    """pollreview (fixed in bf2e1f7): the copy query spin never looked at run_ns. The stream query keeps saying "running" (a long copy, or a long kernel on that stream);
    the device's blocking wait would return at once here. The poll still returns about when its
    budget (run_s) is spent, as documented, so Python's accounting and timers run."""
    ring.post([_htod(1)])
    ring.start(first_s=0.01, spin_s=0.01, run_s=0.05)
    returned = ring.returned.wait(1.0)
    ring.lib.fl_halt(ring.ctx)
    ring.join()
    assert returned, f"still in the query spin after 1 s ({ring.queries} queries)"


def test_indices_wrap_at_2_to_the_32(ring):
    """Free-running u32 indices across 2^32: the loop takes, completes and publishes across the
    wrap (slots by index & mask, cq_tail/sq_head wrapped, QH_COMPLETED a u64 that does not)."""
    start = 0xFFFF_FFF0
    ring.sq_head = ring.cq_tail = ring.cq_head = ring.tail = start
    ring.completed = 7 << 32
    for off in (abi.QH_SQ_HEAD, abi.QH_CQ_TAIL, abi.QH_CQ_HEAD):
        ring.set_hdr(off, start)
    ring.post([_nop(1000 + i) for i in range(40)])
    ring.start(first_s=0.05, spin_s=0.05)
    p = ring.join()
    assert p.reason == fastlane.PR_IDLE and p.taken == 40 and p.posted == 40
    end = (start + 40) & 0xFFFF_FFFF
    assert ring.hdr(abi.QH_SQ_HEAD) == end and ring.hdr(abi.QH_CQ_TAIL) == end and p.cq_tail == end
    assert struct.unpack("<Q", ctypes.string_at(ring.base + HDR_OFF + abi.QH_COMPLETED, 8))[0] == (7 << 32) + 40
    slots = ring.slots()
    for i in range(40):
        assert struct.unpack_from("<Q", slots[(start + i) % ENTRIES])[0] == 1000 + i
    # a cq_head that wrapped with it validates; one a wrap behind does not
    ring.set_hdr(abi.QH_CQ_HEAD, end)
    ring.post([_nop(2000)])
    ring.start(first_s=0.05, spin_s=0.05)
    assert ring.join().posted == 1
    ring.set_hdr(abi.QH_CQ_HEAD, (end + 1) ^ 0x8000_0000)
    ring.post([_nop(2001)])
    ring.start(first_s=0.05, spin_s=0.05)
    p = ring.join()
    assert p.reason == fastlane.PR_INDEX and p.posted == 0
