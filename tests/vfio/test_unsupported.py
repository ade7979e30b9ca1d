"""DEVICE_FEATURE (16) → ENOTTY, DEVICE_GET_REGION_IO_FDS (6) → ENOTSUP, obsolete and migration
commands → ENOTSUP; never answered when NO_REPLY."""

from __future__ import annotations

import errno
import struct

from vxpu.vfio_server import protocol as P

from .conftest import expect_error, raw


def test_device_feature_is_enotty(client, no_leak):
    for flags in (1 << 16, 1 << 17, 1 << 18 | 3):
        client.send_raw(raw(P.Command.DEVICE_FEATURE, struct.pack("<II", 8, flags)))
        expect_error(client, errno.ENOTTY, cmd=P.Command.DEVICE_FEATURE)


def test_region_io_fds_is_enotsup(client, no_leak):
    client.send_raw(raw(P.Command.DEVICE_GET_REGION_IO_FDS, struct.pack("<IIII", 32, 0, 0, 0)))
    expect_error(client, errno.ENOTSUP, cmd=P.Command.DEVICE_GET_REGION_IO_FDS)


def test_obsolete_and_migration_commands(client, no_leak):
    for cmd in (P.Command.DIRTY_PAGES, P.Command.MIG_DATA_READ, P.Command.MIG_DATA_WRITE):
        client.send_raw(raw(cmd, bytes(16)))
        expect_error(client, errno.ENOTSUP, cmd=cmd)
        client.send_raw(raw(cmd, bytes(16), flags=P.FLAG_NO_REPLY))
    client.expect_silence(0.1)
