"""vxpu: give QEMU virtual machines real accelerators.

A vxpu server speaks vfio-user to QEMU's ``vfio-user-pci`` device, so the guest sees a PCI
processing accelerator (class 0x1200). Guest kernels arrive as a portable IR that the host
verifies and JIT-compiles for whatever it has: CUDA, HIP, an NPU through ONNX Runtime, or the
host CPU. The layers live in sibling packages:

``vxpu.vfio_server``  protocol, PCI model, device model
``vxpu.accel``        accelerator backends, enumeration, memory
``vxpu.ir``           the kernel IR, verifier, passes, lowering, compile cache
``vxpu.qmp``          QEMU control (attach/detach, passthrough)
``vxpu.guest``        guest driver and SDK
``vxpu.images``       QEMU and guest-image provisioning (the ``vm-images/`` folder)
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
