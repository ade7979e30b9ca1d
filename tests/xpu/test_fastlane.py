"""The native fast lane (vfio_server.xpu.fastlane) against a fake GPU, no GPU needed.

:class:`FakeDevice` is an in-memory "device": deterministic device addresses backed by host
buffers, per-stream queues of work that runs when the stream or the device is synchronized, and
a log of every launch and copy as the driver saw it. :class:`FakeGpu` is a
:class:`~vxpu.accel.gpubase.GpuBackend` over it for the Python path, and hands the fast lane
ctypes ``CFUNCTYPE`` callbacks into the same device as its native driver entry points, so the two
paths can be compared call by call. This file holds the fake and the hand-off tests; the
differential test is in test_fastlane_diff.py.
"""

from __future__ import annotations

import bisect
import ctypes
import json
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from vxpu.accel import gpu_checked
from vxpu.accel.backend import DeviceProperties, KernelInfo, ModuleKind
from vxpu.accel.gpu_common import ArgPack, ErrorMap, HostRegistration
from vxpu.accel.gpubase import GpuBackend
from vxpu.vfio_server.xpu import fastlane

from vxpu.abi import xpu as abi
from vxpu.abi.status import Status
from vxpu.abi.xpu import Opcode

from .ringdriver import DATA_OFF, XpuRig, desc

DEV_BASE = 0x7F00_0000_0000
FUNC_BASE = 0x1000
STREAM_BASE = 0x5000
RECORD = struct.Struct("<IIIIQ6I")
LAUNCH_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *([ctypes.c_uint] * 7), ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p))
HTOD_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
DTOH_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)
SYNC_FN = ctypes.CFUNCTYPE(ctypes.c_int)
QUERY_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
NOT_READY = 600                  # CUDA_ERROR_NOT_READY
ERR_LAUNCH = 719                 # a CUresult the fake returns when told to fail
ERRORS = ErrorMap(frozenset(), frozenset(), {"FAKE_FAILED": Status.INTERNAL})


class FakeErr(int):
    """A vendor error with a ``name``, as cuda.bindings' CUresult has."""

    @property
    def name(self) -> str:
        return "FAKE_FAILED"


#: The fake's kernels: name -> (KernelInfo, checked). "inc" adds its u32 value to the u32 at its
#: pointer (a checked kernel: outside its bounds it claims the fault record instead); "empty"
#: does nothing (unchecked, no arguments).
KERNELS = {
    "inc": KernelInfo("inc", (8, 4), (0, 8), 16, 0, checked=True, pointer_params=(0,)),
    "empty": KernelInfo("empty", (), (), 0, 0),
}


