"""Descriptor and scatter-gather validation, IDENTIFY, STATS, INFER, the EVENT_* commands and
completion interrupts (docs/device-abi.md §4.3, §4.5-4.6): every malformed descriptor ends in
its precise status and the device keeps serving.
"""

from __future__ import annotations

import json
import os
import struct
import time

import pytest
from vxpu.accel.quota import Quota

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import DescFlags, Feature, IrqControl, Opcode

from .ringdriver import CONFIG, DATA_OFF, RAM_BASE, XpuRig, desc

U64 = (1 << 64) - 1
BUF = DATA_OFF + 0x10000


def _raw(rig: XpuRig, opcode: int, flags: int = 0, sg_count: int = 0, sg_addr: int = 0, sg_len: int = 0,
         args: tuple[int, int, int, int] = (0, 0, 0, 0), tag: int = 77) -> int:
    (c,) = rig.run([abi.DESCRIPTOR.pack(opcode, flags, sg_count, tag, *args, sg_addr, sg_len)])
    assert c.tag == tag
    return c.status


@pytest.mark.parametrize("opcode", [0x02, 0x0F, 0x16, 0x23, 0x31, 0x46, 0x51, 0x61, 0x71, 0xFFFF])
def test_unknown_opcodes_are_unsupported(rig, opcode):
    assert _raw(rig, opcode) == Status.UNSUPPORTED
    rig.alive()


@pytest.mark.parametrize("flags", [0x4, 0x8, 0x100, 0x8000, 0xFFFF])
def test_reserved_flag_bits(rig, flags):
    assert _raw(rig, Opcode.NOP, flags=flags) == Status.BAD_DESCRIPTOR


@pytest.mark.parametrize(("flags", "sg_count", "sg_addr", "sg_len"), [
    (0, 2, RAM_BASE + BUF, 16),                   # inline lists hold at most one entry
    (0, 0xFFFF_FFFF, RAM_BASE + BUF, 16),
    (0, 0, RAM_BASE + BUF, 0),                    # no entries, but an address
    (0, 0, 0, 16),                                # no entries, but a length
    (0, 1, RAM_BASE + BUF, 0),                    # a zero-length segment
    (DescFlags.SG_INDIRECT, 0, RAM_BASE + BUF, 0),
    (DescFlags.SG_INDIRECT, abi.MAX_SG_ENTRIES + 1, RAM_BASE + BUF, 0),
    (DescFlags.SG_INDIRECT, 1, RAM_BASE + BUF, 16),   # indirect lists carry no length
])
def test_malformed_sg_is_bad_descriptor(rig, flags, sg_count, sg_addr, sg_len):
    dev = rig.alloc(64)
    assert _raw(rig, Opcode.MEM_COPY_HTOD, flags, sg_count, sg_addr, sg_len, (dev, 0, 0, 0)) == Status.BAD_DESCRIPTOR
    rig.alive()


def test_indirect_list_outside_guest_ram_or_with_bad_entries(rig):
    dev = rig.alloc(64)
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(0x1000, 1)).status == Status.OUT_OF_RANGE
    end = RAM_BASE + rig.mem.size
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(end - 16, 2)).status == Status.OUT_OF_RANGE
    lst = rig.sg_list(BUF, [(rig.addr(DATA_OFF), 16), (rig.addr(DATA_OFF), 0)])
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(lst, 2)).status == Status.BAD_DESCRIPTOR
    lst = rig.sg_list(BUF, [(rig.addr(DATA_OFF), 16), (0xDEAD_0000, 16)])
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(lst, 2)).status == Status.OUT_OF_RANGE
    lst = rig.sg_list(BUF, [(rig.addr(DATA_OFF), 16)] * abi.MAX_SG_ENTRIES)
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(lst, abi.MAX_SG_ENTRIES)).status == Status.OUT_OF_RANGE
    lst = rig.sg_list(BUF, [(rig.addr(DATA_OFF), 16)] * 4)
    assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(lst, 4)).status == Status.OK
    rig.alive()


@pytest.mark.parametrize("opcode", [Opcode.NOP, Opcode.MEM_ALLOC, Opcode.FENCE, Opcode.EVENT_CREATE, Opcode.RESET])
def test_sg_on_a_command_without_one(rig, opcode):
    assert rig.cmd(opcode, [64], sg=(rig.addr(BUF), 16)).status == Status.BAD_DESCRIPTOR


