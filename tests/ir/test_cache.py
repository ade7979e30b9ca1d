"""The compile cache: memory and disk levels, keys, corrupt/foreign entries, atomicity, concurrency."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from vxpu.ir import binary
from vxpu.ir.cache import HEADER_SIZE, CompileCache, cache_key
from vxpu.ir.compile import CompiledModule, compile_module

from tests.ir.irhelpers import build_saxpy
from tests.ir.lowerhelpers import needs_lld, needs_nvjitlink


def _key(n: int) -> bytes:
    return cache_key(n.to_bytes(32, "little"), "x86|test", [("opt", 3)], "v1")


def _files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()]


def test_key_depends_on_every_input() -> None:
    base = cache_key(b"\1" * 32, "nvptx|sm_90|+ptx80|cov0", [("opt", 3)], "llvm=22")
    assert len(base) == 32
    assert base == cache_key(b"\1" * 32, "nvptx|sm_90|+ptx80|cov0", [("opt", 3)], "llvm=22")
    others = [cache_key(b"\2" * 32, "nvptx|sm_90|+ptx80|cov0", [("opt", 3)], "llvm=22"),
              cache_key(b"\1" * 32, "nvptx|sm_80|+ptx80|cov0", [("opt", 3)], "llvm=22"),
              cache_key(b"\1" * 32, "nvptx|sm_90|+ptx80|cov0", [("opt", 2)], "llvm=22"),
              cache_key(b"\1" * 32, "nvptx|sm_90|+ptx80|cov0", [("opt", 3)], "llvm=23")]
    assert len({base, *others}) == 5


@needs_nvjitlink
def test_compile_hit_and_miss_memory_and_disk(tmp_path: Path) -> None:
    mod = build_saxpy()
    c1 = CompileCache(tmp_path)
    a = compile_module(mod, "nvptx", arch="sm_90", cache=c1)
    assert (c1.stats.misses, c1.stats.hits, c1.stats.stores) == (1, 0, 1)
    assert compile_module(mod, "nvptx", arch="sm_90", cache=c1) is a
    assert c1.stats.memory_hits == 1
    c2 = CompileCache(tmp_path)  # a new process: disk only
    b = compile_module(mod, "nvptx", arch="sm_90", cache=c2)
    assert (c2.stats.disk_hits, c2.stats.misses) == (1, 0)
    assert b.image == a.image and b.asm == a.asm and b.kernels == a.kernels
    compile_module(mod, "nvptx", arch="sm_80", cache=c2)  # another target: another entry
    assert c2.stats.misses == 1 and len(_files(tmp_path)) == 2


def test_wire_bytes_fast_path(tmp_path: Path) -> None:
    data = binary.encode(build_saxpy())
    c = CompileCache(tmp_path)
    a = compile_module(data, "x86", cache=c)
    assert compile_module(data, "x86", cache=c) is a
    assert compile_module(bytearray(data), "x86", cache=c) is a
    assert c.stats.memory_hits == 2 and c.stats.misses == 1
    fresh = CompileCache(tmp_path)  # another process: the disk entry, found by the canonical hash
    b = compile_module(data, "x86", cache=fresh)
    assert fresh.stats.disk_hits == 1 and b.image == a.image


def test_corrupt_entry_is_deleted_and_rebuilt(tmp_path: Path) -> None:
    mod = build_saxpy()
    compile_module(mod, "x86", cache=CompileCache(tmp_path))
    (entry,) = _files(tmp_path)
    raw = bytearray(entry.read_bytes())
    raw[HEADER_SIZE + 10] ^= 0xFF
    entry.write_bytes(bytes(raw))
    c = CompileCache(tmp_path)
    cm = compile_module(mod, "x86", cache=c)
    assert (c.stats.rejected, c.stats.misses, c.stats.disk_hits) == (1, 1, 0)
    assert entry.read_bytes() != bytes(raw)  # rewritten, valid again
    assert CompileCache(tmp_path).get_disk(bytes.fromhex(entry.name)) == cm.to_bytes()


@pytest.mark.parametrize("damage", ["truncate", "magic", "length", "empty"])
def test_damaged_entries_are_rejected(tmp_path: Path, damage: str) -> None:
    c = CompileCache(tmp_path)
    c.put_disk(_key(1), b"payload" * 100)
    (entry,) = _files(tmp_path)
    raw = entry.read_bytes()
    raw = {"truncate": raw[:-5], "magic": b"X" + raw[1:], "empty": b"",
           "length": raw[:40] + (1).to_bytes(8, "little") + raw[48:]}[damage]
    entry.write_bytes(raw)
    assert c.get_disk(_key(1)) is None
    assert c.stats.rejected == 1 and not entry.exists()


def test_foreign_entry_is_rejected(tmp_path: Path) -> None:
    c = CompileCache(tmp_path)
    c.put_disk(_key(1), b"one")
    c.put_disk(_key(2), b"two")
    p1 = tmp_path / _key(1).hex()[:2] / _key(1).hex()
    p2 = tmp_path / _key(2).hex()[:2] / _key(2).hex()
    p2.write_bytes(p1.read_bytes())  # a valid entry, but for another key
    assert c.get_disk(_key(2)) is None and c.stats.rejected == 1
    assert c.get_disk(_key(1)) == b"one"


def test_unloadable_payload_is_rebuilt(tmp_path: Path) -> None:
    mod = build_saxpy()
    first = CompileCache(tmp_path)
    compile_module(mod, "x86", cache=first)
    (entry,) = _files(tmp_path)
    key = bytes.fromhex(entry.name)
    first.put_disk(key, b"a checksummed payload that is not a compiled module")
    c = CompileCache(tmp_path)
    cm = compile_module(mod, "x86", cache=c)
    assert c.stats.rejected == 1 and c.stats.misses == 1
    assert CompiledModule.from_bytes(c.get_disk(key) or b"").image == cm.image


def test_writes_are_atomic_under_concurrent_readers(tmp_path: Path) -> None:
    c = CompileCache(tmp_path)
    payloads = [bytes([i]) * (200_000 + i) for i in range(4)]
    seen: list[bytes | None] = []
    stop = threading.Event()

    def reader() -> None:
        r = CompileCache(tmp_path)
        while not stop.is_set():
            seen.append(r.get_disk(_key(7)))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(15):
        for p in payloads:
            c.put_disk(_key(7), p)
    stop.set()
    t.join()
    assert all(s is None or s in payloads for s in seen)
    assert not [p for p in _files(tmp_path) if p.name.startswith(".tmp-")]


@needs_lld
def test_concurrent_compiles_share_one_cache(tmp_path: Path) -> None:
    mod = build_saxpy()
    c = CompileCache(tmp_path)
    results: list[CompiledModule] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(compile_module(mod, "amdgpu", arch="gfx90a", cache=c))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.image for r in results}) == 1
    assert c.stats.misses == 1 and c.stats.hits == 5 and len(_files(tmp_path)) == 1


def test_disk_size_cap_evicts_oldest(tmp_path: Path) -> None:
    c = CompileCache(tmp_path, disk_bytes=50_000)
    for i in range(10):
        c.put_disk(_key(i), bytes(10_000))
        path = tmp_path / _key(i).hex()[:2] / _key(i).hex()
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    assert c.stats.evictions >= 5
    assert sum(p.stat().st_size for p in _files(tmp_path)) <= 50_000
    assert c.get_disk(_key(9)) is not None and c.get_disk(_key(0)) is None


def test_memory_lru_and_memory_only_mode() -> None:
    c = CompileCache(False, memory_entries=2)
    for i in range(3):
        c.put_memory(_key(i), i)
    assert c.get_memory(_key(0)) is None and c.get_memory(_key(2)) == 2
    c.put_disk(_key(1), b"x")  # no directory: ignored
    assert c.get_disk(_key(1)) is None
    calls = []
    assert c.get_or_build(_key(5), lambda: calls.append(1) or "built", dump=str.encode, load=bytes.decode) == "built"
    assert c.get_or_build(_key(5), lambda: calls.append(1) or "built", dump=str.encode, load=bytes.decode) == "built"
    assert calls == [1]


def test_clear(tmp_path: Path) -> None:
    c = CompileCache(tmp_path)
    c.put_disk(_key(1), b"x")
    c.put_memory(_key(1), "x")
    c.clear()
    assert c.get_disk(_key(1)) is None and c.get_memory(_key(1)) is None
