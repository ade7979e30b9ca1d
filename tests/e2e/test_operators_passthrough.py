"""Host VFIO passthrough with vxpu's own code on a real kernel: inside a q35 guest with an
emulated IOMMU (``intel-iommu``), an e1000e NIC (driver e1000e) and QEMU's ``edu`` device (no
driver) are bound to vfio-pci by :func:`vxpu.qmp.passthrough.bind`; ``/dev/vfio/<group>``
appears; :func:`~vxpu.qmp.passthrough.unbind` gives each back to its original driver and the
node goes away. A NIC whose interface is up is refused, as the host's own NIC would be.

The guest image carries no kernel modules, so the test appends a small initramfs with the
vfio modules (and e1000e) from the image's own kernel package, decompressed, plus vxpu's
passthrough module and the guest script.
"""

from __future__ import annotations

import dataclasses
import io
import json
import lzma
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from vxpu.images.cpio import CpioWriter
from vxpu.images.guest import GuestImage
from vxpu.images.qemu import QemuBinary, cache_dir
from vxpu.images.vm import Vm, VmSpec

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT_S = float(os.environ.get("VXPU_E2E_BOOT_TIMEOUT", "180"))
# insmod order (each after its dependencies, from the modules' own "depends=")
MODULES = ("virt/lib/irqbypass.ko", "drivers/vfio/vfio.ko", "drivers/vfio/vfio_iommu_type1.ko",
           "drivers/vfio/pci/vfio-pci-core.ko", "drivers/vfio/pci/vfio-pci.ko",
           "drivers/net/ethernet/intel/e1000e/e1000e.ko")
QMP_FILES = ("qmp/__init__.py", "qmp/errors.py", "qmp/passthrough.py", "qmp/runtime.py", "qmp/cli.py")
CLI_FILES = ("vxpu/__init__.py", "vxpu/__main__.py", "vxpu/cli.py", "vxpu/log.py")  # 'python3 -m vxpu' in the guest
SITE = "usr/lib/python3/dist-packages/vxpu"

GUEST_SCRIPT = r'''
import json, os, subprocess, sys, time
from pathlib import Path
from vxpu.qmp import passthrough as pt
from vxpu.qmp.errors import PassthroughError

out = {}
for ko in sys.argv[1:]:
    r = subprocess.run(["insmod", ko], capture_output=True, text=True)
    out.setdefault("insmod", []).append([os.path.basename(ko), r.returncode, r.stderr.strip()])

def find(vendor, device):
    for dev in sorted(Path("/sys/bus/pci/devices").iterdir()):
        if (dev / "vendor").read_text().strip() == vendor and (dev / "device").read_text().strip() == device:
            return dev
    raise SystemExit(f"no {vendor}:{device}")

def settle(dev, want, timeout=10.0):
    end = time.monotonic() + timeout
    while pt.driver_of(dev) != want and time.monotonic() < end:
        time.sleep(0.05)
    return pt.driver_of(dev)

for name, (vendor, device, driver) in {"e1000e": ("0x8086", "0x10d3", "e1000e"),
                                       "edu": ("0x1234", "0x11e8", None)}.items():
    dev = find(vendor, device)
    doc = {"bdf": dev.name, "driver_before": settle(dev, driver)}
    if name == "e1000e":
        iface = sorted((dev / "net").iterdir())[0].name
        subprocess.run(["ip", "link", "set", iface, "up"], check=True)
        try:
            pt.bind(dev.name)
            doc["refused_while_up"] = None
        except PassthroughError as exc:
            doc["refused_while_up"] = str(exc)
        cli = subprocess.run([sys.executable, "-m", "vxpu", "passthrough", "bind", dev.name],
                             capture_output=True, text=True)
        doc["cli_refusal"] = [cli.returncode, cli.stderr]
        subprocess.run(["ip", "link", "set", iface, "down"], check=True)
        plan = pt.bind(dev.name)
    else:  # the edu device goes through the command line, as an operator types it
        cli = subprocess.run([sys.executable, "-m", "vxpu", "passthrough", "bind", dev.name, "--json"],
                             capture_output=True, text=True)
        doc["cli_bind"] = [cli.returncode, cli.stderr]
        plan = pt.plan_bind(dev.name)
        doc["cli_bind_json"] = json.loads(cli.stdout) if cli.returncode == 0 else None
    doc.update(group=plan.iommu_group, driver_bound=pt.driver_of(dev),
               vfio_node=os.path.exists(plan.vfio_device), remembered=pt.original_driver(dev.name))
    if name == "e1000e":
        doc["driver_after"] = pt.unbind(dev.name)
    else:
        cli = subprocess.run([sys.executable, "-m", "vxpu", "passthrough", "unbind", dev.name, "--json"],
                             capture_output=True, text=True)
        doc["cli_unbind"] = [cli.returncode, cli.stderr]
        doc["driver_after"] = json.loads(cli.stdout)["driver"] if cli.returncode == 0 else "cli failed"
    time.sleep(0.2)
    doc["vfio_node_after"] = os.path.exists(plan.vfio_device)
    out[name] = doc
print("VXPU-PT " + json.dumps(out), flush=True)
'''


