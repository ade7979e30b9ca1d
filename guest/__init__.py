"""vxpu.guest: the guest-side driver and SDK (stdlib only, numpy optional).

It runs inside the VM, in a minimal initramfs, as root, with no kernel module:

``pci``       find the device in /sys/bus/pci/devices by IDs, enable it, config space via sysfs,
              capability walk, BARs mmap'd from ``resourceN`` with 32-bit register access
``dma``       pinned buffers (huge page or locked pages) with guest-physical addresses from pagemap
``irq``       MSI programmed through sysfs config; delivery proof through /dev/kmsg
``selftest``  ``python3 -m vxpu.guest.selftest``: the end-to-end check of the test device
``bench``     ``python3 -m vxpu.guest.bench``: in-guest MMIO latency
``sdk``       the accelerator SDK: ``from vxpu.guest import Device`` (``ring``, ``staging``, ``array``,
              ``module``, ``raw`` below it; ``local`` is the host-only transport)
"""

__all__ = ["Device", "DeviceError"]


def __getattr__(name: str) -> object:
    """``from vxpu.guest import Device`` without importing the SDK for the other modules."""
    if name == "Device":
        from vxpu.guest.sdk import Device
        return Device
    if name == "DeviceError":
        from vxpu.guest.errors import DeviceError
        return DeviceError
    raise AttributeError(f"module 'vxpu.guest' has no attribute {name!r}")
