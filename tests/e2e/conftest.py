"""Fixtures for the QEMU end-to-end tests: a real QEMU, a real Debian guest, a real vxpu server.

QEMU and the guest image are provisioned once per session (cached under ~/.cache/vxpu). If
that fails (no network, no apt) the tests FAIL: they are the point of the suite. Set
VXPU_SKIP_QEMU=1 to skip them explicitly. VXPU_E2E_ACCEL picks the accelerator (default
auto: KVM if it works here, TCG otherwise).
"""

from __future__ import annotations

import os

import pytest
from vxpu.images.guest import GuestImage, build_image
from vxpu.images.qemu import QemuBinary, find_qemu


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("VXPU_SKIP_QEMU") == "1":
        skip = pytest.mark.skip(reason="QEMU end-to-end tests disabled by VXPU_SKIP_QEMU=1")
        for item in items:
            if "qemu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def qemu_binary() -> QemuBinary:
    return find_qemu()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_image()
