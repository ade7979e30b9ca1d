"""The SDK's fast paths against its general paths, on the in-process fake device (fakedev.py).

``kernel[grid, block](...)`` packs arguments straight into the ring slot's side area
(``Ring.post_packed``), ``Device.launch`` copies a blob there (``Ring.post_inline``), pinned
copies post one inline segment from ``HostArray.address``, and the checks that guard them (stale
modules and arrays, a device state lost to a fault, a closed device) are inlined. Each test runs
the fast path on one device and the general path on a second device with the same history
(``Ring.reserve`` + ``Ring.side`` + ``Ring.post`` with a blob from :func:`vxpu.ir.args.pack_args`,
or ``post_copy``), and compares the descriptor and argument bytes posted, what the device read,
and the errors raised.
"""

from __future__ import annotations

import gc
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vxpu.guest.array import DeviceArray, HostArray, StaleHandle
from vxpu.guest.errors import DeviceError, GuestError
from vxpu.guest.ring import SIDE_BYTES, Ring
from vxpu.guest.sdk import Device
from vxpu.guest.staging import post_copy
from vxpu.guest.transport import DmaMemory
from vxpu.ir import IRError
from vxpu.ir.args import pack_args

from vxpu.abi import xpu
from vxpu.abi.status import Status
from vxpu.errors import StateError

from .fakedev import BASE, FakeTransport

PARAM_TYPES = ("i8", "i16", "i32", "i64", "f16", "f32", "f64", "ptr<global>", "ptr<constant>")
LAUNCH = int(xpu.Opcode.LAUNCH)


def kernel_ir(types: list[str], name: str = "k") -> str:
    params = ", ".join(f"%p{i}: {t}" for i, t in enumerate(types))
    return f"module @m\nkernel @{name}({params}) {{\n^entry:\n  ret\n}}\n"


def descriptor(ring: Ring, seq: int) -> tuple[int, ...]:
    """The descriptor of ``seq`` as posted (its slot's 64 bytes, unpacked)."""
    return xpu.DESCRIPTOR.unpack_from(ring._sq, (seq & ring._sq_mask) * xpu.SQ_ENTRY_SIZE)


def side_bytes(ring: Ring, seq: int, n: int) -> bytes:
    side, _ = ring.side(seq)
    return bytes(side[:n])


def reference_launch(dev: Device, kernel_handle: int, dims: tuple[int, int, int], blob: bytes) -> None:
    """The general path as it was written before the fast paths: reserve, copy into the side
    area, post with the side area as the inline segment."""
    ring = dev.live_ring()
    a1, a2, a3 = dims
    if not blob:
        ring.post(LAUNCH, kernel_handle, a1, a2, a3)
        return
    seq = ring.reserve()
    side, addr = ring.side(seq)
    side[:len(blob)] = blob
    ring.post(LAUNCH, kernel_handle, a1, a2, a3, sg_addr=addr, sg_len=len(blob))


def reference_blob(kernel: Any, values: list[Any]) -> bytes:
    """Kernel.pack's meaning, from the IR core's packer alone."""
    ptrs = [t.startswith("ptr") for t in kernel.signature.param_types]
    out = []
    for i, v in enumerate(values):
        if isinstance(v, DeviceArray):
            if i < len(ptrs) and not ptrs[i]:
                raise GuestError("an array where a number goes")
            v = v.ptr
        out.append(v)
    return pack_args(kernel.signature, out)


