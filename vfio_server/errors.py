"""Errors raised by the vfio-user protocol layer.

::

    vxpu.errors.Error
     └── ProtocolError        carries the errno the server replies with (hostile or bad input)
          ├── DmaError        a guest-physical range that is not (fully) mapped, or not writable
          └── PeerClosed      the peer closed the connection (or it broke); nothing to reply to

A handler raises :class:`ProtocolError` with the errno the client must see; the dispatcher
turns it into a header-only ERROR reply (or just logs it for NO_REPLY messages).
"""

from __future__ import annotations

import errno as _errno

from vxpu.errors import Error


class ProtocolError(Error):
    """A request was refused; ``errno`` is what the client gets in the ERROR reply.

    Args:
        errno: a positive errno value (``errno.EINVAL`` ...); zero is replaced by EIO
            because an ERROR reply with errno 0 reads as success to QEMU.
        message: what was wrong, for the log.
    """

    def __init__(self, errno: int, message: str) -> None:
        if errno <= 0:
            errno = _errno.EIO
        super().__init__(f"{message} [{_errno.errorcode.get(errno, errno)}]")
        self.errno = errno


class DmaError(ProtocolError):
    """A DMA access failed: the range is unmapped, crosses a mapping boundary, is only
    reachable through DMA_READ/DMA_WRITE messages, or is read-only and a write was asked.
    The default errno is EFAULT."""

    def __init__(self, message: str, errno: int = _errno.EFAULT) -> None:
        super().__init__(errno, message)


class PeerClosed(ProtocolError):
    """The peer closed the socket (EOF or a broken pipe)."""

    def __init__(self, message: str = "peer closed the connection") -> None:
        super().__init__(_errno.ECONNRESET, message)
