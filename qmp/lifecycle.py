"""Attach, detach and list vxpu devices of a running VM: the operator's lifecycle, async.

``attach`` starts one ``vxpu serve`` per device (ARCHITECTURE decision 4) in the runtime
directory, waits until it listens, hot-plugs a ``vfio-user-pci`` on a free slot and confirms
the device in ``query-pci``. ``detach`` unplugs it, waits for ``DEVICE_DELETED`` and stops the
server. The record in :mod:`vxpu.qmp.runtime` ties them together across processes.

Ordering rules that keep failures clean:

* QMP is connected (and so known to be usable) before any server starts, so a dead or held
  QMP socket never leaves a server behind.
* The record is written right after the server is spawned, so even a ``kill -9`` of the caller
  leaves a server that ``vxpu ls`` reports and ``vxpu detach`` stops.
* Any failure or cancellation before the device is in the VM stops the server and removes the
  socket and the record; the log stays for the error message.
* A server is never stopped while its device is still in the VM: QEMU aborts the VM at its next
  memory-map change when a vfio-user server disappears. A detach the guest does not complete
  leaves the server running and raises :class:`~vxpu.qmp.errors.UnplugTimeout`.

Every function takes ``qmp`` as a socket path (it connects and disconnects) or an open
:class:`~vxpu.qmp.connection.Qmp`. :mod:`vxpu.qmp.sync` has the synchronous wrappers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeAlias

from vxpu.qmp.connection import Qmp
from vxpu.qmp.devices import DRIVER, vfio_user_device
from vxpu.qmp.errors import (
    IdInUse,
    NoFreeSlot,
    QmpBusy,
    QmpError,
    QmpUnreachable,
    UnknownDevice,
    UnplugTimeout,
)
from vxpu.qmp.runtime import DeviceRecord, VmState, check_id, process_alive, server_listening
from vxpu.qmp.server import STOP_GRACE_S, spawn_server, stop_server, wait_listening
from vxpu.qmp.slots import choose_bus, locate

from vxpu.errors import ConfigError, Error

log = logging.getLogger(__name__)

QmpLike: TypeAlias = str | Path | Qmp
_BACKEND = re.compile(r"^(cpu|npu|(cuda|hip)(:\d{1,3})?)$")
SERVER_START_TIMEOUT_S = 20.0
STATS_STALE_S = 15.0
LOCK_WAIT_S = 60.0  # how long a vxpu command queues behind another one on the same VM  # the server rewrites its STATS every ~2 s
_UNPLUG_PENDING = "already in the process of unplug"


@dataclass(frozen=True)
class Attached:
    """The handle :func:`attach` returns."""

    id: str
    pid: int
    socket: str
    log: str
    slot: str
    bus: str
    backend: str
    qmp: str
    seconds: float

    def to_json(self) -> dict[str, object]:
        """The handle as a JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class Detached:
    """What :func:`detach` did.

    Attributes:
        server: ``terminated``, ``killed``, ``gone`` (had died: a stale record), or ``none``
            (the device had no vxpu server record).
        unplugged: the device was in the VM and the guest released it.
    """

    id: str
    server: str
    pid: int | None
    unplugged: bool
    seconds: float

    def to_json(self) -> dict[str, object]:
        """The result as a JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class DeviceInfo:
    """One row of :func:`list_devices`.

    Attributes:
        health: ``ok``; ``server-exited`` (the record's server died: detach cleans it up);
            ``not-in-vm`` (a server without its device, e.g. an interrupted attach);
            ``not-listening`` (the server runs but its socket does not listen); ``stats-stale``
            (the server runs but has not rewritten its STATS for :data:`STATS_STALE_S`: it is
            stuck); ``unmanaged`` (a vfio-user-pci device vxpu did not attach, so no server is known).
        stats: a summary of the server's STATS document (see :func:`stats_summary`), when it
            writes one.
    """

    id: str
    backend: str | None
    pid: int | None
    health: str
    slot: str | None
    socket: str | None
    log: str | None
    stats: dict[str, Any] | None = None

    def to_json(self) -> dict[str, object]:
        """The row as a JSON-able dict."""
        return asdict(self)


def check_backend(spec: str) -> str:
    """Return ``spec`` if it is ``cpu``, ``npu``, ``cuda[:N]`` or ``hip[:N]``.

    Raises:
        ConfigError: anything else.
    """
    if not _BACKEND.match(spec):
        raise ConfigError(f"backend {spec!r} is not one of cpu, cuda[:N], hip[:N], npu (e.g. --backend cuda:0)")
    return spec


@asynccontextmanager
async def session(qmp: QmpLike) -> AsyncIterator[Qmp]:
    """Use ``qmp`` if it is open, else connect to the socket path for the block's duration."""
    if isinstance(qmp, Qmp):
        yield qmp
        return
    conn = await Qmp.open(qmp)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def vm_locked(state: VmState, wait: float = LOCK_WAIT_S) -> AsyncIterator[None]:
    """Hold the VM's lock (see :mod:`vxpu.qmp.runtime`) for the block; wait up to ``wait`` seconds.

    Raises:
        QmpBusy: another vxpu command kept the VM for ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    while (fd := state.try_lock()) is None:
        if time.monotonic() > deadline:
            raise QmpBusy(f"another vxpu command (pid {state.lock_holder()}) has been working on this VM for "
                          f"{wait:.0f}s; wait for it to finish, or stop it")
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        os.close(fd)


def _used(conn: Qmp, given: QmpLike) -> AbstractAsyncContextManager[Qmp]:
    """``conn`` for a block: closed at its end if it was opened here (not the caller's)."""
    return nullcontext(conn) if conn is given else aclosing(conn)


async def peripherals(qmp: Qmp) -> dict[str, str]:
    """The VM's user-created devices: id -> QOM type (``vfio-user-pci``, ``pcie-root-port`` ...)."""
    out = {}
    for entry in await qmp.execute("qom-list", path="/machine/peripheral"):
        kind = str(entry.get("type", ""))
        if kind.startswith("child<"):
            out[entry["name"]] = kind[6:-1]
    return out


def vm_log(state: VmState) -> logging.Logger:
    """The child logger of one VM (``vxpu.qmp.lifecycle.vm-<hash>``), named like its runtime folder."""
    return log.getChild(state.dir.name)


def _next_id(taken: set[str]) -> str:
    n = 0
    while f"vxpu{n}" in taken:
        n += 1
    return f"vxpu{n}"


async def _check_free(state: VmState, dev_id: str, devices: dict[str, str]) -> None:
    if dev_id in devices:
        raise IdInUse(f"the VM already has a device with id {dev_id!r} ({devices[dev_id]}); choose another "
                      f"--id, or run 'vxpu detach --qmp {state.qmp} --id {dev_id}' first")
    rec = state.read(dev_id)
    if rec is None:
        return
    if process_alive(rec.pid, rec.pid_start):
        raise IdInUse(f"vxpu server pid {rec.pid} is still registered for {dev_id!r} (an interrupted attach?); "
                      f"run 'vxpu detach --qmp {state.qmp} --id {dev_id}' to stop it, or choose another --id")
    vm_log(state).warning("removing the stale record of %s (server pid %d had exited)", dev_id, rec.pid)
    state.remove(dev_id)


async def attach(qmp: QmpLike, backend: str = "cpu", id: str | None = None, bus: str | None = None,
                 *, device: str | None = None, server_args: Sequence[str] = (),
                 start_timeout: float = SERVER_START_TIMEOUT_S) -> Attached:
    """Start a ``vxpu serve`` for a new device and hot-plug it into the VM behind ``qmp``.

    Args:
        qmp: the VM's QMP socket path, or an open :class:`Qmp`.
        backend: the accelerator backend spec (``cpu``, ``cuda[:N]``, ``hip[:N]``, ``npu``).
        id: the QEMU device id (default: the first free ``vxpuN``).
        bus: the bus to plug into (default: a free hot-pluggable slot, see :mod:`vxpu.qmp.slots`).
        device: the server's device model (``vxpu serve --device``; default: its default).
        server_args: further ``vxpu serve`` arguments.
        start_timeout: seconds for the server to listen.

    Raises:
        ConfigError: a bad backend or id.
        QmpUnreachable, QmpBusy: the QMP socket cannot be used (no server is started).
        IdInUse: the id is taken. NoFreeSlot: no hot-pluggable slot.
        ServerError: the server did not start (with the tail of its log).
        QmpError: QEMU refused the device.
    """
    check_backend(backend)
    if id is not None:
        check_id(id)
    t0 = time.monotonic()
    state = VmState(qmp.path if isinstance(qmp, Qmp) else qmp)
    async with vm_locked(state), session(qmp) as q:
        devices = await peripherals(q)
        dev_id = id or _next_id(set(devices) | {r.id for r in state.records()})
        await _check_free(state, dev_id, devices)
        target = bus or await choose_bus(q)
        _, sock, logf = state.paths(dev_id)
        state.ensure_dir()
        args = ["--backend", backend, "--stats-file", str(state.stats_path(dev_id)),
                *(["--device", device] if device else []), *server_args]
        pid, start = spawn_server(sock, logf, args)
        rec = DeviceRecord(id=dev_id, qmp=state.qmp, qemu_pid=q.peer_pid, backend=backend, device=device,
                           pid=pid, pid_start=start, socket=str(sock), log=str(logf), bus=target)
        sent = False
        try:
            state.write(rec)
            await wait_listening(pid, start, sock, logf, start_timeout)
            sent = True
            await _device_add(q, dev_id, sock, target, logf)
        except BaseException as exc:
            if sent and not isinstance(exc, Error):
                # interrupted while QEMU may be adding the device: a server must not vanish under
                # it, so it stays, recorded ('vxpu ls' shows it, 'vxpu detach' resolves it)
                vm_log(state).warning("attach of %s interrupted during device_add; server pid %d stays recorded",
                                      dev_id, pid)
            else:
                stop_server(pid, start)
                state.remove(dev_id, keep_log=True)
            raise
        loc = locate(await q.execute("query-pci"), dev_id)
        if loc is None:
            rec.state = "attached"
            state.write(rec)
            raise QmpError(f"QEMU accepted {dev_id} but query-pci does not list it; the device and its server "
                           f"(pid {pid}) stay, run 'vxpu detach --qmp {state.qmp} --id {dev_id}' to remove them")
        rec.state, rec.slot = "attached", str(loc)
        state.write(rec)
    vm_log(state).info("attached %s at %s (server pid %d, backend %s)", dev_id, loc, pid, backend)
    return Attached(id=dev_id, pid=pid, socket=str(sock), log=str(logf), slot=str(loc), bus=target,
                    backend=backend, qmp=state.qmp, seconds=round(time.monotonic() - t0, 4))


async def _device_add(q: Qmp, dev_id: str, sock: Path, bus: str, logf: Path) -> None:
    try:
        await q.execute("device_add", **vfio_user_device(dev_id, sock, bus=bus))
    except QmpError as exc:
        text = str(exc)
        if "Duplicate" in text or "duplicate" in text:
            raise IdInUse(f"QEMU refused id {dev_id!r}: {text}; choose another --id") from exc
        if "no slot" in text or "all in use" in text:
            raise NoFreeSlot(f"no free slot on bus {bus}: {text}; detach a device first") from exc
        tail = logf.read_text(errors="replace")[-1200:].rstrip() if logf.exists() else ""
        raise QmpError(f"QEMU refused to add {dev_id}: {text}. The server log ({logf}) ends:\n{tail}",
                       exc.klass) from exc


async def detach(qmp: QmpLike, id: str, timeout: float = 10.0,
                 grace: float = STOP_GRACE_S) -> Detached:
    """Hot-unplug ``id``, wait for the guest to release it, then stop its server.

    Args:
        qmp: the VM's QMP socket path, or an open :class:`Qmp`.
        id: the device id.
        timeout: seconds to wait for ``DEVICE_DELETED``.
        grace: seconds between the server's SIGTERM and SIGKILL.

    Raises:
        UnknownDevice: neither the VM nor vxpu knows ``id``, or it is not a vfio-user device.
        UnplugTimeout: the guest did not release it (the device and the server stay).
        QmpError: QEMU refused ``device_del``.
    """
    check_id(id)
    t0 = time.monotonic()
    state = VmState(qmp.path if isinstance(qmp, Qmp) else qmp)
    async with vm_locked(state):
        try:
            conn = qmp if isinstance(qmp, Qmp) else await Qmp.open(qmp)
        except QmpUnreachable:
            done = _forget_exited_vm(state, id, grace) if not isinstance(qmp, Qmp) else None
            if done is None:
                raise
            return Detached(id=id, server=done[0], pid=done[1], unplugged=False,
                            seconds=round(time.monotonic() - t0, 4))
        async with _used(conn, qmp) as q:
            rec = state.read(id)
            devices = await peripherals(q)
            in_vm = id in devices
            if rec is None and devices.get(id) != DRIVER:
                ours = sorted(i for i, kind in devices.items() if kind == DRIVER)
                what = f"is a {devices[id]}, not a vxpu device" if in_vm else "does not exist in this VM"
                raise UnknownDevice(f"device {id!r} {what} and vxpu has no server for it; vxpu devices here: "
                                    f"{', '.join(ours) or 'none'} ('vxpu ls --qmp {state.qmp}')")
            if in_vm:
                await _unplug(q, id, timeout, rec)
            outcome, pid = "none", None
            if rec is not None:
                pid = rec.pid
                outcome = await asyncio.to_thread(stop_server, rec.pid, rec.pid_start, grace)
                if outcome == "gone":
                    vm_log(state).warning("%s: its server pid %d had already exited; removed the stale record",
                                          id, pid)
                _remove_record(state, id, outcome)
    vm_log(state).info("detached %s (server %s)", id, outcome)
    return Detached(id=id, server=outcome, pid=pid, unplugged=in_vm, seconds=round(time.monotonic() - t0, 4))


def _remove_record(state: VmState, dev_id: str, outcome: str) -> None:
    """Remove what vxpu kept for ``dev_id`` once its server is stopped; the log of a server that
    had to be killed stays (it ends with the thread stacks of where it hung)."""
    killed = outcome == "killed"
    state.remove(dev_id, keep_log=killed)
    if killed:
        vm_log(state).warning("%s: its server ignored SIGTERM and was killed; its log, with its thread stacks, "
                              "stays at %s", dev_id, state.paths(dev_id)[2])


def _forget_exited_vm(state: VmState, dev_id: str, grace: float) -> tuple[str, int] | None:
    """Stop the server of ``dev_id`` if the QEMU it served has exited (its QMP socket is gone).
    The caller holds the VM's lock.

    Returns:
        (outcome of :func:`stop_server`, server pid), or None when there is no such record or its
        QEMU may still run (unknown pid, or alive): then nothing is touched.
    """
    rec = state.read(dev_id)
    if rec is None or rec.qemu_pid is None or process_alive(rec.qemu_pid, None):
        return None
    outcome = stop_server(rec.pid, rec.pid_start, grace)
    _remove_record(state, dev_id, outcome)
    vm_log(state).warning("%s: its VM (QEMU pid %d) has exited; stopped its server (pid %d, %s)", dev_id, rec.qemu_pid,
                rec.pid, outcome)
    return outcome, rec.pid


async def _unplug(q: Qmp, dev_id: str, timeout: float, rec: DeviceRecord | None) -> None:
    with q.listen("DEVICE_DELETED", lambda ev: ev.get("data", {}).get("device") == dev_id) as heard:
        try:
            await q.execute("device_del", id=dev_id)
        except QmpError as exc:
            if _UNPLUG_PENDING not in str(exc):
                raise QmpError(f"QEMU refused to unplug {dev_id}: {exc}", exc.klass) from exc
            log.info("%s: an earlier device_del is still pending; waiting for the guest again", dev_id)
        if await q.next_event(heard, timeout) is not None:
            return
    if dev_id not in await peripherals(q):
        return  # released just as the wait ended
    server = f"its server (pid {rec.pid}) keeps running" if rec else "it has no vxpu server"
    raise UnplugTimeout(f"the guest did not release {dev_id} within {timeout:g}s after device_del: it needs ACPI "
                        f"PCI hot-plug (acpiphp, or pciehp on q35) and must not hold the device busy. The device "
                        f"stays in the VM and {server}; run 'vxpu detach --id {dev_id}' again later (a longer "
                        "--timeout), or stop the VM")


async def list_devices(qmp: QmpLike) -> list[DeviceInfo]:
    """The vxpu devices of the VM behind ``qmp``: those vxpu attached plus any other vfio-user-pci.

    Raises:
        QmpUnreachable, QmpBusy, QmpError: as for :class:`Qmp`.
    """
    state = VmState(qmp.path if isinstance(qmp, Qmp) else qmp)
    async with vm_locked(state):
        try:
            conn = qmp if isinstance(qmp, Qmp) else await Qmp.open(qmp)
        except QmpUnreachable as exc:
            left = [r.id for r in state.records()]
            if not left:
                raise
            raise QmpUnreachable(f"{exc}. vxpu still has servers recorded for this VM ({', '.join(left)}): once "
                                 f"its QEMU has exited, 'vxpu detach --qmp {qmp} --id ID' stops them") from exc
        async with _used(conn, qmp) as q:
            devices = await peripherals(q)
            buses = await q.execute("query-pci")
            records = {r.id: r for r in state.records()}
    rows = []
    for dev_id in sorted(set(records) | {i for i, kind in devices.items() if kind == DRIVER}):
        rec, loc = records.get(dev_id), locate(buses, dev_id)
        slot = str(loc) if loc else None
        if rec is None:
            rows.append(DeviceInfo(dev_id, None, None, "unmanaged", slot, None, None))
            continue
        stats = stats_summary(state.stats_path(dev_id))
        if not process_alive(rec.pid, rec.pid_start):
            health = "server-exited"
        elif dev_id not in devices:
            health = "not-in-vm"
        elif not server_listening(rec.pid, rec.socket):
            health = "not-listening"
        elif stats is not None and stats["age_s"] > STATS_STALE_S:
            health = "stats-stale"
        else:
            health = "ok"
        rows.append(DeviceInfo(dev_id, rec.backend, rec.pid, health, slot, rec.socket, rec.log, stats))
    return rows


def stats_summary(path: Path) -> dict[str, Any] | None:
    """The figures of a server's STATS document that tell an operator how a device is doing.

    Returns:
        ``age_s`` (seconds since the server wrote it), ``uptime_s``, ``commands`` and ``errors``
        (totals), ``fatal_errors``, ``resets``, ``queue_depth``; None when the server writes no
        STATS (the test device, or an unreadable file).
    """
    try:
        age = time.time() - path.stat().st_mtime
        doc = json.loads(path.read_text())
        dev = doc["device"]
        return {"age_s": round(age, 1), "uptime_s": round(dev.get("uptime_ns", 0) / 1e9, 1),
                "commands": sum(dev.get("commands", {}).values()), "errors": sum(dev.get("errors", {}).values()),
                "fatal_errors": dev.get("fatal_errors", 0), "resets": dev.get("resets", 0),
                "queue_depth": dev.get("queue_depth", 0)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
