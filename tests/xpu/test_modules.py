"""MODULE_LOAD, MODULE_UNLOAD, KERNEL_GET and LAUNCH (docs/device-abi.md §4.6), with hostile
variants: malformed and oversized modules, unknown and disabled module kinds, bad kernel names,
foreign, freed and stale handles, bad grid/block shapes and argument blobs, and a faulting
kernel, whose KERNEL_FAULT the next FENCE reports while the device keeps serving.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from vxpu.accel.quota import Quota
from vxpu.ir import binary, text
from vxpu.ir.args import kernel_signature, pack_args

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import Opcode

from .ringdriver import DATA_OFF, XpuRig, desc

SAXPY = """
module @saxpy
kernel @saxpy(%n: i32, %a: f32, %x: ptr<global>, %y: ptr<global>) {
^entry:
  %tid = thread_id.x
  %bid = block_id.x
  %bdim = block_dim.x
  %base = mul %bid, %bdim : i32
  %i = add %base, %tid : i32
  %inb = icmp slt %i, %n
  cbr %inb, ^body, ^exit
^body:
  %px = offset %x, %i : f32
  %py = offset %y, %i : f32
  %xv = load %px : f32
  %yv = load %py : f32
  %ax = fmul %a, %xv : f32
  %r = fadd %ax, %yv : f32
  store %r, %py
  br ^exit
^exit:
  ret
}
"""

OOB = """
module @oob
kernel @oob_store(%x: ptr<global>) {
^entry:
  %far = const 1000000000 : i32
  %p = offset %x, %far : f32
  %v = const 1.0 : f32
  store %v, %p
  ret
}
"""

MOD_OFF = DATA_OFF + 0x100000
NAME_OFF = DATA_OFF + 0x180000
ARGS_OFF = DATA_OFF + 0x190000


def _image(source: str) -> bytes:
    return binary.encode(text.parse(source), names=False)


def _load(rig: XpuRig, image: bytes, kind: int = abi.ModuleKind.IR) -> tuple[int, int]:
    rig.write(MOD_OFF, image)
    c = rig.cmd(Opcode.MODULE_LOAD, [kind], sg=(rig.addr(MOD_OFF), len(image)))
    return c.status, c.result


def _kernel(rig: XpuRig, module: int, name: bytes) -> tuple[int, int, int]:
    rig.write(NAME_OFF, name)
    c = rig.cmd(Opcode.KERNEL_GET, [module], sg=(rig.addr(NAME_OFF), len(name)) if name else None)
    return c.status, c.result, c.result2


def _launch(rig: XpuRig, kernel: int, grid: tuple[int, int, int], block: tuple[int, int, int],
            blob: bytes, shared: int = 0) -> int:
    rig.write(ARGS_OFF, blob)
    dims = abi.pack_launch_dims(grid, block, shared)
    return rig.cmd(Opcode.LAUNCH, [kernel, *dims], sg=(rig.addr(ARGS_OFF), len(blob)) if blob else None).status


@pytest.fixture
def saxpy(rig):
    status, module = _load(rig, _image(SAXPY))
    assert status == Status.OK
    status, kernel, args_size = _kernel(rig, module, b"saxpy")
    assert status == Status.OK
    sig = kernel_signature(text.parse(SAXPY).kernels[0])
    assert args_size == sig.args_size
    return module, kernel, sig


def test_saxpy_end_to_end(rig, saxpy):
    _module, kernel, sig = saxpy
    n = 1000
    x = np.random.default_rng(1).random(n, dtype=np.float32)
    y = np.random.default_rng(2).random(n, dtype=np.float32)
    dx, dy = rig.alloc(4 * n), rig.alloc(4 * n)
    assert rig.htod(dx, x.tobytes()).status == 0 and rig.htod(dy, y.tobytes()).status == 0
    assert _launch(rig, kernel, (4, 1, 1), (256, 1, 1), pack_args(sig, [n, 2.5, dx, dy])) == Status.OK
    assert rig.cmd(Opcode.FENCE).status == Status.OK
    got = np.frombuffer(rig.dtoh(dy, 4 * n), dtype=np.float32)
    np.testing.assert_array_equal(got, np.float32(2.5) * x + y)


def test_same_kernel_name_gives_the_same_handle(rig, saxpy):
    module, kernel, _sig = saxpy
    assert _kernel(rig, module, b"saxpy")[:2] == (Status.OK, kernel)


@pytest.mark.parametrize("image", [
    b"\x00",
    b"not a module at all" * 10,
    os.urandom(4096),
    _image(SAXPY)[:-7],                                   # truncated
    _image(SAXPY)[:20] + b"\xff" * 50 + _image(SAXPY)[70:],
])
def test_malformed_module_is_bad_module(rig, image):
    assert _load(rig, image)[0] == Status.BAD_MODULE
    rig.alive()


def test_module_kinds(rig):
    img = _image(SAXPY)
    assert _load(rig, img, kind=99)[0] == Status.INVALID_ARGUMENT
    for kind in (abi.ModuleKind.PTX, abi.ModuleKind.CUBIN, abi.ModuleKind.HSACO, abi.ModuleKind.ONNX):
        assert _load(rig, img, kind=kind)[0] == Status.UNSUPPORTED
    rig.write(MOD_OFF, img)
    assert rig.cmd(Opcode.MODULE_LOAD, [abi.ModuleKind.IR]).status == Status.BAD_MODULE   # no image at all


def test_module_size_and_count_quota(tmp_path, backend):
    img = _image(SAXPY)
    with XpuRig(tmp_path / "s", backend, quota=Quota(module_bytes=len(img), modules=2)) as r:
        assert _load(r, img + b"\x00")[0] == Status.QUOTA_EXCEEDED
        assert _load(r, img)[0] == Status.OK and _load(r, img)[0] == Status.OK
        assert _load(r, img)[0] == Status.QUOTA_EXCEEDED


@pytest.mark.parametrize(("name", "status"), [
    (b"", Status.BAD_DESCRIPTOR),                         # no SG at all: a KERNEL_GET needs one (0-length entry)
    (b"nope", Status.NOT_FOUND),
    (b"saxpy\x00", Status.INVALID_ARGUMENT),
    (b"\xff\xfe", Status.INVALID_ARGUMENT),
    (b"x" * (abi.MAX_NAME_BYTES + 1), Status.INVALID_ARGUMENT),
])
def test_bad_kernel_names(rig, saxpy, name, status):
    module = saxpy[0]
    if name:
        assert _kernel(rig, module, name)[0] == status
    else:
        c = rig.cmd(Opcode.KERNEL_GET, [module], sg_count=1)           # inline entry of length 0
        assert c.status == status
    rig.alive()


def test_unload_then_stale_handles(rig, saxpy):
    module, kernel, sig = saxpy
    assert rig.cmd(Opcode.MODULE_UNLOAD, [module]).status == Status.OK
    assert rig.cmd(Opcode.MODULE_UNLOAD, [module]).status == Status.INVALID_HANDLE
    assert _kernel(rig, module, b"saxpy")[0] == Status.INVALID_HANDLE
    d = rig.alloc(64)
    assert _launch(rig, kernel, (1, 1, 1), (1, 1, 1), pack_args(sig, [1, 1.0, d, d])) == Status.INVALID_HANDLE


def test_handles_are_dead_after_reset(rig, saxpy):
    module, kernel, sig = saxpy
    d = rig.alloc(64)
    assert rig.cmd(Opcode.RESET).status == Status.OK
    assert _kernel(rig, module, b"saxpy")[0] == Status.INVALID_HANDLE
    assert _launch(rig, kernel, (1, 1, 1), (1, 1, 1), pack_args(sig, [1, 1.0, d, d])) == Status.INVALID_HANDLE


@pytest.mark.parametrize("handle", [0, 1, (1 << 64) - 1, 0x4D4F << 48 | 1])
def test_made_up_handles(rig, handle):
    assert rig.cmd(Opcode.MODULE_UNLOAD, [handle]).status == Status.INVALID_HANDLE
    assert _kernel(rig, handle, b"saxpy")[0] == Status.INVALID_HANDLE
    assert _launch(rig, handle, (1, 1, 1), (1, 1, 1), b"\0" * 8) == Status.INVALID_HANDLE


def test_foreign_module_and_kernel(tmp_path, backend):
    with XpuRig(tmp_path / "a", backend) as a, XpuRig(tmp_path / "b", backend) as b:
        _status, module = _load(a, _image(SAXPY))
        _status, kernel, _ = _kernel(a, module, b"saxpy")
        assert _kernel(b, module, b"saxpy")[0] == Status.INVALID_HANDLE
        assert _launch(b, kernel, (1, 1, 1), (1, 1, 1), b"\0" * 24) == Status.INVALID_HANDLE
        assert b.cmd(Opcode.MODULE_UNLOAD, [module]).status == Status.INVALID_HANDLE
        assert a.cmd(Opcode.MODULE_UNLOAD, [module]).status == Status.OK


@pytest.mark.parametrize(("grid", "block", "shared"), [
    ((0, 1, 1), (1, 1, 1), 0),
    ((1, 0, 1), (1, 1, 1), 0),
    ((1, 1, 1), (0, 1, 1), 0),
    ((1, 1, 1), (2048, 1, 1), 0),                  # above max_threads_per_block
    ((1, 1, 1), (32, 32, 32), 0),
    ((0xFFFF_FFFF, 1, 1), (1, 1, 1), 0),           # above 2^31-1
    ((1, 1, 1), (1, 1, 1), 1 << 31),               # shared memory above the limit
])
def test_bad_launch_shapes(rig, saxpy, grid, block, shared):
    _m, kernel, sig = saxpy
    d = rig.alloc(64)
    assert _launch(rig, kernel, grid, block, pack_args(sig, [1, 1.0, d, d]), shared) == Status.INVALID_ARGUMENT
    rig.alive()


def test_block_x_above_16_bits(rig, saxpy):
    _m, kernel, sig = saxpy
    rig.write(ARGS_OFF, pack_args(sig, [1, 1.0, 0, 0]))
    a3 = 1 | 1 << 16                                 # block y = z = 1
    c = rig.cmd(Opcode.LAUNCH, [kernel, 1, 1 | (1 << 20) << 32, a3], sg=(rig.addr(ARGS_OFF), sig.args_size))
    assert c.status == Status.INVALID_ARGUMENT


def test_bad_argument_blobs(rig, saxpy):
    _m, kernel, sig = saxpy
    d = rig.alloc(64)
    good = pack_args(sig, [1, 1.0, d, d])
    assert _launch(rig, kernel, (1, 1, 1), (1, 1, 1), good[:-1]) == Status.INVALID_ARGUMENT
    assert _launch(rig, kernel, (1, 1, 1), (1, 1, 1), good + b"\0") == Status.INVALID_ARGUMENT
    assert _launch(rig, kernel, (1, 1, 1), (1, 1, 1), b"") == Status.INVALID_ARGUMENT
    big = b"\0" * (abi.MAX_ARG_BYTES + 1)
    assert _launch(rig, kernel, (1, 1, 1), (1, 1, 1), big) == Status.INVALID_ARGUMENT
    assert _launch(rig, kernel, (1, 1, 1), (1, 1, 1), good) == Status.OK
    assert rig.cmd(Opcode.FENCE).status == Status.OK


def test_kernel_fault_is_reported_by_fence_and_the_device_keeps_serving(rig, saxpy):
    _m, kernel, sig = saxpy
    status, oob_module = _load(rig, _image(OOB))
    assert status == Status.OK
    _s, oob, _size = _kernel(rig, oob_module, b"oob_store")
    buf = rig.alloc(4096)
    assert _launch(rig, oob, (1, 1, 1), (1, 1, 1), struct.pack("<Q", buf)) == Status.OK    # ordered: OK
    assert rig.cmd(Opcode.FENCE).status == Status.KERNEL_FAULT
    assert rig.cmd(Opcode.FENCE).status == Status.OK                  # reported once
    rig.alive()
    # the device still computes (with fresh handles if the fault reset the context)
    status, module = _load(rig, _image(SAXPY))
    assert status == Status.OK
    _s, kernel, _size = _kernel(rig, module, b"saxpy")
    d = rig.alloc(16)
    assert rig.htod(d, np.ones(4, np.float32).tobytes()).status == 0
    assert _launch(rig, kernel, (1, 1, 1), (4, 1, 1), pack_args(sig, [4, 2.0, d, d])) == Status.OK
    assert np.frombuffer(rig.dtoh(d, 16), np.float32).tolist() == [3.0] * 4


def test_kernel_fault_fails_the_dtoh_that_waits_for_it(rig, saxpy):
    """A DTOH after a faulting kernel in the same batch cannot vouch for its bytes: it completes
    with the fault (whether it surfaced when the copy was issued or while waiting for it)."""
    assert _load(rig, _image(OOB))[0] == Status.OK
    oob_module = _load(rig, _image(OOB))[1]
    _s, oob, _size = _kernel(rig, oob_module, b"oob_store")
    buf = rig.alloc(4096)
    rig.write(ARGS_OFF, struct.pack("<Q", buf))
    dims = abi.pack_launch_dims((1, 1, 1), (1, 1, 1), 0)
    got = rig.run([desc(Opcode.LAUNCH, [oob, *dims], sg=(rig.addr(ARGS_OFF), 8), tag=1),
                   desc(Opcode.MEM_COPY_DTOH, [buf], sg=(rig.addr(DATA_OFF), 64), tag=2),
                   desc(Opcode.FENCE, tag=3)])
    assert [c.tag for c in got] == [1, 2, 3]
    assert got[0].status == Status.OK and got[1].status == Status.KERNEL_FAULT
    assert got[2].status == Status.KERNEL_FAULT                     # and FENCE reports it too
    rig.alive()


def test_reset_command_drops_an_unreported_fault(rig, saxpy):
    assert _load(rig, _image(OOB))[0] == Status.OK
    oob_module = _load(rig, _image(OOB))[1]
    _s, oob, _size = _kernel(rig, oob_module, b"oob_store")
    buf = rig.alloc(4096)
    assert _launch(rig, oob, (1, 1, 1), (1, 1, 1), struct.pack("<Q", buf)) == Status.OK
    got = rig.run([desc(Opcode.RESET, tag=1), desc(Opcode.FENCE, tag=2)])
    assert [(c.tag, c.status) for c in got] == [(1, Status.OK), (2, Status.OK)]    # the fault went with the reset
