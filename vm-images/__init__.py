"""vxpu.images: find or fetch a QEMU with vfio-user-pci, and build a Debian guest image."""
