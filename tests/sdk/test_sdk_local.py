"""The SDK end to end on the CPU backend through the host transport (Device.local): the
sample kernels against numpy, arrays, events, and deliberate misuse through the lower layer,
after each of which the same device still computes correctly."""

from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np
import pytest
from vxpu.guest import Device, DeviceError
from vxpu.guest.array import StaleHandle
from vxpu.guest.errors import GuestError
from vxpu.guest.transport import LOCAL_RAM_BASE
from vxpu.ir import encode, samples

from vxpu.abi import xpu

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dev():
    """One device for the module; VXPU_SDK_BACKEND=cuda runs the same tests on a GPU."""
    with Device.local(os.environ.get("VXPU_SDK_BACKEND", "cpu"), ram_size=64 << 20, sq_entries=64) as d:
        yield d


def run_sample(dev: Device, name: str, size: tuple[int, ...], seed: int = 0) -> list[str]:
    """Run one sample case on ``dev``; the mismatches against numpy (empty: correct)."""
    case = samples.SAMPLES[name].case(size, seed=seed)
    mod = dev.load_module(samples.SAMPLES[name].module())
    arrays = {k: dev.to_device(v) for k, v in case.buffers.items()}
    for launch in case.launches:
        args = [arrays[a.name] if isinstance(a, samples.Buf) else a for a in launch.args]
        mod[launch.kernel][launch.grid, launch.block](*args)
    dev.synchronize()
    out = {k: arrays[k].to_host() for k in case.outputs}
    for a in arrays.values():
        a.free()
    mod.unload()
    return samples.compare(case, out)


def check_still_computes(dev: Device) -> None:
    assert run_sample(dev, "saxpy", (1000,), seed=7) == []


@pytest.mark.parametrize("name,size", [("saxpy", (10_000,)), ("dot", (3000,)), ("sgemm", (37, 21, 19)),
                                       ("sgemm", (64, 48, 80)), ("softmax", (5, 300))])
def test_sample_kernels_match_numpy(dev, name, size):
    assert run_sample(dev, name, size, seed=1) == []


