"""Host VFIO passthrough: hand a real PCI device to a VM with ``vfio-pci``.

Binding goes through sysfs only, the way ``driverctl`` does it: write ``vfio-pci`` to the
device's ``driver_override``, unbind it from its current driver, and ask the kernel to probe
it again (``/sys/bus/pci/drivers_probe``), which now picks vfio-pci. Before touching
anything, :func:`plan_bind` checks that the BDF is well formed, the device exists, the IOMMU
is on (the device has an ``iommu_group``), vfio-pci is loaded, and every other device in the
same IOMMU group is unbound or already on vfio-pci (a group is only usable as a whole).
Then QMP ``device_add`` with ``{"driver": "vfio-pci", "host": BDF}`` attaches it.

All paths are relative to a sysfs root, so the logic is tested against a fixture tree.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vxpu.qmp.errors import PassthroughError
from vxpu.qmp.monitor import Monitor

log = logging.getLogger(__name__)

SYSFS = Path("/sys")
VFIO_DRIVER = "vfio-pci"
_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


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


def normalize_bdf(bdf: str) -> str:
    """``01:00.0`` or ``0000:01:00.0`` -> ``0000:01:00.0``.

    Raises:
        PassthroughError: not a PCI address.
    """
    full = bdf.lower() if bdf.count(":") == 2 else f"0000:{bdf.lower()}"
    if not _BDF.match(full):
        raise PassthroughError(f"{bdf!r} is not a PCI address (expected DDDD:BB:SS.F, e.g. 0000:01:00.0)")
    return full


def _driver(dev: Path) -> str | None:
    link = dev / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def plan_bind(bdf: str, sysfs: Path = SYSFS) -> BindPlan:
    """Check that ``bdf`` can be given to vfio-pci and list the sysfs writes that do it.

    Raises:
        PassthroughError: no such device, IOMMU off, vfio-pci not loaded, or another device
            of the IOMMU group is bound to a host driver.
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
    for member in sorted((group_link / "devices").iterdir()) if (group_link / "devices").is_dir() else ():
        if member.name != bdf and _driver(member) not in (None, VFIO_DRIVER):
            raise PassthroughError(f"{member.name} shares IOMMU group {group} with {bdf} and is bound to "
                                   f"{_driver(member)}; bind it to vfio-pci too (or unbind it) first")
    current = _driver(dev)
    if current == VFIO_DRIVER:
        return BindPlan(bdf, group, current, ())
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
            raise PassthroughError(f"writing {w.value!r} to {w.path} failed: {exc} (needs root)") from exc
        log.info("sysfs: %s <- %s", w.path, w.value)


def bind_vfio(bdf: str, sysfs: Path = SYSFS, settle_s: float = 5.0) -> BindPlan:
    """Bind ``bdf`` to vfio-pci and wait until the kernel reports it bound.

    Raises:
        PassthroughError: as :func:`plan_bind`, or the kernel did not bind it in ``settle_s``.
    """
    plan = plan_bind(bdf, sysfs)
    apply(plan.writes)
    dev = sysfs / "bus/pci/devices" / plan.bdf
    deadline = time.monotonic() + settle_s
    while _driver(dev) != VFIO_DRIVER:
        if time.monotonic() > deadline:
            raise PassthroughError(f"{plan.bdf} is bound to {_driver(dev)} instead of vfio-pci after the probe; "
                                   "check 'dmesg' for vfio-pci errors")
        time.sleep(0.05)
    return plan


def plan_unbind(bdf: str, sysfs: Path = SYSFS) -> tuple[SysfsWrite, ...]:
    """The writes that give ``bdf`` back to its host driver (clear the override, re-probe).

    Raises:
        PassthroughError: bad BDF or no such device.
    """
    bdf = normalize_bdf(bdf)
    pci = sysfs / "bus/pci"
    dev = pci / "devices" / bdf
    if not dev.exists():
        raise PassthroughError(f"no PCI device {bdf}")
    writes = [SysfsWrite(dev / "driver_override", "\n")]
    if _driver(dev) == VFIO_DRIVER:
        writes.append(SysfsWrite(pci / "drivers" / VFIO_DRIVER / "unbind", bdf))
    writes.append(SysfsWrite(pci / "drivers_probe", bdf))
    return tuple(writes)


def passthrough_device(bdf: str, dev_id: str, **props: Any) -> dict[str, Any]:
    """The JSON description for ``-device``/``device_add`` of a host device."""
    return {"driver": VFIO_DRIVER, "host": normalize_bdf(bdf), "id": dev_id, **props}


def attach_host_device(mon: Monitor, bdf: str, dev_id: str, sysfs: Path = SYSFS) -> BindPlan:
    """Bind ``bdf`` to vfio-pci (if needed) and hot-plug it into the VM behind ``mon``.

    Raises:
        PassthroughError: binding failed.
        QmpError: QEMU refused the device (e.g. no permission on /dev/vfio/N).
    """
    plan = bind_vfio(bdf, sysfs)
    mon.execute("device_add", **passthrough_device(plan.bdf, dev_id))
    return plan
