"""Host accelerator enumeration from sysfs, enriched by whatever vendor runtimes are present.

Concept: the PCI bus is the ground truth for *what is plugged in*; runtimes only say *what they
can drive*. :func:`scan_pci` walks ``/sys/bus/pci/devices`` (the root is a parameter, so tests
run against fixture trees) and classifies every function by vendor and class code:

=====================  ==========================================  ===========
vendor                 rule                                        kind
=====================  ==========================================  ===========
NVIDIA 0x10de          class 0x03xx (display) or 0x12 (processing)  gpu
AMD 0x1002             class 0x03xx or 0x12                        gpu
AMD 0x1022 / 0x1002    XDNA: class 0x1180 / 0x12 or a known id     npu
Intel 0x8086           class 0x03xx                                gpu
Intel 0x8086           class 0x12 or a known NPU id                npu
Huawei 0x19e5          class 0x12 (Ascend)                         npu
Qualcomm 0x17cb        class 0x12 or 0x1180 (Cloud AI)             npu
anyone                 class 0x12 (processing accelerator), 0x0b40 accelerator
anything else                                                      other
=====================  ==========================================  ===========

Each :class:`PciDevice` records the BDF, IDs, class, kind, vendor name, bound driver, IOMMU
group and NUMA node. Broken or partial entries (missing, unreadable or garbage files, dangling
links) are kept, with every problem listed in ``problems``: enumeration never fails because
one entry is odd. :func:`merge_runtimes` then adds what CUDA (matched by
``cuDeviceGetPCIBusId``), HIP (``hipDeviceGetPCIBusId``) and ONNX Runtime (vendor/device id)
report; a missing runtime is simply skipped.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/bus/pci/devices"
ACCELERATOR_KINDS = ("gpu", "npu", "accelerator")
_MAX_ATTR_BYTES = 64
_MAX_ENTRIES = 65536
_BDF = re.compile(r"^([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")

VENDORS: dict[int, str] = {
    0x10DE: "NVIDIA", 0x1002: "AMD", 0x1022: "AMD", 0x8086: "Intel", 0x19E5: "Huawei",
    0x17CB: "Qualcomm", 0x1DA3: "Habana (Intel)", 0x1AE0: "Google", 0x1D0F: "Amazon",
    0x1AF4: "Red Hat (virtio)", 0x1B36: "Red Hat (QEMU)", 0x1234: "QEMU", 0x15B3: "Mellanox",
    0x144D: "Samsung", 0x1E0F: "KIOXIA", 0x5850: "vxpu", 0x1D94: "Hygon", 0x1EB1: "VeriSilicon",
    0x1E52: "Tenstorrent", 0x1FC9: "Tehuti", 0x1C36: "Annapurna", 0x1DBE: "Enflame", 0x1D22: "Baidu",
    0x1CD7: "Cambricon", 0x1EE0: "Biren",
}
# Known NPU device ids where the class alone does not say so.
AMD_XDNA_IDS = frozenset({0x1502, 0x17F0, 0x1640})
INTEL_NPU_IDS = frozenset({0x7D1D, 0xAD1D, 0x643E, 0xB03E, 0xFD3E})

CLASS_NAMES: dict[int, str] = {
    0x0300: "VGA controller", 0x0302: "3D controller", 0x0380: "display controller",
    0x1200: "processing accelerator", 0x1180: "signal processing controller", 0x0B40: "co-processor",
    0x0200: "ethernet", 0x0207: "infiniband", 0x0280: "network", 0x0108: "NVMe", 0x0106: "SATA",
    0x0403: "audio", 0x0C03: "USB", 0x0600: "host bridge", 0x0601: "ISA bridge", 0x0604: "PCI bridge",
    0x0680: "bridge", 0x0880: "system peripheral", 0x0100: "SCSI", 0x0C05: "SMBus",
}


@dataclass
class PciDevice:
    """One PCI function as sysfs describes it (``None`` where the entry is missing or broken)."""

    bdf: str
    vendor_id: int | None = None
    device_id: int | None = None
    subsystem_vendor_id: int | None = None
    subsystem_device_id: int | None = None
    class_code: int | None = None          # 24-bit: base << 16 | sub << 8 | prog-if
    kind: str = "other"                     # gpu, npu, accelerator, other
    vendor: str = "unknown"
    driver: str | None = None
    iommu_group: int | None = None
    numa_node: int | None = None
    problems: list[str] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)   # "cuda", "hip", "onnxruntime" ...

    @property
    def is_accelerator(self) -> bool:
        return self.kind in ACCELERATOR_KINDS

    @property
    def class_name(self) -> str:
        if self.class_code is None:
            return "?"
        return CLASS_NAMES.get(self.class_code >> 8, f"class {self.class_code >> 8:04x}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ids as ``0x`` strings, ``class`` as a 6-digit hex string."""
        out = asdict(self)
        for key in ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_device_id"):
            out[key] = f"0x{out[key]:04x}" if out[key] is not None else None
        out["class"] = f"0x{self.class_code:06x}" if self.class_code is not None else None
        out["class_name"] = self.class_name
        del out["class_code"]
        return out


