"""The conformance suite's fixtures: every test runs on every backend that opens here.

``backend`` is parametrized over :data:`SPECS`; a backend that cannot be opened on this machine
(no GPU, no driver, no onnxruntime-qnn ...) is skipped with the reason ``open_backend`` gave.
Backends are opened once per test session; each test gets a fresh :class:`Session` on it.
"""

from __future__ import annotations

import pytest
from vxpu.accel.backend import BackendUnavailable, ModuleKind
from vxpu.accel.quota import Quota
from vxpu.accel.registry import open_backend
from vxpu.accel.session import Session

SPECS = ("cpu", "cuda", "hip", "npu", "npu,provider=qnn")


@pytest.fixture(scope="session", params=SPECS)
def backend(request):
    try:
        b = open_backend(request.param)
    except BackendUnavailable as exc:
        pytest.skip(f"backend {request.param!r} unavailable here: {exc}")
    yield b
    b.close()


@pytest.fixture
def session(backend):
    s = Session(backend, Quota(memory_bytes=256 << 20, modules=8), allowed_kinds=frozenset(ModuleKind))
    yield s
    s.close()


def runs_simt(backend) -> bool:
    """True for backends that run arbitrary IR kernels (threads, barriers, atomics)."""
    return "ir" in backend.properties().features
