"""vxpu.abi: the guest-visible contracts, shared unchanged by the host and the guest.

Everything a guest driver and the server must agree on lives here and nowhere else:

* :mod:`vxpu.abi.status` -- the one status table of the project (wire codes and meanings);
* :mod:`vxpu.abi.xpu` -- the accelerator device (0x5850:0x0100): PCI identity, the BAR0
  register map, the command and completion rings in guest memory, commands and limits;
* :mod:`vxpu.abi.testdev` -- the test device (0x5850:0x0001) that proves the PCI/DMA path.

The package is stdlib-only and has no side effects on import, because the guest imports it
inside a minimal initramfs. ``docs/device-abi.md`` is the prose form of these modules; the two
change together.
"""
