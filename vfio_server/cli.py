"""``vxpu serve``: run one vfio-user device server (one process per device per VM).

::

    vxpu serve --socket /run/vxpu/vu0.sock [--device xpu|test] [--backend cpu|cuda[:N]|hip[:N]|npu] [--msix]
               [--allow-unsealed-ram] [--compile-workers N] [--compile-memory MIB] [--compile-cpu S]
               [--compile-timeout S] [--compile-idle S]

The default device is the accelerator (``xpu``, 0x5850:0x0100, docs/device-abi.md §4) on the
CPU backend; ``--device test`` serves the test device (0x5850:0x0001) instead. Guest IR is
compiled in sandboxed worker processes (:mod:`vxpu.ir.workers`, docs/ir-lowering.md §6); the
``--compile-*`` flags set their number and limits (default: ``VXPU_COMPILE_*``, else 2 workers,
2 GiB, 10 CPU-s, 20 s).

The process listens on ``--socket`` (mode 0600; a stale socket is replaced), serves one QEMU
connection at a time and keeps serving across disconnects (hot re-plug), until SIGTERM or
SIGINT, when it closes the connection, removes the socket and exits 0. SIGUSR1 writes every
thread's Python stack to stderr (:mod:`faulthandler`, even while the interpreter is stuck): the
QMP helpers send it before they SIGKILL a server that ignored SIGTERM, so its log shows where it
hung. Logging goes through :mod:`vxpu.log` (``vxpu --log-format json serve ...`` for one JSON
object per line).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vxpu.errors import ConfigError, Error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceKind:
    """A device model ``vxpu serve --device`` can run."""

    help: str
    factory: Callable[[argparse.Namespace, Any], Any]   # (args, backend or None) -> VfioDevice
    needs_backend: bool


def _test_device(args: argparse.Namespace, _backend: Any) -> Any:
    from vxpu.vfio_server.testdev import TestDevice
    return TestDevice(msix=args.msix)


def _xpu_device(args: argparse.Namespace, backend: Any) -> Any:
    from vxpu.accel.backend import ModuleKind
    from vxpu.vfio_server.xpu import XpuDevice
    kinds = frozenset({ModuleKind.IR} | {ModuleKind(k) for k in args.allow_native or ()})
    return XpuDevice(backend, quota_from_args(args), allowed_kinds=kinds, msix=args.msix,
                     poll_idle_us=getattr(args, "poll_idle_us", None),
                     fastlane=None if getattr(args, "fastlane", None) is None else args.fastlane == "on")


def _on_off(text: str) -> str:
    """``--fastlane`` (or ``VXPU_FASTLANE``): on/off, also 1/0, yes/no, true/false."""
    word = text.strip().lower()
    if word in ("on", "1", "yes", "true"):
        return "on"
    if word in ("off", "0", "no", "false"):
        return "off"
    raise argparse.ArgumentTypeError(f"{text!r} is neither on nor off (from --fastlane or VXPU_FASTLANE)")


def _poll_idle_us(text: str) -> int:
    """``--poll-idle-us``: microseconds, 0 to 1,000,000."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1000000 microseconds")
    return value


def quota_from_args(args: argparse.Namespace) -> Any:
    """The per-guest :class:`~vxpu.accel.quota.Quota` with the ``--quota NAME=VALUE`` overrides.

    Raises:
        ConfigError: a malformed item, an unknown limit or a value that is not a positive integer.
    """
    from vxpu.accel.quota import DEFAULT_QUOTA
    limits: dict[str, int] = {}
    for item in args.quota or ():
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ConfigError(f"--quota {item!r}: expected NAME=INTEGER, e.g. memory_bytes=1073741824")
        limits[name.strip()] = int(value)
    try:
        return DEFAULT_QUOTA.with_overrides(**limits)
    except ValueError as exc:
        raise ConfigError(f"--quota: {exc}") from None


