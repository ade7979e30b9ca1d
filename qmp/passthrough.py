"""Host VFIO passthrough: hand a real PCI device to a VM with ``vfio-pci``, and give it back.

Binding goes through sysfs only, the way ``driverctl`` does it: write ``vfio-pci`` to the
device's ``driver_override``, unbind it from its current driver, and ask the kernel to probe
it again (``/sys/bus/pci/drivers_probe``), which now picks vfio-pci. Before touching anything,
:func:`plan_bind` checks that

* the BDF is well formed and the device exists;
* the IOMMU is on (the device has an ``iommu_group``) and vfio-pci is loaded;
* the whole IOMMU group is viable: every other member is unbound, on vfio-pci, or on a driver
  the kernel allows beside vfio (``pci-stub``, ``pcieport``), since a group is given as a whole;
* the host is not using the device: not the boot display (``boot_vga``), no network
  interface up, no mounted block device (``force`` overrides only this check).

:func:`bind` remembers the original driver in the runtime directory
(``<runtime>/passthrough/<bdf>.json``) and :func:`unbind` restores it. :func:`attach_host`
and :func:`detach_host` hot-plug the device into a VM with ``device_add vfio-pci,host=...``
and take it out again (``DEVICE_DELETED``).

This module needs only the standard library at import time (QMP is imported lazily), so it
also runs inside a guest. All sysfs paths are relative to a root, so the logic is tested
against fixture trees.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vxpu.qmp.errors import PassthroughError

if TYPE_CHECKING:
    from vxpu.qmp.connection import Qmp
    from vxpu.qmp.monitor import Monitor

log = logging.getLogger(__name__)

SYSFS = Path("/sys")
MOUNTS = Path("/proc/mounts")
VFIO_DRIVER = "vfio-pci"
# Drivers the kernel lets share a viable IOMMU group with vfio (vfio_dev_driver_allowed).
GROUP_SAFE_DRIVERS = (None, VFIO_DRIVER, "pci-stub", "pcieport")
_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
IFF_UP = 0x1


@dataclass(frozen=True)
class SysfsWrite:
    """One write the plan performs: ``value`` into ``path``."""

    path: Path
    value: str


@dataclass(frozen=True)
class BindPlan:
    """What binding ``bdf`` to vfio-pci takes."""

    bdf: str
    iommu_group: int
    current_driver: str | None
    writes: tuple[SysfsWrite, ...]

    @property
    def vfio_device(self) -> str:
        """The VFIO group device node QEMU will open."""
        return f"/dev/vfio/{self.iommu_group}"

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-able dict."""
        return {"bdf": self.bdf, "iommu_group": self.iommu_group, "original_driver": self.current_driver,
                "vfio_device": self.vfio_device, "writes": [[str(w.path), w.value] for w in self.writes]}


def normalize_bdf(bdf: str) -> str:
    """``01:00.0`` or ``0000:01:00.0`` -> ``0000:01:00.0``.

    Raises:
        PassthroughError: not a PCI address.
    """
    full = bdf.lower() if bdf.count(":") == 2 else f"0000:{bdf.lower()}"
    if not _BDF.match(full):
        raise PassthroughError(f"{bdf!r} is not a PCI address (expected DDDD:BB:SS.F, e.g. 0000:01:00.0)")
    return full


def driver_of(dev: Path) -> str | None:
    """The name of the driver bound to the device directory ``dev`` (None: unbound)."""
    link = dev / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def host_users(dev: Path, mounts: Path = MOUNTS) -> list[str]:
    """Reasons the host is using the device at ``dev`` (empty when it is free to take)."""
    reasons = []
    try:
        if (dev / "boot_vga").read_text().strip() == "1":
            reasons.append("it is the host's boot display (boot_vga=1); the console would go dark")
    except OSError:
        pass
    for iface in sorted((dev / "net").iterdir()) if (dev / "net").is_dir() else ():
        try:
            if int((iface / "flags").read_text().strip(), 16) & IFF_UP:
                reasons.append(f"network interface {iface.name} is up ('ip link set {iface.name} down' first)")
        except (OSError, ValueError):
            continue
    blocks = {p.name for p in dev.rglob("*") if p.parent.name == "block" or p.parent.parent.name == "block"}
    if blocks:
        try:
            mounted = [line.split()[0] for line in mounts.read_text().splitlines() if line.strip()]
        except OSError:
            mounted = []
        for src in mounted:
            if src.startswith("/dev/") and src[5:] in blocks:
                reasons.append(f"{src} is mounted (unmount it first)")
    return reasons


