"""Review finding: the size check of an fd-backed DMA_MAP must hold once the file is sealed.

The server seals the file against shrinking (F_SEAL_SHRINK) so that a later ftruncate by the
peer cannot SIGBUS it. The size check has to come *after* the seal: a peer that shrinks the
file between the check and the seal would otherwise leave a "sealed" map larger than its
file, and the first device access would SIGBUS the server. The race is made deterministic by
shrinking the file just before the seal is applied.
"""

from __future__ import annotations

import errno
import os

import pytest
from vxpu.vfio_server import dma as dmamod
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.dma import DmaSpace
from vxpu.vfio_server.errors import ProtocolError

SIZE = 0x10000


def test_shrink_just_before_the_seal_is_refused(monkeypatch):
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    real = dmamod.shrink_sealed

    def racing_peer(f: int) -> bool:
        os.ftruncate(f, 0)          # the peer shrinks the file right before we seal it
        return real(f)

    monkeypatch.setattr(dmamod, "shrink_sealed", racing_peer)
    space = DmaSpace()
    try:
        try:
            region = space.map(0x100000, SIZE, 0, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, fd)
        except ProtocolError as exc:
            assert exc.errno == errno.EINVAL
        else:
            # Accepted: then the file must really hold the whole map (never touch the view
            # otherwise: that would SIGBUS this test process).
            assert os.fstat(fd).st_size >= SIZE, (
                f"map accepted (sealed={region.sealed}) over a file of {os.fstat(fd).st_size} bytes")
        assert len(space) in (0, 1)
    finally:
        space.close()
        os.close(fd)


def test_sealed_map_still_works():
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    space = DmaSpace()
    try:
        region = space.map(0x100000, SIZE, 0, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, fd)
        assert region.sealed
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        view = space.translate(0x100000 + 8, 4, write=True)
        view[:] = b"abcd"
        view.release()
        assert os.pread(fd, 4, 8) == b"abcd"
    finally:
        space.close()
        os.close(fd)
