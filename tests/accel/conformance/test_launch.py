"""Conformance: kernel launches checked against numpy, faults and recovery, on every backend."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from vxpu.accel.backend import BackendError, Status

from .conftest import runs_simt
from .kernels import ATOMIC_SUM, BLOCK_REVERSE, VADD, image, vadd_args


def upload(session, array: np.ndarray) -> int:
    address = session.alloc(array.nbytes)
    session.copy_htod(address, memoryview(array))
    return address


def download(session, address: int, like: np.ndarray) -> np.ndarray:
    out = np.empty_like(like)
    session.copy_dtoh(memoryview(out), address)
    session.synchronize()
    return out


@pytest.mark.parametrize("n,block", [(1, 1), (1000, 128), (4099, 256)])
def test_vector_add(session, n, block):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    da, db, dc = upload(session, a), upload(session, b), session.alloc(a.nbytes)
    k, _ = session.get_kernel(session.load_module(image(VADD)), "vadd")
    session.launch(k, ((n + block - 1) // block,), (block,), vadd_args(n, da, db, dc))
    assert np.array_equal(download(session, dc, a), a + b)


def test_guard_limits_the_elements(session):
    a = np.ones(512, np.float32)
    da, dc = upload(session, a), upload(session, np.zeros(512, np.float32))
    k, _ = session.get_kernel(session.load_module(image(VADD)), "vadd")
    session.launch(k, (2,), (256,), vadd_args(300, da, da, dc))
    out = download(session, dc, a)
    assert np.all(out[:300] == 2) and np.all(out[300:] == 0)


def test_barrier_and_shared_memory(session, backend):
    if not runs_simt(backend):
        assert _load_status(session, BLOCK_REVERSE, "block_reverse") == Status.UNSUPPORTED
        return
    x = np.arange(4 * 256, dtype=np.float32)
    dx, dy = upload(session, x), session.alloc(x.nbytes)
    k, _ = session.get_kernel(session.load_module(image(BLOCK_REVERSE)), "block_reverse")
    session.launch(k, (4,), (256,), struct.pack("<QQ", dx, dy))
    assert np.array_equal(download(session, dy, x), x.reshape(4, 256)[:, ::-1].reshape(-1))


def test_global_atomics(session, backend):
    # SIMT backends run the atomics; the NPU lowers these unused-result atomics to reductions.
    n = 10_000
    x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    dx, dsum, dcount = upload(session, x), session.alloc(4), session.alloc(4)
    k, _ = session.get_kernel(session.load_module(image(ATOMIC_SUM)), "atomic_sum")
    results = []
    for _ in range(2):
        session.memset(dsum, 0, 4)
        session.memset(dcount, 0, 4)
        session.launch(k, ((n + 255) // 256,), (256,), struct.pack("<i4xQQQ", n, dx, dsum, dcount))
        results.append((download(session, dsum, np.zeros(1, np.float32))[0],
                        download(session, dcount, np.zeros(1, np.int32))[0]))
    (s0, c0), (s1, c1) = results
    assert c0 == c1 == n
    assert s0 == pytest.approx(float(x.astype(np.float64).sum()), abs=1e-2)
    if backend.name == "cpu":
        assert np.float32(s0).tobytes() == np.float32(s1).tobytes()   # deterministic order


def _load_status(session, source: str, name: str) -> Status:
    with pytest.raises(BackendError) as e:
        session.get_kernel(session.load_module(image(source)), name)
    return e.value.status