def test_tags_and_unused_arguments(rig):
    got = rig.run([abi.DESCRIPTOR.pack(Opcode.NOP, 0, 0, tag, U64, 1, 2, 3, 0, 0) for tag in (0, 1, U64, 1 << 63)])
    assert [c.tag for c in got] == [0, 1, U64, 1 << 63] and all(c.status == 0 for c in got)


def test_identify(rig):
    c = rig.cmd(Opcode.IDENTIFY, sg=(rig.addr(BUF), abi.MAX_IDENTIFY_BYTES))
    assert c.status == Status.OK and 0 < c.result <= abi.MAX_IDENTIFY_BYTES
    doc = json.loads(rig.read(BUF, c.result))
    assert doc["abi"] == "1.0" and doc["backend"] == rig.device.backend.properties().backend
    assert doc["memory_total"] > 0 and doc["max_threads_per_block"] >= 1
    assert "IR" in doc["features"] and "PTX" not in doc["features"]
    assert ("CHECKED_IR" in doc["features"]) == ("checked-ir" in doc["backend_features"])
    assert doc["limits"]["max_ring_entries"] == abi.MAX_RING_ENTRIES
    assert doc["quota"]["memory_bytes"] > 0
    features = rig.reg(abi.REG_FEATURES_LO)
    assert {f.name for f in Feature if features & f} == set(doc["features"])


def test_identify_into_scattered_and_too_small_buffers(rig):
    full = rig.cmd(Opcode.IDENTIFY, sg=(rig.addr(BUF), 4096)).result
    doc = rig.read(BUF, full)
    rig.write(BUF + 0x2000, b"\xee" * 64)
    c = rig.cmd(Opcode.IDENTIFY, sg=(rig.addr(BUF + 0x2000), full - 1))
    assert (c.status, c.result, c.result2) == (Status.INVALID_ARGUMENT, 0, full)
    assert rig.read(BUF + 0x2000, 64) == b"\xee" * 64               # nothing written
    half = full // 2
    lst = rig.sg_list(BUF + 0x3000, [(rig.addr(BUF + 0x5000), half), (rig.addr(BUF + 0x4000), full)])
    c = rig.cmd(Opcode.IDENTIFY, indirect=(lst, 2))
    assert c.status == Status.OK and c.result == full
    assert rig.read(BUF + 0x5000, half) + rig.read(BUF + 0x4000, full - half) == doc


def test_stats_count_commands_errors_and_bytes(rig):
    dev = rig.alloc(1000)
    rig.htod(dev, os.urandom(1000))
    rig.dtoh(dev, 1000)
    rig.cmd(Opcode.MEM_FREE, [12345])                                 # an error
    c = rig.cmd(Opcode.STATS, sg=(rig.addr(BUF), abi.MAX_STATS_BYTES))
    assert c.status == Status.OK
    doc = json.loads(rig.read(BUF, c.result))
    dev_stats = doc["device"]
    assert dev_stats["commands"]["MEM_ALLOC"] == 1 and dev_stats["commands"]["MEM_FREE"] == 1
    assert dev_stats["errors"] == {"INVALID_HANDLE": 1}
    assert dev_stats["bytes"]["htod"] == 1000 and dev_stats["bytes"]["dtoh"] == 1000
    assert dev_stats["busy_ns"] > 0 and dev_stats["batches"] >= 4
    assert {"queue_depth", "max_queue_depth", "doorbells", "sleeps", "interrupts"} <= set(dev_stats)
    assert doc["session"]["vxpu_session_live_allocations"] == 1
    c = rig.cmd(Opcode.STATS, sg=(rig.addr(BUF), 8))
    assert c.status == Status.INVALID_ARGUMENT and c.result2 > 8


def test_infer_is_unsupported_without_onnx(rig):
    rig.write(BUF, b'{"inputs": [], "outputs": []}')
    assert rig.cmd(Opcode.INFER, [1], sg=(rig.addr(BUF), 29)).status == Status.UNSUPPORTED


