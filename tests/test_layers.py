"""The layer graph, read from every import (lazy ones inside functions included) with ``ast``.

ARCHITECTURE.md: layers import only downward. ``ir`` knows only the core (``vxpu/``);
``accel`` knows ``ir``; ``vfio_server`` knows ``accel`` and ``ir``; ``qmp``, ``guest`` and
``vm-images`` sit above. The ABI package ``vxpu.abi`` is stdlib-only and any layer may use it.
The guest imports only the ABI, the stdlib-only IR core and the standard library (numpy
optional). No module imports another module's ``_private`` names.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

from vxpu.images.guest import guest_files

from vxpu.imports import ImportRef, imports_of

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("vxpu_setup", REPO / "setup.py")
assert _spec is not None and _spec.loader is not None
_setup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_setup)
LAYERS: dict[str, str] = _setup.LAYERS

SUBLAYERS = ("vfio_server", "accel", "ir", "qmp", "guest", "images", "abi")
# What each layer may import (besides itself, the standard library and third-party packages).
ALLOWED = {
    "core": set(),
    "abi": set(),
    "ir": {"core"},
    "accel": {"ir", "core", "abi"},
    "vfio_server": {"accel", "ir", "core", "abi"},
    "qmp": {"vfio_server", "accel", "ir", "core", "abi"},
    "images": {"qmp", "vfio_server", "accel", "ir", "core", "abi", "guest"},
    "guest": {"ir", "core", "abi"},   # narrowed further by test_guest_imports_only_abi_ir_core_stdlib
    "guest-host": {"guest", "vfio_server", "accel", "ir", "core", "abi"},
}
# The host side of the guest SDK (Device.local): it drives a vxpu server through the vfio-user
# client, runs only on the host and is kept out of the guest image (vm-images GUEST_EXCLUDE).
GUEST_HOST = {"vxpu.guest.local"}
# Lazy edges into it that the rules allow: Device.local() on the host (in a guest the module is
# absent and the call fails with ImportError).
LAZY_EXCEPTIONS = {("vxpu.guest.sdk", "vxpu.guest.local")}


@functools.cache
def _image_modules() -> frozenset[str]:
    """Dotted names of the .py modules in the guest image."""
    return frozenset(rel.split("dist-packages/")[1].removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                     for rel in guest_files() if rel.endswith(".py"))


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the installed package: dotted name -> (file, is a package)."""
    out = {}
    for package, folder in LAYERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            name = ".".join([package] + (parts[:-1] if is_pkg else parts))
            out[name] = (path, is_pkg)
    return out


MODULES = _modules()
IMPORTS = {name: imports_of(path.read_text(), name, is_pkg) for name, (path, is_pkg) in MODULES.items()}


def layer(name: str) -> str:
    """The layer of a vxpu module name."""
    if name in GUEST_HOST:
        return "guest-host"
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBLAYERS else "core"


def _vxpu(ref: ImportRef) -> bool:
    return ref.module == "vxpu" or ref.module.startswith("vxpu.")


def _where(name: str, ref: ImportRef) -> str:
    return f"{MODULES[name][0].relative_to(REPO)}:{ref.line} imports {ref.module}{'  (lazy)' if ref.lazy else ''}"


def test_every_layer_folder_is_read() -> None:
    assert {layer(name) for name in MODULES} >= {"core", "abi", "ir", "accel", "vfio_server", "qmp", "guest",
                                                 "images"}
    assert sum(len(refs) for refs in IMPORTS.values()) > 500


def test_no_back_edges() -> None:
    bad = []
    for name, refs in IMPORTS.items():
        here = layer(name)
        for ref in refs:
            if _vxpu(ref) and ref.module != "vxpu":  # "from vxpu import __version__" is the core
                there = layer(ref.module)
                if ref.lazy and (name, ref.module) in LAZY_EXCEPTIONS:
                    continue
                if there != here and there not in ALLOWED[here]:
                    bad.append(f"{here} -> {there}: {_where(name, ref)}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_private_reach_ins() -> None:
    bad = []
    for name, refs in IMPORTS.items():
        for ref in refs:
            if not _vxpu(ref):
                continue
            private = [n for n in ref.names if n.startswith("_") and not n.startswith("__")]
            segments = [s for s in ref.module.split(".") if s.startswith("_") and not s.startswith("__")]
            if private or segments:
                bad.append(f"{_where(name, ref)} {private or segments}")
    assert not bad, "imports of another module's private names:\n" + "\n".join(bad)


def test_guest_imports_only_abi_ir_core_stdlib() -> None:
    ir_core = {name for name in _image_modules() if name.startswith("vxpu.ir")}
    assert {"vxpu.ir", "vxpu.ir.args", "vxpu.ir.builder", "vxpu.ir.binary"} <= ir_core
    bad = []
    for name, refs in IMPORTS.items():
        if layer(name) != "guest":
            continue
        for ref in refs:
            top = ref.module.split(".")[0]
            if ref.lazy and (name, ref.module) in LAZY_EXCEPTIONS:
                continue
            if _vxpu(ref):
                ok = (ref.module in ir_core or layer(ref.module) in ("guest", "abi")
                      or ref.module in ("vxpu", "vxpu.errors", "vxpu.log"))
            else:
                ok = top in sys.stdlib_module_names or top == "numpy"
            if not ok:
                bad.append(_where(name, ref))
    assert not bad, "guest imports beyond the ABI, the IR core and the standard library:\n" + "\n".join(bad)


def test_ir_core_in_the_guest_image_is_stdlib_only() -> None:
    ir_core = sorted(name for name in _image_modules() if name.startswith("vxpu.ir"))
    bad = [_where(name, r) for name in ir_core for r in IMPORTS[name]
           if not _vxpu(r) and r.module.split(".")[0] not in sys.stdlib_module_names]
    assert not bad, "the IR core in the guest image needs more than the standard library:\n" + "\n".join(bad)
