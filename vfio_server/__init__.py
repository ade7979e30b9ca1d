"""vxpu.vfio_server: a pure-Python vfio-user server (protocol, PCI model, device models)."""
