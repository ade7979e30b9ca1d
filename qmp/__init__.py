"""vxpu.qmp: QEMU control over QMP and the processes around a VM.

``monitor``      a synchronous QMP client (commands, events with deadlines) on ``qemu.qmp``
``devices``      attach/detach vfio-user-pci devices (JSON device form, DEVICE_DELETED)
``server``       start/stop a ``vxpu serve`` process for one device
``passthrough``  bind a host PCI device to vfio-pci via sysfs and hot-plug it
``cli``          ``vxpu attach``, ``vxpu detach``, ``vxpu passthrough``
"""
