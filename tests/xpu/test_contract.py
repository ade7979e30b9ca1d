"""The smaller promises of docs/device-abi.md §4 that the per-command files do not cover: the
MSI-X option, enable while running, queue registers latched at enable, the coalescing clamp, the
backend queue-depth quota, and INFER on an ONNX-capable (NPU) backend.
"""

from __future__ import annotations

import json
import os
import select
import struct
import uuid

import numpy as np
import pytest
from vxpu.accel.backend import BackendUnavailable, ModuleKind
from vxpu.accel.quota import Quota
from vxpu.accel.registry import open_backend
from vxpu.ir import binary, text
from vxpu.vfio_server.device import IrqIndex

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import DeviceStatus, Feature, IrqControl, Opcode

from .ringdriver import DATA_OFF, XpuRig, desc
from .test_commands import _count, _msi


def test_msix_option(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, msix=True) as r:
        assert r.reg(abi.REG_FEATURES_LO) & Feature.MSIX
        assert r.client.irq_info(IrqIndex.MSIX).count == abi.MSIX_VECTORS
        assert r.client.irq_info(IrqIndex.MSI).count == abi.MSI_VECTORS
        r.alive()
    with XpuRig(tmp_path / "t", backend) as r:
        assert not r.reg(abi.REG_FEATURES_LO) & Feature.MSIX
        assert r.client.irq_info(IrqIndex.MSIX).count == 0


def test_enable_while_enabled_changes_nothing(rig):
    rig.run([desc(Opcode.NOP) for _ in range(5)])
    rig.set_reg(abi.REG_QUEUE_ENABLE, 1)
    assert [c.status for c in rig.run([desc(Opcode.NOP, tag=9)])] == [0]
    assert rig.hdr(abi.QH_CQ_TAIL) == 6                       # indices were not restarted


def test_queue_registers_are_latched_at_enable(rig):
    rig.set_reg(abi.REG_SQ_ENTRIES, 3)                         # nonsense, but only for the next enable
    rig.set_reg(abi.REG_SQ_BASE_LO, 0x1234)
    assert [c.status for c in rig.run([desc(Opcode.NOP) for _ in range(10)])] == [0] * 10
    rig.set_reg(abi.REG_QUEUE_ENABLE, 0)
    rig.wait_status(DeviceStatus.ENABLED, clear=True)
    rig.mem.write(0, bytes(abi.QUEUE_HEADER_SIZE))
    rig.set_reg(abi.REG_QUEUE_ENABLE, 1)                       # now they count
    status = rig.wait_status(DeviceStatus.FATAL)
    assert status & DeviceStatus.FATAL and rig.reg(abi.REG_FATAL_INFO) == abi.ConfigProblem.RING_SIZE


def test_coalescing_delay_is_clamped(rig):
    fd = _msi(rig)
    try:
        rig.set_reg(abi.REG_IRQ_CONTROL, IrqControl.COMPLETION)
        rig.set_reg(abi.REG_IRQ_COALESCE_COUNT, 1000)
        rig.set_reg(abi.REG_IRQ_COALESCE_USEC, 0xFFFF_FFFF)       # ~71 minutes asked, 100 ms served
        rig.flush()                                                # posted writes: applied before the NOP
        rig.cmd(Opcode.NOP)
        assert _count(fd, 0.01) == 0
        assert _count(fd, 0.5) == 1
    finally:
        os.close(fd)


def test_backend_queue_depth_quota_waits_instead_of_growing(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, quota=Quota(queue_depth=2)) as r:
        dev = r.alloc(1 << 20)
        got = r.run([desc(Opcode.MEM_SET, [dev, i, 1 << 20]) for i in range(20)] + [desc(Opcode.FENCE)])
        assert all(c.status == 0 for c in got)
        assert r.dtoh(dev, 4) == bytes([19]) * 4


# -- INFER on an ONNX-capable backend -------------------------------------------------------------

