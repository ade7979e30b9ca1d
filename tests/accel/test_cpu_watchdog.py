"""The CPU backend's kernel time limit: a non-terminating guest kernel ends in TIMEOUT and a
context reset, reset/close cancel running kernels instead of hanging, and legitimate long
kernels under the limit are left alone."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest
from vxpu.accel.backend import BackendError, BackendUnavailable, Status
from vxpu.accel.cpu import DEFAULT_KERNEL_TIMEOUT, CpuBackend, parse_timeout
from vxpu.accel.registry import open_backend

from .conformance.kernels import VADD, image, vadd_args

LIMIT = 0.3          # seconds: every non-terminating kernel below ends within ~LIMIT
PROMPT = 2.0         # generous bound for "returned promptly" on a loaded 2-core CI machine

SPIN = image("""
module @spin
kernel @spin(%n: i32) {
^entry:
  br ^loop
^loop:
  br ^loop
}
""")

# Every thread loops for ever between two barriers (uniformly, so no barrier fault first).
BARRIER_SPIN = image("""
module @bspin
kernel @bspin(%n: i32) {
  shared @s: i32[64]
^entry:
  %t = thread_id.x
  %sa = shared_addr @s
  %p = offset %sa, %t : i32
  store %t, %p
  barrier
  br ^loop
^loop:
  %z = const 0 : i32
  %stop = icmp slt %n, %z
  cbr %stop, ^out, ^loop
^out:
  barrier
  ret
}
""")

# out[t] = the number of iterations run, out[4 + t] = n rounds of an xorshift (cannot be folded).
BUSY = image("""
module @busy
kernel @busy(%n: i32, %out: ptr<global>) {
^entry:
  %z = const 0 : i32
  %one = const 1 : i32
  %seed = const 12345 : i32
  br ^head(%z, %seed)
^head(%i: i32, %x: i32):
  %more = icmp slt %i, %n
  cbr %more, ^body, ^exit
^body:
  %c13 = const 13 : i32
  %c17 = const 17 : i32
  %a = shl %x, %c13 : i32
  %x1 = xor %x, %a : i32
  %b = lshr %x1, %c17 : i32
  %x2 = xor %x1, %b : i32
  %i2 = add %i, %one : i32
  br ^head(%i2, %x2)
^exit:
  %t = thread_id.x
  %p = offset %out, %t : i32
  store %i, %p
  %four = const 4 : i32
  %t4 = add %t, %four : i32
  %px = offset %out, %t4 : i32
  store %x, %px
  ret
}
""")


@pytest.fixture
def backend():
    b = CpuBackend(arena="16M", threads=2, timeout=f"{int(LIMIT * 1000)}ms")
    b.open()
    yield b
    b.close()


def _launch(b: CpuBackend, img: bytes, name: str, grid: tuple[int, int, int], block: tuple[int, int, int],
            args: bytes, queue: object | None = None) -> None:
    k, _ = b.get_kernel(b.load_module(img), name)
    b.launch(k, grid, block, args, queue=queue)


def _vadd_works(b: CpuBackend) -> None:
    n = 1000
    a = np.arange(n, dtype=np.float32)
    da, db, dc = b.alloc(4 * n), b.alloc(4 * n), b.alloc(4 * n)
    b.copy_htod(da, memoryview(a))
    b.copy_htod(db, memoryview(a))
    _launch(b, image(VADD), "vadd", ((n + 127) // 128, 1, 1), (128, 1, 1), vadd_args(n, da, db, dc))
    out = np.empty(n, np.float32)
    b.copy_dtoh(memoryview(out), dc)
    b.synchronize()
    assert np.array_equal(out, 2 * a)


def _expect_timeout(b: CpuBackend) -> BackendError:
    t0 = time.monotonic()
    with pytest.raises(BackendError) as info:
        b.synchronize()
    assert time.monotonic() - t0 < LIMIT + PROMPT
    assert info.value.status == Status.TIMEOUT
    return info.value


def test_infinite_kernel_times_out_and_the_next_launch_works(backend):
    faults, resets = backend.stats.faults, backend.stats.resets
    buf = backend.alloc(64)
    _launch(backend, SPIN, "spin", (64, 1, 1), (32, 1, 1), struct.pack("<i", 0))
    err = _expect_timeout(backend)
    message = str(err)
    assert "0.3 s time limit" in message and "timeout=" in message
    assert backend.stats.faults == faults + 1 and backend.stats.resets == resets + 1
    with pytest.raises(BackendError) as gone:          # the context was reset like after a fault
        backend.free(buf)
    assert gone.value.status == Status.INVALID_HANDLE
    _vadd_works(backend)


def test_single_threaded_launch_times_out_too():
    b = CpuBackend(arena="16M", threads=1, timeout=LIMIT)
    b.open()
    try:
        _launch(b, SPIN, "spin", (1, 1, 1), (1, 1, 1), struct.pack("<i", 0))
        _expect_timeout(b)
        _vadd_works(b)
    finally:
        b.close()


def test_barriers_with_threads_looping_between_them_time_out(backend):
    _launch(backend, BARRIER_SPIN, "bspin", (4, 1, 1), (64, 1, 1), struct.pack("<i", 0))
    _expect_timeout(backend)
    _vadd_works(backend)


def test_close_while_an_infinite_kernel_runs_returns_promptly():
    b = CpuBackend(arena="16M", threads=2, timeout="off")
    b.open()
    before = {t.ident for t in threading.enumerate()}
    for _ in range(3):                                  # one running, two queued behind it
        _launch(b, SPIN, "spin", (8, 1, 1), (8, 1, 1), struct.pack("<i", 0))
    q = b.create_queue()
    _launch(b, SPIN, "spin", (1, 1, 1), (1, 1, 1), struct.pack("<i", 0), queue=q)
    time.sleep(0.1)
    t0 = time.monotonic()
    b.close()
    assert time.monotonic() - t0 < PROMPT
    leftover = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("vxpu-")]
    assert leftover == []


def test_reset_cancels_running_kernels_and_the_backend_keeps_serving():
    b = CpuBackend(arena="16M", threads=2, timeout=None)
    b.open()
    try:
        q = b.create_queue()
        _launch(b, SPIN, "spin", (8, 1, 1), (8, 1, 1), struct.pack("<i", 0))
        _launch(b, BARRIER_SPIN, "bspin", (2, 1, 1), (64, 1, 1), struct.pack("<i", 0), queue=q)
        time.sleep(0.1)
        t0 = time.monotonic()
        b.reset()
        assert time.monotonic() - t0 < PROMPT
        b.synchronize()                                 # a cancel by reset is not reported
        _vadd_works(b)
    finally:
        b.close()


def test_a_contained_fault_leaves_other_queues_running(backend):
    """A checked kernel's fault resets nothing: a kernel on another queue keeps running (here
    it spins, with no time limit) until a reset stops it."""
    from vxpu.accel.backend import KernelFaultError

    from .conformance.kernels import OOB_STORE

    backend.kernel_timeout = None                       # only the reset can stop the spin
    q, q2 = backend.create_queue(), backend.create_queue()
    _launch(backend, SPIN, "spin", (2, 1, 1), (2, 1, 1), struct.pack("<i", 0), queue=q)
    buf = backend.alloc(64)
    _launch(backend, image(OOB_STORE), "oob_store", (1, 1, 1), (1, 1, 1), struct.pack("<Q", buf), queue=q2)
    t0 = time.monotonic()
    with pytest.raises(KernelFaultError) as info:
        backend.synchronize(q2)
    assert info.value.context_kept and time.monotonic() - t0 < PROMPT
    assert backend.stats.resets == 0
    t0 = time.monotonic()
    backend.reset()                                     # cancels the spinning kernel
    assert time.monotonic() - t0 < PROMPT
    _vadd_works(backend)


def _busy_seconds(b: CpuBackend, kernel: object, n: int) -> tuple[float, list[int]]:
    out = b.alloc(8 * 4)
    t0 = time.monotonic()
    b.launch(kernel, (1, 1, 1), (4, 1, 1), struct.pack("<i4xQ", n, out))
    b.synchronize()
    elapsed = time.monotonic() - t0
    res = np.empty(4, np.int32)
    b.copy_dtoh(memoryview(res), out)
    return elapsed, res.tolist()


def test_a_long_kernel_under_the_limit_is_not_cancelled():
    b = CpuBackend(arena="16M", threads=1, timeout="3s")
    b.open()
    try:
        k, _ = b.get_kernel(b.load_module(BUSY), "busy")
        n = 1 << 16
        elapsed, _ = _busy_seconds(b, k, n)
        while elapsed < 0.05 and n < 1 << 29:          # then scale to ~0.4 s on this machine
            n <<= 2
            elapsed, _ = _busy_seconds(b, k, n)
        n = min((1 << 31) - 1, int(n * 0.4 / max(elapsed, 1e-3)))
        elapsed, result = _busy_seconds(b, k, n)
        assert elapsed > 0.15 and result == [n] * 4
        assert b.stats.faults == 0 and b.stats.resets == 0
    finally:
        b.close()


def test_one_watchdog_thread_for_many_launches(backend):
    k, _ = backend.get_kernel(backend.load_module(BUSY), "busy")
    out = backend.alloc(16)
    for _ in range(50):
        backend.launch(k, (1, 1, 1), (4, 1, 1), struct.pack("<i4xQ", 10, out))
    backend.synchronize()
    assert sum(t.name.endswith("-watchdog") for t in threading.enumerate()) == 1


@pytest.mark.parametrize("value,seconds", [
    (None, None), ("off", None), ("none", None), ("0", None), (0, None),
    ("10s", 10.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("2.5", 2.5), (7, 7.0),
])
def test_timeout_option_values(value, seconds):
    assert parse_timeout(value) == seconds


@pytest.mark.parametrize("value", ["fast", "-1", "10 parsecs", "2d", "1e9", "nan", "25h", -3, float("inf")])
def test_bad_timeout_values(value):
    with pytest.raises(BackendError) as info:
        parse_timeout(value)
    assert info.value.status == Status.INVALID_ARGUMENT and "timeout=" in str(info.value)


def test_timeout_through_the_registry():
    b = open_backend("cpu,arena=16M,timeout=250ms")
    try:
        assert b.kernel_timeout == 0.25 and "kernel-timeout" in b.properties().features
    finally:
        b.close()
    b = open_backend("cpu,arena=16M")
    try:
        assert b.kernel_timeout == DEFAULT_KERNEL_TIMEOUT == 30.0
    finally:
        b.close()
    with pytest.raises(BackendUnavailable, match="timeout="):
        open_backend("cpu,arena=16M,timeout=soon")
