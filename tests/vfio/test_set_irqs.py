"""DEVICE_SET_IRQS (command 8) and interrupt delivery through eventfds."""

from __future__ import annotations

import errno
import os
import threading

from vxpu.vfio_server import protocol as P

from .conftest import eventfds, expect_error, nfds, ping, raw, read_eventfd, refused

EVENTFD_TRIGGER = P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_TRIGGER
NONE_TRIGGER = P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER
INTX, MSI, MSIX, ERR, REQ = range(5)


def _on_loop(server, client, fn):
    """Run ``fn`` on the serve loop (as a device would) and return its result."""
    out: list[object] = []
    done = threading.Event()
    server.call_soon_threadsafe(lambda: (out.append(fn()), done.set()))
    assert done.wait(2)
    ping(client)
    return out[0]


def test_intx_eventfd_automask_and_unmask(client, server, no_leak):
    with eventfds(1) as (efd,):
        client.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, [efd])
        assert _on_loop(server, client, lambda: server.conn.raise_irq(0)) is True
        assert read_eventfd(efd) == 1
        assert _on_loop(server, client, lambda: server.conn.raise_irq(0)) is False     # automasked
        assert read_eventfd(efd) == 0
        client.set_irqs(INTX, P.IRQ_DATA_NONE | P.IRQ_ACTION_UNMASK, 0, 1)              # EOI: pending fires
        assert read_eventfd(efd) == 1
        client.set_irqs(INTX, P.IRQ_DATA_NONE | P.IRQ_ACTION_MASK, 0, 1)
        assert _on_loop(server, client, lambda: server.conn.raise_irq(0)) is False
        client.set_irqs(INTX, NONE_TRIGGER, 0, 0)                                       # disable
        client.set_irqs(INTX, P.IRQ_DATA_NONE | P.IRQ_ACTION_UNMASK, 0, 1)
        assert read_eventfd(efd) == 0


def test_resample_eventfd_unmasks_intx(client, server, no_leak):
    with eventfds(2) as (efd, resample):
        client.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, [efd])
        client.set_irqs(INTX, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_UNMASK, 0, 1, [resample])
        assert _on_loop(server, client, lambda: server.conn.raise_irq(0))
        assert not _on_loop(server, client, lambda: server.conn.raise_irq(0))         # masked, pending
        assert read_eventfd(efd) == 1
        os.eventfd_write(resample, 1)                                                   # KVM: guest EOI
        for _ in range(100):
            if read_eventfd(efd):
                break
            threading.Event().wait(0.01)
        else:
            raise AssertionError("resample did not unmask INTx")
        client.set_irqs(INTX, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_UNMASK, 0, 1)          # drop resample fd
        client.set_irqs(INTX, NONE_TRIGGER, 0, 0)


def test_msix_then_msi_then_intx_preference(tmp_path):
    from vxpu.vfio_server.client import VfioUserClient
    from vxpu.vfio_server.server import VfioUserServer

    from .conftest import MmapTestDevice
    dev = MmapTestDevice(msix=True)
    with VfioUserServer(tmp_path / "p.sock", dev) as srv, VfioUserClient(srv.path) as c, eventfds(4) as fds:
        c.handshake()
        intx, msi, msix0, msix1 = fds
        c.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, [intx])
        c.set_irqs(MSI, EVENTFD_TRIGGER, 0, 1, [msi])
        c.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 2, [msix0, msix1])
        assert _on_loop(srv, c, lambda: srv.conn.raise_irq(1))
        assert [read_eventfd(fd) for fd in fds] == [0, 0, 0, 1]
        c.set_irqs(MSIX, NONE_TRIGGER, 0, 0)
        assert _on_loop(srv, c, lambda: srv.conn.raise_irq(0))
        assert [read_eventfd(fd) for fd in fds] == [0, 1, 0, 0]
        assert not _on_loop(srv, c, lambda: srv.conn.raise_irq(3))          # no such MSI vector
        c.set_irqs(MSI, NONE_TRIGGER, 0, 0)
        assert _on_loop(srv, c, lambda: srv.conn.raise_irq(0))
        assert [read_eventfd(fd) for fd in fds] == [1, 0, 0, 0]
    dev.close()


