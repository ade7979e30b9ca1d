"""Review finding: the client (the out-of-VM guest driver's transport) must not trust the size
field of what a server sends: a huge size would make it allocate and wait for gigabytes."""

from __future__ import annotations

import errno
import socket

import pytest
from vxpu.vfio_server import protocol as P
from vxpu.vfio_server.client import VfioUserClient
from vxpu.vfio_server.errors import ProtocolError


def test_oversized_message_from_the_server_is_refused(tmp_path):
    path = tmp_path / "hostile.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        with VfioUserClient(path, timeout=2.0) as c:
            peer, _ = listener.accept()
            with peer:
                peer.sendall(P.pack_header(1, P.Command.DMA_WRITE, 64 << 20, P.TYPE_COMMAND))
                with pytest.raises(ProtocolError) as info:
                    c.recv_message()
                assert info.value.errno == errno.E2BIG
    finally:
        listener.close()
