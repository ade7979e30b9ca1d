"""Reset, reboot and disconnect with work in flight (docs/device-abi.md §4.8), and the serve
loop's independence from long commands.

A kernel that spins for a few hundred milliseconds keeps the device busy; FENCE then blocks
the poller while the test resets, disconnects, unmaps memory or reads registers.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time

import pytest
from vxpu.accel.quota import Quota
from vxpu.ir import binary, text
from vxpu.ir.args import kernel_signature, pack_args
from vxpu.vfio_server.client import GuestMemory, VfioUserClient

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import Control, DeviceStatus, Opcode

from .ringdriver import CONFIG, DATA_OFF, RAM_BASE, XpuRig, desc
from .test_modules import OOB, _image, _kernel, _launch, _load

SPIN = """
module @spin
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
SPIN_N = 600_000_000           # a dependent multiply-add chain (no closed form): ~0.6 s on the CI CPU
MOD_OFF = DATA_OFF + 0x100000
ARGS_OFF = DATA_OFF + 0x180000


def _spin_launch(rig: XpuRig, n: int = SPIN_N, tag: int = 1) -> tuple[bytes, int]:
    """Load the spin kernel; returns (its LAUNCH descriptor, the output allocation)."""
    image = binary.encode(text.parse(SPIN), names=False)
    rig.write(MOD_OFF, image)
    c = rig.cmd(Opcode.MODULE_LOAD, [abi.ModuleKind.IR], sg=(rig.addr(MOD_OFF), len(image)))
    assert c.status == 0, c
    rig.write(MOD_OFF, b"spin")
    k = rig.cmd(Opcode.KERNEL_GET, [c.result], sg=(rig.addr(MOD_OFF), 4))
    out = rig.alloc(16)
    rig.write(ARGS_OFF, pack_args(kernel_signature(text.parse(SPIN).kernels[0]), [n, out]))
    dims = abi.pack_launch_dims((1, 1, 1), (1, 1, 1), 0)
    return desc(Opcode.LAUNCH, [k.result, *dims], sg=(rig.addr(ARGS_OFF), k.result2), tag=tag), out


def _wait_reset_count(rig: XpuRig, before: int) -> None:
    deadline = time.monotonic() + 10
    while rig.reg(abi.REG_RESET_COUNT) == before:
        assert time.monotonic() < deadline, "reset never completed"
        time.sleep(0.002)


def _wait_busy(rig: XpuRig, completions: int) -> None:
    """Wait until ``completions`` completions were posted (the next command is running)."""
    deadline = time.monotonic() + 5
    while rig.hdr(abi.QH_CQ_TAIL) < completions:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    time.sleep(0.02)


def test_control_reset_aborts_in_flight_and_unread_descriptors(rig):
    launch, out = _spin_launch(rig)
    base = rig.hdr(abi.QH_CQ_TAIL)
    rig.submit([launch, desc(Opcode.FENCE, tag=2)] + [desc(Opcode.NOP, tag=10 + i) for i in range(5)])
    _wait_busy(rig, base + 1)                                  # LAUNCH completed, FENCE is waiting
    rig.submit([desc(Opcode.NOP, tag=100 + i) for i in range(3)])     # submitted, not yet read
    before = rig.reg(abi.REG_RESET_COUNT)
    rig.set_reg(abi.REG_CONTROL, Control.RESET)
    _wait_reset_count(rig, before)
    got = rig.completions(10)
    assert (got[0].tag, got[0].status) == (1, Status.OK)
    assert [c.tag for c in got[1:]] == [2, 10, 11, 12, 13, 14, 100, 101, 102]
    assert all(c.status == Status.ABORTED for c in got[1:])
    status = rig.reg(abi.REG_STATUS)
    assert not status & (DeviceStatus.ENABLED | DeviceStatus.FATAL)
    assert rig.reg(abi.REG_QUEUE_ENABLE) == 0
    assert rig.enable() & DeviceStatus.ENABLED
    assert rig.cmd(Opcode.MEM_SET, [out, 0, 4]).status == Status.OUT_OF_RANGE      # allocations dropped
    rig.alive()