class FakeDevice:
    """Device memory, streams and a call log (see the module docstring)."""

    def __init__(self) -> None:
        self.bufs: dict[int, Any] = {}         # device address -> ctypes buffer
        self.starts: list[int] = []
        self.next = DEV_BASE
        self.queued: dict[Any, list[Callable[[], None]]] = {}
        self.log: list[tuple[Any, ...]] = []
        self.queries = 0                       # native stream queries (the poll loop's copy waits)
        self.native_syncs = 0                  # native blocking waits (cuCtxSynchronize)
        self.fail: set[str] = set()            # "launch", "htod", "dtoh", "sync": fail the next such call
        self.funcs: dict[int, KernelInfo] = {}
        self.record_host = 0
        self.native_calls = 0
        self.keep: list[Any] = []

    def malloc(self, size: int) -> int:
        buf = (ctypes.c_char * size)()
        address = self.next
        self.next += (size + 0xFFF) & ~0xFFF
        self.bufs[address] = buf
        bisect.insort(self.starts, address)
        return address

    def host(self, device: int, n: int) -> int:
        """The host address backing device ``[device, device + n)``."""
        i = bisect.bisect_right(self.starts, device) - 1
        assert i >= 0, hex(device)
        start = self.starts[i]
        buf = self.bufs[start]
        assert device - start + n <= ctypes.sizeof(buf), (hex(device), n)
        return ctypes.addressof(buf) + device - start

    def enqueue(self, stream: Any, work: Callable[[], None]) -> None:
        self.queued.setdefault(stream, []).append(work)

    def sync(self, stream: Any = None) -> int:
        if "sync" in self.fail:
            self.fail.discard("sync")
            return ERR_LAUNCH
        for s in [stream] if stream is not None else list(self.queued):
            for work in self.queued.get(s, []):
                work()
            self.queued[s] = []
        return 0

    # -- the driver calls, shared by both paths ----------------------------------------------------
    def launch(self, func: int, dims: tuple[int, ...], shared: int, stream: int, params: bytes) -> int:
        if "launch" in self.fail:
            self.fail.discard("launch")
            return ERR_LAUNCH
        info = self.funcs[func]
        self.log.append(("launch", info.name, dims, shared, stream, self._normal(info, params)))
        if info.name == "inc":
            ptr, value = struct.unpack_from("<QI", params, 0)
            base, length = struct.unpack_from("<QQ", params, info.param_offsets[2])
            (record,) = struct.unpack_from("<Q", params, info.param_offsets[-2])     # the last two: record, kernel id

            def run() -> None:
                if base <= ptr and ptr + 4 <= base + length:
                    host = self.host(ptr, 4)
                    ctypes.c_uint32.from_address(host).value += value
                elif not ctypes.c_uint32.from_address(record).value:
                    RECORD.pack_into((ctypes.c_char * RECORD.size).from_address(record), 0,
                                     1, 1, 0, 0, ptr - base, 0, 0, 0, 0, 0, 0)
            self.enqueue(stream, run)
        return 0

    @staticmethod
    def _normal(info: KernelInfo, params: bytes) -> bytes:
        """The parameters with the fault record's host address zeroed (it differs per device)."""
        if not info.checked:
            return params
        raw = bytearray(params)
        raw[info.param_offsets[-2]:info.param_offsets[-2] + 8] = bytes(8)
        return bytes(raw)

    def htod(self, dst: int, src: int, n: int, stream: Any) -> int:
        if "htod" in self.fail:
            self.fail.discard("htod")
            return ERR_LAUNCH
        self.log.append(("htod", dst, n, stream))
        host = self.host(dst, n)
        self.enqueue(stream, lambda: ctypes.memmove(host, src, n))
        return 0

    def dtoh(self, dst: int, src: int, n: int, stream: Any) -> int:
        if "dtoh" in self.fail:
            self.fail.discard("dtoh")
            return ERR_LAUNCH
        self.log.append(("dtoh", src, n, stream))
        host = self.host(src, n)
        self.enqueue(stream, lambda: ctypes.memmove(dst, host, n))
        return 0

    # -- the native entry points -----------------------------------------------------------------
    def native(self) -> dict[str, int]:
        def launch(f: int, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, shared: int, stream: int,
                   params: Any, _extra: Any) -> int:
            self.native_calls += 1
            info = self.funcs[f]
            raw = bytearray(info.args_size)
            for i, (off, size) in enumerate(zip(info.param_offsets, info.param_sizes)):
                raw[off:off + size] = ctypes.string_at(params[i], size)
            return self.launch(f, (gx, gy, gz, bx, by, bz), shared, stream or 0, bytes(raw))

        def htod(dst: int, src: int, n: int, stream: int) -> int:
            self.native_calls += 1
            return self.htod(dst, src, n, stream or 0)

        def dtoh(dst: int, src: int, n: int, stream: int) -> int:
            self.native_calls += 1
            return self.dtoh(dst, src, n, stream or 0)

        def sync() -> int:
            self.native_calls += 1
            self.native_syncs += 1
            return self.sync()

        def query(stream: int) -> int:
            """cuStreamQuery: "still running" every other time, else the stream's work runs."""
            self.queries += 1
            if self.queries % 2:
                return NOT_READY
            return self.sync(stream or 0)
        fns = [LAUNCH_FN(launch), HTOD_FN(htod), DTOH_FN(dtoh), SYNC_FN(sync), QUERY_FN(query)]
        self.keep.extend(fns)
        return {name: ctypes.cast(fn, ctypes.c_void_p).value or 0 for name, fn in zip(fastlane.DRIVER_FIELDS, fns)}


