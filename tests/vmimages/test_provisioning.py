"""Unit tests of the provisioning logic: newc cpio, mirror detection, apt/QEMU error messages,
the QEMU command line. Real downloads and boots are in tests/e2e."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest
from vxpu.images import apt, guest, qemu
from vxpu.images.cpio import CpioWriter
from vxpu.images.errors import ImageError
from vxpu.images.vm import Vm, VmSpec
from vxpu.qmp.devices import vfio_user_device


def _parse_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """(name, mode, data, rdevmajor, rdevminor) per entry, checking the 4-byte alignment."""
    out, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701" and pos % 4 == 0
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos:pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append((name, f[1], body, f[9], f[10]))


def test_cpio_tree_symlinks_and_device_nodes(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/busybox").write_bytes(b"\x7fELF" + bytes(7))
    (tmp_path / "usr/bin/busybox").chmod(0o755)
    (tmp_path / "usr/bin/sh").symlink_to("busybox")
    (tmp_path / "bin").symlink_to("usr/bin")
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.char_device("dev/console", 5, 1)
    w.tree(tmp_path)
    w.close()
    w.close()  # idempotent
    entries = {name: (mode, body, maj, mnr) for name, mode, body, maj, mnr in _parse_newc(buf.getvalue())}
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2:] == (5, 1)
    assert stat.S_ISLNK(entries["bin"][0]) and entries["bin"][1] == b"usr/bin"
    assert stat.S_ISLNK(entries["usr/bin/sh"][0]) and entries["usr/bin/sh"][1] == b"busybox"
    assert stat.S_ISDIR(entries["usr/bin"][0])
    assert entries["usr/bin/busybox"][1] == b"\x7fELF" + bytes(7)
    assert stat.S_IMODE(entries["usr/bin/busybox"][0]) == 0o755
    names = [n for n, *_ in _parse_newc(buf.getvalue())]
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/busybox")


def test_cpio_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        w = CpioWriter(buf)
        w.tree(tmp_path)
        w.close()
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]


def test_host_mirror_from_deb822_and_one_line_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VXPU_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n")
    assert apt.host_debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb [arch=amd64] https://other.example/debian bookworm main\n")
    assert apt.host_debian_mirror(tmp_path) == "https://other.example/debian"
    monkeypatch.setenv("VXPU_DEBIAN_MIRROR", "http://override.example/debian/")
    assert apt.host_debian_mirror(tmp_path) == "http://override.example/debian"


def test_host_mirror_falls_back_on_non_debian_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VXPU_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list").write_text("deb http://archive.ubuntu.com/ubuntu noble main\n")
    assert apt.host_debian_mirror(tmp_path) == apt.DEFAULT_MIRROR


def test_missing_apt_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("VXPU_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VXPU_QEMU", raising=False)
    with pytest.raises(ImageError, match="install apt or set VXPU_QEMU=/path"):
        qemu.fetch_qemu(quiet=True)


def test_missing_keyring_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="apt-get install debian-archive-keyring"):
        apt.AptRepo(tmp_path, keyring=tmp_path / "nope.gpg")


def _fake_qemu(path: Path, version: str, devices: str) -> Path:
    path.write_text(f"#!/bin/sh\ncase \"$*\" in *--version*) echo 'QEMU emulator version {version}';;\n"
                    f"*) echo '{devices}';; esac\n")
    path.chmod(0o755)
    return path


def test_configured_qemu_is_validated(tmp_path: Path) -> None:
    good = _fake_qemu(tmp_path / "good", "11.1.3 (Debian)", 'name "vfio-user-pci", bus PCI')
    b = qemu.from_path(good)
    assert b.version == (11, 1, 3) and b.argv("-m", "1G") == [str(good), "-m", "1G"]
    old = _fake_qemu(tmp_path / "old", "9.2.0", 'name "vfio-user-pci", bus PCI')
    with pytest.raises(ImageError, match="vxpu needs >= 10.1"):
        qemu.from_path(old)
    nodev = _fake_qemu(tmp_path / "nodev", "10.1.0", 'name "virtio-net-pci"')
    with pytest.raises(ImageError, match="without vfio-user-pci"):
        qemu.from_path(nodev)
    with pytest.raises(ImageError, match="does not exist"):
        qemu.from_path(tmp_path / "missing")


def test_env_var_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VXPU_QEMU", str(_fake_qemu(tmp_path / "q", "10.1.0", '"vfio-user-pci"')))
    assert qemu.find_qemu(fetch=False).source == "config"


def test_payload_command_round_trips_through_base64() -> None:
    import base64
    param = guest.encode_cmd("python3 -c 'print(\"a b\")'; echo $?")
    key, value = param.split("=", 1)
    assert key == guest.CMDLINE_KEY and " " not in value
    assert base64.b64decode(value).decode() == "python3 -c 'print(\"a b\")'; echo $?"


def test_guest_overlay_carries_the_guest_package_and_abi() -> None:
    files = guest.guest_files()
    site = "usr/lib/python3/dist-packages/vxpu"
    for rel in ("__init__.py", "errors.py", "guest/selftest.py", "guest/pci.py", "abi/testdev.py"):
        assert f"{site}/{rel}" in files


def test_qemu_command_line(tmp_path: Path) -> None:
    binary = qemu.QemuBinary(Path("/q"), (11, 1, 3), ("/ld.so", "/q", "-L", "/share"), "debian")
    image = guest.GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd.cpio", tmp_path / "vmlinux", (), "k", "o")
    spec = VmSpec(cmd="true", memory="256M", devices=[vfio_user_device("vxpu0", "/s.sock")])
    vm = Vm(binary, image, spec, tmp_path / "vm")
    argv = vm.argv("tcg")
    assert argv[:4] == ["/ld.so", "/q", "-L", "/share"]
    assert argv[argv.index("-object") + 1] == "memory-backend-memfd,id=mem,size=256M,share=on"
    assert argv[argv.index("-machine") + 1] == "pc,memory-backend=mem"
    assert json.loads(argv[argv.index("-device") + 1]) == {
        "driver": "vfio-user-pci", "id": "vxpu0", "socket": {"type": "unix", "path": "/s.sock"}}
    assert "-no-reboot" in argv and argv[argv.index("-kernel") + 1].endswith("vmlinux")
    assert "panic=-1" in argv[argv.index("-append") + 1]
    assert vm.argv("kvm")[vm.argv("kvm").index("-kernel") + 1].endswith("vmlinuz")
    assert "-no-reboot" not in Vm(binary, image, VmSpec(reboot=True), tmp_path / "vm2").argv("tcg")


def test_console_waits_in_order_and_reports_failures(tmp_path: Path) -> None:
    from vxpu.images.errors import VmError
    from vxpu.images.vm import Console

    log = tmp_path / "console.log"
    log.write_bytes(b"boot\r\nVXPU-EVENT 1\r\nVXPU-EVENT 2\r\n")
    con = Console(log)
    assert con.wait_for(r"^VXPU-EVENT (\d)$", 1).group(1) == "1"
    assert con.wait_for(r"^VXPU-EVENT (\d)$", 1).group(1) == "2"
    with pytest.raises(VmError, match="QEMU exited with status 1") as exc:
        con.wait_for(r"^VXPU-EVENT (\d)$", 5, lambda: "QEMU exited with status 1")
    assert "VXPU-EVENT 2" in exc.value.log_tail
    with pytest.raises(VmError, match="did not appear within 0s"):
        con.wait_for("never", 0.1)


def test_unreachable_mirror_names_the_fix(tmp_path: Path) -> None:
    repo = apt.AptRepo(tmp_path, mirror="http://127.0.0.1:9/debian", quiet=True, retries=0,
                         offline_fix=", or set VXPU_QEMU")
    with pytest.raises(ImageError, match="Check the network.*VXPU_DEBIAN_MIRROR.*or set VXPU_QEMU"):
        repo.update()


def test_qemu_tests_skip_only_when_disabled_explicitly() -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/e2e", "-rs"],
                         cwd=root, capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "VXPU_SKIP_QEMU": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert " passed" not in res.stdout and " skipped" in res.stdout
    assert "disabled by VXPU_SKIP_QEMU=1" in res.stdout
