"""Start and stop a ``vxpu serve`` process for one vfio-user device.

One server process serves one device of one VM (ARCHITECTURE decision 4). A
:class:`ServerProcess` unlinks a stale socket first (QEMU could otherwise connect to the stale
path before the new server listens), starts ``python -m vxpu serve --socket PATH`` with its
output in a log file, waits until the socket accepts connections, and stops the process on
:meth:`stop` or when used as a context manager.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from vxpu.qmp.errors import ServerError

log = logging.getLogger(__name__)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class ServerProcess:
    """A ``vxpu serve`` child process.

    Args:
        socket_path: the vfio-user socket to serve on.
        log_path: where the server's stdout/stderr go (default: ``<socket>.log``).
        args: extra ``vxpu serve`` arguments (device options, backend).
        python: the interpreter to run vxpu with.
    """

    def __init__(self, socket_path: str | Path, log_path: str | Path | None = None,
                 args: Sequence[str] = (), python: str = sys.executable) -> None:
        self.socket_path = Path(socket_path)
        self.log_path = Path(log_path) if log_path else self.socket_path.with_suffix(".log")
        self.argv = [python, "-m", "vxpu", "--log-level", "DEBUG" if log.isEnabledFor(logging.DEBUG) else "INFO",
                     "serve", "--socket", str(self.socket_path), *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> ServerProcess:
        """Start the server and wait until its socket exists (it binds, then listens at once).

        Raises:
            ServerError: it exited or did not listen within ``timeout`` seconds.
        """
        self.socket_path.unlink(missing_ok=True)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        log.info("started vxpu server pid %d on %s", self.proc.pid, self.socket_path)
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if self.proc.poll() is not None:
                raise ServerError(f"vxpu server exited with {self.proc.returncode} before listening on "
                                  f"{self.socket_path}:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"vxpu server did not listen on {self.socket_path} within {timeout:.0f}s:\n"
                                  f"{_tail(self.log_path)}")
            time.sleep(0.05)
        return self

    def listening(self) -> bool:
        """True when something listens on the socket. This probes with a connection that closes at
        once, which the server sees as a client that came and went."""
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the server's log, for error messages."""
        return _tail(self.log_path, limit)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("vxpu server pid %d ignored SIGTERM; killing it", self.proc.pid)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.socket_path.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