class Pair:
    """Two devices on two fake transports with the same history."""

    def __init__(self, sq_entries: int = 16) -> None:
        self.fakes = (FakeTransport(), FakeTransport())
        self.devs = tuple(Device(f, sq_entries=sq_entries) for f in self.fakes)

    def both(self, fn: Any) -> tuple[Any, Any]:
        return fn(self.devs[0]), fn(self.devs[1])

    def close(self) -> None:
        for d in self.devs:
            d.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def values_for(draw: Any, types: list[str], arrays: int) -> list[Any]:
    """One value per parameter: in range, at the unsigned edge, out of range, or of a wrong
    kind, so that both paths see the values the packer refuses too."""
    out: list[Any] = []
    for t in types:
        if t.startswith("ptr"):
            out.append(draw(st.one_of(st.integers(0, arrays - 1).map(lambda i: ("array", i)),
                                      st.integers(-(1 << 63), (1 << 64) + 5))))
        elif t.startswith("i"):
            bits = int(t[1:])
            out.append(draw(st.one_of(st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1),
                                      st.integers(-(1 << (bits - 1)) - 3, (1 << bits) + 3),
                                      st.sampled_from([True, 2.0, 2.5, "7", None]),
                                      st.just(("array", 0)))))
        else:
            out.append(draw(st.one_of(st.floats(width=int(t[1:])), st.floats(allow_nan=False),
                                      st.integers(-(1 << 70), 1 << 70), st.sampled_from([1e300, -1e39, "x"]),
                                      st.just(("array", 0)))))
    return out


@st.composite
def launches(draw: Any) -> tuple[list[str], list[Any], int]:
    types = draw(st.lists(st.sampled_from(PARAM_TYPES), min_size=0, max_size=10))
    values = values_for(draw, types, 2)
    extra = draw(st.sampled_from([0, 0, 0, 1, -1]))         # now and then a wrong count
    if extra > 0:
        values.append(1)
    elif extra < 0 and values:
        values.pop()
    return types, values, draw(st.sampled_from([0, 1]))     # 1: inside dev.batch()


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except (GuestError, IRError, StateError) as exc:
        return "raised", type(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=launches())
def test_launcher_posts_what_the_general_path_posts(case):
    """``kernel[g, b](*values)`` and ``Kernel.launch`` post the same descriptor and argument
    bytes as reserve/side/post with ``pack_args``' blob, and raise the same error type (posting
    nothing) where the general path refuses."""
    types, raw_values, batched = case
    p = Pair()
    try:
        mods = p.both(lambda d: d.load_module(kernel_ir(types)))
        arrays = p.both(lambda d: [d.empty(64, "float32") for _ in range(2)])

        def values(side: int) -> list[Any]:
            return [arrays[side][v[1]] if isinstance(v, tuple) else v for v in raw_values]

        grid, block = (3, 2), (32, 1, 2)
        k0, k1 = mods[0].k, mods[1].k
        dims = xpu.pack_launch_dims((3, 2, 1), (32, 1, 2), 0)
        fast_dev, ref_dev = p.devs
        for how in ("launcher", "Kernel.launch", "Device.launch"):
            ring0, ring1 = fast_dev.ring, ref_dev.ring
            assert ring0 is not None and ring1 is not None
            before = ring0.submitted
            with fast_dev.batch() if batched else _null():
                if how == "launcher":
                    fast = _outcome(lambda: k0[grid, block](*values(0)))
                elif how == "Kernel.launch":
                    fast = _outcome(lambda: k0.launch(grid, block, *values(0)))
                else:
                    fast = _outcome(lambda: fast_dev.launch(k0, dims, k0.pack(values(0))))
            ref = _outcome(lambda: reference_launch(ref_dev, k1.handle, dims, reference_blob(k1, values(1))))
            assert fast[0] == ref[0], (how, fast, ref)
            if fast[0] == "raised":
                assert fast[1] is ref[1], (how, fast, ref)
                assert ring0.submitted == before              # nothing posted
                continue
            seq = ring0.submitted - 1
            assert ring1.submitted - 1 == seq
            assert descriptor(ring0, seq) == descriptor(ring1, seq)
            n = descriptor(ring0, seq)[9]
            assert side_bytes(ring0, seq, n) == side_bytes(ring1, seq, n)
            assert ring0.header() == ring1.header()
        p.both(lambda d: d.synchronize())
        assert p.fakes[0].launches == p.fakes[1].launches     # what the device read, too
    finally:
        p.close()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_edge_values_take_the_general_path(pair):
    """Values the precompiled packer refuses are packed (or refused) by pack_args: an unsigned
    value for a signed parameter, f32 overflow (an IRError, no longer a raw OverflowError)."""
    dev, other = pair.devs
    k = dev.load_module(kernel_ir(["i32", "f32", "i8"])).k
    other.load_module(kernel_ir(["i32", "f32", "i8"]))
    k[1, 1](0xFFFF_FFFF, 1.5, 255)
    dev.synchronize()
    assert pair.fakes[0].launches[-1][4] == struct.pack("<Ifbxxx", 0xFFFF_FFFF, 1.5, -1)   # padded to 4
    for bad in ((1 << 32, 1.0, 0), (0, 1e39, 0), (0, 1.0, 256)):
        with pytest.raises(IRError):
            k[1, 1](*bad)
        with pytest.raises(IRError):
            k.pack(bad)
    with pytest.raises(IRError, match="takes 3 arguments"):
        k[1, 1](1, 2.0)
    with pytest.raises(GuestError, match="not a pointer"):
        k[1, 1](dev.empty(4), 1.0, 0)


