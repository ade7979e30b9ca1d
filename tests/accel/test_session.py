"""Session policy on the real CPU backend: handles, range checks, quotas, errors, statistics.

Kernel launches are covered by the conformance suite; these tests need no compiler.
"""

from __future__ import annotations

import numpy as np
import pytest
from vxpu.accel.backend import BackendError, ModuleKind, Status
from vxpu.accel.cpu import CpuBackend
from vxpu.accel.quota import Quota
from vxpu.accel.session import DEFAULT_QUEUE, Session, status_of


@pytest.fixture(scope="module")
def backend():
    b = CpuBackend(arena="256M", threads=2)
    b.open()
    yield b
    b.close()


@pytest.fixture
def session(backend):
    s = Session(backend, Quota(memory_bytes=64 << 20, max_allocations=64, queues=2, events=3, modules=2,
                               module_bytes=1 << 16, queue_depth=4))
    yield s
    s.close()


def status(fn, *args, **kwargs) -> Status:
    with pytest.raises(BackendError) as e:
        fn(*args, **kwargs)
    return e.value.status


def test_round_trip_with_offsets(session):
    a = session.alloc(4096)
    data = np.arange(1024, dtype=np.uint32)
    session.copy_htod(a + 16, memoryview(data)[:1020])
    out = np.zeros(1020, dtype=np.uint32)
    session.copy_dtoh(memoryview(out), a + 16)
    assert np.array_equal(out, data[:1020])


def test_double_free_and_unknown_address(session):
    a = session.alloc(100)
    session.free(a)
    assert status(session.free, a) == Status.INVALID_HANDLE
    assert status(session.free, 12345) == Status.INVALID_HANDLE
    assert status(session.alloc, 0) == Status.INVALID_ARGUMENT


@pytest.mark.parametrize("offset,length", [(0, 101), (100, 1), (-1, 1), (50, -1), (2**64 - 1, 2), (99, 2**64 - 1)])
def test_out_of_range_copies(session, offset, length):
    a = session.alloc(100)
    got = status(session.memset, a + offset, 0, length)
    assert got in (Status.OUT_OF_RANGE, Status.INVALID_ARGUMENT)


def test_range_may_not_straddle_two_allocations(session):
    a = session.alloc(256)
    b = session.alloc(256)
    assert b == a + 256                           # adjacent in the pool chunk
    assert status(session.copy_dtod, a, a + 128, 256) == Status.OUT_OF_RANGE
    session.copy_dtod(b, a, 256)                  # exactly one allocation each: fine


def test_other_clients_memory_is_out_of_range(backend, session):
    other = Session(backend)
    try:
        theirs = other.alloc(128)
        assert status(session.memset, theirs, 1, 8) == Status.OUT_OF_RANGE
        assert status(session.free, theirs) == Status.INVALID_HANDLE
    finally:
        other.close()


def test_host_buffers_checked(session):
    a = session.alloc(64)
    assert status(session.copy_dtoh, memoryview(bytes(64)), a) == Status.INVALID_ARGUMENT   # read-only
    strided = memoryview(np.zeros(32, dtype=np.uint8))[::2]
    assert status(session.copy_htod, a, strided) == Status.INVALID_ARGUMENT
    assert status(session.memset, a, 256, 1) == Status.INVALID_ARGUMENT


def test_memory_quota(session):
    session.alloc(60 << 20)
    assert status(session.alloc, 5 << 20) == Status.QUOTA_EXCEEDED
    assert session.usage.memory_bytes == 60 << 20
    assert session.statistics()["vxpu_session_errors_quota_exceeded"] == 1


def test_allocation_count_quota(session):
    for _ in range(64):
        session.alloc(16)
    assert status(session.alloc, 16) == Status.QUOTA_EXCEEDED


def test_queue_and_event_quotas_and_handle_kinds(session):
    q1, q2 = session.create_queue(), session.create_queue()
    assert status(session.create_queue) == Status.QUOTA_EXCEEDED
    events = [session.create_event() for _ in range(3)]
    assert status(session.create_event) == Status.QUOTA_EXCEEDED
    assert status(session.destroy_event, q1) == Status.INVALID_HANDLE        # a queue is not an event
    assert status(session.destroy_queue, DEFAULT_QUEUE) == Status.INVALID_HANDLE
    session.destroy_queue(q2)
    assert status(session.synchronize, q2) == Status.INVALID_HANDLE
    session.create_queue()                                                   # refunded
    session.destroy_event(events[0])
    assert status(session.destroy_event, events[0]) == Status.INVALID_HANDLE


