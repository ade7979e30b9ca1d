"""Tests of the PCI model (vxpu.vfio_server.pci): config space, BARs, capabilities, registers."""
