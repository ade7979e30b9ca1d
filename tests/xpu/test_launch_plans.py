"""LAUNCH plans (vfio_server.xpu.commands, accel.session.LaunchPlan) seen from the guest: a
repeated LAUNCH reuses its plan, and after everything that could make a plan wrong — MEM_FREE,
MODULE_UNLOAD, the RESET command, Control.RESET, handles issued again by a fresh session — the
same LAUNCH fails (or faults) exactly as it does without a cache. The argument bytes are read
from guest RAM for every LAUNCH. Each test first launches twice, so the plan is cached.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from vxpu.ir.args import pack_args

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import Control, DeviceStatus, Opcode

from .test_modules import ARGS_OFF, SAXPY, _image, _kernel, _launch, _load


@pytest.fixture
def saxpy(rig):
    status, module = _load(rig, _image(SAXPY))
    assert status == Status.OK
    status, kernel, _size = _kernel(rig, module, b"saxpy")
    assert status == Status.OK
    from vxpu.ir import text
    from vxpu.ir.args import kernel_signature
    return module, kernel, kernel_signature(text.parse(SAXPY).kernels[0])


def _twice(rig, kernel, blob, n=16):
    """Launch the same descriptor twice (the second one through the cached plan)."""
    for _ in range(2):
        assert _launch(rig, kernel, (1, 1, 1), (n, 1, 1), blob) == Status.OK
        assert rig.cmd(Opcode.FENCE).status == Status.OK
    assert len(rig.device.poller.executor._plans) >= 1


def test_a_repeated_launch_reuses_its_plan(rig, saxpy):
    _m, kernel, sig = saxpy
    d = rig.alloc(64)
    blob = pack_args(sig, [16, 1.0, d, d])
    ex = rig.device.poller.executor
    _twice(rig, kernel, blob)
    assert len(ex._plans) == 1
    rig.settle()                       # (a native poll accounts its launches when it returns)
    launches = rig.device.poller.session.stats.launches
    assert _launch(rig, kernel, (1, 1, 1), (16, 1, 1), blob) == Status.OK
    rig.settle()
    assert rig.device.poller.session.stats.launches == launches + 1
    assert len(ex._plans) == 1


def test_mem_free_makes_the_cached_plan_fault_like_an_uncached_launch(rig, saxpy):
    _m, kernel, sig = saxpy
    d = rig.alloc(64)
    blob = pack_args(sig, [16, 1.0, d, d])
    _twice(rig, kernel, blob)
    assert rig.cmd(Opcode.MEM_FREE, [d]).status == Status.OK
    assert _launch(rig, kernel, (1, 1, 1), (16, 1, 1), blob) == Status.OK       # issued; the access faults
    assert rig.cmd(Opcode.FENCE).status == Status.KERNEL_FAULT
    rig.alive()


def test_a_smaller_allocation_at_a_freed_address_is_not_overrun(rig, saxpy):
    """The cached bounds named the 64-byte allocation; a 16-byte one at the same address must
    fault a 16-element (64-byte) saxpy."""
    _m, kernel, sig = saxpy
    d = rig.alloc(64)
    blob = pack_args(sig, [16, 1.0, d, d])
    _twice(rig, kernel, blob)
    assert rig.cmd(Opcode.MEM_FREE, [d]).status == Status.OK
    small = rig.alloc(16)
    if small != d:
        pytest.skip("the pool did not reuse the freed address")
    assert _launch(rig, kernel, (1, 1, 1), (16, 1, 1), blob) == Status.OK
    assert rig.cmd(Opcode.FENCE).status == Status.KERNEL_FAULT


def test_module_unload_makes_the_cached_plan_invalid_handle(rig, saxpy):
    module, kernel, sig = saxpy
    d = rig.alloc(64)
    blob = pack_args(sig, [16, 1.0, d, d])
    _twice(rig, kernel, blob)
    assert rig.cmd(Opcode.MODULE_UNLOAD, [module]).status == Status.OK
    assert _launch(rig, kernel, (1, 1, 1), (16, 1, 1), blob) == Status.INVALID_HANDLE


def test_reset_command_makes_the_cached_plan_invalid_handle(rig, saxpy):
    _m, kernel, sig = saxpy
    d = rig.alloc(64)
    blob = pack_args(sig, [16, 1.0, d, d])
    _twice(rig, kernel, blob)
    assert rig.cmd(Opcode.RESET).status == Status.OK
    assert _launch(rig, kernel, (1, 1, 1), (16, 1, 1), blob) == Status.INVALID_HANDLE


def test_control_reset_makes_the_cached_plan_invalid_handle(rig, saxpy):
    _m, kernel, sig = saxpy
    d = rig.alloc(64)
    blob = pack_args(sig, [16, 1.0, d, d])
    _twice(rig, kernel, blob)
    before = rig.reg(abi.REG_RESET_COUNT)
    rig.set_reg(abi.REG_CONTROL, Control.RESET)
    for _ in range(500):
        if rig.reg(abi.REG_RESET_COUNT) != before:
            break
        import time
        time.sleep(0.01)
    assert rig.enable() & DeviceStatus.ENABLED
    assert _launch(rig, kernel, (1, 1, 1), (16, 1, 1), blob) == Status.INVALID_HANDLE


def test_handles_issued_again_after_reset_are_checked_against_the_new_session(rig, saxpy):
    """A fresh session numbers its handles from the start again: the same kernel handle, dims
    and argument bytes must not find the old session's plan (whose buffer is gone)."""
    _m, kernel, sig = saxpy
    d = rig.alloc(64)
    blob = pack_args(sig, [16, 1.0, d, d])
    _twice(rig, kernel, blob)
    assert rig.cmd(Opcode.RESET).status == Status.OK
    status, module = _load(rig, _image(SAXPY))
    assert status == Status.OK
    _s, again, _size = _kernel(rig, module, b"saxpy")
    if again != kernel:
        pytest.skip("the new session numbered the kernel differently")
    assert _launch(rig, again, (1, 1, 1), (16, 1, 1), blob) == Status.OK       # d is not allocated now
    assert rig.cmd(Opcode.FENCE).status == Status.KERNEL_FAULT


