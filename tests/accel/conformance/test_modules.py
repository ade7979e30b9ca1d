"""Conformance: module loading, kernel lookup and argument checks, on every backend."""

from __future__ import annotations

import os

import pytest
from vxpu.accel.backend import BackendError, ModuleKind, Status

from .kernels import DOUBLE_IN_PLACE, ILL_TYPED, VADD, image, vadd_args


def status_of(fn, *args):
    with pytest.raises(BackendError) as e:
        fn(*args)
    return e.value.status


def test_load_module_and_get_kernel(session):
    mod = session.load_module(image(VADD))
    k, info = session.get_kernel(mod, "vadd")
    assert info.name == "vadd" and info.args_size == len(vadd_args(0, 0, 0, 0))
    assert info.param_sizes == (4, 8, 8, 8) and info.param_offsets == (0, 8, 16, 24)
    assert session.get_kernel(mod, "vadd")[0] == k            # same handle on a second lookup
    session.unload_module(mod)
    assert status_of(session.launch, k, (1,), (1,), vadd_args(0, 0, 0, 0)) == Status.INVALID_HANDLE


def test_argument_layout_is_the_same_everywhere(session):
    import struct

    import numpy as np

    k, info = session.get_kernel(session.load_module(image(DOUBLE_IN_PLACE)), "double")
    assert (info.param_sizes, info.param_offsets, info.args_size) == ((8, 4), (0, 8), 16)
    x = np.arange(100, dtype=np.float32)
    d = session.alloc(x.nbytes)
    session.copy_htod(d, memoryview(x))
    session.launch(k, (1,), (128,), struct.pack("<Qi4x", d, 100))
    out = np.empty_like(x)
    session.copy_dtoh(memoryview(out), d)
    session.synchronize()
    assert np.array_equal(out, 2 * x)


@pytest.mark.parametrize("blob", [b"", b"VXIR", os.urandom(64), b"VXIR\x01\x00\x00" + os.urandom(40)])
def test_garbage_module(session, blob):
    assert status_of(session.load_module, blob) == Status.BAD_MODULE


def test_ir_failing_verification(session):
    assert status_of(session.load_module, image(ILL_TYPED)) == Status.BAD_MODULE


def test_unknown_kernel_name(session):
    mod = session.load_module(image(VADD))
    assert status_of(session.get_kernel, mod, "nope") == Status.NOT_FOUND


def test_wrong_args_size(session):
    mod = session.load_module(image(VADD))
    k, _ = session.get_kernel(mod, "vadd")
    assert status_of(session.launch, k, (1,), (32,), b"\0" * 8) == Status.INVALID_ARGUMENT
    assert status_of(session.launch, k, (1,), (32,), vadd_args(0, 0, 0, 0) + b"\0") == Status.INVALID_ARGUMENT


def test_bad_launch_shapes(session, backend):
    mod = session.load_module(image(VADD))
    k, _ = session.get_kernel(mod, "vadd")
    args = vadd_args(0, 0, 0, 0)
    assert status_of(session.launch, k, (0,), (1,), args) == Status.INVALID_ARGUMENT
    assert status_of(session.launch, k, (1, 1, 1, 1), (1,), args) == Status.INVALID_ARGUMENT
    too_many = backend.properties().max_threads_per_block + 1
    assert status_of(session.launch, k, (1,), (too_many,), args) == Status.INVALID_ARGUMENT


def test_module_quota(session):
    for _ in range(8):
        session.load_module(image(VADD))
    assert status_of(session.load_module, image(VADD)) == Status.QUOTA_EXCEEDED


def test_foreign_native_kind_is_refused(session, backend):
    kind = ModuleKind.PTX if backend.name != "cuda" else ModuleKind.HSACO
    assert status_of(session.load_module, b"not a module", kind) in (Status.UNSUPPORTED, Status.BAD_MODULE)
