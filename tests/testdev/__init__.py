"""Tests of the test device (vxpu.vfio_server.testdev, ABI vxpu.abi.testdev): unit, socket, QEMU."""
