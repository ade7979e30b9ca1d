"""DEVICE_GET_IRQ_INFO (command 7)."""

from __future__ import annotations

import errno

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import VfioUserClient
from vxpu.vfio_server.server import VfioUserServer

from .conftest import MmapTestDevice, eventfds, expect_error, raw


def test_counts_and_flags(client, no_leak):
    intx, msi, msix, err, req = (client.irq_info(i) for i in range(5))
    assert (intx.count, intx.flags) == (1, P.IRQ_INFO_EVENTFD | P.IRQ_INFO_MASKABLE | P.IRQ_INFO_AUTOMASKED)
    assert msi.count == 1 and msi.flags & P.IRQ_INFO_EVENTFD
    assert msix.count == 0
    assert err.count == 1 and req.count == 0
    assert [i.index for i in (intx, msi, msix, err, req)] == [0, 1, 2, 3, 4]


def test_msix_device(tmp_path):
    dev = MmapTestDevice(msix=True)
    with VfioUserServer(tmp_path / "x.sock", dev) as srv, VfioUserClient(srv.path) as c:
        c.handshake()
        info = c.irq_info(2)
        assert info.count == 2 and info.flags & P.IRQ_INFO_NORESIZE
    dev.close()


def test_hostile(client, no_leak):
    for index in (5, 0xFFFFFFFF):
        client.send_raw(raw(P.Command.DEVICE_GET_IRQ_INFO, P.IRQ_INFO.pack(16, 0, index, 0)))
        expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DEVICE_GET_IRQ_INFO, P.IRQ_INFO.pack(12, 0, 0, 0)))
    expect_error(client, errno.EINVAL)
    client.send_raw(raw(P.Command.DEVICE_GET_IRQ_INFO, P.IRQ_INFO.pack(16, 0, 0, 0)[:8]))
    expect_error(client, errno.EINVAL)
    with eventfds(1) as fds:
        client.send_raw(raw(P.Command.DEVICE_GET_IRQ_INFO, P.IRQ_INFO.pack(16, 0, 0, 0)), fds)
        expect_error(client, errno.EINVAL)