def test_large_blob_uses_its_own_dma_buffer(pair):
    """A blob above the side area (here 33 u64s) is not packed in place: Device.launch's DMA
    buffer, held until the completion, carries it."""
    dev, _ = pair.devs
    types = ["i64"] * (SIDE_BYTES // 8 + 1)
    k = dev.load_module(kernel_ir(types)).k
    k[1, 1](*range(len(types)))
    dev.synchronize()
    assert pair.fakes[0].launches[-1][4] == struct.pack(f"<{len(types)}q", *range(len(types)))


def test_stale_arrays_and_modules_post_nothing(pair):
    dev, _ = pair.devs
    mod = dev.load_module(kernel_ir(["ptr<global>", "i32"]))
    k = mod.k
    launch = k[1, 32]
    arr = dev.empty(16, "float32")
    launch(arr, 1)
    dev.synchronize()
    ring = dev.ring
    assert ring is not None
    posted = ring.submitted
    arr.free()
    with pytest.raises(StaleHandle):
        launch(arr, 1)
    with pytest.raises(StaleHandle):
        dev.launch(k, launch.dims, k.pack((arr, 1)))
    assert ring.submitted == posted + 1                       # the MEM_FREE only
    old = dev.empty(16, "float32")
    dev.reset()
    with pytest.raises(StaleHandle):                          # the module is from before the reset
        launch(0, 1)
    for get in (lambda: mod.k, lambda: mod["k"], lambda: mod.kernel("k")):
        with pytest.raises(StaleHandle):                      # and so are its cached kernels
            get()
    mod2 = dev.load_module(kernel_ir(["ptr<global>", "i32"]))
    with pytest.raises(StaleHandle):                          # the array is
        mod2.k[1, 32](old, 1)
    mod2.k[1, 32](dev.empty(4), 1)
    mod2.unload()
    with pytest.raises(StaleHandle):
        mod2.k                                                # noqa: B018 (the access raises)
    launch2 = mod2._kernels["k"][1, 32]
    with pytest.raises(StaleHandle):
        launch2(0, 1)
    dev.synchronize()
    dev.close()
    with pytest.raises(StaleHandle):                          # closed: stale, as before
        launch2(0, 1)


@pytest.mark.parametrize("how", ["launcher", "Device.launch", "copy_to_device", "copy_to_host"])
def test_state_lost_to_a_fault_is_noticed_before_posting(how):
    """A fault completion that dropped the device state was consumed by a wait (here a plain
    ring wait) but not yet noticed: the next launch or copy finds out first (the sentinel probe)
    and refuses the old module and arrays instead of posting them. (Before, the arguments were
    packed and the module checked before the device state was looked at.)"""
    fake = FakeTransport()
    with Device(fake, sq_entries=8) as dev:
        k = dev.load_module(kernel_ir(["ptr<global>"])).k
        arr = dev.empty(16, "uint8")
        host = dev.pinned(16, "uint8")
        dev.synchronize()
        fake.fence_fault, fake.fault_drops_state = (Status.KERNEL_FAULT, 0), True
        ring = dev.ring
        assert ring is not None
        ring.wait_done(ring.post(xpu.Opcode.FENCE))
        assert ring.faults == 1 and ring.async_error is not None
        ring.async_error = None
        launches = len(fake.launches)
        with pytest.raises(StaleHandle):
            if how == "launcher":
                k[1, 1](arr)
            elif how == "Device.launch":
                dev.launch(k, xpu.pack_launch_dims((1, 1, 1), (1, 1, 1), 0), struct.pack("<Q", 0))
            elif how == "copy_to_device":
                dev.copy_to_device(arr, host)
            else:
                dev.copy_to_host(host, arr, blocking=False)
        dev.synchronize()
        assert len(fake.launches) == launches
        assert [d for d in _posted(ring) if d[0] in (LAUNCH, xpu.Opcode.MEM_COPY_HTOD, xpu.Opcode.MEM_COPY_DTOH)
                and d[3] > 0 and d[4] == arr._ptr] == []


def _posted(ring: Ring) -> list[tuple[int, ...]]:
    """Every descriptor still in the submission ring."""
    return [xpu.DESCRIPTOR.unpack_from(ring._sq, i * xpu.SQ_ENTRY_SIZE) for i in range(ring.sq_entries)]


def test_pinned_copies_post_what_post_copy_posts(pair):
    """copy_to_device / copy_to_host(blocking=False) from a contiguous HostArray: one inline
    segment, byte for byte what post_copy posts; a non-contiguous one goes through post_copy."""
    hosts = pair.both(lambda d: d.pinned(4096, "uint8"))
    arrs = pair.both(lambda d: d.empty(4096, "uint8"))
    dev, ref = pair.devs
    r0, r1 = dev.ring, ref.ring
    assert r0 is not None and r1 is not None
    dev.copy_to_device(arrs[0], hosts[0])
    post_copy(r1, xpu.Opcode.MEM_COPY_HTOD, arrs[1].ptr, hosts[1].mem, 0, 4096, waited=False)
    dev.copy_to_host(hosts[0], arrs[0], blocking=False)
    post_copy(r1, xpu.Opcode.MEM_COPY_DTOH, arrs[1].ptr, hosts[1].mem, 0, 4096, waited=False)
    for seq in (r0.submitted - 2, r0.submitted - 1):
        assert descriptor(r0, seq) == descriptor(r1, seq)
    assert r0.header() == r1.header()
    # two runs, not adjacent: an indirect list in the side area
    fake = pair.fakes[0]
    a, b = fake.alloc_dma(4096), fake.alloc_dma(8192)
    view = memoryview(bytearray(8192))
    split = HostArray(DmaMemory(view, [(0, a.runs[0][1], 4096), (4096, b.runs[0][1] + 4096, 4096)]),
                      (8192,), np.dtype(np.uint8), 1, lambda m: None)
    assert split.address is None
    big = dev.empty(8192, "uint8")
    dev.copy_to_device(big, split)
    d = descriptor(r0, r0.submitted - 1)
    assert d[1] == xpu.DescFlags.SG_INDIRECT and d[2] == 2
    dev.synchronize()


def test_a_freed_host_array_is_refused(pair):
    dev, _ = pair.devs
    host, arr = dev.pinned(256, "uint8"), dev.empty(256, "uint8")
    host.free()
    assert host.freed and host.address is None
    ring = dev.ring
    assert ring is not None
    posted = ring.submitted
    with pytest.raises(GuestError, match="freed"):
        dev.copy_to_device(arr, host)
    with pytest.raises(GuestError, match="freed"):
        dev.copy_to_host(host, arr, blocking=False)
    assert ring.submitted == posted


def test_ring_fast_posts_match_reserve_side_post(pair):
    """post_inline and post_packed write the descriptor, side bytes, sq_tail and doorbell that
    reserve + side + post write, batched or not, and wait for room when the ring is full."""
    packer = struct.Struct("<iQxxh")
    op = int(xpu.Opcode.NOP)                      # the fake completes it OK whatever its SG says
    for fake in pair.fakes:
        fake.complete_limit = 2                   # a slow device: the ring fills up
    r0, r1 = (d.ring for d in pair.devs)
    assert r0 is not None and r1 is not None
    for i in range(3 * r0.sq_entries):
        values = (i, 1 << 40 | i, -i)
        blob = packer.pack(*values)
        batched = i % 5 == 0
        r0.batching += batched
        r1.batching += batched
        seq = r0.post_packed(op, i, 1, 2, 3, packer.pack_into, packer.size, values) if i % 2 else \
            r0.post_inline(op, i, 1, 2, 3, blob)
        ref = r1.reserve()
        side, addr = r1.side(ref)
        side[:len(blob)] = blob
        assert r1.post(op, i, 1, 2, 3, sg_addr=addr, sg_len=len(blob)) == seq
        r0.batching -= batched
        r1.batching -= batched
        assert descriptor(r0, seq) == descriptor(r1, seq)
        assert side_bytes(r0, seq, len(blob)) == side_bytes(r1, seq, len(blob))
        assert r0.header() == r1.header() and r0.doorbells == r1.doorbells
    for fake in pair.fakes:
        fake.complete_limit = None
    r0.drain()
    r1.drain()
    assert pair.fakes[0].max_pending_seen <= r0.sq_entries


def test_a_refused_pack_leaves_the_ring_as_it_was(pair):
    ring = pair.devs[0].ring
    assert ring is not None
    before = (ring.submitted, ring.header())
    for bad in ((1 << 31,), ("x",)):
        with pytest.raises(struct.error):
            ring.post_packed(LAUNCH, 1, 0, 0, 0, struct.Struct("<i").pack_into, 4, bad)
    with pytest.raises(OverflowError):
        ring.post_packed(LAUNCH, 1, 0, 0, 0, struct.Struct("<f").pack_into, 4, (1e39,))
    assert (ring.submitted, ring.header()) == before
    for data in (b"", bytes(SIDE_BYTES + 1)):
        with pytest.raises(GuestError):
            ring.post_inline(LAUNCH, 1, 0, 0, 0, data)
    assert (ring.submitted, ring.header()) == before


def test_a_fatal_device_is_reported_even_with_the_completion_there(pair):
    """The waiter's first poll comes after the fatal check, as before: a completion that is
    already in the ring does not hide a fatal device."""
    ring = pair.devs[0].ring
    assert ring is not None
    seq = ring.post(xpu.Opcode.NOP, waited=True)              # the fake completes it at the doorbell
    ring.fatal = DeviceError(0, "device", fatal=2, fatal_name="BAD_SQ_TAIL")
    with pytest.raises(DeviceError, match="BAD_SQ_TAIL"):
        ring.wait(seq)
    ring.fatal = None
    assert ring.wait(seq)[0] == 0


def test_synchronize_frees_garbage_made_during_its_wait():
    """Garbage queued while synchronize waits (a finalizer run by a collection meanwhile) is
    released right after, as the second live_ring() did."""
    fake = FakeTransport()
    with Device(fake, sq_entries=8) as dev:
        keep = [dev.empty(64, "uint8")]
        addr = keep[0].ptr
        run = fake.run

        def run_and_collect() -> None:
            keep.clear()
            gc.collect()
            run()
        fake.run = run_and_collect  # type: ignore[method-assign]
        dev.synchronize()
        fake.run = run              # type: ignore[method-assign]
        assert not dev.allocs.garbage
        assert addr not in fake.device_mem


def test_synchronize_reports_async_error_then_fence_status():
    fake = FakeTransport()
    with Device(fake, sq_entries=8) as dev:
        dev.free_address(0x1234)                              # INVALID_HANDLE, asynchronous
        fake.fence_fault = (Status.KERNEL_FAULT, 0)
        with pytest.raises(DeviceError, match="INVALID_HANDLE"):
            dev.synchronize()
        dev.synchronize()                                     # reported once
        fake.fence_fault = (Status.KERNEL_FAULT, 0)
        with pytest.raises(DeviceError, match="KERNEL_FAULT") as info:
            dev.synchronize()
        assert info.value.command == "FENCE"


def test_launch_descriptor_address_is_inside_the_side_area(pair):
    """The inline segment of a packed LAUNCH points at its own slot's side area (what the
    device reads): address and length checked against Ring.side()."""
    dev, _ = pair.devs
    k = dev.load_module(kernel_ir(["i32", "f64"])).k
    ring = dev.ring
    assert ring is not None
    for i in range(ring.sq_entries + 3):
        k[1, 1](i, math.pi)
        seq = ring.submitted - 1
        d = descriptor(ring, seq)
        assert (d[0], d[1], d[2], d[3]) == (LAUNCH, 0, 1, seq)
        assert d[8] == ring.side(seq)[1] and d[9] == 16
        assert BASE <= d[8] < BASE + len(pair.fakes[0].ram)
    dev.synchronize()
    assert [b[4] for b in pair.fakes[0].launches[-3:]] == \
        [struct.pack("<ixxxxd", i, math.pi) for i in range(ring.sq_entries, ring.sq_entries + 3)]


@pytest.mark.parametrize(("shape", "dims"), [(5, (5,)), ((3, 4), (3, 4)), ([2, np.int64(3)], (2, 3)), ((), ()),
                                             ((0, 7), (0, 7)), ((2.0, 1), (2, 1))])
def test_shapes_normalize_as_before(shape, dims):
    from vxpu.guest.array import normalize

    assert normalize(shape, "float32")[:2] == (dims, np.dtype(np.float32))


@pytest.mark.parametrize("shape", [-1, (3, -2), (-1,)])
def test_negative_dimensions_are_refused(shape):
    from vxpu.guest.array import normalize

    with pytest.raises(GuestError, match="negative dimension"):
        normalize(shape, "uint8")


def test_to_device_converts_its_input_once(pair, monkeypatch):
    """to_device converts a numpy array to bytes once (copy_to_device used to do it again),
    and the device gets the same bytes either way."""
    import vxpu.guest.sdk as sdk_mod

    calls = []
    real = sdk_mod.as_bytes
    monkeypatch.setattr(sdk_mod, "as_bytes", lambda d: (calls.append(1), real(d))[1])
    dev, _ = pair.devs
    data = np.arange(3000, dtype=np.int16).reshape(60, 50)
    arr = dev.to_device(data)
    assert len(calls) == 1 and arr.shape == (60, 50) and arr.dtype == np.int16
    assert np.array_equal(arr.to_host(), data)
    with pytest.raises(GuestError, match="copy of 6000 bytes into a 4-byte array"):
        dev.copy_to_device(dev.empty(1, np.float32), data)


HOT_PATHS = ["launcher", "launcher, no arguments", "Device.launch", "copy_to_device", "copy_to_host", "upload",
             "synchronize"]


def _hot(dev: Device, how: str, objs: dict[str, Any]) -> None:
    arr, host = objs["arr"], objs["host"]
    if how == "launcher":
        objs["k"][1, 1](arr)
    elif how == "launcher, no arguments":
        objs["k0"][1, 1]()
    elif how == "Device.launch":
        dev.launch(objs["k"], xpu.pack_launch_dims((1, 1, 1), (1, 1, 1), 0), struct.pack("<Q", arr.ptr))
    elif how == "copy_to_device":
        dev.copy_to_device(arr, host)
    elif how == "copy_to_host":
        dev.copy_to_host(host, arr, blocking=False)
    elif how == "upload":
        dev.copy_to_device(arr, bytes(16))
    else:
        dev.synchronize()


def _objs(dev: Device) -> dict[str, Any]:
    return {"k": dev.load_module(kernel_ir(["ptr<global>"])).k, "k0": dev.load_module(kernel_ir([], "z")).z,
            "arr": dev.empty(16, "uint8"), "host": dev.pinned(16, "uint8")}


@pytest.mark.parametrize("how", HOT_PATHS)
def test_each_hot_path_releases_garbage_first(how):
    """The inlined live_ring() condition, 'garbage queued': the MEM_FREE of an array that became
    garbage is posted before the path's own command."""
    fake = FakeTransport()
    with Device(fake, sq_entries=16) as dev:
        objs = _objs(dev)
        doomed = dev.empty(64, "uint8")
        addr = doomed.ptr
        dev.synchronize()
        del doomed
        gc.collect()
        assert dev.allocs.garbage
        ring = dev.ring
        assert ring is not None
        first = ring.submitted
        _hot(dev, how, objs)
        assert not dev.allocs.garbage
        d = descriptor(ring, first)
        assert (d[0], d[4]) == (xpu.Opcode.MEM_FREE, addr)
        dev.synchronize()
        assert addr not in fake.device_mem


@pytest.mark.parametrize("how", HOT_PATHS)
def test_each_hot_path_refuses_a_closed_device(how):
    """The inlined condition 'ring closed': StateError (StaleHandle for the objects that belong
    to the closed device's state, as before), nothing touched."""
    fake = FakeTransport()
    dev = Device(fake, sq_entries=16)
    objs = _objs(dev)
    dev.close()
    with pytest.raises(StateError):
        _hot(dev, how, objs)


@pytest.mark.parametrize("how", HOT_PATHS)
@pytest.mark.parametrize("drops", [False, True])
def test_each_hot_path_notices_a_fault_first(how, drops):
    """The inlined condition 'a fault completion not yet looked at': the sentinel probe runs
    before the path's own command; a state that survived keeps every object usable, a lost one
    makes them stale (nothing of the path posted)."""
    fake = FakeTransport()
    with Device(fake, sq_entries=16) as dev:
        objs = _objs(dev)
        dev.synchronize()
        fake.fence_fault, fake.fault_drops_state = (Status.KERNEL_FAULT, 0), drops
        ring = dev.ring
        assert ring is not None
        ring.wait_done(ring.post(xpu.Opcode.FENCE))
        ring.async_error = None
        first, sentinel = ring.submitted, dev._sentinel
        if drops and how != "synchronize":
            with pytest.raises(StaleHandle):
                _hot(dev, how, objs)
        else:
            _hot(dev, how, objs)
        d = descriptor(ring, first)
        assert (d[0], d[4]) == (xpu.Opcode.MEM_SET, sentinel)       # the probe came first
        assert ring.faults == dev._faults_seen
        assert (dev.epoch != objs["arr"].epoch) is drops
        dev.synchronize()


@pytest.mark.parametrize("nbytes", [1, 4095, 4096])
def test_one_chunk_staged_copies_post_what_the_pipeline_posts(nbytes):
    """A staged transfer of one chunk (the unrolled path) posts the copy the chunk loop posts:
    the same slot (uploads rotate through the slots, downloads use slot 0), address, length and
    waited flag, and leaves nothing pending; a failing one raises and leaves nothing pending."""
    fake = FakeTransport()
    with Device(fake, sq_entries=8, staging_chunk=4096, staging_count=3) as dev:
        staging, ring = dev.staging, dev.ring
        assert staging is not None and ring is not None
        arr = dev.empty(nbytes, "uint8")
        data = bytes(range(256)) * (nbytes // 256) + bytes(range(nbytes % 256))
        for i in range(4):
            slot = staging._next_slot
            dev.copy_to_device(arr, data)
            d = descriptor(ring, ring.submitted - 1)
            assert (d[0], d[4], d[8], d[9]) == (xpu.Opcode.MEM_COPY_HTOD, arr.ptr, staging.slots[slot].address(0),
                                                nbytes)
            assert staging._next_slot == (slot + 1) % 3 and not any(staging._pending)
            out = bytearray(nbytes)
            dev.copy_to_host(out, arr)
            d = descriptor(ring, ring.submitted - 1)
            assert (d[0], d[4], d[8], d[9]) == (xpu.Opcode.MEM_COPY_DTOH, arr.ptr, staging.slots[0].address(0), nbytes)
            assert bytes(out) == data and not any(staging._pending)
        assert staging.transfers == 8
        with pytest.raises(DeviceError, match="OUT_OF_RANGE"):
            staging.upload(arr.ptr + 1, memoryview(data))
        with pytest.raises(DeviceError, match="OUT_OF_RANGE"):
            staging.download(memoryview(bytearray(nbytes)), arr.ptr + 1)
        assert not any(staging._pending)
        assert np.array_equal(arr.to_host(), np.frombuffer(data, np.uint8))
