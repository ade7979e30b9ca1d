"""How opening a QMP socket fails, against small fake peers (no QEMU): each way a socket can be
unusable gets its own error, fast."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vxpu.qmp.connection import Qmp
from vxpu.qmp.errors import QmpBusy, QmpError, QmpUnreachable

GREETING = {"QMP": {"version": {"qemu": {"micro": 3, "minor": 1, "major": 11}, "package": ""}, "capabilities": []}}


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], Path]]:
    """Start a Unix-socket server whose connections ``handler`` serves (one thread each)."""
    servers: list[socket.socket] = []

    def start(handler: Callable[[socket.socket], None]) -> Path:
        path = tmp_path / f"qmp{len(servers)}.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(4)
        servers.append(srv)

        def loop() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                threading.Thread(target=handler, args=(conn,), daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()
        return path

    yield start
    for srv in servers:
        srv.close()


def _open(path: Path) -> Qmp:
    return asyncio.run(_open_close(path))


async def _open_close(path: Path) -> Qmp:
    conn = await Qmp.open(path)
    await conn.close()
    return conn


def _messages(conn: socket.socket) -> Iterator[dict[str, object]]:
    """The JSON objects a client sends (QMP does not promise a newline after each)."""
    decoder, buf = json.JSONDecoder(), ""
    while chunk := conn.recv(4096):
        buf += chunk.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield msg


def _send(conn: socket.socket, doc: dict[str, object]) -> None:
    conn.sendall(json.dumps(doc).encode() + b"\r\n")


def _qemu_like(conn: socket.socket) -> None:
    """Greet, accept qmp_capabilities, answer query-status."""
    _send(conn, GREETING)
    for msg in _messages(conn):
        _send(conn, {"return": {"status": "running"} if msg["execute"] == "query-status" else {}, "id": msg.get("id")})


def test_a_qemu_like_peer_connects_and_answers(peer: Callable[..., Path]) -> None:
    path = peer(_qemu_like)

    async def run() -> object:
        async with await Qmp.open(path) as q:
            return await q.execute("query-status")
    assert asyncio.run(run()) == {"status": "running"}


def test_silent_peer_is_busy_within_the_deadline(peer: Callable[..., Path]) -> None:
    path = peer(lambda conn: time.sleep(10))  # accepts, never greets: what a held QEMU socket looks like
    t0 = time.monotonic()
    with pytest.raises(QmpBusy, match="another client holds it"):
        _open(path)
    assert time.monotonic() - t0 < 2.5


def test_peer_that_hangs_up_is_unreachable_after_retries(peer: Callable[..., Path]) -> None:
    calls = []

    def hang_up(conn: socket.socket) -> None:
        calls.append(1)
        conn.close()
    path = peer(hang_up)
    with pytest.raises(QmpUnreachable, match="handshake .* failed"):
        _open(path)
    assert len(calls) == 3  # a peer that drops us is retried (QEMU shedding a stale client), then reported


def test_peer_that_is_not_qmp_is_unreachable(peer: Callable[..., Path]) -> None:
    def garbage(conn: socket.socket) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH\r\n")
        time.sleep(3)
    with pytest.raises(QmpUnreachable, match="is this a QEMU QMP socket"):
        _open(peer(garbage))


def test_command_errors_carry_qemu_class(peer: Callable[..., Path]) -> None:
    def refusing(conn: socket.socket) -> None:
        _send(conn, GREETING)
        for msg in _messages(conn):
            reply: dict[str, object] = {"return": {}} if msg["execute"] == "qmp_capabilities" else \
                {"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}
            _send(conn, {**reply, "id": msg.get("id")})
    path = peer(refusing)

    async def run() -> None:
        async with await Qmp.open(path) as q:
            await q.execute("device_del", id="x")
    with pytest.raises(QmpError, match="QMP device_del failed: Device 'x' not found") as info:
        asyncio.run(run())
    assert info.value.klass == "DeviceNotFound"
