"""Find a QEMU that has ``vfio-user-pci`` (≥ 10.1), or fetch one from Debian.

Order: an explicit path (``--qemu`` or ``VXPU_QEMU``), the system ``qemu-system-x86_64``,
a QEMU already fetched into the cache, and finally a fresh fetch of Debian trixie-backports'
``qemu-system-x86`` with its whole dependency closure. The fetched build needs a newer glibc
than older hosts have, so it runs through its own dynamic loader from a private prefix::

    <prefix>/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path <libs> \\
        <prefix>/usr/bin/qemu-system-x86_64 -L <prefix>/usr/share/qemu -L <prefix>/usr/share/seabios

A :class:`QemuBinary` carries that argv prefix and the version, so callers just append arguments.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vxpu.images.apt import AptRepo, unpack
from vxpu.images.errors import ImageError
from vxpu.images.progress import note

from vxpu import paths

log = logging.getLogger(__name__)

MIN_VERSION = (10, 1, 0)
QEMU_PACKAGE = "qemu-system-x86"
QEMU_RELEASE = "trixie-backports"
_MARKER = ".vxpu-complete.json"
_LIBDIR = "usr/lib/x86_64-linux-gnu"
_LOADER = f"{_LIBDIR}/ld-linux-x86-64.so.2"
_NO_APT_FIX = ("install apt or set VXPU_QEMU=/path/to/qemu-system-x86_64 "
               "(QEMU >= 10.1 built with vfio-user-pci)")


cache_dir = paths.cache_dir


@dataclass(frozen=True)
class QemuBinary:
    """A runnable ``qemu-system-x86_64``.

    Attributes:
        path: the QEMU executable itself.
        version: (major, minor, micro).
        argv_prefix: what to exec before QEMU's own arguments (loader, binary, ``-L`` paths).
        source: ``"config"``, ``"system"`` or ``"debian"``.
        env: extra environment variables QEMU needs (module dir of a private prefix).
    """

    path: Path
    version: tuple[int, int, int]
    argv_prefix: tuple[str, ...]
    source: str
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, *args: str) -> list[str]:
        """The full command line for QEMU with ``args``."""
        return [*self.argv_prefix, *args]

    def environ(self) -> dict[str, str]:
        """A process environment for running this QEMU."""
        return {**os.environ, **self.env}

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))


def _probe(argv_prefix: tuple[str, ...], env: dict[str, str]) -> tuple[tuple[int, int, int], bool, str]:
    """Run ``--version`` and ``-device help``: (version, has vfio-user-pci, error text)."""
    full_env = {**os.environ, **env}
    try:
        ver = subprocess.run([*argv_prefix, "--version"], capture_output=True, check=False, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, env=full_env)
        dev = subprocess.run([*argv_prefix, "-machine", "none", "-device", "help"], capture_output=True, check=False,
                             text=True, timeout=30, stdin=subprocess.DEVNULL, env=full_env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return (0, 0, 0), False, str(exc)
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", ver.stdout)
    if ver.returncode != 0 or not m:
        return (0, 0, 0), False, (ver.stderr or ver.stdout).strip()[-300:]
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    return version, '"vfio-user-pci"' in dev.stdout, ""


def _prefix_binary(prefix: Path, source: str) -> QemuBinary:
    """A QemuBinary for a ``dpkg -x`` prefix, run through the prefix's own loader."""
    binary = prefix / "usr/bin/qemu-system-x86_64"
    libdirs = [prefix / _LIBDIR, prefix / "usr/lib/x86_64-linux-gnu/pulseaudio"]
    argv = (str(prefix / _LOADER), "--library-path", ":".join(map(str, libdirs)), str(binary),
            "-L", str(prefix / "usr/share/qemu"), "-L", str(prefix / "usr/share/seabios"))
    env = {"QEMU_MODULE_DIR": str(prefix / _LIBDIR / "qemu")}
    version, has_dev, err = _probe(argv, env)
    if err or not has_dev:
        raise ImageError(f"the QEMU in {prefix} does not run ({err or 'no vfio-user-pci'}); "
                         f"delete {prefix} and retry")
    return QemuBinary(binary, version, argv, source, env)


def _check(binary: QemuBinary | None, what: str) -> QemuBinary:
    if binary is None:
        raise ImageError(f"{what} does not exist")
    return binary


