"""The accelerator's registers and queue protocol (docs/device-abi.md §4.2-4.4, §4.8).

Identity and BAR0, enabling the queue, need-wakeup and doorbells, submission order, a full
ring, a completion ring that fills up, and every fatal error (bad configuration, sq_tail
beyond the ring, cq_head moving back or past cq_tail, ring memory unmapped, bus mastering
off), each readable in REG_STATUS/REG_FATAL_CODE/REG_FATAL_INFO and cleared by Control.RESET
while the server keeps serving.
"""

from __future__ import annotations

import json
import struct
import time

import pytest

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import ConfigProblem, Control, DeviceStatus, FatalCode, Opcode

from .ringdriver import CONFIG, DATA_OFF, RAM_BASE, SQ_OFF, XpuRig, desc


def _fatal(rig: XpuRig) -> tuple[int, int, int]:
    return rig.reg(abi.REG_STATUS), rig.reg(abi.REG_FATAL_CODE), rig.reg(abi.REG_FATAL_INFO)


def _reset_and_reenable(rig: XpuRig) -> None:
    before = rig.reg(abi.REG_RESET_COUNT)
    rig.set_reg(abi.REG_CONTROL, Control.RESET)
    deadline = time.monotonic() + 5
    while rig.reg(abi.REG_RESET_COUNT) == before:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    status, code, _info = _fatal(rig)
    assert not status & (DeviceStatus.FATAL | DeviceStatus.ENABLED) and code == 0
    assert rig.enable() & DeviceStatus.ENABLED
    rig.alive()


def test_identity_and_registers(rig):
    cfg = rig.client.region_read(CONFIG, 0, 0x30)
    vendor, device = struct.unpack_from("<HH", cfg, 0)
    assert (vendor, device) == (abi.VENDOR_ID, abi.DEVICE_ID)
    assert int.from_bytes(cfg[9:12], "little") == abi.CLASS_CODE
    assert rig.reg(abi.REG_MAGIC) == abi.MAGIC_VALUE
    assert rig.reg(abi.REG_VERSION) == abi.VERSION_VALUE
    features = rig.reg(abi.REG_FEATURES_LO) | rig.reg(abi.REG_FEATURES_HI) << 32
    assert features & abi.Feature.IR and features & abi.Feature.INDIRECT_SG and features & abi.Feature.EVENTS
    assert not features & (abi.Feature.PTX | abi.Feature.ONNX | abi.Feature.MSIX)
    assert rig.reg(abi.REG_MAX_RING_ENTRIES) == abi.MAX_RING_ENTRIES
    rig.set_reg(abi.REG_SCRATCH, 0xDEADBEEF)
    assert rig.reg(abi.REG_SCRATCH) == 0xDEADBEEF
    assert rig.reg(abi.REG_CONTROL) == 0 and rig.reg(abi.REG_DOORBELL) == 0
    assert rig.reg(abi.REG_STATUS) == DeviceStatus.ENABLED | DeviceStatus.BUS_MASTER


def test_completions_in_submission_order_with_tags(rig):
    descs = [desc(Opcode.NOP, tag=1000 + i) for i in range(40)]
    out = rig.run(descs)
    assert [c.tag for c in out] == list(range(1000, 1040))
    assert all(c.status == 0 for c in out)
    assert rig.hdr(abi.QH_SQ_HEAD) == rig.sq_tail == rig.hdr(abi.QH_CQ_TAIL)
    assert struct.unpack_from("<Q", rig.mem.view, abi.QH_COMPLETED)[0] == 40


def test_the_header_counts_completions_with_a_status_other_than_ok(rig):
    """Feature.ERROR_COUNT: QH_ERRORS counts non-OK completions, written before the cq_tail
    that publishes them; enabling the queue starts it at 0."""
    assert rig.reg(abi.REG_FEATURES_LO) & abi.Feature.ERROR_COUNT
    assert rig.hdr(abi.QH_ERRORS) == 0
    got = rig.run([desc(Opcode.NOP), desc(0x77), desc(Opcode.NOP, sg=(RAM_BASE, 16)), desc(Opcode.MEM_FREE, [0x1234]),
                   desc(Opcode.FENCE)])
    bad = sum(1 for c in got if c.status)
    assert bad == 3 and rig.hdr(abi.QH_ERRORS) == bad
    assert all(c.status == 0 for c in rig.run([desc(Opcode.NOP)] * 5)) and rig.hdr(abi.QH_ERRORS) == bad


def test_need_wakeup_set_when_idle_and_doorbell_wakes(rig):
    rig.cmd(Opcode.NOP)
    deadline = time.monotonic() + 2
    while not rig.hdr(abi.QH_FLAGS) & abi.FLAG_NEED_WAKEUP:
        assert time.monotonic() < deadline, "the idle device never set need-wakeup"
        time.sleep(0.001)
    t0 = time.monotonic()
    rig.submit([desc(Opcode.NOP, tag=7)], doorbell=True)
    (c,) = rig.completions(1)
    assert c.tag == 7 and time.monotonic() - t0 < 1.0


