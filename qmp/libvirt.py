"""libvirt domain XML for a VM with a vxpu device.

libvirt has no vfio-user device type, so the device reaches QEMU through
``<qemu:commandline>`` as a JSON ``-device`` (the only form QEMU 11 accepts for
``vfio-user-pci``). The server DMAs straight into guest RAM, which therefore has to be a
shared memfd: ``<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>``
makes libvirt start QEMU with ``memory-backend-memfd,share=on``. The ``vxpu serve`` process is
started beside the domain (a systemd unit, or ``vxpu serve --socket ...``) before the domain
starts; libvirt does not manage it.

A second QMP monitor (``-qmp unix:PATH,server=on,wait=off``) can be added through the same
``<qemu:commandline>``, so ``vxpu attach/detach/ls --qmp PATH`` work on a libvirt domain
while libvirt keeps its own monitor.

:func:`render` returns either the snippet to paste into an existing domain or, with
``domain=``, a whole domain that boots a kernel directly (what CI validates with
``virt-xml-validate``).
"""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET

from vxpu.qmp.devices import vfio_user_device

from vxpu.errors import ConfigError

log = logging.getLogger(__name__)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_EMULATOR = "/usr/bin/qemu-system-x86_64"


def _memory_backing() -> ET.Element:
    backing = ET.Element("memoryBacking")
    ET.SubElement(backing, "source", type="memfd")
    ET.SubElement(backing, "access", mode="shared")
    return backing


def _commandline(socket_path: str, dev_id: str, qmp: str | None) -> ET.Element:
    cmd = ET.Element(f"{{{QEMU_NS}}}commandline")
    args = ["-device", json.dumps(vfio_user_device(dev_id, socket_path), separators=(",", ":"))]
    if qmp:
        args += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    for arg in args:
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    return cmd


def _domain(name: str, memory_mib: int, kernel: str | None, initrd: str | None, emulator: str | None,
            socket_path: str, dev_id: str, qmp: str | None) -> ET.Element:
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    dom.append(_memory_backing())
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    if kernel:
        ET.SubElement(os_el, "kernel").text = kernel
        if initrd:
            ET.SubElement(os_el, "initrd").text = initrd
        ET.SubElement(os_el, "cmdline").text = "console=ttyS0 panic=-1"
    features = ET.SubElement(dom, "features")  # ACPI: hot-plug on pc goes through it (acpiphp)
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "cpu", mode="maximum", check="none")  # TCG: qemu64 lacks RDRAND, Python stalls in getrandom
    ET.SubElement(dom, "on_reboot").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = emulator or DEFAULT_EMULATOR
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "console", type="pty")
    dom.append(_commandline(socket_path, dev_id, qmp))
    return dom


def _tostring(el: ET.Element) -> str:
    """Serialize ``el``; attribute values holding JSON get single quotes instead of ``&quot;``."""
    ET.indent(el)
    text = ET.tostring(el, encoding="unicode")
    return re.sub(r'value="([^"\']*&quot;[^"\']*)"', lambda m: "value='" + m.group(1).replace("&quot;", '"') + "'",
                  text)


def render(socket_path: str, dev_id: str = "vxpu0", memory_mib: int | str = 1024, *, domain: str | None = None,
           kernel: str | None = None, initrd: str | None = None, emulator: str | None = None,
           qmp: str | None = None) -> str:
    """The XML that gives a libvirt domain a vxpu device served on ``socket_path``.

    Args:
        socket_path: the ``vxpu serve`` socket (absolute).
        dev_id: the QEMU device id.
        memory_mib: guest RAM (only with ``domain``).
        domain: if given, a whole domain with this name; otherwise the snippet to paste.
        kernel, initrd, emulator: direct kernel boot and QEMU binary for the whole domain.
        qmp: also give QEMU a second QMP socket here, for ``vxpu attach --qmp``.

    Raises:
        ConfigError: a relative socket path or a bad memory size.
    """
    if not socket_path.startswith("/"):
        raise ConfigError(f"--socket {socket_path!r} must be absolute: QEMU runs from libvirt's directory")
    try:
        mib = int(memory_mib)
    except ValueError:
        raise ConfigError(f"--memory {memory_mib!r} is not a number of MiB (e.g. 1024)") from None
    if mib < 64:
        raise ConfigError(f"--memory {mib} MiB is too small; give at least 64")
    ET.register_namespace("qemu", QEMU_NS)
    if domain:
        return _tostring(_domain(domain, mib, kernel, initrd, emulator, socket_path, dev_id, qmp)) + "\n"
    backing = _tostring(_memory_backing())
    cmdline = _tostring(_commandline(socket_path, dev_id, qmp)).replace(f' xmlns:qemu="{QEMU_NS}"', "")
    return (f"<!-- add to <domain>: xmlns:qemu='{QEMU_NS}' -->\n"
            f"<!-- inside <domain>, shared memfd guest RAM for the server's DMA: -->\n{backing}\n"
            f"<!-- at the end of <domain>, the device (start 'vxpu serve --socket {socket_path}' first): -->\n"
            f"{cmdline}\n")
