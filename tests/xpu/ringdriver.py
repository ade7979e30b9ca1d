"""A small raw-descriptor driver for the accelerator device, for tests and benchmarks.

It plays both QEMU and the guest driver with nothing from the SDK: an in-process
:class:`VfioUserServer` serving an :class:`XpuDevice` on a backend, the real
:class:`VfioUserClient` over a real socket, and one memfd :class:`GuestMemory` DMA-mapped at
:data:`RAM_BASE`. The queue header, the rings and a data area live in that RAM; descriptors are
packed by hand with :data:`vxpu.abi.xpu.DESCRIPTOR`, so tests can send anything, hostile or not.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from vxpu.accel.quota import DEFAULT_QUOTA, Quota
from vxpu.vfio_server.client import GuestMemory, VfioUserClient
from vxpu.vfio_server.server import VfioUserServer
from vxpu.vfio_server.xpu import XpuDevice

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import DescFlags, DeviceStatus, Opcode

BAR0 = 0
CONFIG = 7
RAM_BASE = 0x1000_0000
HEADER_OFF = 0x0
SQ_OFF = 0x1000
DATA_OFF = 0x20_0000             # the data area starts 2 MiB into guest RAM
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Completion:
    tag: int
    result: int
    result2: int
    status: int


def desc(opcode: int, args: Sequence[int] = (), *, flags: int = 0, tag: int = 0,
         sg: tuple[int, int] | None = None, sg_count: int | None = None,
         indirect: tuple[int, int] | None = None) -> bytes:
    """Pack one descriptor. ``sg=(addr, len)`` is an inline segment; ``indirect=(list_addr,
    count)`` points at an SG list (sets SG_INDIRECT); ``sg_count`` overrides the count."""
    a = list(args) + [0] * (4 - len(args))
    if indirect is not None:
        flags |= DescFlags.SG_INDIRECT
        addr, length, count = indirect[0], 0, indirect[1]
    elif sg is not None:
        addr, length, count = sg[0], sg[1], 1
    else:
        addr, length, count = 0, 0, 0
    if sg_count is not None:
        count = sg_count
    return abi.DESCRIPTOR.pack(opcode, flags, count, tag, *a, addr, length)


class XpuRig:
    """Server + client + guest RAM + an enabled queue.

    Args:
        path: socket path.
        backend: an opened backend (the test owns it).
        ram_size: guest RAM bytes (mapped at RAM_BASE).
        sq_entries, cq_entries: ring sizes (cq defaults to sq).
        quota: the device's per-guest quota.
        enable: configure and enable the queue.
    """

    def __init__(self, path: str | Path, backend: Any, *, ram_size: int = 8 << 20, sq_entries: int = 64,
                 cq_entries: int | None = None, quota: Quota = DEFAULT_QUOTA, enable: bool = True,
                 **device_kw: Any) -> None:
        self.device = XpuDevice(backend, quota, **device_kw)
        self.server = VfioUserServer(path, self.device).start()
        self.client = VfioUserClient(path, timeout=10.0)
        self.client.handshake()
        self.client.region_write(CONFIG, 4, struct.pack("<H", 0x0006))      # memory decode + bus master
        self.mem = GuestMemory(ram_size)
        self.u32 = self.mem.view.cast("I")           # one aligned 32-bit store per index update
        self.client.map_guest_ram(self.mem, RAM_BASE)
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries or sq_entries
        self.cq_off = SQ_OFF + _align(sq_entries * abi.SQ_ENTRY_SIZE, 0x1000)
        self.sq_tail = 0
        self.cq_head = 0
        self._tag = 0
        if enable:
            status = self.enable()
            assert status & DeviceStatus.ENABLED, f"queue did not start: status {status:#x}, fatal " \
                f"{self.reg(abi.REG_FATAL_CODE)}/{self.reg(abi.REG_FATAL_INFO)}"

    # -- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.device.close()
        self.u32.release()
        self.mem.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until a native poll running now (the fast lane's C loop) has returned and its
        work is accounted: the lane's and the device's counters lag until then."""
        poller = self.device.poller
        before = poller.native_polls     # (read first: a poll ending now moves it after it is inactive)
        if not poller.native_poll_active:
            return
        poller.poke()
        deadline = time.monotonic() + timeout
        while poller.native_polls == before and time.monotonic() < deadline:
            time.sleep(0.0002)

    def reg(self, offset: int) -> int:
        return int(_U32.unpack(self.client.region_read(BAR0, offset, 4))[0])

    def flush(self) -> None:
        """Read a register: answered after every earlier posted write was applied (device-abi
        §4.2), so a setting written before covers the commands posted after this."""
        self.reg(abi.REG_SCRATCH)

    def set_reg(self, offset: int, value: int, posted: bool = True) -> None:
        self.client.region_write(BAR0, offset, _U32.pack(value & 0xFFFF_FFFF), posted=posted)

    def hdr(self, field: int) -> int:
        return int(_U32.unpack_from(self.mem.view, HEADER_OFF + field)[0])

    def set_hdr(self, field: int, value: int) -> None:
        """Store a header word with one 32-bit store (struct.pack_into would clear it first)."""
        self.u32[(HEADER_OFF + field) // 4] = value & 0xFFFF_FFFF

    def addr(self, offset: int) -> int:
        """Guest-physical address of RAM offset ``offset``."""
        return RAM_BASE + offset

    def write(self, offset: int, data: bytes) -> None:
        self.mem.write(offset, data)

    def read(self, offset: int, n: int) -> bytes:
        return self.mem.read(offset, n)

    # -- queue ---------------------------------------------------------------------------------
    def configure(self, *, header: int | None = None, sq: int | None = None, cq: int | None = None,
                  sq_entries: int | None = None, cq_entries: int | None = None) -> None:
        """Write the queue registers (addresses default to this rig's layout)."""
        values = {abi.REG_QUEUE_BASE_LO: self.addr(HEADER_OFF) if header is None else header,
                  abi.REG_SQ_BASE_LO: self.addr(SQ_OFF) if sq is None else sq,
                  abi.REG_CQ_BASE_LO: self.addr(self.cq_off) if cq is None else cq}
        for lo, value in values.items():
            self.set_reg(lo, value)
            self.set_reg(lo + 4, value >> 32)
        self.set_reg(abi.REG_SQ_ENTRIES, self.sq_entries if sq_entries is None else sq_entries)
        self.set_reg(abi.REG_CQ_ENTRIES, self.cq_entries if cq_entries is None else cq_entries)

    def enable(self, **config: int | None) -> int:
        """Zero the header, configure, enable, and wait until ENABLED or FATAL; returns STATUS."""
        self.mem.write(HEADER_OFF, bytes(abi.QUEUE_HEADER_SIZE))
        self.sq_tail = self.cq_head = 0
        self.configure(**config)
        self.set_reg(abi.REG_QUEUE_ENABLE, 1)
        return self.wait_status(DeviceStatus.ENABLED | DeviceStatus.FATAL)

    def wait_status(self, bits: int, timeout: float = 5.0, *, clear: bool = False) -> int:
        """Poll REG_STATUS until any of ``bits`` is set (or, with ``clear``, all are clear)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.reg(abi.REG_STATUS)
            if (not status & bits) if clear else (status & bits):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"REG_STATUS {status:#x}")
            time.sleep(0.001)

    def submit(self, descs: Iterable[bytes], *, doorbell: bool | None = None) -> int:
        """Write descriptors at sq_tail, publish sq_tail, ring the doorbell when the device
        asks for it (``doorbell`` forces it on or off). Returns how many were written."""
        n = 0
        for d in descs:
            slot = (self.sq_tail + n) % self.sq_entries
            self.mem.write(SQ_OFF + slot * abi.SQ_ENTRY_SIZE, d)
            n += 1
        self.sq_tail = (self.sq_tail + n) & abi.INDEX_MASK
        self.set_hdr(abi.QH_SQ_TAIL, self.sq_tail)
        if doorbell or (doorbell is None and self.hdr(abi.QH_FLAGS) & abi.FLAG_NEED_WAKEUP):
            self.set_reg(abi.REG_DOORBELL, 1)
        return n

    def completions(self, n: int, timeout: float = 10.0) -> list[Completion]:
        """Wait for ``n`` completions and consume them (cq_head advances)."""
        out: list[Completion] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            tail = self.hdr(abi.QH_CQ_TAIL)
            while self.cq_head != tail and len(out) < n:
                slot = self.cq_head % self.cq_entries
                tag, r1, r2, status, _ = abi.COMPLETION.unpack_from(self.mem.view, self.cq_off + slot * abi.CQ_ENTRY_SIZE)
                out.append(Completion(tag, r1, r2, status))
                self.cq_head = (self.cq_head + 1) & abi.INDEX_MASK
            self.set_hdr(abi.QH_CQ_HEAD, self.cq_head)
            if len(out) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(out)} of {n} completions; status {self.reg(abi.REG_STATUS):#x}")
                time.sleep(0)
        return out

    def run(self, descs: Sequence[bytes], timeout: float = 10.0) -> list[Completion]:
        """Submit and wait for all their completions."""
        self.submit(descs)
        return self.completions(len(descs), timeout)

    def cmd(self, opcode: int, args: Sequence[int] = (), **kw: Any) -> Completion:
        """One command, one completion (the tag is checked)."""
        self._tag += 1
        (c,) = self.run([desc(opcode, args, tag=self._tag, **kw)])
        assert c.tag == self._tag, c
        return c

    def alive(self) -> None:
        """The device and the server still answer: a NOP completes OK and a register reads."""
        assert self.reg(abi.REG_MAGIC) == abi.MAGIC_VALUE
        if self.reg(abi.REG_STATUS) & DeviceStatus.ENABLED:
            assert self.cmd(Opcode.NOP).status == 0

    # -- convenience ---------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        c = self.cmd(Opcode.MEM_ALLOC, [size])
        assert c.status == 0, c
        return c.result

    def htod(self, dev: int, data: bytes, off: int = DATA_OFF) -> Completion:
        self.write(off, data)
        return self.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=(self.addr(off), len(data)))

    def dtoh(self, dev: int, n: int, off: int = DATA_OFF) -> bytes:
        c = self.cmd(Opcode.MEM_COPY_DTOH, [dev], sg=(self.addr(off), n))
        assert c.status == 0, c
        return self.read(off, n)

    def sg_list(self, offset: int, entries: Sequence[tuple[int, int]]) -> int:
        """Write an indirect SG list at RAM ``offset``; returns its guest address."""
        self.write(offset, b"".join(abi.SG_ENTRY.pack(a, n) for a, n in entries))
        return self.addr(offset)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a
