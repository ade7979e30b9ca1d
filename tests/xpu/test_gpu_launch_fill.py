"""GpuBackend.launch skips refilling a checked kernel's argument pack when it is handed the very
same argument bytes and bounds objects as the fill the pack holds (a session's LaunchPlan), and
only then: whatever the order of launches, the pack the driver sees holds exactly this launch's
arguments and hidden bounds (a fake vendor, no GPU)."""

from __future__ import annotations

import struct

import pytest
from vxpu.accel.backend import BackendError, KernelInfo, Status
from vxpu.accel.gpu_common import ArgPack

from .test_gpu_fault_record import FakeGpu


class Counting:
    """Wraps a kernel's CheckedArgs to count fills."""

    def __init__(self, inner):
        self.inner, self.fills = inner, 0

    def fill(self, *args):
        self.fills += 1
        self.inner.fill(*args)


def _kernel(gpu: FakeGpu):
    info = KernelInfo("k", (8,), (0,), 8, 0, checked=True, pointer_params=(0,))
    module = gpu._add_module(object(), {})
    kernel, _ = gpu._add_kernel(module, "clean", "clean", info, ArgPack(info))
    kernel.checked = Counting(kernel.checked)
    return kernel


def _hidden(kernel) -> tuple[int, int, int]:
    """(pointer argument, bound base, bound length) as the pack holds them."""
    view = kernel.pack.view
    (arg,) = struct.unpack_from("<Q", view, 0)
    base, length = struct.unpack_from("<QQ", view, kernel.pack.info.param_offsets[1])
    return arg, base, length


def test_the_pack_always_holds_this_launchs_arguments():
    gpu = FakeGpu(mapped=True, mirror=True)
    kernel = _kernel(gpu)
    q = gpu.create_queue()
    a, b = gpu.alloc(64), gpu.alloc(128)
    args_a, bounds_a = struct.pack("<Q", a), ((a, 64),)
    args_b, bounds_b = struct.pack("<Q", b), ((b, 128),)
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_a, 0, q, bounds=bounds_a)
    assert _hidden(kernel) == (a, a, 64) and kernel.checked.fills == 1
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_a, 0, q, bounds=bounds_a)     # same objects: no fill
    assert _hidden(kernel) == (a, a, 64) and kernel.checked.fills == 1
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_b, 0, q, bounds=bounds_b)
    assert _hidden(kernel) == (b, b, 128) and kernel.checked.fills == 2
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_a, 0, q, bounds=bounds_a)     # back to a: filled again
    assert _hidden(kernel) == (a, a, 64) and kernel.checked.fills == 3
    equal = ((a, 64),)                                                          # equal, not the same object
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), bytes(args_a), 0, q, bounds=equal)
    assert kernel.checked.fills == 4
    gpu.synchronize(q)


def test_a_fill_that_failed_half_way_is_not_trusted():
    gpu = FakeGpu(mapped=True, mirror=True)
    kernel = _kernel(gpu)
    q = gpu.create_queue()
    a = gpu.alloc(64)
    args_a, bounds_a = struct.pack("<Q", a), ((a, 64),)
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_a, 0, q, bounds=bounds_a)
    # the guest arguments are copied in, then the hidden ones do not fit a u64
    with pytest.raises((BackendError, struct.error)):
        gpu.launch(kernel, (1, 1, 1), (1, 1, 1), struct.pack("<Q", 8), 0, q, bounds=((1 << 64, 8),))
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_a, 0, q, bounds=bounds_a)
    assert _hidden(kernel) == (a, a, 64)
    gpu.synchronize(q)


def test_a_bad_bound_is_still_refused_with_the_same_status():
    gpu = FakeGpu(mapped=True, mirror=True)
    kernel = _kernel(gpu)
    q = gpu.create_queue()
    with pytest.raises(BackendError) as e:
        gpu.launch(kernel, (1, 1, 1), (1, 1, 1), struct.pack("<Q", 12), 0, q, bounds=((12, 8),))
    assert e.value.status is Status.INVALID_ARGUMENT


def test_a_bound_past_the_element_forms_limit_is_refused_after_a_memoized_fill():
    """The 2^62 host limit (ir-lowering §7, gpucheck's element-index form) holds through
    GpuBackend.launch, also right after launches whose fill was skipped for the same arguments:
    a new bounds object is always filled (and so checked) again."""
    from vxpu.accel.gpu_checked import MAX_LENGTH

    gpu = FakeGpu(mapped=True, mirror=True)
    kernel = _kernel(gpu)
    q = gpu.create_queue()
    a = gpu.alloc(64)
    args_a, bounds_a = struct.pack("<Q", a), ((a, 64),)
    for _ in range(2):
        gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_a, 0, q, bounds=bounds_a)
    assert kernel.checked.fills == 1
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_a, 0, q, bounds=((a, MAX_LENGTH),))    # the limit itself
    with pytest.raises(BackendError) as e:
        gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_a, 0, q, bounds=((a, MAX_LENGTH + 1),))
    assert e.value.status is Status.INVALID_ARGUMENT
    gpu.launch(kernel, (1, 1, 1), (1, 1, 1), args_a, 0, q, bounds=bounds_a)
    assert _hidden(kernel) == (a, a, 64)
    gpu.synchronize(q)
