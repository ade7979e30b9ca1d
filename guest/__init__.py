"""vxpu.guest: the guest-side driver and SDK (stdlib only, numpy optional)."""
