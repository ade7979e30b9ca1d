"""``vxpu image build`` and ``vxpu vm run``: provision QEMU and the guest, boot VMs.

``vxpu vm run --selftest`` starts a vxpu server with the **test device** on a temporary socket,
boots the guest with it attached, runs ``python3 -m vxpu.guest.selftest`` inside it (identity,
BARs, registers, DMA both ways, MSI), prints the result readably, and exits 0 only if every
check passed. The accelerator's demo is ``vxpu demo`` (:mod:`vxpu.images.demo`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SELFTEST_CMD = "python3 -m vxpu.guest.selftest"
SELFTEST_LINE = r"^VXPU-SELFTEST (\{.*\})$"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    image = sub.add_parser("image", help="QEMU and guest image provisioning")
    image_sub = image.add_subparsers(dest="image_command", metavar="ACTION")
    build = image_sub.add_parser("build", help="fetch QEMU (if needed) and build the guest image (cached)")
    build.add_argument("--force", action="store_true", help="rebuild the guest base image even if cached")
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.add_argument("--qemu", help="QEMU binary to use (default: $VXPU_QEMU, system, cached or fetched)")
    build.set_defaults(func=cmd_image_build)

    vm = sub.add_parser("vm", help="boot the guest image")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="ACTION")
    run = vm_sub.add_parser("run", help="boot a VM with a vxpu device (serial console on this terminal)")
    run.add_argument("--selftest", action="store_true",
                     help="serve the test device and run the guest's register/DMA/MSI self-test (exit 0 = passed)")
    run.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--socket", help="attach the vxpu server already listening here (default: start one)")
    run.add_argument("--no-device", action="store_true", help="boot without a vxpu device")
    run.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                     help="auto tries KVM and falls back to TCG if it fails (default)")
    run.add_argument("--memory", default="512M", help="guest RAM (default 512M)")
    run.add_argument("--cmd", help="shell command to run in the guest, then power off (default: a shell)")
    run.add_argument("--file", action="append", default=[], metavar="PATH",
                     help="copy this host file into the guest's /root for this boot (repeatable), "
                          "e.g. --file examples/guest/saxpy.py --cmd 'python3 /root/saxpy.py --vm'")
    run.add_argument("--qemu", help="QEMU binary to use (default: $VXPU_QEMU, system, cached or fetched)")
    run.add_argument("--timeout", type=float, default=300.0, help="seconds before the VM is killed (default 300)")
    run.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                     help="extra argument for the started 'vxpu serve' (repeatable)")
    run.set_defaults(func=cmd_vm_run)


def cmd_image_build(args: argparse.Namespace) -> int:
    from vxpu.images.guest import build_image
    from vxpu.images.qemu import find_qemu

    quiet = bool(args.json)
    qemu = find_qemu(args.qemu, quiet=quiet)
    image = build_image(force=args.force, quiet=quiet)
    if args.json:
        print(json.dumps({"qemu": {"path": str(qemu.path), "version": qemu.version_str, "source": qemu.source,
                                   "argv_prefix": list(qemu.argv_prefix)}, "image": image.to_json()}, indent=2))
    else:
        print(f"QEMU {qemu.version_str} ({qemu.source}): {qemu.path}")
        print(f"kernel: {image.kernel}\ninitrd: {image.initrd}")
        print("packages: " + ", ".join(image.packages))
    return 0


def _describe(check: dict[str, Any]) -> str:
    name = check["name"]
    if "error" in check:
        return check["error"]
    if name == "identity":
        return f"{check['bdf']}  {check['vendor']:04x}:{check['device']:04x}  class {check['class']:06x}"
    if name == "bars":
        return f"BAR0 {check['bar0_size']} B, BAR2 {check['bar2_size']} B (64-bit prefetchable)"
    if name == "capabilities":
        return "capabilities " + ", ".join(f"{cid:#04x}@{off:#x}" for cid, off in check["caps"])
    if name == "registers":
        return f"MAGIC {check['magic']:#010x}, VERSION {check['version']:#010x}, SCRATCH read back"
    if name.startswith("dma"):
        return (f"{check['length']} B at guest-physical {check['address']:#x}: CRC32 device "
                f"{check['crc_device']:#010x} / guest {check['crc_guest']:#010x}, fill {check['fill_ok']}, "
                f"invert {check['invert_ok']}")
    if name == "msi":
        return (f"vector {check['vector']:#x}: {check['delivered']}/{check['raised']} interrupts delivered, "
                f"latency {check.get('latency_ms')} ms")
    return json.dumps(check)


def print_selftest(result: dict[str, Any], out: Any = sys.stdout) -> None:
    """Print a selftest result document as a readable table."""
    checks = result.get("checks", [])
    if "error" in result:
        print(f"  FAIL  {result['error']}", file=out)
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['name']:<13} {_describe(c)}  ({c['ms']} ms)", file=out)
    passed = sum(1 for c in checks if c["ok"])
    print(f"{'PASS' if result.get('ok') else 'FAIL'}: {passed}/{len(checks)} checks passed in the guest, "
          f"RESET_COUNT {result.get('reset_count')}", file=out)


def _stream_until_exit(vm: Any, timeout: float) -> int:
    from vxpu.images.errors import VmError

    printed = 0
    deadline = time.monotonic() + timeout
    while True:
        text = vm.console.text
        if len(text) > printed:
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
        if vm.proc.poll() is not None:
            return vm.proc.returncode
        problem = vm.problem()
        if problem or time.monotonic() > deadline:
            raise VmError(problem or f"the guest did not power off within {timeout:.0f}s", vm.log_tail())
        time.sleep(0.05)


def _guest_files(paths: list[str]) -> dict[str, bytes]:
    """``--file`` arguments as ``{"root/<name>": bytes}``.

    Raises:
        VmError: a file is missing, or two share a name.
    """
    from vxpu.images.errors import VmError

    files: dict[str, bytes] = {}
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise VmError(f"--file {name}: no such file on this host")
        if f"root/{path.name}" in files:
            raise VmError(f"--file {name}: another --file is also named {path.name}; rename one")
        files[f"root/{path.name}"] = path.read_bytes()
    return files


def cmd_vm_run(args: argparse.Namespace) -> int:
    from vxpu.images.errors import VmError
    from vxpu.images.guest import current_image
    from vxpu.images.qemu import find_qemu
    from vxpu.images.vm import Vm, VmSpec
    from vxpu.qmp.devices import vfio_user_device
    from vxpu.qmp.server import ServerProcess

    if not args.debug:  # qemu.qmp logs its own ERROR lines for failures we report anyway
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    if args.demo:
        raise VmError("'vxpu vm run --demo' is now 'vxpu demo' (the accelerator computing in a guest); "
                      "the test device's self-test is 'vxpu vm run --selftest'")
    if args.selftest and (args.cmd or args.no_device or args.socket):
        raise VmError("--selftest starts its own test-device server and payload: drop --cmd, --no-device and --socket")
    extra = _guest_files(args.file)
    qemu = find_qemu(args.qemu)
    image = current_image()
    cmd = SELFTEST_CMD if args.selftest else args.cmd
    workdir = Path(tempfile.mkdtemp(prefix="vxpu-vm-"))
    server = None
    try:
        devices = []
        if not args.no_device:
            sock = Path(args.socket) if args.socket else workdir / "vxpu0.sock"
            if not args.socket:
                server_args = ["--device", "test", *args.server_arg] if args.selftest else args.server_arg
                server = ServerProcess(sock, workdir / "server.log", server_args).start()
            devices.append(vfio_user_device("vxpu0", sock))
        spec = VmSpec(cmd=cmd, memory=args.memory, accel=args.accel, devices=devices, stdio_console=cmd is None,
                      extra_files=extra)
        try:
            return _run_vm(args, Vm(qemu, image, spec, workdir), server)
        except VmError as exc:
            if server is not None:
                raise VmError(f"{exc}\n--- vxpu server log ---\n{server.log_tail()}") from exc
            raise
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _run_vm(args: argparse.Namespace, vm: Any, server: Any) -> int:
    """Boot ``vm`` and run the interactive shell, the --cmd payload or the self-test."""
    from vxpu.images.vm import accel_line

    cmd = SELFTEST_CMD if args.selftest else args.cmd
    qemu = vm.qemu
    t0 = time.monotonic()
    with vm:
        accel = accel_line(vm.accel, vm.kvm_note)
        qmp = vm.release_monitor()  # QMP takes one client: leave it to vxpu attach/ls/detach
        print(f"vxpu: QMP socket {qmp} (vxpu attach/ls/detach --qmp {qmp})", file=sys.stderr)
        if not args.selftest:
            print(f"vxpu: QEMU {qemu.version_str} ({qemu.source}), accel {accel}", file=sys.stderr)
        if cmd is None:
            return vm.wait_exit(args.timeout)
        if not args.selftest:
            _stream_until_exit(vm, args.timeout)
            return vm.payload_status() if vm.payload_status() is not None else 1
        m = vm.console.wait_for(SELFTEST_LINE, args.timeout, vm.problem)
        result = json.loads(m.group(1))
        vm.wait_exit(30)
    print(f"vxpu selftest: guest booted and ran the test-device self-test in {time.monotonic() - t0:.1f} s "
          f"(QEMU {qemu.version_str}, {accel})")
    print_selftest(result)
    if server is not None and not server.alive():
        print("FAIL: the vxpu server died during the run:\n" + server.log_tail(), file=sys.stderr)
        return 1
    if not result.get("ok") and server is not None:
        print("--- vxpu server log ---\n" + server.log_tail(), file=sys.stderr)
    return 0 if result.get("ok") else 1
