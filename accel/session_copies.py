"""A :class:`~vxpu.accel.session.Session`'s data movement: memsets, copies and host registrations.

A mixin of :class:`~vxpu.accel.session.Session` (which owns the state it uses: the lock, the
allocation table, the queues, the quota). Every device range must lie inside one live
allocation of the client (:meth:`Session.check_range`), every operation is counted against the
queue depth quota, and host memory arrives either as a ``memoryview`` the device model
translated from guest RAM, or as an address inside a region registered with
:meth:`SessionCopies.register_host` (the backend checks the host range).
:meth:`SessionCopies.copy_address` is the device model's one-step copy: device range, queue
room and the backend call under one lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from vxpu.accel.backend import Backend, BackendError, Status
from vxpu.accel.quota import Quota
from vxpu.accel.session_records import DEFAULT_QUEUE, U64_MAX, QueueRecord
from vxpu.accel.session_records import guarded as _guarded
from vxpu.accel.stats import SessionStats

log = logging.getLogger(__name__)


class SessionCopies:
    """Memsets, copies and host registrations of a :class:`~vxpu.accel.session.Session`."""

    backend: Backend
    stats: SessionStats
    log: logging.Logger
    _lock: threading.RLock
    _closed: bool
    _epoch: int
    _quota: Quota
    _queues: dict[int, QueueRecord]
    _host_tokens: list[object]
    _address_copies: tuple[Callable[..., None] | None, Callable[..., None] | None]

    if TYPE_CHECKING:                   # Session's own, used here
        def check_range(self, address: int, length: int) -> None: ...
        def _queue(self, handle: int) -> QueueRecord: ...
        def _submit(self, queue: int) -> QueueRecord: ...
        def _account(self, q: QueueRecord) -> None: ...
        def _check_epoch(self) -> None: ...
        def _on_error(self, exc: BackendError) -> None: ...

    @staticmethod
    def _host(view: memoryview, writable: bool) -> memoryview:
        if not isinstance(view, memoryview):
            view = memoryview(view)
        if writable and view.readonly:
            raise BackendError(Status.INVALID_ARGUMENT, "destination host memory is read-only")
        if not view.c_contiguous:
            raise BackendError(Status.INVALID_ARGUMENT, "host memory must be contiguous")
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")

    @_guarded
    def memset(self, address: int, value: int, size: int, queue: int = DEFAULT_QUEUE) -> None:
        """Fill ``size`` bytes at ``address`` with the byte ``value``.

        Raises:
            BackendError: INVALID_ARGUMENT (value not a byte), OUT_OF_RANGE, INVALID_HANDLE.
        """
        if not 0 <= value <= 255:
            raise BackendError(Status.INVALID_ARGUMENT, f"memset value must be a byte, got {value!r}")
        self.check_range(address, size)
        if size:
            q = self._submit(queue)
            self.backend.memset(address, value, size, q.token)
        self.stats.memsets += 1

    @_guarded
    def copy_htod(self, dst: int, src: memoryview, queue: int = DEFAULT_QUEUE) -> None:
        """Copy host memory ``src`` to device address ``dst``.

        Raises:
            BackendError: INVALID_ARGUMENT (non-contiguous host memory), OUT_OF_RANGE, INVALID_HANDLE.
        """
        src = self._host(src, writable=False)
        self.check_range(dst, src.nbytes)
        if src.nbytes:
            q = self._submit(queue)
            self.backend.copy_htod(dst, src, q.token)
        self.stats.bytes_htod += src.nbytes

    @_guarded
    def copy_dtoh(self, dst: memoryview, src: int, queue: int = DEFAULT_QUEUE) -> None:
        """Copy ``len(dst)`` bytes from device address ``src`` into host memory ``dst``.

        Raises:
            BackendError: INVALID_ARGUMENT (read-only or non-contiguous ``dst``), OUT_OF_RANGE,
                INVALID_HANDLE.
        """
        dst = self._host(dst, writable=True)
        self.check_range(src, dst.nbytes)
        if dst.nbytes:
            q = self._submit(queue)
            self.backend.copy_dtoh(dst, src, q.token)
        self.stats.bytes_dtoh += dst.nbytes

    @_guarded
    def copy_dtod(self, dst: int, src: int, size: int, queue: int = DEFAULT_QUEUE) -> None:
        """Copy ``size`` bytes between two device ranges of this client (they may overlap).

        Raises:
            BackendError: OUT_OF_RANGE, INVALID_ARGUMENT, INVALID_HANDLE.
        """
        self.check_range(src, size)
        self.check_range(dst, size)
        if size:
            q = self._submit(queue)
            self.backend.copy_dtod(dst, src, size, q.token)
        self.stats.bytes_dtod += size

    @_guarded
    def register_host(self, view: memoryview, read_only: bool = False) -> object:
        """Pin a DMA-mapped host region for zero-copy transfers; returns a token.
        The session unregisters what is left at :meth:`close`.

        Raises:
            BackendError: from the backend (e.g. OUT_OF_MEMORY when pinning fails).
        """
        token = self.backend.register_host(view, read_only)
        self._host_tokens.append(token)
        return token

    def unregister_host(self, token: object) -> None:
        """Undo :meth:`register_host` before the region is unmapped (waits for queued copies).
        Works on a closed session too, so teardown order does not matter.

        Raises:
            BackendError: INVALID_HANDLE for a token this session did not hand out.
        """
        with self._lock:
            if token not in self._host_tokens:
                raise BackendError(Status.INVALID_HANDLE, "unknown host registration")
            self._host_tokens.remove(token)
            self.backend.unregister_host(token)

    @_guarded
    def copy_htod_address(self, dst: int, host: int, size: int, queue: int = DEFAULT_QUEUE) -> None:
        """Copy ``size`` bytes from a host *address* inside a region given to
        :meth:`register_host` (the fast path for device models that translate guest-physical
        addresses themselves). The backend checks the host range; the session the device range.

        Raises:
            BackendError: UNSUPPORTED if the backend lacks the extension; OUT_OF_RANGE;
                INVALID_ARGUMENT; INVALID_HANDLE.
        """
        fn = self._address_copy_fn(True, host)
        self.check_range(dst, size)
        self._issue_address_copy(fn, True, dst, host, size, self._submit(queue) if size else None)

    @_guarded
    def copy_dtoh_address(self, host: int, src: int, size: int, queue: int = DEFAULT_QUEUE) -> None:
        """Copy ``size`` bytes to a host *address* inside a writable registered region.

        Raises:
            BackendError: as :meth:`copy_htod_address`.
        """
        fn = self._address_copy_fn(False, host)
        self.check_range(src, size)
        self._issue_address_copy(fn, False, src, host, size, self._submit(queue) if size else None)

    @_guarded
    def copy_address(self, to_device: bool, device: int, host: int, size: int, queue: int,
                     reserve: int | None) -> bool:
        """:meth:`copy_htod_address` (``to_device``) or :meth:`copy_dtoh_address` in one call,
        for a device model that must not block on a full queue: with ``reserve`` (the
        operations the caller has issued since its last wait) it first checks the device
        range, then returns False, issuing nothing, when ``max(reserve, pending) + 1`` reaches
        the queue depth quota (the caller waits for the queue, then calls again with None).

        Raises:
            BackendError: as :meth:`copy_htod_address`.
        """
        self.check_range(device, size)
        q = self._queues.get(queue)
        if reserve is not None and max(reserve, 0 if q is None else q.pending) + 1 >= self._quota.queue_depth:
            return False
        fn = self._address_copy_fn(to_device, host)
        if size:
            if q is None:
                q = self._queue(queue)          # INVALID_HANDLE
            self._account(q)
        self._issue_address_copy(fn, to_device, device, host, size, q)
        return True

    def _address_copy_fn(self, to_device: bool, host: int) -> Callable[..., None]:
        """The backend's address copy for this direction, once ``host`` is a u64.

        Raises:
            BackendError: UNSUPPORTED (no such extension), INVALID_ARGUMENT (``host``).
        """
        fn = self._address_copies[0 if to_device else 1]
        if fn is None:
            raise BackendError(Status.UNSUPPORTED, f"the {self.backend.name} backend has no address copies")
        if not 0 <= host <= U64_MAX:
            raise BackendError(Status.INVALID_ARGUMENT, f"host address {host!r} is not a u64")
        return fn

    def _issue_address_copy(self, fn: Callable[..., None], to_device: bool, device: int, host: int, size: int,
                            q: QueueRecord | None) -> None:
        """Issue a checked address copy on ``q`` (already accounted; None for ``size`` 0) and count it."""
        if to_device:
            if size:
                fn(device, host, size, q.token)  # type: ignore[union-attr]
            self.stats.bytes_htod += size
        else:
            if size:
                fn(host, device, size, q.token)  # type: ignore[union-attr]
            self.stats.bytes_dtoh += size
