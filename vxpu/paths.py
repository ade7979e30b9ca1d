"""Where vxpu keeps its caches on the host.

One root for everything cached (fetched QEMU, guest images, the JIT's compiled kernels):
``$VXPU_CACHE`` if set, otherwise the user cache folder (``~/.cache/vxpu``, honouring
``XDG_CACHE_HOME``). Each user of the cache takes a sub-folder of it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root of vxpu's caches (not created here)."""
    env = os.environ.get("VXPU_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("vxpu"))
