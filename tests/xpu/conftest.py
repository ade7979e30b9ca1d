"""Fixtures for the accelerator device tests: a backend per module, a rig per test.

The backend is the CPU backend, or ``VXPU_XPU_BACKEND`` (e.g. ``cuda``) to run the same tests
through a GPU backend; a backend that cannot be opened here skips the tests with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from vxpu.accel import registry
from vxpu.accel.backend import BackendUnavailable

from .ringdriver import XpuRig


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    spec = os.environ.get("VXPU_XPU_BACKEND", "cpu")
    try:
        b = registry.open_backend(spec)
    except BackendUnavailable as exc:
        pytest.skip(f"backend {spec!r} unavailable here: {exc}")
    yield b
    b.close()


@pytest.fixture
def rig(tmp_path, backend) -> Iterator[XpuRig]:
    with XpuRig(tmp_path / "xpu.sock", backend) as r:
        yield r
