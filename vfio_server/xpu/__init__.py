"""vxpu.vfio_server.xpu: the accelerator device model (0x5850:0x0100).

One file per role:

* :mod:`.device` — :class:`XpuDevice`: PCI identity, BAR0 registers, interrupts, reset;
* :mod:`.poller` — the thread that runs the rings (need-wakeup, batching, coalesced MSI);
* :mod:`.queue` — queue configuration checks, ring views and index validation;
* :mod:`.commands` — the command table, executed on an accel ``Session``;
* :mod:`.guestram` — guest RAM as the poller thread may see it (locked snapshot of DMA maps);
* :mod:`.stats` — the STATS document.

The contract is :mod:`vxpu.abi.xpu`, described in docs/device-abi.md §4.
"""

from vxpu.vfio_server.xpu.device import XpuDevice

__all__ = ["XpuDevice"]
