"""Where a hot-plugged device can go, and where QEMU put it (``query-pci``).

* ``pc`` (i440fx): the root bus ``pci.0`` takes hot-plugged devices through ACPI (acpiphp) in
  slots 1-31; a slot is free when ``query-pci`` lists no function in it.
* ``q35``: the PCIe root bus is not hot-pluggable. A device goes into a ``pcie-root-port``
  (started with ``-device pcie-root-port,id=rp1,chassis=1,slot=1``) that has nothing below it
  and whose ``hotplug`` property is on. The root port's id is the bus name for ``device_add``.

Functions here take the replies of ``query-pci``/``qom-list`` as plain data, so they are
tested without QEMU; :func:`choose_bus` runs the QMP queries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vxpu.qmp.connection import Qmp
from vxpu.qmp.errors import NoFreeSlot, QmpError

log = logging.getLogger(__name__)

PC_ROOT_BUS = "pci.0"
PC_HOTPLUG_SLOTS = range(1, 32)
ROOT_PORT = "pcie-root-port"


@dataclass(frozen=True)
class PciLocation:
    """A function as ``query-pci`` reports it.

    Attributes:
        bridge: the id of the bridge (root port) it sits behind, if any. Until firmware or the
            guest numbers that bridge's bus, the bus number is 0 and the address is given as
            ``<bridge>/<slot>.<fn>`` instead.
    """

    bus: int
    slot: int
    function: int
    qdev_id: str
    bridge: str | None = None

    def __str__(self) -> str:
        if self.bridge is not None and self.bus == 0:
            return f"{self.bridge or 'bridge'}/{self.slot:02x}.{self.function}"
        return f"{self.bus:02x}:{self.slot:02x}.{self.function}"


def walk(buses: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    """Every device of a ``query-pci`` reply, with the number of the bus it sits on and the id of
    the bridge in front of that bus (None on a root bus)."""
    for bus in buses:
        yield from _walk_devices(bus.get("bus", 0), bus.get("devices", []), None)


def _walk_devices(number: int, devices: list[dict[str, Any]],
                  bridge_id: str | None) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    for dev in devices:
        yield number, dev, bridge_id
        bridge = dev.get("pci_bridge")
        if bridge:
            yield from _walk_devices(bridge.get("bus", {}).get("number", 0), bridge.get("devices", []),
                                     dev.get("qdev_id") or "")


def locate(buses: list[dict[str, Any]], qdev_id: str) -> PciLocation | None:
    """Where the device ``qdev_id`` sits, or None if ``query-pci`` does not list it."""
    for number, dev, bridge in walk(buses):
        if dev.get("qdev_id") == qdev_id:
            return PciLocation(number, dev["slot"], dev["function"], qdev_id, bridge)
    return None


def free_pc_slots(buses: list[dict[str, Any]]) -> list[int]:
    """The free hot-pluggable slots of the ``pc`` root bus."""
    used = {dev.get("slot") for bus in buses if bus.get("bus", 0) == 0 for dev in bus.get("devices", [])}
    return [s for s in PC_HOTPLUG_SLOTS if s not in used]


def empty_root_ports(buses: list[dict[str, Any]], root_port_ids: set[str]) -> list[str]:
    """Ids of the named root ports (``root_port_ids``) that have no device below them."""
    free = []
    for _number, dev, _bridge in walk(buses):
        qid = dev.get("qdev_id")
        if qid in root_port_ids and not dev.get("pci_bridge", {}).get("devices"):
            free.append(qid)
    return sorted(free)


async def machine_type(qmp: Qmp) -> str:
    """QEMU's machine type name (e.g. ``pc-i440fx-11.1-machine``)."""
    return str(await qmp.execute("qom-get", path="/machine", property="type"))


async def _root_port_ids(qmp: Qmp) -> set[str]:
    ids = set()
    for entry in await qmp.execute("qom-list", path="/machine/peripheral"):
        if entry.get("type") == f"child<{ROOT_PORT}>":
            try:
                hotplug = await qmp.execute("qom-get", path=f"/machine/peripheral/{entry['name']}",
                                            property="hotplug")
            except QmpError:
                hotplug = True
            if hotplug:
                ids.add(entry["name"])
    return ids


async def choose_bus(qmp: Qmp) -> str:
    """A bus with room for one hot-plugged device.

    Raises:
        NoFreeSlot: the ``pc`` bus is full, q35 has no empty hot-pluggable root port, or the
            machine type has no bus vxpu knows how to hot-plug into.
    """
    kind = await machine_type(qmp)
    buses = await qmp.execute("query-pci")
    if "q35" in kind:
        ports = empty_root_ports(buses, await _root_port_ids(qmp))
        if not ports:
            raise NoFreeSlot("no free hot-pluggable slot: on q35 each hot-plugged device needs an empty "
                             "pcie-root-port with an id. Start QEMU with one more "
                             "-device pcie-root-port,id=rpN,chassis=N,slot=N, or detach a device first")
        return ports[0]
    if "i440fx" in kind or kind.startswith("pc-") or kind == "pc":
        if not free_pc_slots(buses):
            raise NoFreeSlot(f"no free hot-pluggable slot: all {len(PC_HOTPLUG_SLOTS)} slots of the pc bus "
                             "are taken. Detach a device first, or add a pci-bridge to the VM")
        return PC_ROOT_BUS
    raise NoFreeSlot(f"machine type {kind!r} has no PCI bus vxpu knows how to hot-plug into (pc and q35 do); "
                     "pass the bus explicitly (--bus)")
