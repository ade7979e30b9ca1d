"""A guest program misbehaves through the SDK's lower layer; each mistake is a DeviceError with
the right status, and the same VM then completes a correct kernel (guest_programs/misbehave.py).
Last, a process is SIGKILLed with its queue running: the next process's VM transport finds the
abandoned queue, resets the device and computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary

from tests.e2e.guestvm import guest_program
from vxpu.abi.xpu import FatalCode

pytestmark = pytest.mark.qemu

#: case -> (expected status name, expected fatal code); None: no error expected
EXPECTED: dict[str, tuple[str, int] | None] = {
    "baseline": None,
    "double_free": ("INVALID_HANDLE", 0),
    "stale_module_launch": ("INVALID_HANDLE", 0),
    "stale_module_kernel_get": ("INVALID_HANDLE", 0),
    "address_outside_ram": ("OUT_OF_RANGE", 0),
    "fills_ring_without_waiting": ("BAD_SQ_TAIL", int(FatalCode.BAD_SQ_TAIL)),
    "floods_within_flow_control": None,
    "killed_owner": None,
}


@pytest.fixture(scope="module")
def outcome(qemu_binary: QemuBinary, guest_image: GuestImage,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Any]], bool, str]:
    work: Path = tmp_path_factory.mktemp("misbehave")
    with guest_program(qemu_binary, guest_image, work, "misbehave.py") as run:
        try:
            cases = {c["case"]: c for c in run.lines("VXPU-CASE", "VXPU-DONE")}
        except Exception as exc:  # noqa: BLE001 - every test reports the logs
            cases = {"_error": {"message": f"{type(exc).__name__}: {exc}"}}
        return cases, run.server.alive(), run.explain()


@pytest.mark.parametrize("case", list(EXPECTED))
def test_misbehaviour_is_a_device_error_then_a_kernel_completes(
        outcome: tuple[dict[str, dict[str, Any]], bool, str], case: str) -> None:
    cases, _alive, logs = outcome
    assert case in cases, f"the guest did not report {case}: {cases}\n{logs}"
    got = cases[case]
    want = EXPECTED[case]
    if want is None:
        assert got["error"] is None, f"{case}: unexpected {got}"
    else:
        assert got["error"] == "DeviceError", f"{case}: {got}"
        assert (got["status"], got["fatal"]) == want, f"{case}: {got}"
    assert got["after_ok"], f"{case}: the correct kernel afterwards failed: {got}\n{logs}"


def test_a_killed_owner_leaves_a_device_the_next_process_recovers(
        outcome: tuple[dict[str, dict[str, Any]], bool, str]) -> None:
    cases, _alive, logs = outcome
    got = cases.get("killed_owner", {})
    assert got.get("child_rc") == -9 and got.get("child_posted"), f"the child did not die mid-work: {got}\n{logs}"
    assert got.get("recovered") is True, f"the next open did not find and reset the abandoned queue: {got}"


def test_server_survives_the_misbehaving_guest(outcome: tuple[dict[str, dict[str, Any]], bool, str]) -> None:
    _cases, alive, logs = outcome
    assert alive, logs
