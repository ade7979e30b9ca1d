"""MODULE_LOAD of hostile IR through a Session on the CPU backend (issue 7).

The slow and crashing shapes are refused at verify time or fail with COMPILE_LIMIT within the
compile worker's deadline; a worker killed mid-compile fails that load only; the session
keeps serving another thread's calls, and the process keeps answering vfio-user REGION_READs,
while a compile runs; a guest loading modules in a loop runs out of compile budget; and 200
loads alternating good and bad modules leak no worker process and no fd.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from vxpu.accel.backend import BackendError, Status
from vxpu.accel.cpu import CpuBackend
from vxpu.accel.quota import COMPILE_WINDOW_S, CompileBudget, Quota
from vxpu.accel.session import Session
from vxpu.ir import workers
from vxpu.ir.binary import encode
from vxpu.ir.cache import CompileCache
from vxpu.ir.text import parse
from vxpu.ir.workers import WorkerLimits

from .conformance.kernels import VADD, vadd_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ir"))
import hostile_shapes as hs  # the shapes live beside the IR tests

DEADLINE = 2.0


def vadd(name: str = "vadd") -> bytes:
    """VADD under module name ``name``: a distinct compile-cache key per name."""
    return encode(parse(VADD.replace("module @vadd", f"module @{name}")), names=False)


SLOW = encode(hs.many_kernels(4, 8192), names=False)     # several seconds of LLVM, within the limits


@pytest.fixture
def pool_limits() -> Iterator[WorkerLimits]:
    """The process-wide compile pool with a short deadline (restored afterwards)."""
    limits = WorkerLimits(wall_seconds=DEADLINE)
    workers.configure(2, limits)
    yield limits
    workers.configure(*workers.config_from_env())


@pytest.fixture
def session(pool_limits) -> Iterator[Session]:
    backend = CpuBackend(arena="64M", threads=1, cache=CompileCache(False))
    backend.open()
    s = Session(backend)
    yield s
    s.close()
    backend.close()


def expect(status: Status, fn) -> BackendError:
    with pytest.raises(BackendError) as info:
        fn()
    assert info.value.status is status, info.value
    return info.value


def run_vadd(s: Session, module: int, n: int = 1000) -> None:
    k, _ = s.get_kernel(module, "vadd")
    a = np.arange(n, dtype=np.float32)
    da, db, dc = s.alloc(4 * n), s.alloc(4 * n), s.alloc(4 * n)
    s.copy_htod(da, memoryview(a))
    s.copy_htod(db, memoryview(a))
    s.launch(k, ((n + 127) // 128,), (128,), vadd_args(n, da, db, dc))
    out = np.empty(n, dtype=np.float32)
    s.copy_dtoh(memoryview(out), dc)
    s.synchronize()
    assert np.array_equal(out, 2 * a)
    for d in (da, db, dc):
        s.free(d)


@pytest.mark.parametrize("shape", [lambda: hs.loop_nest(2000), lambda: hs.straight_line(65000),
                                   lambda: hs.branch_chain(16000), lambda: hs.many_kernels(256, 1000)],
                         ids=["nest2000", "line65000", "chain16000", "many256x1000"])
def test_hostile_shapes_are_refused_before_any_worker(session, shape):
    data = encode(shape(), names=False)
    jobs = workers.sandbox_pool().stats.jobs
    start = time.monotonic()
    err = expect(Status.BAD_MODULE, lambda: session.load_module(data))
    assert time.monotonic() - start < 2.0      # decode stops at the first count past a limit (~0.1 s)
    assert "limit" in str(err)
    assert workers.sandbox_pool().stats.jobs == jobs
    run_vadd(session, session.load_module(vadd()))


def test_a_slow_compile_fails_with_compile_limit_within_its_deadline(session):
    session.load_module(vadd("warm"))               # the pool's workers are up (their start is not timed)
    front = hs.front_end_seconds(SLOW)
    start = time.monotonic()
    err = expect(Status.COMPILE_LIMIT, lambda: session.load_module(SLOW))
    took = time.monotonic() - start
    assert took < 2 * front + DEADLINE + 1.0, (took, front)    # not the several seconds LLVM would take
    assert "deadline" in str(err)
    run_vadd(session, session.load_module(vadd()))


def test_a_worker_killed_mid_compile_fails_that_load_only(session):
    workers.configure(2, WorkerLimits(wall_seconds=60))
    pool = workers.sandbox_pool()
    outcome: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(outcome, lambda: session.load_module(SLOW)))
    thread.start()
    busy = _wait_busy(pool)
    time.sleep(0.2)
    os.kill(busy, signal.SIGKILL)
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], BackendError), outcome
    assert outcome[0].status is Status.COMPILE_LIMIT and "SIGKILL" in str(outcome[0])
    run_vadd(session, session.load_module(vadd()))


def test_the_session_serves_other_threads_while_a_compile_runs(session):
    workers.configure(2, WorkerLimits(wall_seconds=60))
    module = session.load_module(vadd())
    outcome: list[BaseException] = []
    loader = threading.Thread(target=lambda: _catch(outcome, lambda: session.load_module(SLOW)))
    loader.start()
    _wait_busy(workers.sandbox_pool())
    slowest = 0.0
    rounds = 0
    while loader.is_alive() and rounds < 20:
        t0 = time.monotonic()
        run_vadd(session, module)
        slowest = max(slowest, time.monotonic() - t0)
        rounds += 1
    assert rounds >= 3 and loader.is_alive(), "the compile ended before the other thread could overlap it"
    assert slowest < 0.5, slowest
    loader.join(60)
    assert not outcome, outcome


def test_region_read_is_answered_while_a_compile_runs(session, tmp_path):
    from vxpu.vfio_server.client import VfioUserClient
    from vxpu.vfio_server.server import VfioUserServer
    from vxpu.vfio_server.testdev import TestDevice

    workers.configure(2, WorkerLimits(wall_seconds=60))
    server = VfioUserServer(tmp_path / "s.sock", TestDevice()).start()
    outcome: list[BaseException] = []
    loader = threading.Thread(target=lambda: _catch(outcome, lambda: session.load_module(SLOW)))
    try:
        with VfioUserClient(server.path, timeout=3.0) as c:
            c.handshake()
            loader.start()
            _wait_busy(workers.sandbox_pool())
            slowest, reads = 0.0, 0
            while loader.is_alive() and reads < 200:
                t0 = time.monotonic()
                c.region_read(7, 0, 4)                    # vendor and device id
                slowest = max(slowest, time.monotonic() - t0)
                reads += 1
            assert reads >= 20 and slowest < 0.1, (reads, slowest)
    finally:
        loader.join(60)
        server.stop()
    assert not outcome, outcome


def test_a_guest_loading_in_a_loop_runs_out_of_compile_budget(pool_limits):
    workers.configure(2, WorkerLimits(wall_seconds=60))
    backend = CpuBackend(arena="16M", threads=1, cache=CompileCache(False))
    backend.open()
    s = Session(backend, Quota(compile_seconds=1))
    try:
        s.load_module(SLOW)                               # seconds: the bucket goes negative
        err = expect(Status.QUOTA_EXCEEDED, lambda: s.load_module(vadd()))
        assert "compile budget used up" in str(err)
    finally:
        s.close()
        backend.close()


def test_one_load_at_a_time_per_client(session):
    workers.configure(2, WorkerLimits(wall_seconds=60))
    outcome: list[BaseException] = []
    loader = threading.Thread(target=lambda: _catch(outcome, lambda: session.load_module(SLOW)))
    loader.start()
    _wait_busy(workers.sandbox_pool())
    err = expect(Status.QUOTA_EXCEEDED, lambda: session.load_module(vadd("other")))
    assert "already running" in str(err)
    loader.join(60)
    assert not outcome
    session.load_module(vadd("other"))


def test_compile_budget_refills():
    now = [0.0]
    budget = CompileBudget(10, clock=lambda: now[0])
    budget.begin()
    budget.end(25.0)                                     # one long compile overdraws it
    assert budget.credit() == -15.0
    expect(Status.QUOTA_EXCEEDED, budget.begin)
    now[0] += 15.0 * COMPILE_WINDOW_S / 10 + 1
    budget.begin()
    budget.end(0.01)
    now[0] += 10 * COMPILE_WINDOW_S
    assert budget.credit() == 10.0                       # never more than the bucket


def test_200_loads_alternating_good_and_bad_leak_nothing(session):
    """Good modules are distinct (each a compile in a worker); bad ones are undecodable,
    refused by the verifier, or (every 20th) killed at the deadline, replacing a worker."""
    workers.configure(2, WorkerLimits(wall_seconds=1.0))
    session.load_module(vadd("warm"))
    pool = workers.sandbox_pool()
    fds_before = _nfds()
    refused = [b"VXIR" + b"\xff" * 40, encode(hs.loop_nest(100), names=False)]
    statuses: dict[str, int] = {}
    for i in range(100):
        session.unload_module(session.load_module(vadd(f"m{i}")))
        data = SLOW if i % 20 == 19 else refused[i % 2]
        err = expect(Status.COMPILE_LIMIT if data is SLOW else Status.BAD_MODULE, lambda d=data: session.load_module(d))
        statuses[err.status.name] = statuses.get(err.status.name, 0) + 1
    assert statuses == {"BAD_MODULE": 95, "COMPILE_LIMIT": 5}
    assert pool.stats.failures == 5
    # A worker being stopped or replaced right now (the idle reaper, a deadline's replacement)
    # holds its pipes until it has exited: wait for that (a loaded 2-core CI box saw 4 fds
    # still open at the first look), but a leak stays and fails.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (_nfds() != fds_before or sorted(_children()) != sorted(pool.pids())):
        time.sleep(0.05)
    assert sorted(_children()) == sorted(pool.pids()) and len(pool.pids()) == 2
    assert _nfds() == fds_before


def _catch(outcome: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
        outcome.append(exc)


def _wait_busy(pool: workers.CompilePool) -> int:
    for _ in range(1000):
        busy = pool.pids(busy=True)
        if busy:
            return busy[0]
        time.sleep(0.01)
    raise AssertionError("no compile started")


def _nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _children() -> list[int]:
    me = str(os.getpid())
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def test_a_refused_load_leaves_no_load_running(pool_limits):
    """The module quota refuses a load after the compile budget admitted it: the budget must
    not think a load is still running."""
    backend = CpuBackend(arena="16M", threads=1, cache=CompileCache(False))
    backend.open()
    s = Session(backend, Quota(modules=1))
    try:
        s.load_module(vadd("first"))
        err = expect(Status.QUOTA_EXCEEDED, lambda: s.load_module(vadd("second")))
        assert "modules quota" in str(err)
        assert not s.compile_budget.in_flight
        err = expect(Status.QUOTA_EXCEEDED, lambda: s.load_module(vadd("third")))
        assert "modules quota" in str(err)            # not "already running"
    finally:
        s.close()
        backend.close()


def test_a_device_reset_does_not_refill_the_compile_budget(pool_limits):
    """The accelerator gives each guest one budget for all its sessions: a guest that has used
    its compile time up cannot get it back by resetting the device."""
    from vxpu.vfio_server.xpu import XpuDevice

    backend = CpuBackend(arena="16M", threads=1, cache=CompileCache(False))
    backend.open()
    device = XpuDevice(backend, Quota(compile_seconds=1))
    try:
        first = device.poller.session
        assert first.compile_budget is device.compile_budget
        device.compile_budget.begin()
        device.compile_budget.end(5.0)                    # a long compile overdrew it
        device.poller.reset_session()
        assert device.poller.session is not first
        err = expect(Status.QUOTA_EXCEEDED, lambda: device.poller.session.load_module(vadd("after_reset")))
        assert "compile budget used up" in str(err)
    finally:
        device.close()
        backend.close()
