"""The VM transport's pieces that run outside a VM: finding the accelerator in a fixture sysfs
tree (IDs, overrides, the class fallback) and the huge-page DMA allocator (on this host, as
root, when MAP_HUGETLB works). The transport as a whole runs in the QEMU end-to-end tests."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from vxpu.guest.errors import DeviceNotFound, GuestError
from vxpu.guest.vmtransport import ALIGN, ARENA_MAX, HUGE_PAGE, HugePageAllocator, find_function, parse_ids

from vxpu.abi import xpu

RESOURCE_XPU = ("0x00000000febf0000 0x00000000febf0fff 0x0000000000040200\n"
                + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 6)
RESOURCE_TESTDEV = ("0x00000000febf0000 0x00000000febf0fff 0x0000000000040200\n"
                    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
                    "0x00000000fe000000 0x00000000fe00ffff 0x000000000014220c\n")


def _fn(root: Path, bdf: str, vendor: int, device: int, cls: int = 0x120000, resource: str = RESOURCE_XPU) -> Path:
    d = root / bdf
    d.mkdir(parents=True)
    (d / "vendor").write_text(f"{vendor:#06x}\n")
    (d / "device").write_text(f"{device:#06x}\n")
    (d / "class").write_text(f"{cls:#08x}\n")
    (d / "resource").write_text(resource)
    (d / "config").write_bytes(bytes(256))
    return d


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VXPU_PCI_BDF", raising=False)
    monkeypatch.delenv("VXPU_PCI_ID", raising=False)


def test_parse_ids() -> None:
    assert parse_ids("5850:0100") == (0x5850, 0x0100)
    for bad in ("5850", "x:1", "10000:1", "1:2:3"):
        with pytest.raises(GuestError, match="vvvv:dddd|16 bits"):
            parse_ids(bad)


def test_finds_the_accelerator_by_its_ids(tmp_path: Path) -> None:
    _fn(tmp_path, "0000:00:02.0", 0x8086, 0x1237, cls=0x060000)
    _fn(tmp_path, "0000:00:03.0", 0x5850, 0x0001, resource=RESOURCE_TESTDEV)   # the test device
    _fn(tmp_path, "0000:00:04.0", xpu.VENDOR_ID, xpu.DEVICE_ID)
    assert find_function(root=tmp_path).bdf == "0000:00:04.0"


def test_overridden_ids_by_argument_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fn(tmp_path, "0000:00:05.0", 0x1234, 0xABCD)
    assert find_function(ids="1234:abcd", root=tmp_path).bdf == "0000:00:05.0"
    monkeypatch.setenv("VXPU_PCI_ID", "1234:abcd")
    assert find_function(root=tmp_path).bdf == "0000:00:05.0"
    monkeypatch.setenv("VXPU_PCI_ID", "1234:0001")
    with pytest.raises(DeviceNotFound, match="1234:0001"):
        find_function(root=tmp_path)


def test_exact_function_by_bdf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fn(tmp_path, "0000:00:06.0", 0x1234, 0x5678)
    monkeypatch.setenv("VXPU_PCI_BDF", "0000:00:06.0")
    assert find_function(root=tmp_path).bdf == "0000:00:06.0"
    with pytest.raises(DeviceNotFound, match="0000:00:07.0"):
        find_function(bdf="0000:00:07.0", root=tmp_path)


def test_class_fallback_skips_functions_that_do_not_answer_like_the_accelerator(tmp_path: Path) -> None:
    # Right class, but the test device's BAR layout (a BAR2) or a BAR0 that cannot be mapped here:
    # neither is taken for the accelerator, and the error names both overrides.
    _fn(tmp_path, "0000:00:03.0", 0x5850, 0x0001, resource=RESOURCE_TESTDEV)
    _fn(tmp_path, "0000:00:04.0", 0x1234, 0x0001)
    with pytest.raises(DeviceNotFound, match="VXPU_PCI_BDF=<bdf> or VXPU_PCI_ID=vvvv:dddd"):
        find_function(root=tmp_path)


@pytest.fixture
def alloc() -> Iterator[HugePageAllocator]:
    if os.geteuid() != 0:
        pytest.skip("pagemap shows physical addresses to root only")
    pool = Path("/proc/sys/vm/nr_hugepages")
    before = pool.read_text()
    a = HugePageAllocator()
    try:
        a.free(a.alloc(ALIGN))   # probe: can huge pages be reserved here?
    except GuestError as exc:
        a.close()
        pytest.skip(f"huge pages unavailable here: {exc}")
    yield a
    a.close()
    try:
        pool.write_text(before)   # give the host back the pages the test reserved
    except OSError:
        pass


def test_small_buffers_share_a_huge_page_aligned_zeroed_and_contiguous(alloc: HugePageAllocator) -> None:
    bufs = [alloc.alloc(n, contiguous=True) for n in (1, 256, 4096, 5000, ARENA_MAX)]
    for b in bufs:
        assert b.contiguous and b.address() % ALIGN == 0 and b.size % ALIGN == 0
        assert bytes(b.view) == bytes(b.size)
        b.view[:] = b"\xff" * b.size
    starts = sorted((b.address(), b.size) for b in bufs)
    assert all(a + n <= c for (a, n), (c, _) in itertools.pairwise(starts)), starts   # no overlap
    freed = bufs[1]
    alloc.free(freed)
    again = alloc.alloc(256)
    assert bytes(again.view) == bytes(again.size)       # reused memory comes back zeroed


def test_double_free_and_use_after_close(alloc: HugePageAllocator) -> None:
    b = alloc.alloc(4096)
    alloc.free(b)
    with pytest.raises(GuestError, match="freed twice"):
        alloc.free(b)
    alloc.close()
    alloc.free(b)   # after close a finalizer may still free: nothing happens
    with pytest.raises(GuestError, match="closed"):
        alloc.alloc(1)


def test_large_buffers_are_whole_huge_pages_with_their_runs(alloc: HugePageAllocator) -> None:
    b = alloc.alloc(3 * HUGE_PAGE + 1)
    assert b.size == 3 * HUGE_PAGE + ALIGN
    assert sum(n for _off, _addr, n in b.runs) == b.size
    assert all(addr % HUGE_PAGE == 0 for _off, addr, _n in b.runs)
    segs = b.segments(HUGE_PAGE - 8, 16)
    assert sum(n for _a, n in segs) == 16
    try:
        c = alloc.alloc(2 * HUGE_PAGE, contiguous=True)
    except GuestError as exc:
        assert "contiguous" in str(exc)
    else:
        assert c.contiguous
