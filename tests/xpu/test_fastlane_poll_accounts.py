"""The fast lane's native poll loop as Python and the guest see it, on the fake GPU: the
interrupts of the loop's completions (coalescing, the IRQ settings read once per poll, a new
setting taking effect at once), its accounting (equal to the Python path's, with the loop off
and with the lane off), and device waits that surface an error in C, completed by Python with
the lane-off path's statuses. The safety side (quiesce, unmaps, resets, hostile indices) is in
test_fastlane_poll.py, whose helpers this file shares.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from vxpu.vfio_server.xpu import fastlane, poller_native

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import DescFlags, IrqControl, Opcode

from .ringdriver import DATA_OFF, XpuRig, desc
from .test_commands import _count, _msi
from .test_fastlane import ERR_LAUNCH, FakeDevice, FakeGpu, empty_desc, inc_desc, lane, setup_kernels
from .test_fastlane_poll import STATS_OFF, _hold_spin, _polls, _rig, _spinning


# -- 5. interrupts ---------------------------------------------------------------------------------
def test_completions_of_the_poll_raise_coalesced_interrupts(tmp_path: Path) -> None:
    with _rig(tmp_path, "irq") as rig:
        fd = _msi(rig)
        try:
            _inc, empty = setup_kernels(rig)
            assert rig.run([empty_desc(empty), desc(Opcode.FENCE)])[0].status == 0      # the plan
            rig.set_reg(abi.REG_IRQ_CONTROL, IrqControl.COMPLETION)
            rig.set_reg(abi.REG_IRQ_COALESCE_COUNT, 8)
            rig.set_reg(abi.REG_IRQ_COALESCE_USEC, 50_000)
            rig.flush()
            _count(fd, 0.06)                                          # (anything due from before)
            posted, taken = _polls(rig, fastlane.PR_POSTED), lane(rig).taken
            rig.submit([empty_desc(empty, tag=i) for i in range(16)])
            rig.completions(16)
            assert _count(fd, 0.01) >= 1                              # 8 reached: at once
            rig.run([empty_desc(empty)])
            assert _count(fd, 0.01) == 0                              # 1 of 8: held back ...
            assert _count(fd, 0.2) == 1                               # ... until 50 ms passed
            rig.set_reg(abi.REG_IRQ_COALESCE_USEC, 100_000)
            rig.flush()
            rig.run([empty_desc(empty, tag=77)])
            rig.run([desc(Opcode.NOP, tag=78, flags=DescFlags.IRQ)])  # forced: with the one held
            assert _count(fd, 0.02) == 1
            assert _polls(rig, fastlane.PR_POSTED) > posted
            assert lane(rig).taken - taken == 19
        finally:
            os.close(fd)


@pytest.mark.parametrize("poll", [True, False])
def test_interrupts_turned_on_while_the_loop_spins_signal_from_the_next_completion_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poll: bool) -> None:
    """The loop reads the IRQ_* registers when it starts (once per batch in Python): turning
    IRQ_CONTROL.COMPLETION on raises nothing for the completions posted while it was off (as on
    the Python path), and the write pokes the loop, so the next completion is signalled at once,
    not when the (held) spin ends."""
    monkeypatch.setattr(poller_native, "POLL_RUN_S", 10.0)
    monkeypatch.setenv(fastlane.POLL_ENV, "1" if poll else "0")
    with _rig(tmp_path, "irqon") as rig:
        assert rig.device.poller.native_polling == poll
        fd = _msi(rig)
        try:
            _inc, empty = setup_kernels(rig)
            assert rig.run([empty_desc(empty), desc(Opcode.FENCE)])[0].status == 0
            rig.set_reg(abi.REG_IRQ_COALESCE_COUNT, 1)
            rig.flush()
            _hold_spin(rig)
            rig.run([empty_desc(empty, tag=i) for i in range(4)])          # interrupts off
            if poll:
                _spinning(rig)
            rig.set_reg(abi.REG_IRQ_CONTROL, IrqControl.COMPLETION)
            rig.flush()
            assert _count(fd, 0.1) == 0
            if poll:
                _spinning(rig)                  # the next poll, interrupts on
            rig.run([empty_desc(empty, tag=9)])
            assert _count(fd, 0.05) == 1
        finally:
            os.close(fd)


# -- 7. accounting equals the Python path ----------------------------------------------------------
def _stream(rig: XpuRig, inc: int, empty: int, dev: int, seed: int) -> list[tuple[int, int]]:
    """A mixed stream (native launches, copies, NOPs and FENCEs; Python-only MEM_SETs and plan
    misses among them), the same for every rig with the same seed. Returns (tag, status) pairs."""
    rnd = random.Random(seed)
    rig.write(DATA_OFF, bytes(range(256)) * 64)
    out: list[tuple[int, int]] = []
    tag = 0
    for _chunk in range(12):
        batch = []
        for _ in range(rnd.randrange(10, 90)):
            tag += 1
            kind = rnd.choices(["inc", "empty", "htod", "dtoh", "nop", "fence", "memset", "miss"],
                               [30, 10, 15, 15, 10, 8, 4, 3])[0]
            if kind == "inc":
                batch.append(inc_desc(rig, inc, dev + 4 * rnd.randrange(4), 1, slot=rnd.randrange(4), tag=tag))
            elif kind == "miss":
                batch.append(inc_desc(rig, inc, dev, rnd.randrange(2, 1000), slot=4, tag=tag))
            elif kind == "empty":
                batch.append(empty_desc(empty, tag=tag))
            elif kind in ("htod", "dtoh"):
                op = Opcode.MEM_COPY_HTOD if kind == "htod" else Opcode.MEM_COPY_DTOH
                n = rnd.choice((16, 256, 4096))
                batch.append(desc(op, [dev + 256 + 16 * rnd.randrange(64)],
                                  sg=(rig.addr(DATA_OFF + 16 * rnd.randrange(512)), n), tag=tag))
            elif kind == "nop":
                batch.append(desc(Opcode.NOP, tag=tag))
            elif kind == "fence":
                batch.append(desc(Opcode.FENCE, tag=tag))
            else:
                batch.append(desc(Opcode.MEM_SET, [dev + 8192, rnd.randrange(256), 64], tag=tag))
        batch.append(desc(Opcode.FENCE, tag=tag + 1))
        tag += 1
        out += [(c.tag, c.status) for c in rig.run(batch, timeout=30)]
    return out


def _accounts(rig: XpuRig) -> dict[str, Any]:
    rig.settle()
    c = rig.cmd(Opcode.STATS, sg=(rig.addr(STATS_OFF), abi.MAX_STATS_BYTES))
    assert c.status == 0, c
    doc = json.loads(rig.read(STATS_OFF, c.result))
    s = rig.device.poller.session
    b = rig.device.backend.stats
    # (not "batches": with the lane, poll or not, a FENCE or a hand-off ends a batch, which the
    # Python path's take of up to 64 runs through: 129 vs 20 batches for this stream)
    return {"commands": doc["device"]["commands"], "errors": doc["device"]["errors"],
            "bytes": doc["device"]["bytes"],
            "session": (s.stats.launches, s.stats.bytes_htod, s.stats.bytes_dtoh, s.stats.faults),
            "backend": (b.launches, b.bytes_htod, b.bytes_dtoh, b.faults),
            "queued": rig.device.poller.executor.queued}


@pytest.mark.parametrize("seed", [1, 2])
def test_the_poll_accounts_exactly_as_the_python_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      seed: int) -> None:
    """The same mixed stream through the poll loop, the lane inside Python's cycles
    (``VXPU_FASTLANE_POLL=0``) and no lane: the same completions, and the same STATS commands,
    errors and bytes, session and backend counters and executor queue (after a settle)."""
    accounts: dict[str, dict[str, Any]] = {}
    results: dict[str, list[tuple[int, int]]] = {}
    for mode in ("poll", "issue", "off"):
        monkeypatch.setenv(fastlane.POLL_ENV, "0" if mode == "issue" else "1")
        with XpuRig(tmp_path / f"acc{mode}.sock", FakeGpu(), fastlane=mode != "off", sq_entries=128) as rig:
            poller = rig.device.poller
            assert (poller.fastlane is not None) == (mode != "off")
            assert poller.native_polling == (mode == "poll")
            inc, empty = setup_kernels(rig)
            dev = rig.alloc(65536)
            results[mode] = _stream(rig, inc, empty, dev, seed)
            accounts[mode] = _accounts(rig)
            if mode == "poll":
                ln = lane(rig)
                assert ln.taken > 300 and sum(ln.polls.values()) > 0, (ln.taken, ln.polls)
    assert results["poll"] == results["issue"] == results["off"]
    for key in accounts["off"]:
        assert accounts["poll"][key] == accounts["off"][key], key
        assert accounts["issue"][key] == accounts["off"][key], key


# -- 8. device waits that surface an error in C ---------------------------------------------------
def _sticky_sync_error(dev: FakeDevice) -> None:
    """Every synchronize fails from now on (CUDA's errors are sticky), on both paths."""
    dev.sync = lambda stream=None: ERR_LAUNCH       # type: ignore[method-assign]


@pytest.mark.parametrize("case", ["claimed_record", "sync_error_at_a_fence", "sync_error_after_copies",
                                  "sync_error_copies_then_fence"])
def test_a_wait_that_surfaces_an_error_in_c_is_completed_by_python_as_without_the_lane(tmp_path: Path,
                                                                                        case: str) -> None:
    got: dict[bool, list[int]] = {}
    for on in (True, False):
        with XpuRig(tmp_path / f"wait{int(on)}.sock", FakeGpu(), fastlane=on) as rig:
            inc, _empty = setup_kernels(rig)
            dev = rig.alloc(256)
            good = inc_desc(rig, inc, dev, 1, slot=0)
            copy = desc(Opcode.MEM_COPY_HTOD, [dev + 64], sg=(rig.addr(DATA_OFF), 64))
            assert [c.status for c in rig.run([good, copy, desc(Opcode.FENCE)])] == [0, 0, 0]
            assert rig.run([desc(Opcode.NOP)])[0].status == 0          # (the lane has the record's place)
            group = _polls(rig, fastlane.PR_GROUP) if on else 0
            if case == "claimed_record":
                bad = inc_desc(rig, inc, dev + 254, 1, slot=1)        # past the end: claims the record
                statuses = [c.status for c in rig.run([bad])]
                statuses += [c.status for c in rig.run([good, desc(Opcode.FENCE, tag=5), desc(Opcode.FENCE, tag=6)])]
                statuses += [c.status for c in rig.run([good, desc(Opcode.FENCE)])]
            elif case == "sync_error_at_a_fence":
                _sticky_sync_error(rig.device.backend.dev)
                statuses = [c.status for c in rig.run([good, desc(Opcode.FENCE, tag=5), desc(Opcode.NOP)])]
            elif case == "sync_error_after_copies":
                _sticky_sync_error(rig.device.backend.dev)
                statuses = [c.status for c in rig.run([copy, copy, copy, desc(Opcode.NOP)])]
            else:
                _sticky_sync_error(rig.device.backend.dev)
                statuses = [c.status for c in rig.run([copy, copy, desc(Opcode.FENCE), desc(Opcode.NOP)])]
            got[on] = statuses
            if on:
                assert _polls(rig, fastlane.PR_GROUP) > group           # the loop handed it back
            rig.alive()
    assert got[True] == got[False]
    assert any(got[False]), got        # (the error did surface)
