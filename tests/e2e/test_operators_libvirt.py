"""libvirt's QEMU driver boots the domain ``vxpu libvirt-xml`` writes, and the guest sees the device.

A ``vxpu serve`` runs beside the domain; the domain gets the device through
``<qemu:commandline>`` and shared memfd RAM, and the guest selftest (identity, BARs, registers,
DMA both ways, MSI) passes. The second QMP socket in the XML then lets ``vxpu attach``/``ls``/
``detach`` manage a further device of the running libvirt domain.

Needs a running libvirtd with the QEMU driver (``virsh -c qemu:///system version`` works);
otherwise it skips with the reason. The domain's ``<emulator>`` is a wrapper script that runs
vxpu's private QEMU 11 through its own loader.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from vxpu.images.guest import GuestImage, encode_cmd
from vxpu.images.qemu import QemuBinary
from vxpu.qmp import libvirt
from vxpu.qmp.server import ServerProcess

pytestmark = pytest.mark.qemu

URI = "qemu:///system"
BOOT_TIMEOUT_S = float(os.environ.get("VXPU_E2E_BOOT_TIMEOUT", "180"))


def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture(scope="module")
def libvirtd() -> None:
    if shutil.which("virsh") is None:
        pytest.skip("virsh not installed (apt-get install libvirt-clients)")
    res = _virsh("version", check=False)
    if "Using API: QEMU" not in res.stdout:
        pytest.skip(f"libvirt's QEMU driver is not reachable at {URI}: {(res.stderr or res.stdout).strip()}")


def _wrapper(qemu: QemuBinary, path: Path) -> Path:
    env = {k: v for k, v in qemu.environ().items() if k.startswith("QEMU_")}
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    path.write_text(f"#!/bin/sh\n{exports}exec {shlex.join(qemu.argv())} \"$@\"\n")
    path.chmod(0o755)
    return path


def _domain_xml(name: str, work: Path, image: GuestImage, emulator: Path, sock: Path, qmp: Path) -> str:
    ET.register_namespace("qemu", libvirt.QEMU_NS)
    dom = ET.fromstring(libvirt.render(str(sock), "vxpu0", 512, domain=name, kernel=str(image.kernel),
                                       initrd=str(image.initrd), emulator=str(emulator), qmp=str(qmp)))
    cmdline = dom.find("os/cmdline")
    assert cmdline is not None and cmdline.text
    cmdline.text += " quiet " + encode_cmd("python3 -m vxpu.guest.selftest --watch-hotplug 600")
    devices = dom.find("devices")
    assert devices is not None
    for tag in ("serial", "console"):  # the console goes to a file the test reads
        el = devices.find(tag)
        assert el is not None
        devices.remove(el)
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(work / "console.log"))
    ET.SubElement(serial, "target", port="0")
    return ET.tostring(dom, encoding="unicode")


def _wait_line(path: Path, marker: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if line.startswith(marker):
                return line[len(marker):].strip()
        time.sleep(0.2)
    raise AssertionError(f"no {marker!r} on the console within {timeout:.0f}s:\n"
                         f"{path.read_text(errors='replace')[-3000:] if path.exists() else '(no console)'}")


def test_libvirt_domain_boots_with_a_vxpu_device(libvirtd: None, qemu_binary: QemuBinary,
                                                 guest_image: GuestImage) -> None:
    work = Path(tempfile.mkdtemp(prefix="vxlv-", dir="/tmp"))
    name = f"vxpu-e2e-{os.getpid()}"
    sock, qmp = work / "vxpu0.sock", work / "dom.qmp"
    env = {**os.environ, "VXPU_RUNTIME_DIR": str(work / "rt")}
    (work / "domain.xml").write_text(_domain_xml(name, work, guest_image, _wrapper(qemu_binary, work / "qemu"),
                                                 sock, qmp))
    server = ServerProcess(sock, work / "server.log", ["--device", "test"]).start()
    try:
        _virsh("define", str(work / "domain.xml"))
        started = _virsh("start", name, check=False)
        qemu_log = Path(f"/var/log/libvirt/qemu/{name}.log")
        assert started.returncode == 0, started.stderr + (qemu_log.read_text() if qemu_log.exists() else "")
        result = json.loads(_wait_line(work / "console.log", "VXPU-SELFTEST", BOOT_TIMEOUT_S))
        assert result["ok"], json.dumps(result, indent=1) + server.log_tail()

        def vxpu(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "vxpu", *args, "--qmp", str(qmp), "--json"], env=env,
                                  capture_output=True, text=True, timeout=60, check=False)
        attached = vxpu("attach", "--device", "test", "--id", "vxpu1")
        assert attached.returncode == 0, attached.stderr
        rows = {r["id"]: r["health"] for r in json.loads(vxpu("ls").stdout)}
        assert rows == {"vxpu0": "unmanaged", "vxpu1": "ok"}
        detached = vxpu("detach", "--id", "vxpu1")
        assert detached.returncode == 0 and json.loads(detached.stdout)["server"] == "terminated", detached
    finally:
        _virsh("destroy", name, check=False)
        _virsh("undefine", name, check=False)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