def test_argument_bytes_are_read_from_guest_ram_every_time(rig, saxpy):
    _m, kernel, sig = saxpy
    d = rig.alloc(16)
    assert rig.htod(d, np.ones(4, np.float32).tobytes()).status == 0
    blob = pack_args(sig, [4, 1.0, d, d])          # y += 1 * y: doubles
    _twice(rig, kernel, blob, n=4)                 # 1 -> 2 -> 4
    rig.write(ARGS_OFF + sig.param_offsets[1], struct.pack("<f", 0.0))      # a = 0: y stays
    assert rig.cmd(Opcode.LAUNCH, [kernel, *abi.pack_launch_dims((1, 1, 1), (4, 1, 1), 0)],
                   sg=(rig.addr(ARGS_OFF), len(blob))).status == Status.OK
    assert rig.cmd(Opcode.FENCE).status == Status.OK
    assert np.frombuffer(rig.dtoh(d, 16), np.float32).tolist() == [4.0] * 4


def test_a_bad_shape_is_reported_before_a_bad_argument_buffer(rig, saxpy):
    """The order of checks is kept: shape first, then the argument buffer's guest memory."""
    _m, kernel, _sig = saxpy
    dims = abi.pack_launch_dims((1, 1, 1), (1, 1, 1), 0)
    c = rig.cmd(Opcode.LAUNCH, [kernel, 0, *dims[1:]], sg=(1 << 60, 24))        # grid x 0, args unmapped
    assert c.status == Status.INVALID_ARGUMENT
    c = rig.cmd(Opcode.LAUNCH, [kernel, *dims], sg=(1 << 60, 24))
    assert c.status == Status.OUT_OF_RANGE


