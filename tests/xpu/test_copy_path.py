"""The one-step copy path (Executor._copy_inline -> Session.copy_address): an HTOD or DTOH with
one inline SG entry in registered guest RAM is one session call, on every backend with address
copies (so the CPU tests run the path CUDA takes). A batch longer than the queue depth quota
waits for the queue and goes on; the statuses are the general path's."""

from __future__ import annotations

import os

from vxpu.accel.quota import Quota

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


def test_inline_copies_take_one_session_call(rig):
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
