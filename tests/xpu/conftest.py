"""Fixtures for the accelerator device tests: a CPU backend per module, a rig per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from vxpu.accel import registry

from .ringdriver import XpuRig


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    b = registry.open_backend("cpu")
    yield b
    b.close()


@pytest.fixture
def rig(tmp_path, backend) -> Iterator[XpuRig]:
    with XpuRig(tmp_path / "xpu.sock", backend) as r:
        yield r