def plan_bind(bdf: str, sysfs: Path = SYSFS, force: bool = False, mounts: Path = MOUNTS) -> BindPlan:
    """Check that ``bdf`` can be given to vfio-pci and list the sysfs writes that do it.

    Args:
        bdf: the host PCI address.
        sysfs: the sysfs root.
        force: take the device even though the host uses it (display, network, storage).
        mounts: the mount table to check block devices against.

    Raises:
        PassthroughError: no such device, IOMMU off, vfio-pci not loaded, a group member bound
            to a host driver, or (without ``force``) the host is using the device.
    """
    bdf = normalize_bdf(bdf)
    pci = sysfs / "bus/pci"
    dev = pci / "devices" / bdf
    if not dev.exists():
        raise PassthroughError(f"no PCI device {bdf} (see 'ls {pci / 'devices'}')")
    group_link = dev / "iommu_group"
    if not group_link.is_symlink():
        raise PassthroughError(f"{bdf} has no IOMMU group: the IOMMU is off. Boot the host with intel_iommu=on "
                               "(or amd_iommu=on) iommu=pt and enable VT-d/AMD-Vi in the firmware")
    group = int(os.path.basename(os.readlink(group_link)))
    if not (pci / "drivers" / VFIO_DRIVER).is_dir():
        raise PassthroughError("the vfio-pci driver is not loaded: run 'modprobe vfio-pci' as root")
    members = sorted((group_link / "devices").iterdir()) if (group_link / "devices").is_dir() else []
    for member in members:
        if member.name != bdf and driver_of(member) not in GROUP_SAFE_DRIVERS:
            raise PassthroughError(f"IOMMU group {group} is not viable: {member.name} shares it with {bdf} and is "
                                   f"bound to {driver_of(member)}; bind it to vfio-pci too (or unbind it) first, "
                                   "or move the card to a slot with its own group")
    current = driver_of(dev)
    if current == VFIO_DRIVER:
        return BindPlan(bdf, group, current, ())
    users = host_users(dev, mounts)
    if users and not force:
        raise PassthroughError(f"the host is using {bdf} ({current or 'no driver'}): {'; '.join(users)}. "
                               "Free it first, or pass --force to take it anyway")
    writes = [SysfsWrite(dev / "driver_override", VFIO_DRIVER)]
    if current is not None:
        writes.append(SysfsWrite(pci / "drivers" / current / "unbind", bdf))
    writes.append(SysfsWrite(pci / "drivers_probe", bdf))
    return BindPlan(bdf, group, current, tuple(writes))


def apply(writes: tuple[SysfsWrite, ...]) -> None:
    """Perform sysfs writes in order.

    Raises:
        PassthroughError: a write failed (not root, or the kernel refused).
    """
    for w in writes:
        try:
            with open(w.path, "w") as f:
                f.write(w.value)
        except OSError as exc:
            raise PassthroughError(f"writing {w.value!r} to {w.path} failed: {exc.strerror} "
                                   "(needs root; 'dmesg' has the kernel's reason)") from exc
        log.info("sysfs: %s <- %s", w.path, w.value.strip() or "(clear)")


