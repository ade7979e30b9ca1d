"""``vxpu libvirt-xml``: the domain XML is what libvirt's schema accepts (virt-xml-validate) and
carries the shared memfd backing and the JSON vfio-user device."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from vxpu.qmp import libvirt

from vxpu.errors import ConfigError

SOCK = "/run/vxpu/vm-demo/vxpu0.sock"
Q = "{" + libvirt.QEMU_NS + "}"
VALIDATOR = shutil.which("virt-xml-validate")
needs_validator = pytest.mark.skipif(
    VALIDATOR is None or shutil.which("xmllint") is None,
    reason="virt-xml-validate/xmllint not installed (apt-get install libvirt-clients libxml2-utils)")


def _domain(**kw: str) -> str:
    return libvirt.render(SOCK, "vxpu0", 512, domain="vxpu-demo", kernel="/boot/vmlinuz", initrd="/boot/initrd",
                          emulator="/usr/bin/qemu-system-x86_64", **kw)


def test_domain_has_memfd_shared_backing_and_the_json_device() -> None:
    dom = ET.fromstring(_domain(qmp="/run/vxpu/vm-demo.qmp"))
    backing = dom.find("memoryBacking")
    assert backing is not None
    assert backing.find("source").get("type") == "memfd" and backing.find("access").get("mode") == "shared"
    args = [a.get("value") for a in dom.find(f"{Q}commandline").findall(f"{Q}arg")]
    assert args[0] == "-device"
    assert json.loads(args[1]) == {"driver": "vfio-user-pci", "id": "vxpu0",
                                   "socket": {"type": "unix", "path": SOCK}}
    assert args[2:] == ["-qmp", "unix:/run/vxpu/vm-demo.qmp,server=on,wait=off"]


def test_snippet_names_the_namespace_and_the_server() -> None:
    text = libvirt.render(SOCK)
    assert libvirt.QEMU_NS in text and f"vxpu serve --socket {SOCK}" in text
    assert "<source type=\"memfd\" />" in text and "\"path\":\"" + SOCK in text


@pytest.mark.parametrize(("sock", "mem", "why"), [("rel.sock", 512, "must be absolute"),
                                                  (SOCK, "lots", "not a number"), (SOCK, 16, "too small")])
def test_bad_input_names_the_fix(sock: str, mem: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        libvirt.render(sock, "vxpu0", mem, domain="d")  # type: ignore[arg-type]


@needs_validator
def test_domain_validates_against_libvirt_schema(tmp_path: Path) -> None:
    good = tmp_path / "domain.xml"
    good.write_text(_domain(qmp="/run/vxpu/vm-demo.qmp"))
    res = subprocess.run([VALIDATOR, str(good), "domain"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "bad.xml"  # the validator is strict: a misspelt qemu:arg attribute fails
    bad.write_text(good.read_text().replace("<qemu:arg value=", "<qemu:arg valu=", 1))
    res = subprocess.run([VALIDATOR, str(bad), "domain"], capture_output=True, text=True, check=False)
    assert res.returncode != 0


@needs_validator
def test_cli_output_validates(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vxpu", "libvirt-xml", "--socket", SOCK, "--domain", "d1",
                          "--kernel", "/k", "--initrd", "/i"], capture_output=True, text=True, check=True).stdout
    (tmp_path / "d1.xml").write_text(out)
    res = subprocess.run([VALIDATOR, str(tmp_path / "d1.xml"), "domain"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_docs_show_what_the_command_prints() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs/libvirt.md").read_text()
    blocks = re.findall(r"```xml\n(.*?)```", doc, re.DOTALL)
    assert blocks[0] == libvirt.render("/run/vxpu/vm1/vxpu0.sock", qmp="/run/vxpu/vm1.qmp")
    assert blocks[1] == libvirt.render("/run/vxpu/vm1/vxpu0.sock", "vxpu0", 1024, domain="vm1",
                                       kernel="/var/lib/vxpu/vmlinuz", initrd="/var/lib/vxpu/initrd.cpio",
                                       qmp="/run/vxpu/vm1.qmp")
