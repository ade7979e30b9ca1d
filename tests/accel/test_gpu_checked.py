"""The GPU side of checked IR kernels without a GPU: hidden-argument layout, the pack the driver
gets, and the fault record, all checked against what the lowering emits."""

from __future__ import annotations

import struct

import pytest
from vxpu.accel import gpu_checked
from vxpu.accel.backend import BackendError, KernelInfo
from vxpu.accel.gpu_common import ArgPack
from vxpu.ir.lower.gpu import FAULT_RECORD, FAULT_RECORD_SIZE

# saxpy: (n: i32, a: f32, x: ptr, y: ptr)
SAXPY = KernelInfo("saxpy", (4, 4, 8, 8), (0, 4, 8, 16), 24, 0, True, (2, 3))


def test_launch_info_appends_bounds_record_kernel_id_and_windows():
    full = gpu_checked.launch_info(SAXPY)
    # 2 pointers: bounds, their windows (8 i32 each), the common windows (8 i32), record, kernel id
    assert full.param_sizes == (4, 4, 8, 8, 8, 8, 8, 8) + (4,) * 24 + (8, 4)
    assert full.param_offsets == (0, 4, 8, 16, 24, 32, 40, 48) + tuple(range(56, 152, 4)) + (152, 160)
    assert full.args_size == 164         # where the last parameter ends, as the hsaco metadata says


def test_odd_guest_size_is_padded_to_eight():
    info = KernelInfo("k", (4, 8), (0, 8), 16, 0, True, (1,))
    one = KernelInfo("k1", (4,), (0,), 4, 0, True, ())
    assert gpu_checked.launch_info(info).param_offsets[2:4] == (16, 24)
    assert gpu_checked.launch_info(info).param_offsets[-2:] == (96, 104)
    assert gpu_checked.launch_info(info).args_size == 108
    assert gpu_checked.launch_info(one).param_offsets == (0, 8, 16) and gpu_checked.launch_info(one).args_size == 20


def test_fill_writes_guest_and_hidden_arguments():
    pack = ArgPack(gpu_checked.launch_info(SAXPY))
    guard = gpu_checked.CheckedArgs(SAXPY, kernel_id=7)
    args = struct.pack("<ifQQ", 10, 2.0, 0x1008, 0x2000)
    guard.fill(pack.view, args, [(0x1000, 40), (0, 0)], 0xABC000)
    raw = bytes(pack.view)
    assert raw[:24] == args
    assert struct.unpack_from("<QQQQ", raw, 24) == (0x1000, 40, 0, 0)
    # x = base + 8 in 40 bytes: bytes -8..31, halves -4..15, words -2..7, dwords -1..3; y: none
    assert struct.unpack_from("<16i", raw, 56) == (-8, 31, -4, 15, -2, 7, -1, 3) + (1, 0) * 4
    assert struct.unpack_from("<8i", raw, 120) == (1, 0) * 4          # common: y admits nothing
    assert struct.unpack_from("<QI", raw, 152) == (0xABC000, 7)
    guard.fill(pack.view, struct.pack("<ifQQ", 10, 2.0, 0x1008, 0x2000), [(0x1000, 40), (0x2000, 16)], 0xABC000)
    assert struct.unpack_from("<8i", bytes(pack.view), 120) == (0, 15, 0, 7, 0, 3, 0, 1)   # the intersection
    with pytest.raises(BackendError):
        guard.fill(pack.view, args, [(0x1000, 40)], 0)
    with pytest.raises(BackendError):
        guard.fill(pack.view, args[:-1], [(0x1000, 40), (0, 0)], 0)


def test_windows_come_from_the_pointer_the_kernel_gets(monkeypatch):
    """The windows describe the pointers copied into the pack, not a second read of ``args``:
    argument bytes that change after the copy (a buffer the guest could still write) must not
    give a pointer another pointer's window."""
    pack = ArgPack(gpu_checked.launch_info(SAXPY))
    guard = gpu_checked.CheckedArgs(SAXPY, kernel_id=7)
    args = bytearray(struct.pack("<ifQQ", 10, 2.0, 0x1008, 0x2000))
    real = gpu_checked._windows
    calls = []

    def changing(pointer, base, length):
        calls.append(pointer)
        struct.pack_into("<Q", args, 16, 0x1000)     # y now claims x's base, after the copy
        return real(pointer, base, length)

    monkeypatch.setattr(gpu_checked, "_windows", changing)
    guard.fill(pack.view, memoryview(args), [(0x1000, 40), (0x2000, 16)], 0xABC000)
    raw = bytes(pack.view)
    assert calls == [0x1008, 0x2000]
    assert struct.unpack_from("<Q", raw, 16) == (0x2000,)
    assert struct.unpack_from("<8i", raw, 88) == (0, 15, 0, 7, 0, 3, 0, 1)    # y's own window


def test_window_sizes_match_the_lowering():
    from vxpu.ir.lower.gpucheck import WINDOW_SIZES
    assert gpu_checked.WINDOW_SIZES == WINDOW_SIZES


def test_record_layout_matches_the_lowering():
    assert gpu_checked.RECORD_SIZE == FAULT_RECORD_SIZE
    raw = bytearray(FAULT_RECORD_SIZE)
    assert gpu_checked.decode_record(bytes(raw), ["k"]) is None
    for name, value in (("claimed", 1), ("code", 1), ("origin", 3), ("kernel_id", 1),
                        ("block_x", 5), ("block_y", 6), ("block_z", 7), ("thread_x", 8), ("thread_y", 9),
                        ("thread_z", 10)):
        struct.pack_into("<I", raw, FAULT_RECORD[name], value)
    struct.pack_into("<q", raw, FAULT_RECORD["offset"], -4)
    rec = gpu_checked.decode_record(bytes(raw), ["a", "saxpy"])
    assert rec is not None
    assert (rec.kernel, rec.code, rec.param, rec.offset, rec.block, rec.thread) == (
        "saxpy", 1, 3, (1 << 64) - 4, (5, 6, 7), (8, 9, 10))
    assert "offset -4" in rec.describe() and "parameter 3" in rec.describe()
