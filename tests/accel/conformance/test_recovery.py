"""Conformance: a faulting kernel, then recovery, on every backend.

This file sorts last on purpose: a backend that cannot recover from a fault in-process (it
answers DEVICE_LOST) fails here without taking the other conformance tests down with it.
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
    faults0 = backend.stats.faults
    buf = session.alloc(64)
    k, _ = session.get_kernel(session.load_module(image(OOB_STORE)), "oob_store")
    with pytest.raises(BackendError) as e:
        session.launch(k, (1,), (1,), struct.pack("<Q", buf))
        session.synchronize()
    assert e.value.status == Status.KERNEL_FAULT
    assert backend.stats.faults == faults0 + 1 and session.stats.faults == 1
    assert session.statistics()["vxpu_session_errors_kernel_fault"] == 1
    with pytest.raises(BackendError) as e:                 # the old handles are gone
        session.free(buf)
    assert e.value.status == Status.INVALID_HANDLE
    test_launch.test_vector_add(session, 1000, 128)                   # and the device serves again