def _add_model() -> bytes:
    onnx = pytest.importorskip("onnx")
    helper, tp = onnx.helper, onnx.TensorProto
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add",
                          [helper.make_tensor_value_info("a", tp.FLOAT, [8]),
                           helper.make_tensor_value_info("b", tp.FLOAT, [8])],
                          [helper.make_tensor_value_info("c", tp.FLOAT, [8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return bytes(m.SerializeToString())


@pytest.fixture(scope="module")
def npu():
    try:
        b = open_backend("npu,provider=cpu,arena=64M")
    except BackendUnavailable as exc:
        pytest.skip(f"NPU backend (ONNX Runtime, CPU provider) unavailable: {exc}")
    yield b
    b.close()


def test_infer_runs_an_onnx_model(tmp_path, npu):
    model = _add_model()
    with XpuRig(tmp_path / "s", npu, allowed_kinds=frozenset({ModuleKind.IR, ModuleKind.ONNX})) as r:
        assert r.reg(abi.REG_FEATURES_LO) & Feature.ONNX
        r.write(DATA_OFF, model)
        c = r.cmd(Opcode.MODULE_LOAD, [abi.ModuleKind.ONNX], sg=(r.addr(DATA_OFF), len(model)))
        assert c.status == Status.OK
        module = c.result
        a, b = np.arange(8, dtype=np.float32), np.full(8, 0.5, np.float32)
        da, db, dc = r.alloc(32), r.alloc(32), r.alloc(32)
        assert r.htod(da, a.tobytes()).status == 0 and r.htod(db, b.tobytes()).status == 0
        req = json.dumps({"inputs": [da, db], "outputs": [dc]}).encode()
        r.write(DATA_OFF + 0x10000, req)
        got = r.run([desc(Opcode.INFER, [module], sg=(r.addr(DATA_OFF + 0x10000), len(req))), desc(Opcode.FENCE)])
        assert [x.status for x in got] == [0, 0]
        np.testing.assert_array_equal(np.frombuffer(r.dtoh(dc, 32), np.float32), a + b)
        for bad in (b"{not json", b'{"inputs": "x"}', b'{"inputs": [-1]}', b"[1, 2]"):
            r.write(DATA_OFF + 0x10000, bad)
            assert r.cmd(Opcode.INFER, [module], sg=(r.addr(DATA_OFF + 0x10000), len(bad))).status \
                == Status.INVALID_ARGUMENT
        r.write(DATA_OFF + 0x10000, req)
        assert r.cmd(Opcode.INFER, [module + 1], sg=(r.addr(DATA_OFF + 0x10000), len(req))).status \
            == Status.INVALID_HANDLE
        r.alive()


def test_native_kinds_stay_off_unless_allowed(tmp_path, npu):
    with XpuRig(tmp_path / "s", npu) as r:
        assert not r.reg(abi.REG_FEATURES_LO) & Feature.ONNX
        model = _add_model()
        r.write(DATA_OFF, model)
        assert r.cmd(Opcode.MODULE_LOAD, [abi.ModuleKind.ONNX], sg=(r.addr(DATA_OFF), len(model))).status \
            == Status.UNSUPPORTED
        r.write(DATA_OFF, b'{"inputs": []}')
        assert r.cmd(Opcode.INFER, [1], sg=(r.addr(DATA_OFF), 14)).status == Status.UNSUPPORTED


def test_compile_time_budget_is_not_refilled_by_a_reset(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, quota=Quota(compile_seconds=1)) as r:
        statuses = []
        run = uuid.uuid4().hex[:12]                # fresh names: no run finds them in the JIT's disk cache
        for i in range(200):                       # distinct modules: every load is a real compile
            src = f"module @m{run}_{i}\nkernel @k{i}(%p: ptr<global>) {{\n^entry:\n  ret\n}}\n"
            image = binary.encode(text.parse(src), names=False)
            r.write(DATA_OFF, image)
            c = r.cmd(Opcode.MODULE_LOAD, [abi.ModuleKind.IR], sg=(r.addr(DATA_OFF), len(image)))
            statuses.append(c.status)
            if c.status == Status.QUOTA_EXCEEDED:
                break
            assert c.status == Status.OK, c
        assert statuses[-1] == Status.QUOTA_EXCEEDED, f"budget never ran out in {len(statuses)} compiles"
        assert r.cmd(Opcode.RESET).status == Status.OK
        assert r.cmd(Opcode.MODULE_LOAD, [abi.ModuleKind.IR], sg=(r.addr(DATA_OFF), len(image))).status \
            == Status.QUOTA_EXCEEDED
        assert r.cmd(Opcode.IDENTIFY, sg=(r.addr(DATA_OFF), 4096)).status == Status.OK
        assert json.loads(r.read(DATA_OFF, r.cmd(Opcode.IDENTIFY, sg=(r.addr(DATA_OFF), 4096)).result)) \
            ["quota"]["compile_seconds"] == 1


def test_allocation_size_and_kernel_handle_quotas(tmp_path, backend):
    src = "module @two\nkernel @a() {\n^entry:\n  ret\n}\nkernel @b() {\n^entry:\n  ret\n}\n"
    with XpuRig(tmp_path / "s", backend, quota=Quota(max_allocation_bytes=4096, kernels=1)) as r:
        assert r.cmd(Opcode.MEM_ALLOC, [4097]).status == Status.QUOTA_EXCEEDED
        assert r.cmd(Opcode.MEM_ALLOC, [4096]).status == Status.OK
        image = binary.encode(text.parse(src), names=False)
        r.write(DATA_OFF, image)
        module = r.cmd(Opcode.MODULE_LOAD, [abi.ModuleKind.IR], sg=(r.addr(DATA_OFF), len(image))).result
        statuses = []
        for name in (b"a", b"b"):
            r.write(DATA_OFF, name)
            statuses.append(r.cmd(Opcode.KERNEL_GET, [module], sg=(r.addr(DATA_OFF), 1)).status)
        assert statuses == [Status.OK, Status.QUOTA_EXCEEDED]


def _arrived(fd: int, timeout: float = 2.0) -> int:
    """The eventfd's count once it is signalled (0 if not within ``timeout``): an interrupt
    crosses the serve loop, which on a loaded host can take longer than a fixed settle time."""
    select.select([fd], [], [], timeout)
    return _count(fd, 0.0)


def test_fatal_error_raises_vector_1_with_msix(tmp_path, backend):
    with XpuRig(tmp_path / "s", backend, msix=True) as r:
        cfg = r.client.region_read(7, 0, 256)
        cap = cfg[0x34]
        while cfg[cap] != 0x11:                                    # find the MSI-X capability
            cap = cfg[cap + 1]
        r.client.region_write(7, cap + 2, struct.pack("<H", 0x8000))          # MSI-X enable, unmasked
        r.client.region_write(0, abi.MSIX_TABLE_OFFSET + 16 + 12, struct.pack("<I", 0))   # unmask vector 1
        r.client.region_write(0, abi.MSIX_TABLE_OFFSET + 12, struct.pack("<I", 0))        # and vector 0
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        try:
            r.client.set_irqs(IrqIndex.MSIX, 0x24, 0, 2, fds)
            r.set_reg(abi.REG_IRQ_CONTROL, IrqControl.FATAL | IrqControl.COMPLETION)
            r.flush()
            r.cmd(Opcode.NOP)
            assert _arrived(fds[0]) == 1 and _count(fds[1], 0.0) == 0        # completions: vector 0
            r.set_hdr(abi.QH_SQ_TAIL, 10_000)
            r.set_reg(abi.REG_DOORBELL, 1)
            r.wait_status(DeviceStatus.FATAL)
            assert _arrived(fds[1]) == 1 and _count(fds[0], 0.0) == 0        # the fatal error: vector 1
        finally:
            for fd in fds:
                os.close(fd)


def test_infer_requests_json_cannot_express_are_invalid_argument(tmp_path, npu):
    """JSON that parses but has no u64 meaning (Infinity, 1e400) or nests past the parser's
    recursion limit is INVALID_ARGUMENT, not an internal error of the device model."""
    nested = b'{"inputs": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    with XpuRig(tmp_path / "s", npu, allowed_kinds=frozenset({ModuleKind.IR, ModuleKind.ONNX})) as r:
        for bad in (b'{"inputs": [Infinity]}', b'{"outputs": [1e400]}', b'{"dims": [-Infinity]}', nested):
            r.write(DATA_OFF + 0x10000, bad)
            c = r.cmd(Opcode.INFER, [1], sg=(r.addr(DATA_OFF + 0x10000), len(bad)))
            assert c.status == Status.INVALID_ARGUMENT, (bad[:30], Status(c.status))
        r.alive()
