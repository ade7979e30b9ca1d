"""Conformance: a kernel that never terminates ends in TIMEOUT and the backend keeps serving.

Runs on backends that advertise the feature ``"kernel-timeout"`` and expose a settable
``kernel_timeout`` (seconds); it lowers the limit for the test so that it takes well under a
second. (GPU backends have their own driver watchdogs, if any: they skip.)
"""

from __future__ import annotations

import struct
import time

import pytest
from vxpu.accel.backend import BackendError, Status

from . import test_launch
from .conftest import runs_simt
from .kernels import image

SPIN = """
module @spin
kernel @spin(%n: i32) {
^entry:
  %z = const 0 : i32
  br ^loop(%z)
^loop(%i: i32):
  %one = const 1 : i32
  %j = add %i, %one : i32
  %done = icmp slt %n, %z
  cbr %done, ^exit, ^loop(%j)
^exit:
  ret
}
"""

LIMIT = 0.3


def test_non_terminating_kernel_times_out_and_the_backend_keeps_serving(session, backend):
    if not runs_simt(backend) or "kernel-timeout" not in backend.properties().features:
        pytest.skip("the backend has no kernel time limit (feature 'kernel-timeout')")
    saved = backend.kernel_timeout
    backend.kernel_timeout = LIMIT
    try:
        buf = session.alloc(64)
        k, _ = session.get_kernel(session.load_module(image(SPIN)), "spin")
        t0 = time.monotonic()
        with pytest.raises(BackendError) as e:
            session.launch(k, (4,), (64,), struct.pack("<i", 0))
            session.synchronize()
        assert e.value.status == Status.TIMEOUT and time.monotonic() - t0 < LIMIT + 2.0
        assert "time limit" in str(e.value)
        assert session.stats.faults == 1               # counted as this client's fault, not a foreign reset
        with pytest.raises(BackendError) as e2:        # the context was reset: old handles are gone
            session.free(buf)
        assert e2.value.status == Status.INVALID_HANDLE
    finally:
        backend.kernel_timeout = saved
    test_launch.test_vector_add(session, 1000, 128)     # and the device serves again