def from_path(path: str | Path, source: str = "config") -> QemuBinary:
    """Validate a user-given QEMU binary (run directly, or through its prefix's loader).

    Raises:
        ImageError: it does not run, is older than 10.1 or lacks vfio-user-pci.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageError(f"QEMU binary {p} does not exist; fix VXPU_QEMU/--qemu or unset it to fetch one")
    version, has_dev, err = _probe((str(p),), {})
    if err:
        prefix = p.resolve().parent.parent.parent
        if (prefix / _LOADER).exists():
            return _prefix_binary(prefix, source)
        raise ImageError(f"QEMU binary {p} does not run: {err}")
    if version < MIN_VERSION or not has_dev:
        raise ImageError(f"QEMU {p} is {'.'.join(map(str, version))}"
                         f"{'' if has_dev else ' without vfio-user-pci'}; vxpu needs >= 10.1 with "
                         "vfio-user-pci. Unset VXPU_QEMU/--qemu to let vxpu fetch one")
    return QemuBinary(p, version, (str(p),), source)


def system_qemu() -> QemuBinary | None:
    """The system ``qemu-system-x86_64`` if it is ≥ 10.1 and has vfio-user-pci, else None."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        return None
    version, has_dev, err = _probe((path,), {})
    if err or version < MIN_VERSION or not has_dev:
        log.info("system QEMU %s is not usable (version %s, vfio-user-pci %s%s)", path,
                 ".".join(map(str, version)), has_dev, f", {err}" if err else "")
        return None
    return QemuBinary(Path(path), version, (path,), "system")


def cached_qemu() -> QemuBinary | None:
    """The newest QEMU already fetched into the cache, or None."""
    found = []
    for marker in cache_dir().glob(f"qemu-*/{_MARKER}"):
        try:
            found.append((json.loads(marker.read_text())["version_tuple"], marker.parent))
        except (OSError, ValueError, KeyError):
            continue
    if not found:
        return None
    return _prefix_binary(max(found)[1], "debian")


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialize provisioning steps across processes (CLI and tests) with an flock."""
    path = cache_dir() / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_qemu(quiet: bool = False) -> QemuBinary:
    """Fetch Debian trixie-backports' QEMU with its closure into ``<cache>/qemu-<version>/``.

    Raises:
        ImageError: apt or the network is missing, or the packages do not unpack.
    """
    with cache_lock("qemu"):
        apt = AptRepo(cache_dir() / "apt", missing_apt_fix=_NO_APT_FIX, quiet=quiet,
                      offline_fix=", or set VXPU_QEMU=/path/to/qemu-system-x86_64 (>= 10.1 with vfio-user-pci)")
        apt.update()
        note(f"resolving {QEMU_PACKAGE} from {QEMU_RELEASE}", quiet)
        refs = apt.resolve(apt.closure([QEMU_PACKAGE], QEMU_RELEASE))
        main = next(r for r in refs if r.name == QEMU_PACKAGE)
        m = re.match(r"(?:\d+:)?(\d+)\.(\d+)\.?(\d*)", main.version)
        if not m:
            raise ImageError(f"cannot parse the QEMU version {main.version!r}")
        version = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
        prefix = cache_dir() / f"qemu-{'.'.join(map(str, version))}"
        if (prefix / _MARKER).exists():
            return _prefix_binary(prefix, "debian")
        debs = apt.download(refs)
        staging = prefix.with_name(prefix.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        unpack(debs, staging, quiet=quiet, stage="unpacking QEMU")
        shutil.rmtree(prefix, ignore_errors=True)
        staging.rename(prefix)
        binary = _prefix_binary(prefix, "debian")
        (prefix / _MARKER).write_text(json.dumps({
            "version": main.version, "version_tuple": list(version),
            "packages": sorted(f"{r.name}={r.version}" for r in refs)}))
        note(f"QEMU {binary.version_str} ready in {prefix}", quiet)
        return binary


def find_qemu(explicit: str | Path | None = None, fetch: bool = True, quiet: bool = False) -> QemuBinary:
    """The QEMU to use: explicit path, ``VXPU_QEMU``, the system one, the cached one, or a fetch.

    Args:
        explicit: a path from ``--qemu``; takes precedence over ``VXPU_QEMU``.
        fetch: allow downloading from Debian when nothing local fits.
        quiet: no progress output.

    Raises:
        ImageError: the configured QEMU is unusable, or nothing fits and fetching failed or is
            not allowed.
    """
    configured = explicit or os.environ.get("VXPU_QEMU")
    if configured:
        return from_path(configured)
    found = system_qemu() or cached_qemu()
    if found:
        log.debug("using %s QEMU %s at %s", found.source, found.version_str, found.path)
        return found
    if not fetch:
        raise ImageError("no QEMU >= 10.1 with vfio-user-pci found; run 'vxpu image build' to fetch one "
                         "or set VXPU_QEMU=/path/to/qemu-system-x86_64")
    return fetch_qemu(quiet)
