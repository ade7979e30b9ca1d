"""vxpu.images: find or fetch a QEMU with vfio-user-pci, build a Debian guest image, run VMs.

``qemu``      find the system QEMU or fetch Debian's trixie-backports build into a private prefix
``apt``       private apt resolution and .deb download (the host's apt state is never touched)
``guest``     the guest kernel + initramfs (busybox, python3.13, the vxpu guest package)
``vm``        boot a VM with a vfio-user device, KVM with a quick fallback to TCG
``cli``       ``vxpu image build`` and ``vxpu vm run``
"""

from vxpu.images.errors import ImageError, VmError

__all__ = ["ImageError", "VmError"]