def test_control_reset_with_the_queue_idle(rig):
    a = rig.alloc(64)
    before = rig.reg(abi.REG_RESET_COUNT)
    rig.set_reg(abi.REG_CONTROL, Control.RESET)
    _wait_reset_count(rig, before)
    assert rig.reg(abi.REG_RESET_COUNT) == before + 1
    assert rig.hdr(abi.QH_CQ_TAIL) == rig.cq_head             # nothing to abort, nothing posted
    assert rig.enable() & DeviceStatus.ENABLED
    assert rig.cmd(Opcode.MEM_FREE, [a]).status == Status.INVALID_HANDLE
    rig.alive()


def test_reset_command_keeps_the_queue_running(rig):
    launch, out = _spin_launch(rig, n=SPIN_N // 4)
    before = rig.reg(abi.REG_RESET_COUNT)
    got = rig.run([launch, desc(Opcode.RESET, tag=2), desc(Opcode.MEM_SET, [out, 0, 4], tag=3),
                   desc(Opcode.NOP, tag=4)])
    assert rig.reg(abi.REG_RESET_COUNT) == before + 1
    assert [(c.tag, c.status) for c in got] == [(1, 0), (2, 0), (3, Status.OUT_OF_RANGE), (4, 0)]
    assert rig.reg(abi.REG_STATUS) & DeviceStatus.ENABLED
    assert rig.cmd(Opcode.FENCE).status == Status.OK


def test_device_reset_abandons_in_flight_work_without_waiting(rig):
    launch, out = _spin_launch(rig)
    base = rig.hdr(abi.QH_CQ_TAIL)
    rig.submit([launch, desc(Opcode.FENCE, tag=2), desc(Opcode.NOP, tag=3)])
    _wait_busy(rig, base + 1)
    before = rig.reg(abi.REG_RESET_COUNT)
    t0 = time.monotonic()
    rig.client.reset()                                        # QEMU's DEVICE_RESET (guest reboot)
    assert time.monotonic() - t0 < 0.2                        # answered without waiting for the kernel
    time.sleep(0.6)                                           # the kernel ends; nothing is posted
    assert rig.hdr(abi.QH_CQ_TAIL) == base + 1
    rig.client.region_write(CONFIG, 4, struct.pack("<H", 0x0006))    # the reset cleared the command register
    _wait_reset_count(rig, before)
    assert rig.reg(abi.REG_STATUS) == DeviceStatus.BUS_MASTER
    assert rig.reg(abi.REG_QUEUE_BASE_LO) == 0 and rig.reg(abi.REG_SQ_ENTRIES) == 0
    assert rig.enable() & DeviceStatus.ENABLED                # DMA maps survived the reset
    assert rig.cmd(Opcode.MEM_SET, [out, 0, 4]).status == Status.OUT_OF_RANGE
    rig.alive()


def test_disconnect_with_work_in_flight_then_a_new_client(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend) as r:
        launch, out = _spin_launch(r)
        r.submit([launch, desc(Opcode.FENCE), desc(Opcode.NOP)])
        time.sleep(0.05)
        r.client.close()                                       # QEMU went away mid-command
        r.client = VfioUserClient(r.server.path, timeout=10.0)
        r.client.handshake()
        r.client.region_write(CONFIG, 4, struct.pack("<H", 0x0006))
        r.client.map_guest_ram(r.mem, RAM_BASE)
        assert r.enable() & DeviceStatus.ENABLED
        assert r.cmd(Opcode.MEM_SET, [out, 0, 4]).status == Status.OUT_OF_RANGE   # the old guest's state is gone
        r.alive()


def test_register_reads_are_answered_while_a_command_blocks(rig):
    launch, _out = _spin_launch(rig)
    base = rig.hdr(abi.QH_CQ_TAIL)
    rig.submit([launch, desc(Opcode.FENCE, tag=2)])
    _wait_busy(rig, base + 1)
    worst = 0.0
    for _ in range(20):
        t0 = time.perf_counter()
        assert rig.reg(abi.REG_MAGIC) == abi.MAGIC_VALUE
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.1, f"a register read took {worst * 1e3:.1f} ms while FENCE waited"
    assert rig.completions(2)[1].status == Status.OK


def test_unmapping_data_memory_during_copies_never_touches_freed_memory(rig):
    """One thread streams copies from a second DMA map while the main thread unmaps and remaps
    it: each copy either completes OK or fails OUT_OF_RANGE, the server never faults."""
    extra = GuestMemory(4 << 20)
    base = 0x4000_0000
    extra.write(0, os.urandom(4 << 20))
    rig.client.map_guest_ram(extra, base)
    dev = rig.alloc(4 << 20)
    statuses: list[int] = []
    stop = threading.Event()
    lock = threading.Lock()                  # the client socket is not thread-safe: one request at a time

    def copier() -> None:
        while not stop.is_set():
            with lock:
                rig.submit([desc(Opcode.MEM_COPY_HTOD, [dev], sg=(base, 4 << 20)),
                            desc(Opcode.MEM_COPY_DTOH, [dev], sg=(base, 4 << 20))], doorbell=True)
            statuses.extend(c.status for c in rig.completions(2))

    t = threading.Thread(target=copier)
    t.start()
    try:
        for _ in range(15):
            time.sleep(0.01)
            with lock:
                rig.client.dma_unmap(base, extra.size)
            time.sleep(0.005)
            with lock:
                rig.client.map_guest_ram(extra, base)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert set(statuses) <= {Status.OK, Status.OUT_OF_RANGE} and Status.OK in statuses
    rig.client.dma_unmap(base, extra.size)
    extra.close()
    rig.alive()


@pytest.mark.parametrize("bad", [0, 0xFFFF_FFFE])
def test_control_write_without_reset_bit_does_nothing(rig, bad):
    before = rig.reg(abi.REG_RESET_COUNT)
    rig.set_reg(abi.REG_CONTROL, bad)
    time.sleep(0.02)
    assert rig.reg(abi.REG_RESET_COUNT) == before
    rig.alive()


def test_a_full_backend_queue_never_holds_up_dma_map_changes(tmp_path, backend):
    """With the backend queue full of long kernels, an HTOD must wait for room; it waits
    without the guest-RAM lock, so the loop's DMA_MAP (which takes that lock) is answered at
    once instead of after the kernels."""
    with XpuRig(tmp_path / "s", backend, quota=Quota(queue_depth=4)) as r:
        launch, _out = _spin_launch(r, n=SPIN_N // 3)
        dev = r.alloc(4096)
        r.submit([launch] * 4 + [desc(Opcode.MEM_COPY_HTOD, [dev], sg=(r.addr(DATA_OFF), 4096)),
                                 desc(Opcode.FENCE)])
        time.sleep(0.05)
        extra = GuestMemory(1 << 20)
        t0 = time.monotonic()
        r.client.map_guest_ram(extra, 0x4000_0000)
        took = time.monotonic() - t0
        got = r.completions(6)
        assert [c.status for c in got] == [0] * 6
        assert took < 0.15, f"DMA_MAP took {took * 1e3:.0f} ms behind the queued kernels"
        r.client.dma_unmap(0x4000_0000, extra.size)
        extra.close()


def test_reconnect_cycles_leak_no_fds_threads_or_sessions(tmp_path, backend):
    """QEMU hot re-plug, 40 times: connect, reset, map RAM, run work, leave without cleaning up.
    Every cycle ends with the guest's state dropped; fds and threads stay flat."""
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with XpuRig(tmp_path / "s", backend) as r:
        r.alloc(4096)
        baseline: tuple[int, int] | None = None
        for cycle in range(40):
            r.client.close()
            r.client = VfioUserClient(r.server.path, timeout=10.0)
            r.client.handshake()
            r.client.reset()                                  # QEMU resets the device at realize
            r.client.region_write(CONFIG, 4, struct.pack("<H", 0x0006))
            r.client.map_guest_ram(r.mem, RAM_BASE)
            assert r.enable() & DeviceStatus.ENABLED
            dev = r.alloc(1 << 16)
            assert r.htod(dev, b"x" * 4096).status == 0
            if cycle == 4:
                baseline = (fds(), threading.active_count())
        assert baseline is not None and (fds(), threading.active_count()) == baseline
        assert json.loads(r.device.stats_document())["session"]["vxpu_session_live_allocations"] == 1


def test_control_reset_interrupts_for_its_aborted_completions(rig):
    from .test_commands import _count, _msi

    fd = _msi(rig)
    try:
        rig.set_reg(abi.REG_IRQ_CONTROL, 1)                       # IrqControl.COMPLETION
        rig.flush()
        launch, _out = _spin_launch(rig)
        base = rig.hdr(abi.QH_CQ_TAIL)
        rig.submit([launch, desc(Opcode.FENCE)])
        _wait_busy(rig, base + 1)                                 # LAUNCH completed, FENCE waits
        _count(fd)
        rig.submit([desc(Opcode.NOP) for _ in range(3)])          # never read before the reset
        before = rig.reg(abi.REG_RESET_COUNT)
        rig.set_reg(abi.REG_CONTROL, Control.RESET)
        _wait_reset_count(rig, before)
        assert [c.status for c in rig.completions(5)[1:]] == [Status.ABORTED] * 4
        assert _count(fd) == 2           # one for the aborted FENCE, one for the three unread NOPs
    finally:
        os.close(fd)


def test_event_elapsed_waits_for_a_running_kernel(rig):
    launch, _out = _spin_launch(rig, n=SPIN_N // 3)
    e1, e2 = rig.cmd(Opcode.EVENT_CREATE).result, rig.cmd(Opcode.EVENT_CREATE).result
    got = rig.run([desc(Opcode.EVENT_RECORD, [e1]), launch, desc(Opcode.EVENT_RECORD, [e2]),
                   desc(Opcode.EVENT_ELAPSED, [e1, e2]), desc(Opcode.EVENT_QUERY, [e2])])
    assert [c.status for c in got] == [0] * 5
    assert got[3].result > 20_000_000                     # the kernel's time (~0.2 s), in ns
    assert got[4].result == 1


def test_fault_completions_say_whether_the_guest_state_was_dropped(rig, backend):
    """result2 bit 0 (CPL_STATE_DROPPED) of a KERNEL_FAULT/TIMEOUT completion: clear when the
    guest's allocations survived (a contained checked-IR fault), set when a context reset dropped
    them (an overrunning kernel cancelled by the CPU backend's watchdog)."""
    if getattr(backend, "name", "") != "cpu":
        pytest.skip("the watchdog's context reset is the CPU backend's")

    keep = rig.alloc(16)
    assert rig.htod(keep, b"\x5a" * 16).status == 0
    status, module = _load(rig, _image(OOB))
    assert status == Status.OK
    _s, oob, _size = _kernel(rig, module, b"oob_store")
    assert _launch(rig, oob, (1, 1, 1), (1, 1, 1), struct.pack("<Q", keep)) == Status.OK
    fence = rig.cmd(Opcode.FENCE)
    assert fence.status == Status.KERNEL_FAULT and not fence.result2 & abi.CPL_STATE_DROPPED
    assert rig.dtoh(keep, 16) == b"\x5a" * 16                  # the state really survived

    old_timeout = backend.kernel_timeout
    backend.kernel_timeout = 0.2
    try:
        launch, _out = _spin_launch(rig, n=2**31 - 1)   # ~2 s, far past 0.2 s
        got = rig.run([launch, desc(Opcode.FENCE, tag=2)], timeout=30)
    finally:
        backend.kernel_timeout = old_timeout
    assert got[1].status == Status.TIMEOUT and got[1].result2 & abi.CPL_STATE_DROPPED
    assert rig.cmd(Opcode.MEM_FREE, [keep]).status == Status.INVALID_HANDLE   # really dropped
    rig.alive()


def test_a_flood_of_control_writes_is_bounded_while_the_device_is_busy(rig, monkeypatch):
    """Control requests queue on the loop and run on the poller; a guest writing CONTROL.RESET
    (posted) faster than resets complete (one waits for the guest's kernels) must not grow that
    queue without bound (host memory), and the device works afterwards."""
    poller = rig.device.poller
    slow = poller.reset_session

    def reset_session() -> None:
        time.sleep(0.01)                # a reset that waits for a running kernel
        slow()

    monkeypatch.setattr(poller, "reset_session", reset_session)
    most = 0
    for _ in range(3000):
        rig.set_reg(abi.REG_CONTROL, Control.RESET)
        rig.set_reg(abi.REG_QUEUE_ENABLE, 0)
        most = max(most, len(poller.controls))
    assert most <= 256, f"{most} control requests pending"
    monkeypatch.setattr(poller, "reset_session", slow)
    deadline = time.monotonic() + 10
    while poller.controls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not poller.controls
    assert rig.enable() & DeviceStatus.ENABLED
    assert rig.cmd(Opcode.NOP).status == 0


def test_failed_synchronizations_never_make_an_htod_wait_for_kernels_under_the_lock(tmp_path, backend):
    """A FENCE whose synchronization reports a (contained) kernel fault leaves the session's
    queue-depth count where it was; the HTOD's room check must still see it, or the copy is
    issued with the guest-RAM lock held into a full queue, and the session then waits for the
    queued kernels under that lock (the loop's DMA_MAP with them)."""
    from .test_modules import OOB, _image, _kernel, _launch, _load

    with XpuRig(tmp_path / "s", backend, quota=Quota(queue_depth=4)) as r:
        keep = r.alloc(16)
        status, module = _load(r, _image(OOB))
        assert status == Status.OK
        _s, oob, _size = _kernel(r, module, b"oob_store")
        for _ in range(3):
            assert _launch(r, oob, (1, 1, 1), (1, 1, 1), struct.pack("<Q", keep)) == Status.OK
            assert r.cmd(Opcode.FENCE).status == Status.KERNEL_FAULT
        launch, _out = _spin_launch(r, n=SPIN_N // 2)
        dev = r.alloc(4096)
        r.submit([launch, desc(Opcode.MEM_COPY_HTOD, [dev], sg=(r.addr(DATA_OFF), 4096)), desc(Opcode.FENCE)])
        time.sleep(0.05)
        extra = GuestMemory(1 << 20)
        t0 = time.monotonic()
        r.client.map_guest_ram(extra, 0x4000_0000)
        took = time.monotonic() - t0
        got = r.completions(3)
        assert [c.status for c in got] == [0] * 3
        assert took < 0.1, f"DMA_MAP took {took * 1e3:.0f} ms behind the queued kernel"
        r.client.dma_unmap(0x4000_0000, extra.size)
        extra.close()


def test_reset_command_after_a_fault_never_waits_for_kernels_under_the_lock(tmp_path, backend):
    """The RESET command waits for the old session's work without the guest-RAM lock, then
    closes it with the lock held. A wait that reports a fault recorded before it (a synchronize
    raises such a fault at once, before waiting) must not leave the kernels queued behind it to
    the close, which would wait for them with the lock held (the loop's DMA_MAP with it)."""
    from .test_modules import OOB, _image, _kernel, _load

    with XpuRig(tmp_path / "s", backend) as r:
        keep = r.alloc(16)
        status, module = _load(r, _image(OOB))
        assert status == Status.OK
        _s, oob, _size = _kernel(r, module, b"oob_store")
        spin, _out = _spin_launch(r, n=SPIN_N // 3)
        r.write(DATA_OFF, struct.pack("<Q", keep))
        dims = abi.pack_launch_dims((1, 1, 1), (1, 1, 1), 0)
        bad = desc(Opcode.LAUNCH, [oob, *dims], sg=(r.addr(DATA_OFF), 8))
        assert [c.status for c in r.run([spin, bad, spin, spin, spin])] == [0] * 5
        time.sleep(0.3)                 # the first spin and the faulting kernel ran; the others spin
        r.submit([desc(Opcode.RESET, tag=9)])
        time.sleep(0.05)
        extra = GuestMemory(1 << 20)
        t0 = time.monotonic()
        r.client.map_guest_ram(extra, 0x4000_0000)
        took = time.monotonic() - t0
        assert r.completions(1)[0].status == 0
        assert took < 0.1, f"DMA_MAP took {took * 1e3:.0f} ms behind the queued kernel"
        r.client.dma_unmap(0x4000_0000, extra.size)
        extra.close()
        r.alive()


def test_no_dma_after_bus_mastering_is_turned_off_mid_batch(rig):
    """Clearing bus mastering stops the queue (NO_BUS_MASTER) and the device's DMA at once: a
    DTOH behind a FENCE that was waiting for a kernel must not write guest RAM afterwards."""
    launch, _out = _spin_launch(rig, n=SPIN_N // 2)
    dev = rig.alloc(64)
    assert rig.htod(dev, b"\x5a" * 64).status == 0
    dst = DATA_OFF + 0x40000
    rig.write(dst, b"\xaa" * 64)
    base = rig.hdr(abi.QH_CQ_TAIL)
    rig.submit([launch, desc(Opcode.FENCE, tag=2),
                desc(Opcode.MEM_COPY_DTOH, [dev], sg=(rig.addr(dst), 64), tag=3)])
    _wait_busy(rig, base + 1)                       # the FENCE waits for the kernel
    rig.client.region_write(CONFIG, 4, struct.pack("<H", 0x0002), posted=False)   # memory decode only
    assert rig.reg(abi.REG_FATAL_CODE) == abi.FatalCode.NO_BUS_MASTER
    time.sleep(0.5)                                 # the kernel ends, the FENCE returns
    assert rig.read(dst, 64) == b"\xaa" * 64, "DMA after bus mastering went off"
    assert rig.hdr(abi.QH_CQ_TAIL) == base + 1
