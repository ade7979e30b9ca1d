"""``vxpu attach``, ``detach``, ``ls``, ``passthrough`` and ``libvirt-xml``: devices of running VMs.

``attach`` starts a managed ``vxpu serve`` and hot-plugs its device into the VM behind a QMP
socket; ``detach`` unplugs it and stops the server; ``ls`` lists a VM's vxpu devices with their
health; ``passthrough`` binds a host PCI device to vfio-pci (and back) and hot-plugs it;
``libvirt-xml`` prints the domain XML that gives a libvirt VM a vxpu device.

Output: a line per result, or one JSON document with ``--json``. Errors are one line naming the
fix (``vxpu: error: ...``; with ``--json`` a ``{"error": ..., "kind": ...}`` document on stdout),
exit status 2; an unplug the guest did not complete exits 3 (the device and its server stay).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from vxpu.errors import Error

log = logging.getLogger(__name__)

EXIT_ERROR = 2
EXIT_UNPLUG_TIMEOUT = 3
BACKEND_HELP = "accelerator backend: cpu (default), cuda[:N], hip[:N] or npu"


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make usage mistakes print one line naming the fix (not the whole usage block)."""
    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message} (see '{parser.prog} --help')", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    parser.error = error  # type: ignore[method-assign]


def _backend(spec: str) -> str:
    from vxpu.qmp.lifecycle import check_backend

    from vxpu.errors import ConfigError

    try:
        return check_backend(spec)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give seconds between 0 and 3600")
    return value


