"""Helpers for the guest-SDK end-to-end tests: a vxpu accelerator server plus a VM running a
guest program from ``tests/e2e/guest_programs`` (copied into the initramfs for that boot)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary
from vxpu.images.vm import Vm, VmSpec
from vxpu.qmp.devices import vfio_user_device
from vxpu.qmp.server import ServerProcess

PROGRAMS = Path(__file__).parent / "guest_programs"
ACCEL = os.environ.get("VXPU_E2E_ACCEL", "auto")
BOOT_TIMEOUT_S = float(os.environ.get("VXPU_E2E_BOOT_TIMEOUT", "240"))


@dataclass
class GuestRun:
    """A running VM with the accelerator, and its server."""

    vm: Vm
    server: ServerProcess

    def lines(self, marker: str, until: str, timeout: float = BOOT_TIMEOUT_S) -> list[dict[str, Any]]:
        """Every ``<marker> {json}`` line the guest prints before the line ``until``."""
        self.vm.console.wait_for(rf"^{until}\b", timeout, self.vm.problem)
        return [json.loads(line[len(marker) + 1:]) for line in self.vm.console.text.splitlines()
                if line.startswith(marker + " ")]

    def explain(self) -> str:
        """Console, QEMU and server logs, for assertion messages."""
        return f"{self.vm.log_tail(6000)}\n[server log]\n{self.server.log_tail(6000)}"


@contextmanager
def guest_program(qemu: QemuBinary, image: GuestImage, work: Path, program: str, *, reboot: bool = False,
                  memory: str = "512M") -> Iterator[GuestRun]:
    """Serve the accelerator (CPU backend) and boot a VM that runs ``guest_programs/<program>``.

    Args:
        reboot: let a guest reboot reset the machine (QEMU without ``-no-reboot``); the same
            program then runs again on the next boot.
    """
    sock = work / "vxpu0.sock"
    server = ServerProcess(sock, work / "server.log", ["--device", "xpu", "--backend", "cpu"]).start()
    spec = VmSpec(cmd=f"python3 /root/{program}", accel=ACCEL, memory=memory, reboot=reboot,
                  devices=[vfio_user_device("vxpu0", sock)],
                  extra_files={f"root/{program}": (PROGRAMS / program).read_bytes()})
    vm = Vm(qemu, image, spec, work / "vm")
    try:
        vm.start()
        yield GuestRun(vm, server)
    finally:
        vm.stop()
        server.stop()