def _wait_driver(dev: Path, want: str | None, settle_s: float) -> str | None:
    deadline = time.monotonic() + settle_s
    while (now := driver_of(dev)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def state_dir() -> Path:
    """Where bind remembers original drivers (``<runtime>/passthrough``)."""
    from vxpu.qmp.runtime import runtime_root

    return runtime_root() / "passthrough"


def _remember(bdf: str, driver: str | None, group: int, where: Path) -> None:
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = where / f".{bdf}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"bdf": bdf, "driver": driver, "iommu_group": group, "time": time.time()}))
    os.replace(tmp, where / f"{bdf}.json")


def original_driver(bdf: str, where: Path | None = None) -> str | None:
    """The driver ``bdf`` had before :func:`bind` (None: unbound, or never bound by vxpu)."""
    try:
        data = json.loads(((where or state_dir()) / f"{normalize_bdf(bdf)}.json").read_text())
    except (OSError, ValueError):
        return None
    drv = data.get("driver")
    return drv if isinstance(drv, str) else None


def bind(bdf: str, sysfs: Path = SYSFS, *, force: bool = False, where: Path | None = None,
         settle_s: float = 5.0, mounts: Path = MOUNTS) -> BindPlan:
    """Bind ``bdf`` to vfio-pci, remembering its original driver for :func:`unbind`.

    Raises:
        PassthroughError: as :func:`plan_bind`, a sysfs write failed, or the kernel did not
            bind vfio-pci within ``settle_s`` (the override is cleared again).
    """
    plan = plan_bind(bdf, sysfs, force, mounts)
    if not plan.writes:
        return plan
    _remember(plan.bdf, plan.current_driver, plan.iommu_group, where or state_dir())
    apply(plan.writes)
    dev = sysfs / "bus/pci/devices" / plan.bdf
    now = _wait_driver(dev, VFIO_DRIVER, settle_s)
    if now != VFIO_DRIVER:
        raise PassthroughError(f"{plan.bdf} is bound to {now} instead of vfio-pci after the probe; check "
                               f"'dmesg' for vfio-pci errors, then 'vxpu passthrough unbind {plan.bdf}'")
    log.info("%s bound to vfio-pci (was %s, IOMMU group %d)", plan.bdf, plan.current_driver or "unbound",
             plan.iommu_group)
    return plan


def bind_vfio(bdf: str, sysfs: Path = SYSFS, settle_s: float = 5.0) -> BindPlan:
    """:func:`bind` with the defaults (kept for callers of the earlier name)."""
    return bind(bdf, sysfs, settle_s=settle_s)


def plan_unbind(bdf: str, sysfs: Path = SYSFS) -> tuple[SysfsWrite, ...]:
    """The writes that give ``bdf`` back to the host (clear the override, re-probe).

    Raises:
        PassthroughError: bad BDF or no such device.
    """
    bdf = normalize_bdf(bdf)
    pci = sysfs / "bus/pci"
    dev = pci / "devices" / bdf
    if not dev.exists():
        raise PassthroughError(f"no PCI device {bdf}")
    writes = [SysfsWrite(dev / "driver_override", "\n")]
    if driver_of(dev) == VFIO_DRIVER:
        writes.append(SysfsWrite(pci / "drivers" / VFIO_DRIVER / "unbind", bdf))
    writes.append(SysfsWrite(pci / "drivers_probe", bdf))
    return tuple(writes)


def unbind(bdf: str, sysfs: Path = SYSFS, *, where: Path | None = None, settle_s: float = 5.0) -> str | None:
    """Give ``bdf`` back to the driver it had before :func:`bind`.

    Returns:
        The driver it is bound to now (None when it had none).

    Raises:
        PassthroughError: bad BDF, no such device, a write failed, or the original driver did
            not take the device back within ``settle_s``.
    """
    bdf = normalize_bdf(bdf)
    where = where or state_dir()
    want = original_driver(bdf, where)
    apply(plan_unbind(bdf, sysfs))
    dev = sysfs / "bus/pci/devices" / bdf
    now = _wait_driver(dev, want, settle_s) if want else driver_of(dev)
    if want and now != want:
        bind_file = sysfs / "bus/pci/drivers" / want / "bind"
        if now is None and bind_file.exists():
            apply((SysfsWrite(bind_file, bdf),))
            now = _wait_driver(dev, want, settle_s)
        if now != want:
            raise PassthroughError(f"{bdf} went to {now or 'no driver'} instead of its original driver {want}; "
                                   f"is {want} loaded? ('modprobe {want}', then 'vxpu passthrough unbind {bdf}')")
    (where / f"{bdf}.json").unlink(missing_ok=True)
    log.info("%s given back to %s", bdf, now or "no driver")
    return now


def passthrough_device(bdf: str, dev_id: str, **props: Any) -> dict[str, Any]:
    """The JSON description for ``-device``/``device_add`` of a host device."""
    return {"driver": VFIO_DRIVER, "host": normalize_bdf(bdf), "id": dev_id, **props}


async def attach_host(qmp: Qmp, bdf: str, dev_id: str, sysfs: Path = SYSFS, *, force: bool = False) -> BindPlan:
    """Bind ``bdf`` to vfio-pci (if needed) and hot-plug it into the VM behind ``qmp``.

    If QEMU refuses the device, a bind done here is undone (the original driver gets it back).

    Raises:
        PassthroughError: binding failed.
        NoFreeSlot: no hot-pluggable slot. QmpError: QEMU refused the device (e.g. no
            permission on /dev/vfio/N).
    """
    from vxpu.qmp.errors import QmpError
    from vxpu.qmp.slots import choose_bus

    plan = bind(bdf, sysfs, force=force)
    try:
        bus = await choose_bus(qmp)
        await qmp.execute("device_add", **passthrough_device(plan.bdf, dev_id, bus=bus))
    except BaseException as exc:
        if plan.writes:
            unbind(plan.bdf, sysfs)
        if isinstance(exc, QmpError):
            undone = f"; {plan.bdf} was given back to {plan.current_driver or 'no driver'}" if plan.writes else ""
            raise QmpError(f"QEMU refused to add {plan.bdf} as {dev_id}: {exc}{undone}", exc.klass) from exc
        raise
    return plan


async def detach_host(qmp: Qmp, dev_id: str, timeout: float = 10.0) -> str:
    """Hot-unplug the passthrough device ``dev_id`` and wait for ``DEVICE_DELETED``.

    Returns:
        The host PCI address the device was (QEMU's ``host`` property), for :func:`unbind`.

    Raises:
        UnknownDevice: the VM has no vfio-pci device called ``dev_id``.
        UnplugTimeout: the guest did not release it within ``timeout`` seconds.
        QmpError: QEMU refused ``device_del``.
    """
    from vxpu.qmp.errors import QmpError, UnknownDevice, UnplugTimeout
    from vxpu.qmp.lifecycle import peripherals

    devices = await peripherals(qmp)
    if devices.get(dev_id) != VFIO_DRIVER:
        what = f"is a {devices[dev_id]}" if dev_id in devices else "does not exist"
        raise UnknownDevice(f"device {dev_id!r} {what}, not a vfio-pci passthrough device of this VM")
    host = str(await qmp.execute("qom-get", path=f"/machine/peripheral/{dev_id}", property="host"))
    with qmp.listen("DEVICE_DELETED", lambda ev: ev.get("data", {}).get("device") == dev_id) as heard:
        try:
            await qmp.execute("device_del", id=dev_id)
        except QmpError as exc:
            raise QmpError(f"QEMU refused to unplug {dev_id}: {exc}", exc.klass) from exc
        if await qmp.next_event(heard, timeout) is None and dev_id in await peripherals(qmp):
            raise UnplugTimeout(f"the guest did not release {dev_id} within {timeout:g}s after device_del; "
                                "it needs ACPI PCI hot-plug and must not hold the device busy")
    return normalize_bdf(host)


def attach_host_device(mon: Monitor, bdf: str, dev_id: str, sysfs: Path = SYSFS) -> BindPlan:
    """Synchronous :func:`attach_host` on a :class:`~vxpu.qmp.monitor.Monitor` (QEMU picks the slot).

    Raises:
        PassthroughError: binding failed.
        QmpError: QEMU refused the device.
    """
    plan = bind(bdf, sysfs)
    mon.execute("device_add", **passthrough_device(plan.bdf, dev_id))
    return plan
