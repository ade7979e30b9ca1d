"""Conformance: queue ordering, events and synchronize, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from vxpu.accel.backend import BackendError, Status

from .kernels import VADD, image, vadd_args


def _vadd(session):
    return session.get_kernel(session.load_module(image(VADD)), "vadd")[0]


@pytest.mark.parametrize("use_queue", [False, True])
def test_operations_on_a_queue_run_in_order(session, use_queue):
    n = 4096
    q = session.create_queue() if use_queue else 0
    k = _vadd(session)
    acc, ones = session.alloc(4 * n), session.alloc(4 * n)
    session.memset(acc, 0, 4 * n, q)
    session.copy_htod(ones, memoryview(np.ones(n, np.float32)), q)
    for _ in range(20):                                    # acc += 1, each depending on the last
        session.launch(k, (n // 256,), (256,), vadd_args(n, acc, ones, acc), queue=q)
    out = np.zeros(n, np.float32)
    session.copy_dtoh(memoryview(out), acc, q)
    session.synchronize(q)
    assert np.all(out == 20)


def test_independent_queues(session):
    n = 1024
    k = _vadd(session)
    queues = [session.create_queue() for _ in range(3)]
    bufs = []
    for j, q in enumerate(queues):
        src = np.full(n, j + 1, np.float32)
        a, c = session.alloc(4 * n), session.alloc(4 * n)
        session.copy_htod(a, memoryview(src), q)
        session.launch(k, (n // 128,), (128,), vadd_args(n, a, a, c), queue=q)
        bufs.append(c)
    session.synchronize()
    for j, c in enumerate(bufs):
        out = np.zeros(n, np.float32)
        session.copy_dtoh(memoryview(out), c)
        assert np.all(out == 2 * (j + 1))
    for q in queues:
        session.destroy_queue(q)


def test_events_time_work(session):
    n = 1 << 16
    k = _vadd(session)
    a, c = session.alloc(4 * n), session.alloc(4 * n)
    session.memset(a, 0, 4 * n)
    start, end = session.create_event(), session.create_event()
    session.record_event(start)
    for _ in range(3):
        session.launch(k, (n // 256,), (256,), vadd_args(n, a, a, c))
    session.record_event(end)
    ms = session.event_elapsed_ms(start, end)
    assert ms >= 0
    assert session.event_elapsed_ms(start, start) == 0


def test_unrecorded_event(session):
    e0, e1 = session.create_event(), session.create_event()
    with pytest.raises(BackendError) as e:
        session.event_elapsed_ms(e0, e1)
    assert e.value.status in (Status.INVALID_ARGUMENT, Status.INVALID_HANDLE)


def test_synchronize_device_and_queue(session):
    q = session.create_queue()
    a = session.alloc(1 << 20)
    session.memset(a, 7, 1 << 20, q)
    session.synchronize(q)
    session.synchronize()
    out = np.zeros(16, np.uint8)
    session.copy_dtoh(memoryview(out), a + 1000)
    session.synchronize()
    assert np.all(out == 7)
