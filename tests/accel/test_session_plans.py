"""Session launch plans (accel.session.LaunchPlan): ``relaunch`` issues a plan only while the
session's plan generation is the one it was made in, and every change that could make one of
``launch``'s checks come out differently moves it: any free, a module unload, a queue
destroyed, a context reset (own or another client's), a quota change, close. Each test makes a
plan, relaunches it once (so it is valid), makes the change, then expects ``relaunch`` to do
nothing and the full ``launch_plan`` to fail with the status an uncached launch gets.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from vxpu.accel.backend import BackendError, Status
from vxpu.accel.cpu import CpuBackend
from vxpu.accel.quota import Quota
from vxpu.accel.session import Session
from vxpu.ir import encode, parse

SCALE = """
module @scale
kernel @scale(%n: i32, %x: ptr<global>) {
^entry:
  %i = thread_id.x
  %inb = icmp slt %i, %n
  cbr %inb, ^body, ^exit
^body:
  %p = offset %x, %i : f32
  %v = load %p : f32
  %w = fadd %v, %v : f32
  store %w, %p
  br ^exit
^exit:
  ret
}
"""
QUOTA = Quota(memory_bytes=64 << 20, max_allocations=64, queues=2, events=3, modules=2, module_bytes=1 << 16,
              queue_depth=4)


@pytest.fixture(scope="module")
def backend():
    b = CpuBackend(arena="64M", threads=1)
    b.open()
    yield b
    b.close()


@pytest.fixture
def session(backend):
    s = Session(backend, QUOTA)
    yield s
    s.close()


def _status(fn, *args) -> Status:
    with pytest.raises(BackendError) as e:
        fn(*args)
    return e.value.status


def _setup(s: Session, queue: int = 0):
    """A module, its kernel, a buffer, and a valid plan that was relaunched once."""
    module = s.load_module(encode(parse(SCALE)))
    kernel, info = s.get_kernel(module, "scale")
    x = s.alloc(64)
    args = bytearray(info.args_size)
    struct.pack_into("<i", args, info.param_offsets[0], 16)
    struct.pack_into("<Q", args, info.param_offsets[1], x)
    launch = (kernel, (1, 1, 1), (16, 1, 1), bytes(args), 0, queue)
    plan = s.launch_plan(*launch)
    assert plan is not None
    assert s.relaunch(plan)
    s.synchronize()
    return module, x, launch, plan


def test_relaunch_issues_the_plan_and_counts_it(session):
    _m, _x, _launch, plan = _setup(session)
    before = session.stats.launches
    assert session.relaunch(plan) and session.relaunch(plan)
    assert session.stats.launches == before + 2
    session.synchronize()


def test_any_free_makes_plans_stale(session):
    _m, x, launch, plan = _setup(session)
    other = session.alloc(64)
    assert session.relaunch(plan)                  # an allocation changes no resolved bound
    session.free(other)
    assert not session.relaunch(plan)
    session.free(x)
    plan = session.launch_plan(*launch)            # x is gone: no plan (its bound is (0, 0))
    assert plan is None
    assert _status(session.synchronize) is Status.KERNEL_FAULT


def test_module_unload_makes_plans_stale(session):
    module, _x, launch, plan = _setup(session)
    session.unload_module(module)
    assert not session.relaunch(plan)
    assert _status(session.launch_plan, *launch) is Status.INVALID_HANDLE


def test_destroying_the_queue_makes_plans_stale(session):
    queue = session.create_queue()
    _m, _x, launch, plan = _setup(session, queue)
    session.destroy_queue(queue)
    assert not session.relaunch(plan)
    assert _status(session.launch_plan, *launch) is Status.INVALID_HANDLE


def test_a_foreign_context_reset_makes_plans_stale(session, backend):
    _m, _x, launch, plan = _setup(session)
    backend.reset()                                # as another client's fault would
    assert not session.relaunch(plan)
    assert _status(session.launch_plan, *launch) is Status.INVALID_HANDLE


def test_a_quota_change_makes_plans_stale(session):
    _m, _x, _launch, plan = _setup(session)
    session.quota = replace(QUOTA, queue_depth=2)
    assert not session.relaunch(plan)


def test_close_refuses_relaunch_like_launch(backend):
    s = Session(backend, QUOTA)
    _m, _x, launch, plan = _setup(s)
    s.close()
    assert _status(s.relaunch, plan) is Status.INVALID_HANDLE
    assert _status(s.launch_plan, *launch) is Status.INVALID_HANDLE


def test_a_plan_is_for_its_own_session_only(backend):
    with Session(backend, QUOTA) as a, Session(backend, QUOTA) as b:
        _m, _x, _launch, plan = _setup(a)
        assert not b.relaunch(plan)


def test_relaunch_keeps_the_depth_policy(backend):
    with Session(backend, QUOTA, depth_policy="fail") as s:
        _m, _x, _launch, plan = _setup(s)
        issued = 0
        with pytest.raises(BackendError) as e:
            for _ in range(QUOTA.queue_depth + 1):
                s.relaunch(plan)
                issued += 1
        assert e.value.status is Status.QUOTA_EXCEEDED and issued == QUOTA.queue_depth
        s.synchronize()
        assert s.relaunch(plan)
        s.synchronize()
