"""vxpu.qmp: QEMU control over QMP and the processes around a VM.

``connection``   an async QMP session on ``qemu.qmp`` that fails fast (unreachable, busy socket)
``lifecycle``    attach/detach/list vxpu devices: a managed ``vxpu serve`` per device (async)
``sync``         synchronous wrappers of ``lifecycle`` for scripts and tests
``runtime``      the runtime directory: device records, sockets, logs, per-VM lock
``slots``        free hot-pluggable slots (pc bus, q35 root ports) and ``query-pci`` lookups
``server``       start/stop ``vxpu serve`` processes (detached by pid, or owned)
``devices``      the vfio-user-pci JSON device form; a synchronous attach/detach on ``monitor``
``monitor``      a synchronous QMP client (legacy shim) used by the VM runner and tests
``passthrough``  bind a host PCI device to vfio-pci via sysfs and hot-plug it
``cli``          ``vxpu attach``, ``detach``, ``ls``, ``passthrough``, ``libvirt-xml``
"""
