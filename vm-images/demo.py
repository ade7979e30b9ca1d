"""``vxpu demo``: from a fresh machine to a Linux guest computing on the host's accelerator.

One command, four steps, each reported on stderr as it happens:

1. find or fetch a QEMU with ``vfio-user-pci`` (:func:`vxpu.images.qemu.find_qemu`);
2. build or reuse the guest image (:func:`vxpu.images.guest.build_image`; cached);
3. start ``vxpu serve --device xpu --backend <backend>`` on a private socket;
4. boot the guest with the device attached and run :data:`GUEST_CMD` in it: the guest program
   (:mod:`vxpu.guest.demo`) drives the accelerator through the SDK, checks every kernel against
   numpy inside the guest and prints one ``VXPU-DEMO {json}`` line, then the guest powers off.

The result is a short table, or with ``--json`` one object on stdout::

    {"ok": bool, "backend": str, "qemu": str,
     "kernels": [{"name": str, "max_rel_err": float, "ok": bool, "guest_ms": float,
                  "device_ms": float, ...}],
     "bandwidth_h2d_gbps": float, "bandwidth_d2h_gbps": float,
     "noop_roundtrip_us": float, "trapped_read_us": float, ...}

The exit status is 0 only when every kernel is correct, the guest program finished and the
server is still alive. The register-and-DMA check of the test device lives on as
``vxpu vm run --selftest``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vxpu.errors import Error

log = logging.getLogger(__name__)

BACKENDS = ("cpu", "cuda", "hip", "npu")
GUEST_CMD = "python3 -m vxpu.guest.demo --json"
RESULT_LINE = r"^VXPU-DEMO (\{.*\})$"
SERVER_DEVICE = "xpu"
MIN_MEMORY_MIB = 256
STEPS = 4


class DemoError(Error):
    """The demo could not run (bad option, no QEMU, the guest never reported)."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="boot a VM with a vxpu accelerator and compute in it (the README's first command)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cpu", metavar="NAME",
                   help=f"accelerator backend on the host: {', '.join(BACKENDS)} (default cpu; cuda[:N]/hip[:N] "
                        "pick a GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress stays on stderr)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="VM accelerator: auto tries KVM and falls back to TCG (default)")
    p.add_argument("--memory", default="1G", help="guest RAM (default 1G)")
    p.add_argument("--qemu", help="QEMU binary (default: $VXPU_QEMU, the system one, cached or fetched)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds the guest may take (default 300)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the started 'vxpu serve' (repeatable)")
    p.set_defaults(func=cmd_demo)


def check_memory(spec: str) -> str:
    """``spec`` if it is a guest RAM size QEMU takes (``768M``, ``2G``) of at least 256 MiB.

    Raises:
        DemoError: it is not; the message says what to write.
    """
    m = re.fullmatch(r"(\d+)([MG])", spec.strip().upper())
    mib = int(m.group(1)) * (1024 if m.group(2) == "G" else 1) if m else 0
    if mib < MIN_MEMORY_MIB:
        raise DemoError(f"--memory {spec!r}: give the guest RAM as <n>M or <n>G, at least {MIN_MEMORY_MIB}M "
                        "(numpy and the DMA huge pages live there); e.g. --memory 1G")
    return f"{m.group(1)}{m.group(2)}" if m else spec


def check_backend(spec: str) -> str:
    """``spec`` if it names a backend (``cuda:1`` included).

    Raises:
        DemoError: it does not; the message lists the choices.
    """
    name, sep, index = spec.partition(":")
    if name not in BACKENDS or (sep and not index.isdigit()):
        raise DemoError(f"unknown backend {spec!r}: use --backend with one of {', '.join(BACKENDS)} "
                        f"(cuda:N / hip:N for GPU N)")
    return spec


class _Steps:
    """Numbered progress lines on stderr, each with its duration."""

    def __init__(self) -> None:
        self.n = 0
        self.t = time.monotonic()
        self.t0 = self.t

    def start(self, what: str) -> None:
        self.n += 1
        self.t = time.monotonic()
        print(f"[{self.n}/{STEPS}] {what} ...", file=sys.stderr, flush=True)

    def done(self, what: str) -> None:
        print(f"[{self.n}/{STEPS}] {what} ({time.monotonic() - self.t:.1f} s)", file=sys.stderr, flush=True)


def _guest_image() -> Any:
    """The guest image, built or refreshed; offline (no Debian mirror), the cached one.

    Raises:
        ImageError: no mirror and no cached image.
    """
    from vxpu.images.errors import ImageError
    from vxpu.images.guest import build_image, cached_image

    try:
        return build_image()
    except ImageError as exc:
        image = cached_image()
        if image is None:
            raise
        print(f"vxpu demo: cannot check the guest packages ({str(exc).splitlines()[0][:160]}); "
              f"using the cached image", file=sys.stderr)
        return image


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (see the module docstring); returns the exit status.

    Raises:
        DemoError: a bad option, or the guest did not report a result (with the logs).
        ImageError, VmError: QEMU or the guest image cannot be provided.
    """
    from vxpu.images.qemu import find_qemu

    backend = check_backend(args.backend)
    memory = check_memory(args.memory)
    if not args.debug:
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    steps = _Steps()
    steps.start("QEMU with vfio-user-pci")
    qemu = find_qemu(args.qemu)
    steps.done(f"QEMU {qemu.version_str} ({qemu.source})")
    steps.start("guest image (Debian kernel, python3.13, numpy, vxpu guest SDK)")
    image = _guest_image()
    steps.done(f"guest image {image.initrd.name} ({image.initrd.stat().st_size / 1e6:.0f} MB)")
    workdir = Path(tempfile.mkdtemp(prefix="vxpu-demo-"))
    try:
        result = _run(args, backend, memory, qemu, image, workdir, steps)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - steps.t0, 2)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_result(result)
    return 0 if result["ok"] else 1


def _start_server(args: argparse.Namespace, backend: str, workdir: Path) -> Any:
    """``vxpu serve`` with the accelerator on ``backend``.

    Raises:
        DemoError: it did not start; one line with the server's own reason.
    """
    from vxpu.qmp.errors import ServerError
    from vxpu.qmp.server import ServerProcess

    server = ServerProcess(workdir / "vxpu0.sock", workdir / "server.log",
                           ["--device", SERVER_DEVICE, "--backend", backend, *args.server_arg])
    try:
        return server.start()
    except ServerError:
        lines = [ln for ln in server.log_tail().splitlines() if "error" in ln.lower()] or ["(no log)"]
        reason = lines[-1].split("error: ", 1)[-1]
        fix = ("run on a host with that accelerator, or use --backend cpu" if "--backend" in reason
               else "fix the --server-arg values (see 'vxpu serve --help')")
        raise DemoError(f"the vxpu server did not start: {reason}; {fix}") from None


def _run(args: argparse.Namespace, backend: str, memory: str, qemu: Any, image: Any, workdir: Path,
         steps: _Steps) -> dict[str, Any]:
    from vxpu.images.errors import VmError
    from vxpu.images.vm import Vm, VmSpec
    from vxpu.qmp.devices import vfio_user_device

    steps.start(f"vxpu server, {backend} backend")
    sock = workdir / "vxpu0.sock"
    server = _start_server(args, backend, workdir)
    try:
        steps.done(f"vxpu server listening ({backend})")
        steps.start("booting the guest and running 'python3 -m vxpu.guest.demo' in it")
        spec = VmSpec(cmd=GUEST_CMD, memory=memory, accel=args.accel,
                      devices=[vfio_user_device("vxpu0", sock)])
        vm = Vm(qemu, image, spec, workdir)
        t0 = time.monotonic()
        try:
            with vm:
                m = vm.console.wait_for(RESULT_LINE, args.timeout, vm.problem)
                guest = json.loads(m.group(1))
                vm.wait_exit(30)
        except VmError as exc:
            raise DemoError(f"the guest did not finish the demo: {exc}\n--- vxpu server log ---\n"
                            f"{server.log_tail()}") from exc
        boot_s = time.monotonic() - t0
        steps.done(f"guest finished under {vm.accel}")
        alive = server.alive()
        tail = "" if alive and guest.get("ok") else server.log_tail()
    finally:
        server.stop()
    result = {"ok": bool(guest.get("ok")) and alive, "backend": backend,
              "qemu": f"{qemu.version_str} ({qemu.source})", "accel": vm.accel, "kvm_note": vm.kvm_note,
              "guest_s": round(boot_s, 2),
              **{k: v for k, v in guest.items() if k != "ok"}}
    if not alive:
        result["error"] = "the vxpu server died during the run"
    if tail:
        result["server_log_tail"] = tail[-3000:]
    return result


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 and spec == ".1e" else format(value, spec)


def print_result(r: dict[str, Any], out: Any = sys.stdout) -> None:
    """Print a demo result as a short table."""
    from vxpu.images.vm import accel_line

    print(f"vxpu demo: the host's {r['backend']} backend ({r.get('device', '?')}) computing for a guest under "
          f"QEMU {r['qemu']}, accel {accel_line(r.get('accel', '?'), r.get('kvm_note', ''))}", file=out)
    print(f"  time     {r.get('guest_s', 0):.1f} s from QEMU start to power-off, {r.get('wall_s', 0):.1f} s in all",
          file=out)
    print(f"  {'':4}  {'kernel':<8} {'problem':<22} {'guest ms':>9} {'device ms':>10}  {'max rel err':>11}", file=out)
    kernels = r.get("kernels", [])
    for k in kernels:
        mark = "ok" if k.get("ok") else "FAIL"
        print(f"  {mark:<4}  {k['name']:<8} {k.get('shape', ''):<22} {_fmt(k.get('guest_ms'), '.2f'):>9} "
              f"{_fmt(k.get('device_ms'), '.3f'):>10}  {_fmt(k.get('max_rel_err'), '.1e'):>11}"
              + (f"  {k['error']}" if k.get("error") else ""), file=out)
    if "bandwidth_h2d_gbps" in r:
        print(f"  copies   guest RAM -> device {r['bandwidth_h2d_gbps']:.2f} GB/s, device -> guest RAM "
              f"{r['bandwidth_d2h_gbps']:.2f} GB/s ({r.get('bandwidth_bytes', 0) >> 20} MiB)", file=out)
    if "noop_roundtrip_us" in r:
        print(f"  latency  ring no-op round trip {r['noop_roundtrip_us']:.1f} us; trapped BAR0 read "
              f"{r['trapped_read_us']:.1f} us", file=out)
    if r.get("error"):
        print(f"  error    {r['error']}", file=out)
    if any("UNSUPPORTED" in (k.get("error") or "") for k in kernels):
        print(f"  note     UNSUPPORTED: the {r['backend']} backend cannot run that IR kernel (an NPU runs only "
              "kernels that lower to tensor ops); --backend cpu or cuda runs all four", file=out)
    good = sum(1 for k in kernels if k.get("ok"))
    print(f"{'PASS' if r['ok'] else 'FAIL'}: {good}/{len(kernels)} kernels correct in the guest", file=out)
    if r.get("server_log_tail"):
        print("--- vxpu server log ---\n" + r["server_log_tail"], file=sys.stderr)
