"""Python packages from Debian in the guest image: numpy and the native libraries it loads.

The guest SDK hands numpy arrays to the device, and the demo checks every kernel against numpy
inside the guest, so the image carries Debian trixie's ``python3-numpy``. It is unpacked with
the rest of the guest packages (:data:`PACKAGES`, its ``Depends`` closure minus ``python3``
itself, which the image already has as python3.13); :func:`add_numpy` then copies into the
root file system:

* the ``numpy`` package without what only its developers need: test suites and the test-only
  extension modules, ``f2py``, ``typing``, the PyInstaller hook, stubs (``.pyi``) and Cython
  declarations (``.pxd``);
* the shared libraries its extension modules link (:data:`LIBS`). Debian installs BLAS and
  LAPACK under ``blas/`` and ``lapack/`` and picks one through update-alternatives, which a
  plain ``dpkg -x`` does not run; the reference implementations are copied to the sonames the
  loader looks for.

:data:`CLOSURE_IMPORTS` are imported (on the host, by the guest's own python3.13) when the
trimmed stdlib is assembled, so every stdlib module numpy needs is in the image too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vxpu.images.errors import ImageError

PACKAGES = ("python3-numpy", "libblas3", "liblapack3", "libgfortran5", "libquadmath0", "libgcc-s1", "libstdc++6")
DIST = "usr/lib/python3/dist-packages"
LIBDIR = "usr/lib/x86_64-linux-gnu"
#: soname in the image -> file in the unpacked packages (symlinks are followed)
LIBS = {
    "libblas.so.3": "blas/libblas.so.3",
    "liblapack.so.3": "lapack/liblapack.so.3",
    "libgfortran.so.5": "libgfortran.so.5",
    "libquadmath.so.0": "libquadmath.so.0",
    "libgcc_s.so.1": "libgcc_s.so.1",
    "libstdc++.so.6": "libstdc++.so.6",
}
CLOSURE_IMPORTS = ("numpy", "numpy.random", "numpy.linalg", "numpy.fft")
_SKIP_DIRS = {"tests", "f2py", "typing", "_pyinstaller", "__pycache__", "include"}
_SKIP_SUFFIXES = (".pyi", ".pxd")


def _keep(rel: Path) -> bool:
    if any(part in _SKIP_DIRS for part in rel.parts) or rel.name == "conftest.py":
        return False
    if rel.name.endswith(_SKIP_SUFFIXES):
        return False
    return not (rel.suffix == ".so" and ("_tests." in rel.name or rel.name.startswith("_simd.")))


def add_numpy(stage: Path, rootfs: Path) -> int:
    """Copy numpy and its libraries from the unpacked packages in ``stage`` into ``rootfs``.

    Returns:
        the bytes copied.

    Raises:
        ImageError: numpy or one of :data:`LIBS` is missing from ``stage``.
    """
    src = stage / DIST / "numpy"
    if not (src / "__init__.py").is_file():
        raise ImageError(f"python3-numpy did not unpack into {src}; rebuild with 'vxpu image build --force'")
    copied = 0
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if not _keep(rel) or path.is_dir() or not path.exists():  # exists(): dangling links into -dev packages
            continue
        dst = rootfs / DIST / "numpy" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst)
        copied += dst.stat().st_size
    for soname, rel_src in LIBS.items():
        lib = (stage / LIBDIR / rel_src).resolve()
        if not lib.is_file() or not lib.is_relative_to(stage.resolve()):
            raise ImageError(f"{rel_src} is missing from the unpacked guest packages ({', '.join(PACKAGES)})")
        dst = rootfs / LIBDIR / soname
        shutil.copyfile(lib, dst)
        copied += dst.stat().st_size
    return copied