def test_missed_doorbell_costs_at_most_the_wakeup_latency(rig):
    rig.cmd(Opcode.NOP)
    time.sleep(0.05)                                         # asleep with need-wakeup set
    t0 = time.monotonic()
    rig.submit([desc(Opcode.NOP, tag=9)], doorbell=False)    # a driver that forgot the doorbell
    (c,) = rig.completions(1)
    assert c.tag == 9
    assert time.monotonic() - t0 < 0.5                       # MAX_WAKEUP_LATENCY_MS plus scheduling slack


def test_full_ring_is_accepted_and_taken_64_at_a_time(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, sq_entries=256) as rig:
        out = rig.run([desc(Opcode.NOP, tag=i) for i in range(rig.sq_entries)])
        assert [c.tag for c in out] == list(range(rig.sq_entries))
        out = rig.run([desc(Opcode.NOP, tag=i) for i in range(rig.sq_entries)])     # and again, wrapped
        assert len(out) == rig.sq_entries
        c = rig.cmd(Opcode.STATS, sg=(rig.addr(0x10_0000), abi.MAX_STATS_BYTES))
        assert json.loads(rig.read(0x10_0000, c.result))["device"]["max_batch"] == 64


def test_completion_ring_full_stops_intake_until_cq_head_moves(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, sq_entries=4, cq_entries=4) as r:
        r.submit([desc(Opcode.NOP, tag=i) for i in range(4)])
        deadline = time.monotonic() + 2
        while r.hdr(abi.QH_CQ_TAIL) != 4:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        r.submit([desc(Opcode.NOP, tag=10 + i) for i in range(4)])       # the CQ is full: nothing taken
        time.sleep(0.05)
        assert r.hdr(abi.QH_CQ_TAIL) == 4 and r.hdr(abi.QH_SQ_HEAD) == 4
        first = r.completions(4)                    # frees the CQ; intake resumes without a doorbell
        assert [c.tag for c in first] == [0, 1, 2, 3]
        t0 = time.monotonic()
        assert [c.tag for c in r.completions(4)] == [10, 11, 12, 13]
        assert time.monotonic() - t0 < 0.5                         # the device re-checks cq_head by itself
        assert not r.reg(abi.REG_STATUS) & DeviceStatus.FATAL


@pytest.mark.parametrize(("config", "problem"), [
    ({"sq_entries": 3}, ConfigProblem.RING_SIZE),
    ({"sq_entries": abi.MAX_RING_ENTRIES * 2, "cq_entries": abi.MAX_RING_ENTRIES * 2}, ConfigProblem.RING_SIZE),
    ({"sq_entries": 1, "cq_entries": 1}, ConfigProblem.RING_SIZE),
    ({"sq_entries": 64, "cq_entries": 32}, ConfigProblem.CQ_TOO_SMALL),
    ({"header": RAM_BASE + 0x800}, ConfigProblem.ALIGNMENT),
    ({"sq": RAM_BASE + SQ_OFF + 8}, ConfigProblem.ALIGNMENT),
    ({"header": 0x4000_0000}, ConfigProblem.HEADER),
    ({"header": 0xFFFF_FFFF_FFFF_F000}, ConfigProblem.HEADER),
    ({"sq": RAM_BASE + (8 << 20) - 0x800}, ConfigProblem.SQ),
    ({"cq": 0x20}, ConfigProblem.CQ),
])
def test_bad_queue_config_is_fatal_until_reset(tmp_path, backend, config, problem):
    with XpuRig(tmp_path / "s", backend, enable=False) as r:
        status = r.enable(**config)
        assert status & DeviceStatus.FATAL and not status & DeviceStatus.ENABLED
        assert r.reg(abi.REG_FATAL_CODE) == FatalCode.BAD_QUEUE_CONFIG
        assert r.reg(abi.REG_FATAL_INFO) == problem
        r.set_reg(abi.REG_QUEUE_ENABLE, 1)                       # still fatal: enable is ignored
        assert r.reg(abi.REG_STATUS) & DeviceStatus.FATAL
        _reset_and_reenable(r)


def test_sq_tail_beyond_the_ring_is_fatal(rig):
    rig.set_hdr(abi.QH_SQ_TAIL, rig.sq_entries + 1)
    rig.set_reg(abi.REG_DOORBELL, 1)
    rig.wait_status(DeviceStatus.FATAL)
    status, code, info = _fatal(rig)
    assert code == FatalCode.BAD_SQ_TAIL and info == rig.sq_entries + 1 and not status & DeviceStatus.ENABLED
    assert rig.hdr(abi.QH_CQ_TAIL) == 0                      # nothing was executed
    _reset_and_reenable(rig)


def test_sq_tail_far_out_of_range_is_fatal(rig):
    rig.set_hdr(abi.QH_SQ_TAIL, 0xFFFF_FFFF)
    rig.set_reg(abi.REG_DOORBELL, 1)
    rig.wait_status(DeviceStatus.FATAL)
    assert _fatal(rig)[1:] == (FatalCode.BAD_SQ_TAIL, 0xFFFF_FFFF)
    _reset_and_reenable(rig)


