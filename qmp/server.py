"""Start and stop a ``vxpu serve`` process for one vfio-user device.

One server process serves one device of one VM (ARCHITECTURE decision 4).

For servers that outlive the caller (``vxpu attach``): :func:`spawn_server` starts one in its
own session with its output in a log file and returns only its pid, :func:`wait_listening`
waits until its socket listens (or reports its death with the log tail), and
:func:`stop_server` ends it by pid and start time: SIGTERM, then SIGKILL after a grace period.

For servers owned by one process (tests, ``vxpu vm run``): a :class:`ServerProcess` unlinks a stale socket first (QEMU could otherwise connect to the stale
path before the new server listens), starts ``python -m vxpu serve --socket PATH`` with its
output in a log file, waits until the socket accepts connections, and stops the process on
:meth:`stop` or when used as a context manager.
"""

from __future__ import annotations

import asyncio
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
from vxpu.qmp.runtime import pid_start_time, process_alive, server_listening

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
                log.warning("vxpu server pid %d ignored SIGTERM; killing it (its log ends with its thread stacks)",
                            self.proc.pid)
                ask_for_stacks(self.proc.pid)
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


STOP_GRACE_S = 5.0
STACK_DUMP_S = 0.3      # SIGUSR1 to SIGKILL: time for the server to write its thread stacks


def serve_argv(socket_path: str | Path, args: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """The ``vxpu serve`` command line for one device on ``socket_path``."""
    return [python, "-m", "vxpu", "--log-level", "INFO", "serve", "--socket", str(socket_path), *args]


def spawn_server(socket_path: Path, log_path: Path, args: Sequence[str] = (),
                 python: str = sys.executable) -> tuple[int, int | None]:
    """Start ``vxpu serve`` detached (own session, stdin /dev/null, output in ``log_path``).

    A stale socket file is removed first, so QEMU cannot connect to it before the server listens.

    Returns:
        (pid, start time) of the server; the pair identifies it in :func:`stop_server`.

    Raises:
        ServerError: the interpreter could not be executed.
    """
    socket_path.unlink(missing_ok=True)
    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
               (os.POSIX_SPAWN_DUP2, 1, 2)]
    argv = serve_argv(socket_path, args, python)
    try:
        pid = os.posix_spawn(python, argv, os.environ, file_actions=actions, setsid=True)
    except OSError as exc:
        raise ServerError(f"cannot start {python} -m vxpu serve: {exc.strerror}") from exc
    log.info("started vxpu server pid %d on %s", pid, socket_path)
    return pid, pid_start_time(pid)


async def wait_listening(pid: int, start: int | None, socket_path: Path, log_path: Path,
                         timeout: float = 20.0) -> None:
    """Wait until the server listens on ``socket_path``.

    Raises:
        ServerError: it exited first, or did not listen within ``timeout`` seconds (the message
            carries the tail of its log; the caller stops it).
    """
    deadline = time.monotonic() + timeout
    while not server_listening(pid, socket_path):
        if not process_alive(pid, start):
            raise ServerError(f"vxpu server (pid {pid}) exited before listening on {socket_path}. "
                              f"Its log ({log_path}) ends:\n{_tail(log_path, 1500).rstrip()}")
        if time.monotonic() > deadline:
            raise ServerError(f"vxpu server (pid {pid}) did not listen on {socket_path} within "
                              f"{timeout:.0f}s. Its log ({log_path}) ends:\n{_tail(log_path, 1500).rstrip()}")
        await asyncio.sleep(0.02)


def ask_for_stacks(pid: int) -> None:
    """Have the ``vxpu serve`` process ``pid`` write its thread stacks to its log (SIGUSR1), and
    give it :data:`STACK_DUMP_S` to do so: the last step before it is killed.

    Raises:
        ProcessLookupError: ``pid`` is gone.
    """
    os.kill(pid, signal.SIGUSR1)
    time.sleep(STACK_DUMP_S)


def stop_server(pid: int, start: int | None, grace: float = STOP_GRACE_S) -> str:
    """Stop the server ``pid`` (only if it is still the process that started at ``start``).

    Sends SIGTERM to its process group and waits up to ``grace`` seconds. A server still running
    then gets SIGUSR1 first (``vxpu serve`` writes every thread's stack to its log on it, so the
    log shows where it hung), then SIGKILL to the group. This
    blocks (polling every 20 ms), so that it also works in clean-up paths of a cancelled task;
    async callers run it through :func:`asyncio.to_thread`.

    Returns:
        ``"gone"`` (it had exited already), ``"terminated"`` or ``"killed"``.

    Raises:
        ServerError: it survived SIGKILL.
    """
    if not process_alive(pid, start):
        return "gone"
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            if sig == signal.SIGKILL:
                ask_for_stacks(pid)
            os.killpg(pid, sig)
        except ProcessLookupError:
            return "terminated"
        deadline = time.monotonic() + wait
        while process_alive(pid, start):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        else:
            if sig == signal.SIGKILL:
                log.warning("vxpu server pid %d ignored SIGTERM for %.0fs; killed it (its log ends with its "
                            "thread stacks)", pid, grace)
                return "killed"
            return "terminated"
    raise ServerError(f"vxpu server pid {pid} survived SIGKILL (stuck in the kernel?); check 'ps -o stat {pid}'")
