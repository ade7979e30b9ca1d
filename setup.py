"""Packaging: the one place that maps the layer folders to the ``vxpu.*`` packages.

The repository root holds one folder per layer (``ir/``, ``accel/`` ...) so that the layout
shows the architecture; they install under one namespace, ``vxpu.*``, because qmp, ir and
accel are taken on PyPI. :data:`LAYERS` is that mapping, used for wheels and editable installs
alike (pyproject.toml holds the metadata only). Setuptools cannot discover sub-packages of
remapped folders on its own, so they are listed here. Package data: the sample kernels of
``vxpu.ir`` (read with importlib.resources); the guest image is assembled from installed
modules (``vxpu.images.guest.guest_files``).

``scripts/typecheck`` imports :data:`LAYERS` to build the tree mypy checks.
"""

from pathlib import Path

ROOT = Path(__file__).parent
LAYERS = {
    "vxpu": "vxpu",
    "vxpu.vfio_server": "vfio_server",
    "vxpu.accel": "accel",
    "vxpu.ir": "ir",
    "vxpu.qmp": "qmp",
    "vxpu.guest": "guest",
    "vxpu.images": "vm-images",
}
# Data folders count as (namespace) packages for setuptools, so each is listed as one.
PACKAGE_DATA = {"vxpu.ir.sample_kernels": ["*.vxir"], "vxpu.vfio_server.xpu.native": ["*.c", "*.h"]}


def packages() -> list[str]:
    """Every package the layers hold: each layer and its sub-packages, as ``vxpu.*`` names."""
    from setuptools import find_packages

    names = []
    for name, folder in LAYERS.items():
        names.append(name)
        names += [f"{name}.{sub}" for sub in find_packages(str(ROOT / folder))]
    return names + [name for name in PACKAGE_DATA if name not in names]


if __name__ == "__main__":
    from setuptools import setup

    setup(package_dir=LAYERS, packages=packages(), package_data=PACKAGE_DATA)
