"""Tests of the HIP backend short of running a kernel (no AMD GPU is reachable anywhere we test).

Real components: hip-python itself (the unavailable path), the vxpu IR compiler producing real
hsaco for AMD architectures through llvmlite + ld.lld, and the metadata parser reading those
code objects. A small fake runtime (a subclass-free stand-in for ``hip.hip``) checks the launch
argument passing and the fault/reset logic, which cannot run without a device.
"""

from __future__ import annotations

import ctypes
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from vxpu.accel.backend import BackendError, BackendUnavailable, KernelInfo, ModuleKind, Status
from vxpu.accel.gpu_checked import launch_info
from vxpu.accel.hip import (
    HIP_LAUNCH_PARAM_BUFFER_POINTER,
    HIP_LAUNCH_PARAM_BUFFER_SIZE,
    HIP_LAUNCH_PARAM_END,
    HipArgPack,
    HipBackend,
    gfx_arch,
    native_hsaco_layouts,
    probe_devices,
    status_for_hip_error,
)
from vxpu.accel.hsaco_meta import decode_msgpack, kernel_layouts

VADD = """
module @vadd

kernel @vadd(%n: i32, %a: ptr<global>, %b: ptr<global>, %c: ptr<global>) {
^entry:
  %bid = block_id.x
  %bdim = block_dim.x
  %base = mul %bid, %bdim : i32
  %tid = thread_id.x
  %i = add %base, %tid : i32
  %ok = icmp slt %i, %n
  cbr %ok, ^body, ^exit
^body:
  %pa = offset %a, %i : f32
  %pb = offset %b, %i : f32
  %pc = offset %c, %i : f32
  %x = load %pa : f32
  %y = load %pb : f32
  %z = fadd %x, %y : f32
  store %z, %pc
  br ^exit
^exit:
  ret
}
"""


def vadd_image() -> bytes:
    from vxpu.ir import binary, text

    return binary.encode(text.parse(VADD), names=False)


# -- the real runtime: absent here, so the backend must say so cleanly -------------------------
def test_unavailable_without_runtime_or_gpu() -> None:
    pytest.importorskip("hip")
    backend = HipBackend(0)
    try:
        backend.open()
    except BackendUnavailable as exc:
        assert exc.status is Status.UNAVAILABLE
        assert "libamdhip64" in str(exc) or "GPU" in str(exc) or "device" in str(exc)
        with pytest.raises(BackendError) as info:
            backend.alloc(16)
        assert info.value.status is Status.UNAVAILABLE
        assert probe_devices() == []
        return
    backend.close()  # a machine with an AMD GPU: opening is the test


def test_registry_reports_the_reason() -> None:
    from vxpu.accel.registry import open_backend

    try:
        backend = open_backend("hip:0")
    except BackendUnavailable as exc:
        assert str(exc)
        return
    backend.close()


@pytest.mark.parametrize(("name", "status"), [
    ("hipErrorIllegalAddress", Status.KERNEL_FAULT), ("hipErrorLaunchFailure", Status.KERNEL_FAULT),
    ("hipErrorAssert", Status.KERNEL_FAULT), ("hipErrorECCNotCorrectable", Status.DEVICE_LOST),
    ("hipErrorOutOfMemory", Status.OUT_OF_MEMORY), ("hipErrorInvalidValue", Status.INVALID_ARGUMENT),
    ("hipErrorInvalidHandle", Status.INVALID_HANDLE), ("hipErrorNotFound", Status.NOT_FOUND),
    ("hipErrorInvalidImage", Status.BAD_MODULE), ("hipErrorNoBinaryForGpu", Status.BAD_MODULE),
    ("hipErrorNoDevice", Status.UNAVAILABLE), ("hipErrorNotSupported", Status.UNSUPPORTED),
    ("hipErrorTbd", Status.INTERNAL),
])
def test_error_mapping(name: str, status: Status) -> None:
    assert status_for_hip_error(name) is status


def test_mapped_names_exist_in_hip_python() -> None:
    hip = pytest.importorskip("hip").hip
    from vxpu.accel import hip as backend_module

    names = set(backend_module._STATUS_BY_NAME) | backend_module._KERNEL_FAULT | backend_module._DEVICE_LOST
    missing = {n for n in names if getattr(hip.hipError_t, n, None) is None}
    assert not missing, missing


def test_gfx_arch() -> None:
    assert gfx_arch(b"gfx942:sramecc+:xnack-\0\0") == "gfx942"
    assert gfx_arch("gfx1100") == "gfx1100"
    assert gfx_arch("gfx90a:xnack+") == "gfx90a"


