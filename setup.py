"""Package discovery for the layer folders.

The repository root holds one folder per layer (``ir/``, ``accel/`` ...), installed under the
``vxpu.*`` namespace by ``[tool.setuptools] package-dir`` in pyproject.toml. Setuptools cannot
discover sub-packages of remapped folders on its own, so they are listed here.
"""

from pathlib import Path

from setuptools import find_packages, setup

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


def _packages() -> list[str]:
    packages = []
    for name, folder in LAYERS.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(str(ROOT / folder))]
    return packages


setup(packages=_packages(), package_data={"vxpu.images": ["*.sh", "*.py"], "vxpu.ir": ["*.vxir"]})
