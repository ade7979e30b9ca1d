"""The fast lane's native poll loop (``fl_poll``, ``Poller._native_poll``) on the fake GPU.

While the queue runs and the lane is on, the poller thread spins in C (GIL released, no
guest-RAM lock) and runs whole lane-only cycles there; Python only accounts each poll when it
returns and finishes what the loop hands back. This file checks, against the
:class:`~tests.xpu.test_fastlane.FakeGpu` fake:

* the common path really runs in the loop (no Python ``_cycle`` in a steady stream);
* ``Poller._quiesce`` (the serve loop, under ``GuestRam.lock``) returns only once the loop is out
  of guest memory and the driver (after at most one more driver call), never waits for a device
  wait or a stream query, and nothing native runs until the poller resumes;
* DMA unmaps while the loop streams copies (statuses only, no crash; the ring's own region:
  RING_UNMAPPED), Control.RESET / QUEUE_ENABLE=0 while it spins (handled at once: poke), device
  reset and disconnect mid-stream (no DMA afterwards);
* hostile indices (PR_INDEX: Python's validation makes the queue fatal), descriptors rewritten
  while the loop reads them, a full completion ring.

Interrupts, accounting and errors surfaced in C are in test_fastlane_poll_accounts.py.

Timing assertions compare against a spin held at seconds (``_hold_spin``): without the poke or
the handshake under test they would take that long, with it they take milliseconds.
"""

from __future__ import annotations

import ctypes
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
from vxpu.vfio_server.client import GuestMemory
from vxpu.vfio_server.xpu import fastlane, poller_native

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import Control, DeviceStatus, FatalCode, Opcode

from .ringdriver import DATA_OFF, RAM_BASE, SQ_OFF, XpuRig, desc
from .test_fastlane import (
    ARG_OFF,
    LAUNCH_FN,
    NOT_READY,
    QUERY_FN,
    SYNC_FN,
    FakeDevice,
    FakeGpu,
    empty_desc,
    inc_desc,
    lane,
    setup_kernels,
)

EXTRA_BASE = 0x4000_0000         # a second DMA region (not the rings'), unmapped and mapped again
EXTRA_SIZE = 1 << 20
STATS_OFF = DATA_OFF + 0x8_0000  # the STATS command's reply buffer
HELD_SPIN_S = 2.0                # an idle spin held this long (see _hold_spin)
PROMPT_S = 0.25                  # "at once": well under HELD_SPIN_S, generous for a loaded 2-core box


class HookedGpu(FakeGpu):
    """A FakeGpu whose *native* launch, synchronize and stream-query entry points (the ones C
    calls) count their calls, note whether a launch found the guest-RAM lock free (then it came
    from the poll loop, which runs without it) and run a hook first: ``hooks[name]()`` returns
    None to go on to the fake's own entry point, or the result to return instead. The Python
    path's calls are untouched."""

    _TYPES: ClassVar[dict[str, Any]] = {"launch": LAUNCH_FN, "sync": SYNC_FN, "query": QUERY_FN}

    def __init__(self) -> None:
        super().__init__()
        self.hooks: dict[str, Callable[[], int | None]] = {}
        self.calls = {name: 0 for name in self._TYPES}
        self.lock_free = 0
        self.lock: Any = None                  # GuestRam.lock, once the device exists

    @property
    def native_launches(self) -> int:
        return self.calls["launch"]

    def native_driver(self) -> dict[str, int] | None:
        table = super().native_driver()
        if table is None:
            return None
        for name, kind in self._TYPES.items():
            if name in table:
                table[name] = self._wrap(name, kind, kind(table[name]))
        return table

    def _wrap(self, name: str, kind: Any, inner: Any) -> int:
        def entry(*args: Any) -> int:
            self.calls[name] += 1
            if name == "launch" and self.lock is not None and not self.lock.locked():
                self.lock_free += 1
            hook = self.hooks.get(name)
            got = hook() if hook is not None else None
            return int(inner(*args)) if got is None else got
        fn = kind(entry)
        self.dev.keep.append(fn)
        return ctypes.cast(fn, ctypes.c_void_p).value or 0


