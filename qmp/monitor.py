"""A synchronous QMP monitor on top of ``qemu.qmp`` for tools and tests.

:class:`Monitor` connects to a QEMU's QMP Unix socket, runs commands (QEMU errors become
:class:`~vxpu.qmp.errors.QmpError` with QEMU's class and description) and waits for events
with a deadline. It uses ``qemu.qmp``'s synchronous shim, so it must stay on one thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol
from vxpu.qmp.errors import QmpError

log = logging.getLogger(__name__)

Event = dict[str, Any]


class Monitor:
    """A connected QMP monitor.

    Args:
        path: the QMP Unix socket of a running QEMU.
        timeout: seconds to wait for the socket to appear and for each command.

    Raises:
        QmpError: the socket did not appear or the handshake failed.
    """

    def __init__(self, path: str | Path, timeout: float = 15.0) -> None:
        self.path = Path(path)
        self._timeout = timeout
        self._backlog: list[Event] = []
        deadline = time.monotonic() + timeout
        while not self.path.exists():
            if time.monotonic() > deadline:
                raise QmpError(f"QMP socket {self.path} did not appear within {timeout:.0f}s; is QEMU running?")
            time.sleep(0.02)
        self._qmp = QEMUMonitorProtocol(str(self.path))
        try:
            self._qmp.connect()
        except (QMPError, OSError) as exc:
            raise QmpError(f"cannot connect to QMP at {self.path}: {exc}") from exc
        self._qmp.settimeout(timeout)
        self._open = True

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command and return its ``return`` value.

        Raises:
            QmpError: QEMU answered with an error, the connection dropped or it timed out.
        """
        try:
            return self._qmp.cmd(command, **arguments)
        except ExecuteError as exc:
            raise QmpError(f"QMP {command} failed: {exc}", exc.error_class) from exc
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            raise QmpError(f"QMP {command} failed: {type(exc).__name__}: {exc}") from exc

    def status(self) -> str:
        """The VM run state (``running``, ``paused``, ``internal-error``, ...)."""
        return str(self.execute("query-status")["status"])

    def events(self) -> list[Event]:
        """Every event received so far and not yet consumed by :meth:`wait_event`."""
        self._drain(0)
        return list(self._backlog)

    def _drain(self, wait: float) -> None:
        try:
            got = self._qmp.get_events(wait=float(wait) if wait else False)
        except TimeoutError:
            return
        except (QMPError, OSError, EOFError) as exc:
            raise QmpError(f"QMP connection lost while waiting for events: {exc}") from exc
        self._backlog.extend(got)

    def wait_event(self, name: str, timeout: float, match: Callable[[Event], bool] | None = None) -> Event:
        """Wait for (and consume) the first event called ``name`` for which ``match`` holds.

        Raises:
            QmpError: no such event within ``timeout`` seconds, or the connection dropped.
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self._backlog):
                if ev.get("event") == name and (match is None or match(ev)):
                    return self._backlog.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                seen = ", ".join(e.get("event", "?") for e in self._backlog) or "none"
                raise QmpError(f"no {name} event within {timeout:.1f}s (events seen: {seen})")
            self._drain(min(left, 0.5))

    def close(self) -> None:
        """Disconnect; QEMU having exited already is fine."""
        if self._open:
            self._open = False
            try:
                self._qmp.close()
            except (TimeoutError, QMPError, OSError, EOFError):
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