class FakeGpu(GpuBackend):
    """A GpuBackend over :class:`FakeDevice` (mapped fault record; address copies like CUDA's)."""

    name = "fakegpu"
    vendor = "FAKE"
    errors = ERRORS

    def __init__(self, native: bool = True) -> None:
        super().__init__(0, compile_cache=False)
        self.dev = FakeDevice()
        self._native = native
        self._open = True
        self._default_stream = None
        self._streams = 0
        self._props = DeviceProperties("fakegpu", "fake", "fake", "sm_00", 1 << 30, 1, 1024, 49152,
                                       frozenset({"ir", "checked-ir"}))
        d = self.dev
        ok = (lambda *a: (0,))
        self._ops = {
            "malloc": ("malloc", lambda n: (0, d.malloc(n))), "free": ("free", ok),
            "mem_info": ("mem_info", lambda: (0, 1 << 30, 1 << 30)),
            "memset": ("memset", self._memset),
            "htod": ("htod", lambda dst, src, n, st: self._copy_in(dst, src, n, st)),
            "dtoh": ("dtoh", lambda dst, src, n, st: self._copy_out(dst, src, n, st)),
            "dtod": ("dtod", self._dtod), "module_unload": ("module_unload", ok),
            "stream_create": ("stream_create", self._stream_create), "stream_destroy": ("stream_destroy", ok),
            "event_create": ("event_create", lambda: (0, object())), "event_destroy": ("event_destroy", ok),
            "event_record": ("event_record", ok), "event_elapsed": ("event_elapsed", lambda a, b: (0, 0.5)),
            "host_register": ("host_register", ok), "host_unregister": ("host_unregister", ok),
            "sync_device": ("sync_device", lambda: (self._err(d.sync()),)),
            "sync_stream": ("sync_stream", lambda s: (self._err(d.sync(s)),)),
            "host_alloc_mapped": ("host_alloc_mapped", self._host_alloc_mapped), "host_free": ("host_free", ok),
        }

    @staticmethod
    def _err(code: int) -> Any:
        return FakeErr(code) if code else 0

    def _memset(self, address: int, value: int, size: int, stream: Any) -> tuple[int]:
        host = self.dev.host(address, size)
        self.dev.enqueue(stream, lambda: ctypes.memset(host, value, size))
        return (0,)

    def _dtod(self, dst: int, src: int, size: int, stream: Any) -> tuple[int]:
        d, s = self.dev.host(dst, size), self.dev.host(src, size)
        self.dev.enqueue(stream, lambda: ctypes.memmove(d, s, size))
        return (0,)

    def _copy_in(self, dst: int, src: Any, n: int, stream: Any) -> tuple[Any]:
        if isinstance(src, memoryview):
            data = (ctypes.c_char * n).from_buffer_copy(bytes(src[:n]))
            self.dev.keep.append(data)
            src = ctypes.addressof(data)
        err = self.dev.htod(dst, src, n, stream)
        if stream is None:
            self.dev.sync()
        return (self._err(err),)

    def _copy_out(self, dst: Any, src: int, n: int, stream: Any) -> tuple[Any]:
        if isinstance(dst, memoryview):
            view = dst
            host = self.dev.host(src, n)
            self.dev.enqueue(stream, lambda: view.__setitem__(slice(0, n), ctypes.string_at(host, n)))
            if stream is None:
                self.dev.sync()
            return (0,)
        err = self.dev.dtoh(dst, src, n, stream)
        if stream is None:
            self.dev.sync()
        return (self._err(err),)

    def _stream_create(self) -> tuple[int, int]:
        self._streams += 1
        return 0, STREAM_BASE + self._streams

    def _host_alloc_mapped(self, size: int) -> tuple[int, int, int]:
        buf = (ctypes.c_char * size)()
        self.dev.keep.append(buf)
        self.dev.record_host = ctypes.addressof(buf)
        return 0, self.dev.record_host, self.dev.record_host

    # -- what CudaBackend adds ---------------------------------------------------------------------
    def copy_htod_address(self, dst: int, host: int, size: int, queue: object | None = None) -> None:
        self._ensure()
        self._region(host, size, False)
        (err,) = self._copy_in(dst, host, size, self._stream(queue))
        if err:
            self._raise(err, "htod")
        self.stats.bytes_htod += size

    def copy_dtoh_address(self, host: int, src: int, size: int, queue: object | None = None) -> None:
        self._ensure()
        self._region(host, size, True)
        (err,) = self._copy_out(host, src, size, self._stream(queue))
        if err:
            self._raise(err, "dtoh")
        self.stats.bytes_dtoh += size

    def _region(self, host: int, size: int, writable: bool) -> HostRegistration:
        for reg in self._hosts:
            if reg.address <= host and host + size <= reg.end and not (writable and reg.read_only):
                return reg
        raise AssertionError(f"host range {host:#x}+{size} not registered")

    def load_module(self, image: bytes, kind: ModuleKind = ModuleKind.IR) -> object:
        self._ensure()
        return self._add_module(len(self._modules) + 1, dict(KERNELS))

    def get_kernel(self, module: object, name: str) -> tuple[object, KernelInfo]:
        mod, cached = self._lookup(module, name)
        if cached is not None:
            assert cached.info is not None
            return cached, cached.info
        info = mod.signatures.get(name)
        if info is None:
            from vxpu.accel.backend import BackendError
            raise BackendError(Status.NOT_FOUND, f"no kernel {name!r}")
        func = FUNC_BASE + len(self.dev.funcs) + 1
        self.dev.funcs[func] = gpu_checked.launch_info(info) if info.checked else info
        return self._add_kernel(mod, name, func, info, ArgPack(info))

    def native_driver(self) -> dict[str, int] | None:
        return self.dev.native() if self._native else None

    def _drv_launch(self, handle: Any, gx: int, gy: int, gz: int, bx: int, by: int, bz: int,
                    shared_bytes: int, stream: Any, pack: Any) -> tuple[Any, ...]:
        return (self._err(self.dev.launch(handle, (gx, gy, gz, bx, by, bz), shared_bytes, stream,
                                          bytes(pack.view))),)

    def _is_open(self) -> bool:
        return self._open

    def _is_current(self) -> bool:
        return True

    def _bind(self) -> None:
        pass

    def _release(self) -> None:
        self._open = False

    def _hard_reset(self) -> None:
        self._before_reset()
        self._generation += 1
        self._after_reset()

    def _lost_reason(self, name: str, what: str, exc: Any) -> str:
        return f"{name} during {what}"


# -- helpers ---------------------------------------------------------------------------------------
ARG_OFF = DATA_OFF + 0x10_0000      # argument blobs live here in guest RAM


def rig_for(tmp_path: Any, name: str, *, native: bool = True, fastlane_on: bool = True, **kw: Any) -> XpuRig:
    return XpuRig(tmp_path / f"{name}.sock", FakeGpu(native=native), fastlane=fastlane_on, **kw)