def classify(vendor_id: int | None, device_id: int | None, class_code: int | None) -> str:
    """Return ``"gpu"``, ``"npu"``, ``"accelerator"`` or ``"other"`` for a PCI function."""
    if class_code is None:
        return "other"
    base, sub = class_code >> 16, (class_code >> 8) & 0xFF
    display = base == 0x03
    processing = base == 0x12
    signal = base == 0x11 and sub == 0x80
    if vendor_id == 0x10DE:
        return "gpu" if display or processing else "other"
    if vendor_id in (0x1002, 0x1022):
        if device_id in AMD_XDNA_IDS or signal:
            return "npu"
        if display or (processing and vendor_id == 0x1002):
            return "gpu"
        return "npu" if processing else "other"
    if vendor_id == 0x8086:
        if display:
            return "gpu"
        if processing or device_id in INTEL_NPU_IDS:
            return "npu"
        return "other"
    if vendor_id == 0x19E5:
        return "npu" if processing else "other"
    if vendor_id == 0x17CB:
        return "npu" if processing or signal else "other"
    if processing or (base == 0x0B and sub == 0x40):
        return "accelerator"
    return "other"


def normalize_bdf(text: str) -> str | None:
    """``"00000000:00:06.0"`` / ``"0000:00:06.0"`` → ``"0000:00:06.0"`` (lower case); ``None`` if malformed."""
    m = _BDF.match(text.strip())
    if not m:
        return None
    domain = int(m.group(1), 16)
    if domain > 0xFFFF_FFFF:
        return None
    return f"{domain:04x}:{m.group(2).lower()}:{m.group(3).lower()}.{m.group(4)}"


def _read_attr(path: str, problems: list[str], name: str, *, required: bool = True) -> str | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_ATTR_BYTES)
    except FileNotFoundError:
        if required:
            problems.append(f"missing {name}")
        return None
    except OSError as exc:
        problems.append(f"unreadable {name}: {exc.strerror or exc}")
        return None
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        problems.append(f"garbage in {name}")
        return None


def _read_hex(path: str, problems: list[str], name: str, limit: int, *, required: bool = True) -> int | None:
    text = _read_attr(path, problems, name, required=required)
    if text is None:
        return None
    try:
        value = int(text, 16)
    except ValueError:
        problems.append(f"garbage in {name}: {text[:16]!r}")
        return None
    if not 0 <= value <= limit:
        problems.append(f"{name} out of range: {text[:16]!r}")
        return None
    return value


def _link_name(path: str, problems: list[str], name: str) -> str | None:
    try:
        target = os.readlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(f"unreadable {name} link: {exc.strerror or exc}")
        return None
    return os.path.basename(target.rstrip("/")) or None