def _immediate_copies(dev: FakeDevice, seconds: float = 0.0) -> None:
    """Make the fake's copies happen in the driver call (not at the next synchronize), after
    ``seconds``: a copy then touches guest memory only while the lane (or Python) is in it, at
    its end. The fake's deferred memmove would touch guest memory at a later synchronize,
    possibly after an unmap: a real device's in-flight DMA, which neither path waits for before
    an unmap (out of this file's scope)."""

    def htod(dst: int, src: int, n: int, stream: Any) -> int:
        dev.log.append(("htod", dst, n, stream))
        time.sleep(seconds)
        ctypes.memmove(dev.host(dst, n), src, n)
        return 0

    def dtoh(dst: int, src: int, n: int, stream: Any) -> int:
        dev.log.append(("dtoh", src, n, stream))
        time.sleep(seconds)
        ctypes.memmove(dst, dev.host(src, n), n)
        return 0
    dev.htod = htod                 # type: ignore[method-assign]
    dev.dtoh = dtoh                 # type: ignore[method-assign]


def _rig(tmp_path: Path, name: str, backend: FakeGpu | None = None, **kw: Any) -> XpuRig:
    backend = backend if backend is not None else FakeGpu()
    rig = XpuRig(tmp_path / f"{name}.sock", backend, fastlane=True, **kw)
    if isinstance(backend, HookedGpu):
        backend.lock = rig.device.poller.ram.lock
    return rig


def _hold_spin(rig: XpuRig, seconds: float = HELD_SPIN_S) -> None:
    """Keep the poller's idle spin (and so the C loop's) at ``seconds``: without a poke or a
    quiesce, a request reaches Python only when the loop gives up spinning. (A poll running now
    returns first: the next ones spin that long.)"""
    p = rig.device.poller
    p.min_spin_s = p.max_spin_s = p.spin_s = seconds
    rig.settle()


def _wait(pred: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait until ``pred()``; returns the seconds it took (raises TimeoutError)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.0002)
    return time.monotonic() - t0


def _warm(rig: XpuRig) -> None:
    """Make the session's queue (a copy does): only then does the poller run the native poll."""
    dev = rig.alloc(256)
    assert rig.htod(dev, b"warm").status == 0


def _spinning(rig: XpuRig) -> None:
    """Wait until the poller is in a native poll (after the work just done it keeps spinning)."""
    _wait(lambda: rig.device.poller.native_poll_active, 2.0)


def _polls(rig: XpuRig, reason: int) -> int:
    return lane(rig).polls.get(reason, 0)


def _fatal(rig: XpuRig) -> tuple[int, int]:
    return rig.reg(abi.REG_FATAL_CODE), rig.reg(abi.REG_FATAL_INFO)


def _reset_and_reenable(rig: XpuRig) -> None:
    before = rig.reg(abi.REG_RESET_COUNT)
    rig.set_reg(abi.REG_CONTROL, Control.RESET)
    _wait(lambda: rig.reg(abi.REG_RESET_COUNT) != before)
    assert rig.enable() & DeviceStatus.ENABLED
    rig.alive()


def _counter(rig: XpuRig, dev: int) -> int:
    return int(struct.unpack("<I", rig.dtoh(dev, 4))[0])


@contextmanager
def _counting_cycles(rig: XpuRig) -> Iterator[list[int]]:
    """Count the poller's Python cycles (their results) while the block runs."""
    poller = rig.device.poller
    seen: list[int] = []
    inner = poller._cycle

    def counted(*args: Any, **kw: Any) -> int:
        n = inner(*args, **kw)
        seen.append(n)
        return n
    poller._cycle = counted             # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del poller._cycle


