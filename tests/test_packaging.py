"""Both installs work from setup.py's one folder -> package mapping: the wheel and the editable one.

The wheel carries the guest files and the sample kernels: the test builds the wheel from a copy of the working tree (``pip wheel --no-deps
--no-build-isolation``: no network), installs it with ``--no-deps`` into a throwaway venv
without system site-packages (the guest files and the image code are stdlib-only, so nothing
else is needed, and nothing from the checkout can leak in), assembles the guest image's vxpu
files from that install with :func:`vxpu.images.guest.guest_files`, and imports the guest
package from those files alone, with ``python -I -S`` (no site-packages, no checkout) and
numpy/llvmlite blocked. The editable install (setuptools' PEP 660 hook, no network) maps every
layer folder into the source tree it was made from.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SITE = "usr/lib/python3/dist-packages"
IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                ".hypothesis", "*.sock", ".whl", ".carry")

# Run by the wheel's venv: write the guest files under argv[1]; report what came from where.
ASSEMBLE = """
import json, sys
from importlib import resources
from pathlib import Path
import vxpu
from vxpu.images.guest import guest_files
root = Path(sys.argv[1])
for rel, data in guest_files().items():
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
kernels = sorted(p.name for p in resources.files("vxpu.ir").joinpath("sample_kernels").iterdir())
print(json.dumps({"vxpu": vxpu.__file__, "files": sorted(guest_files()), "kernels": kernels}))
"""

# Run with -I -S and only the assembled tree on sys.path: every guest module imports.
IMPORT_ALONE = """
import importlib, json, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numpy", "llvmlite"):
            raise ImportError(f"{name} is not in the guest image")
sys.meta_path.insert(0, Block())
root = sys.argv[1]
sys.path.insert(0, root)
import vxpu.abi, vxpu.guest, vxpu.ir
names = []
for pkg in (vxpu.guest, vxpu.abi, vxpu.ir):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
from vxpu.ir import KernelBuilder
from vxpu.ir.args import kernel_signature, pack_args
from vxpu.ir.types import i32, ptr_global
b = KernelBuilder("k", [("n", i32), ("p", ptr_global)])
b.set_block(b.block("entry"))
b.ret()
blob = pack_args(kernel_signature(b.finish()), [-1, 0x1000])
assert blob == bytes.fromhex("ffffffff00000000" "0010000000000000"), blob.hex()
outside = sorted(m.__name__ for m in list(sys.modules.values())
                 if m.__name__.startswith("vxpu") and not (m.__file__ or "").startswith(root))
print(json.dumps({"imported": names, "outside": outside}))
"""


def _run(argv: list[str | Path], cwd: Path) -> str:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"{argv[:4]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_wheel_install_builds_a_guest_tree_that_imports_alone(tmp_path: Path) -> None:
    src, dist, env, tree = tmp_path / "src", tmp_path / "dist", tmp_path / "venv", tmp_path / "guest"
    shutil.copytree(REPO, src, symlinks=True, ignore=IGNORE)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src],
         tmp_path)
    wheels = list(dist.glob("vxpu-*.whl"))
    assert len(wheels) == 1, wheels
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheels[0]], tmp_path)

    report = json.loads(_run([python, "-I", "-c", ASSEMBLE, tree], tmp_path))
    assert report["vxpu"].startswith(str(env)), report["vxpu"]  # the wheel, not the checkout
    # the accelerator's native fast lane is built from its C sources at first use: package data
    for name in ("fastlane.h", "fastlane.c", "fastpoll.c"):
        assert (Path(report["vxpu"]).parent / "vfio_server" / "xpu" / "native" / name).is_file(), name
    assert report["kernels"] == sorted(p.name for p in (REPO / "ir" / "sample_kernels").glob("*.vxir"))
    for rel in ("vxpu/__init__.py", "vxpu/errors.py", "vxpu/abi/testdev.py", "vxpu/guest/__init__.py",
                "vxpu/ir/__init__.py", "vxpu/ir/args.py"):
        assert f"{SITE}/{rel}" in report["files"], rel

    alone = json.loads(_run([python, "-I", "-S", "-c", IMPORT_ALONE, tree / SITE], tmp_path))
    assert alone["outside"] == []
    assert "vxpu.guest.selftest" in alone["imported"] and "vxpu.abi.testdev" in alone["imported"]


# Run by the editable install's venv: every layer resolves into the source tree it was made from.
EDITABLE = """
import json, sys
from importlib import resources
import vxpu, vxpu.accel.backend, vxpu.ir.args, vxpu.images.guest, vxpu.abi.testdev
files = vxpu.images.guest.guest_files()
kernels = sorted(p.name for p in resources.files("vxpu.ir").joinpath("sample_kernels").iterdir())
print(json.dumps({"files": [m.__file__ for m in (vxpu, vxpu.accel.backend, vxpu.ir.args, vxpu.images.guest)],
                  "guest_files": len(files), "kernels": kernels}))
"""


def test_editable_install_maps_every_layer_folder(tmp_path: Path) -> None:
    src, dist, env = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    shutil.copytree(REPO, src, symlinks=True, ignore=IGNORE)
    dist.mkdir()
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_editable(sys.argv[1]))")
    name = _run([sys.executable, "-c", build, dist], src).strip().splitlines()[-1]
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", dist / name], tmp_path)
    report = json.loads(_run([python, "-I", "-c", EDITABLE], tmp_path))
    core, accel, ir, images = report["files"]
    assert core == str(src / "vxpu" / "__init__.py") and accel == str(src / "accel" / "backend.py")
    assert ir == str(src / "ir" / "args.py") and images == str(src / "vm-images" / "guest.py")
    assert report["guest_files"] > 20 and "saxpy.vxir" in report["kernels"]
