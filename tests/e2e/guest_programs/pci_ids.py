"""Guest program: find the accelerator when QEMU overrides its PCI IDs (x-pci-device-id), with the
test device (same class, same BAR0 magic) attached beside it. Prints ``VXPU-IDS {json}``."""

import json
import os

from vxpu.guest.errors import DeviceNotFound
from vxpu.guest.pci import SYSFS_PCI
from vxpu.guest.sdk import Device
from vxpu.guest.vmtransport import VmTransport, find_function

from vxpu.abi import xpu

doc = {"functions": [f"{p.name} {(p / 'vendor').read_text().strip()}:{(p / 'device').read_text().strip()}"
                     for p in sorted(SYSFS_PCI.iterdir())]}
try:
    fn = find_function()             # the ABI's IDs are not there: the class-0x12 probe must pick the right one
    doc["fallback"] = {"bdf": fn.bdf, "ids": f"{fn.vendor:04x}:{fn.device:04x}"}
    with Device(VmTransport(fn)) as dev:
        doc["fallback"]["nop"] = dev.call(xpu.Opcode.NOP) == (0, 0)
except DeviceNotFound as exc:
    doc["fallback"] = {"error": str(exc)}
os.environ["VXPU_PCI_ID"] = doc["fallback"].get("ids", "5850:4242")
with Device.open() as dev:               # the override path, as a user would set it
    doc["by_env"] = {"bdf": dev.transport.bdf, "nop": dev.call(xpu.Opcode.NOP) == (0, 0)}
print("VXPU-IDS " + json.dumps(doc), flush=True)
