"""Free hot-plug slots and device locations from ``query-pci`` replies (captured shapes)."""

from __future__ import annotations

from typing import Any

from vxpu.qmp import slots


def _dev(slot: int, qdev_id: str = "", fn: int = 0, **extra: Any) -> dict[str, Any]:
    return {"bus": 0, "slot": slot, "function": fn, "qdev_id": qdev_id, "class_info": {"class": 0}, **extra}


def _port(slot: int, qdev_id: str, secondary: int, devices: list[dict[str, Any]]) -> dict[str, Any]:
    return _dev(slot, qdev_id, pci_bridge={"bus": {"number": secondary, "secondary": secondary,
                                                   "subordinate": secondary}, "devices": devices})


PC = [{"bus": 0, "devices": [_dev(0), _dev(1), _dev(1, fn=1), _dev(1, fn=3), _dev(2), _dev(3, "vxpu0")]}]


def test_pc_free_slots_skip_used_ones() -> None:
    free = slots.free_pc_slots(PC)
    assert free[:3] == [4, 5, 6] and 3 not in free and len(free) == 28


def test_pc_full_bus_has_no_slot() -> None:
    full = [{"bus": 0, "devices": [_dev(s) for s in range(32)]}]
    assert slots.free_pc_slots(full) == []


def test_locate_on_root_bus_and_behind_root_port() -> None:
    q35 = [{"bus": 0, "devices": [_dev(0), _port(2, "rp1", 1, [{**_dev(0, "vx1"), "bus": 1}]),
                                  _port(3, "rp2", 2, [])]}]
    assert str(slots.locate(PC, "vxpu0")) == "00:03.0"
    assert str(slots.locate(q35, "vx1")) == "01:00.0"
    assert slots.locate(q35, "nope") is None
    unnumbered = [{"bus": 0, "devices": [_port(2, "rp1", 0, [_dev(0, "vx1")])]}]  # before firmware numbers it
    assert str(slots.locate(unnumbered, "vx1")) == "rp1/00.0"


def test_empty_root_ports_are_the_named_ones_without_devices() -> None:
    q35 = [{"bus": 0, "devices": [_port(2, "rp1", 1, [{**_dev(0, "vx1"), "bus": 1}]), _port(3, "rp2", 2, []),
                                  _port(4, "", 3, []), _port(5, "rp4", 4, [])]}]
    assert slots.empty_root_ports(q35, {"rp1", "rp2", "rp4"}) == ["rp2", "rp4"]
    assert slots.empty_root_ports(q35, {"rp1"}) == []