def _scenario(rig) -> list[int]:  # type: ignore[no-untyped-def]
    """Statuses of a LAUNCH sequence with every kind of refusal and staleness, each LAUNCH
    posted twice (so a cache would serve the second), each followed by a FENCE (a fault then
    surfaces at that FENCE, never at whichever later command the kernel's timing picks)."""
    from vxpu.ir import text
    from vxpu.ir.args import kernel_signature
    sig = kernel_signature(text.parse(SAXPY).kernels[0])
    out: list[int] = []

    def twice(kernel, blob, grid=(1, 1, 1), block=(16, 1, 1), shared=0):  # type: ignore[no-untyped-def]
        for _ in range(2):
            out.append(_launch(rig, kernel, grid, block, blob, shared))
            out.append(rig.cmd(Opcode.FENCE).status)

    status, module = _load(rig, _image(SAXPY))
    out.append(status)
    status, kernel, _size = _kernel(rig, module, b"saxpy")
    out.append(status)
    d = rig.alloc(64)
    blob = pack_args(sig, [16, 1.0, d, d])
    twice(kernel, blob)
    twice(kernel, blob, grid=(0, 1, 1))                                # zero grid
    twice(kernel, blob, block=(4096, 1, 1))                            # block too large
    twice(kernel, blob, block=(32, 32, 2))                             # too many threads
    twice(kernel, blob, shared=1 << 30)                                # too much shared memory
    twice(kernel, blob[:-4])                                           # wrong argument size
    twice(kernel + 1, blob)                                            # unknown kernel
    twice(kernel, pack_args(sig, [16, 1.0, d + 4096, d]))               # x outside every allocation
    twice(kernel, pack_args(sig, [32, 1.0, d, d]))                      # n past the buffers
    assert rig.cmd(Opcode.MEM_FREE, [d]).status == Status.OK
    twice(kernel, blob)                                                # freed: faults
    d2 = rig.alloc(64)
    blob2 = pack_args(sig, [16, 1.0, d2, d2])
    twice(kernel, blob2)
    assert rig.cmd(Opcode.MODULE_UNLOAD, [module]).status == Status.OK
    twice(kernel, blob2)                                               # unloaded
    status, module = _load(rig, _image(SAXPY))
    status, kernel2, _size = _kernel(rig, module, b"saxpy")
    out.append(status)
    twice(kernel2, blob2)
    assert rig.cmd(Opcode.RESET).status == Status.OK
    twice(kernel2, blob2)                                              # reset: every handle gone
    rig.alive()
    return out


def test_the_plan_cache_changes_no_status(tmp_path, backend, monkeypatch):
    """The same LAUNCH sequence (every refusal, fault and stale handle) completes with the same
    statuses with the plan cache as with every LAUNCH checked in full (max_plans = 0)."""
    from vxpu.accel.session import Session

    from .ringdriver import XpuRig
    hits = [0]
    relaunch = Session.relaunch

    def counting(self, plan):  # type: ignore[no-untyped-def]
        done = relaunch(self, plan)
        hits[0] += done
        return done
    monkeypatch.setattr(Session, "relaunch", counting)
    with XpuRig(tmp_path / "cached", backend, fastlane=False) as rig:    # Python's plans (not a GPU's fast lane)
        cached = _scenario(rig)
    assert hits[0] >= 3                    # the valid launches' second posts were served by plans
    hits[0] = 0
    with XpuRig(tmp_path / "full", backend, fastlane=False) as rig:
        rig.device.poller.executor.max_plans = 0
        full = _scenario(rig)
    assert hits[0] == 0
    assert cached == full
    assert {Status.OK, Status.INVALID_ARGUMENT, Status.INVALID_HANDLE, Status.KERNEL_FAULT} <= set(full)


def test_the_plans_kept_are_bounded(rig, saxpy):
    """A guest cycling through ever new argument bytes cannot grow the cache past max_plans
    (it is emptied when full), and every LAUNCH still runs."""
    _m, kernel, sig = saxpy
    ex = rig.device.poller.executor
    ex.max_plans = 4
    d = rig.alloc(64)
    sizes = []
    for k in range(11):
        assert _launch(rig, kernel, (1, 1, 1), (16, 1, 1), pack_args(sig, [16, float(k), d, d])) == Status.OK
        sizes.append(len(ex._plans))
    assert rig.cmd(Opcode.FENCE).status == Status.OK
    assert max(sizes) == 4 and sizes == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]
