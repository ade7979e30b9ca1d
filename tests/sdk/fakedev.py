"""An in-process stand-in for the accelerator, for ring-driver unit tests (no server, no JIT).

:class:`FakeTransport` implements the Transport protocol over a bytearray "guest RAM" and a
tiny device: it keeps FLAG_NEED_WAKEUP set (it is always asleep) and runs every submitted
descriptor when the doorbell is written, so each test sees exactly which doorbells the driver
rang. It knows NOP, MEM_ALLOC, MEM_FREE, MEM_SET, MEM_COPY_HTOD/DTOH (inline or indirect SG),
FENCE, MODULE_LOAD (IR), MODULE_UNLOAD, KERNEL_GET and LAUNCH (recorded in ``launches`` with the
argument bytes it read, not run); ``complete_limit`` holds completions back to model a slow
device; ``fence_fault`` makes the next FENCE report a (status, result2) pair, as a kernel fault
surfacing there would.
"""

from __future__ import annotations

import struct

from vxpu.guest.transport import DmaMemory
from vxpu.ir import decode
from vxpu.ir.args import kernel_signature

from vxpu.abi import xpu
from vxpu.abi.status import Status

BASE = 0x1000_0000
_U32 = struct.Struct("<I")


class FakeTransport:
    name = "fake"

    def __init__(self, size: int = 8 << 20) -> None:
        self.ram = bytearray(size)
        self.view = memoryview(self.ram)
        self.next = 0
        self.regs: dict[int, int] = {xpu.REG_MAGIC: xpu.MAGIC_VALUE, xpu.REG_VERSION: xpu.VERSION_VALUE}
        self.doorbells = 0
        self.sq_head = self.cq_tail = 0
        self.device_mem: dict[int, bytearray] = {}
        self.next_dev = 0x10000
        self.complete_limit: int | None = None      # post at most this many completions per doorbell
        self.max_pending_seen = 0
        self.fence_fault: tuple[int, int] | None = None   # the next FENCE completes with (status, result2)
        self.fault_drops_state = False                      # ... and the device drops every allocation
        self.modules: dict[int, dict[str, int]] = {}        # module handle -> kernel name -> args size
        self.kernels: dict[int, tuple[int, int]] = {}       # kernel handle -> (module, args size)
        self.launches: list[tuple[int, int, int, int, bytes]] = []   # kernel, dims a1..a3, argument bytes

    # -- Transport -----------------------------------------------------------------------------
    def read_reg(self, offset: int) -> int:
        if offset == xpu.REG_STATUS:
            if self.regs.get(xpu.REG_QUEUE_ENABLE):
                self.run()           # like the real device's periodic re-check while asleep
            return int(xpu.DeviceStatus.ENABLED) if self.regs.get(xpu.REG_QUEUE_ENABLE) else 0
        return self.regs.get(offset, 0)

    def write_reg(self, offset: int, value: int) -> None:
        self.regs[offset] = value
        if offset == xpu.REG_QUEUE_ENABLE and value:
            self.sq_head = self.cq_tail = 0
            self._hdr_store(xpu.QH_FLAGS, xpu.FLAG_NEED_WAKEUP)
        if offset == xpu.REG_DOORBELL:
            self.doorbells += 1
            self.run()

    def alloc_dma(self, size: int, *, contiguous: bool = False) -> DmaMemory:
        size = -(-size // 4096) * 4096
        off = self.next
        self.next += size
        assert self.next <= len(self.ram), "fake RAM exhausted"
        return DmaMemory(self.view[off:off + size], [(0, BASE + off, size)])

    def free_dma(self, mem: DmaMemory) -> None:
        pass

    def close(self) -> None:
        pass

    # -- the device ----------------------------------------------------------------------------
    def _reg64(self, lo: int) -> int:
        return self.regs.get(lo, 0) | self.regs.get(lo + 4, 0) << 32

    def _hdr_store(self, off: int, value: int) -> None:
        _U32.pack_into(self.ram, self._reg64(xpu.REG_QUEUE_BASE_LO) - BASE + off, value)

    def _hdr_load(self, off: int) -> int:
        return _U32.unpack_from(self.ram, self._reg64(xpu.REG_QUEUE_BASE_LO) - BASE + off)[0]

    def run(self) -> None:
        sq, cq = self._reg64(xpu.REG_SQ_BASE_LO) - BASE, self._reg64(xpu.REG_CQ_BASE_LO) - BASE
        nsq, ncq = self.regs[xpu.REG_SQ_ENTRIES], self.regs[xpu.REG_CQ_ENTRIES]
        tail = self._hdr_load(xpu.QH_SQ_TAIL)
        pending = (tail - self.sq_head) & xpu.INDEX_MASK
        assert pending <= nsq, f"driver overfilled the SQ: {pending} > {nsq}"
        self.max_pending_seen = max(self.max_pending_seen, pending)
        budget = pending if self.complete_limit is None else min(pending, self.complete_limit)
        for _ in range(budget):
            cq_head = self._hdr_load(xpu.QH_CQ_HEAD)
            assert (self.cq_tail - cq_head) & xpu.INDEX_MASK < ncq, "driver let the CQ overflow"
            d = xpu.DESCRIPTOR.unpack_from(self.ram, sq + (self.sq_head % nsq) * 64)
            status, result, *rest = self._execute(d)
            result2 = rest[0] if rest else 0
            if d[0] == xpu.Opcode.FENCE and self.fence_fault is not None:
                (status, result2), self.fence_fault = self.fence_fault, None
                if self.fault_drops_state:
                    self.device_mem.clear()
                    self.modules.clear()
                    self.kernels.clear()
            xpu.COMPLETION.pack_into(self.ram, cq + (self.cq_tail % ncq) * 32, d[3], result, result2, status, 0)
            self.sq_head = (self.sq_head + 1) & xpu.INDEX_MASK
            self.cq_tail = (self.cq_tail + 1) & xpu.INDEX_MASK
            self._hdr_store(xpu.QH_SQ_HEAD, self.sq_head)
            self._hdr_store(xpu.QH_CQ_TAIL, self.cq_tail)

    def _sg(self, d: tuple[int, ...]) -> list[tuple[int, int]]:
        flags, count, addr, length = d[1], d[2], d[8], d[9]
        if flags & xpu.DescFlags.SG_INDIRECT:
            return [xpu.SG_ENTRY.unpack_from(self.ram, addr - BASE + 16 * i) for i in range(count)]
        return [(addr, length)] if count else []

    def _execute(self, d: tuple[int, ...]) -> tuple[int, ...]:
        """``(status, result)``, or ``(status, result, result2)``."""
        op, a0 = d[0], d[4]
        if op in (xpu.Opcode.NOP, xpu.Opcode.FENCE):
            return 0, 0
        if op == xpu.Opcode.MEM_ALLOC:
            addr, self.next_dev = self.next_dev, self.next_dev + max(a0, 256)
            self.device_mem[addr] = bytearray(a0)
            return 0, addr
        if op == xpu.Opcode.MEM_SET:
            base = max((b for b in self.device_mem if b <= a0), default=None)
            n = d[6]
            if base is None or a0 - base + n > len(self.device_mem[base]):
                return Status.OUT_OF_RANGE, 0
            self.device_mem[base][a0 - base:a0 - base + n] = bytes([d[5]]) * n
            return 0, 0
        if op == xpu.Opcode.MEM_FREE:
            return (0, 0) if self.device_mem.pop(a0, None) is not None else (Status.INVALID_HANDLE, 0)
        if op in (xpu.Opcode.MEM_COPY_HTOD, xpu.Opcode.MEM_COPY_DTOH):
            base = max((b for b in self.device_mem if b <= a0), default=None)
            segs = self._sg(d)
            total = sum(n for _, n in segs)
            if base is None or a0 - base + total > len(self.device_mem[base]) or \
                    any(not BASE <= s < BASE + len(self.ram) for s, _ in segs):
                return Status.OUT_OF_RANGE, 0
            mem, pos = self.device_mem[base], a0 - base
            for addr, n in segs:
                if op == xpu.Opcode.MEM_COPY_HTOD:
                    mem[pos:pos + n] = self.ram[addr - BASE:addr - BASE + n]
                else:
                    self.ram[addr - BASE:addr - BASE + n] = mem[pos:pos + n]
                pos += n
            return 0, 0
        if op == xpu.Opcode.MODULE_LOAD:
            image = b"".join(bytes(self.ram[a - BASE:a - BASE + n]) for a, n in self._sg(d))
            handle, self.next_dev = self.next_dev, self.next_dev + 256
            self.modules[handle] = {k.name: kernel_signature(k).args_size for k in decode(image).kernels}
            return 0, handle
        if op == xpu.Opcode.MODULE_UNLOAD:
            if self.modules.pop(a0, None) is None:
                return Status.INVALID_HANDLE, 0
            self.kernels = {k: v for k, v in self.kernels.items() if v[0] != a0}
            return 0, 0
        if op == xpu.Opcode.KERNEL_GET:
            name = b"".join(bytes(self.ram[a - BASE:a - BASE + n]) for a, n in self._sg(d)).decode()
            if a0 not in self.modules:
                return Status.INVALID_HANDLE, 0
            if name not in self.modules[a0]:
                return Status.NOT_FOUND, 0
            handle, self.next_dev = self.next_dev, self.next_dev + 256
            self.kernels[handle] = (a0, self.modules[a0][name])
            return 0, handle, self.modules[a0][name]
        if op == xpu.Opcode.LAUNCH:
            blob = b"".join(bytes(self.ram[a - BASE:a - BASE + n]) for a, n in self._sg(d))
            if a0 not in self.kernels:
                return Status.INVALID_HANDLE, 0
            if len(blob) != self.kernels[a0][1]:
                return Status.INVALID_ARGUMENT, 0
            self.launches.append((a0, d[5], d[6], d[7], blob))
            return 0, 0
        return Status.UNSUPPORTED, 0
