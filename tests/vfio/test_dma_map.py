"""DMA_MAP (command 2): fd-backed and message-only maps, and every way to get it wrong."""

from __future__ import annotations

import errno
import os
import struct
import zlib

import pytest
from vxpu.vfio_server import dma as dmamod
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import GuestMemory, VfioUserClient
from vxpu.vfio_server.dma import DmaSpace
from vxpu.vfio_server.errors import ProtocolError
from vxpu.vfio_server.server import VfioUserServer

from vxpu.abi import testdev as abi

from .conftest import MmapTestDevice, eventfds, expect_error, ping, raw, refused

MiB = 1 << 20


def _dma(client, cmd: int, addr: int, length: int) -> int:
    client.region_write(0, abi.DMA_ADDR_LO, struct.pack("<QI", addr, length)[:8])
    client.region_write(0, abi.DMA_LEN, struct.pack("<I", length))
    client.region_write(0, abi.DMA_CMD, struct.pack("<I", cmd))
    return struct.unpack("<I", client.region_read(0, abi.DMA_STATUS, 4))[0]


def test_fd_backed_map_is_shared_memory(client, server, no_leak):
    with GuestMemory(2 * MiB) as mem:
        client.map_guest_ram(mem, 0x100000)
        mem.write(0x1000, b"hello guest")
        assert _dma(client, abi.DMA_CMD_READ, 0x101000, 11) == abi.DMA_OK
        assert struct.unpack("<I", client.region_read(0, abi.DMA_RESULT, 4))[0] == zlib.crc32(b"hello guest")
        assert _dma(client, abi.DMA_CMD_FILL_PATTERN, 0x102000, 64) == abi.DMA_OK
        assert mem.read(0x2000, 64) == abi.pattern(64)
        client.dma_unmap(0x100000, 2 * MiB)


def test_file_offset_is_honoured(client, no_leak):
    with GuestMemory(4 * MiB) as mem:
        client.map_guest_ram(mem, 0x100000, offset=MiB, size=MiB)  # guest 0x100000 = file offset 1 MiB
        mem.write(MiB + 16, b"at offset")
        assert _dma(client, abi.DMA_CMD_READ, 0x100010, 9) == abi.DMA_OK
        assert struct.unpack("<I", client.region_read(0, abi.DMA_RESULT, 4))[0] == zlib.crc32(b"at offset")
        client.dma_unmap(0x100000, MiB)


def test_read_only_map_refuses_device_writes(client, no_leak):
    with GuestMemory(MiB) as mem:
        client.map_guest_ram(mem, 0xC0000, size=0x20000, flags=P.DMA_READ_FLAG)
        assert _dma(client, abi.DMA_CMD_FILL_PATTERN, 0xC0000, 16) == abi.DMA_BAD_ADDRESS
        assert _dma(client, abi.DMA_CMD_READ, 0xC0000, 16) == abi.DMA_OK
        client.dma_unmap(0xC0000, 0x20000)


def test_identical_remap_is_accepted(client, server, no_leak):
    with GuestMemory(MiB) as mem:
        client.map_guest_ram(mem, 0x100000)
        client.dma_map(0x100000, MiB, mem.fd, 0)            # same range, offset, flags and file
        client.dma_map(0xFFFC0000, 0x40000, None, 0, P.DMA_READ_FLAG)
        client.dma_map(0xFFFC0000, 0x40000, None, 0, P.DMA_READ_FLAG)
        assert len(server.conn.dma) == 2
        client.dma_unmap(0x100000, MiB)
        client.dma_unmap(0xFFFC0000, 0x40000)


def test_overlapping_map_is_eexist(client, server, no_leak):
    with GuestMemory(4 * MiB) as mem:
        client.map_guest_ram(mem, 0x100000, size=MiB)
        for addr, size in ((0x100000, 0x2000), (0xFF000, 0x2000), (0x1FF000, 0x2000), (0, 0x200000)):
            refused(client, errno.EEXIST, lambda a=addr, n=size: client.dma_map(a, n, mem.fd, a))
        refused(client, errno.EEXIST, lambda: client.dma_map(0x100000, MiB, mem.fd, 0x1000))   # other offset
        refused(client, errno.EEXIST, lambda: client.dma_map(0x100000, MiB, None))            # no fd now
        assert len(server.conn.dma) == 1
        client.dma_map(0x200000, 0x1000, mem.fd, 0x100000)                                     # adjacent is fine
        client.dma_unmap(0x100000, MiB)
        client.dma_unmap(0x200000, 0x1000)


