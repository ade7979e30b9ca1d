"""Interrupt eventfds: what DEVICE_SET_IRQS configures and how a device raises an interrupt.

The client (QEMU) hands the server one eventfd per interrupt vector (``(index, subindex)``,
index 0 INTx, 1 MSI, 2 MSI-X, 3 ERR, 4 REQ). The server raises vector ``v`` by writing an
8-byte 1 to that eventfd; QEMU (or KVM's irqfd) injects it into the guest.

:class:`IrqTable` applies SET_IRQS requests with VFIO's semantics:

* ``DATA_EVENTFD|TRIGGER``: assign one fd per subindex ``start .. start+count-1``; the same
  message with *no* fds (QEMU's run of "-1" fds) de-assigns those subindexes.
* ``DATA_NONE|TRIGGER`` with ``count == 0``: disable the whole index (close every fd).
* ``DATA_NONE|TRIGGER`` / ``DATA_BOOL|TRIGGER`` with ``count > 0``: fire those vectors now.
* ``MASK`` / ``UNMASK`` (NONE or BOOL data): mask or unmask vectors; a vector raised while
  masked is remembered and fired on unmask.
* ``DATA_EVENTFD|UNMASK`` on INTx: KVM's *resample* eventfd; when it fires the server unmasks
  INTx (the server polls it through :attr:`IrqTable.resample_fd`).

A vector of an index whose ``irq_info`` reports AUTOMASKED (INTx) is masked when it fires,
until the client unmasks it. Every fd kept is checked to be an eventfd and set non-blocking,
so a hostile fd can never block the serve loop.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable

from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.device import NUM_IRQS, IrqIndex, IrqState, VfioDevice
from vxpu.vfio_server.errors import ProtocolError
from vxpu.vfio_server.transport import close_fds

log = logging.getLogger(__name__)

_ONE = (1).to_bytes(8, "little")


def is_eventfd(fd: int) -> bool:
    """True when ``fd`` is an eventfd (read from /proc/self/fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            return b"eventfd-count:" in f.read(4096)
    except OSError:
        return False


def _set_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


class IrqTable:
    """The eventfd table of one client connection.

    Args:
        device: asked for each index's vector count and flags (``irq_info``).
        logger: the connection's logger.
    """

    def __init__(self, device: VfioDevice, logger: logging.Logger | None = None) -> None:
        self.device = device
        self.log = logger or log
        self.states = [IrqState() for _ in range(NUM_IRQS)]
        self.pending: list[set[int]] = [set() for _ in range(NUM_IRQS)]
        self.resample_fd: int | None = None
        # Called as (old, new) before the resample fd changes, so a poller can follow it.
        self.on_resample_change: Callable[[int | None, int | None], None] | None = None
        info = device.irq_info(IrqIndex.INTX)
        self._intx_automask = bool(info.flags & P.IRQ_INFO_AUTOMASKED)

    # --- SET_IRQS ------------------------------------------------------------------------------
    def set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes, fds: list[int]) -> None:
        """Apply one SET_IRQS request. Fds kept are removed from ``fds``; the caller closes the rest.

        Args:
            data: the BOOL array (``count`` bytes) for DATA_BOOL, else empty.

        Raises:
            ProtocolError: EINVAL for bad flags, index, start/count, fd count or non-eventfds.
        """
        kind = flags & P.IRQ_DATA_MASK
        action = flags & P.IRQ_ACTION_MASK_ALL
        if flags & ~(P.IRQ_DATA_MASK | P.IRQ_ACTION_MASK_ALL) or kind not in (1, 2, 4) or action not in (8, 16, 32):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: bad flags {flags:#x} (one data type and one action)")
        if not 0 <= index < NUM_IRQS:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: irq index {index} >= {NUM_IRQS}")
        if fds and kind != P.IRQ_DATA_EVENTFD:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: {len(fds)} fds sent without DATA_EVENTFD")
        if count == 0:
            if flags != P.IRQ_DATA_NONE | P.IRQ_ACTION_TRIGGER or start != 0:
                raise ProtocolError(errno.EINVAL, "SET_IRQS: count 0 needs DATA_NONE|TRIGGER and start 0")
            self.disable(index)
            return
        limit = self.device.irq_info(index).count
        if start >= limit or count > limit - start:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: vectors [{start}, +{count}) exceed index {index}'s {limit}")
        if kind == P.IRQ_DATA_EVENTFD:
            self._set_eventfds(action, index, start, count, fds)
            return
        if kind == P.IRQ_DATA_BOOL:
            chosen = [start + i for i in range(count) if data[i]]
        else:
            chosen = list(range(start, start + count))
        if action == P.IRQ_ACTION_TRIGGER:
            for sub in chosen:
                self.trigger(index, sub)
        elif action == P.IRQ_ACTION_MASK:
            self.states[index].masked.update(chosen)
        else:
            self.unmask(index, chosen)

    def _set_eventfds(self, action: int, index: int, start: int, count: int, fds: list[int]) -> None:
        if action == P.IRQ_ACTION_MASK:
            raise ProtocolError(errno.EINVAL, "SET_IRQS: DATA_EVENTFD with ACTION_MASK is not supported")
        if fds and len(fds) != count:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: {len(fds)} fds for {count} vectors")
        for fd in fds:
            if not is_eventfd(fd):
                raise ProtocolError(errno.EINVAL, "SET_IRQS: an fd is not an eventfd")
        if action == P.IRQ_ACTION_UNMASK:
            if index != IrqIndex.INTX or start != 0 or count != 1:
                raise ProtocolError(errno.EINVAL, "SET_IRQS: resample eventfds exist only for INTx vector 0")
            self._replace_resample(fds.pop(0) if fds else None)
            return
        table = self.states[index].eventfds
        for i in range(count):
            sub = start + i
            old = table.pop(sub, None)
            if old is not None:
                close_fds([old])
        if fds:
            for i in range(count):
                fd = fds.pop(0)
                _set_nonblocking(fd)
                table[start + i] = fd

    def _replace_resample(self, fd: int | None) -> None:
        old = self.resample_fd
        if old is None and fd is None:
            return
        if fd is not None:
            _set_nonblocking(fd)
        if self.on_resample_change is not None:
            self.on_resample_change(old, fd)     # before the old fd number can be reused
        if old is not None:
            close_fds([old])
        self.resample_fd = fd

    def disable(self, index: int) -> None:
        """Close every eventfd of ``index`` (and INTx's resample fd); clear masks and pending bits."""
        state = self.states[index]
        close_fds(list(state.eventfds.values()))
        state.eventfds.clear()
        state.masked.clear()
        self.pending[index].clear()
        if index == IrqIndex.INTX:
            self._replace_resample(None)

    def close(self) -> None:
        """Close every fd (client disconnect)."""
        for index in range(NUM_IRQS):
            self.disable(index)

    # --- raising ---------------------------------------------------------------------------------
    def trigger(self, index: int, sub: int) -> bool:
        """Signal vector ``sub`` of ``index``. Returns False when it has no eventfd or is masked
        (a masked vector becomes pending and fires on unmask)."""
        state = self.states[index]
        fd = state.eventfds.get(sub)
        if fd is None:
            return False
        if sub in state.masked:
            self.pending[index].add(sub)
            return False
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass        # the counter is saturated: the interrupt is already pending
        except OSError as exc:
            self.log.warning("irq %d.%d: eventfd write failed: %s", index, sub, exc)
            return False
        if index == IrqIndex.INTX and self._intx_automask:
            state.masked.add(sub)
        return True

    def unmask(self, index: int, subs: list[int]) -> None:
        state = self.states[index]
        pending = self.pending[index]
        for sub in subs:
            state.masked.discard(sub)
            if sub in pending:
                pending.discard(sub)
                self.trigger(index, sub)

    def raise_irq(self, vector: int = 0) -> bool:
        """Raise ``vector`` on MSI-X if the guest enabled it, else MSI, else INTx (vector ignored)."""
        states = self.states
        if states[IrqIndex.MSIX].eventfds:
            return self.trigger(IrqIndex.MSIX, vector)
        if states[IrqIndex.MSI].eventfds:
            return self.trigger(IrqIndex.MSI, vector)
        return self.trigger(IrqIndex.INTX, 0)

    def on_resample(self) -> None:
        """The resample eventfd fired (the guest EOI'd INTx): drain it and unmask INTx."""
        if self.resample_fd is None:
            return
        try:
            os.read(self.resample_fd, 8)
        except BlockingIOError:
            return
        except OSError as exc:
            self.log.warning("INTx resample eventfd read failed: %s", exc)
            return
        self.unmask(IrqIndex.INTX, [0])
