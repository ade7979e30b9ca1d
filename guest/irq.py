"""Message-signalled interrupts without a kernel driver, and proof of their delivery.

:func:`enable_msi` programs a function's MSI capability through sysfs config writes:
address 0xFEE00000 (local APIC of CPU 0, physical destination) and a chosen vector as data,
one vector, then sets MSI Enable. QEMU turns that into a SET_IRQS for the vxpu server, and a
server-raised interrupt arrives at the guest CPU as that vector. No kernel handler owns the
vector, so the kernel logs ``No irq handler for <cpu>.<vector>`` (rate-limited, 10 per 5 s); :class:`KmsgWatcher` counts those lines in ``/dev/kmsg``. That is the
delivery proof: ``/proc/interrupts`` does not count unowned vectors.

Choose a vector no kernel driver uses: device vectors are handed out upwards from 0x21, and
system vectors sit at 0xEB and above, so :data:`DEFAULT_TEST_VECTOR` (0xD0) is free on a small VM.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Self

from vxpu.guest.errors import GuestError
from vxpu.guest.pci import CAP_ID_MSI, PciFunction

DEFAULT_TEST_VECTOR = 0xD0
MSI_ADDRESS = 0xFEE00000
MSI_CTRL_ENABLE = 0x1
MSI_CTRL_64BIT = 0x80
MSI_CTRL_PER_VECTOR_MASK = 0x100
# 6.12 prints "No irq handler for 0.208" (cpu.vector); older kernels "0.208 No irq handler for vector".
_NO_HANDLER = re.compile(r"No irq handler for (\d+)\.(\d+)|(\d+)\.(\d+) No irq handler for vector")


def enable_msi(fn: PciFunction, vector: int, cpu_apic_id: int = 0) -> int:
    """Program MSI (one vector) to deliver ``vector`` to ``cpu_apic_id``; returns the cap offset.

    Raises:
        GuestError: no MSI capability, or a vector outside 0x10-0xFE.
    """
    if not 0x10 <= vector <= 0xFE:
        raise GuestError(f"MSI vector {vector:#x} is outside 0x10-0xFE")
    cap = fn.find_capability(CAP_ID_MSI)
    if cap is None:
        raise GuestError(f"{fn.bdf} has no MSI capability")
    ctrl = fn.config_read(cap + 2, 2)
    fn.config_write(cap + 2, ctrl & ~(MSI_CTRL_ENABLE | 0x70), 2)  # off, one vector
    fn.config_write(cap + 4, MSI_ADDRESS | (cpu_apic_id & 0xFF) << 12)
    data_off = cap + 8
    if ctrl & MSI_CTRL_64BIT:
        fn.config_write(cap + 8, 0)
        data_off = cap + 12
    fn.config_write(data_off, vector, 2)
    if ctrl & MSI_CTRL_PER_VECTOR_MASK:
        fn.config_write(data_off + 4, 0)  # mask bits follow the data word
    fn.set_bus_master(True)  # QEMU drops MSI writes from a device without Bus Master Enable
    fn.config_write(cap + 2, (ctrl & ~0x70) | MSI_CTRL_ENABLE, 2)
    return cap


def disable_msi(fn: PciFunction) -> None:
    """Clear MSI Enable (no-op without an MSI capability)."""
    cap = fn.find_capability(CAP_ID_MSI)
    if cap is not None:
        fn.config_write(cap + 2, fn.config_read(cap + 2, 2) & ~MSI_CTRL_ENABLE, 2)


class KmsgWatcher:
    """Reads kernel log records that arrive after its creation (``/dev/kmsg``, root only).

    Raises:
        GuestError: /dev/kmsg cannot be opened.
    """

    def __init__(self) -> None:
        try:
            self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise GuestError(f"cannot open /dev/kmsg: {exc}") from exc
        os.lseek(self._fd, 0, os.SEEK_END)
        self.records: list[str] = []

    def poll(self) -> list[str]:
        """New records since the last poll (message text only)."""
        new = []
        while True:
            try:
                rec = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records were overwritten; continue with the next
                    continue
                raise
            if not rec:
                break
            text = rec.decode(errors="replace")
            new.append(text.split(";", 1)[1].split("\n", 1)[0] if ";" in text else text)
        self.records += new
        return new

    def unhandled_vectors(self, vector: int) -> int:
        """How many ``No irq handler for vector`` records named ``vector`` were seen so far."""
        self.poll()
        count = 0
        for rec in self.records:
            m = _NO_HANDLER.search(rec)
            if m and int(m.group(2) or m.group(4)) == vector:
                count += 1
        return count

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