DEFAULT_DEVICE = "xpu"
DEVICES: dict[str, DeviceKind] = {
    "xpu": DeviceKind("the vxpu accelerator (command rings in guest RAM, kernels on --backend)", _xpu_device, True),
    "test": DeviceKind("the vxpu test device (registers, DMA, interrupts; no accelerator)", _test_device, False),
}


def register(subparsers: Any) -> None:
    """Add the ``serve`` sub-command."""
    p = subparsers.add_parser("serve", help="serve one vfio-user device on a Unix socket",
                              description="Serve one vfio-user device for QEMU's vfio-user-pci.")
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on (created mode 0600)")
    p.add_argument("--device", default=DEFAULT_DEVICE, choices=sorted(DEVICES),
                   help=f"device model (default: {DEFAULT_DEVICE}). " + "; ".join(f"{k}: {v.help}" for k, v in DEVICES.items()))
    p.add_argument("--backend", default="cpu", metavar="SPEC",
                   help="accelerator backend: cpu (default), cuda[:N], hip[:N] or npu")
    p.add_argument("--msix", action="store_true",
                   help="also offer an MSI-X capability (default: MSI only). Warning: QEMU 11.1.3 aborts the "
                        "whole VM when a device with MSI-X is hot-unplugged (device_del); use it only for "
                        "cold-plugged devices")
    p.add_argument("--allow-unsealed-ram", action="store_true",
                   help="accept guest RAM whose file cannot be sealed against shrinking (memory-backend-file, "
                        "hugetlbfs, memory-backend-memfd seal=off). By default such DMA maps are refused, "
                        "because a peer shrinking the file under the server's mapping would crash it with "
                        "SIGBUS; QEMU's memory-backend-memfd is sealed by default and always accepted")
    g = p.add_argument_group("compile workers (guest IR is compiled in these; defaults from VXPU_COMPILE_*)")
    g.add_argument("--compile-workers", type=int, metavar="N",
                   help="worker processes (default 2; 0 compiles in this process: trusted guests only)")
    g.add_argument("--compile-memory", type=int, metavar="MIB", help="address space per worker (default 2048)")
    g.add_argument("--compile-cpu", type=int, metavar="SECONDS", help="CPU time per compile (default 10)")
    g.add_argument("--compile-timeout", type=float, metavar="SECONDS",
                   help="wall-clock deadline per compile (default 20)")
    g.add_argument("--compile-idle", type=float, metavar="SECONDS",
                   help="stop a worker idle this long; the next compile starts one (default 300; 0: never)")
    p.add_argument("--quota", action="append", metavar="NAME=VALUE",
                   help="a per-guest limit of the accelerator (repeatable): memory_bytes, max_allocations, "
                        "max_allocation_bytes, modules, module_bytes, kernels, queues, events, queue_depth, "
                        "compile_seconds (vxpu.accel.quota.Quota)")
    p.add_argument("--allow-native", action="append", choices=["ptx", "cubin", "hsaco", "onnx"],
                   help="let the guest load native modules of this kind (repeatable; unchecked code, off by "
                        "default); the backend must support the kind too")
    p.add_argument("--poll-idle-us", type=_poll_idle_us, metavar="US", default=os.environ.get("VXPU_POLL_IDLE_US"),
                   help="accelerator: longest idle spin of the queue poller after recent submissions, in "
                        "microseconds (adaptive between 200 and this; default 5000, 2000 on two cores or fewer, or VXPU_POLL_IDLE_US; "
                        "0: sleep at once, for hosts without a core to spare)")
    p.add_argument("--fastlane", type=_on_off, choices=["on", "off"], default=os.environ.get("VXPU_FASTLANE"),
                   help="accelerator: run LAUNCH, NOP, inline copies and FENCE natively on their success path "
                        "(C, built at first use with the system cc; GPU backends only). Default: on where it "
                        "builds, unless VXPU_FASTLANE=0")
    p.add_argument("--stats-file", metavar="PATH",
                   help="keep the device's STATS JSON in PATH (written at start and every 2 s, atomically; "
                        "the accelerator only)")
    p.set_defaults(func=serve)