def test_device_raises_through_its_register(client, no_leak):
    import struct

    from vxpu.abi import testdev as abi
    with eventfds(1) as (efd,):
        client.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, [efd])
        client.region_write(0, abi.IRQ_RAISE, struct.pack("<I", 0))
        assert read_eventfd(efd) == 1
        assert struct.unpack("<I", client.region_read(0, abi.IRQ_COUNT, 4))[0] == 1
        client.set_irqs(INTX, NONE_TRIGGER, 0, 0)


def test_placeholder_run_without_fds_deassigns(client, server, no_leak):
    with eventfds(1) as (efd,):
        before = nfds()
        client.set_irqs(MSI, EVENTFD_TRIGGER, 0, 1, [efd])
        assert nfds() == before + 1                      # the server keeps its own reference
        client.set_irqs(MSI, EVENTFD_TRIGGER, 0, 1)      # QEMU's run of "-1" fds
        assert nfds() == before
        assert not server.conn.irqs.states[MSI].eventfds


def test_replacing_and_disabling_closes_old_fds(client, no_leak):
    with eventfds(2) as (a, b):
        before = nfds()
        client.set_irqs(ERR, EVENTFD_TRIGGER, 0, 1, [a])
        client.set_irqs(ERR, EVENTFD_TRIGGER, 0, 1, [b])
        assert nfds() == before + 1
        client.set_irqs(ERR, NONE_TRIGGER, 0, 0)
        assert nfds() == before


def test_bool_and_none_trigger_fire_now(client, no_leak):
    with eventfds(1) as (efd,):
        client.set_irqs(MSI, EVENTFD_TRIGGER, 0, 1, [efd])
        client.set_irqs(MSI, NONE_TRIGGER, 0, 1)
        assert read_eventfd(efd) == 1
        client.set_irqs(MSI, P.IRQ_DATA_BOOL | P.IRQ_ACTION_TRIGGER, 0, 1, data=b"\0")
        assert read_eventfd(efd) == 0
        client.set_irqs(MSI, P.IRQ_DATA_BOOL | P.IRQ_ACTION_TRIGGER, 0, 1, data=b"\1")
        assert read_eventfd(efd) == 1
        client.set_irqs(MSI, P.IRQ_DATA_BOOL | P.IRQ_ACTION_MASK, 0, 1, data=b"\1")
        client.set_irqs(MSI, NONE_TRIGGER, 0, 1)
        assert read_eventfd(efd) == 0
        client.set_irqs(MSI, P.IRQ_DATA_BOOL | P.IRQ_ACTION_UNMASK, 0, 1, data=b"\1")
        assert read_eventfd(efd) == 1
        client.set_irqs(MSI, NONE_TRIGGER, 0, 0)


def test_disable_of_an_index_with_no_vectors(client, no_leak):
    client.set_irqs(REQ, NONE_TRIGGER, 0, 0)
    client.set_irqs(MSIX, NONE_TRIGGER, 0, 0)


def _bad(client, payload: bytes, fds=(), err: int = errno.EINVAL) -> None:
    client.send_raw(raw(P.Command.DEVICE_SET_IRQS, payload), fds)
    expect_error(client, err)


