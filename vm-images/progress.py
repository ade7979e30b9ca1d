"""Progress reporting for long provisioning stages (downloads, unpacking, archiving).

On a terminal a stage shows a live percentage bar on stderr; otherwise (CI logs, pipes) each
stage prints exactly one line when it starts and one when it ends, so logs stay short.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Self, TextIO


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """One stage of work with a known total (bytes or items).

    Args:
        stage: a short description, e.g. ``"downloading QEMU packages"``.
        total: the amount of work; 0 when unknown.
        unit: ``"B"`` formats amounts as bytes, anything else as a count.
        stream: where to write; stderr by default.
        quiet: write nothing at all.
    """

    def __init__(self, stage: str, total: int = 0, unit: str = "B", stream: TextIO | None = None,
                 quiet: bool = False) -> None:
        self.stage = stage
        self.total = total
        self.unit = unit
        self.done = 0
        self._stream = stream or sys.stderr
        self._quiet = quiet
        self._tty = not quiet and self._stream.isatty()
        self._last = 0.0
        self._start = time.monotonic()
        self._lock = threading.Lock()
        if not quiet and not self._tty:
            self._write(f"vxpu: {stage} ({self._fmt(total)})...\n" if total else f"vxpu: {stage}...\n")

    def _fmt(self, n: float) -> str:
        return _human(n) if self.unit == "B" else f"{int(n)} {self.unit}"

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()

    def advance(self, amount: int) -> None:
        """Record ``amount`` more units done (thread-safe); redraws at most 10 times a second."""
        with self._lock:
            self.done += amount
            now = time.monotonic()
            if self._tty and now - self._last >= 0.1:
                self._last = now
                self._draw()

    def _draw(self) -> None:
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            self._write(f"\r\x1b[Kvxpu: {self.stage} [{bar:<30}] {frac * 100:3.0f}% "
                        f"{self._fmt(self.done)}/{self._fmt(self.total)}")
        elif self.done:
            self._write(f"\r\x1b[Kvxpu: {self.stage} {self._fmt(self.done)}")
        else:
            self._write(f"\r\x1b[Kvxpu: {self.stage}...")

    def finish(self) -> None:
        """End the stage with one summary line."""
        if self._quiet:
            return
        took = time.monotonic() - self._start
        if self._tty:
            self._draw()
            self._write(f" done in {took:.1f}s\n")
        else:
            self._write(f"vxpu: {self.stage}: done in {took:.1f}s\n")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()
        elif self._tty:
            self._write("\n")


def note(message: str, quiet: bool = False, stream: TextIO | None = None) -> None:
    """Write one stage line (``vxpu: message``) unless quiet."""
    if not quiet:
        out = stream or sys.stderr
        out.write(f"vxpu: {message}\n")
        out.flush()
