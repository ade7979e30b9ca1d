"""Private apt: resolve and download Debian packages without touching the host's apt state.

An :class:`AptRepo` gives apt its own sources list (Debian trixie + trixie-backports on the
host's configured Debian mirror), its own ``Dir::State::Lists``, an empty ``Dir::State::status``
and its own ``Dir::Cache``, all under one cache folder, and verifies the archive with the host's
Debian archive keyring. apt is used only to resolve names, versions and URIs; the .debs are
fetched here (parallel, with progress, SHA256-checked) and unpacked with ``dpkg-deb -x``.
No root is needed and the system's apt is never changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vxpu.images.errors import ImageError
from vxpu.images.progress import Progress, note

log = logging.getLogger(__name__)

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_SUITES = ("trixie", "trixie-backports")
LISTS_MAX_AGE_S = 24 * 3600
_URI_LINE = re.compile(r"^'(?P<url>[^']+)' (?P<file>\S+) (?P<size>\d+) (?P<algo>[A-Za-z0-9]+):(?P<hash>[0-9a-f]+)$")


@dataclass(frozen=True)
class DebRef:
    """One downloadable .deb as resolved by apt."""

    name: str
    version: str
    filename: str
    url: str
    size: int
    sha256: str


def host_debian_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host's apt uses (``VXPU_DEBIAN_MIRROR`` overrides it).

    Falls back to deb.debian.org when the host is not Debian (e.g. Ubuntu).
    """
    env = os.environ.get("VXPU_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list")),
             *sorted((etc / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for m in re.finditer(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S+)", text, re.MULTILINE):
            uri = m.group(1).rstrip("/")
            if uri.startswith(("http://", "https://")) and uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def _apt_tool(name: str, fix: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageError(f"{name} not found: {fix}")
    return path


class AptRepo:
    """A private apt configuration rooted at ``root``.

    Args:
        root: cache folder holding the sources list, lists, status and cache.
        suites: Debian suites to enable (main component).
        mirror: Debian mirror URL; the host's by default.
        keyring: the Debian archive keyring that signs those suites.
        missing_apt_fix: the advice given when apt-get is not installed.
        offline_fix: extra advice when the mirror cannot be reached.
        retries: how often apt retries a failed index download.
        quiet: no progress output.

    Raises:
        ImageError: apt-get is missing, or the keyring is missing.
    """

    def __init__(self, root: Path, suites: Sequence[str] = DEFAULT_SUITES, mirror: str | None = None,
                 keyring: Path = DEFAULT_KEYRING, missing_apt_fix: str = "install apt",
                 offline_fix: str = "", retries: int = 3, quiet: bool = False) -> None:
        self.root = root
        self.mirror = mirror or host_debian_mirror()
        self.suites = tuple(suites)
        self.quiet = quiet
        self._offline_fix = offline_fix
        self._retries = retries
        self._apt_get = _apt_tool("apt-get", missing_apt_fix)
        self._apt_cache = _apt_tool("apt-cache", missing_apt_fix)
        if not keyring.is_file():
            raise ImageError(f"Debian archive keyring {keyring} not found: install it with "
                             "'apt-get install debian-archive-keyring'")
        for sub in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d",
                    "etc/apt.conf.d"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "status").touch()
        sources = "".join(f"deb [signed-by={keyring}] {self.mirror} {suite} main\n" for suite in self.suites)
        src = root / "etc/sources.list"
        if not src.exists() or src.read_text() != sources:
            src.write_text(sources)
            for stale in (root / "lists").glob("*_*"):
                stale.unlink()

    def _options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc::sourcelist": r / "etc/sources.list",
            "Dir::Etc::sourceparts": r / "etc/sources.list.d",
            "Dir::Etc::preferences": r / "etc/preferences",
            "Dir::Etc::preferencesparts": r / "etc/preferences.d",
            "Dir::State::Lists": r / "lists",
            "Dir::State::status": r / "status",
            "Dir::State::extended_states": r / "extended_states",
            "Dir::Cache": r / "cache",
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "APT::Architecture": "amd64",
            "APT::Architectures::": "amd64",
            "APT::Install-Recommends": "false",
            "Acquire::Languages": "none",
            "Debug::NoLocking": "1",
            "Acquire::Retries": str(self._retries),
        }
        return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]

    def _run(self, tool: str, args: Sequence[str], what: str) -> str:
        cmd = [tool, *self._options(), *args]
        log.debug("apt: %s", " ".join(cmd))
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False, text=True, cwd=self.root)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip()[-1500:]
            raise ImageError(f"apt could not {what} (rc {res.returncode}): {tail}")
        return res.stdout

    def update(self, max_age_s: float = LISTS_MAX_AGE_S) -> None:
        """Fetch the package lists unless they are younger than ``max_age_s``.

        Raises:
            ImageError: the mirror is unreachable or the signatures do not verify.
        """
        lists = list((self.root / "lists").glob("*_Packages*"))
        if len(lists) >= len(self.suites) and time.time() - min(p.stat().st_mtime for p in lists) < max_age_s:
            return
        note(f"updating Debian package lists from {self.mirror} ({', '.join(self.suites)})", self.quiet)
        cmd = [self._apt_get, *self._options(), "-q", "update"]
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False, text=True, cwd=self.root)
        failed = re.findall(r"^(?:E|W): .*", res.stdout + res.stderr, re.MULTILINE)
        if res.returncode != 0 or any(("Failed to fetch" in f or "NO_PUBKEY" in f) for f in failed):
            raise ImageError(f"could not download Debian package lists from {self.mirror}: "
                             f"{'; '.join(failed)[-1200:] or res.stderr[-1200:]}. Check the network, or set "
                             f"VXPU_DEBIAN_MIRROR to a reachable Debian mirror{self._offline_fix}")

    def depends(self, spec: str) -> list[str]:
        """Direct ``Depends`` of ``spec`` (``name`` or ``name/suite``)."""
        out = self._run(self._apt_cache, ["depends", "--no-recommends", "--no-suggests", spec],
                        f"list the dependencies of {spec}")
        return re.findall(r"^\s+\|?Depends: (\S+)", out, re.MULTILINE)

    def closure(self, packages: Sequence[str], target_release: str | None = None) -> list[str]:
        """Resolve the whole dependency closure of ``packages`` as ``name=version`` specs.

        Raises:
            ImageError: a package does not exist or cannot be resolved.
        """
        args = ["install", "--print-uris", "-qq", "-y"]
        if target_release:
            args += ["-t", target_release]
        out = self._run(self._apt_get, [*args, *packages], f"resolve {' '.join(packages)}")
        specs = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and line.startswith("'"):
                name, version, _ = parts[1].split("_", 2)
                specs.append(f"{name}={urllib.parse.unquote(version)}")
        if not specs:
            raise ImageError(f"apt resolved nothing for {' '.join(packages)}")
        return specs

    def resolve(self, specs: Sequence[str]) -> list[DebRef]:
        """URIs, sizes and SHA256 sums for exact ``name=version`` or ``name/suite`` specs.

        Raises:
            ImageError: a spec is unknown.
        """
        out = self._run(self._apt_get, ["download", "--print-uris", "-qq", *specs],
                        f"find {' '.join(specs)}")
        refs = []
        for line in out.splitlines():
            m = _URI_LINE.match(line.strip())
            if not m:
                continue
            if m.group("algo").upper() != "SHA256":
                raise ImageError(f"apt offered only {m.group('algo')} for {m.group('file')}; need SHA256")
            name, version, _ = m.group("file").split("_", 2)
            refs.append(DebRef(name, urllib.parse.unquote(version), m.group("file"), m.group("url"),
                               int(m.group("size")), m.group("hash")))
        if len(refs) != len(specs):
            raise ImageError(f"apt resolved {len(refs)} of {len(specs)} packages ({' '.join(specs)})")
        return refs

    def download(self, refs: Iterable[DebRef], dest: Path | None = None) -> list[Path]:
        """Download ``refs`` into ``dest`` (the private archive cache), reusing verified files.

        Raises:
            ImageError: a download failed or its SHA256 does not match.
        """
        dest = dest or self.root / "cache/archives"
        dest.mkdir(parents=True, exist_ok=True)
        refs = list(refs)
        todo = [r for r in refs if not _verified(dest / r.filename, r)]
        if todo:
            total = sum(r.size for r in todo)
            with Progress(f"downloading {len(todo)} packages", total, quiet=self.quiet) as prog, \
                    ThreadPoolExecutor(max_workers=4) as pool:
                for _ in pool.map(lambda r: _fetch(r, dest, prog), todo):
                    pass
        return [dest / r.filename for r in refs]


