"""A writer for the Linux initramfs format: "newc" cpio (``070701``), no root needed.

Entries are written with uid/gid 0 and a fixed mtime, so the same tree always gives the same
bytes. Device nodes (``/dev/console``) can be written without privileges because they are
only header fields. The kernel unpacks concatenated archives in order, and a later entry
replaces an earlier one with the same name, which lets a small archive override a cached base.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Write a newc archive to a binary stream.

    Args:
        out: the destination stream.
        mtime: the modification time stamped on every entry.
    """

    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self._out = out
        self._ino = 1
        self._mtime = mtime
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, self._mtime, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        self._out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory entry (``name`` relative, no leading slash)."""
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with ``data``."""
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link ``name`` -> ``target``."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def tree(self, root: Path, prefix: str = "") -> None:
        """Add everything under ``root`` (sorted; directories before their contents)."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            base = "" if rel_dir == "." else rel_dir + "/"
            if base:
                self.directory(prefix + rel_dir, 0o755)
            for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                self.path(Path(dirpath, name), prefix + base + name)

    def path(self, src: Path, name: str) -> None:
        """Add the file or symlink ``src`` under ``name``."""
        st = src.lstat()
        if stat.S_ISLNK(st.st_mode):
            self.symlink(name, os.readlink(src))
        elif stat.S_ISREG(st.st_mode):
            self.file(name, src.read_bytes(), stat.S_IMODE(st.st_mode))

    def close(self) -> None:
        """Write the trailer (once)."""
        if not self._closed:
            self._entry(_TRAILER, 0, nlink=1)
            self._closed = True
