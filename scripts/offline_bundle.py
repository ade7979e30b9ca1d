"""Pack vxpu's cached QEMU and guest image for a machine without network (e.g. a GPU box).

    python scripts/offline_bundle.py OUT.tar.xz
    # there:  mkdir -p "$VXPU_CACHE" && tar -xJf OUT.tar.xz -C "$VXPU_CACHE"

The archive has the layout of ``$VXPU_CACHE`` (default ``~/.cache/vxpu``):

* ``qemu-<version>/``: the cached Debian QEMU prefix trimmed to what ``vxpu demo`` and
  ``vxpu vm run`` use: ``qemu-system-x86_64``, the loader and the shared libraries it loads
  (resolved through that loader), the x86 firmware (SeaBIOS, the option ROMs for direct kernel
  boot, the default VGA BIOS) and the completion marker;
* ``guest/current`` and ``guest/base-<key>/``: the guest kernel (bzImage), the base initramfs and
  its manifest. The vxpu overlay is rebuilt there from the installed vxpu (a few hundred kB).

The machine needs Python >= 3.11 with vxpu (and qemu.qmp) installed; ``vxpu demo`` then uses the
cached image when no Debian mirror answers.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from pathlib import Path

from vxpu.images.guest import _guest_root, cached_image
from vxpu.images.qemu import cache_dir, cached_qemu

LIBDIR = "usr/lib/x86_64-linux-gnu"
FIRMWARE = ("usr/share/seabios/bios-256k.bin", "usr/share/qemu/linuxboot_dma.bin", "usr/share/qemu/pvh.bin",
            "usr/share/qemu/kvmvapic.bin", "usr/share/qemu/vgabios-stdvga.bin", "usr/share/seabios/vgabios-stdvga.bin")


def qemu_files(prefix: Path) -> list[Path]:
    """The trimmed prefix's files, relative to ``prefix``."""
    loader = prefix / LIBDIR / "ld-linux-x86-64.so.2"
    binary = prefix / "usr/bin/qemu-system-x86_64"
    out = subprocess.run([str(loader), "--library-path", str(prefix / LIBDIR), "--list", str(binary)],
                         capture_output=True, text=True, check=True).stdout
    files = {Path("usr/bin/qemu-system-x86_64"), Path(LIBDIR) / "ld-linux-x86-64.so.2"}
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > 2 and parts[2].startswith(str(prefix)):
            files.add(Path(parts[2]).relative_to(prefix))
    files |= {Path(f) for f in FIRMWARE if (prefix / f).exists()}
    files |= {p.relative_to(prefix) for p in prefix.glob(".vxpu-*")}
    return sorted(files)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python scripts/offline_bundle.py OUT.tar.xz", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    qemu, image = cached_qemu(), cached_image()
    if qemu is None or image is None:
        print("no cached QEMU or guest image: run 'vxpu image build' first", file=sys.stderr)
        return 2
    prefix = qemu.path.parents[2]
    base = image.kernel.parent
    with tarfile.open(sys.argv[1], "w:xz", preset=6, dereference=True) as tar:
        for rel in qemu_files(prefix):
            tar.add(prefix / rel, f"{prefix.name}/{rel}")    # dereference: sonames become files
        tar.add(_guest_root() / "current", "guest/current")
        for name in ("vmlinuz", "base.cpio", "manifest.json"):
            tar.add(base / name, f"guest/{base.name}/{name}")
    size = Path(sys.argv[1]).stat().st_size
    print(f"{sys.argv[1]}: {size / 2**20:.1f} MiB in {time.monotonic() - t0:.0f} s "
          f"(QEMU {qemu.version_str} from {prefix}, guest {base.name}; cache {cache_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
