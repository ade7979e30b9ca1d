"""vxpu.qmp: QEMU control over QMP (attach/detach devices, server life cycle, VFIO passthrough)."""