# -- 1. the common path runs in the loop -----------------------------------------------------------
def test_a_steady_stream_of_launches_and_fences_runs_in_the_poll_not_in_python_cycles(tmp_path: Path) -> None:
    """20 rounds of 10 LAUNCHes and a FENCE: the loop runs them all (no Python cycle completes
    anything, nothing is handed back, every launch comes without the guest-RAM lock) and the
    lane's and device's counters say so once the polls returned."""
    backend = HookedGpu()
    with _rig(tmp_path, "steady", backend) as rig:
        inc, _empty = setup_kernels(rig)
        dev = rig.alloc(256)
        assert [c.status for c in rig.run([inc_desc(rig, inc, dev, 1), desc(Opcode.FENCE)])] == [0, 0]
        ln = lane(rig)
        taken, polls, handed = ln.taken, sum(ln.polls.values()), dict(ln.polls)
        natives, free = backend.native_launches, backend.lock_free
        launches = rig.device.poller.stats.commands["LAUNCH"]
        fences = rig.device.poller.stats.commands["FENCE"]
        with _counting_cycles(rig) as cycles:
            for r in range(20):
                batch = [inc_desc(rig, inc, dev, 1, tag=100 * r + i) for i in range(10)]
                got = rig.run(batch + [desc(Opcode.FENCE, tag=100 * r + 99)])
                assert [c.tag for c in got] == [*(100 * r + i for i in range(10)), 100 * r + 99]
                assert all(c.status == 0 for c in got)
        ln = lane(rig)
        assert ln.taken - taken == 200                           # the launches (a FENCE is waited for, not taken)
        assert sum(ln.polls.values()) > polls
        for reason in (fastlane.PR_GROUP, fastlane.PR_HANDOFF, fastlane.PR_INDEX):   # nothing handed back
            assert ln.polls.get(reason, 0) == handed.get(reason, 0), ln.polls
        assert [n for n in cycles if n > 0] == []               # no completion came from a Python cycle
        assert backend.native_launches - natives == 200
        assert backend.lock_free - free >= 190                   # from the loop: the guest-RAM lock free
        assert rig.device.poller.stats.commands["LAUNCH"] - launches == 200
        assert rig.device.poller.stats.commands["FENCE"] - fences == 20
        assert _counter(rig, dev) == 201


# -- 2. quiesce ------------------------------------------------------------------------------------
def test_quiesce_waits_for_a_native_call_in_progress_and_nothing_native_runs_until_resume(tmp_path: Path) -> None:
    """A native launch takes 50 ms; a quiesce made meanwhile (under the lock, as the serve loop's
    sections do) returns only once it has ended, and while the lock is held nothing native runs
    and nothing is posted, though the guest submits more; all of it completes afterwards."""
    backend = HookedGpu()
    with _rig(tmp_path, "quiesce", backend) as rig:
        inc, _ = setup_kernels(rig)
        dev = rig.alloc(256)
        assert rig.run([inc_desc(rig, inc, dev, 1), desc(Opcode.FENCE)])[1].status == 0     # the plan
        poller = rig.device.poller
        entered = threading.Event()
        started, ended = [0], [0]
        in_poll: list[bool] = []

        def slow() -> None:
            started[0] += 1
            in_poll.append(poller.native_poll_active and not poller.ram.lock.locked())
            entered.set()
            time.sleep(0.05)
            ended[0] += 1
        backend.hooks["launch"] = slow
        rig.submit([inc_desc(rig, inc, dev, 1, tag=i) for i in range(3)])
        assert entered.wait(5)
        with poller.ram.lock:                   # as on_unmap / hard_reset / bus_master_lost do
            poller._quiesce()
            at_return = (started[0], ended[0])
            calls = backend.native_launches
            tail = rig.hdr(abi.QH_CQ_TAIL)
            rig.submit([inc_desc(rig, inc, dev, 1, tag=10 + i) for i in range(3)], doorbell=False)
            time.sleep(0.15)                    # the loop would have taken them by now
            assert backend.native_launches == calls
            assert rig.hdr(abi.QH_CQ_TAIL) == tail and rig.hdr(abi.QH_SQ_HEAD) == tail
        assert in_poll and in_poll[0]           # the first slow launch came from the C loop
        assert at_return[0] >= 1 and at_return[0] == at_return[1], at_return    # none still running
        backend.hooks.pop("launch")
        got = rig.completions(6)
        assert [c.tag for c in got] == [0, 1, 2, 10, 11, 12] and all(c.status == 0 for c in got)
        assert _counter(rig, dev) == 7


