"""Review: guest RAM whose file the peer can shrink under the server's mapping.

A shrink (ftruncate) of a mapped file makes the next access to the missing pages SIGBUS the
server, which Python cannot survive. The server seals each DMA_MAP file against shrinking when
the file allows it (QEMU's memory-backend-memfd is created sealed: seal=on is its default); an
unsealable file (a memfd without MFD_ALLOW_SEALING, memory-backend-memfd with seal=off, a file
on hugetlbfs or disk) stays a SIGBUS risk. ``require_sealed_ram`` (on by default;
``vxpu serve --allow-unsealed-ram`` turns it off) refuses such files.
"""

from __future__ import annotations

import errno
import os

import pytest
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import GuestMemory, VfioUserClient
from vxpu.vfio_server.dma import DmaSpace
from vxpu.vfio_server.errors import ProtocolError
from vxpu.vfio_server.server import VfioUserServer

from .conftest import MmapTestDevice, ping, refused

SIZE = 0x10000
RW = P.DMA_READ_FLAG | P.DMA_WRITE_FLAG


def _unsealable() -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)       # no MFD_ALLOW_SEALING
    os.ftruncate(fd, SIZE)
    return fd


def test_dma_space_refuses_unsealable_files_when_required():
    fd = _unsealable()
    strict, lax = DmaSpace(require_sealed=True), DmaSpace()
    try:
        with pytest.raises(ProtocolError) as info:
            strict.map(0x100000, SIZE, 0, RW, fd)
        assert info.value.errno == errno.EINVAL and "seal" in str(info.value)
        assert len(strict) == 0
        assert not lax.map(0x100000, SIZE, 0, RW, fd).sealed      # the default still accepts it
    finally:
        strict.close()
        lax.close()
        os.close(fd)


def test_dma_space_accepts_a_sealable_memfd_when_required():
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    space = DmaSpace(require_sealed=True)
    try:
        assert space.map(0x100000, SIZE, 0, RW, fd).sealed
        space.map(0x200000, SIZE, 0, RW, None)                       # message-only maps: no file
    finally:
        space.close()
        os.close(fd)


def test_server_option(tmp_path):
    dev = MmapTestDevice()
    srv = VfioUserServer(tmp_path / "s.sock", dev, require_sealed_ram=True).start()
    fd = _unsealable()
    try:
        with GuestMemory(SIZE) as mem, VfioUserClient(srv.path, timeout=3.0) as c:
            c.handshake()
            refused(c, errno.EINVAL, lambda: c.dma_map(0x100000, SIZE, fd))
            c.map_guest_ram(mem, 0x100000)                           # sealed like QEMU's default
            ping(c)
    finally:
        os.close(fd)
        srv.stop()
        dev.close()


def test_cli_flag():
    import argparse

    from vxpu.vfio_server import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    assert parser.parse_args(["serve", "--socket", "x", "--allow-unsealed-ram"]).allow_unsealed_ram
    assert not parser.parse_args(["serve", "--socket", "x"]).allow_unsealed_ram
