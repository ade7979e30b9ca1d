"""The guest image: a Debian trixie kernel plus an initramfs with busybox, python3.13, numpy and vxpu.

The image is built from Debian packages without root: the kernel (``linux-image-6.12.*-amd64``,
whose bzImage boots as is), ``busybox-static``, python3.13 (minimal + stdlib), numpy with its
BLAS/LAPACK libraries (:mod:`vxpu.images.pydeps`) and the libraries they need. A *base* archive
holds everything that comes from Debian: merged-usr symlinks, busybox and its applet links,
python3 with a trimmed stdlib (the import closure of :data:`GUEST_STDLIB` and of numpy,
precompiled), numpy (trimmed, precompiled), and ``/init``. It is cached under a key made of the
package versions. The vxpu guest package (``vxpu.guest`` plus the shared device ABI modules)
goes into a small *overlay* archive, keyed by the files' hashes and appended to the base, so
editing guest code rebuilds only a few kilobytes.

``/init`` mounts proc, sysfs, devtmpfs and a tmpfs, reads the payload command from the kernel
command line (``vxpu_cmd=<base64>``), runs it, prints ``VXPU-EXIT <rc>`` and powers off.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from vxpu.images import pydeps
from vxpu.images.apt import AptRepo, unpack
from vxpu.images.cpio import CpioWriter
from vxpu.images.errors import ImageError
from vxpu.images.progress import Progress, note
from vxpu.images.qemu import cache_dir, cache_lock

from vxpu.imports import ImportRef, imports_of

log = logging.getLogger(__name__)

SUITE = "trixie"
KERNEL_META = "linux-image-amd64"
GUEST_PACKAGES = ("busybox-static", "python3.13-minimal", "libpython3.13-minimal", "libpython3.13-stdlib",
                  "libc6", "zlib1g", "libexpat1", "libffi8", *pydeps.PACKAGES)
# Stdlib modules guest code may use; the image carries their import closure.
GUEST_STDLIB = ("argparse", "array", "base64", "binascii", "collections", "contextlib", "ctypes", "dataclasses",
                "enum", "errno", "fcntl", "functools", "glob", "hashlib", "io", "itertools", "json", "logging",
                "math", "mmap", "os", "pathlib", "random", "re", "resource", "select", "selectors", "signal",
                "socket", "statistics", "struct", "subprocess", "sys", "tempfile", "textwrap", "threading",
                "time", "traceback", "typing", "weakref", "zlib", "encodings.ascii", "encodings.latin_1",
                "encodings.utf_8", "runpy", "__future__", "abc", "copy", "heapq", "bisect", "operator",
                # package data (importlib.resources.files) for regular and namespace packages
                "importlib.resources", "importlib.resources.readers", "importlib.resources._adapters",
                "importlib.readers")
GUEST_LIBS = ("ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1", "libffi.so.8")
# The vxpu modules in the image: the import closure (every import, lazy ones included) of every
# module in GUEST_TREES and of GUEST_MODULES. That is the guest package, the ABI package, the
# core modules they use (vxpu.errors ...) and the stdlib-only IR core (builder, text, encoder,
# verifier, argument layout); all stdlib-only. Files are read as package data
# (importlib.resources), so an installed wheel builds the same image as a checkout.
GUEST_TREES = ("vxpu.guest", "vxpu.abi")
GUEST_MODULES = ("vxpu.ir", "vxpu.ir.args")
# Host-only modules inside those trees, never in the image (nor their imports): the host
# transport drives a vxpu serve child through the vfio-user client (vxpu.vfio_server).
GUEST_EXCLUDE = ("vxpu.guest.local",)
# Package data the guest programs read (importlib.resources): package -> file suffix.
GUEST_DATA = {"vxpu.ir.sample_kernels": ".vxir"}
BASE_FORMAT = 2  # bump when the base layout changes (2: numpy)
PY = "python3.13"
CMDLINE_KEY = "vxpu_cmd"

INIT_MARKER = "vxpu guest: init"
INIT_SCRIPT = f"""#!/bin/sh
echo "{INIT_MARKER}"
export PATH=/usr/bin:/usr/sbin HOME=/root PYTHONPATH=/usr/lib/python3/dist-packages PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/hugepages && mount -t hugetlbfs hugetlbfs /dev/hugepages 2>/dev/null
cmd=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in {CMDLINE_KEY}=*) cmd=$(echo "${{arg#{CMDLINE_KEY}=}}" | base64 -d) ;; esac
done
if [ -n "$cmd" ]; then
  sh -c "$cmd"
  echo "VXPU-EXIT $?"
