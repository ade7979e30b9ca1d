"""Tests of the CUDA backend.

Without a GPU: the error mapping, PTX helpers (nvJitLink assembles the test PTX for real),
argument packing and the clean "unavailable" path. With a GPU (the H100 machine): memory,
registered guest-RAM copies, modules, launches, queues, events, faults and context reset.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
from vxpu.accel.backend import BackendError, BackendUnavailable, KernelInfo, ModuleKind, Status
from vxpu.accel.cuda import CudaBackend
from vxpu.accel.cuda_util import max_ptx_isa, ptx_to_cubin, ptx_version, status_for_cuda_error
from vxpu.accel.gpu_common import ArgPack, natural_layout

PTX = b"""
.version 8.0
.target sm_90
.address_size 64

.visible .entry empty()
{
    ret;
}

.visible .entry vadd(.param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u32 pn)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<11>;
    .reg .f32 %f<4>;
    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [pb];
    ld.param.u64 %rd3, [pc];
    ld.param.u32 %r1, [pn];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd4, %rd1;
    cvta.to.global.u64 %rd5, %rd2;
    cvta.to.global.u64 %rd6, %rd3;
    mul.wide.u32 %rd7, %r5, 4;
    add.s64 %rd8, %rd4, %rd7;
    add.s64 %rd9, %rd5, %rd7;
    add.s64 %rd10, %rd6, %rd7;
    ld.global.f32 %f1, [%rd8];
    ld.global.f32 %f2, [%rd9];
    add.f32 %f3, %f1, %f2;
    st.global.f32 [%rd10], %f3;
DONE:
    ret;
}