@pytest.mark.parametrize("what", ["fence", "copies_wait", "copies_query"])
def test_quiesce_does_not_wait_for_the_device_and_the_work_then_completes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         what: str) -> None:
    """Device waits run with ``busy`` clear: a quiesce while the loop waits (a FENCE's, or the
    blocking wait of a group of copies when the stream query cannot tell) returns at once; so
    does one while the loop asks the device about a group of copies (the query loop checks the
    stop). The loop hands the group or FENCE to Python, which completes it OK once the lock is
    free."""
    monkeypatch.setattr(poller_native, "POLL_RUN_S", 10.0)     # (the query spin also ends at the budget)
    backend = HookedGpu()
    with _rig(tmp_path, "qwait" + what, backend) as rig:
        inc, _ = setup_kernels(rig)
        dev = rig.alloc(4096)
        rig.write(DATA_OFF, b"c" * 256)
        copy = desc(Opcode.MEM_COPY_HTOD, [dev + 256], sg=(rig.addr(DATA_OFF), 256))
        assert all(c.status == 0 for c in rig.run([inc_desc(rig, inc, dev, 1), copy, desc(Opcode.FENCE)]))
        poller = rig.device.poller
        rig.settle()
        in_device = threading.Event()
        release = threading.Event()

        def in_the_loop() -> bool:
            return poller.native_poll_active and not poller.ram.lock.locked()

        def slow_sync() -> None:
            if in_the_loop() and not release.is_set():
                in_device.set()
                release.wait(0.3)

        first: list[float] = []

        def running() -> int | None:       # the stream query: still running, until released (1 s at most)
            first.append(time.monotonic())
            if release.is_set() or first[-1] - first[0] > 1.0:
                return None
            in_device.set()
            return NOT_READY
        backend.hooks["sync"] = slow_sync
        if what == "copies_wait":
            backend.hooks["query"] = lambda: None if release.is_set() else 1      # an error: the blocking wait
        elif what == "copies_query":
            backend.hooks["query"] = running
        group = _polls(rig, fastlane.PR_GROUP)
        if what == "fence":
            rig.submit([inc_desc(rig, inc, dev, 1, tag=1), desc(Opcode.FENCE, tag=2)])
        else:
            rig.submit([desc(Opcode.MEM_COPY_HTOD, [dev + 256 * (i + 1)], sg=(rig.addr(DATA_OFF), 256), tag=1 + i)
                        for i in range(2)])
        assert in_device.wait(5)
        t0 = time.monotonic()
        with poller.ram.lock:
            poller._quiesce()
            took = time.monotonic() - t0
            queries = backend.calls["query"]
            time.sleep(0.02)
            assert backend.calls["query"] == queries    # nothing asked once quiesced
        release.set()
        assert took < 0.15, f"quiesce waited {took * 1e3:.0f} ms for the device"
        got = rig.completions(2)
        assert [c.tag for c in got] == [1, 2] and all(c.status == 0 for c in got), got
        assert _polls(rig, fastlane.PR_GROUP) == group + 1
        if what == "fence":
            assert _counter(rig, dev) == 2
        else:
            assert rig.dtoh(dev + 512, 256) == b"c" * 256


def test_quiesce_waits_for_at_most_one_native_call(tmp_path: Path) -> None:
    """FastLane.quiesce's promise: a run stops at the next descriptor once a quiescer waits, so
    the serve loop (holding the guest-RAM lock) waits for one driver call, not for a run."""
    backend = HookedGpu()
    with _rig(tmp_path, "qone", backend) as rig:
        _inc, empty = setup_kernels(rig)
        assert rig.run([empty_desc(empty), desc(Opcode.FENCE)])[0].status == 0     # the plan
        poller = rig.device.poller
        entered = threading.Event()
        started = [0]

        def slow() -> None:
            started[0] += 1
            entered.set()
            time.sleep(0.02)
        backend.hooks["launch"] = slow
        rig.submit([empty_desc(empty, tag=i) for i in range(8)])
        assert entered.wait(5)
        with poller.ram.lock:
            poller._quiesce()
            calls = started[0]
        backend.hooks.pop("launch")
        assert all(c.status == 0 for c in rig.completions(8))
        assert calls <= 2, f"quiesce returned after {calls} launches of 20 ms"


