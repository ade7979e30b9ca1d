"""Conformance: a faulting kernel, then recovery, on every backend.

A backend that runs IR kernels checked (feature ``"checked-ir"``) contains the fault: the bad
access is not performed, the launch fails with KERNEL_FAULT and a fault record naming the
parameter, and the context, the allocations and the handles all stay.

A backend whose faults are sticky for the whole process (feature ``"sticky-faults"``: it
answers DEVICE_LOST and sets ``lost``) is checked in a child process, so the test process keeps
a working device for every test after this one.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from vxpu.accel.backend import BackendError, KernelFaultError, Status

from . import test_launch
from .conftest import runs_simt
from .kernels import OOB_STORE, image

# The sticky-fault contract, checked in a child process: such a fault poisons the driver for
# the whole process, and every GPU test after it in this process would then skip as "no GPU".
_STICKY_CHILD = r"""
import struct, sys
from vxpu.accel.backend import BackendError, ModuleKind, Status
from vxpu.accel.quota import Quota
from vxpu.accel.registry import open_backend
from vxpu.accel.session import Session

spec, image_path = sys.argv[1], sys.argv[2]
backend = open_backend(spec)
session = Session(backend, Quota(memory_bytes=256 << 20, modules=8), allowed_kinds=frozenset(ModuleKind))
buf = session.alloc(64)
k, _ = session.get_kernel(session.load_module(open(image_path, "rb").read()), "oob_store")
try:
    session.launch(k, (1,), (1,), struct.pack("<Q", buf))
    session.synchronize()
    sys.exit("the out-of-bounds store did not fault")
except BackendError as exc:
    assert exc.status == Status.DEVICE_LOST, exc
assert getattr(backend, "lost", None), "backend.lost not set"
assert session.stats.faults == 1 and session.stats.invalidations >= 1
try:
    session.alloc(64)
    sys.exit("a lost backend accepted more work")
except BackendError as exc:
    assert exc.status == Status.DEVICE_LOST, exc
print("sticky-fault contract ok")
"""


def test_faulting_kernel_then_recovery(session, backend, request, tmp_path):
    if not runs_simt(backend):
        pytest.skip("IR out-of-bounds stores need a SIMT backend; NPU faults are in test_npu.py")
    if "checked-ir" in backend.properties().features:
        _contained_fault(session, backend)
        return
    if "sticky-faults" in backend.properties().features:
        (tmp_path / "oob.vxir.bin").write_bytes(image(OOB_STORE))
        spec = request.node.callspec.params["backend"]
        child = subprocess.run([sys.executable, "-c", _STICKY_CHILD, spec, str(tmp_path / "oob.vxir.bin")],
                               check=False, capture_output=True, text=True, timeout=120)
        assert child.returncode == 0 and "contract ok" in child.stdout, child.stdout + child.stderr
        test_launch.test_vector_add(session, 1000, 128)    # this process's context is untouched
        return
    faults0 = backend.stats.faults
    buf = session.alloc(64)
    k, _ = session.get_kernel(session.load_module(image(OOB_STORE)), "oob_store")
    with pytest.raises(BackendError) as e:
        session.launch(k, (1,), (1,), struct.pack("<Q", buf))
        session.synchronize()
    assert session.stats.faults == 1 and session.stats.invalidations >= 1
    with pytest.raises(BackendError) as e2:                # the old handles are gone
        session.free(buf)
    assert e.value.status == Status.KERNEL_FAULT
    assert backend.stats.faults == faults0 + 1
    assert session.statistics()["vxpu_session_errors_kernel_fault"] == 1
    assert e2.value.status == Status.INVALID_HANDLE
    test_launch.test_vector_add(session, 1000, 128)        # and the device serves again


def _contained_fault(session, backend):
    faults0, resets0 = backend.stats.faults, backend.stats.resets
    buf = session.alloc(64)
    neighbour = session.alloc(64)
    session.memset(neighbour, 0xAB, 64)
    k, _ = session.get_kernel(session.load_module(image(OOB_STORE)), "oob_store")
    with pytest.raises(KernelFaultError) as e:
        session.launch(k, (1,), (1,), struct.pack("<Q", buf))
        session.synchronize()
    rec = e.value.record
    assert e.value.status == Status.KERNEL_FAULT and e.value.context_kept
    assert (rec.kernel, rec.code, rec.param, rec.block, rec.thread) == ("oob_store", 1, 0, (0, 0, 0), (0, 0, 0))
    assert session.stats.faults == 1 and session.stats.invalidations == 0
    assert backend.stats.faults == faults0 + 1 and backend.stats.resets == resets0
    back = bytearray(64)
    session.copy_dtoh(memoryview(back), neighbour)
    session.synchronize()
    assert back == b"\xab" * 64
    session.free(buf)                                      # the handles are still valid
    test_launch.test_vector_add(session, 1000, 128)        # and the next launch works
