"""An async QMP connection on ``qemu.qmp`` that fails fast and says why.

:class:`Qmp` wraps :class:`qemu.qmp.QMPClient`. Opening it first connects a plain Unix socket
with a short deadline, so each way a QMP socket can be unusable gets its own error:

* the path does not exist, is not a socket, or nobody listens (QEMU exited) ->
  :class:`~vxpu.qmp.errors.QmpUnreachable`, at once;
* the connection is accepted by the kernel but QEMU never greets, or the listen backlog is full
  -> :class:`~vxpu.qmp.errors.QmpBusy`: a ``-qmp`` socket serves one client at a time and
  another client holds it. Without this check a client waits forever for the greeting.

The peer's pid comes from ``SO_PEERCRED``; it identifies the QEMU process behind the socket.
QEMU errors become :class:`~vxpu.qmp.errors.QmpError` carrying QEMU's error class.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError
from vxpu.qmp.errors import QmpBusy, QmpError, QmpUnreachable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
HANDSHAKE_ATTEMPTS = 3
_HUNG_UP = (ConnectionResetError, BrokenPipeError, EOFError)
COMMAND_TIMEOUT_S = 15.0
Event = dict[str, Any]


def _connect_socket(path: Path, timeout: float) -> socket.socket:
    """A connected Unix stream socket to ``path``.

    Raises:
        QmpUnreachable: no such path, not a socket, refused, or permission denied.
        QmpBusy: the listen backlog is full (another client holds QEMU's only connection).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise QmpUnreachable(f"no QMP socket at {path}: is the VM running? Start QEMU with "
                             f"-qmp unix:{path},server=on,wait=off ('vxpu vm run' prints its socket)") from None
    except OSError as exc:
        raise QmpUnreachable(f"cannot stat QMP socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise QmpUnreachable(f"{path} is not a Unix socket; pass the path given to QEMU's -qmp unix:PATH")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (TimeoutError, BlockingIOError) as exc:
        sock.close()
        raise QmpBusy(f"QMP socket {path} accepts no connection (backlog full): another client holds it. "
                      "Close that client (a qmp-shell, libvirt, another vxpu) or give QEMU a second "
                      "-qmp socket for vxpu") from exc
    except ConnectionRefusedError:
        sock.close()
        raise QmpUnreachable(f"nothing listens on QMP socket {path}: the QEMU that created it has exited. "
                             "Start the VM again (and remove the stale socket file)") from None
    except OSError as exc:
        sock.close()
        hint = " (run as the user that owns QEMU, or as root)" if exc.errno == errno.EACCES else ""
        raise QmpUnreachable(f"cannot connect to QMP socket {path}: {exc.strerror}{hint}") from None
    return sock


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    except OSError:
        return None
    return pid or None


def _stopped(pid: int | None) -> bool:
    """True when process ``pid`` is stopped (SIGSTOP, a debugger), so it cannot greet anyone."""
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


class Qmp:
    """One QMP session with a running QEMU. Open it with :meth:`open`.

    Attributes:
        path: the QMP socket.
        peer_pid: the pid of the QEMU process behind it (from ``SO_PEERCRED``), if known.
    """

    def __init__(self, path: Path, client: QMPClient, peer_pid: int | None) -> None:
        self.path = path
        self.peer_pid = peer_pid
        self._client = client
        self._closed = False

    @classmethod
    async def open(cls, path: str | Path, timeout: float = CONNECT_TIMEOUT_S) -> Qmp:
        """Connect and negotiate capabilities within ``timeout`` seconds.

        Raises:
            QmpUnreachable: see :func:`_connect_socket`.
            QmpBusy: connected, but QEMU sent no greeting in time (another client holds it).
        """
        path = Path(path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(1, HANDSHAKE_ATTEMPTS + 1):
            sock = await loop.run_in_executor(None, _connect_socket, path, max(0.1, deadline - loop.time()))
            peer = _peer_pid(sock)
            client = QMPClient(f"vxpu-{path.name}")
            try:
                await asyncio.wait_for(client.connect(sock), max(0.1, deadline - loop.time()))
                break
            except TimeoutError:
                await _quiet_disconnect(client)
                sock.close()
                if _stopped(peer):
                    raise QmpBusy(f"QMP socket {path} sent no greeting within {timeout:.0f}s: its QEMU (pid {peer}) "
                                  f"is stopped; resume it with 'kill -CONT {peer}'") from None
                raise QmpBusy(f"QMP socket {path} sent no greeting within {timeout:.0f}s: another client holds "
                              "it (QEMU serves one client per -qmp socket). Close that client (a qmp-shell, "
                              "libvirt, another vxpu) or give QEMU a second -qmp socket for vxpu") from None
            except (QMPError, OSError, EOFError) as exc:
                await _quiet_disconnect(client)
                sock.close()
                cause = getattr(exc, "exc", exc)
                if isinstance(cause, _HUNG_UP) and attempt < HANDSHAKE_ATTEMPTS and loop.time() < deadline:
                    # QEMU dropped us while it got rid of a client that had given up in its backlog
                    log.debug("QMP %s hung up during the handshake (%s); connecting again", path, cause)
                    await asyncio.sleep(0.05)
                    continue
                raise QmpUnreachable(f"QMP handshake on {path} failed: {exc}; is this a QEMU QMP socket?") from exc
            except BaseException:
                await _quiet_disconnect(client)
                sock.close()
                raise
        log.debug("connected to QMP %s (QEMU pid %s)", path, peer)
        return cls(path, client, peer)

    async def execute(self, command: str, timeout: float = COMMAND_TIMEOUT_S, **arguments: Any) -> Any:
        """Run a QMP command and return its ``return`` value.

        Raises:
            QmpError: QEMU answered with an error (``klass`` is QEMU's class), the connection
                dropped, or no answer came within ``timeout`` seconds.
        """
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments or None), timeout)
        except ExecuteError as exc:
            raise QmpError(f"QMP {command} failed: {exc}", exc.error_class) from exc
        except TimeoutError:
            raise QmpError(f"QMP {command} got no answer within {timeout:.0f}s; is QEMU stuck?") from None
        except (QMPError, OSError, EOFError) as exc:
            raise QmpError(f"QMP {command} failed: the connection to {self.path} dropped "
                           f"({type(exc).__name__}: {exc}); did QEMU exit?") from exc

    @contextmanager
    def listen(self, name: str, match: Callable[[Event], bool] | None = None) -> Iterator[EventListener]:
        """Collect events called ``name`` (and matching ``match``) while the block runs.

        Register before the command that causes the event, so it cannot be missed.
        """
        listener = EventListener(name, (lambda msg: match(dict(msg))) if match else None)
        with self._client.listen(listener):
            yield listener

    @staticmethod
    async def next_event(listener: EventListener, timeout: float) -> Event | None:
        """The next event the listener heard, or None after ``timeout`` seconds."""
        try:
            return dict(await asyncio.wait_for(listener.get(), timeout))
        except TimeoutError:
            return None

    async def close(self) -> None:
        """Disconnect; QEMU having exited already is fine."""
        if not self._closed:
            self._closed = True
            await _quiet_disconnect(self._client)

    async def aclose(self) -> None:
        """:meth:`close`, under the name :func:`contextlib.aclosing` calls."""
        await self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _quiet_disconnect(client: QMPClient) -> None:
    try:
        await client.disconnect()
    except (QMPError, OSError, EOFError) as exc:
        log.debug("QMP disconnect: %s", exc)
