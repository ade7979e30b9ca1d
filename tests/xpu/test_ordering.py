"""Completion rules of docs/device-abi.md §4.7 that a guest relies on to reuse its buffers.

MEM_COPY_HTOD completes only once the device has read its source: a guest that overwrites the
source as soon as the completion is posted must not change what arrives on the device, even
when the copy was queued behind a running kernel.
"""

from __future__ import annotations

from vxpu.abi.status import Status
from vxpu.abi.xpu import Opcode

from .ringdriver import DATA_OFF, desc
from .test_reset import SPIN_N, _spin_launch

SRC_OFF = DATA_OFF + 0x10000


def test_htod_completes_once_its_source_was_read(rig):
    launch, _out = _spin_launch(rig, n=SPIN_N // 6)
    dev = rig.alloc(4096)
    src = bytes(range(256)) * 16
    rig.write(SRC_OFF, src)
    rig.submit([launch, desc(Opcode.MEM_COPY_HTOD, [dev], sg=(rig.addr(SRC_OFF), 4096), tag=2)])
    got = rig.completions(2)
    assert [(c.tag, c.status) for c in got] == [(1, Status.OK), (2, Status.OK)]
    rig.write(SRC_OFF, bytes(4096))         # the guest reuses its buffer at once
    assert rig.dtoh(dev, 4096, off=SRC_OFF + 0x1000) == src
