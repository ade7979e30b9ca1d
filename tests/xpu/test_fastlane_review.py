"""Review findings on the native fast lane: each test failed before its fix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from vxpu.vfio_server.xpu import fastlane

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