def _configure_compiles(args: argparse.Namespace) -> None:
    try:
        from vxpu.ir import workers
    except ImportError:        # no IR compiler installed: IR loads will say so
        return
    workers.configure(*compile_config(args))


def compile_config(args: argparse.Namespace) -> tuple[int, Any]:
    """The compile pool's size and :class:`~vxpu.ir.workers.WorkerLimits`: the environment's
    (``VXPU_COMPILE_*``), overridden by the ``--compile-*`` flags.

    Raises:
        ConfigError: a value that is not positive (or a negative worker count).
    """
    from vxpu.ir.workers import WorkerLimits, config_from_env

    try:
        size, limits = config_from_env()
        if args.compile_workers is not None:
            size = args.compile_workers
        limits = WorkerLimits(
            args.compile_memory << 20 if args.compile_memory is not None else limits.memory_bytes,
            args.compile_cpu if args.compile_cpu is not None else limits.cpu_seconds,
            args.compile_timeout if args.compile_timeout is not None else limits.wall_seconds,
            args.compile_idle if args.compile_idle is not None else limits.idle_seconds)
    except ValueError as exc:
        raise ConfigError(f"compile workers: {exc}") from None
    if size < 0:
        raise ConfigError(f"--compile-workers must be 0 or more, got {size}")
    return size, limits


def _open_backend(spec: str, needed: bool) -> Any:
    """Check the spec always; open the backend only for devices that use one.

    Raises:
        ConfigError: a malformed spec or a backend that cannot be opened (the reason is kept).
    """
    try:
        from vxpu.accel import registry
    except ImportError as exc:
        if needed:
            raise ConfigError(f"--backend {spec}: the accelerator layer is not installed ({exc})") from None
        return None
    try:
        if not needed:
            registry.parse_spec(spec)
            return None
        return registry.open_backend(spec)
    except Error as exc:       # BackendUnavailable and friends: report, don't trace
        raise ConfigError(f"--backend {spec}: {exc}") from None


def _stats_file(args: argparse.Namespace, device: Any) -> Any:
    """Start the --stats-file writer for a device that has statistics (None otherwise)."""
    path = getattr(args, "stats_file", None)
    if not path:
        return None
    source = getattr(device, "stats_document", None)
    if not callable(source):
        log.warning("device %r has no statistics; --stats-file is ignored", args.device)
        return None
    from vxpu.vfio_server.xpu.stats import StatsFile
    return StatsFile(path, source).start()


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT. Returns the exit status.

    Raises:
        ConfigError: bad socket path, a live server already on it, or an unusable backend.
    """
    from vxpu.vfio_server.server import VfioUserServer

    kind = DEVICES[args.device]
    if kind.needs_backend:
        quota_from_args(args)                            # a bad --quota fails before anything opens
        _configure_compiles(args)
    backend = _open_backend(args.backend, kind.needs_backend)
    if args.backend != "cpu" and not kind.needs_backend:
        log.warning("device %r uses no accelerator; --backend %s is ignored", args.device, args.backend)
    device = kind.factory(args, backend)
    server = VfioUserServer(args.socket, device, require_sealed_ram=not args.allow_unsealed_ram)
    stats_file = _stats_file(args, device)              # written once before the socket listens
    server.bind()

    def _stop(signum: int, _frame: object) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        server.stop()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    server.wake_on_signals()                            # a signal taken by another thread too
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log.info("serving", extra={"device": args.device, "socket": args.socket, "msix": args.msix,
                               "backend": args.backend})
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        faulthandler.unregister(signal.SIGUSR1)
        if stats_file is not None:
            stats_file.stop()
        close_device = getattr(device, "close", None)
        if callable(close_device):
            close_device()
        close = getattr(backend, "close", None)
        if callable(close):
            close()
    return 0