.visible .entry poke(.param .u64 pp)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<3>;
    ld.param.u64 %rd1, [pp];
    cvta.to.global.u64 %rd2, %rd1;
    mov.u32 %r1, 7;
    st.global.u32 [%rd2], %r1;
    ret;
}
"""


# -- no GPU needed ----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "status"), [
    ("CUDA_ERROR_ILLEGAL_ADDRESS", Status.KERNEL_FAULT),
    ("CUDA_ERROR_LAUNCH_FAILED", Status.KERNEL_FAULT),
    ("CUDA_ERROR_MISALIGNED_ADDRESS", Status.KERNEL_FAULT),
    ("CUDA_ERROR_ILLEGAL_INSTRUCTION", Status.KERNEL_FAULT),
    ("CUDA_ERROR_ASSERT", Status.KERNEL_FAULT),
    ("CUDA_ERROR_ECC_UNCORRECTABLE", Status.DEVICE_LOST),
    ("CUDA_ERROR_OUT_OF_MEMORY", Status.OUT_OF_MEMORY),
    ("CUDA_ERROR_INVALID_VALUE", Status.INVALID_ARGUMENT),
    ("CUDA_ERROR_INVALID_HANDLE", Status.INVALID_HANDLE),
    ("CUDA_ERROR_NOT_FOUND", Status.NOT_FOUND),
    ("CUDA_ERROR_INVALID_PTX", Status.BAD_MODULE),
    ("CUDA_ERROR_UNSUPPORTED_PTX_VERSION", Status.BAD_MODULE),
    ("CUDA_ERROR_NO_DEVICE", Status.UNAVAILABLE),
    ("CUDA_ERROR_NOT_SUPPORTED", Status.UNSUPPORTED),
    ("CUDA_ERROR_SOMETHING_NEW", Status.INTERNAL),
])
def test_error_mapping(name: str, status: Status) -> None:
    assert status_for_cuda_error(name) is status


def test_every_mapped_name_exists_in_the_bindings() -> None:
    driver = pytest.importorskip("cuda.bindings.driver")
    from vxpu.accel import cuda_util

    known = set(dir(driver.CUresult))
    names = set(cuda_util._STATUS_BY_NAME) | cuda_util._KERNEL_FAULT | cuda_util._DEVICE_LOST
    assert {"CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_OUT_OF_MEMORY"} <= known
    # Names missing from this bindings version are tolerated, but not most of them.
    assert len(names - known) <= 2, names - known


def test_ptx_version_and_driver_limit() -> None:
    assert ptx_version(PTX) == (8, 0)
    assert ptx_version(b".target sm_90\n") is None
    assert max_ptx_isa(13000) == (9, 0)
    assert max_ptx_isa(12040) == (8, 4)
    assert max_ptx_isa(13020) == (9, 0)


def test_nvjitlink_assembles_the_test_ptx() -> None:
    pytest.importorskip("cuda.bindings.nvjitlink")
    try:
        cubin = ptx_to_cubin(PTX, "sm_90")
    except BackendError as exc:
        if exc.status is Status.UNAVAILABLE:
            pytest.skip(f"nvJitLink unusable here: {exc}")
        raise
    assert cubin[:4] == b"\x7fELF"


def test_nvjitlink_reports_bad_ptx_with_its_log() -> None:
    pytest.importorskip("cuda.bindings.nvjitlink")
    bad = PTX.replace(b"ret;\n}\n\n.visible .entry vadd", b"bogus;\n}\n\n.visible .entry vadd", 1)
    with pytest.raises(BackendError) as info:
        ptx_to_cubin(bad, "sm_90")
    if info.value.status is Status.UNAVAILABLE:
        pytest.skip("nvJitLink unusable here")
    assert info.value.status is Status.BAD_MODULE
    assert "bogus" in info.value.log


def test_natural_layout_and_argpack_pointers() -> None:
    info = natural_layout("vadd", [8, 8, 8, 4])
    assert info.param_offsets == (0, 8, 16, 24)
    assert info.args_size == 32
    mixed = natural_layout("k", [4, 8, 2, 1, 4])
    assert mixed.param_offsets == (0, 8, 16, 18, 20)
    assert mixed.args_size == 24
    with pytest.raises(BackendError):
        natural_layout("k", [3])
    pack = ArgPack(KernelInfo("vadd", (8, 8, 8, 4), (0, 8, 16, 24), 28, 0))
    args = struct.pack("<QQQI", 1, 2, 3, 4)
    pack.load(args)
    pointers = (ctypes.c_void_p * 4).from_address(pack.params_address)
    assert [p - pack.storage_address for p in pointers] == [0, 8, 16, 24]
    assert ctypes.c_uint32.from_address(pointers[3]).value == 4
    assert ctypes.string_at(pack.storage_address, 28) == args
    with pytest.raises(BackendError) as info_err:
        pack.load(args + b"\0")
    assert info_err.value.status is Status.INVALID_ARGUMENT
    assert ArgPack(KernelInfo("empty", (), (), 0, 0)).params_address == 0


def test_unavailable_is_clean_without_a_driver() -> None:
    backend = CudaBackend(0)
    try:
        backend.open()
    except BackendUnavailable as exc:
        assert exc.status is Status.UNAVAILABLE
        assert str(exc)
        with pytest.raises(BackendError) as info:
            backend.alloc(16)
        assert info.value.status is Status.UNAVAILABLE
        return
    backend.close()
    with pytest.raises(BackendUnavailable):
        CudaBackend(4096).open()


# -- GPU --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu() -> CudaBackend:
    backend = CudaBackend(0)
    try:
        backend.open()
    except BackendUnavailable as exc:
        pytest.skip(f"no CUDA GPU: {exc}")
    yield backend
    backend.close()


@pytest.fixture
def vadd(gpu: CudaBackend):
    module = gpu.load_module(PTX, ModuleKind.PTX)
    yield module
    try:
        gpu.unload_module(module)
    except BackendError:
        pass


def memfd_region(size: int) -> mmap.mmap:
    fd = os.memfd_create("vxpu-test-guest-ram")
    os.ftruncate(fd, size)
    region = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    return region




@pytest.mark.gpu
def test_properties(gpu: CudaBackend) -> None:
    props = gpu.properties()
    assert props.backend == "cuda" and props.vendor == "nvidia"
    assert props.architecture.startswith("sm_")
    assert props.compute_units > 0 and props.max_threads_per_block >= 256
    free, total = gpu.memory_info()
    assert 0 < free <= total


@pytest.mark.gpu
def test_copies_roundtrip_sync_and_async(gpu: CudaBackend) -> None:
    data = np.random.default_rng().integers(0, 256, 1 << 20, dtype=np.uint8)
    a, b = gpu.alloc(data.nbytes), gpu.alloc(data.nbytes)
    try:
        gpu.copy_htod(a, memoryview(data))
        gpu.copy_dtod(b, a, data.nbytes)
        out = np.empty_like(data)
        gpu.copy_dtoh(memoryview(out), b)
        gpu.synchronize()
        assert np.array_equal(out, data)
        queue = gpu.create_queue()
        out2 = np.zeros_like(data)
        gpu.memset(b, 0xAB, 4096, queue)
        gpu.copy_dtoh(memoryview(out2), b, queue)
        gpu.synchronize(queue)
        assert (out2[:4096] == 0xAB).all() and np.array_equal(out2[4096:], data[4096:])
        gpu.destroy_queue(queue)
        with pytest.raises(BackendError) as info:
            gpu.synchronize(queue)
        assert info.value.status is Status.INVALID_HANDLE
    finally:
        gpu.free(a)
        gpu.free(b)
    with pytest.raises(BackendError) as info:
        gpu.free(a)
    assert info.value.status is Status.INVALID_HANDLE


@pytest.mark.gpu
def test_registered_memfd_region_copies_and_coherence(gpu: CudaBackend) -> None:
    size = 8 << 20
    region = memfd_region(size)
    view = memoryview(region)
    token = gpu.register_host(view)
    assert token.pinned
    try:
        dev = gpu.alloc(size)
        pattern = np.random.default_rng().integers(0, 256, size, dtype=np.uint8)
        view[:] = pattern.tobytes()
        gpu.copy_htod(dev, view[4096:])
        back = np.zeros(size - 4096, dtype=np.uint8)
        gpu.copy_dtoh(memoryview(back), dev)
        assert np.array_equal(back, pattern[4096:])
        gpu.copy_dtoh(view[: size // 2], dev)  # into the registered mapping itself
        assert bytes(view[:64]) == pattern[4096:4096 + 64].tobytes()
        gpu.free(dev)
    finally:
        gpu.unregister_host(token)
        view.release()
        region.close()
    with pytest.raises(BackendError):
        gpu.unregister_host(token)


@pytest.mark.gpu
def test_address_copies_stay_inside_registered_regions(gpu: CudaBackend) -> None:
    region = memfd_region(1 << 20)
    view = memoryview(region)
    token = gpu.register_host(view)
    dev = gpu.alloc(1 << 20)
    try:
        view[:8] = b"abcdefgh"
        gpu.copy_htod_address(dev, token.address, 8)
        gpu.copy_dtoh_address(token.address + 4096, dev, 8)
        assert bytes(view[4096:4104]) == b"abcdefgh"
        queue = gpu.create_queue()
        gpu.copy_dtoh_address(token.address + 8192, dev, 8, queue)
        gpu.synchronize(queue)
        gpu.destroy_queue(queue)
        assert bytes(view[8192:8200]) == b"abcdefgh"
        for bad in ((token.address + (1 << 20) - 4, 8), (token.address - 1, 1), (16, 8)):
            with pytest.raises(BackendError) as info:
                gpu.copy_htod_address(dev, *bad)
            assert info.value.status is Status.OUT_OF_RANGE
    finally:
        gpu.free(dev)
        gpu.unregister_host(token)
    with pytest.raises(BackendError) as info:  # unregistered regions are no longer reachable
        gpu.copy_htod_address(0, token.address, 8)
    assert info.value.status is Status.OUT_OF_RANGE
    view.release()
    region.close()


@pytest.mark.gpu
def test_register_read_only_mapping(gpu: CudaBackend) -> None:
    fd = os.memfd_create("vxpu-test-ro")
    os.ftruncate(fd, 1 << 20)
    region = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ)
    os.close(fd)
    view = memoryview(region)
    token = gpu.register_host(view, read_only=True)
    dev = gpu.alloc(1 << 20)
    gpu.copy_htod(dev, view)
    with pytest.raises(BackendError) as info:
        gpu.copy_dtoh_address(token.address, dev, 16)
    assert info.value.status is Status.OUT_OF_RANGE
    gpu.free(dev)
    gpu.unregister_host(token)
    view.release()
    region.close()


@pytest.mark.gpu
def test_kernel_info_launch_and_events(gpu: CudaBackend, vadd: object) -> None:
    kernel, info = gpu.get_kernel(vadd, "vadd")
    assert info.param_sizes == (8, 8, 8, 4) and info.param_offsets == (0, 8, 16, 24)
    n = 100_000
    rng = np.random.default_rng()
    a, b = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    da, db, dc = gpu.alloc(a.nbytes), gpu.alloc(b.nbytes), gpu.alloc(a.nbytes)
    gpu.copy_htod(da, memoryview(a))
    gpu.copy_htod(db, memoryview(b))
    gpu.memset(dc, 0xFF, a.nbytes)  # poison: NaN everywhere
    queue = gpu.create_queue()
    start, end = gpu.create_event(), gpu.create_event()
    gpu.record_event(start, queue)
    args = struct.pack("<QQQI", da, db, dc, n)[: info.args_size]
    gpu.launch(kernel, ((n + 255) // 256, 1, 1), (256, 1, 1), args, 0, queue)
    gpu.record_event(end, queue)
    gpu.synchronize(queue)
    assert gpu.event_elapsed_ms(start, end) >= 0.0
    out = np.empty_like(a)
    gpu.copy_dtoh(memoryview(out), dc)
    assert np.array_equal(out, a + b)
    with pytest.raises(BackendError) as info_err:
        gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args + b"\0\0\0\0\0", 0, queue)
    assert info_err.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(BackendError) as info_err:
        gpu.launch(kernel, (1, 1, 1), (4096, 1, 1), args, 0, queue)
    assert info_err.value.status is Status.INVALID_ARGUMENT
    for ev in (start, end):
        gpu.destroy_event(ev)
    gpu.destroy_queue(queue)
    for d in (da, db, dc):
        gpu.free(d)


@pytest.mark.gpu
def test_module_errors(gpu: CudaBackend, vadd: object) -> None:
    with pytest.raises(BackendError) as info:
        gpu.get_kernel(vadd, "nope")
    assert info.value.status is Status.NOT_FOUND
    with pytest.raises(BackendError) as info:
        gpu.load_module(b".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry k() { bogus; }",
                        ModuleKind.PTX)
    assert info.value.status is Status.BAD_MODULE
    assert info.value.log
    with pytest.raises(BackendError) as info:
        gpu.load_module(b"\x7fELFgarbage", ModuleKind.CUBIN)
    assert info.value.status is Status.BAD_MODULE
    with pytest.raises(BackendError) as info:
        gpu.load_module(b"x", ModuleKind.HSACO)
    assert info.value.status is Status.UNSUPPORTED


@pytest.mark.gpu
def test_cubin_from_nvjitlink_loads(gpu: CudaBackend) -> None:
    cubin = ptx_to_cubin(PTX, gpu.properties().architecture)
    module = gpu.load_module(cubin, ModuleKind.CUBIN)
    kernel, _ = gpu.get_kernel(module, "empty")
    gpu.launch(kernel, (1, 1, 1), (32, 1, 1), b"")
    gpu.synchronize()
    gpu.unload_module(module)
    with pytest.raises(BackendError) as info:
        gpu.launch(kernel, (1, 1, 1), (32, 1, 1), b"")
    assert info.value.status is Status.INVALID_HANDLE


VADD_IR = """
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


