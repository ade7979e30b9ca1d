"""vxpu.accel: accelerator backends (CPU, CUDA, HIP, NPU), enumeration and device memory."""
