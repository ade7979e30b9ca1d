"""The session's launch-shape fast path accepts and refuses exactly what pack_dims does."""

from __future__ import annotations

import pytest
from vxpu.accel.backend import BackendError, pack_dims
from vxpu.accel.session import _dims3

from vxpu.abi.status import Status

GOOD = [(1, 1, 1), (0x7FFFFFFF, 2, 3), (5,), (4, 2), [3, 1, 1], (True, 1, 1)]
BAD = [(0, 1, 1), (1, 0x80000000, 1), (1, 1, -1), (), (1, 1, 1, 1), (1 << 64, 1, 1)]


@pytest.mark.parametrize("dims", GOOD)
def test_valid_shapes_match_pack_dims(dims):
    assert _dims3(dims) == pack_dims(dims)


@pytest.mark.parametrize("dims", BAD)
def test_invalid_shapes_are_refused_like_pack_dims(dims):
    with pytest.raises(BackendError) as fast:
        _dims3(dims)
    with pytest.raises(BackendError) as slow:
        pack_dims(dims)
    assert fast.value.status is slow.value.status is Status.INVALID_ARGUMENT