def _add(sub: argparse._SubParsersAction, name: str, help: str,  # type: ignore[type-arg]
         func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    _one_line_errors(p)
    return p


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``attach``, ``detach``, ``ls``, ``passthrough`` and ``libvirt-xml``."""
    att = _add(sub, "attach", "start a vxpu server and hot-plug its device into a running VM", cmd_attach)
    att.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP Unix socket")
    att.add_argument("--backend", default="cpu", type=_backend, metavar="SPEC", help=BACKEND_HELP)
    att.add_argument("--id", help="QEMU device id (default: the first free vxpuN)")
    att.add_argument("--bus", help="QEMU bus to plug into (default: a free hot-pluggable slot)")
    att.add_argument("--device", help="the server's device model ('vxpu serve --device'; default: its default)")
    att.add_argument("--quota", action="append", default=[], metavar="NAME=VALUE",
                     help="per-guest limit for the server (repeatable; 'vxpu serve --quota', e.g. memory_bytes=1073741824)")
    att.add_argument("--allow-native", action="append", default=[], metavar="KIND",
                     help="let the guest load native modules of this kind (repeatable; 'vxpu serve --allow-native')")
    att.add_argument("--json", action="store_true", help="print the handle as JSON")

    det = _add(sub, "detach", "hot-unplug a vxpu device and stop its server", cmd_detach)
    det.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP Unix socket")
    det.add_argument("--id", required=True, help="the device id ('vxpu ls' lists them)")
    det.add_argument("--timeout", type=_positive, default=10.0, metavar="S",
                     help="seconds to wait for the guest to release the device (default 10)")
    det.add_argument("--json", action="store_true", help="print the result as JSON")

    ls = _add(sub, "ls", "list a VM's vxpu devices: backend, server pid, health, slot", cmd_ls)
    ls.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP Unix socket")
    ls.add_argument("--json", action="store_true", help="print a JSON list")

    pt = _add(sub, "passthrough", "classic VFIO: give a host PCI device to a VM (vfio-pci)", _no_action)
    pt_sub = pt.add_subparsers(dest="pt_action", metavar="ACTION")
    bind = _add(pt_sub, "bind", "bind a host device to vfio-pci (checks IOMMU, group, host use)", cmd_pt_bind)
    bind.add_argument("bdf", help="host PCI address, e.g. 0000:01:00.0")
    bind.add_argument("--force", action="store_true", help="take it even though the host uses it")
    bind.add_argument("--dry-run", action="store_true", help="only check and print the sysfs writes")
    unbind = _add(pt_sub, "unbind", "give a device back to the driver it had before 'bind'", cmd_pt_unbind)
    unbind.add_argument("bdf", help="host PCI address")
    attach = _add(pt_sub, "attach", "bind (if needed) and hot-plug a host device into a VM", cmd_pt_attach)
    attach.add_argument("bdf", help="host PCI address")
    attach.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP Unix socket")
    attach.add_argument("--id", default="hostdev0", help="QEMU device id (default hostdev0)")
    attach.add_argument("--force", action="store_true", help="take it even though the host uses it")
    detach = _add(pt_sub, "detach", "hot-unplug a passthrough device (and --unbind it)", cmd_pt_detach)
    detach.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP Unix socket")
    detach.add_argument("--id", required=True, help="the device id")
    detach.add_argument("--timeout", type=_positive, default=10.0, metavar="S", help="seconds (default 10)")
    detach.add_argument("--unbind", action="store_true", help="then give the device back to its original host driver")
    for p in (bind, unbind, attach, detach):
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    lx = _add(sub, "libvirt-xml", "print libvirt domain XML that gives a VM a vxpu device", cmd_libvirt_xml)
    lx.add_argument("--socket", required=True, metavar="PATH", help="the vxpu server's vfio-user socket")
    lx.add_argument("--id", default="vxpu0", help="QEMU device id (default vxpu0)")
    lx.add_argument("--memory", default="1024", metavar="MIB", help="guest RAM in MiB (default 1024)")
    lx.add_argument("--domain", metavar="NAME", help="print a whole bootable domain with this name")
    lx.add_argument("--kernel", help="with --domain: kernel to boot directly")
    lx.add_argument("--initrd", help="with --domain: initramfs")
    lx.add_argument("--emulator", help="with --domain: the QEMU binary")
    lx.add_argument("--qmp", metavar="PATH", help="also give QEMU a QMP socket here, for 'vxpu attach --qmp PATH'")


def _no_action(args: argparse.Namespace) -> int:
    print("vxpu passthrough: error: give an action: bind, unbind, attach or detach "
          "(see 'vxpu passthrough --help')", file=sys.stderr)
    return EXIT_ERROR


def _run(args: argparse.Namespace, work: Callable[[], Any], show: Callable[[Any], str]) -> int:
    """Run ``work`` (a coroutine factory or plain callable); print its result or its error."""
    from vxpu.qmp.errors import UnplugTimeout

    if not getattr(args, "debug", False):  # qemu.qmp logs its own ERROR lines for failures we report
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = work()
        if isinstance(result, Coroutine):
            import asyncio  # only the QMP commands need it (sysfs-only passthrough also runs in a minimal guest)

            result = asyncio.run(result)
    except Error as exc:
        code = EXIT_UNPLUG_TIMEOUT if isinstance(exc, UnplugTimeout) else EXIT_ERROR
        if args.debug:
            log.exception("command failed")
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc), "kind": type(exc).__name__, "exit": code}))
        else:
            print(f"vxpu: error: {exc}", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(_jsonable(result), indent=2) if getattr(args, "json", False) else show(result))
    return 0


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # asyncio.run cancels the task, whose clean-up stops a half-started server


def _jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value.to_json() if hasattr(value, "to_json") else value


def cmd_attach(args: argparse.Namespace) -> int:
    from vxpu.qmp import lifecycle

    extra = [a for q in args.quota for a in ("--quota", q)] + [a for k in args.allow_native for a in ("--allow-native", k)]
    return _run(args, lambda: lifecycle.attach(args.qmp, args.backend, args.id, args.bus, device=args.device,
                                               server_args=extra),
                lambda a: f"attached {a.id} at {a.slot} (bus {a.bus}): server pid {a.pid}, backend {a.backend}, "
                          f"socket {a.socket}, log {a.log}")


def cmd_detach(args: argparse.Namespace) -> int:
    from vxpu.qmp import lifecycle

    def show(d: Any) -> str:
        server = {"none": "no vxpu server", "gone": f"its server pid {d.pid} had already exited (stale record "
                  "removed)"}.get(d.server, f"server pid {d.pid} {d.server}")
        return f"detached {d.id}{'' if d.unplugged else ' (was not in the VM)'}: {server}"
    return _run(args, lambda: lifecycle.detach(args.qmp, args.id, args.timeout), show)


def cmd_ls(args: argparse.Namespace) -> int:
    from vxpu.qmp import lifecycle

    def show(rows: list[Any]) -> str:
        if not rows:
            return "no vxpu devices"
        lines = [f"{'ID':<12} {'SLOT':<9} {'BACKEND':<8} {'PID':>7}  HEALTH"]
        hints = {"server-exited": "server died: 'vxpu detach --id {id}' cleans up",
                 "not-in-vm": "server without its device: 'vxpu detach --id {id}' stops it",
                 "stats-stale": "server stuck: see its log"}
        for r in rows:
            hint = hints.get(r.health, "").format(id=r.id)
            st = r.stats
            figures = (f"  commands {st['commands']}, errors {st['errors']}, fatal {st['fatal_errors']}, "
                       f"queue {st['queue_depth']}" if st else "")
            lines.append(f"{r.id:<12} {r.slot or '-':<9} {r.backend or '-':<8} {r.pid or '-':>7}  {r.health}"
                         + figures + (f"  ({hint})" if hint else ""))
        return "\n".join(lines)
    return _run(args, lambda: lifecycle.list_devices(args.qmp), show)


def cmd_pt_bind(args: argparse.Namespace) -> int:
    from vxpu.qmp import passthrough as pt

    if args.dry_run:
        return _run(args, lambda: pt.plan_bind(args.bdf, force=args.force),
                    lambda p: "\n".join([f"{p.bdf}: IOMMU group {p.iommu_group}, driver {p.current_driver}"]
                                        + [f"  {w.path} <- {w.value}" for w in p.writes]))
    return _run(args, lambda: pt.bind(args.bdf, force=args.force),
                lambda p: f"{p.bdf} bound to vfio-pci (was {p.current_driver or 'unbound'}); QEMU opens "
                          f"{p.vfio_device}")


def cmd_pt_unbind(args: argparse.Namespace) -> int:
    from vxpu.qmp import passthrough as pt

    def work() -> dict[str, Any]:
        return {"bdf": pt.normalize_bdf(args.bdf), "driver": pt.unbind(args.bdf)}
    return _run(args, work, lambda r: f"{r['bdf']} given back to {r['driver'] or 'no driver'}")


def cmd_pt_attach(args: argparse.Namespace) -> int:
    from vxpu.qmp import passthrough as pt
    from vxpu.qmp.lifecycle import session

    async def work() -> dict[str, Any]:
        async with session(args.qmp) as q:
            plan = await pt.attach_host(q, args.bdf, args.id, force=args.force)
        return {**plan.to_json(), "id": args.id}
    return _run(args, work, lambda r: f"{r['bdf']} bound to vfio-pci (group {r['iommu_group']}) and attached as "
                                      f"{r['id']}")


def cmd_pt_detach(args: argparse.Namespace) -> int:
    from vxpu.qmp import passthrough as pt
    from vxpu.qmp.lifecycle import session

    async def work() -> dict[str, Any]:
        async with session(args.qmp) as q:
            bdf = await pt.detach_host(q, args.id, args.timeout)
        driver = pt.unbind(bdf) if args.unbind else None
        return {"id": args.id, "bdf": bdf, "unbound": args.unbind, "driver": driver}
    return _run(args, work, lambda r: f"detached {r['id']} ({r['bdf']})" + (
        f"; given back to {r['driver'] or 'no driver'}" if r["unbound"] else ""))


def cmd_libvirt_xml(args: argparse.Namespace) -> int:
    from vxpu.qmp import libvirt

    return _run(args, lambda: libvirt.render(args.socket, args.id, args.memory, domain=args.domain,
                                             kernel=args.kernel, initrd=args.initrd, emulator=args.emulator,
                                             qmp=args.qmp),
                lambda xml: xml.rstrip("\n"))
