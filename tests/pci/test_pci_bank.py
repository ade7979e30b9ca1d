"""Register banks: access sizes 1/2/4/8, spanning accesses, access kinds, precise errnos."""

from __future__ import annotations

import errno

import pytest
from vxpu.vfio_server.errors import ProtocolError
from vxpu.vfio_server.pci import Access, DeviceDefinitionError, RamRegion, Register, RegisterBank


def make_bank(log: list[tuple[str, int]] | None = None) -> RegisterBank:
    log = log if log is not None else []
    return RegisterBank(0x100, [
        Register(0x00, "ID", Access.RO, 0x11223344),
        Register(0x04, "A", Access.RW),
        Register(0x08, "B", Access.RW, wmask=0x0000FFFF),
        Register(0x0C, "IRQ", Access.W1C, 0xF0),
        Register(0x10, "GO", Access.WO, on_write=lambda v: log.append(("GO", v))),
        Register(0x14, "CNT", Access.RO, on_read=lambda: 0x1_0000_0007),
        Register(0x18, "WIDE", Access.RW, width=8, on_write=lambda v: log.append(("WIDE", v))),
        Register(0x20, "KEEP", Access.RW, 5, keep_on_reset=True),
        Register(0x24, "SMALL", Access.RW, width=2),
    ])


@pytest.mark.parametrize("size, offset, expected", [
    (1, 0, 0x44), (1, 3, 0x11), (2, 0, 0x3344), (2, 2, 0x1122), (4, 0, 0x11223344),
])
def test_read_sizes_within_a_register(size: int, offset: int, expected: int) -> None:
    assert int.from_bytes(make_bank().read(offset, size), "little") == expected


def test_eight_byte_access_spans_two_registers_in_order() -> None:
    log: list[tuple[str, int]] = []
    bank = make_bank(log)
    bank.write(0x00, (0xAAAA_BBBB_CCCC_DDDD).to_bytes(8, "little"))   # ID is RO, A is RW
    assert bank.get("ID") == 0x11223344 and bank.get("A") == 0xAAAABBBB
    assert int.from_bytes(bank.read(0x00, 8), "little") == 0xAAAABBBB_11223344
    bank.write(0x10, (0x1234_0000_0042).to_bytes(8, "little"))          # GO then CNT (RO)
    assert log == [("GO", 0x42)]
    assert int.from_bytes(bank.read(0x10, 8), "little") == 0x7_00000000  # GO reads 0; on_read masked


def test_rw_mask_partial_writes_and_wide_register() -> None:
    log: list[tuple[str, int]] = []
    bank = make_bank(log)
    bank.write(0x08, b"\xff\xff\xff\xff")
    assert bank.get("B") == 0xFFFF                            # only the low half is writable
    bank.write(0x05, b"\x12")                                 # byte 1 of A
    bank.write(0x06, b"\x34\x56")
    assert bank.get("A") == 0x56341200
    bank.write(0x1C, b"\x01\x00\x00\x00")                     # upper half of a 64-bit register
    assert bank.get("WIDE") == 0x1_0000_0000 and log == [("WIDE", 0x1_0000_0000)]
    bank.write(0x18, (0xDEAD_BEEF_0BAD_F00D).to_bytes(8, "little"))
    assert int.from_bytes(bank.read(0x18, 8), "little") == 0xDEAD_BEEF_0BAD_F00D
    assert int.from_bytes(bank.read(0x1C, 4), "little") == 0xDEADBEEF
    bank.write(0x24, b"\xcd\xab")
    assert int.from_bytes(bank.read(0x24, 4), "little") == 0xABCD       # 0x26-0x27 reserved


def test_w1c_wo_and_unmapped_offsets() -> None:
    log: list[tuple[str, int]] = []
    bank = make_bank(log)
    bank.write(0x0C, (0x30).to_bytes(4, "little"))
    assert bank.get("IRQ") == 0xC0
    bank.write(0x13, b"\x01")                                 # partial WO write merges into 0
    assert log == [("GO", 0x01000000)]
    assert bank.read(0x80, 8) == bytes(8)                     # no register: reads zero
    bank.write(0x80, b"\xff" * 8)                             # and ignores writes
    assert bank.read(0x80, 8) == bytes(8)


def test_reset_restores_values_except_keep_on_reset() -> None:
    bank = make_bank()
    bank.write(0x04, b"\x01\x00\x00\x00")
    bank.set("KEEP", 9)
    bank.set("IRQ", 0)
    bank.reset()
    assert bank.get("A") == 0 and bank.get("IRQ") == 0xF0 and bank.get("KEEP") == 9


@pytest.mark.parametrize("offset, size", [(0, 3), (0, 16), (0, 0), (2, 4), (4, 8), (1, 2), (0xFC, 8), (0x100, 1)])
def test_bad_sizes_offsets_are_einval(offset: int, size: int) -> None:
    bank = make_bank()
    with pytest.raises(ProtocolError) as exc:
        bank.read(offset, size)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError) as exc:
        bank.write(offset, bytes(size))
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("regs, why", [
    ([Register(0x02, "X", width=4)], "width"),
    ([Register(0x00, "X", width=3)], "width"),
    ([Register(0x00, "X", width=8), Register(0x04, "Y")], "overlaps"),
    ([Register(0x00, "X"), Register(0x04, "X")], "twice"),
    ([Register(0xFC, "X", width=8)], "width"),
    ([Register(0x100, "X")], "leaves"),
    ([Register(0x00, "X", reset=1 << 32)], "wider"),
])
def test_bad_register_definitions(regs: list[Register], why: str) -> None:
    with pytest.raises(DeviceDefinitionError, match=why):
        RegisterBank(0x100, regs)


def test_ram_region_any_size_and_reset() -> None:
    ram = RamRegion(64)
    ram.write(3, b"hello world")
    assert ram.read(0, 16) == b"\0\0\0hello world\0\0"
    ram.reset()
    assert ram.read(0, 64) == bytes(64)