@pytest.mark.parametrize("bad_head", [5, 0xFFFF_FFFF])
def test_cq_head_past_cq_tail_or_backwards_is_fatal(rig, bad_head):
    rig.run([desc(Opcode.NOP) for _ in range(3)])             # cq_tail = cq_head = 3
    rig.set_hdr(abi.QH_CQ_HEAD, bad_head)                     # past cq_tail (5) or behind (-1)
    rig.submit([desc(Opcode.NOP)], doorbell=True)
    rig.wait_status(DeviceStatus.FATAL)
    assert _fatal(rig)[1:] == (FatalCode.BAD_CQ_HEAD, bad_head)
    _reset_and_reenable(rig)


def test_ring_memory_unmapped_while_running_is_fatal(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend) as r:
        r.cmd(Opcode.NOP)
        r.client.dma_unmap(RAM_BASE, r.mem.size)
        r.set_reg(abi.REG_DOORBELL, 1)
        r.wait_status(DeviceStatus.FATAL)
        assert r.reg(abi.REG_FATAL_CODE) == FatalCode.RING_UNMAPPED
        r.client.map_guest_ram(r.mem, RAM_BASE)
        _reset_and_reenable(r)


def test_bus_master_off_while_running_is_fatal(rig):
    rig.client.region_write(CONFIG, 4, struct.pack("<H", 0x0002))     # memory decode only
    status, code, _ = _fatal(rig)
    assert status & DeviceStatus.FATAL and code == FatalCode.NO_BUS_MASTER
    assert not status & DeviceStatus.BUS_MASTER
    rig.client.region_write(CONFIG, 4, struct.pack("<H", 0x0006))
    _reset_and_reenable(rig)


def test_enable_without_bus_master_is_fatal(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, enable=False) as r:
        r.client.region_write(CONFIG, 4, struct.pack("<H", 0x0002))
        status = r.enable()
        assert status & DeviceStatus.FATAL and r.reg(abi.REG_FATAL_CODE) == FatalCode.NO_BUS_MASTER
        r.client.region_write(CONFIG, 4, struct.pack("<H", 0x0006))
        _reset_and_reenable(r)


def test_queue_disable_drains_then_stops(rig):
    rig.submit([desc(Opcode.NOP, tag=i) for i in range(10)])
    rig.set_reg(abi.REG_QUEUE_ENABLE, 0)
    rig.wait_status(DeviceStatus.ENABLED, clear=True)
    assert [c.tag for c in rig.completions(10)] == list(range(10))
    rig.submit([desc(Opcode.NOP)], doorbell=True)
    time.sleep(0.05)
    assert rig.hdr(abi.QH_CQ_TAIL) == 10                      # stopped: nothing more taken
    assert rig.enable() & DeviceStatus.ENABLED                 # re-enable restarts at index 0
    rig.alive()


def test_unknown_registers_read_zero_and_ignore_writes(rig):
    rig.set_reg(0x100, 0x1234)
    assert rig.reg(0x100) == 0
    rig.set_reg(abi.REG_MAGIC, 0)
    assert rig.reg(abi.REG_MAGIC) == abi.MAGIC_VALUE
    rig.alive()


def test_data_area_is_outside_the_rings(rig):
    assert DATA_OFF >= rig.cq_off + rig.cq_entries * abi.CQ_ENTRY_SIZE


def test_a_briefly_invalid_index_is_re_read_not_fatal(rig):
    """A guest index store seen half-written (e.g. struct.pack_into clears the field first)
    looks invalid for an instant: the device re-reads it before declaring a fatal error."""
    rig.run([desc(Opcode.NOP) for _ in range(3)])              # sq_head = cq_head = 3
    rig.set_hdr(abi.QH_CQ_HEAD, 0)                             # "moved back", transiently
    rig.set_hdr(abi.QH_SQ_TAIL, 0)                             # far ahead, transiently
    rig.set_reg(abi.REG_DOORBELL, 1)
    time.sleep(0.001)
    rig.set_hdr(abi.QH_CQ_HEAD, 3)
    rig.set_hdr(abi.QH_SQ_TAIL, 3)
    assert [c.status for c in rig.run([desc(Opcode.NOP)])] == [0]
    assert not rig.reg(abi.REG_STATUS) & DeviceStatus.FATAL


def test_rings_in_message_only_ram_are_refused(tmp_path, backend):
    """RAM that QEMU maps without an fd (no share=on) can only be reached with DMA messages:
    it cannot hold the queue."""
    from vxpu.vfio_server.client import GuestMemory

    with XpuRig(tmp_path / "s", backend, enable=False) as r, GuestMemory(1 << 20) as msg:
        r.client.map_guest_ram(msg, 0x4000_0000, with_fd=False)
        status = r.enable(header=0x4000_0000)
        assert status & DeviceStatus.FATAL and r.reg(abi.REG_FATAL_INFO) == ConfigProblem.HEADER
        r.client.dma_unmap(0x4000_0000, msg.size)