def test_saxpy_as_a_user_writes_it(dev):
    n = 5000
    x = np.random.default_rng(0).random(n, dtype=np.float32)
    y = np.random.default_rng(1).random(n, dtype=np.float32)
    with dev.load_module(samples.SAMPLES["saxpy"].module()) as mod, dev.to_device(x) as dx, \
            dev.to_device(y) as dy:
        mod.saxpy[(n + 255) // 256, 256](n, 2.5, dx, dy)
        assert np.array_equal(dy.to_host(), np.float32(2.5) * x + y)


@pytest.mark.parametrize("shape,dtype", [((0,), np.float32), ((1,), np.int8), ((3, 5), np.float64),
                                         (((1 << 20) + 3,), np.uint8), ((700, 1500), np.float32)])
def test_round_trip(dev, shape, dtype):
    data = (np.random.default_rng(3).random(shape) * 100).astype(dtype)
    with dev.to_device(data) as arr:
        back = arr.to_host()
        assert back.shape == data.shape and back.dtype == data.dtype and np.array_equal(back, data)


def test_bytes_pinned_and_memset(dev):
    with dev.to_device(b"hello device") as arr:
        assert bytes(arr.to_host(bytearray(12))) == b"hello device"
        arr.fill_bytes(0x41)
        assert bytes(arr.to_host(bytearray(12))) == b"A" * 12
    with dev.pinned((256, 256), np.float32) as host, dev.empty((256, 256), np.float32) as arr:
        host.array[:] = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
        arr.copy_from(host)
        assert np.array_equal(arr.to_host(), host.array)


EMPTY_AND_WIDE = """module @shapes
kernel @empty() {
^entry:
  ret
}
kernel @wide(%out: ptr<global>, """ + ", ".join(f"%v{i}: i64" for i in range(40)) + """) {
^entry:
  %t = thread_id.x
  %c0 = const 0 : i32
  %z = icmp eq %t, %c0
  cbr %z, ^w, ^exit
^w:
  store %v39, %out
  br ^exit
^exit:
  ret
}
"""


def test_kernels_without_arguments_and_with_a_large_argument_blob(dev):
    """No arguments: a LAUNCH without an SG list. 328 argument bytes: more than the ring's side
    area, so the blob travels in DMA memory of its own, freed when the launch completes."""
    mod = dev.load_module(EMPTY_AND_WIDE)
    assert mod.wide.signature.args_size > 256
    with dev.zeros(1, np.int64) as out:
        for _ in range(3):
            mod.empty[4, 32]()
            mod.empty[[4, 1], [32]]()                      # lists work too (not cached)
            mod.wide[1, 32](out, *range(40))
        dev.synchronize()
        assert out.to_host()[0] == 39
    mod.unload()


def test_events_time_work(dev):
    mod = dev.load_module(samples.SAMPLES["saxpy"].module())
    n = 1 << 16
    x, y = dev.to_device(np.ones(n, np.float32)), dev.to_device(np.ones(n, np.float32))
    start, end = dev.event(), dev.event()
    start.record()
    for _ in range(5):
        mod.saxpy[n // 256, 256](n, 1.0, x, y)
    end.record()
    ms = dev.elapsed_ms(start, end)
    assert end.query() and 0 < ms < 10_000
    assert np.all(y.to_host() == 6.0)
    start.destroy(), end.destroy(), x.free(), y.free(), mod.unload()


def test_double_free_is_invalid_handle(dev):
    addr = dev.raw.call(xpu.Opcode.MEM_ALLOC, 4096)[0]
    dev.raw.call(xpu.Opcode.MEM_FREE, addr)
    with pytest.raises(DeviceError) as info:
        dev.raw.call(xpu.Opcode.MEM_FREE, addr)
    assert info.value.name == "INVALID_HANDLE" and "double free" in info.value.meaning
    check_still_computes(dev)


def test_stale_module_handle_is_invalid_handle(dev):
    mod = dev.load_module(samples.SAMPLES["saxpy"].module())
    kernel = mod.saxpy
    handle, khandle = mod.handle, kernel.handle
    mod.unload()
    with pytest.raises(StaleHandle):                       # the SDK knows the module is gone
        kernel[1, 32](1, 1.0, 0, 0)
    dev.synchronize()
    with pytest.raises(DeviceError) as info:               # the device knows it too
        dev.raw.call(xpu.Opcode.KERNEL_GET, handle, sg=_name_sg(dev, b"saxpy"))
    assert info.value.name == "INVALID_HANDLE"
    args = dev.raw.dma(64)
    try:
        with pytest.raises(DeviceError) as info:
            dev.raw.call(xpu.Opcode.LAUNCH, khandle, *xpu.pack_launch_dims((1, 1, 1), (32, 1, 1), 0),
                         sg=(args.address(0), 24))
        assert info.value.name == "INVALID_HANDLE"
    finally:
        dev.raw.free_dma(args)
    check_still_computes(dev)


def test_garbage_is_released_at_the_next_command(dev):
    """Finalizers only queue: the module, array and event are released by the device's next
    command (here synchronize), and their handles are then unknown to the device."""
    mod = dev.load_module(samples.SAMPLES["saxpy"].module())
    arr, ev = dev.empty(16), dev.event()
    handle, addr, evh = mod.handle, arr.ptr, ev.handle
    del mod, arr, ev
    gc.collect()
    assert len(dev.allocs.garbage) == 3
    dev.synchronize()
    assert not dev.allocs.garbage
    for op, h in ((xpu.Opcode.MEM_FREE, addr), (xpu.Opcode.EVENT_DESTROY, evh)):
        with pytest.raises(DeviceError, match="INVALID_HANDLE"):
            dev.raw.call(op, h)
    with pytest.raises(DeviceError, match="INVALID_HANDLE"):
        dev.raw.call(xpu.Opcode.KERNEL_GET, handle, sg=_name_sg(dev, b"saxpy"))


def _name_sg(dev: Device, name: bytes) -> tuple[int, int]:
    mem = dev.staging.slots[1]
    mem.view[:len(name)] = name
    return mem.address(0), len(name)


@pytest.mark.parametrize("sg", [(0x1000, 64), (LOCAL_RAM_BASE - 32, 64), (1 << 62, 16)])
def test_sg_outside_guest_ram_is_out_of_range(dev, sg):
    with dev.empty(64, np.uint8) as arr:
        for op in (xpu.Opcode.MEM_COPY_HTOD, xpu.Opcode.MEM_COPY_DTOH):
            with pytest.raises(DeviceError) as info:
                dev.raw.call(op, arr.ptr, sg=sg)
            assert info.value.name == "OUT_OF_RANGE"
    check_still_computes(dev)


def test_filling_the_ring_without_waiting(dev):
    """Four ring-fulls of commands without a wait: the driver waits for room itself, every
    completion arrives in order with the right result, and the data is intact."""
    n = dev.ring.sq_entries * 4
    src = np.arange(n, dtype=np.uint32)
    with dev.empty(n, np.uint32) as arr, dev.pinned(n, np.uint32) as host:
        host.array[:] = src
        seqs = [dev.raw.submit(xpu.Opcode.MEM_COPY_HTOD, arr.ptr + 4 * i, sg=(host.mem.address(4 * i), 4))
                for i in range(n)]
        assert all(dev.raw.wait(s) == (0, 0, 0) for s in seqs)
        assert np.array_equal(arr.to_host(), src)
    check_still_computes(dev)


def test_bad_sq_tail_is_fatal_until_reset(dev):
    dev.synchronize()
    dev.raw.set_sq_tail(dev.ring.submitted + dev.ring.sq_entries + 5)
    deadline = time.monotonic() + 10          # let the device see it before the driver posts again
    while not dev.raw.read_reg(xpu.REG_STATUS) & xpu.DeviceStatus.FATAL:
        assert time.monotonic() < deadline, "the device never went fatal"
        time.sleep(0.001)
    assert dev.raw.read_reg(xpu.REG_FATAL_CODE) == xpu.FatalCode.BAD_SQ_TAIL
    with pytest.raises(DeviceError) as info:
        dev.synchronize()
    assert info.value.fatal == xpu.FatalCode.BAD_SQ_TAIL and info.value.name == "BAD_SQ_TAIL"
    dev.reset()
    check_still_computes(dev)


OOB = """module @oob
kernel @oob(%out: ptr<global>, %i: i32) {
^entry:
  %p = offset %out, %i : f32
  %v = const 1.0 : f32
  store %v, %p
  ret
}
"""


def test_kernel_fault_is_reported_and_the_device_recovers(dev):
    """A checked kernel's out-of-bounds store: KERNEL_FAULT at synchronize. When the guest's
    device state survived (contained fault) the arrays stay valid and untouched; when it was
    reset they are stale. Either way the device computes correctly afterwards."""
    mod = dev.load_module(OOB)
    arr = dev.to_device(np.arange(16, dtype=np.float32))
    epoch = dev.epoch
    mod.oob[1, 1](arr, 1 << 20)                            # far past the 64-byte buffer
    with pytest.raises(DeviceError) as info:
        dev.synchronize()
    assert info.value.name == "KERNEL_FAULT"
    if dev.epoch == epoch:                                 # the SDK found its state intact
        assert np.array_equal(arr.to_host(), np.arange(16, dtype=np.float32))
        arr.free()
    else:
        with pytest.raises(StaleHandle):
            arr.to_host()
    check_still_computes(dev)


def test_reset_makes_old_arrays_stale(dev):
    arr = dev.to_device(np.zeros(10, np.float32))
    dev.reset()
    with pytest.raises(StaleHandle):
        arr.to_host()
    arr.free()                                             # a no-op, not a free of someone else's memory
    check_still_computes(dev)


def _children(parent: int | None = None) -> set[int]:
    me, out = os.getpid() if parent is None else parent, set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        out.add(int(pid))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_local_cleanup_leaves_no_process_or_fd():
    before_fds, before_children = len(os.listdir("/proc/self/fd")), _children()
    d = Device.local("cpu", ram_size=16 << 20, sq_entries=16)
    pid = d.transport.server_pid
    assert pid in _children()
    with d.to_device(np.ones(4, np.float32)) as arr:
        assert arr.to_host().sum() == 4
    assert d.load_module(samples.SAMPLES["saxpy"].module()).saxpy.handle  # compile workers start
    grandchildren = _children(pid)
    workdir = d.transport.workdir
    d.close()
    d.close()                                              # idempotent
    assert _children() == before_children
    assert not any(os.path.exists(f"/proc/{p}") for p in grandchildren)
    assert len(os.listdir("/proc/self/fd")) == before_fds
    assert not workdir.exists()
    with pytest.raises(Exception, match="after close"):
        d.empty(4)


def test_dead_server_is_an_error_with_its_log_and_close_still_cleans_up():
    before_fds, before_children = len(os.listdir("/proc/self/fd")), _children()
    d = Device.local("cpu", ram_size=16 << 20, sq_entries=16)
    arr = d.to_device(np.ones(4, np.float32))
    os.kill(d.transport.server_pid, signal.SIGKILL)
    with pytest.raises(GuestError, match="vxpu serve"):
        arr.to_host()
    d.close()
    assert _children() == before_children
    assert len(os.listdir("/proc/self/fd")) == before_fds


def test_server_start_failure_carries_the_log():
    with pytest.raises(Exception, match="vxpu serve") as info:
        Device.local("no-such-backend", ram_size=1 << 20)
    assert "log" in str(info.value)


def test_module_image_is_the_encoded_ir(dev):
    """load_module sends vxpu.ir.encode(module); the raw layer can do the same by hand."""
    image = encode(samples.SAMPLES["saxpy"].module())
    mem = dev.raw.dma(len(image))
    try:
        mem.view[:len(image)] = image
        handle = dev.raw.call(xpu.Opcode.MODULE_LOAD, int(xpu.ModuleKind.IR), sg=(mem.address(0), len(image)))[0]
        dev.raw.call(xpu.Opcode.MODULE_UNLOAD, handle)
    finally:
        dev.raw.free_dma(mem)


SPIN = """module @spin
kernel @spin(%n: i32, %out: ptr<global>) {
^entry:
  %zero = const 0 : i32
  br ^loop(%zero, %zero)
^loop(%k: i32, %x: i32):
  %one = const 1 : i32
  %a = const 1103515245 : i32
  %c = const 12345 : i32
  %m = mul %x, %a : i32
  %x1 = add %m, %c : i32
  %k1 = add %k, %one : i32
  %more = icmp slt %k1, %n
  cbr %more, ^loop(%k1, %x1), ^done
^done:
  store %x1, %out
  ret
}
"""


def test_a_cancelled_kernel_makes_old_arrays_stale():
    """The server's watchdog cancels an overrunning kernel and resets the context (TIMEOUT with
    the completion's state-dropped bit): the SDK's older arrays are stale, not silently reused."""
    with Device.local("cpu,timeout=200ms", ram_size=64 << 20, sq_entries=64) as d:
        arr = d.to_device(np.zeros(4, np.int32))
        mod = d.load_module(SPIN)
        mod.spin[1, 1](2**31 - 1, arr)                     # seconds of work, far past 200 ms
        with pytest.raises(DeviceError) as info:
            d.synchronize()
        assert info.value.name == "TIMEOUT"
        with pytest.raises(StaleHandle):
            arr.to_host()
        check_still_computes(d)