def read_device(root: str, entry: str) -> PciDevice:
    """Read one ``root/entry`` sysfs PCI directory. Never raises; problems go in ``problems``."""
    path = os.path.join(root, entry)
    dev = PciDevice(bdf=normalize_bdf(entry) or entry)
    p = dev.problems
    if normalize_bdf(entry) is None:
        p.append("name is not a PCI address")
    if not os.path.isdir(path):
        p.append("not a directory (dangling link?)")
        return dev
    dev.vendor_id = _read_hex(os.path.join(path, "vendor"), p, "vendor", 0xFFFF)
    dev.device_id = _read_hex(os.path.join(path, "device"), p, "device", 0xFFFF)
    dev.subsystem_vendor_id = _read_hex(os.path.join(path, "subsystem_vendor"), p, "subsystem_vendor", 0xFFFF,
                                        required=False)
    dev.subsystem_device_id = _read_hex(os.path.join(path, "subsystem_device"), p, "subsystem_device", 0xFFFF,
                                        required=False)
    dev.class_code = _read_hex(os.path.join(path, "class"), p, "class", 0xFFFFFF)
    dev.driver = _link_name(os.path.join(path, "driver"), p, "driver")
    group = _link_name(os.path.join(path, "iommu_group"), p, "iommu_group")
    if group is not None:
        dev.iommu_group = int(group) if group.isdigit() and len(group) < 10 else None
        if dev.iommu_group is None:
            p.append(f"garbage iommu_group link: {group[:16]!r}")
    numa = _read_attr(os.path.join(path, "numa_node"), p, "numa_node", required=False)
    if numa is not None:
        if re.fullmatch(r"-?\d{1,5}", numa):
            dev.numa_node = int(numa) if int(numa) >= 0 else None
        else:
            p.append(f"garbage in numa_node: {numa[:16]!r}")
    dev.vendor = VENDORS.get(dev.vendor_id, "unknown") if dev.vendor_id is not None else "unknown"
    dev.kind = classify(dev.vendor_id, dev.device_id, dev.class_code)
    if p:
        log.debug("PCI entry %s is partial: %s", entry, "; ".join(p))
    return dev


def scan_pci(root: str = DEFAULT_ROOT) -> list[PciDevice]:
    """Every PCI function under ``root``, sorted by BDF. ``[]`` when ``root`` does not exist."""
    try:
        entries = sorted(os.listdir(root))[:_MAX_ENTRIES]
    except FileNotFoundError:
        log.info("no PCI bus at %s", root)
        return []
    except OSError as exc:
        log.warning("cannot list %s: %s", root, exc)
        return []
    return [read_device(root, entry) for entry in entries]


def merge_runtimes(devices: Iterable[PciDevice], *, cuda: bool = True, hip: bool = True,
                   onnxruntime: bool = True) -> list[str]:
    """Add runtime facts to matching devices in place; returns the runtimes that answered.

    Never raises: a runtime that is missing, has no driver or fails is skipped.
    """
    by_bdf = {d.bdf: d for d in devices}
    answered: list[str] = []
    probes = []
    if cuda:
        probes.append(("cuda", _cuda_devices))
    if hip:
        probes.append(("hip", _hip_devices))
    for name, probe in probes:
        try:
            found = probe()
        except Exception as exc:  # noqa: BLE001 - runtime probing must never break enumeration
            log.debug("%s probe failed: %s", name, exc)
            continue
        if found:
            answered.append(name)
        for info in found:
            dev = by_bdf.get(normalize_bdf(str(info.get("pci_bus_id", ""))) or "")
            if dev is not None:
                dev.runtime[name] = {k: v for k, v in info.items() if k != "pci_bus_id"}
    if onnxruntime and _merge_onnxruntime(by_bdf.values()):
        answered.append("onnxruntime")
    return answered


def _cuda_devices() -> list[dict[str, Any]]:
    from vxpu.accel.cuda_util import probe_devices

    return probe_devices()


def _hip_devices() -> list[dict[str, Any]]:
    from vxpu.accel.hip import probe_devices

    return probe_devices()


def _merge_onnxruntime(devices: Iterable[PciDevice]) -> bool:
    """Attach ONNX Runtime's GPU/NPU execution-provider devices, matched by vendor/device id."""
    try:
        import onnxruntime as ort

        ep_devices = ort.get_ep_devices()
    except Exception as exc:  # noqa: BLE001 - not installed, or an ORT without get_ep_devices
        log.debug("ONNX Runtime probe failed: %s", exc)
        return False
    pool = list(devices)
    for ep in ep_devices:
        hw = ep.device
        kind = str(hw.type).rsplit(".", 1)[-1].lower()
        if kind not in ("gpu", "npu"):
            continue
        meta = dict(hw.metadata)
        bdf = normalize_bdf(str(meta.get("pci_bus_id", meta.get("PciBusId", ""))))
        matches = [d for d in pool if d.bdf == bdf] if bdf else \
                  [d for d in pool if d.vendor_id == hw.vendor_id and d.device_id == hw.device_id]
        for dev in matches:
            dev.runtime.setdefault("onnxruntime", []).append({"ep": ep.ep_name, "type": kind})
    return True
