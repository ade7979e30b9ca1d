"""Review findings on the native fast lane: each test failed before its fix."""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from vxpu.vfio_server.xpu import fastlane

from vxpu.abi import xpu as abi
from vxpu.abi.xpu import Opcode

from .test_fastlane import FakeGpu


def _name(tmp_path: Path) -> str:
    """The cache file name build() uses for this source and compiler."""
    return fastlane.build(tmp_path / "scratch").name


def test_a_library_planted_in_a_cache_others_can_write_is_never_loaded(tmp_path):
    """A shared (group/world-writable) cache folder: anyone could have put the .so there, so
    build() neither returns a file found there nor builds into it."""
    name = _name(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    planted = shared / name
    planted.write_bytes(b"not the lane")
    planted.chmod(0o755)
    got = fastlane.build(shared)
    assert got != planted and got.parent != shared
    assert got.read_bytes() != b"not the lane" and got.read_bytes()[:4] == b"\x7fELF"
    assert planted.read_bytes() == b"not the lane"      # left alone
    shutil.rmtree(got.parent)


def test_a_library_others_can_write_is_built_anew(tmp_path):
    """Our own folder, but the cached file is group/world-writable: built again over it."""
    name = _name(tmp_path)
    folder = tmp_path / "own"
    folder.mkdir(mode=0o700)
    planted = folder / name
    planted.write_bytes(b"not the lane")
    planted.chmod(0o666)
    got = fastlane.build(folder)
    assert got == planted and got.read_bytes()[:4] == b"\x7fELF"
    assert not os.stat(got).st_mode & 0o022


def test_a_symlink_in_the_cache_is_not_followed(tmp_path):
    name = _name(tmp_path)
    folder = tmp_path / "own"
    folder.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(b"not the lane")
    (folder / name).symlink_to(elsewhere)
    got = fastlane.build(folder)
    assert not got.is_symlink() and got.read_bytes()[:4] == b"\x7fELF"
    assert elsewhere.read_bytes() == b"not the lane"


def test_a_corrupt_cached_library_is_rebuilt_and_loaded(monkeypatch, tmp_path):
    name = _name(tmp_path)
    cache = tmp_path / "cache"
    (cache / "native").mkdir(parents=True, mode=0o700)
    bad = cache / "native" / name
    bad.write_bytes(b"\x7fELF truncated")
    bad.chmod(0o755)
    monkeypatch.setattr(fastlane, "_lib", None)
    monkeypatch.setattr(fastlane, "_lib_error", None)
    monkeypatch.setenv("VXPU_CACHE", str(cache))
    assert fastlane.load() is not None, fastlane.unavailable()
    assert bad.read_bytes()[:4] == b"\x7fELF" and len(bad.read_bytes()) > 1000


def test_the_cache_folder_is_made_private(tmp_path):
    folder = tmp_path / "new" / "native"
    got = fastlane.build(folder)
    assert got.parent == folder and not os.stat(folder).st_mode & 0o077


# -- the fault record's lifetime -------------------------------------------------------------------
def _lane_with_record() -> tuple[FakeGpu, fastlane.FastLane]:
    backend = FakeGpu()
    ln = fastlane.create(backend, True)
    assert ln is not None, fastlane.unavailable()
    backend._fault_record()                 # a checked launch would make it: mapped host memory
    ln.refresh_record()
    assert ln.record == backend.dev.record_host != 0
    return backend, ln


def test_a_record_freed_during_the_native_wait_is_not_read():
    """The server closes the backend (another thread) while the poller waits in fl_fence: the
    record is withdrawn before it is freed, so the wait hands the FENCE to Python instead of
    reading the freed claim word (before: it read it, and here found it clear: 'OK')."""
    backend, ln = _lane_with_record()
    device_sync = backend.dev.sync

    def sync_while_closing(stream: Any = None) -> int:
        backend.close()                     # as Poller.stop's caller does after its 5 s join
        return device_sync(stream)
    backend.dev.sync = sync_while_closing   # type: ignore[method-assign]
    assert ln.fence_wait() is False
    assert ln.record == -1
    ln.close()


def test_a_context_reset_withdraws_the_record_and_a_new_one_is_found():
    backend, ln = _lane_with_record()
    backend.reset()
    assert ln.record == -1                  # withdrawn before the old context's memory went
    ln.refresh_record()
    assert ln.record == 0                   # this context has none yet: nothing to read
    assert ln.fence_wait() is True
    backend._fault_record()
    ln.refresh_record()
    assert ln.record == backend.dev.record_host
    ln.close()


def test_a_closed_lane_is_no_longer_told():
    backend, ln = _lane_with_record()
    ln.close()
    assert backend._record_readers == []
    backend.close()                         # would call into the freed native tables


# -- a hostile sq_tail re-read by the C run --------------------------------------------------------
@pytest.mark.parametrize(("ahead", "room", "taken"), [
    (0, 64, 2),                 # nothing posted meanwhile
    (10, 64, 12),               # ten more, room for them
    (10, 5, 5),                 # ten more, room for five completions in all
    (62, 64, 64),               # a full ring from the next descriptor on (Python's sq_head after a take)
    (64, 64, 64),               # ... the most it may be ahead: the completion room limits it
    (65, 64, 2),                # one more than the ring holds: invalid, left to Python
    (-1, 64, 2),                # behind the head (wraps to ~2^32): invalid
    (0x8000_0000, 64, 2),       # far ahead
])
def test_a_hostile_sq_tail_is_never_followed_outside_the_ring_or_the_room(ahead, room, taken):
    """fl_run re-reads sq_tail: it takes what lies at most sq_entries from the next descriptor
    and within the completion room; completions are written only into that room."""
    from .test_fastlane_native import CQ_OFF, ENTRIES, HDR_OFF, SQ_OFF, Lib, _plan
    lib = Lib()
    try:
        nop = abi.DESCRIPTOR.pack(Opcode.NOP, 0, 0, 6, 0, 0, 0, 0, 0, 0)
        for i in range(ENTRIES):
            lib.write(SQ_OFF + i * 64, nop)
        lib.write(CQ_OFF, b"\xee" * (ENTRIES * 32))
        lib.write(HDR_OFF, struct.pack("<I", (2 + ahead) & 0xFFFF_FFFF))
        assert _plan(lib, (1, 2, 3, 4), b"") == 0
        b = lib.batch
        b.start, b.pending, b.queued, b.depth = 1, 0, 0, 1024
        b.sq, b.cq, b.hdr = lib.base + SQ_OFF, lib.base + CQ_OFF, lib.base + HDR_OFF
        b.sq_mask = b.cq_mask = ENTRIES - 1
        b.sq_entries, b.sq_head, b.cq_index, b.max, b.cq_room, b.reread = ENTRIES, 0, 0, 2, room, 1
        lib.lib.fl_run(lib.ctx, ctypes.addressof(b))
        assert b.consumed == taken and b.group == taken
        cq = ctypes.string_at(lib.base + CQ_OFF, ENTRIES * 32)
        assert all(cq[i * 32:(i + 1) * 32] != b"\xee" * 32 for i in range(taken))
        assert all(cq[i * 32:(i + 1) * 32] == b"\xee" * 32 for i in range(taken, ENTRIES))
    finally:
        lib.close()


def test_statistics_from_another_thread_while_the_poller_counts_a_new_stop():
    """STATS is also read by the --stats-file writer thread: a stop reason counted for the first
    time meanwhile must not fail it ('dictionary changed size during iteration' before)."""
    import sys
    import threading
    import time
    ln = fastlane.create(FakeGpu(), True)
    assert ln is not None
    errors: list[Exception] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                ln.statistics()
            except RuntimeError as exc:
                errors.append(exc)
                return
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0 and not errors:
            ln.stops = {}
            for reason in range(40):             # as many first-time stop reasons as it takes
                ln.stops[reason] = 1
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(old)
        ln.close()
    assert not errors, errors[0]


def test_a_closed_lane_refuses_calls_instead_of_crashing(tmp_path: Path) -> None:
    """After FastLane.close (the native context freed, its pointer NULL) every entry point is a
    no-op: the executor's plan hook may still call add_plan (before: fl_plans_clear(NULL) was a
    segmentation fault). In a child process, so a crash fails this test, not the run."""
    import subprocess
    import sys
    code = ("from tests.xpu.test_fastlane import FakeGpu\n"
            "from vxpu.vfio_server.xpu import fastlane\n"
            "ln = fastlane.create(FakeGpu(), True)\n"
            "ln.close()\n"
            "ln.forget_plans()\n"
            "assert ln.plan_count == 0 and ln.fence_wait() is False\n"
            "ln.lib.fl_run(ln._ctx, ln._batch_ref)\n"
            "ln.lib.fl_run(ln._ctx, None)\n"
            "ln.close()\n"
            "print('ok')\n")
    # Not from the repository root: its vxpu/ folder (the core layer alone) would shadow the
    # package where it is not installed (a tree on PYTHONPATH, as benchmarks/run_gpu.sh sets up);
    # the root goes last on the path, for the tests package only.
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(root)) if p)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_after_the_backend_closed_no_fence_is_native():
    """A FENCE refreshed after the backend closed (shutdown) is Python's: a closed backend has
    no record to read, which is not 'nothing to read' (before: 0, and the FENCE completed OK
    natively wherever the driver's wait still returned success)."""
    backend, ln = _lane_with_record()
    backend.close()
    ln.refresh_record()
    assert ln.record == -1 and ln.fence_wait() is False
    ln.close()