def test_events(rig):
    c = rig.cmd(Opcode.EVENT_CREATE)
    assert c.status == Status.OK
    e1 = c.result
    e2 = rig.cmd(Opcode.EVENT_CREATE).result
    assert rig.cmd(Opcode.EVENT_ELAPSED, [e1, e2]).status == Status.INVALID_ARGUMENT       # never recorded
    assert rig.cmd(Opcode.EVENT_QUERY, [e1]).status == Status.INVALID_ARGUMENT
    dev = rig.alloc(1 << 20)
    got = rig.run([desc(Opcode.EVENT_RECORD, [e1]), desc(Opcode.MEM_SET, [dev, 1, 1 << 20]),
                   desc(Opcode.EVENT_RECORD, [e2]), desc(Opcode.EVENT_QUERY, [e2]),
                   desc(Opcode.EVENT_ELAPSED, [e1, e2])])
    assert [c.status for c in got] == [0] * 5
    assert got[3].result == 1
    assert 0 <= got[4].result < 10**10
    assert rig.cmd(Opcode.EVENT_DESTROY, [e1]).status == Status.OK
    assert rig.cmd(Opcode.EVENT_DESTROY, [e1]).status == Status.INVALID_HANDLE
    assert rig.cmd(Opcode.EVENT_RECORD, [e1]).status == Status.INVALID_HANDLE
    assert rig.cmd(Opcode.EVENT_RECORD, [dev]).status == Status.INVALID_HANDLE              # not an event
    assert rig.cmd(Opcode.RESET).status == Status.OK
    assert rig.cmd(Opcode.EVENT_QUERY, [e2]).status == Status.INVALID_HANDLE               # stale


def test_event_quota(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, quota=Quota(events=2)) as r:
        assert [r.cmd(Opcode.EVENT_CREATE).status for _ in range(3)] == [0, 0, Status.QUOTA_EXCEEDED]


def _msi(rig: XpuRig) -> int:
    """Enable MSI in config space and give the device an eventfd for vector 0."""
    cap = rig.client.region_read(CONFIG, 0x34, 1)[0]
    rig.client.region_write(CONFIG, cap + 2, struct.pack("<H", 1))
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    rig.client.set_irqs(1, 0x24, 0, 1, [fd])
    return fd


def _count(fd: int, settle: float = 0.05) -> int:
    time.sleep(settle)
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_completion_interrupts_and_coalescing(rig):
    fd = _msi(rig)
    try:
        rig.run([desc(Opcode.NOP)] * 4)
        assert _count(fd) == 0                                        # IRQ_CONTROL off: none
        rig.set_reg(abi.REG_IRQ_CONTROL, IrqControl.COMPLETION)
        rig.flush()                                                   # posted: applied before the NOP
        rig.cmd(Opcode.NOP)
        assert _count(fd) == 1
        rig.set_reg(abi.REG_IRQ_COALESCE_COUNT, 8)
        rig.set_reg(abi.REG_IRQ_COALESCE_USEC, 50_000)
        rig.flush()
        rig.submit([desc(Opcode.NOP)] * 16)
        rig.completions(16)
        assert _count(fd, 0.01) >= 1                                  # 8 reached: at once, not after 50 ms
        rig.cmd(Opcode.NOP)
        assert _count(fd, 0.01) == 0                                  # 1 of 8: held back ...
        assert _count(fd, 0.2) == 1                                   # ... until 50 ms passed
        rig.set_reg(abi.REG_IRQ_COALESCE_USEC, 100_000)
        rig.flush()
        rig.cmd(Opcode.NOP, flags=DescFlags.IRQ)                      # forced
        assert _count(fd, 0.02) == 1
        assert json.loads(_stats(rig))["device"]["interrupts"] >= 4
    finally:
        os.close(fd)


def _stats(rig: XpuRig) -> bytes:
    c = rig.cmd(Opcode.STATS, sg=(rig.addr(BUF), abi.MAX_STATS_BYTES))
    return rig.read(BUF, c.result)


def test_fatal_interrupt(rig):
    fd = _msi(rig)
    try:
        rig.set_reg(abi.REG_IRQ_CONTROL, IrqControl.FATAL)
        rig.set_hdr(abi.QH_SQ_TAIL, 1000)
        rig.set_reg(abi.REG_DOORBELL, 1)
        rig.wait_status(abi.DeviceStatus.FATAL)
        assert _count(fd) == 1
    finally:
        os.close(fd)
