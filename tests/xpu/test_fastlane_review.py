"""Review findings on the native fast lane: each test failed before its fix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vxpu.vfio_server.xpu import fastlane


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
