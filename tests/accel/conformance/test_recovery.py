"""Conformance: a faulting kernel, then recovery, on every backend.

This file sorts last on purpose: a backend whose faults are sticky for the whole process
(feature ``"sticky-faults"``: it answers DEVICE_LOST and sets ``lost``) is unusable afterwards,
so nothing may run on it after this test.
"""

from __future__ import annotations

import struct

import pytest
from vxpu.accel.backend import BackendError, Status

from . import test_launch
from .conftest import runs_simt
from .kernels import OOB_STORE, image


def test_faulting_kernel_then_recovery(session, backend):
    if not runs_simt(backend):
        pytest.skip("IR out-of-bounds stores need a SIMT backend; NPU faults are in test_npu.py")
    sticky = "sticky-faults" in backend.properties().features
    faults0 = backend.stats.faults
    buf = session.alloc(64)
    k, _ = session.get_kernel(session.load_module(image(OOB_STORE)), "oob_store")
    with pytest.raises(BackendError) as e:
        session.launch(k, (1,), (1,), struct.pack("<Q", buf))
        session.synchronize()
    assert session.stats.faults == 1 and session.stats.invalidations >= 1
    with pytest.raises(BackendError) as e2:                # the old handles are gone
        session.free(buf)
    if sticky:
        # The contract for process-wide sticky faults: DEVICE_LOST, ``lost`` set, no more work.
        assert e.value.status == Status.DEVICE_LOST and getattr(backend, "lost", None)
        assert e2.value.status in (Status.INVALID_HANDLE, Status.DEVICE_LOST)
        with pytest.raises(BackendError) as e3:
            session.alloc(64)
        assert e3.value.status == Status.DEVICE_LOST
        return
    assert e.value.status == Status.KERNEL_FAULT
    assert backend.stats.faults == faults0 + 1
    assert session.statistics()["vxpu_session_errors_kernel_fault"] == 1
    assert e2.value.status == Status.INVALID_HANDLE
    test_launch.test_vector_add(session, 1000, 128)        # and the device serves again