def test_hostile_flags_index_and_ranges(client, no_leak):
    s = P.SET_IRQS
    for flags in (0, P.IRQ_DATA_NONE, P.IRQ_ACTION_TRIGGER, P.IRQ_DATA_NONE | P.IRQ_DATA_BOOL | 32,
                  P.IRQ_DATA_NONE | P.IRQ_ACTION_MASK | P.IRQ_ACTION_TRIGGER, NONE_TRIGGER | 0x40):
        _bad(client, s.pack(20, flags, MSI, 0, 1))
    for index in (5, 0xFFFFFFFF):
        _bad(client, s.pack(20, NONE_TRIGGER, index, 0, 0))
    _bad(client, s.pack(20, NONE_TRIGGER, MSI, 0, 2))                       # MSI has 1 vector
    _bad(client, s.pack(20, NONE_TRIGGER, MSI, 1, 1))
    _bad(client, s.pack(20, NONE_TRIGGER, MSI, 1, 0xFFFFFFFF))              # start + count overflows u32
    _bad(client, s.pack(20, NONE_TRIGGER, MSI, 0xFFFFFFFF, 2))
    _bad(client, s.pack(20, NONE_TRIGGER, MSIX, 0, 1))                      # no MSI-X vectors at all
    _bad(client, s.pack(20, P.IRQ_DATA_NONE | P.IRQ_ACTION_MASK, MSI, 0, 0))  # count 0 only disables
    _bad(client, s.pack(20, NONE_TRIGGER, MSI, 1, 0))                       # disable with start != 0


def test_hostile_sizes(client, no_leak):
    s = P.SET_IRQS
    _bad(client, s.pack(20, NONE_TRIGGER, MSI, 0, 0)[:16])
    _bad(client, s.pack(16, NONE_TRIGGER, MSI, 0, 0))
    _bad(client, s.pack(24, NONE_TRIGGER, MSI, 0, 0))                       # argsz beyond the payload
    _bad(client, s.pack(20, P.IRQ_DATA_BOOL | P.IRQ_ACTION_TRIGGER, MSI, 0, 1))          # bools missing
    _bad(client, s.pack(21, P.IRQ_DATA_BOOL | P.IRQ_ACTION_TRIGGER, MSI, 0, 0xFFFFFFFF) + b"\1")


def test_hostile_fds(client, server, no_leak):
    s = P.SET_IRQS
    with eventfds(P.MAX_MSG_FDS + 1) as fds:
        _bad(client, s.pack(20, EVENTFD_TRIGGER, MSI, 0, 1), fds[:2])             # 2 fds, 1 vector
        _bad(client, s.pack(20, NONE_TRIGGER, MSI, 0, 1), fds[:1])                # fds without DATA_EVENTFD
        _bad(client, s.pack(20, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_MASK, INTX, 0, 1), fds[:1])
        _bad(client, s.pack(20, P.IRQ_DATA_EVENTFD | P.IRQ_ACTION_UNMASK, MSI, 0, 1), fds[:1])
        _bad(client, s.pack(20, EVENTFD_TRIGGER, MSI, 0, 1), fds)                # more than max_msg_fds
    r, w = os.pipe()
    try:
        _bad(client, s.pack(20, EVENTFD_TRIGGER, MSI, 0, 1), [w])               # not an eventfd
    finally:
        os.close(r)
        os.close(w)
    assert all(not st.eventfds for st in server.conn.irqs.states)


def test_posted_set_irqs_errors_are_not_answered(client, no_leak):
    client.send_raw(raw(P.Command.DEVICE_SET_IRQS, P.SET_IRQS.pack(20, 0, 9, 0, 0), flags=P.FLAG_NO_REPLY))
    client.expect_silence(0.1)


def test_disconnect_closes_eventfds(server, device):
    from vxpu.vfio_server.client import VfioUserClient
    with eventfds(2) as fds:
        before = nfds()
        with VfioUserClient(server.path) as c:
            c.handshake()
            c.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, fds[:1])
            c.set_irqs(ERR, EVENTFD_TRIGGER, 0, 1, fds[1:])
            refused(c, errno.EINVAL, lambda: c.set_irqs(MSI, EVENTFD_TRIGGER, 0, 2, fds))
        for _ in range(200):
            if server.conn is None and nfds() == before:
                break
            threading.Event().wait(0.01)
        assert nfds() == before