def _kernel_deb(image: GuestImage) -> Path:
    pkg = next(p for p in image.packages if p.startswith("linux-image-"))
    name, version = pkg.split("=")
    debs = list((cache_dir() / "apt").rglob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
    if not debs:
        pytest.fail(f"the kernel package {pkg} is not in the apt cache {cache_dir() / 'apt'}; run 'vxpu image build'")
    return debs[0]


def _modules(deb: Path) -> dict[str, bytes]:
    """The MODULES from the kernel package, decompressed (busybox insmod takes plain .ko)."""
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar.getmembers():
            for mod in MODULES:
                if member.name.endswith(f"/kernel/{mod}.xz"):
                    data = tar.extractfile(member)
                    assert data is not None
                    found[mod] = lzma.decompress(data.read())
    missing = set(MODULES) - set(found)
    assert not missing, f"{deb.name} lacks {missing}"
    return found


def _overlay(image: GuestImage, out: Path) -> Path:
    repo = Path(__file__).resolve().parents[2]
    extra = io.BytesIO()
    cpio = CpioWriter(extra)
    for d in ("root", "root/ko", f"{SITE}/qmp"):
        cpio.directory(d)
    for mod, data in _modules(_kernel_deb(image)).items():
        cpio.file(f"root/ko/{Path(mod).name}", data)
    for rel in QMP_FILES:
        cpio.file(f"{SITE}/{rel}", (repo / rel).read_bytes())
    for rel in CLI_FILES:
        cpio.file(f"{SITE}/{rel.removeprefix('vxpu/')}", (repo / rel).read_bytes())
    cpio.file("root/pt_check.py", GUEST_SCRIPT.encode())
    cpio.close()
    out.write_bytes(image.initrd.read_bytes() + extra.getvalue())
    return out


def test_bind_and_unbind_on_a_real_kernel(qemu_binary: QemuBinary, guest_image: GuestImage, tmp_path: Path) -> None:
    image = dataclasses.replace(guest_image, initrd=_overlay(guest_image, tmp_path / "initrd-pt.cpio"))
    kos = " ".join(f"/root/ko/{Path(m).name}" for m in MODULES)
    spec = VmSpec(cmd=f"python3 /root/pt_check.py {kos}", accel="tcg", kernel_args="intel_iommu=on",
                  extra_args=("-machine", "q35", "-device", "intel-iommu,intremap=off",
                              "-device", "e1000e,id=nic0", "-device", "edu,id=edu0"))
    with Vm(qemu_binary, image, spec, tmp_path / "vm") as vm:
        line = vm.console.wait_for(r"^VXPU-PT (\{.*\})$", BOOT_TIMEOUT_S, vm.problem)
        res = json.loads(line.group(1))
        context = json.dumps(res, indent=1) + "\n" + vm.log_tail()
        print("\nguest passthrough result:", json.dumps({k: v for k, v in res.items() if k != "insmod"}))
        assert all(rc == 0 for _, rc, _ in res["insmod"]), context
        nic, edu = res["e1000e"], res["edu"]
        assert nic["driver_before"] == "e1000e", context
        assert "is up" in (nic["refused_while_up"] or ""), context
        for doc, original in ((nic, "e1000e"), (edu, None)):
            assert doc["driver_bound"] == "vfio-pci" and doc["vfio_node"], context
            assert doc["remembered"] == original, context
            assert doc["driver_after"] == original and not doc["vfio_node_after"], context
        assert nic["group"] != edu["group"], context
        code, err = nic["cli_refusal"]
        assert code == 2 and err.count("\n") == 1 and "is up" in err and "Traceback" not in err, context
        assert edu["cli_bind"][0] == 0 and edu["cli_unbind"][0] == 0, context
        assert edu["cli_bind_json"]["original_driver"] is None and edu["cli_bind_json"]["bdf"] == edu["bdf"], context
