"""GpuBackend's fault record: where it lives and how synchronize reads it (a fake vendor, no GPU).

The record goes to mapped pinned host memory where the vendor has it (read in place after the
wait), else device memory read through a pinned mirror queued on the launches' one stream
before the wait, else with a synchronous copy after it. Whatever the placement, a checked
kernel's recorded fault is raised once, at the synchronize that covers it, with the record's
fields, and a clean launch afterwards raises nothing. The fake runs each stream's work (copies,
kernels) only when that stream or the device is synchronized, as a GPU would have finished it.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

import pytest
from vxpu.accel.backend import KernelFaultError, KernelInfo
from vxpu.accel.gpu_common import ArgPack, ErrorMap
from vxpu.accel.gpubase import GpuBackend

RECORD = struct.Struct("<IIIIQ6I")      # claimed, code, origin, kernel_id, offset, block xyz, thread xyz


class FakeGpu(GpuBackend):
    name = "fake"
    vendor = "FAKE"
    errors = ErrorMap(frozenset(), frozenset(), {})

    def __init__(self, *, mapped: bool, mirror: bool) -> None:
        super().__init__(0, compile_cache=False)
        self._keep: dict[int, Any] = {}                  # address -> ctypes buffer (host and "device")
        self.queued: dict[Any, list[Callable[[], None]]] = {}
        self.calls: list[tuple[str, Any]] = []           # (op, stream) of every copy
        self._default_stream = "legacy"
        ops: dict[str, tuple[str, Callable[..., tuple[Any, ...]]]] = {
            "malloc": ("malloc", self._alloc), "free": ("free", lambda a: (0,)),
            "htod": ("htod", lambda d, s, n, st: self._copy("htod", d, s, n, st)),
            "dtoh": ("dtoh", lambda d, s, n, st: self._copy("dtoh", d, s, n, st)),
            "module_unload": ("unload", lambda h: (0,)),
            "stream_create": ("stream_create", self._stream_create),
            "stream_destroy": ("stream_destroy", lambda s: (0,)),
            "sync_stream": ("sync_stream", self._sync_stream),
            "sync_device": ("sync_device", self._sync_device),
            "host_free": ("host_free", lambda a: (0,)),
        }
        if mirror:
            ops["host_alloc"] = ("host_alloc", self._alloc)
        if mapped:
            ops["host_alloc_mapped"] = ("host_alloc_mapped", lambda n: (0, *([self._alloc(n)[1]] * 2)))
        self._ops = ops
        self._open = True

    # -- the fake vendor ---------------------------------------------------------------------------
    def _alloc(self, size: int) -> tuple[int, int]:
        buf = (ctypes.c_char * size)()
        self._keep[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def _stream_create(self) -> tuple[int, Any]:
        stream = f"stream{len(self.queued)}"
        self.queued[stream] = []
        return 0, stream

    def _copy(self, kind: str, dst: Any, src: Any, n: int, stream: Any) -> tuple[int]:
        self.calls.append((kind, stream))

        def run() -> None:
            if isinstance(dst, memoryview):
                dst[:n] = ctypes.string_at(src, n)
            elif isinstance(src, memoryview):
                ctypes.memmove(dst, bytes(src[:n]), n)
            else:
                ctypes.memmove(dst, src, n)
        if stream is None:
            run()
        else:
            self.queued.setdefault(stream, []).append(run)
        return (0,)

    def _sync_stream(self, stream: Any) -> tuple[int]:
        for work in self.queued.get(stream, []):
            work()
        self.queued[stream] = []
        return (0,)

    def _sync_device(self) -> tuple[int]:
        for stream in list(self.queued):
            self._sync_stream(stream)
        return (0,)

    def _drv_launch(self, handle: Any, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                    shared_bytes: int, stream: Any, pack: Any) -> tuple[Any, ...]:
        (record,) = struct.unpack_from("<Q", pack.view, pack.info.param_offsets[-2])
        (kernel_id,) = struct.unpack_from("<I", pack.view, pack.info.param_offsets[-1])

        def run() -> None:                  # a faulting thread claims the record (first one wins)
            if handle == "faulty" and not ctypes.c_uint32.from_address(record).value:
                RECORD.pack_into((ctypes.c_char * RECORD.size).from_address(record), 0,
                                 1, 1, 0, kernel_id, 4096, 2, 0, 0, 64, 0, 0)

        def fill() -> None:                 # ... the rest of a claim made while the kernel runs
            RECORD.pack_into((ctypes.c_char * RECORD.size).from_address(record), 0,
                             1, 1, 0, kernel_id, 4096, 2, 0, 0, 64, 0, 0)
        if handle == "torn":                # still running: a thread has claimed, not yet filled
            ctypes.c_uint32.from_address(record).value = 1
            run = fill
        self.queued.setdefault(stream, []).append(run)
        return (0,)

    def _is_open(self) -> bool:
        return self._open

    def _is_current(self) -> bool:
        return True

    def _bind(self) -> None:
        pass

    def _release(self) -> None:
        self._open = False

    # -- helpers for the tests ---------------------------------------------------------------------
    def kernel(self, handle: str) -> Any:
        info = KernelInfo(handle, (8,), (0,), 8, 0, checked=True, pointer_params=(0,))
        module = self._add_module(object(), {})
        kernel, _ = self._add_kernel(module, handle, handle, info, ArgPack(info))
        return kernel

    def record_copies(self) -> list[tuple[str, Any]]:
        """The dtoh copies made so far (the record's reads: nothing else copies back here)."""
        return [c for c in self.calls if c[0] == "dtoh"]


def _launch(gpu: FakeGpu, kernel: Any, queue: Any) -> None:
    buf = gpu.alloc(64)
    gpu.launch(kernel, (1, 1, 1), (32, 1, 1), struct.pack("<Q", buf), 0, queue, bounds=((buf, 64),))


PLACEMENTS = {"mapped": {"mapped": True, "mirror": True}, "mirror": {"mapped": False, "mirror": True},
              "sync copy": {"mapped": False, "mirror": False}}


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_recorded_fault_is_raised_once_at_the_covering_synchronize(placement):
    gpu = FakeGpu(**PLACEMENTS[placement])
    faulty, clean = gpu.kernel("faulty"), gpu.kernel("clean")
    queue = gpu.create_queue()
    _launch(gpu, clean, queue)
    gpu.synchronize(queue)                               # nothing recorded: nothing raised
    _launch(gpu, faulty, queue)
    with pytest.raises(KernelFaultError) as info:
        gpu.synchronize(queue)
    rec = info.value.record
    assert (rec.kernel, rec.code, rec.offset, rec.block, rec.thread) == ("faulty", 1, 4096, (2, 0, 0), (64, 0, 0))
    assert info.value.context_kept
    gpu.synchronize(queue)                               # raised once: the record was cleared
    _launch(gpu, clean, queue)
    gpu.synchronize(queue)
    assert gpu.stats.faults == 1


def test_where_each_placement_reads_the_record():
    reads = {}
    for placement, kwargs in PLACEMENTS.items():
        gpu = FakeGpu(**kwargs)
        queue = gpu.create_queue()
        _launch(gpu, gpu.kernel("clean"), queue)
        gpu.synchronize(queue)
        reads[placement] = gpu.record_copies()
    assert reads["mapped"] == []                         # a plain read of host memory
    assert reads["mirror"] == [("dtoh", "stream0")]      # queued on the launches' stream
    assert reads["sync copy"] == [("dtoh", None)]        # a synchronous copy after the wait


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_launches_on_two_streams_are_checked_at_the_device_wide_wait(placement):
    gpu = FakeGpu(**PLACEMENTS[placement])
    faulty, clean = gpu.kernel("faulty"), gpu.kernel("clean")
    q1, q2 = gpu.create_queue(), gpu.create_queue()
    _launch(gpu, faulty, q1)
    _launch(gpu, clean, q2)
    gpu.synchronize(q2)                                  # the faulty kernel on q1 has not run yet
    with pytest.raises(KernelFaultError):
        gpu.synchronize(None)
    gpu.synchronize(None)
    assert gpu.stats.faults == 1
    if placement == "mirror":                            # two streams: no mirror copy, read after
        assert ("dtoh", "stream0") not in gpu.record_copies()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_record_still_being_written_on_another_stream_is_reported_whole(placement):
    """A wait for one stream while a checked kernel on another is still filling the record it
    claimed (claimed, fields not yet written) must not report, and clear, the half-written
    record: the fault is raised once, with its fields."""
    gpu = FakeGpu(**PLACEMENTS[placement])
    torn, clean = gpu.kernel("torn"), gpu.kernel("clean")
    q1, q2 = gpu.create_queue(), gpu.create_queue()
    _launch(gpu, torn, q1)
    _launch(gpu, clean, q2)
    with pytest.raises(KernelFaultError) as info:
        gpu.synchronize(q2)                              # covers q2 only
        gpu.synchronize(None)
    rec = info.value.record
    assert (rec.kernel, rec.code, rec.offset, rec.block, rec.thread) == ("torn", 1, 4096, (2, 0, 0), (64, 0, 0))
    gpu.synchronize(None)
    assert gpu.stats.faults == 1