def test_unaligned_zero_or_wrapping_is_einval(client, no_leak):
    with GuestMemory(MiB) as mem:
        for addr, size, off in ((0x100800, 0x1000, 0), (0x100000, 0x800, 0), (0x100000, 0, 0),
                                ((1 << 64) - 0x1000, 0x2000, 0), (0x100000, 0x1000, (1 << 64) - 0x800)):
            refused(client, errno.EINVAL, lambda a=addr, n=size, o=off: client.dma_map(a, n, mem.fd, o))
            if off == 0:
                refused(client, errno.EINVAL, lambda a=addr, n=size: client.dma_map(a, n, None, 0))
    ping(client)


def test_bad_flags_is_einval(client, no_leak):
    for flags in (0, P.DMA_WRITE_FLAG, 0x4 | 0x3, 0x80000003):
        refused(client, errno.EINVAL, lambda f=flags: client.dma_map(0x100000, 0x1000, None, 0, f))


def test_fd_smaller_than_the_map_is_einval(client, no_leak):
    with GuestMemory(0x10000) as mem:   # would SIGBUS the server if mapped past EOF
        refused(client, errno.EINVAL, lambda: client.dma_map(0x100000, 0x20000, mem.fd, 0))
        refused(client, errno.EINVAL, lambda: client.dma_map(0x100000, 0x10000, mem.fd, 0x1000))


def test_fd_that_is_not_a_file_is_einval(client, no_leak):
    with eventfds(1) as (efd,):
        refused(client, errno.EINVAL, lambda: client.dma_map(0x100000, 0x1000, efd, 0))
    r, w = os.pipe()
    try:
        refused(client, errno.EINVAL, lambda: client.dma_map(0x100000, 0x1000, r, 0))
    finally:
        os.close(r)
        os.close(w)


def test_two_fds_is_einval(client, no_leak):
    with GuestMemory(0x10000) as a, GuestMemory(0x10000) as b:
        payload = P.DMA_MAP.pack(32, 3, 0, 0x100000, 0x10000)
        client.send_raw(raw(P.Command.DMA_MAP, payload), [a.fd, b.fd])
        expect_error(client, errno.EINVAL)


def test_short_payload_and_argsz(client, no_leak):
    client.send_raw(raw(P.Command.DMA_MAP, P.DMA_MAP.pack(32, 3, 0, 0x100000, 0x1000)[:24]))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DMA_MAP, P.DMA_MAP.pack(16, 3, 0, 0x100000, 0x1000)))
    expect_error(client, errno.EINVAL)


def test_map_table_is_capped(client, server, no_leak):
    dma = server.conn.dma
    dma.max_maps = 8                      # the same check as MAX_DMA_MAPS, at a test-friendly size
    for i in range(8):
        client.dma_map(0x100000 + i * 0x2000, 0x1000)
    refused(client, errno.ENOSPC, lambda: client.dma_map(0x800000, 0x1000))
    client.dma_unmap(0, 0, P.DMA_UNMAP_ALL)
    assert len(dma) == 0


def test_posted_map_errors_are_not_answered(client, no_leak):
    client.send_raw(raw(P.Command.DMA_MAP, P.DMA_MAP.pack(32, 3, 0, 0x100800, 0x1000), flags=P.FLAG_NO_REPLY))
    client.expect_silence(0.1)


# -- formerly test_review_dma_seal.py ----------------------------------------
# Review finding: the size check of an fd-backed DMA_MAP must hold once the file is sealed.
#
# The server seals the file against shrinking (F_SEAL_SHRINK) so that a later ftruncate by the
# peer cannot SIGBUS it. The size check has to come *after* the seal: a peer that shrinks the
# file between the check and the seal would otherwise leave a "sealed" map larger than its
# file, and the first device access would SIGBUS the server. The race is made deterministic by
# shrinking the file just before the seal is applied.

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


# -- formerly test_review_sealed_ram.py --------------------------------------
# Review: guest RAM whose file the peer can shrink under the server's mapping.
#
# A shrink (ftruncate) of a mapped file makes the next access to the missing pages SIGBUS the
# server, which Python cannot survive. The server seals each DMA_MAP file against shrinking when
# the file allows it (QEMU's memory-backend-memfd is created sealed: seal=on is its default); an
# unsealable file (a memfd without MFD_ALLOW_SEALING, memory-backend-memfd with seal=off, a file
# on hugetlbfs or disk) stays a SIGBUS risk. ``require_sealed_ram`` (on by default;
# ``vxpu serve --allow-unsealed-ram`` turns it off) refuses such files.

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