def setup_kernels(rig: XpuRig) -> tuple[int, int]:
    """Load the fake module; returns the handles of "inc" and "empty"."""
    rig.write(DATA_OFF, b"module")
    c = rig.cmd(Opcode.MODULE_LOAD, [abi.ModuleKind.IR], sg=(rig.addr(DATA_OFF), 6))
    assert c.status == 0, c
    handles = []
    for i, name in enumerate((b"inc", b"empty")):
        rig.write(DATA_OFF + 64 + 16 * i, name)
        k = rig.cmd(Opcode.KERNEL_GET, [c.result], sg=(rig.addr(DATA_OFF + 64 + 16 * i), len(name)))
        assert k.status == 0, k
        handles.append(k.result)
    return handles[0], handles[1]


def inc_desc(rig: XpuRig, kernel: int, ptr: int, value: int, slot: int = 0, tag: int = 0, flags: int = 0) -> bytes:
    off = ARG_OFF + 64 * slot
    rig.write(off, struct.pack("<QI4x", ptr, value))
    return desc(Opcode.LAUNCH, [kernel, *abi.pack_launch_dims((1, 1, 1), (32, 1, 1), 0)],
                sg=(rig.addr(off), 16), tag=tag, flags=flags)


def empty_desc(kernel: int, tag: int = 0) -> bytes:
    return desc(Opcode.LAUNCH, [kernel, *abi.pack_launch_dims((1, 1, 1), (32, 1, 1), 0)], tag=tag)


def lane(rig: XpuRig) -> fastlane.FastLane:
    """The rig's fast lane, its counters settled (a native poll running now accounts first)."""
    rig.settle()
    got = rig.device.poller.fastlane
    assert got is not None, fastlane.unavailable()
    return got


# -- the build ---------------------------------------------------------------------------------
def test_the_library_builds_and_loads():
    assert fastlane.load() is not None, fastlane.unavailable()