def test_extra_array_layout() -> None:
    info = KernelInfo("vadd", (4, 8, 8, 8), (0, 8, 16, 24), 32, 0)
    pack = HipArgPack(info)
    extra = (ctypes.c_void_p * 5).from_address(pack.extra_address)
    assert extra[0] == HIP_LAUNCH_PARAM_BUFFER_POINTER and extra[1] == pack.storage_address
    assert extra[2] == HIP_LAUNCH_PARAM_BUFFER_SIZE and extra[4] == HIP_LAUNCH_PARAM_END
    assert ctypes.c_size_t.from_address(extra[3]).value == 32
    args = struct.pack("<i4xQQQ", 7, 1, 2, 3)
    pack.load(args)
    assert ctypes.string_at(extra[1], 32) == args


# -- code objects for AMD architectures, produced by the real toolchain --------------------------
@pytest.mark.parametrize("arch", ["gfx942", "gfx90a", "gfx1100"])
def test_ir_produces_hsaco_whose_metadata_matches_the_signature(arch: str) -> None:
    from vxpu.accel.gpu_ir import compile_ir

    try:
        hsaco, kernels, _ = compile_ir(vadd_image(), "amdgpu", arch, 3, False)
    except BackendError as exc:
        if "lld" in str(exc).lower() or "ziglang" in str(exc).lower():
            pytest.skip(f"no LLD here: {exc}")
        raise
    assert hsaco[:4] == b"\x7fELF"
    assert kernels["vadd"].param_offsets == (0, 8, 16, 24) and kernels["vadd"].args_size == 32
    from_metadata = native_hsaco_layouts(hsaco)
    # a checked IR kernel: the IR parameters, then the hidden bounds/fault-record arguments
    full = launch_info(kernels["vadd"])
    assert kernels["vadd"].checked and kernels["vadd"].pointer_params == (1, 2, 3)
    assert from_metadata["vadd"].param_sizes == full.param_sizes
    assert from_metadata["vadd"].param_offsets == full.param_offsets
    assert from_metadata["vadd"].args_size == full.args_size


def test_garbage_hsaco_is_bad_module() -> None:
    for blob in (b"", b"\x7fELF" + b"\0" * 60, b"junk" * 100):
        with pytest.raises(BackendError) as info:
            native_hsaco_layouts(blob)
        assert info.value.status is Status.BAD_MODULE


def test_msgpack_reader_is_bounded() -> None:
    assert decode_msgpack(b"\x82\xa1a\x01\xa1b\x92\xc3\xc0") == {"a": 1, "b": [True, None]}
    for bad in (b"\x92\x01", b"\xdb\xff\xff\xff\xff", b"\x91" * 64 + b"\x01", b"\xc1"):
        with pytest.raises(ValueError):
            decode_msgpack(bad)
    with pytest.raises(BackendError):
        kernel_layouts(b"\x81\xaeamdhsa.kernels\x91\x81\xa5.name\x01")
    meta = (b"\x81\xaeamdhsa.kernels\x91\x82\xa5.name\xa1k\xa5.args\x92"
            b"\x83\xa7.offset\x00\xa5.size\x08\xab.value_kind\xadglobal_buffer"
            b"\x83\xa7.offset\x08\xa5.size\x08\xab.value_kind\xb4hidden_block_count_x")
    assert kernel_layouts(meta)["k"] == KernelInfo("k", (8,), (0,), 8, 0)


# -- launch and fault logic against a fake runtime ----------------------------------------------
class FakeHip:
    """Just enough of ``hip.hip`` for the backend's control flow; records launches."""

    hipStreamNonBlocking = 1
    hipHostRegisterPortable = 1

    def __init__(self) -> None:
        self.ok = _Err("hipSuccess")
        self.launches: list[tuple[Any, ...]] = []
        self.fail_next: str | None = None
        self.reset_breaks = False
        self.poisoned = False

    def _r(self, *out: Any) -> tuple[Any, ...]:
        return (self.ok, *out)

    def hipInit(self, flags: int) -> tuple[Any, ...]:
        return self._r()

    def hipGetDeviceCount(self) -> tuple[Any, ...]:
        return self._r(1)

    def hipSetDevice(self, index: int) -> tuple[Any, ...]:
        return (_Err("hipErrorIllegalAddress"),) if self.poisoned else self._r()

    def hipGetDeviceProperties(self, index: int) -> tuple[Any, ...]:
        return self._r(SimpleNamespace(gcnArchName=b"gfx942:sramecc+:xnack-", name=b"Fake MI300X",
                                       totalGlobalMem=1 << 30, multiProcessorCount=304,
                                       maxThreadsPerBlock=1024, sharedMemPerBlock=65536,
                                       hostRegisterReadOnlySupported=1))

    def hipDeviceGetPCIBusId(self, n: int, index: int) -> tuple[Any, ...]:
        return self._r(b"0000:C1:00.0\0")

    def hipMalloc(self, size: int) -> tuple[Any, ...]:
        return self._r(0x7F0000000000)

    def hipFree(self, address: int) -> tuple[Any, ...]:
        return self._r()

    def hipModuleLoadData(self, data: bytes) -> tuple[Any, ...]:
        return self._r("module")

    def hipModuleGetFunction(self, module: Any, name: bytes) -> tuple[Any, ...]:
        return self._r(("function", name))

    def hipModuleUnload(self, module: Any) -> tuple[Any, ...]:
        return self._r()

    def hipModuleLaunchKernel(self, f: Any, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                              shared: int, stream: Any, params: Any, extra: int) -> tuple[Any, ...]:
        words = (ctypes.c_void_p * 5).from_address(extra)
        size = ctypes.c_size_t.from_address(words[3]).value
        self.launches.append((f, (gx, gy, gz), (bx, by, bz), shared, stream, params,
                              ctypes.string_at(words[1], size)))
        if self.fail_next:
            name, self.fail_next = self.fail_next, None
            return (_Err(name),)
        return self._r()

    def hipDeviceReset(self) -> tuple[Any, ...]:
        self.poisoned = self.reset_breaks
        return self._r()

    def hipDeviceSynchronize(self) -> tuple[Any, ...]:
        return (_Err("hipErrorIllegalAddress"),) if self.poisoned else self._r()


