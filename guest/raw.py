"""The SDK's lower layer: post any descriptor and see the raw completion.

``Device.raw`` exists so that tests (and the curious) can misbehave on purpose without
bypassing the driver's bookkeeping: free twice, launch with a stale handle, point a
scatter-gather entry outside guest RAM, or break the ring protocol itself::

    raw = dev.raw
    addr = raw.call(Opcode.MEM_ALLOC, 4096)[0]
    raw.call(Opcode.MEM_FREE, addr)
    raw.call(Opcode.MEM_FREE, addr)        # DeviceError: INVALID_HANDLE

Every method goes through the same :class:`~vxpu.guest.ring.Ring` as the high-level API, so
flow control still holds (the ring never overfills) unless a test asks for
:meth:`Raw.set_sq_tail`, which writes a raw ring index and makes the device fatal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

from vxpu.guest.errors import DeviceError
from vxpu.guest.ring import Ring, opcode_name
from vxpu.guest.staging import post_single
from vxpu.guest.transport import DmaMemory

if TYPE_CHECKING:
    from vxpu.guest.sdk import Device

Sg: TypeAlias = tuple[int, int] | Sequence[tuple[int, int]] | DmaMemory | None


def _segments(sg: Sg) -> list[tuple[int, int]]:
    if sg is None:
        return []
    if isinstance(sg, DmaMemory):
        return sg.segments()
    if isinstance(sg, tuple) and len(sg) == 2 and all(isinstance(v, int) for v in sg):
        return [sg]  # type: ignore[list-item]
    return list(sg)  # type: ignore[arg-type]


class Raw:
    """Direct descriptor access for one :class:`~vxpu.guest.sdk.Device`."""

    def __init__(self, device: Device) -> None:
        self.device = device

    @property
    def ring(self) -> Ring:
        """The device's :class:`~vxpu.guest.ring.Ring` (StateError after close)."""
        return self.device.live_ring()

    def submit(self, opcode: int, *args: int, sg: Sg = None, flags: int | None = None,
               sg_count: int | None = None) -> int:
        """Post one descriptor (published at once) whose completion :meth:`wait` returns.

        Args:
            opcode: any value (an unknown one gets UNSUPPORTED).
            args: up to four u64 arguments.
            sg: ``(address, length)``, a list of them (an indirect list is built), a DmaMemory,
                or None.
            flags: overrides the descriptor flags (any bits, reserved ones included); with
                ``flags`` or ``sg_count`` given, only ``sg``'s first pair is stored, as is.
            sg_count: overrides the descriptor's sg_count.

        Returns:
            the sequence number (the tag).
        """
        ring = self.ring
        segs = _segments(sg)
        if flags is None and sg_count is None:
            return post_single(ring, opcode, segs, *args, waited=True)
        addr, length = segs[0] if segs else (0, 0)
        return ring.post(opcode, *args, flags=flags or 0, sg_addr=addr, sg_len=length, sg_count=sg_count,
                         waited=True)

    def wait(self, seq: int) -> tuple[int, int, int]:
        """The completion of ``seq``: ``(status, result, result2)``."""
        return self.ring.wait(seq)

    def call(self, opcode: int, *args: int, sg: Sg = None, flags: int | None = None,
             sg_count: int | None = None) -> tuple[int, int]:
        """:meth:`submit` then wait; ``(result, result2)``.

        Raises:
            DeviceError: a status other than OK (``.name`` says which), or a fatal device error.
        """
        status, result, result2 = self.wait(self.submit(opcode, *args, sg=sg, flags=flags, sg_count=sg_count))
        if status:
            raise DeviceError(status, opcode_name(opcode), result=result)
        return result, result2

    def dma(self, size: int) -> DmaMemory:
        """DMA memory from the transport (give it back with :meth:`free_dma`)."""
        return self.device.transport.alloc_dma(size)

    def free_dma(self, mem: DmaMemory) -> None:
        """Give back memory from :meth:`dma`."""
        self.device.transport.free_dma(mem)

    def read_reg(self, offset: int) -> int:
        """A BAR0 register."""
        return self.device.transport.read_reg(offset)

    def write_reg(self, offset: int, value: int) -> None:
        """Write a BAR0 register (anything, including ring configuration)."""
        self.device.transport.write_reg(offset, value)

    def set_sq_tail(self, value: int) -> None:
        """Store a raw ``sq_tail`` and ring the doorbell: past ``sq_head + entries`` the device
        goes fatal (BAD_SQ_TAIL) and only ``Device.reset()`` recovers."""
        self.ring.set_sq_tail(value)