def test_queue_depth_policies(backend):
    quota = Quota(queue_depth=3)
    waiting = Session(backend, quota)
    failing = Session(backend, quota, depth_policy="fail")
    try:
        a, b = waiting.alloc(64), failing.alloc(64)
        for s, addr in ((waiting, a), (failing, b)):
            for _ in range(3):
                s.memset(addr, 1, 64)
        waiting.memset(a, 2, 64)
        assert waiting.stats.queue_waits == 1
        assert status(failing.memset, b, 2, 64) == Status.QUOTA_EXCEEDED
        failing.synchronize()
        failing.memset(b, 2, 64)
    finally:
        waiting.close()
        failing.close()


def test_module_kind_and_size_policy(session):
    assert status(session.load_module, b"x", ModuleKind.PTX) == Status.UNSUPPORTED
    assert status(session.load_module, bytes(1 << 17)) == Status.QUOTA_EXCEEDED
    assert status(session.get_kernel, 0x4D4F << 48 | 1, "k") == Status.INVALID_HANDLE
    assert status(session.launch, 42, (1,), (1,), b"") == Status.INVALID_HANDLE


def test_foreign_reset_invalidates_handles(backend):
    s = Session(backend)
    try:
        a = s.alloc(64)
        q = s.create_queue()
        backend.reset()
        assert status(s.free, a) == Status.INVALID_HANDLE
        assert status(s.synchronize, q) == Status.INVALID_HANDLE
        assert s.stats.invalidations == 1 and s.usage.memory_bytes == 0
        b = s.alloc(64)                                  # serving again
        s.memset(b, 3, 64)
    finally:
        s.close()


def test_unexpected_backend_exception_becomes_internal():
    class Broken(CpuBackend):
        def memset(self, *args, **kwargs):
            raise RuntimeError("bug")

    b = Broken(arena="16M", threads=1)
    b.open()
    try:
        s = Session(b)
        a = s.alloc(16)
        with pytest.raises(BackendError) as e:
            s.memset(a, 0, 16)
        assert e.value.status == Status.INTERNAL and status_of(e.value) == Status.INTERNAL
        assert status_of(ValueError()) == Status.INTERNAL
        s.close()
    finally:
        b.close()


def test_close_returns_all_memory(backend):
    free0, total = backend.memory_info()
    s = Session(backend)
    for size in (10, 1 << 20, 40 << 20):
        s.alloc(size)
    assert backend.memory_info()[0] < free0
    s.close()
    s.close()                                            # idempotent
    assert backend.memory_info() == (free0, total)
    assert status(s.alloc, 1) == Status.INVALID_HANDLE


def test_events_and_statistics(session):
    e0, e1 = session.create_event(), session.create_event()
    assert status(session.event_elapsed_ms, e0, e1) == Status.INVALID_ARGUMENT     # never recorded
    a = session.alloc(1 << 20)
    session.record_event(e0)
    session.memset(a, 9, 1 << 20)
    session.record_event(e1)
    assert session.event_elapsed_ms(e0, e1) >= 0
    st = session.statistics()
    assert st["vxpu_session_memsets"] == 1 and st["vxpu_pool_live_allocations"] == 1
    assert st["vxpu_session_errors_invalid_argument"] == 1