class _Err:
    def __init__(self, name: str) -> None:
        self.name = name

    def __bool__(self) -> bool:
        return self.name != "hipSuccess"


def fake_backend(monkeypatch: pytest.MonkeyPatch) -> tuple[HipBackend, FakeHip]:
    from vxpu.accel import hip as backend_module

    fake = FakeHip()
    monkeypatch.setattr(backend_module, "_load_hip", lambda: fake)
    backend = HipBackend(0)
    backend.open()
    return backend, fake


def test_fake_runtime_launch_passes_packed_args_through_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, fake = fake_backend(monkeypatch)
    props = backend.properties()
    assert (props.architecture, props.compute_units, backend.pci_bus_id) == ("gfx942", 304, "0000:c1:00.0")
    monkeypatch.setattr("vxpu.accel.hip.compile_ir",
                        lambda *a: (b"hsaco", {"vadd": KernelInfo("vadd", (4, 8, 8, 8), (0, 8, 16, 24), 32, 0)},
                                    False))
    module = backend.load_module(b"ir", ModuleKind.IR)
    kernel, info = backend.get_kernel(module, "vadd")
    assert info.args_size == 32
    args = struct.pack("<i4xQQQ", 5, 1, 2, 3)
    backend.launch(kernel, (2, 1, 1), (64, 1, 1), args)
    assert fake.launches[-1] == (("function", b"vadd"), (2, 1, 1), (64, 1, 1), 0, None, None, args)
    with pytest.raises(BackendError) as err:
        backend.get_kernel(module, "missing")
    assert err.value.status is Status.NOT_FOUND
    with pytest.raises(BackendError) as err:
        backend.launch(kernel, (1, 1, 1), (1, 1, 1), args[:-1])
    assert err.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(BackendError) as err:
        backend.load_module(b"ptx", ModuleKind.PTX)
    assert err.value.status is Status.UNSUPPORTED
    assert backend.stats.launches == 1


def test_fake_runtime_fault_resets_then_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, fake = fake_backend(monkeypatch)
    monkeypatch.setattr("vxpu.accel.hip.compile_ir",
                        lambda *a: (b"hsaco", {"k": KernelInfo("k", (8,), (0,), 8, 0)}, True))
    module = backend.load_module(b"ir")
    kernel, _ = backend.get_kernel(module, "k")
    fake.fail_next = "hipErrorIllegalAddress"
    with pytest.raises(BackendError) as err:
        backend.launch(kernel, (1, 1, 1), (1, 1, 1), bytes(8))
    assert err.value.status is Status.KERNEL_FAULT and backend.stats.resets == 1
    with pytest.raises(BackendError) as err:
        backend.launch(kernel, (1, 1, 1), (1, 1, 1), bytes(8))
    assert err.value.status is Status.INVALID_HANDLE
    kernel, _ = backend.get_kernel(backend.load_module(b"ir"), "k")
    backend.launch(kernel, (1, 1, 1), (1, 1, 1), bytes(8))
    # A reset that leaves the runtime unusable: DEVICE_LOST now and for every later call.
    fake.fail_next, fake.reset_breaks = "hipErrorIllegalAddress", True
    with pytest.raises(BackendError) as err:
        backend.launch(kernel, (1, 1, 1), (1, 1, 1), bytes(8))
    assert err.value.status is Status.DEVICE_LOST and backend.lost
    with pytest.raises(BackendError) as err:
        backend.alloc(64)
    assert err.value.status is Status.DEVICE_LOST


