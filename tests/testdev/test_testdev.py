"""The test device's register map and DMA/IRQ/reset logic.

Most tests use a fake DeviceContext (guest RAM is a bytearray). One group uses the protocol
layer's real DmaSpace with memfd-backed maps, to prove the device releases its views so that
DMA_UNMAP can munmap.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.dma import DmaSpace
from vxpu.vfio_server.errors import ProtocolError
from vxpu.vfio_server.pci import Command
from vxpu.vfio_server.testdev import TestDevice

from tests.pci.pcihelpers import GUEST_BASE, GUEST_SIZE, FakeContext, bar_read, bar_write, cfg_write, enable
from vxpu.abi import testdev as abi


def attached(**kw: bool) -> tuple[TestDevice, FakeContext]:
    dev, ctx = TestDevice(**kw), FakeContext()
    dev.attach(ctx)
    enable(dev)
    return dev, ctx


def reg(dev: TestDevice, offset: int) -> int:
    return bar_read(dev, 0, offset)


def dma(dev: TestDevice, cmd: int, addr: int, length: int) -> int:
    bar_write(dev, 0, abi.DMA_ADDR_LO, addr, 8)             # LO and HI in one 64-bit write
    bar_write(dev, 0, abi.DMA_LEN, length)
    bar_write(dev, 0, abi.DMA_CMD, cmd)
    return reg(dev, abi.DMA_STATUS)


def test_identity_registers() -> None:
    dev, _ = attached()
    assert reg(dev, abi.MAGIC) == abi.MAGIC_VALUE
    assert dev.region_read(0, abi.MAGIC, 4) == b"VXPU"
    assert reg(dev, abi.VERSION) == abi.VERSION_VALUE
    bar_write(dev, 0, abi.MAGIC, 0)
    assert reg(dev, abi.MAGIC) == abi.MAGIC_VALUE


def test_scratch_registers_all_sizes() -> None:
    dev, _ = attached()
    bar_write(dev, 0, abi.SCRATCH, 0x0123456789ABCDEF, 8)
    assert reg(dev, abi.SCRATCH) == 0x89ABCDEF and reg(dev, abi.SCRATCH2) == 0x01234567
    bar_write(dev, 0, abi.SCRATCH + 1, 0xEE, 1)
    bar_write(dev, 0, abi.SCRATCH2 + 2, 0xBEEF, 2)
    assert bar_read(dev, 0, abi.SCRATCH, 8) == 0xBEEF4567_89ABEEEF


def test_bar2_is_scratch_memory() -> None:
    dev, _ = attached()
    dev.region_write(2, 0x1003, b"abcdefg")
    assert dev.region_read(2, 0x1000, 12) == b"\0\0\0abcdefg\0\0"
    assert dev.region_read(2, abi.BAR2_SIZE - 4, 4) == bytes(4)


def test_dma_read_crc32() -> None:
    dev, ctx = attached()
    data = os.urandom(100_000)
    ctx.dma.mem[0x2000:0x2000 + len(data)] = data
    assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE + 0x2000, len(data)) == abi.DMA_OK
    assert reg(dev, abi.DMA_RESULT) == zlib.crc32(data)
    assert reg(dev, abi.DMA_CMD) == 0                         # write-only


def test_dma_fill_pattern_and_invert() -> None:
    dev, ctx = attached()
    assert dma(dev, abi.DMA_CMD_FILL_PATTERN, GUEST_BASE + 5, 1000) == abi.DMA_OK
    assert bytes(ctx.dma.mem[5:1005]) == abi.pattern(1000)
    assert ctx.dma.mem[4] == 0 and ctx.dma.mem[1005] == 0
    assert dma(dev, abi.DMA_CMD_INVERT, GUEST_BASE + 5, 1000) == abi.DMA_OK
    assert bytes(ctx.dma.mem[5:1005]) == bytes(b ^ 0xFF for b in abi.pattern(1000))
    assert dma(dev, abi.DMA_CMD_FILL_PATTERN, GUEST_BASE, abi.MAX_DMA_LEN) == abi.DMA_OK
    assert bytes(ctx.dma.mem[:abi.MAX_DMA_LEN]) == abi.pattern(abi.MAX_DMA_LEN)
    for view in ctx.dma.exports:                             # every view handed out was released
        with pytest.raises(ValueError):
            len(view)


def test_pattern_definition() -> None:
    assert abi.pattern(0) == b"" and abi.pattern(3) == bytes([3, 10, 17])
    assert abi.pattern(600) == bytes((i * 7 + 3) & 0xFF for i in range(600))


def test_dma_64bit_address_uses_hi_register() -> None:
    dev, _ = attached()
    bar_write(dev, 0, abi.DMA_ADDR_HI, 1)
    bar_write(dev, 0, abi.DMA_ADDR_LO, GUEST_BASE)
    bar_write(dev, 0, abi.DMA_LEN, 16)
    bar_write(dev, 0, abi.DMA_CMD, abi.DMA_CMD_READ)
    assert reg(dev, abi.DMA_STATUS) == abi.DMA_BAD_ADDRESS  # 0x1_0010_0000 is not mapped


@pytest.mark.parametrize("cmd, addr, length, status", [
    (abi.DMA_CMD_READ, GUEST_BASE, 0, abi.DMA_BAD_LEN),
    (abi.DMA_CMD_READ, GUEST_BASE, abi.MAX_DMA_LEN + 1, abi.DMA_BAD_LEN),
    (abi.DMA_CMD_READ, 0x1000, 16, abi.DMA_BAD_ADDRESS),
    (abi.DMA_CMD_READ, GUEST_BASE + GUEST_SIZE - 8, 16, abi.DMA_BAD_ADDRESS),   # crosses the end
    (abi.DMA_CMD_FILL_PATTERN, (1 << 64) - 8, 16, abi.DMA_BAD_ADDRESS),
    (0, GUEST_BASE, 16, abi.DMA_BAD_CMD),
    (4, GUEST_BASE, 16, abi.DMA_BAD_CMD),
])
def test_dma_errors(cmd: int, addr: int, length: int, status: int) -> None:
    dev, ctx = attached()
    before = bytes(ctx.dma.mem)
    assert dma(dev, cmd, addr, length) == status
    assert bytes(ctx.dma.mem) == before


def test_dma_write_to_read_only_map_is_bad_address() -> None:
    dev, ctx = attached()
    ctx.dma.read_only = (GUEST_BASE, 0x1000)
    assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE, 64) == abi.DMA_OK
    assert dma(dev, abi.DMA_CMD_FILL_PATTERN, GUEST_BASE, 64) == abi.DMA_BAD_ADDRESS
    assert bytes(ctx.dma.mem[:64]) == bytes(64)


def test_no_dma_without_bus_master() -> None:
    dev, ctx = attached()
    enable(dev, Command.MEMORY)
    assert dma(dev, abi.DMA_CMD_FILL_PATTERN, GUEST_BASE, 64) == abi.DMA_NO_BUS_MASTER
    assert bytes(ctx.dma.mem[:64]) == bytes(64)
    dev.detach()                                             # no client: nothing is mapped
    enable(dev)
    assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE, 64) == abi.DMA_BAD_ADDRESS


def test_status_of_the_last_command_wins() -> None:
    dev, _ = attached()
    assert dma(dev, 9, GUEST_BASE, 1) == abi.DMA_BAD_CMD
    assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE, 1) == abi.DMA_OK


def test_interrupt_after_dma_when_enabled() -> None:
    dev, ctx = attached()
    dma(dev, abi.DMA_CMD_READ, GUEST_BASE, 4)
    assert ctx.raised == [] and reg(dev, abi.IRQ_COUNT) == 0
    bar_write(dev, 0, abi.IRQ_ENABLE, abi.IRQ_ENABLE_DMA_DONE)
    dma(dev, abi.DMA_CMD_READ, GUEST_BASE, 4)
    dma(dev, 7, GUEST_BASE, 4)                               # failed commands interrupt too
    assert ctx.raised == [0, 0] and reg(dev, abi.IRQ_COUNT) == 2


def test_irq_raise_register() -> None:
    dev, ctx = attached()
    bar_write(dev, 0, abi.IRQ_RAISE, 0)                      # INTx: one vector
    bar_write(dev, 0, abi.IRQ_RAISE, 1)                      # beyond the vector count: ignored
    assert ctx.raised == [0] and reg(dev, abi.IRQ_COUNT) == 1
    ctx.deliver = False                                      # no eventfd: not counted
    bar_write(dev, 0, abi.IRQ_RAISE, 0)
    assert reg(dev, abi.IRQ_COUNT) == 1
    ctx.deliver = True
    enable(dev, Command.MEMORY | Command.BUS_MASTER | Command.INTX_DISABLE)
    bar_write(dev, 0, abi.IRQ_RAISE, 0)                      # INTx disabled and no MSI
    assert reg(dev, abi.IRQ_COUNT) == 1 and dev.interrupt_vectors == 0


def test_irq_raise_with_msi_and_msix() -> None:
    dev, ctx = attached(msix=True)
    cfg_write(dev, dev.msi.offset + 2, 2, 0x0001)            # type: ignore[union-attr]
    assert dev.interrupt_vectors == 1
    bar_write(dev, 0, abi.IRQ_RAISE, 1)
    bar_write(dev, 0, abi.IRQ_RAISE, 0)
    cfg_write(dev, dev.msix.offset + 2, 2, 0x8000)           # type: ignore[union-attr]
    bar_write(dev, 0, abi.IRQ_RAISE, 1)
    bar_write(dev, 0, abi.IRQ_RAISE, 2)
    assert ctx.raised == [0, 1] and reg(dev, abi.IRQ_COUNT) == 2


def test_reset_restores_registers_and_counts_itself() -> None:
    dev, _ = attached()
    bar_write(dev, 0, abi.SCRATCH, 0x1234)
    bar_write(dev, 0, abi.IRQ_ENABLE, 1)
    bar_write(dev, 0, abi.IRQ_RAISE, 0)
    dev.region_write(2, 0, b"x" * 16)
    dma(dev, 9, GUEST_BASE, 1)
    dev.reset()
    assert dev.command == 0
    enable(dev)
    assert [reg(dev, o) for o in (abi.SCRATCH, abi.IRQ_ENABLE, abi.IRQ_COUNT, abi.DMA_STATUS)] == [0, 0, 0, 0]
    assert reg(dev, abi.MAGIC) == abi.MAGIC_VALUE
    assert dev.region_read(2, 0, 16) == bytes(16)
    assert reg(dev, abi.RESET_COUNT) == 1
    dev.reset()
    enable(dev)
    assert reg(dev, abi.RESET_COUNT) == 2


# -- message-only guest memory (no share=on): asynchronous DMA ----------------------------------

def test_message_dma_runs_asynchronously() -> None:
    dev, ctx = attached()
    ctx.dma.message_only = (GUEST_BASE, 0x10000)
    ctx.dma.mem[0:4] = b"abcd"
    bar_write(dev, 0, abi.IRQ_ENABLE, 1)
    assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE, 4) == abi.DMA_BUSY
    bar_write(dev, 0, abi.DMA_CMD, abi.DMA_CMD_INVERT)       # ignored while busy
    assert len(ctx.dma.pending) == 1 and ctx.raised == []
    ctx.dma.complete_all()
    assert reg(dev, abi.DMA_STATUS) == abi.DMA_OK and reg(dev, abi.DMA_RESULT) == zlib.crc32(b"abcd")
    assert ctx.raised == [0]
    assert dma(dev, abi.DMA_CMD_INVERT, GUEST_BASE, 4) == abi.DMA_BUSY
    ctx.dma.complete_all()                                   # read, then the write-back
    assert bytes(ctx.dma.mem[0:4]) == bytes(b ^ 0xFF for b in b"abcd")
    assert dma(dev, abi.DMA_CMD_FILL_PATTERN, GUEST_BASE, 8) == abi.DMA_BUSY
    ctx.dma.complete_all()
    assert reg(dev, abi.DMA_STATUS) == abi.DMA_OK and bytes(ctx.dma.mem[0:8]) == abi.pattern(8)
    assert ctx.raised == [0, 0, 0]


def test_message_dma_dropped_by_reset_and_detach() -> None:
    dev, ctx = attached()
    ctx.dma.message_only = (GUEST_BASE, 0x10000)
    assert dma(dev, abi.DMA_CMD_FILL_PATTERN, GUEST_BASE, 8) == abi.DMA_BUSY
    dev.reset()
    enable(dev)
    ctx.dma.complete_all()                                   # late completion: no status change
    assert reg(dev, abi.DMA_STATUS) == abi.DMA_OK and reg(dev, abi.IRQ_COUNT) == 0
    assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE, 8) == abi.DMA_BUSY
    dev.detach()
    assert reg(dev, abi.DMA_STATUS) == abi.DMA_BAD_ADDRESS
    assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE, 8) == abi.DMA_BAD_ADDRESS   # no longer busy


# -- the protocol layer's real DmaSpace over a memfd -------------------------------------------

class _RealContext:
    def __init__(self, space: DmaSpace) -> None:
        self.dma = space
        self.log = logging.getLogger("test.testdev")

    def raise_irq(self, vector: int = 0) -> bool:
        return False


def test_dma_through_real_memfd_maps_and_unmap_after(caplog: pytest.LogCaptureFixture) -> None:
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, 2 << 20)
        space = DmaSpace()
        space.map(GUEST_BASE, 1 << 20, 0, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, fd)
        space.map(GUEST_BASE + (1 << 20), 1 << 20, 1 << 20, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, fd)
        dev = TestDevice()
        dev.attach(_RealContext(space))
        enable(dev)
        assert dma(dev, abi.DMA_CMD_FILL_PATTERN, GUEST_BASE + 100, 4096) == abi.DMA_OK
        with mmap.mmap(fd, 2 << 20) as mm:
            assert mm[100:100 + 4096] == abi.pattern(4096)
            assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE + 100, 4096) == abi.DMA_OK
            assert reg(dev, abi.DMA_RESULT) == zlib.crc32(abi.pattern(4096))
            # A range crossing from one map into the next is refused.
            assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE + (1 << 20) - 8, 16) == abi.DMA_BAD_ADDRESS
        with caplog.at_level(logging.WARNING):
            assert space.unmap(GUEST_BASE, 1 << 20) == 1
        assert "still uses it" not in caplog.text            # the device left no view behind
        assert dma(dev, abi.DMA_CMD_READ, GUEST_BASE, 16) == abi.DMA_BAD_ADDRESS
        space.close()
    finally:
        os.close(fd)


def test_registers_need_aligned_sizes() -> None:
    dev, _ = attached()
    for offset, size in ((abi.SCRATCH + 1, 4), (abi.SCRATCH, 3), (abi.SCRATCH + 4, 8)):
        with pytest.raises(ProtocolError) as exc:
            dev.region_read(0, offset, size)
        assert exc.value.errno == errno.EINVAL


@settings(max_examples=150, deadline=None)
@given(region=st.sampled_from([0, 2, 7]), offset=st.integers(0, 0x10000), count=st.integers(0, 16),
       write=st.booleans(), value=st.integers(0, (1 << 128) - 1))
def test_hostile_accesses_fail_only_with_protocol_errors(region: int, offset: int, count: int, write: bool,
                                                         value: int) -> None:
    """Any in-range access either works (reads return exactly ``count`` bytes) or raises a
    ProtocolError with an errno; nothing else escapes, whatever the registers do."""
    dev, _ = attached(msix=True)
    size = dev.region_info(region).size
    offset = offset % size
    count = min(count, size - offset)
    try:
        if write:
            dev.region_write(region, offset, (value & ((1 << (8 * count)) - 1)).to_bytes(count, "little"))
        else:
            assert len(dev.region_read(region, offset, count)) == count
    except ProtocolError as exc:
        assert exc.errno in (errno.EINVAL, errno.EIO)
