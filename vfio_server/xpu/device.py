"""XpuDevice: the vxpu accelerator as a PCI function (0x5850:0x0100) over vfio-user.

The guest-visible contract is :mod:`vxpu.abi.xpu` (prose: docs/device-abi.md §4). This module
is the PCI and register side: BAR0 (a trapped :class:`RegisterBank`, MSI-X table and PBA at
0x800/0xC00 with the option), MSI with one vector by default, the register callbacks, and the
wiring between the serve loop and the :class:`~vxpu.vfio_server.xpu.poller.Poller`, which
runs the rings on its own thread and executes commands on an accel
:class:`~vxpu.accel.session.Session` (per-guest handles and quotas).

Reset and disconnect: ``Control.RESET`` (a register write) and the RESET command drop the
guest's allocations, modules and events; Control.RESET also abandons what was submitted
(ABORTED completions) and stops the queue. A PCI reset (DEVICE_RESET from QEMU, e.g. a guest
reboot) and a client disconnect stop all DMA before they return, post no completion, drop the
guest's device state and disable the queue. DMA maps are registered with the backend when they
are mapped (zero-copy copies) and unregistered before they go.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from vxpu.accel.backend import Backend, ModuleKind
from vxpu.accel.quota import DEFAULT_QUOTA, CompileBudget, Quota
from vxpu.accel.session import Session
from vxpu.vfio_server.device import DeviceContext
from vxpu.vfio_server.pci import Access, Bar, MsixLayout, PciDevice, PciIds, Register, RegisterBank
from vxpu.vfio_server.xpu import fastlane as native
from vxpu.vfio_server.xpu.poller import MAX_COALESCE_USEC, Poller
from vxpu.vfio_server.xpu.queue import QueueConfig

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import Control, DeviceStatus, Feature

log = logging.getLogger(__name__)

_U32 = 0xFFFF_FFFF
_NATIVE_FEATURES = {ModuleKind.PTX: Feature.PTX, ModuleKind.CUBIN: Feature.CUBIN,
                    ModuleKind.HSACO: Feature.HSACO, ModuleKind.ONNX: Feature.ONNX}


def device_features(backend: Backend, allowed_kinds: frozenset[ModuleKind], msix: bool) -> int:
    """The REG_FEATURES bits of a device on ``backend`` that lets the guest load ``allowed_kinds``."""
    props = backend.properties()
    bits = Feature.IR | Feature.EVENTS | Feature.INDIRECT_SG | Feature.ERROR_COUNT
    if "checked-ir" in props.features:
        bits |= Feature.CHECKED_IR
    for kind, bit in _NATIVE_FEATURES.items():
        if kind in allowed_kinds and kind.value in props.features:
            bits |= bit
    if msix:
        bits |= Feature.MSIX
    return int(bits)


class XpuDevice(PciDevice):
    """The accelerator device model.

    Args:
        backend: an opened backend; the device owns one session on it at a time.
        quota: the guest's limits (memory, allocations, modules, queue depth ...).
        allowed_kinds: module kinds the guest may load (native kinds are an operator opt-in).
        msix: also offer MSI-X (2 vectors; cold-plug only: QEMU 11.1.3 aborts on hot-unplug).
        name: for log lines.
        poll_idle_us: the poller's adaptive idle spin ceiling in microseconds (None: the
            default, :data:`~vxpu.vfio_server.xpu.poller.MAX_SPIN_S`; 0: never spin).
        fastlane: run the common success path natively (:mod:`~vxpu.vfio_server.xpu.fastlane`):
            True/False, or None for ``$VXPU_FASTLANE`` (default on where it builds; backends
            without native driver entry points always run in Python).
    """

    def __init__(self, backend: Backend, quota: Quota = DEFAULT_QUOTA, *,
                 allowed_kinds: frozenset[ModuleKind] = frozenset({ModuleKind.IR}),
                 msix: bool = False, name: str = "xpu", poll_idle_us: int | None = None,
                 fastlane: bool | None = None) -> None:
        self.backend = backend
        self.quota = quota
        self.allowed_kinds = allowed_kinds
        #: The guest's compile time: one budget for every session, so a reset does not refill it.
        self.compile_budget = CompileBudget(quota.compile_seconds)
        self.features = device_features(backend, allowed_kinds, msix)
        self.regs = RegisterBank(abi.BAR0_SIZE, self._registers())
        ids = PciIds(vendor_id=abi.VENDOR_ID, device_id=abi.DEVICE_ID, class_code=abi.CLASS_CODE,
                     revision=abi.REVISION, subsystem_vendor_id=abi.SUBSYSTEM_VENDOR_ID,
                     subsystem_id=abi.SUBSYSTEM_ID)
        layout = MsixLayout(abi.MSIX_VECTORS, 0, abi.MSIX_TABLE_OFFSET, 0, abi.MSIX_PBA_OFFSET) if msix else None
        super().__init__(ids, [Bar(0, abi.BAR0_SIZE, self.regs)], msi_vectors=abi.MSI_VECTORS, msix=layout)
        self._name = name
        self._call: Callable[[Callable[[], None]], None] | None = None
        self.poller = Poller(self._new_session, self.features, self._identity, self._irq_from_any_thread,
                             self._irq_settings, lambda: self.bus_master_enabled,
                             max_spin_s=None if poll_idle_us is None else poll_idle_us / 1e6)
        self.poller.use_fastlane(native.create(backend, fastlane))

    def _new_session(self) -> Session:
        return Session(self.backend, self.quota, allowed_kinds=self.allowed_kinds, name=self._name,
                       compile_budget=self.compile_budget)

    # -- registers -----------------------------------------------------------------------------
    def _registers(self) -> list[Register]:
        ro, rw, wo = Access.RO, Access.RW, Access.WO
        return [
            Register(abi.REG_MAGIC, "MAGIC", ro, abi.MAGIC_VALUE),
            Register(abi.REG_VERSION, "VERSION", ro, abi.VERSION_VALUE),
            Register(abi.REG_FEATURES_LO, "FEATURES_LO", ro, on_read=lambda: self.features & _U32),
            Register(abi.REG_FEATURES_HI, "FEATURES_HI", ro, on_read=lambda: self.features >> 32),
            Register(abi.REG_STATUS, "STATUS", ro, on_read=self._status),
            Register(abi.REG_FATAL_CODE, "FATAL_CODE", ro, on_read=lambda: int(self.poller.fatal_code)),
            Register(abi.REG_FATAL_INFO, "FATAL_INFO", ro, on_read=lambda: self.poller.fatal_info),
            Register(abi.REG_CONTROL, "CONTROL", wo, on_write=self._control),
            Register(abi.REG_QUEUE_BASE_LO, "QUEUE_BASE_LO", rw),
            Register(abi.REG_QUEUE_BASE_HI, "QUEUE_BASE_HI", rw),
            Register(abi.REG_SQ_BASE_LO, "SQ_BASE_LO", rw),
            Register(abi.REG_SQ_BASE_HI, "SQ_BASE_HI", rw),
            Register(abi.REG_CQ_BASE_LO, "CQ_BASE_LO", rw),
            Register(abi.REG_CQ_BASE_HI, "CQ_BASE_HI", rw),
            Register(abi.REG_SQ_ENTRIES, "SQ_ENTRIES", rw),
            Register(abi.REG_CQ_ENTRIES, "CQ_ENTRIES", rw),
            Register(abi.REG_QUEUE_ENABLE, "QUEUE_ENABLE", rw, on_write=self._queue_enable, wmask=1),
            Register(abi.REG_DOORBELL, "DOORBELL", wo, on_write=lambda _v: self.poller.doorbell()),
            # (a native poll reads the interrupt settings when it starts: new ones end it)
            Register(abi.REG_IRQ_CONTROL, "IRQ_CONTROL", rw, wmask=int(abi.IrqControl.COMPLETION | abi.IrqControl.FATAL),
                     on_write=self._irq_changed),
            Register(abi.REG_IRQ_COALESCE_COUNT, "IRQ_COALESCE_COUNT", rw, on_write=self._irq_changed),
            Register(abi.REG_IRQ_COALESCE_USEC, "IRQ_COALESCE_USEC", rw, on_write=self._irq_changed),
            Register(abi.REG_MAX_RING_ENTRIES, "MAX_RING_ENTRIES", ro, abi.MAX_RING_ENTRIES),
            Register(abi.REG_RESET_COUNT, "RESET_COUNT", ro, on_read=lambda: self.poller.reset_count & _U32,
                     keep_on_reset=True),
            Register(abi.REG_SCRATCH, "SCRATCH", rw),
        ]

    def _status(self) -> int:
        bits = 0
        if self.poller.enabled:
            bits |= DeviceStatus.ENABLED
        if self.poller.fatal_code:
            bits |= DeviceStatus.FATAL
        if self.bus_master_enabled:
            bits |= DeviceStatus.BUS_MASTER
        return int(bits)

    def _control(self, value: int) -> None:
        if value & Control.RESET:
            self.regs.set("QUEUE_ENABLE", 0)
            self.poller.request("reset")

    def _queue_enable(self, value: int) -> None:
        if not value & 1:
            self.poller.request("disable")
            return
        r = self.regs.get
        cfg = QueueConfig(header=r("QUEUE_BASE_LO") | r("QUEUE_BASE_HI") << 32,
                          sq_base=r("SQ_BASE_LO") | r("SQ_BASE_HI") << 32,
                          cq_base=r("CQ_BASE_LO") | r("CQ_BASE_HI") << 32,
                          sq_entries=r("SQ_ENTRIES"), cq_entries=r("CQ_ENTRIES"))
        self.poller.request("enable", cfg)

    def _irq_changed(self, _value: int) -> None:
        self.poller.poke()

    def _irq_settings(self) -> tuple[int, int, int]:
        r = self.regs.get
        return r("IRQ_CONTROL"), r("IRQ_COALESCE_COUNT"), min(r("IRQ_COALESCE_USEC"), MAX_COALESCE_USEC)

    # -- interrupts ----------------------------------------------------------------------------
    def _irq_from_any_thread(self, vector: int) -> None:
        """Deliver ``vector`` (-1: the fatal vector) on the serve loop."""
        call = self._call
        if call is not None:
            call(lambda: self._deliver(vector))

    def _deliver(self, vector: int) -> None:
        if vector < 0:
            vector = 1 if self.msix is not None and self.msix.enabled else 0
        if self.raise_irq(vector):
            self.poller.stats.interrupts += 1

    # -- identity ------------------------------------------------------------------------------
    def _identity(self) -> bytes:
        props = self.backend.properties()
        q = self.quota
        doc = {
            "abi": f"{abi.ABI_MAJOR}.{abi.ABI_MINOR}",
            "backend": props.backend, "name": props.name, "vendor": props.vendor,
            "architecture": props.architecture, "memory_total": props.memory_total,
            "compute_units": props.compute_units,
            "max_threads_per_block": props.max_threads_per_block,
            "max_shared_memory_per_block": props.max_shared_memory_per_block,
            "features": [f.name for f in Feature if self.features & f],
            "backend_features": sorted(props.features),
            "limits": {"max_ring_entries": abi.MAX_RING_ENTRIES, "max_sg_entries": abi.MAX_SG_ENTRIES,
                       "max_transfer_bytes": abi.MAX_TRANSFER_BYTES, "max_arg_bytes": abi.MAX_ARG_BYTES,
                       "max_name_bytes": abi.MAX_NAME_BYTES},
            "quota": {"memory_bytes": q.memory_bytes, "max_allocations": q.max_allocations,
                      "max_allocation_bytes": q.max_allocation_bytes, "modules": q.modules,
                      "module_bytes": q.module_bytes, "kernels": q.kernels, "events": q.events,
                      "queue_depth": q.queue_depth, "compile_seconds": q.compile_seconds},
        }
        data = json.dumps(doc, separators=(",", ":")).encode()
        if len(data) > abi.MAX_IDENTIFY_BYTES:         # a backend with very many feature strings
            doc["backend_features"] = []
            data = json.dumps(doc, separators=(",", ":")).encode()[:abi.MAX_IDENTIFY_BYTES]
        return data

    # -- PciDevice hooks -----------------------------------------------------------------------
    def attach(self, ctx: DeviceContext) -> None:
        super().attach(ctx)
        self._call = ctx.call_soon_threadsafe
        ctx.dma.add_listener(self.poller.on_map, self.poller.on_unmap)

    def detach(self) -> None:
        """The client left (its DMA maps are already gone): stop and drop the guest's state."""
        self.poller.hard_reset()
        self.regs.set("QUEUE_ENABLE", 0)
        self._call = None
        super().detach()

    def command_changed(self, old: int, new: int) -> None:
        super().command_changed(old, new)
        if not self.bus_master_enabled:
            self.poller.bus_master_lost()

    def device_reset(self) -> None:
        """DEVICE_RESET (guest reboot): registers are back at reset values (base class); stop
        the queue and drop the guest's device state."""
        self.poller.hard_reset()

    def stats_document(self) -> bytes:
        """The STATS command's JSON document (callable from any thread)."""
        return self.poller.stats_document()

    def close(self) -> None:
        """Stop the poller and close the session (server shutdown)."""
        self.poller.stop()
