"""Conformance: device memory through a Session, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from vxpu.accel.backend import BackendError, Status


def status_of(fn, *args):
    with pytest.raises(BackendError) as e:
        fn(*args)
    return e.value.status


def test_alloc_free(session, backend):
    free_before, total = backend.memory_info()
    assert 0 < free_before <= total
    addrs = [session.alloc(size) for size in (1, 100, 4096, 3 << 20)]
    assert len(set(addrs)) == 4 and all(a != 0 for a in addrs)
    for a in addrs:
        session.free(a)
    assert session.usage.memory_bytes == 0


def test_memset(session):
    a = session.alloc(1000)
    session.memset(a, 0xAB, 1000)
    session.memset(a + 10, 0x01, 5)
    out = np.zeros(1000, np.uint8)
    session.copy_dtoh(memoryview(out), a)
    session.synchronize()
    expect = np.full(1000, 0xAB, np.uint8)
    expect[10:15] = 1
    assert np.array_equal(out, expect)


def test_copies_with_offsets(session):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 8192, dtype=np.uint8)
    a, b = session.alloc(8192), session.alloc(8192)
    session.memset(b, 0, 8192)
    session.copy_htod(a, memoryview(src))
    session.copy_dtod(b + 100, a + 7, 4000)
    session.copy_htod(b, memoryview(src)[5000:5050])
    out = np.zeros(8192, np.uint8)
    session.copy_dtoh(memoryview(out)[1:], b + 1)
    session.synchronize()
    expect = np.zeros(8192, np.uint8)
    expect[100:4100] = src[7:4007]
    expect[0:50] = src[5000:5050]
    assert np.array_equal(out[1:], expect[1:])


def test_dtod_overlapping(session):
    a = session.alloc(1024)
    data = np.arange(1024, dtype=np.uint8)
    session.copy_htod(a, memoryview(data))
    session.copy_dtod(a + 1, a, 1000)
    out = np.zeros(1024, np.uint8)
    session.copy_dtoh(memoryview(out), a)
    session.synchronize()
    assert np.array_equal(out[1:1001], data[:1000])


def test_double_free(session):
    a = session.alloc(64)
    session.free(a)
    assert status_of(session.free, a) == Status.INVALID_HANDLE


@pytest.mark.parametrize("where", ["past_end", "before_start", "huge"])
def test_out_of_range_copy(session, where):
    a = session.alloc(256)
    buf = np.zeros(64, np.uint8)
    dst = {"past_end": a + 200, "before_start": a - 64, "huge": 2**64 - 32}[where]
    assert status_of(session.copy_htod, dst, memoryview(buf)) in (Status.OUT_OF_RANGE, Status.INVALID_ARGUMENT)
    assert status_of(session.copy_dtoh, memoryview(buf), dst) in (Status.OUT_OF_RANGE, Status.INVALID_ARGUMENT)


def test_bad_handles(session):
    assert status_of(session.synchronize, 0x5155 << 48 | 999) == Status.INVALID_HANDLE
    assert status_of(session.destroy_event, 123) == Status.INVALID_HANDLE
    assert status_of(session.unload_module, 0) == Status.INVALID_HANDLE


def test_quota_exceeded(session):
    session.alloc(200 << 20)
    assert status_of(session.alloc, 100 << 20) == Status.QUOTA_EXCEEDED
    session.alloc(1 << 20)                         # still serving below the quota


def test_pool_statistics(session):
    addrs = [session.alloc(4096) for _ in range(8)]
    for a in addrs[::2]:
        session.free(a)
    st = session.statistics()
    assert st["vxpu_pool_live_allocations"] == 4
    assert st["vxpu_pool_peak_bytes_in_use"] == 8 * 4096
    assert st["vxpu_pool_fragmentation"] > 0
    for a in addrs[1::2]:
        session.free(a)
    st = session.statistics()
    assert st["vxpu_pool_bytes_in_use"] == 0 and st["vxpu_pool_fragmentation"] == 0
    assert st["vxpu_session_allocations"] == 8 and st["vxpu_session_frees"] == 8


def test_address_copies_inside_registered_host_memory(session, backend):
    if not hasattr(backend, "copy_htod_address"):
        pytest.skip(f"the {backend.name} backend has no address-copy extension")
    host = np.arange(4096, dtype=np.uint8)
    back = np.zeros(4096, np.uint8)
    t1 = session.register_host(memoryview(host), read_only=True)
    t2 = session.register_host(memoryview(back))
    d = session.alloc(4096)
    session.copy_htod_address(d, host.ctypes.data + 96, 1000)
    session.copy_dtoh_address(back.ctypes.data + 5, d, 1000)
    session.synchronize()
    assert np.array_equal(back[5:1005], host[96:1096]) and not back[:5].any() and not back[1005:].any()
    # outside every registered region, or into a read-only one
    assert status_of(session.copy_htod_address, d, host.ctypes.data + 4000, 200) == Status.OUT_OF_RANGE
    assert status_of(session.copy_dtoh_address, host.ctypes.data, d, 16) == Status.OUT_OF_RANGE
    assert status_of(session.copy_htod_address, d + 4000, host.ctypes.data, 200) == Status.OUT_OF_RANGE
    session.unregister_host(t1)
    session.unregister_host(t2)
    assert status_of(session.copy_htod_address, d, host.ctypes.data, 16) == Status.OUT_OF_RANGE
