"""The host transport's guest-RAM allocator: page rounding, first fit, coalescing, refusals."""

from __future__ import annotations

import pytest
from vxpu.guest.errors import GuestError
from vxpu.guest.local import PAGE, PageAllocator


def test_rounds_to_pages_and_fits_first():
    a = PageAllocator(16 * PAGE)
    x, y = a.alloc(1), a.alloc(PAGE + 1)
    assert (x, y) == (0, PAGE) and a.used == {0: PAGE, PAGE: 2 * PAGE}
    a.free(x)
    assert a.alloc(PAGE) == 0                      # the hole is reused first
    assert a.available() == 13 * PAGE


def test_frees_coalesce_back_to_one_range():
    a = PageAllocator(8 * PAGE)
    offs = [a.alloc(PAGE) for _ in range(8)]
    for off in (offs[3], offs[1], offs[2], offs[0], offs[7], offs[5], offs[6], offs[4]):
        a.free(off)
    assert a.available() == 8 * PAGE and not a.used
    assert a.alloc(8 * PAGE) == 0


def test_exhaustion_and_double_free_are_refused():
    a = PageAllocator(4 * PAGE)
    off = a.alloc(3 * PAGE)
    with pytest.raises(GuestError, match="ram_size"):
        a.alloc(2 * PAGE)
    a.free(off)
    with pytest.raises(GuestError, match="double free"):
        a.free(off)
