"""``vxpu attach``, ``vxpu detach`` and ``vxpu passthrough``: control devices of a running VM.

``attach`` hot-plugs a vfio-user-pci device into a QEMU reachable on a QMP socket, optionally
starting its ``vxpu serve`` process first (left running, pid in ``<socket>.pid``); ``detach``
unplugs it and can stop that server; ``passthrough`` binds a host PCI device to vfio-pci and,
given a QMP socket, hot-plugs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    att = sub.add_parser("attach", help="hot-plug a vxpu (vfio-user-pci) device into a running VM")
    att.add_argument("--qmp", required=True, help="the VM's QMP Unix socket")
    att.add_argument("--socket", required=True, help="the vxpu server's vfio-user socket")
    att.add_argument("--id", default="vxpu0", help="QEMU device id (default vxpu0)")
    att.add_argument("--start-server", action="store_true",
                     help="start 'vxpu serve' on --socket first (stays running; pid in SOCKET.pid)")
    att.add_argument("--server-arg", action="append", default=[], metavar="ARG", help="extra 'vxpu serve' argument")
    att.set_defaults(func=cmd_attach)

    det = sub.add_parser("detach", help="hot-unplug a device from a running VM (waits for DEVICE_DELETED)")
    det.add_argument("--qmp", required=True, help="the VM's QMP Unix socket")
    det.add_argument("--id", default="vxpu0", help="QEMU device id (default vxpu0)")
    det.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the guest (default 10)")
    det.add_argument("--stop-server", metavar="SOCKET", help="also stop the server started by attach on SOCKET")
    det.set_defaults(func=cmd_detach)

    pt = sub.add_parser("passthrough", help="bind a host PCI device to vfio-pci (and hot-plug it with --qmp)")
    pt.add_argument("bdf", help="host PCI address, e.g. 0000:01:00.0")
    pt.add_argument("--qmp", help="hot-plug into the VM behind this QMP socket")
    pt.add_argument("--id", default="hostdev0", help="QEMU device id (default hostdev0)")
    pt.add_argument("--dry-run", action="store_true", help="only print the checks' result and the sysfs writes")
    pt.add_argument("--unbind", action="store_true", help="give the device back to its host driver")
    pt.set_defaults(func=cmd_passthrough)


def _pidfile(sock: str | Path) -> Path:
    return Path(f"{sock}.pid")


def cmd_attach(args: argparse.Namespace) -> int:
    from vxpu.qmp.devices import attach
    from vxpu.qmp.monitor import Monitor
    from vxpu.qmp.server import ServerProcess

    server = None
    if args.start_server:
        server = ServerProcess(args.socket, args=args.server_arg).start()
    try:
        with Monitor(args.qmp) as mon:
            attach(mon, args.id, args.socket)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    if server is not None and server.proc is not None:
        _pidfile(args.socket).write_text(str(server.proc.pid))
        print(f"vxpu server pid {server.proc.pid} serving {args.socket} (log {server.log_path})")
    print(f"attached {args.id}")
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    from vxpu.qmp.devices import detach
    from vxpu.qmp.monitor import Monitor

    from vxpu.errors import ConfigError

    with Monitor(args.qmp) as mon:
        detach(mon, args.id, args.timeout)
    print(f"detached {args.id}")
    if args.stop_server:
        pidfile = _pidfile(args.stop_server)
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no server pid in {pidfile}; was it started with 'vxpu attach --start-server'?") from exc
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            log.info("server pid %d had already exited", pid)
        pidfile.unlink(missing_ok=True)
        print(f"stopped vxpu server pid {pid}")
    return 0


def cmd_passthrough(args: argparse.Namespace) -> int:
    from vxpu.qmp import passthrough as pt
    from vxpu.qmp.monitor import Monitor

    if args.unbind:
        writes = pt.plan_unbind(args.bdf)
        if not args.dry_run:
            pt.apply(writes)
        print("\n".join(f"{w.path} <- {w.value!r}" for w in writes))
        return 0
    if args.dry_run:
        plan = pt.plan_bind(args.bdf)
        print(json.dumps({"bdf": plan.bdf, "iommu_group": plan.iommu_group, "driver": plan.current_driver,
                          "vfio_device": plan.vfio_device,
                          "writes": [[str(w.path), w.value] for w in plan.writes]}, indent=2))
        return 0
    if args.qmp:
        with Monitor(args.qmp) as mon:
            plan = pt.attach_host_device(mon, args.bdf, args.id)
        print(f"{plan.bdf} bound to vfio-pci (group {plan.iommu_group}) and attached as {args.id}")
    else:
        plan = pt.bind_vfio(args.bdf)
        print(f"{plan.bdf} bound to vfio-pci; give QEMU "
              f"-device '{json.dumps(pt.passthrough_device(plan.bdf, args.id))}' (needs {plan.vfio_device})")
    return 0