@pytest.mark.gpu
def test_ir_module_compiles_to_cubin_and_runs(gpu: CudaBackend) -> None:
    from vxpu.ir import binary, text

    image = binary.encode(text.parse(VADD_IR), names=False)
    misses, hits = gpu.stats.compile_cache_misses, gpu.stats.compile_cache_hits
    module = gpu.load_module(image, ModuleKind.IR)
    again = gpu.load_module(image, ModuleKind.IR)
    assert gpu.stats.compile_cache_misses + gpu.stats.compile_cache_hits == misses + hits + 2
    assert gpu.stats.compile_cache_hits >= hits + 1
    kernel, info = gpu.get_kernel(module, "vadd")
    assert info.param_offsets == (0, 8, 16, 24) and info.args_size == 32
    n = 5000
    rng = np.random.default_rng()
    a, b = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    da, db, dc = gpu.alloc(a.nbytes), gpu.alloc(b.nbytes), gpu.alloc(a.nbytes)
    gpu.copy_htod(da, memoryview(a))
    gpu.copy_htod(db, memoryview(b))
    gpu.memset(dc, 0xFF, a.nbytes)
    gpu.launch(kernel, ((n + 127) // 128, 1, 1), (128, 1, 1), struct.pack("<i4xQQQ", n, da, db, dc))
    out = np.empty_like(a)
    gpu.copy_dtoh(memoryview(out), dc)
    assert np.array_equal(out, a + b)
    for d in (da, db, dc):
        gpu.free(d)
    gpu.unload_module(module)
    gpu.unload_module(again)


@pytest.mark.gpu
def test_newer_ptx_goes_through_nvjitlink(gpu: CudaBackend) -> None:
    newer = PTX.replace(b".version 8.0", b".version 9.9")
    try:
        module = gpu.load_module(newer, ModuleKind.PTX)
    except BackendError as exc:  # no nvJitLink that knows 9.9: a clean BAD_MODULE is the contract
        assert exc.status is Status.BAD_MODULE
        return
    gpu.unload_module(module)


FAULT_CHILD = """
import mmap, os, struct, sys
from vxpu.accel.backend import BackendError, ModuleKind, Status
from vxpu.accel.cuda import CudaBackend
PTX = __PTX__
gpu = CudaBackend(0)
gpu.open()
fd = os.memfd_create("ram"); os.ftruncate(fd, 1 << 20)
region = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
token = gpu.register_host(memoryview(region))
module = gpu.load_module(PTX, ModuleKind.PTX)
kernel, _ = gpu.get_kernel(module, "poke")
queue = gpu.create_queue()
old = gpu.alloc(4096)
try:
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), struct.pack("<Q", 0x10), 0, queue)
    gpu.synchronize(queue)
    print("NO-FAULT")
except BackendError as exc:
    print("FAULT", exc.status.name, exc.vendor, gpu.stats.faults)
for name, call in (("sync", lambda: gpu.synchronize(queue)), ("free", lambda: gpu.free(old)),
                   ("kernel", lambda: gpu.get_kernel(module, "vadd"))):
    try:
        call()
        print("AFTER", name, "OK")
    except BackendError as exc:
        print("AFTER", name, exc.status.name)
if gpu.lost is None:
    dev = gpu.alloc(4096)
    module = gpu.load_module(PTX, ModuleKind.PTX)
    kernel, _ = gpu.get_kernel(module, "poke")
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), struct.pack("<Q", dev))
    gpu.synchronize()
    gpu.copy_dtoh(memoryview(region)[:4], dev)
    print("SERVING", struct.unpack("<I", region[:4])[0], token.pinned)
else:
    print("LOST", gpu.lost)
gpu.unregister_host(token)
gpu.close()
"""


@pytest.mark.gpu
def test_fault_is_reported_and_contained(gpu: CudaBackend) -> None:
    """A faulting kernel runs in a child process: on driver 580 the fault poisons the process."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = FAULT_CHILD.replace("__PTX__", repr(PTX))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    fault = next(line for line in lines if line.startswith(("FAULT", "NO-FAULT"))).split()
    assert fault[0] == "FAULT" and fault[1] in ("KERNEL_FAULT", "DEVICE_LOST"), lines
    assert fault[2] in ("CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED")
    after = {line.split()[1]: line.split()[2] for line in lines if line.startswith("AFTER")}
    if fault[1] == "KERNEL_FAULT":  # the driver let the context be rebuilt
        assert after == {"sync": "INVALID_HANDLE", "free": "INVALID_HANDLE", "kernel": "INVALID_HANDLE"}
        assert any(line == "SERVING 7 True" for line in lines), lines
    else:
        assert set(after.values()) == {"DEVICE_LOST"}, lines
        assert any(line.startswith("LOST") and "restart" in line for line in lines), lines
    # This process's backend is untouched by the child's fault.
    d = gpu.alloc(64)
    gpu.free(d)


@pytest.mark.gpu
def test_out_of_memory(gpu: CudaBackend) -> None:
    with pytest.raises(BackendError) as info:
        gpu.alloc(1 << 46)
    assert info.value.status is Status.OUT_OF_MEMORY


@pytest.mark.gpu
def test_other_threads_get_the_context(gpu: CudaBackend) -> None:
    results: list[object] = []

    def work() -> None:
        try:
            d = gpu.alloc(64)
            gpu.memset(d, 1, 64)
            out = bytearray(64)
            gpu.copy_dtoh(memoryview(out), d)
            gpu.free(d)
            results.append(bytes(out))
        except BackendError as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"\x01" * 64] * 4


@pytest.mark.gpu
def test_explicit_reset(gpu: CudaBackend) -> None:
    d = gpu.alloc(64)
    gpu.reset()
    with pytest.raises(BackendError):
        gpu.free(d)
    d = gpu.alloc(64)
    gpu.free(d)