else
  echo "vxpu guest: no {CMDLINE_KEY} on the kernel command line; starting a shell (exit powers off)"
  setsid cttyhack sh
fi
sync
poweroff -f
"""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: kernel, initramfs and what went into them."""

    kernel: Path
    initrd: Path
    vmlinux: Path | None
    packages: tuple[str, ...]
    base_key: str
    overlay_key: str

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def encode_cmd(cmd: str) -> str:
    """The kernel command-line parameter that makes /init run ``cmd``."""
    return f"{CMDLINE_KEY}={base64.b64encode(cmd.encode()).decode()}"


def _guest_root() -> Path:
    return cache_dir() / "guest"


def guest_files() -> dict[str, bytes]:
    """The overlay content: path inside the image -> bytes (the vxpu modules of the guest).

    The modules are the import closure of :data:`GUEST_TREES` and :data:`GUEST_MODULES`, each
    parent package's ``__init__.py`` included, minus :data:`GUEST_EXCLUDE`, plus the data files
    of :data:`GUEST_DATA`; all read through :mod:`importlib.resources`.

    Raises:
        ImageError: a module the closure names is not installed (an incomplete vxpu install).
    """
    site = "usr/lib/python3/dist-packages"
    files: dict[str, bytes] = {}
    todo = [name for tree in GUEST_TREES for name in _package_modules(tree)] + list(GUEST_MODULES)
    while todo:
        name = todo.pop()
        path = "/".join(name.split(".")) + ("/__init__.py" if _is_package(name) else ".py")
        if f"{site}/{path}" in files or name in GUEST_EXCLUDE:
            continue
        source = _source(name).read_bytes()
        files[f"{site}/{path}"] = source
        parent = name.rpartition(".")[0]
        todo += [parent] if parent else []
        for ref in imports_of(source.decode(), name, _is_package(name)):
            todo += [m for m in _vxpu_modules(ref) if f"{site}/{m.replace('.', '/')}" not in files]
    for package, suffix in GUEST_DATA.items():
        for entry in resources.files(package).iterdir():
            if entry.is_file() and entry.name.endswith(suffix):
                files[f"{site}/{package.replace('.', '/')}/{entry.name}"] = entry.read_bytes()
    return dict(sorted(files.items()))


