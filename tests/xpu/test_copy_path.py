"""The one-step copy path (Executor._copy_inline -> Session.copy_address): an HTOD or DTOH with
one inline SG entry in registered guest RAM is one session call, on every backend with address
copies (so the CPU tests run the path CUDA takes). A batch longer than the queue depth quota
waits for the queue and goes on; the statuses are the general path's."""

from __future__ import annotations

import os

from vxpu.accel.quota import Quota
from vxpu.vfio_server.xpu.commands import Executor

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import Opcode

from .ringdriver import DATA_OFF, XpuRig, desc


def _count_fused(rig: XpuRig) -> list[int]:
    calls = [0]
    session = rig.device.poller.session
    inner = session.copy_address

    def counting(*args):
        calls[0] += 1
        return inner(*args)
    session.copy_address = counting      # type: ignore[method-assign]
    return calls


def test_inline_copies_take_one_session_call(tmp_path, backend):
    with XpuRig(tmp_path / "p", backend, fastlane=False) as rig:    # the Python path (a GPU's fast lane skips it)
        calls = _count_fused(rig)
        dev = rig.alloc(4096)
        assert rig.htod(dev, b"abcd" * 256).status == Status.OK
        assert rig.dtoh(dev, 1024) == b"abcd" * 256
        assert calls[0] == 2


def test_a_batch_longer_than_the_queue_depth_waits_and_completes(tmp_path, backend):
    with XpuRig(tmp_path / "d", backend, quota=Quota(queue_depth=4)) as rig:
        calls = _count_fused(rig)
        dev = rig.alloc(32 * 256)
        chunks = [os.urandom(256) for _ in range(32)]
        descs = []
        for i, c in enumerate(chunks):
            rig.write(DATA_OFF + i * 256, c)
            descs.append(desc(Opcode.MEM_COPY_HTOD, [dev + i * 256], sg=(rig.addr(DATA_OFF + i * 256), 256), tag=i))
        got = rig.run(descs)
        assert [c.tag for c in got] == list(range(32)) and all(c.status == 0 for c in got)
        assert calls[0] > 32                    # some waited for the queue and were issued again
        assert rig.dtoh(dev, 32 * 256, off=DATA_OFF + 0x100000) == b"".join(chunks)


def test_statuses_through_the_one_step_path(rig):
    dev = rig.alloc(256)
    sg = (rig.addr(DATA_OFF), 512)
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=sg).status == Status.OUT_OF_RANGE       # past the allocation
    assert rig.cmd(Opcode.MEM_COPY_DTOH, [dev + 256], sg=(rig.addr(DATA_OFF), 1)).status == Status.OUT_OF_RANGE
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=(1 << 60, 16)).status == Status.OUT_OF_RANGE  # not guest RAM
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=(rig.addr(DATA_OFF), 1 << 40)).status == Status.INVALID_ARGUMENT
    assert rig.htod(dev, b"x" * 256).status == Status.OK
    assert rig.cmd(Opcode.MEM_FREE, [dev]).status == Status.OK
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=(rig.addr(DATA_OFF), 16)).status == Status.OUT_OF_RANGE
    rig.alive()


_ONE_ENTRY_CASES = {               # (device offset from a 256-byte allocation, guest offset, length)
    "ok": (0, DATA_OFF, 256),
    "past the allocation": (0, DATA_OFF, 257),
    "at the allocation's end": (256, DATA_OFF, 1),
    "inside, to its end": (255, DATA_OFF, 1),
    "guest range not RAM": (0, None, 16),
    "guest range past RAM's end": (0, (8 << 20) - 8, 16),
    "over the transfer limit": (0, DATA_OFF, abi.MAX_TRANSFER_BYTES + 1),
    "no allocation there": (-0x10_0000, DATA_OFF, 16),
    "device range past 2^64": (None, DATA_OFF, 16),
}


def _one_entry_statuses(rig: XpuRig) -> list[tuple[int, int]]:
    """(status, result2) of HTOD and DTOH for each case, then after the allocation was freed."""
    out = []
    dev = rig.alloc(256)
    for dev_off, guest_off, length in _ONE_ENTRY_CASES.values():
        d = (1 << 64) - 8 if dev_off is None else (dev + dev_off) % (1 << 64)
        g = 1 << 60 if guest_off is None else rig.addr(guest_off)
        for op in (Opcode.MEM_COPY_HTOD, Opcode.MEM_COPY_DTOH):
            c = rig.cmd(op, [d], sg=(g, length))
            out.append((c.status, c.result2))
    assert rig.cmd(Opcode.MEM_FREE, [dev]).status == Status.OK
    for op in (Opcode.MEM_COPY_HTOD, Opcode.MEM_COPY_DTOH):
        c = rig.cmd(op, [dev], sg=(rig.addr(DATA_OFF), 16))
        out.append((c.status, c.result2))
    rig.alive()
    return out


def test_the_one_step_path_gives_the_general_paths_statuses(tmp_path, backend, monkeypatch):
    """Every one-entry HTOD/DTOH case completes with the same status through the one-step path
    as through the general one (_copy_inline forced to decline), and the one-step path was taken."""
    with XpuRig(tmp_path / "a", backend) as rig:
        calls = _count_fused(rig)
        fused = _one_entry_statuses(rig)
        assert calls[0] > 0
    monkeypatch.setattr(Executor, "_copy_inline", lambda self, d, to_device: -1)
    with XpuRig(tmp_path / "b", backend) as rig:
        calls = _count_fused(rig)
        general = _one_entry_statuses(rig)
        assert calls[0] == 0
    assert fused == general
    assert {s for s, _ in general} >= {Status.OK, Status.OUT_OF_RANGE, Status.INVALID_ARGUMENT}