# -- 3. unmaps -------------------------------------------------------------------------------------
def test_unmapping_a_region_the_loop_streams_copies_into_gives_statuses_only(tmp_path: Path) -> None:
    """The guest unmaps (and maps again) a second RAM region over and over: before a batch of
    copies to and from it (all OUT_OF_RANGE), after it (all OK), and while the loop runs it
    (each one OK or OUT_OF_RANGE, whatever the race). Exactly the OK HTODs reached the driver,
    nothing crashes, and the server keeps serving. (Each copy takes 0.3 ms and reads or writes
    guest memory at its end, so an unmap mostly comes while the loop is inside one.)"""
    backend = FakeGpu()
    _immediate_copies(backend.dev, 0.0003)
    with GuestMemory(EXTRA_SIZE) as extra, _rig(tmp_path, "unmap", backend, sq_entries=128) as rig:
        rig.client.map_guest_ram(extra, EXTRA_BASE)
        dev = rig.alloc(65536)
        extra.write(0, bytes(range(256)) * (EXTRA_SIZE // 256))
        copy = [desc(Opcode.MEM_COPY_HTOD, [dev], sg=(EXTRA_BASE, 256))]
        assert rig.run(copy)[0].status == 0 and rig.run(copy)[0].status == 0     # queue made, RAM registered
        fake = rig.device.backend.dev
        logged = len(fake.log)
        taken = lane(rig).taken
        ok = ok_htod = out_of_range = 0
        rnd = random.Random(3)
        for r in range(40):
            batch = []
            for i in range(48):
                op = Opcode.MEM_COPY_HTOD if i % 2 else Opcode.MEM_COPY_DTOH
                off = 256 * rnd.randrange(EXTRA_SIZE // 256)
                batch.append(desc(op, [dev + 256 * (i % 256)], sg=(EXTRA_BASE + off, 256), tag=1000 * r + i))
            batch.append(desc(Opcode.NOP, tag=1000 * r + 999))
            if r % 4 == 0:                  # unmapped first: every copy is refused
                rig.client.dma_unmap(EXTRA_BASE, EXTRA_SIZE)
                got = rig.run(batch)
            elif r % 4 == 1:                # unmapped after: every copy ran
                got = rig.run(batch)
                rig.client.dma_unmap(EXTRA_BASE, EXTRA_SIZE)
            else:                           # unmapped while the loop runs them: either
                rig.submit(batch)
                time.sleep(rnd.random() * 0.01)
                rig.client.dma_unmap(EXTRA_BASE, EXTRA_SIZE)
                got = rig.completions(len(batch))
            if r % 4 < 2:
                assert all(c.status == (Status.OUT_OF_RANGE if r % 4 == 0 else 0) for c in got[:-1]), r
            assert [c.tag for c in got] == [1000 * r + i for i in [*range(48), 999]]
            assert got[-1].status == 0
            for c in got[:-1]:
                assert c.status in (0, Status.OUT_OF_RANGE), c
            ok += sum(1 for c in got[:-1] if c.status == 0)
            ok_htod += sum(1 for c in got[1:-1:2] if c.status == 0)
            out_of_range += sum(1 for c in got[:-1] if c.status == Status.OUT_OF_RANGE)
            rig.client.map_guest_ram(extra, EXTRA_BASE)
        assert ok >= 10 * 48 and out_of_range >= 10 * 48, (ok, out_of_range)
        htods = sum(1 for entry in fake.log[logged:] if entry[0] == "htod")
        assert htods == ok_htod                                     # an HTOD that reached the driver is OK
        # (DTOHs: Python's path into RAM not registered yet writes through a view, unlogged)
        assert lane(rig).taken > taken                              # ... and the lane ran copies
        rig.alive()
        assert rig.run(copy)[0].status == 0


def test_unmapping_the_rings_while_the_loop_spins_is_ring_unmapped(tmp_path: Path) -> None:
    with _rig(tmp_path, "ringunmap") as rig:
        _warm(rig)
        _hold_spin(rig)
        rig.run([desc(Opcode.NOP) for _ in range(4)])
        _spinning(rig)
        t0 = time.monotonic()
        rig.client.dma_unmap(RAM_BASE, rig.mem.size)        # the C loop spins on sq_tail in there
        rig.wait_status(DeviceStatus.FATAL, timeout=5)
        assert time.monotonic() - t0 < PROMPT_S
        assert _fatal(rig)[0] == FatalCode.RING_UNMAPPED
        assert rig.reg(abi.REG_MAGIC) == abi.MAGIC_VALUE
        rig.client.map_guest_ram(rig.mem, RAM_BASE)
        _reset_and_reenable(rig)


# -- 4. requests while the loop spins; device reset and disconnect --------------------------------
@pytest.mark.parametrize("what", ["reset", "disable"])
def test_a_control_request_while_the_loop_spins_is_handled_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    what: str) -> None:
    monkeypatch.setattr(poller_native, "POLL_RUN_S", 10.0)     # no budget return either
    with _rig(tmp_path, "ctl" + what) as rig:
        _warm(rig)
        _hold_spin(rig)
        assert all(c.status == 0 for c in rig.run([desc(Opcode.NOP, tag=i) for i in range(4)]))
        _spinning(rig)
        t0 = time.monotonic()
        if what == "reset":
            before = rig.reg(abi.REG_RESET_COUNT)
            rig.set_reg(abi.REG_CONTROL, Control.RESET, posted=False)
            _wait(lambda: rig.reg(abi.REG_RESET_COUNT) != before)
        else:
            rig.set_reg(abi.REG_QUEUE_ENABLE, 0, posted=False)
            rig.wait_status(DeviceStatus.ENABLED, clear=True)
        took = time.monotonic() - t0
        assert took < PROMPT_S, f"{what} took {took * 1e3:.1f} ms with the loop spinning"
        assert not rig.reg(abi.REG_STATUS) & (DeviceStatus.ENABLED | DeviceStatus.FATAL)
        assert rig.enable() & DeviceStatus.ENABLED
        rig.alive()


@pytest.mark.parametrize("how", ["device_reset", "disconnect"])
def test_no_dma_after_a_device_reset_or_disconnect_mid_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             how: str) -> None:
    """A guest thread streams launches and NOPs (no register writes) while the loop runs them;
    once the reset (or the server's side of the disconnect) is done, the completion ring, the
    device's header words and the driver see nothing more. Each native launch takes 10 ms, so
    the reset finds the loop inside one: it must wait for it (and its completion's write)."""
    monkeypatch.setattr(poller_native, "POLL_RUN_S", 10.0)     # the loop goes on from one run to the next
    backend = HookedGpu()
    with _rig(tmp_path, "dma" + how, backend, sq_entries=256) as rig:
        inc, empty = setup_kernels(rig)
        dev = rig.alloc(256)
        assert rig.run([inc_desc(rig, inc, dev, 1), empty_desc(empty), desc(Opcode.FENCE)])[2].status == 0
        backend.hooks["launch"] = lambda: time.sleep(0.01)
        _hold_spin(rig, 1.0)
        poller = rig.device.poller
        stop = threading.Event()
        done = [0]
        mask = abi.INDEX_MASK

        def guest() -> None:
            tag = 0
            while not stop.is_set():
                if (rig.sq_tail - rig.cq_head) & mask <= 40:      # the loop always has more to take
                    batch = [empty_desc(empty, tag=tag + i) if i % 3 else inc_desc(rig, inc, dev, 1, tag=tag + i)
                             for i in range(7)]
                    rig.submit([*batch, desc(Opcode.NOP, tag=tag + 7)], doorbell=False)
                    tag += 8
                tail = rig.hdr(abi.QH_CQ_TAIL)
                while rig.cq_head != tail:
                    rig.cq_head = (rig.cq_head + 1) & mask
                    done[0] += 1
                rig.set_hdr(abi.QH_CQ_HEAD, rig.cq_head)
                time.sleep(0.001)
        thread = threading.Thread(target=guest)
        thread.start()
        try:
            _wait(lambda: backend.native_launches >= 12 and done[0] > 0, 20)
            time.sleep(0.004)                                   # (inside a launch)
            if how == "device_reset":
                rig.client.reset()                          # answered once the reset is done
            else:
                rig.client.close()
                _wait(lambda: not poller.ram.regions(), 5)  # the server's side: every map gone
            cq = (rig.cq_off, rig.cq_entries * abi.CQ_ENTRY_SIZE)
            device_words = (abi.QH_SQ_HEAD, abi.QH_COMPLETED + 8 - abi.QH_SQ_HEAD)
            snap = (rig.read(*cq), rig.read(*device_words))
            calls = len(rig.device.backend.dev.log)
            time.sleep(0.1)
            assert (rig.read(*cq), rig.read(*device_words)) == snap
            assert len(rig.device.backend.dev.log) == calls
            assert not poller.enabled
        finally:
            stop.set()
            thread.join()
        assert lane(rig).taken >= 20


# -- 6. hostile indices and descriptors ------------------------------------------------------------
@pytest.mark.parametrize(("field", "offset", "code"), [
    (abi.QH_SQ_TAIL, -1, FatalCode.BAD_SQ_TAIL),                 # behind sq_head (~2^32 ahead)
    (abi.QH_SQ_TAIL, 0x8000_0000, FatalCode.BAD_SQ_TAIL),        # far ahead
    (abi.QH_SQ_TAIL, 64 + 1, FatalCode.BAD_SQ_TAIL),             # one more than the ring holds
    (abi.QH_CQ_HEAD, -100, FatalCode.BAD_CQ_HEAD),               # backwards (behind any head seen)
    (abi.QH_CQ_HEAD, 5, FatalCode.BAD_CQ_HEAD),                  # past cq_tail
])
def test_a_hostile_index_while_the_loop_spins_is_fatal_through_python(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: int, offset: int, code: FatalCode) -> None:
    """The loop validates sq_tail and cq_head as Python does and hands an invalid one back
    (PR_INDEX): Python's cycle makes the queue fatal with the code and the value as info."""
    monkeypatch.setattr(poller_native, "POLL_RUN_S", 10.0)
    with _rig(tmp_path, "index") as rig:
        _warm(rig)
        _hold_spin(rig)
        assert all(c.status == 0 for c in rig.run([desc(Opcode.NOP) for _ in range(4)]))
        index = rig.sq_tail                     # sq_head == cq_tail == cq_head
        value = (index + offset) & abi.INDEX_MASK
        before = _polls(rig, fastlane.PR_INDEX)     # (settles: the next poll spins)
        _spinning(rig)
        t0 = time.monotonic()
        rig.set_hdr(field, value)
        if field == abi.QH_CQ_HEAD:             # cq_head is read when there is something to take
            rig.write(SQ_OFF + (index % rig.sq_entries) * abi.SQ_ENTRY_SIZE, desc(Opcode.NOP))
            rig.set_hdr(abi.QH_SQ_TAIL, index + 1)
        rig.wait_status(DeviceStatus.FATAL, timeout=5)
        assert time.monotonic() - t0 < PROMPT_S
        assert _fatal(rig) == (code, value)
        assert _polls(rig, fastlane.PR_INDEX) == before + 1
        assert rig.reg(abi.REG_MAGIC) == abi.MAGIC_VALUE
        _reset_and_reenable(rig)


def test_descriptors_rewritten_while_the_loop_reads_them_each_run_once(tmp_path: Path) -> None:
    """A guest thread flips the argument pointer of posted LAUNCHes between two blobs (one
    aligned 64-bit store): each LAUNCH increments exactly one of two counters, so their sum is
    the number of completions, and the accounting agrees."""
    with _rig(tmp_path, "rewrite", sq_entries=256) as rig:
        inc, _ = setup_kernels(rig)
        dev = rig.alloc(256)
        slots = [rig.addr(ARG_OFF), rig.addr(ARG_OFF + 64)]
        rig.write(ARG_OFF, struct.pack("<QI4x", dev, 1))
        rig.write(ARG_OFF + 64, struct.pack("<QI4x", dev + 4, 1))
        dims = abi.pack_launch_dims((1, 1, 1), (32, 1, 1), 0)

        def launch(slot: int, tag: int) -> bytes:
            return desc(Opcode.LAUNCH, [inc, *dims], sg=(slots[slot], 16), tag=tag)
        assert all(c.status == 0 for c in rig.run([launch(0, 0), launch(1, 0), desc(Opcode.FENCE)]))   # plans
        words = rig.mem.view.cast("Q")
        sg_word = 48 // 8                       # the descriptor's sg_addr
        poller = rig.device.poller
        launches = poller.stats.commands["LAUNCH"]
        taken = lane(rig).taken
        stop = threading.Event()
        rnd = random.Random(11)

        def scribble() -> None:
            while not stop.is_set():
                i = (SQ_OFF + abi.SQ_ENTRY_SIZE * rnd.randrange(rig.sq_entries)) // 8 + sg_word
                words[i] = slots[rnd.randrange(2)]
        thread = threading.Thread(target=scribble)
        thread.start()
        n = 0
        try:
            for r in range(12):
                got = rig.run([launch(i % 2, 1000 * r + i) for i in range(150)], timeout=30)
                assert [c.tag for c in got] == [1000 * r + i for i in range(150)]
                assert all(c.status == 0 for c in got)
                n += len(got)
        finally:
            stop.set()
            thread.join()
            words.release()
        assert all(c.status == 0 for c in rig.run([desc(Opcode.FENCE)]))
        rig.settle()
        a, b = struct.unpack("<II", rig.dtoh(dev, 8))
        assert a + b == n + 2
        rig.settle()
        assert poller.stats.commands["LAUNCH"] - launches == n
        assert lane(rig).taken - taken >= n


@pytest.mark.parametrize("mix", ["launches", "copies", "fences"])
def test_a_full_completion_ring_stops_the_loop_without_overwriting(tmp_path: Path, mix: str) -> None:
    """The guest consumes nothing: the loop fills the completion ring and then posts nothing
    more (its room counts the open group and a FENCE), though more is submitted; it goes on as
    the guest frees slots, every completion in order."""
    with _rig(tmp_path, "cqfull" + mix, sq_entries=32) as rig:
        inc, empty = setup_kernels(rig)
        dev = rig.alloc(65536)
        rig.write(DATA_OFF, bytes(range(256)) * 16)
        assert all(c.status == 0 for c in rig.run([inc_desc(rig, inc, dev, 1), empty_desc(empty),
                                                   desc(Opcode.MEM_COPY_HTOD, [dev], sg=(rig.addr(DATA_OFF), 16)),
                                                   desc(Opcode.FENCE)]))
        taken = lane(rig).taken

        def one(i: int) -> bytes:
            if mix == "launches":
                return empty_desc(empty, tag=i)
            if mix == "copies":
                return desc(Opcode.MEM_COPY_HTOD, [dev + 256 * i], sg=(rig.addr(DATA_OFF + 16 * i), 256), tag=i)
            return desc(Opcode.FENCE, tag=i) if i % 3 == 2 else empty_desc(empty, tag=i)

        def unread() -> int:
            return (rig.hdr(abi.QH_CQ_TAIL) - rig.cq_head) & abi.INDEX_MASK
        rig.submit([one(i) for i in range(20)])
        _wait(lambda: unread() == 20)
        rig.submit([one(i) for i in range(20, 50)])       # 12 fit: the ring holds 32
        _wait(lambda: unread() == 32)
        time.sleep(0.05)
        assert unread() == 32 and rig.hdr(abi.QH_SQ_HEAD) == rig.sq_tail - 50 + 32
        got = []
        while len(got) < 50:
            got += rig.completions(min(5, 50 - len(got)))
            time.sleep(0.002)
        assert [c.tag for c in got] == list(range(50)) and all(c.status == 0 for c in got)
        assert lane(rig).taken - taken >= 30
        rig.alive()