def _is_package(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return False
    return spec is not None and spec.submodule_search_locations is not None


def _source(name: str) -> Traversable:
    parent, _, last = name.rpartition(".")
    if _is_package(name):
        src = resources.files(name).joinpath("__init__.py")
    else:
        src = resources.files(parent).joinpath(f"{last}.py")
    if not src.is_file():
        raise ImageError(f"the guest image needs {name}, which is not installed; reinstall vxpu")
    return src


def _package_modules(name: str) -> list[str]:
    """``name``, and when it is a package every module in it (sub-packages included)."""
    if not _is_package(name):
        return [name]
    names = [name]
    for entry in resources.files(name).iterdir():
        if entry.is_dir() and entry.joinpath("__init__.py").is_file():
            names += _package_modules(f"{name}.{entry.name}")
        elif entry.name.endswith(".py") and entry.name != "__init__.py":
            names.append(f"{name}.{entry.name[:-3]}")
    return names


def _vxpu_modules(ref: ImportRef) -> list[str]:
    """The vxpu modules an import names: the module, and each imported name that is a submodule."""
    if ref.module != "vxpu" and not ref.module.startswith("vxpu."):
        return []
    subs = [f"{ref.module}.{n}" for n in ref.names if _is_package(ref.module) and _exists(f"{ref.module}.{n}")]
    return [ref.module, *subs]


def _exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _resolve(apt: AptRepo) -> list:
    kernels = [d for d in apt.depends(f"{KERNEL_META}/{SUITE}") if d.startswith("linux-image-")]
    if not kernels:
        raise ImageError(f"{KERNEL_META} in {SUITE} names no kernel package; check the mirror")
    return apt.resolve([f"{kernels[0]}/{SUITE}", *(f"{p}/{SUITE}" for p in GUEST_PACKAGES)])


def _host_python(rootfs: Path) -> list[str]:
    """argv to run the guest's python3.13 on the host through the guest's own loader."""
    lib = rootfs / "usr/lib/x86_64-linux-gnu"
    path = ":".join(str(d) for d in (lib, lib / "blas", lib / "lapack") if d.is_dir())  # dpkg -x runs no alternatives
    return [str(lib / "ld-linux-x86-64.so.2"), "--library-path", path, str(rootfs / "usr/bin" / PY)]


def _host_python_env(rootfs: Path) -> dict[str, str]:
    return {"PYTHONHOME": str(rootfs / "usr"), "PYTHONNOUSERSITE": "1", "LC_ALL": "C", "PATH": "/usr/bin:/bin"}


def _stdlib_closure(stage: Path) -> list[Path]:
    """Files (relative to ``stage``) of the stdlib modules that GUEST_STDLIB and numpy import."""
    script = ("import sys, json\n"
              f"sys.path.append({str(stage / pydeps.DIST)!r})\n"
              f"for m in {GUEST_STDLIB + pydeps.CLOSURE_IMPORTS!r}: __import__(m)\n"
              "print(json.dumps(sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})))")
    res = subprocess.run([*_host_python(stage), "-c", script], env=_host_python_env(stage),
                         capture_output=True, check=False, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise ImageError(f"the guest's python3.13 does not run on this host: {res.stderr.strip()[-800:]}")
    files = []
    for name in json.loads(res.stdout):
        if name and Path(name).is_relative_to(stage):
            files.append(Path(name).relative_to(stage))
    return files


def _populate_rootfs(stage: Path, rootfs: Path) -> None:
    """Copy what the guest needs from the unpacked packages into ``rootfs``."""
    for d in ("usr/bin", "usr/lib/x86_64-linux-gnu", "usr/lib64", f"usr/lib/{PY}/lib-dynload",
              "usr/lib/python3/dist-packages", "proc", "sys", "dev", "tmp", "run", "root", "mnt", "etc"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"),
                         ("usr/sbin", "bin")):
        (rootfs / link).symlink_to(target)
    (rootfs / "usr/lib64/ld-linux-x86-64.so.2").symlink_to("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    for lib in GUEST_LIBS:
        shutil.copy2(stage / "usr/lib/x86_64-linux-gnu" / lib, rootfs / "usr/lib/x86_64-linux-gnu" / lib)
    shutil.copy2(stage / "usr/bin/busybox", rootfs / "usr/bin/busybox")
    applets = subprocess.run([str(stage / "usr/bin/busybox"), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            (rootfs / "usr/bin" / applet).symlink_to("busybox")
    shutil.copy2(stage / "usr/bin" / PY, rootfs / "usr/bin" / PY)
    (rootfs / "usr/bin/python3").symlink_to(PY)
    for rel in _stdlib_closure(stage):
        dst = rootfs / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stage / rel, dst)
    pydeps.add_numpy(stage, rootfs)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "init").write_text(INIT_SCRIPT)
    (rootfs / "init").chmod(0o755)
    for tree in (f"usr/lib/{PY}", f"{pydeps.DIST}/numpy"):
        res = subprocess.run([*_host_python(stage), "-m", "compileall", "-q", "-j1", "--invalidation-mode",
                              "unchecked-hash", "-d", f"/{tree}", str(rootfs / tree)],
                             env=_host_python_env(stage), capture_output=True, check=False, text=True,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise ImageError(f"precompiling {tree} for the guest failed: {res.stdout[-500:]}{res.stderr[-500:]}")


def _extract_vmlinux(bzimage: Path, out: Path) -> bool:
    """Decompress the ELF vmlinux (zstd payload) from a bzImage for a faster PVH boot."""
    zstd = shutil.which("zstd")
    data = bzimage.read_bytes()
    pos = data.find(b"\x28\xb5\x2f\xfd")
    if zstd is None or pos < 0:
        return False
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as f:
        subprocess.run([zstd, "-d", "-q", "-c"], input=data[pos:], stdout=f, stderr=subprocess.DEVNULL, check=False)
    elf = tmp.read_bytes()[:4] == b"\x7fELF" and tmp.stat().st_size > 1 << 20
    if elf:
        tmp.replace(out)
    else:
        tmp.unlink()
    return elf


def _build_base(apt: AptRepo, refs: list, base: Path, quiet: bool) -> None:
    debs = apt.download(refs)
    work = base.with_name(base.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    stage, rootfs = work / "stage", work / "rootfs"
    unpack(debs, stage, quiet=quiet, stage="unpacking guest packages")
    with Progress("assembling the guest initramfs", quiet=quiet):
        _populate_rootfs(stage, rootfs)
        kernel = next((stage / "boot").glob("vmlinuz-*"))
        shutil.copy2(kernel, work / "vmlinuz")
        _extract_vmlinux(work / "vmlinuz", work / "vmlinux")
        with (work / "base.cpio").open("wb") as f:
            w = CpioWriter(f)
            w.char_device("dev/console", 5, 1)
            w.char_device("dev/null", 1, 3, 0o666)
            w.tree(rootfs)
            w.close()
    shutil.rmtree(stage)
    (work / "manifest.json").write_text(json.dumps({"packages": sorted(f"{r.name}={r.version}" for r in refs)}))
    shutil.rmtree(base, ignore_errors=True)
    work.rename(base)


def _overlay(base: Path) -> tuple[Path, str]:
    """Build (or reuse) ``initrd-<key>.cpio`` = base archive + the vxpu overlay archive."""
    files = guest_files()
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    key = h.hexdigest()[:16]
    initrd = base / f"initrd-{key}.cpio"
    if initrd.exists():
        return initrd, key
    tmp = initrd.with_suffix(".tmp")
    with tmp.open("wb") as f:
        with (base / "base.cpio").open("rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
        w = CpioWriter(f)
        dirs = sorted({str(Path(n).parent) for n in files} | {"usr/lib/python3/dist-packages/vxpu"})
        for d in dirs:
            w.directory(d)
        for name, data in sorted(files.items()):
            w.file(name, data)
        w.close()
    tmp.replace(initrd)
    old = sorted(base.glob("initrd-*.cpio"), key=lambda p: p.stat().st_mtime)
    for stale in old[:-3]:
        stale.unlink(missing_ok=True)
    return initrd, key


def _image(base: Path, key: str) -> GuestImage:
    initrd, okey = _overlay(base)
    manifest = json.loads((base / "manifest.json").read_text())
    vmlinux = base / "vmlinux"
    return GuestImage(base / "vmlinuz", initrd, vmlinux if vmlinux.exists() else None,
                      tuple(manifest["packages"]), key, okey)


def build_image(force: bool = False, quiet: bool = False) -> GuestImage:
    """Resolve the guest packages, then build whatever part of the image is out of date.

    Args:
        force: rebuild the base archive even if it is cached.
        quiet: no progress output.

    Raises:
        ImageError: apt, the network or the keyring is missing, or a package does not unpack.
    """
    root = _guest_root()
    with cache_lock("guest"):
        apt = AptRepo(cache_dir() / "apt", quiet=quiet)
        try:
            apt.update()
        except ImageError:
            if not list((apt.root / "lists").glob("*_Packages*")):
                raise
            log.warning("could not refresh the Debian package lists; using the cached ones")
        refs = _resolve(apt)
        pkgs = sorted(f"{r.name}={r.version}" for r in refs)
        key = hashlib.sha256(json.dumps([BASE_FORMAT, pkgs, GUEST_STDLIB, INIT_SCRIPT]).encode()).hexdigest()[:16]
        base = root / f"base-{key}"
        if force or not (base / "manifest.json").exists():
            _build_base(apt, refs, base, quiet)
        else:
            note(f"guest base image up to date ({base})", quiet)
        (root / "current").write_text(base.name)
        return _image(base, key)


def cached_image() -> GuestImage | None:
    """The most recently built image without asking apt (refreshing only the vxpu overlay),
    or None when none was built; for machines without a Debian mirror."""
    pointer = _guest_root() / "current"
    if not pointer.exists():
        return None
    base = _guest_root() / pointer.read_text().strip()
    if not (base / "manifest.json").exists():
        return None
    with cache_lock("guest"):
        return _image(base, base.name.removeprefix("base-"))


def current_image(quiet: bool = False) -> GuestImage:
    """The most recently built image (refreshing only the vxpu overlay), or build one.

    Raises:
        ImageError: as :func:`build_image`, when no image has been built yet.
    """
    return cached_image() or build_image(quiet=quiet)