def _verified(path: Path, ref: DebRef) -> bool:
    if not path.is_file() or path.stat().st_size != ref.size:
        return False
    return _sha256(path) == ref.sha256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(ref: DebRef, dest: Path, prog: Progress, attempts: int = 3) -> None:
    tmp = dest / f".{ref.filename}.part"
    for attempt in range(1, attempts + 1):
        got = 0
        try:
            with urllib.request.urlopen(ref.url, timeout=60) as resp, tmp.open("wb") as out:
                h = hashlib.sha256()
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    prog.advance(len(chunk))
            if h.hexdigest() != ref.sha256:
                raise ImageError(f"{ref.filename}: SHA256 mismatch (got {h.hexdigest()}, apt says "
                                 f"{ref.sha256}); the mirror may be inconsistent, retry later")
            tmp.replace(dest / ref.filename)
            return
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            prog.advance(-got)
            if attempt == attempts:
                raise ImageError(f"could not download {ref.url}: {exc}. Check the network or set "
                                 "VXPU_DEBIAN_MIRROR") from exc
            log.debug("retrying %s after %s", ref.url, exc)
            time.sleep(attempt)
        finally:
            tmp.unlink(missing_ok=True)


def unpack(debs: Sequence[Path], prefix: Path, quiet: bool = False, stage: str = "unpacking") -> None:
    """Unpack ``debs`` into ``prefix`` with ``dpkg-deb -x`` (no root, no maintainer scripts).

    Raises:
        ImageError: dpkg-deb is missing or a package does not unpack.
    """
    dpkg_deb = _apt_tool("dpkg-deb", "install dpkg (it ships dpkg-deb)")
    prefix.mkdir(parents=True, exist_ok=True)
    with Progress(stage, len(debs), unit="packages", quiet=quiet) as prog:
        for deb in debs:
            res = subprocess.run([dpkg_deb, "-x", str(deb), str(prefix)], stdin=subprocess.DEVNULL,
                                 capture_output=True, check=False, text=True)
            if res.returncode != 0:
                raise ImageError(f"dpkg-deb -x {deb.name} failed: {res.stderr.strip()[-500:]}; "
                                 "delete the cache folder and retry")
            prog.advance(1)
