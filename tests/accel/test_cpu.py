"""CPU-backend specifics: the reproducibility rule, parallel block ranges, options, recovery."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from vxpu.accel.backend import BackendError, BackendUnavailable, KernelFaultError, Status
from vxpu.accel.cpu import CpuBackend
from vxpu.accel.registry import open_backend, parse_spec
from vxpu.accel.session import Session

from .conformance.kernels import ATOMIC_SUM, OOB_STORE, VADD, image, vadd_args

# c[i] = a[i] + b[i] over a 3-D grid of 3-D blocks, linearised like the backend does.
VADD_3D = """
module @v3
kernel @vadd3(%a: ptr<global>, %c: ptr<global>) {
^entry:
  %bx = block_id.x
  %by = block_id.y
  %bz = block_id.z
  %gx = grid_dim.x
  %gy = grid_dim.y
  %tx = thread_id.x
  %ty = thread_id.y
  %dx = block_dim.x
  %dy = block_dim.y
  %t1 = mul %by, %gx : i32
  %t2 = mul %gx, %gy : i32
  %t3 = mul %bz, %t2 : i32
  %blk0 = add %bx, %t1 : i32
  %blk = add %blk0, %t3 : i32
  %nt = mul %dx, %dy : i32
  %tt = mul %ty, %dx : i32
  %th = add %tx, %tt : i32
  %base = mul %blk, %nt : i32
  %i = add %base, %th : i32
  %pa = offset %a, %i : f32
  %pc = offset %c, %i : f32
  %v = load %pa : f32
  %w = fadd %v, %v : f32
  store %w, %pc
  ret
}
"""


def run_sum(threads: int, x: np.ndarray) -> bytes:
    b = CpuBackend(arena="64M", threads=threads)
    b.open()
    s = Session(b)
    try:
        k, _ = s.get_kernel(s.load_module(image(ATOMIC_SUM)), "atomic_sum")
        dx, dsum, dcount = s.alloc(x.nbytes), s.alloc(4), s.alloc(4)
        s.copy_htod(dx, memoryview(x))
        s.memset(dsum, 0, 4)
        s.memset(dcount, 0, 4)
        s.launch(k, ((x.size + 127) // 128,), (128,), struct.pack("<i4xQQQ", x.size, dx, dsum, dcount))
        out = bytearray(4)
        s.copy_dtoh(memoryview(out), dsum)
        s.synchronize()
        return bytes(out)
    finally:
        s.close()
        b.close()


def test_global_atomics_follow_linear_block_order():
    x = np.random.default_rng(11).standard_normal(5000).astype(np.float32) * 1000
    sequential = np.add.accumulate(x, dtype=np.float32)[-1]       # i = 0, 1, 2, ... in f32
    one, two, four = run_sum(1, x), run_sum(2, x), run_sum(4, x)
    assert one == two == four == np.float32(sequential).tobytes()


def test_many_blocks_run_in_parallel_ranges():
    b = CpuBackend(arena="64M", threads=3)
    b.open()
    s = Session(b)
    try:
        k, _ = s.get_kernel(s.load_module(image(VADD_3D)), "vadd3")
        grid, block = (5, 3, 2), (4, 2, 1)
        n = 5 * 3 * 2 * 4 * 2
        a = np.arange(n, dtype=np.float32)
        da, dc = s.alloc(a.nbytes), s.alloc(a.nbytes)
        s.copy_htod(da, memoryview(a))
        s.launch(k, grid, block, struct.pack("<QQ", da, dc))
        out = np.empty_like(a)
        s.copy_dtoh(memoryview(out), dc)
        s.synchronize()
        assert np.array_equal(out, 2 * a)
    finally:
        s.close()
        b.close()


def test_compile_cache_statistics():
    b = CpuBackend(arena="16M", threads=1)
    b.open()
    try:
        m1 = b.load_module(image(VADD))
        m2 = b.load_module(image(VADD))
        assert b.stats.compile_cache_hits >= 1
        assert b.stats.compile_cache_hits + b.stats.compile_cache_misses == 2
        b.unload_module(m1)
        b.get_kernel(m2, "vadd")
    finally:
        b.close()


def test_contained_fault_is_reported_and_keeps_the_context():
    """A checked kernel's bad access is not performed: KERNEL_FAULT with the fault record, no
    reset; the queue, the allocations and the kernels stay, and the next launch works."""
    b = CpuBackend(arena="64M", threads=2)
    b.open()
    s = Session(b)
    try:
        bad, _ = s.get_kernel(s.load_module(image(OOB_STORE)), "oob_store")
        good, _ = s.get_kernel(s.load_module(image(VADD)), "vadd")
        q = s.create_queue()
        buf = s.alloc(1 << 16)
        s.launch(bad, (1,), (1,), struct.pack("<Q", buf), queue=q)
        with pytest.raises(KernelFaultError) as e:
            s.synchronize()
        assert e.value.status == Status.KERNEL_FAULT and e.value.context_kept
        assert (e.value.record.param, e.value.record.offset) == (0, 4_000_000_000)
        assert b.stats.resets == 0 and s.stats.faults == 1
        s.synchronize(q)                                         # the queue is still there
        a = s.alloc(1024)
        s.memset(a, 0, 1024)
        s.launch(good, (1,), (256,), vadd_args(256, a, a, a))
        s.synchronize()
    finally:
        s.close()
        b.close()


def test_host_registration_through_the_session():
    b = CpuBackend(arena="16M", threads=1)
    b.open()
    s = Session(b)
    try:
        host = bytearray(4096)
        token = s.register_host(memoryview(host))
        d = s.alloc(4096)
        s.memset(d, 5, 4096)
        s.copy_dtoh(memoryview(host), d)
        s.unregister_host(token)
        assert host == b"\x05" * 4096
        with pytest.raises(BackendError) as e:
            s.unregister_host(token)
        assert e.value.status == Status.INVALID_HANDLE
    finally:
        s.close()
        b.close()


@pytest.mark.parametrize("spec,why", [
    ("cpu:1", "only device 0"), ("cpu,arena=12", "between"), ("cpu,threads=0", "threads"),
    ("cpu,arena=lots", "not a size"), ("cpu,bogus=1", "bad options"), ("gpu", "unknown backend"),
    ("cpu:", "bad backend spec"),
])
def test_bad_specs(spec, why):
    with pytest.raises(BackendUnavailable) as e:
        open_backend(spec)
    assert why in str(e.value)


def test_spec_parsing():
    s = parse_spec("CUDA:1,opt_level=2")
    assert (s.name, s.index, s.options) == ("cuda", 1, (("opt_level", "2"),))
    b = open_backend("cpu,arena=32M,threads=2")
    try:
        assert b.properties().memory_total == 32 << 20 and b.threads == 2
    finally:
        b.close()


SLOW_OOB = """
module @slow
kernel @slow_oob(%x: ptr<global>, %n: i32) {
^entry:
  %zero = const 0 : i32
  %fzero = const 0.0 : f32
  br ^loop(%zero, %fzero)
^loop(%k: i32, %acc: f32):
  %one = const 1 : i32
  %fone = const 1.0 : f32
  %k1 = add %k, %one : i32
  %acc1 = fadd %acc, %fone : f32
  %more = icmp slt %k1, %n
  cbr %more, ^loop(%k1, %acc1), ^done
^done:
  store %acc1, %x
  %far = const 1000000000 : i32
  %p = offset %x, %far : f32
  store %acc1, %p
  ret
}
"""


def test_faults_on_two_queues_at_once_do_not_deadlock():
    import threading
    import time

    b = CpuBackend(arena="16M", threads=2)
    b.open()
    s = Session(b)
    outcome: list[object] = []

    def scenario() -> None:
        slow, _ = s.get_kernel(s.load_module(image(SLOW_OOB)), "slow_oob")
        fast, _ = s.get_kernel(s.load_module(image(OOB_STORE)), "oob_store")
        buf = s.alloc(64)
        q1, q2 = s.create_queue(), s.create_queue()
        s.launch(slow, (1,), (1,), struct.pack("<Qi4x", buf, 400_000_000), queue=q1)   # faults late
        s.launch(fast, (1,), (1,), struct.pack("<Q", buf), queue=q2)                   # faults at once
        while b.stats.faults == 0:
            time.sleep(0.001)
        try:
            s.alloc(64)                  # the reset waits for q1, whose kernel faults meanwhile
        except BackendError as exc:
            outcome.append(exc.status)
        try:
            s.synchronize()
        except BackendError as exc:
            outcome.append(exc.status)
        s.memset(s.alloc(64), 0, 64)     # serving again
        outcome.append("served")

    t = threading.Thread(target=scenario, daemon=True)
    t.start()
    t.join(60)
    try:
        assert not t.is_alive(), "deadlock: a second fault during the context reset"
        assert outcome[0] == Status.KERNEL_FAULT and outcome[-1] == "served"
        assert b.stats.faults == 2
    finally:
        if not t.is_alive():
            s.close()
            b.close()


def test_no_thread_or_queue_leaks():
    import threading

    before = threading.active_count()
    for _ in range(5):
        b = CpuBackend(arena="8M", threads=2)
        b.open()
        s = Session(b)
        k, _ = s.get_kernel(s.load_module(image(VADD)), "vadd")
        a = s.alloc(1024)
        for _ in range(20):
            q = s.create_queue()
            s.launch(k, (1,), (256,), vadd_args(256, a, a, a), queue=q)    # starts the queue's thread
            s.destroy_queue(q)
        s.close()
        b.close()
    assert threading.active_count() <= before


_POKE = """
module @poke
kernel @poke(%p: ptr<global>, %delta: i64, %v: i32) {
^entry:
  %q = byte_offset %p, %delta
  %old = load %q : i32
  store %v, %q
  ret
}
"""


def test_one_client_cannot_reach_another_clients_buffer():
    """Two sessions on one CPU backend share the arena. B's kernel gets bounds from B's own
    allocations only: neither an offset from B's buffer into A's, nor A's address passed
    directly, reaches A's data (both fault, A unchanged), and B's own buffer still works."""
    b = CpuBackend(arena="64M", threads=1)
    b.open()
    sa, sb = Session(b), Session(b)
    try:
        a_buf = sa.alloc(256)
        sa.memset(a_buf, 0x5A, 256)
        b_buf = sb.alloc(256)
        k, _ = sb.get_kernel(sb.load_module(image(_POKE)), "poke")
        for ptr, delta, param_offset in ((b_buf, a_buf - b_buf, a_buf - b_buf), (a_buf, 0, a_buf)):
            with pytest.raises(KernelFaultError) as e:
                sb.launch(k, (1,), (1,), struct.pack("<QqI4x", ptr, delta, 7))
                sb.synchronize()
            # B's own buffer: offset from its base; A's address: B owns nothing there -> (0, 0)
            assert (e.value.record.param, e.value.record.offset) == (0, param_offset & ((1 << 64) - 1))
        back = bytearray(256)
        sa.copy_dtoh(memoryview(back), a_buf)
        sa.synchronize()
        assert back == b"\x5a" * 256
        sb.launch(k, (1,), (1,), struct.pack("<QqI4x", b_buf, 252, 7))
        sb.synchronize()
        mine = np.zeros(64, np.int32)
        sb.copy_dtoh(memoryview(mine), b_buf)
        sb.synchronize()
        assert mine[63] == 7
    finally:
        sa.close()
        sb.close()
        b.close()