def test_fake_runtime_native_hsaco_layouts_come_from_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    from vxpu.ir.compile import compile_module
    from vxpu.ir.lower.errors import CompileError

    try:     # a native hsaco: built unchecked (no hidden arguments), as a trusted tool would
        hsaco = compile_module(vadd_image(), "amdgpu", arch="gfx942", cache=False, checked=False).image
    except CompileError as exc:
        pytest.skip(f"no AMDGPU toolchain here: {exc}")
    backend, fake = fake_backend(monkeypatch)
    module = backend.load_module(hsaco, ModuleKind.HSACO)
    kernel, info = backend.get_kernel(module, "vadd")
    assert info.param_offsets == (0, 8, 16, 24) and info.args_size == 32
    backend.launch(kernel, (1, 1, 1), (64, 1, 1), bytes(32))
    assert fake.launches[-1][-1] == bytes(32)
    with pytest.raises(BackendError) as err:
        backend.load_module(b"\x7fELF" + bytes(100), ModuleKind.HSACO)
    assert err.value.status is Status.BAD_MODULE


class _MemoryHip(FakeHip):
    """FakeHip with device memory, so the fault record can be written and read back."""

    def __init__(self) -> None:
        super().__init__()
        self.mem: dict[int, bytearray] = {}
        self.next = 0x7F0000000000

    def hipMalloc(self, size: int) -> tuple[Any, ...]:
        address, self.next = self.next, self.next + (1 << 20)
        self.mem[address] = bytearray(size)
        return self._r(address)

    def hipMemcpyHtoD(self, dst: int, src: Any, n: int) -> tuple[Any, ...]:
        self.mem[dst][:n] = bytes(src)[:n]
        return self._r()

    def hipMemcpyDtoH(self, dst: Any, src: int, n: int) -> tuple[Any, ...]:
        dst[:n] = self.mem[src][:n]
        return self._r()


def test_fake_runtime_checked_launch_and_contained_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checked IR kernel gets its bounds (here the backend's own allocations: no session) and
    the fault record as hidden arguments; a record written by the kernel surfaces at synchronize
    as a contained KernelFaultError, and the context, its handles and the kernel stay usable."""
    from vxpu.accel import hip as backend_module
    from vxpu.accel.backend import KernelFaultError
    from vxpu.ir.lower.gpu import FAULT_RECORD

    fake = _MemoryHip()
    monkeypatch.setattr(backend_module, "_load_hip", lambda: fake)
    backend = HipBackend(0)
    backend.open()
    info = KernelInfo("vadd", (4, 8, 8, 8), (0, 8, 16, 24), 32, 0, True, (1, 2, 3))
    monkeypatch.setattr("vxpu.accel.hip.compile_ir", lambda *a: (b"hsaco", {"vadd": info}, False))
    assert "checked-ir" in backend.properties().features
    kernel, got = backend.get_kernel(backend.load_module(b"ir"), "vadd")
    assert got == info
    a, b = backend.alloc(40), backend.alloc(40)
    args = struct.pack("<i4xQQQ", 10, a + 8, b, 0xDEAD)
    backend.launch(kernel, (1, 1, 1), (64, 1, 1), args)
    sent = fake.launches[-1][-1]
    assert sent[:32] == args
    bounds = struct.unpack_from("<6Q", sent, 32)
    windows = struct.unpack_from("<32i", sent, 80)           # (lo, hi) per pointer and size 1, 2, 4, 8
    record, kernel_id = struct.unpack_from("<QI", sent, 208)
    assert bounds == (a, 40, b, 40, 0, 0) and kernel_id == 0 and len(sent) == 220
    assert windows == (-8, 31, -4, 15, -2, 7, -1, 3) + (0, 39, 0, 19, 0, 9, 0, 4) + (1, 0) * 4 + (1, 0) * 4
    backend.synchronize()                                   # nothing recorded: no fault
    backend.launch(kernel, (1, 1, 1), (64, 1, 1), args)     # this one faults (written here):
    raw = fake.mem[record]
    for name, value in (("claimed", 1), ("code", 1), ("origin", 2), ("thread_x", 10)):
        struct.pack_into("<I", raw, FAULT_RECORD[name], value)
    struct.pack_into("<Q", raw, FAULT_RECORD["offset"], 40)
    with pytest.raises(KernelFaultError) as err:
        backend.synchronize()
    rec = err.value.record
    assert (rec.kernel, rec.param, rec.offset, rec.thread) == ("vadd", 2, 40, (10, 0, 0))
    assert err.value.context_kept and backend.stats.resets == 0 and not any(fake.mem[record])
    backend.launch(kernel, (1, 1, 1), (64, 1, 1), args)     # the same handle still launches
    backend.synchronize()