def test_no_compiler_means_the_python_path_with_one_log_line(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(fastlane, "_lib", None)
    monkeypatch.setattr(fastlane, "_lib_error", None)
    monkeypatch.setattr(fastlane, "_logged", False)
    monkeypatch.setenv("VXPU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))          # no cc anywhere
    monkeypatch.delenv("CC", raising=False)
    with caplog.at_level(logging.INFO, logger=fastlane.log.name):
        assert fastlane.create(FakeGpu()) is None
        assert fastlane.create(FakeGpu()) is None
    lines = [r.getMessage() for r in caplog.records if r.name == fastlane.log.name]
    assert len(lines) == 1 and "no C compiler" in lines[0], lines
    assert not (tmp_path / "cache" / "native").exists() or not list((tmp_path / "cache" / "native").glob("*.so"))


def test_a_failed_build_is_the_python_path(monkeypatch, tmp_path):
    monkeypatch.setattr(fastlane, "_lib", None)
    monkeypatch.setattr(fastlane, "_lib_error", None)
    monkeypatch.setattr(fastlane, "_logged", False)
    monkeypatch.setenv("VXPU_CACHE", str(tmp_path / "cache"))
    real = fastlane.sources()
    monkeypatch.setattr(fastlane, "sources", lambda: {**real, "fastpoll.c": b"this is not C;\n"})
    assert fastlane.create(FakeGpu()) is None
    assert "failed" in (fastlane.unavailable() or "")


def test_the_build_is_cached_by_source_and_compiler(tmp_path):
    first = fastlane.build(tmp_path)
    assert first.exists() and first.parent == tmp_path
    assert fastlane.build(tmp_path) == first            # found, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]     # no temporary left behind


def test_off_by_setting_or_environment(monkeypatch):
    monkeypatch.setattr(fastlane, "_logged", True)
    assert fastlane.create(FakeGpu(), False) is None
    monkeypatch.setenv(fastlane.ENV, "0")
    assert fastlane.create(FakeGpu()) is None
    assert fastlane.create(FakeGpu(), True) is not None
    monkeypatch.setenv(fastlane.ENV, "1")
    assert fastlane.create(FakeGpu()) is not None
    assert fastlane.create(FakeGpu(native=False)) is None          # no native driver: Python


def test_serve_flag_reaches_the_device(monkeypatch):
    from vxpu.vfio_server import cli
    seen = {}

    class Dev:
        def __init__(self, *a: Any, **kw: Any) -> None:
            seen.update(kw)
    monkeypatch.setattr("vxpu.vfio_server.xpu.XpuDevice", Dev)
    import argparse
    for flag, want in (("off", False), ("on", True), (None, None)):
        args = argparse.Namespace(allow_native=None, msix=False, quota=None, poll_idle_us=None, fastlane=flag)
        cli._xpu_device(args, object())
        assert seen["fastlane"] is want


# -- the fast path and its hand-offs ---------------------------------------------------------------
def test_repeated_launches_run_natively(tmp_path):
    with rig_for(tmp_path, "a") as rig:
        inc, empty = setup_kernels(rig)
        dev = rig.alloc(256)
        lane(rig)                      # (built and loaded)
        assert rig.run([inc_desc(rig, inc, dev, 1)])[0].status == 0      # Python: the queue, the plan
        assert lane(rig).taken == 0 and lane(rig).plan_count == 1
        got = rig.run([inc_desc(rig, inc, dev, 1, tag=i) for i in range(20)] + [desc(Opcode.FENCE, tag=99)])
        assert [c.status for c in got] == [0] * 21 and [c.tag for c in got] == [*range(20), 99]
        assert rig.dtoh(dev, 4) == struct.pack("<I", 21)
        assert lane(rig).taken == 21                  # 20 launches and the FENCE's wait
        assert lane(rig).plan_count == 1
        s = rig.device.poller.session
        assert s.stats.launches == 21 and rig.device.backend.stats.launches == 21
        assert rig.device.poller.stats.commands["LAUNCH"] == 21
        stats = json.loads(rig.device.stats_document())
        assert stats["session"]["vxpu_fastlane_taken"] >= 21
        before = rig.device.backend.dev.native_calls
        got = rig.run([empty_desc(empty, tag=i) for i in range(5)] + [desc(Opcode.NOP, tag=7)])
        assert all(c.status == 0 for c in got)
        assert rig.device.backend.dev.native_calls - before >= 4


def test_a_plan_miss_hands_the_launch_to_python(tmp_path):
    with rig_for(tmp_path, "b") as rig:
        inc, _ = setup_kernels(rig)
        dev = rig.alloc(256)
        assert rig.htod(dev + 128, b"zzzz").status == 0         # (the session queue is made)
        lane(rig)                      # (built and loaded)
        stops = dict(lane(rig).stops)
        assert rig.run([inc_desc(rig, inc, dev, 5)])[0].status == 0
        assert lane(rig).stops.get(fastlane.STOP_MISS, 0) == stops.get(fastlane.STOP_MISS, 0) + 1
        assert rig.run([inc_desc(rig, inc, dev, 6, slot=1)])[0].status == 0     # other bytes: a miss too
        assert lane(rig).plan_count == 2
        assert rig.dtoh(dev, 4) == struct.pack("<I", 11)


def test_a_free_makes_the_native_plan_stale(tmp_path):
    with rig_for(tmp_path, "c") as rig:
        inc, _ = setup_kernels(rig)
        dev = rig.alloc(256)
        for _ in range(3):
            assert rig.run([inc_desc(rig, inc, dev, 1)])[0].status == 0
        assert rig.cmd(Opcode.FENCE).status == 0
        assert rig.cmd(Opcode.MEM_FREE, [dev]).status == 0
        assert rig.run([inc_desc(rig, inc, dev, 1)])[0].status == 0      # checked in full: bounds (0, 0)
        assert rig.cmd(Opcode.FENCE).status == Status.KERNEL_FAULT
        assert lane(rig).plan_count == 0


def test_queue_room_stops_the_lane(tmp_path):
    from vxpu.accel.quota import Quota
    with rig_for(tmp_path, "d", quota=Quota(queue_depth=4)) as rig:
        inc, _ = setup_kernels(rig)
        dev = rig.alloc(256)
        assert rig.run([inc_desc(rig, inc, dev, 1)])[0].status == 0
        lane(rig)                      # (built and loaded)
        got = rig.run([inc_desc(rig, inc, dev, 1, tag=i) for i in range(12)] + [desc(Opcode.FENCE)])
        assert all(c.status == 0 for c in got)
        assert lane(rig).stops.get(fastlane.STOP_ROOM, 0) >= 1
        assert rig.dtoh(dev, 4) == struct.pack("<I", 13)
        assert rig.device.poller.session.pending(rig.device.poller.executor.queue) <= 4


@pytest.mark.parametrize("what", ["launch", "htod", "dtoh"])
def test_a_driver_error_is_redone_by_python(tmp_path, what):
    with rig_for(tmp_path, "e" + what) as rig:
        inc, _ = setup_kernels(rig)
        dev = rig.alloc(256)
        assert rig.run([inc_desc(rig, inc, dev, 1)])[0].status == 0
        assert rig.htod(dev + 64, b"x" * 64).status == 0
        fake = rig.device.backend.dev
        fake.fail.add(what)
        if what == "launch":
            d = inc_desc(rig, inc, dev, 1)
        elif what == "htod":
            rig.write(DATA_OFF, b"y" * 64)
            d = desc(Opcode.MEM_COPY_HTOD, [dev + 64], sg=(rig.addr(DATA_OFF), 64))
        else:
            d = desc(Opcode.MEM_COPY_DTOH, [dev + 64], sg=(rig.addr(DATA_OFF + 4096), 64))
        (c,) = rig.run([d])
        lane(rig)                      # (built and loaded)
        assert lane(rig).stops.get(fastlane.STOP_DRIVER, 0) == 1
        assert c.status == 0                # the fake fails once: Python's retry succeeds
        assert rig.cmd(Opcode.FENCE).status == 0
        assert rig.dtoh(dev, 4) == struct.pack("<I", 2 if what == "launch" else 1)
        if what == "htod":
            assert rig.dtoh(dev + 64, 64) == b"y" * 64
        if what == "dtoh":
            assert rig.read(DATA_OFF + 4096, 64) == b"x" * 64


def test_a_claimed_fault_record_hands_the_fence_to_python(tmp_path):
    with rig_for(tmp_path, "f") as rig:
        inc, _ = setup_kernels(rig)
        dev = rig.alloc(256)
        good = inc_desc(rig, inc, dev, 1, slot=0)
        assert rig.run([good, desc(Opcode.FENCE)])[1].status == 0
        assert rig.run([desc(Opcode.NOP)])[0].status == 0              # the lane has read the record's place
        lane(rig)                      # (built and loaded)
        assert lane(rig).record != 0
        calls = rig.device.backend.dev.native_calls
        assert rig.run([good, desc(Opcode.FENCE)])[1].status == 0     # the native FENCE
        assert rig.device.backend.dev.native_calls - calls == 2         # a launch and a wait
        bad = inc_desc(rig, inc, dev + 254, 1, slot=1)                 # 4 bytes past the end: faults
        got = rig.run([bad, good, desc(Opcode.FENCE, tag=5), desc(Opcode.FENCE, tag=6)])
        assert [c.status for c in got] == [0, 0, Status.KERNEL_FAULT, 0]
        assert rig.run([good, desc(Opcode.FENCE)])[1].status == 0
        assert rig.dtoh(dev, 4) == struct.pack("<I", 4)


def test_a_sync_error_hands_the_fence_to_python(tmp_path):
    with rig_for(tmp_path, "g") as rig:
        inc, _ = setup_kernels(rig)
        dev = rig.alloc(256)
        good = inc_desc(rig, inc, dev, 1)
        assert rig.run([good, desc(Opcode.FENCE)])[1].status == 0
        rig.device.backend.dev.fail.add("sync")
        assert rig.run([good, desc(Opcode.FENCE)])[1].status == 0       # the native wait failed; Python's did not
        assert rig.dtoh(dev, 4) == struct.pack("<I", 2)


_COPY_CASES = {         # name -> (device offset, guest offset, length, expected status)
    "ok": (0, DATA_OFF, 256, 0),
    "past the allocation": (0, DATA_OFF, 257, Status.OUT_OF_RANGE),
    "no allocation": (-0x10_0000, DATA_OFF, 16, Status.OUT_OF_RANGE),
    "guest range not RAM": (0, 1 << 40, 16, Status.OUT_OF_RANGE),
    "crossing the RAM edge": (0, (8 << 20) - 8, 16, Status.OUT_OF_RANGE),
    "zero length": (0, DATA_OFF, 0, Status.BAD_DESCRIPTOR),
    "over the limit": (0, DATA_OFF, abi.MAX_TRANSFER_BYTES + 1, Status.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", _COPY_CASES)
@pytest.mark.parametrize("op", [Opcode.MEM_COPY_HTOD, Opcode.MEM_COPY_DTOH])
def test_copies_out_of_range_are_python_s_statuses(tmp_path, case, op):
    dev_off, guest, length, want = _COPY_CASES[case]
    with rig_for(tmp_path, "h") as rig:
        dev = rig.alloc(256)
        sg = (rig.addr(guest) if guest < (1 << 32) else guest, length)
        ok = desc(op, [dev], sg=(rig.addr(DATA_OFF), 16), tag=1)
        assert rig.run([ok])[0].status == 0         # (the session queue is made)
        got = rig.run([ok, desc(op, [dev + dev_off], sg=sg, tag=2), ok])
        assert [c.status for c in got] == [0, want, 0]
        lane(rig)                      # (built and loaded)
        assert lane(rig).taken >= 1 and lane(rig).stops.get(fastlane.STOP_OTHER, 0) >= (1 if want else 0)


def test_a_freed_or_foreign_device_address_is_refused(tmp_path):
    with rig_for(tmp_path, "i") as rig, rig_for(tmp_path, "j") as other:
        dev = rig.alloc(256)
        theirs = other.alloc(4096)
        assert rig.htod(dev, b"a" * 16).status == 0
        assert rig.cmd(Opcode.MEM_FREE, [dev]).status == 0
        assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], sg=(rig.addr(DATA_OFF), 16)).status == Status.OUT_OF_RANGE
        if theirs != dev:
            assert rig.cmd(Opcode.MEM_COPY_DTOH, [theirs], sg=(rig.addr(DATA_OFF), 16)).status == Status.OUT_OF_RANGE


def test_copies_run_natively_and_complete_after_one_wait(tmp_path):
    with rig_for(tmp_path, "k") as rig:
        dev = rig.alloc(64 * 256)
        rig.write(DATA_OFF, bytes(range(256)) * 64)
        descs = [desc(Opcode.MEM_COPY_HTOD, [dev + 256 * i], sg=(rig.addr(DATA_OFF + 256 * i), 256), tag=i)
                 for i in range(64)]
        got = rig.run(descs)
        assert [c.tag for c in got] == list(range(64)) and all(c.status == 0 for c in got)
        back = [desc(Opcode.MEM_COPY_DTOH, [dev + 256 * i], sg=(rig.addr(DATA_OFF + 0x8000 + 256 * i), 256), tag=i)
                for i in range(64)]
        assert all(c.status == 0 for c in rig.run(back))
        assert rig.read(DATA_OFF + 0x8000, 64 * 256) == bytes(range(256)) * 64
        lane(rig)                      # (built and loaded)
        assert lane(rig).taken >= 64                  # the HTODs made the queue; the DTOHs are native
        stats = rig.device.poller.stats
        assert stats.bytes_htod == stats.bytes_dtoh == 64 * 256
        assert rig.device.poller.session.stats.bytes_htod == 64 * 256
        assert rig.device.poller.executor.queued == 0


def test_an_indirect_list_stays_in_python(tmp_path):
    with rig_for(tmp_path, "l") as rig:
        dev = rig.alloc(256)
        rig.write(DATA_OFF, b"q" * 32)
        lst = rig.sg_list(DATA_OFF + 4096, [(rig.addr(DATA_OFF), 16), (rig.addr(DATA_OFF + 16), 16)])
        lane(rig)                      # (built and loaded)
        taken = lane(rig).taken
        assert rig.cmd(Opcode.MEM_COPY_HTOD, [dev], indirect=(lst, 2)).status == 0
        assert lane(rig).taken == taken
        assert rig.dtoh(dev, 32) == b"q" * 32


def test_a_guest_rewriting_descriptors_and_arguments_meanwhile_gets_statuses_only(tmp_path):
    """The lane reads each descriptor and argument blob once; whatever the guest scribbles over
    them while the device runs (the GIL is released meanwhile), every command completes with
    a status of the table and the device keeps serving."""
    import random
    import threading

    from vxpu.abi.status import Status as St

    from .ringdriver import SQ_OFF
    with rig_for(tmp_path, "m") as rig:
        inc, _empty = setup_kernels(rig)
        dev = rig.alloc(4096)
        assert rig.run([inc_desc(rig, inc, dev, 1), desc(Opcode.FENCE)])[1].status == 0
        stop = threading.Event()
        rnd = random.Random(7)

        def scribble() -> None:
            while not stop.is_set():
                slot = rnd.randrange(rig.sq_entries)
                raw = bytearray(rnd.randbytes(64))
                raw[0:2] = struct.pack("<H", rnd.choice((0x00, 0x13, 0x14, 0x30, 0x40)))
                rig.write(SQ_OFF + 64 * slot, bytes(raw))
                rig.write(ARG_OFF + 64 * rnd.randrange(4), rnd.randbytes(16))
        writer = threading.Thread(target=scribble)
        writer.start()
        try:
            for _ in range(20):
                batch = [inc_desc(rig, inc, dev + 4 * (i % 8), 1, slot=i % 4) for i in range(40)]
                batch += [desc(Opcode.MEM_COPY_HTOD, [dev], sg=(rig.addr(DATA_OFF), 64)), desc(Opcode.FENCE)]
                got = rig.run(batch, timeout=30)
                assert len(got) == len(batch)
                assert all(c.status in {int(s) for s in St} for c in got)
        finally:
            stop.set()
            writer.join()
        rig.alive()


def test_copies_posted_while_others_wait_join_the_group_in_order(tmp_path):
    """More copies than one batch: the lane takes the rest into its group before the one
    synchronization (the extension), and every completion is in its slot, in order."""
    with rig_for(tmp_path, "n", sq_entries=256) as rig:
        dev = rig.alloc(1 << 20)
        assert rig.htod(dev, b"w" * 16).status == 0          # (the session queue is made)
        rig.write(DATA_OFF, bytes(range(256)) * 200)
        for _ in range(3):
            descs = [desc(Opcode.MEM_COPY_HTOD, [dev + 256 * i], sg=(rig.addr(DATA_OFF + 256 * i), 256), tag=1000 + i)
                     for i in range(200)]
            got = rig.run(descs)
            assert [c.tag for c in got] == list(range(1000, 1200)) and all(c.status == 0 for c in got)
        assert lane(rig).taken >= 600
        assert rig.dtoh(dev, 200 * 256, off=DATA_OFF + 0x10_0000) == bytes(range(256)) * 200


def test_descriptors_posted_one_by_one_while_the_lane_runs_complete_in_order(tmp_path):
    """The lane re-reads sq_tail for descriptors posted while it runs (the GIL is released
    meanwhile, so this thread posts concurrently): every one completes once, in order."""
    with rig_for(tmp_path, "o", sq_entries=256) as rig:
        inc, empty = setup_kernels(rig)
        dev = rig.alloc(4096)
        assert rig.run([inc_desc(rig, inc, dev, 1), desc(Opcode.FENCE)])[1].status == 0
        rig.write(DATA_OFF, bytes(range(256)))
        kinds = [lambda t: inc_desc(rig, inc, dev, 1, tag=t), lambda t: empty_desc(empty, tag=t),
                 lambda t: desc(Opcode.MEM_COPY_HTOD, [dev + 256], sg=(rig.addr(DATA_OFF), 256), tag=t),
                 lambda t: desc(Opcode.NOP, tag=t)]
        got = []
        for burst in range(8):
            for i in range(100):
                rig.submit([kinds[i % 4](burst * 1000 + i)], doorbell=False)
            rig.submit([desc(Opcode.FENCE, tag=burst * 1000 + 999)])
            got += rig.completions(101, timeout=30)
        want = [b * 1000 + i for b in range(8) for i in [*range(100), 999]]
        assert [c.tag for c in got] == want and all(c.status == 0 for c in got)
        assert rig.dtoh(dev, 4) == struct.pack("<I", 1 + 8 * 25)
        assert lane(rig).taken >= 700


def test_copies_posted_slower_than_the_lane_runs_them_are_not_waited_for_one_by_one(tmp_path):
    """The poll loop asks the device (a stream query) whether a group's copies are done while it
    watches for more, instead of a blocking wait as soon as the ring is empty: a guest posting
    copies slower than the lane takes them must not drain the device's queue between each two
    (1 MiB copies lost ~5 % to that on the H200). Each copy still completes, in order, once the
    device has done it."""
    with rig_for(tmp_path, "q", sq_entries=64) as rig:
        _inc, _empty = setup_kernels(rig)
        dev = rig.alloc(4096)
        assert rig.htod(dev, b"x" * 16).status == 0            # Python makes the queue
        pattern = bytes(range(256)) * 15
        rig.write(DATA_OFF, pattern)
        fake = rig.device.backend.dev
        syncs, queries = fake.native_syncs, fake.queries
        for i in range(30):
            rig.submit([desc(Opcode.MEM_COPY_HTOD, [dev + 128 * i], sg=(rig.addr(DATA_OFF + 128 * i), 128), tag=i)])
            time.sleep(0.0005)
        rig.submit([desc(Opcode.FENCE, tag=99)])
        got = rig.completions(31, timeout=10)
        assert [c.tag for c in got] == [*range(30), 99] and all(c.status == 0 for c in got)
        assert rig.dtoh(dev, len(pattern), off=DATA_OFF + 0x10_0000) == pattern
        assert fake.queries - queries >= 30                    # asked, not waited for ...
        assert fake.native_syncs - syncs <= 3                  # ... (without the queries: ~30 waits)
        assert lane(rig).taken >= 30


def test_the_poll_loop_switch_reads_its_environment(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """VXPU_FASTLANE_POLL (README, device-abi 4.7): off/0/no/false turn the poll loop off, the
    rest keeps it on, and a value that is none of the accepted spellings says so."""
    monkeypatch.delenv(fastlane.POLL_ENV, raising=False)
    assert fastlane.poll_wanted()
    for off in ("0", "off", "No", " false "):
        monkeypatch.setenv(fastlane.POLL_ENV, off)
        assert not fastlane.poll_wanted()
    monkeypatch.setenv(fastlane.POLL_ENV, "yes")
    assert fastlane.poll_wanted() and not caplog.records
    monkeypatch.setenv(fastlane.POLL_ENV, "maybe")
    with caplog.at_level(logging.WARNING, logger=fastlane.log.name):
        assert fastlane.poll_wanted()
    assert any("VXPU_FASTLANE_POLL='maybe'" in r.getMessage() for r in caplog.records)


def test_the_fastlane_setting_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: ``--fastlane on|off``, also ``VXPU_FASTLANE``; the flag wins, 1/0, yes/no and
    true/false are accepted, and any other value in either is a one-line usage error (it was
    taken as "on" when it came from the environment)."""
    from vxpu import cli as top

    def parsed(*argv: str) -> str | None:
        return top.build_parser().parse_args(["serve", "--socket", "s", *argv]).fastlane  # type: ignore[no-any-return]

    monkeypatch.delenv("VXPU_FASTLANE", raising=False)
    assert parsed() is None and parsed("--fastlane", "off") == "off"
    monkeypatch.setenv("VXPU_FASTLANE", "0")
    assert parsed() == "off" and parsed("--fastlane", "on") == "on"
    monkeypatch.setenv("VXPU_FASTLANE", "True")
    assert parsed() == "on"
    for bad in (("--fastlane", "maybe"), ()):
        monkeypatch.setenv("VXPU_FASTLANE", "maybe")
        with pytest.raises(SystemExit):
            parsed(*bad)


def test_unregistering_guest_ram_waits_for_the_copies_queued_on_it():
    """GpuBackend.unregister_host (Session.unregister_host promises it): a copy queued into a
    registered region finishes before the registration goes, so no DMA outlives an unmap of
    guest RAM (the lane issues copies asynchronously, and the fake runs them only when waited
    for)."""
    backend = FakeGpu()
    try:
        dev, queue = backend.alloc(4096), backend.create_queue()
        host = (ctypes.c_char * 8192)(*(b"h" * 4096))
        token = backend.register_host(memoryview(host).cast("B"))
        backend.copy_htod_address(dev, ctypes.addressof(host), 4096, queue)
        backend.copy_dtoh_address(ctypes.addressof(host) + 4096, dev, 4096, queue)
        assert any(backend.dev.queued.values())               # queued, not done
        backend.unregister_host(token)
        assert not any(backend.dev.queued.values())           # done before the registration went
        assert host.raw[4096:] == b"h" * 4096
    finally:
        backend.close()
