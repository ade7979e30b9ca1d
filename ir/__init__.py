"""vxpu.ir: the portable kernel IR (pure Python; no llvmlite import here)."""