def test_range_check_matches_an_oracle(backend):
    """Property: a range passes exactly when it lies inside one allocation (no wrap-around)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    s = Session(backend)
    allocs = [(a, n) for n in (1, 256, 1000, 4096) for a in [s.alloc(n)]]
    points = [a + d for a, n in allocs for d in (-1, 0, 1, n - 1, n, n + 1)] + [0, 2**63, 2**64 - 1]

    @settings(max_examples=400, deadline=None)
    @given(st.one_of(st.sampled_from(points), st.integers(-(2**65), 2**65)),
           st.one_of(st.sampled_from([0, 1, 255, 256, 999, 1000, 1001, 4096, 2**64 - 1]),
                     st.integers(-(2**65), 2**65)))
    def check(address: int, length: int) -> None:
        inside = any(a <= address and address + length <= a + n and (length or address < a + n)
                     for a, n in allocs)
        if not (0 <= address < 2**64 and 0 <= length < 2**64):
            inside = False
        try:
            s.check_range(address, length)
            ok = True
        except BackendError as exc:
            assert exc.status in (Status.OUT_OF_RANGE, Status.INVALID_ARGUMENT)
            ok = False
        assert ok == inside

    try:
        check()
    finally:
        s.close()


def test_memory_quota_counts_pool_rounding(backend):
    """The pool rounds every allocation up to its alignment (256 bytes), so the quota must
    charge the rounded size: many 1-byte allocations must not hold 256x the memory quota."""
    quota = Quota(memory_bytes=64 << 10, max_allocations=4096)
    with Session(backend, quota) as s:
        held = []
        for _ in range(1024):
            try:
                held.append(s.alloc(1))
            except BackendError as exc:
                assert exc.status == Status.QUOTA_EXCEEDED
                break
        in_use = s.pool.stats().bytes_in_use
        assert in_use <= quota.memory_bytes, f"{len(held)} allocations hold {in_use} bytes, quota {quota.memory_bytes}"
        assert len(held) == quota.memory_bytes // s.pool.alignment
        for a in held:
            s.free(a)
        assert s.usage.memory_bytes == 0 and s.usage.allocations == 0


class _FaultingBackend:
    """Unit-test fake: every synchronize reports a kernel fault (and a context reset)."""

    name = "fake"

    def __init__(self) -> None:
        from vxpu.accel.backend import BackendStats, DeviceProperties

        self.stats = BackendStats()
        self._props = DeviceProperties("fake", "fake", "host", "x", 1 << 30, 1, 1024, 48 << 10)

    def properties(self):
        return self._props

    def alloc(self, size: int) -> int:
        return 1 << 20

    def free(self, address: int) -> None:
        pass

    def synchronize(self, queue) -> None:
        self.stats.faults += 1
        self.stats.resets += 1
        raise BackendError(Status.KERNEL_FAULT, "kernel faulted at 0x0")


def test_guest_triggered_faults_do_not_flood_the_log(caplog):
    """A guest can make its kernels fault in a loop; each fault is counted and answered, but
    only a bounded number of WARNING lines reach the log (the rest go to DEBUG)."""
    import logging

    caplog.set_level(logging.DEBUG, logger="vxpu.accel.session")
    s = Session(_FaultingBackend())
    for _ in range(500):
        assert status(s.synchronize) == Status.KERNEL_FAULT
    assert s.stats.faults == 500
    warned = [r for r in caplog.records if r.name.startswith("vxpu.accel.session") and r.levelno >= logging.WARNING]
    assert len(warned) <= 70, f"{len(warned)} WARNING lines for 500 faults"


def test_allocation_size_forgets_allocations_lost_in_a_reset():
    """After another client's fault reset the device context, this client's allocations are
    gone (their addresses may be handed to someone else): allocation_size must not vouch for
    them, even before this client's next guarded call."""
    backend = _FaultingBackend()
    s = Session(backend)
    a = s.alloc(100)
    assert s.allocation_size(a) == 100
    backend.stats.resets += 1                  # a reset caused elsewhere
    assert s.allocation_size(a) is None


class _WaitTimeoutBackend(CpuBackend):
    """Unit-test fake: synchronize reports a plain wait TIMEOUT without resetting anything."""

    def synchronize(self, queue=None):
        raise BackendError(Status.TIMEOUT, "wait timed out")


def test_plain_wait_timeout_keeps_handles():
    """TIMEOUT invalidates handles only when the backend reset its context (an overrunning
    kernel it cancelled); a wait that merely timed out leaves the client's objects alone."""
    backend = _WaitTimeoutBackend()
    backend.open()
    try:
        s = Session(backend)
        buf = s.alloc(64)
        with pytest.raises(BackendError) as e:
            s.synchronize()
        assert e.value.status == Status.TIMEOUT
        assert s.stats.faults == 0
        s.free(buf)                                    # still a valid handle
    finally:
        backend.close()


def test_session_bounds_what_its_pool_may_hold(backend):
    """Quotas bound bytes in use; the pool's reserve limit bounds what the client can make the
    device hold, stranded fragments included (the limit's mechanics: tests/accel/test_pool.py)."""
    from vxpu.accel.pool import DEFAULT_CHUNK_SIZE
    from vxpu.accel.session import reserve_limit

    quota = Quota(memory_bytes=24 << 20)
    assert reserve_limit(quota) == 2 * (24 << 20) + DEFAULT_CHUNK_SIZE
    with Session(backend, quota) as s:
        assert s.pool.reserve_limit == reserve_limit(quota)
