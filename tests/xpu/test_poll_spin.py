"""The poller's adaptive idle spin (vfio_server.xpu.poller, "Adaptive spin"): the rule itself,
then through the device: bursts a few milliseconds apart stop putting the poller to sleep once
the spin has grown, and a ceiling of 0 (``--poll-idle-us 0``) sleeps after every burst; the
flag's parsing."""

from __future__ import annotations

import argparse
import time

import pytest
from vxpu.vfio_server import cli
from vxpu.vfio_server.xpu.poller import MAX_SPIN_S, SPIN_S

from vxpu.abi.status import Status
from vxpu.abi.xpu import Opcode

from .ringdriver import XpuRig


class _Spin:
    """Just the spin state and rule of a Poller (no thread)."""

    def __init__(self, max_spin_s: float) -> None:
        from vxpu.vfio_server.xpu.poller import Poller
        self.max_spin_s = max_spin_s
        self.min_spin_s = min(SPIN_S, max_spin_s)
        self.spin_s = self.min_spin_s
        self.adapt = lambda gap: Poller._adapt_spin(self, gap)  # type: ignore[arg-type]


@pytest.mark.parametrize("ceiling", [2e-3, 5e-3, MAX_SPIN_S])   # both host defaults, and this host's
def test_the_spin_grows_to_twice_a_short_gap_and_falls_back_after_a_long_one(ceiling: float):
    p = _Spin(ceiling)
    assert p.spin_s == SPIN_S
    p.adapt(0.0003)
    assert p.spin_s == pytest.approx(0.0006)
    p.adapt(0.0001)                                 # a shorter gap never lowers it
    assert p.spin_s == pytest.approx(0.0006)
    p.adapt(ceiling * 0.75)
    assert p.spin_s == ceiling                      # twice the gap, capped
    p.adapt(ceiling * 1.01)                         # the guest went idle
    assert p.spin_s == SPIN_S


def test_a_ceiling_below_the_floor_is_a_fixed_spin():
    p = _Spin(0.0)
    p.adapt(0.0)
    assert p.spin_s == 0.0
    p = _Spin(50e-6)
    p.adapt(20e-6)
    assert p.spin_s == 50e-6


def _sleeps_over_bursts(rig: XpuRig, gap: float, bursts: int) -> int:
    assert rig.cmd(Opcode.NOP).status == Status.OK
    time.sleep(gap)
    assert rig.cmd(Opcode.NOP).status == Status.OK  # the first gap teaches the spin
    before = rig.device.poller.stats.sleeps
    for _ in range(bursts):
        time.sleep(gap)
        assert rig.cmd(Opcode.NOP).status == Status.OK
    return rig.device.poller.stats.sleeps - before


def test_bursts_a_few_ms_apart_keep_the_poller_awake(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, poll_idle_us=1_000_000) as rig:
        assert _sleeps_over_bursts(rig, 0.005, 10) <= 3


def test_a_zero_ceiling_sleeps_after_every_burst(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, poll_idle_us=0) as rig:
        assert rig.device.poller.spin_s == 0.0
        assert _sleeps_over_bursts(rig, 0.005, 10) >= 8


@pytest.mark.parametrize(("text", "ok"), [("0", 0), ("2000", 2000), ("1000000", 1_000_000),
                                          ("-1", None), ("1000001", None), ("x", None)])
def test_poll_idle_us_parsing(text, ok):
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            cli._poll_idle_us(text)
    else:
        assert cli._poll_idle_us(text) == ok


def test_the_ceiling_comes_from_the_flag_or_the_environment(monkeypatch):
    """README: ``--poll-idle-us``, also ``VXPU_POLL_IDLE_US``; the flag wins, a bad value in
    either is refused, and neither set leaves the host default (None)."""
    from vxpu import cli as top

    def parsed(*argv: str):  # type: ignore[no-untyped-def]
        return top.build_parser().parse_args(["serve", "--socket", "s", *argv]).poll_idle_us

    monkeypatch.delenv("VXPU_POLL_IDLE_US", raising=False)
    assert parsed() is None and parsed("--poll-idle-us", "300") == 300
    monkeypatch.setenv("VXPU_POLL_IDLE_US", "1234")
    assert parsed() == 1234 and parsed("--poll-idle-us", "0") == 0
    monkeypatch.setenv("VXPU_POLL_IDLE_US", "-5")
    with pytest.raises(SystemExit):
        parsed()


def test_the_flag_reaches_the_poller(backend, monkeypatch):
    from vxpu import cli as top

    monkeypatch.setenv("VXPU_POLL_IDLE_US", "1234")
    args = top.build_parser().parse_args(["serve", "--socket", "s"])
    device = cli._xpu_device(args, backend)
    try:
        assert device.poller.max_spin_s == pytest.approx(1234e-6)
    finally:
        device.poller.stop()
