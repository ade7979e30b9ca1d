"""Helpers for the operator tests: orphan detection, and a QEMU with no OS.

The bare QEMU boots SeaBIOS, which finds nothing to boot, so nothing in the VM answers a
hot-unplug request, and the machine shape (pc or q35, root ports, filled slots) is whatever the
test asks for. It comes up in well under a second."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vxpu.images.qemu import QemuBinary
from vxpu.qmp.runtime import process_alive


@contextmanager
def bare_qemu(qemu: QemuBinary, work: Path, *args: str, machine: str = "pc") -> Iterator[Path]:
    """Run QEMU (TCG, 128 MiB shared memfd RAM, no OS) until the block ends; yields its QMP socket."""
    qmp = work / "bare.qmp"
    argv = qemu.argv("-accel", "tcg", "-m", "128", "-nographic", "-vga", "none", "-nic", "none", "-no-reboot",
                     "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
                     "-machine", f"{machine},memory-backend=mem", "-qmp", f"unix:{qmp},server=on,wait=off", *args)
    log = work / "bare-qemu.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=qemu.environ(), start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not qmp.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"bare QEMU did not come up: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        yield qmp
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def servers_under(root: Path) -> list[int]:
    """Pids of processes whose command line mentions ``root`` (vxpu servers of this test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(root).encode() in cmd and process_alive(int(entry.name), None):
                pids.append(int(entry.name))
    return pids


def leftovers(root: Path) -> list[str]:
    """Sockets, records and STATS files left in the runtime directory."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".sock", ".json", ".stats"))
