"""The host transport: the SDK outside any VM, against a ``vxpu serve`` child process.

:meth:`LocalTransport.start` plays QEMU for one device:

1. starts ``python -m vxpu serve --socket <tmp>/vxpu.sock --backend <b>`` with its output in
   ``<tmp>/serve.log`` (the log's tail appears in every error this transport raises);
2. connects the in-process vfio-user client (:class:`vxpu.vfio_server.client.VfioUserClient`)
   once the socket accepts, and negotiates like QEMU (VERSION, DEVICE_GET_INFO);
3. creates memfd "guest RAM" (:class:`~vxpu.vfio_server.client.GuestMemory`, sealed like
   QEMU's ``memory-backend-memfd``) and DMA_MAPs it, fd attached, at
   :data:`~vxpu.guest.transport.LOCAL_RAM_BASE`;
4. turns on memory decode and bus mastering in the PCI command register.

Registers are REGION_READ/REGION_WRITE on region 0; writes are posted (NO_REPLY), as QEMU
posts trapped BAR writes. DMA memory comes from a first-fit allocator over the memfd, so every
buffer is one physically contiguous run. :meth:`LocalTransport.close` closes the connection,
stops the child (SIGTERM, then SIGKILL after a grace period), reaps it and removes the
temporary directory.

This module is host-only: it imports the vfio-user server package, so it is not part of the
guest image (``Device.local`` imports it lazily).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vxpu.guest.errors import GuestError
from vxpu.guest.transport import LOCAL_RAM_BASE, DmaMemory
from vxpu.vfio_server.client import GuestMemory, VfioUserClient

from vxpu.errors import Error

PAGE = 4096
CONFIG_REGION = 7
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY_BUS_MASTER = 0x0006
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_ZEROS = bytes(1 << 20)


class PageAllocator:
    """First-fit allocation of page-rounded ranges of ``[0, size)``, coalescing on free.

    Raises (alloc):
        GuestError: no free range is large enough.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]      # (offset, length), sorted, disjoint
        self.used: dict[int, int] = {}                       # offset -> length

    def alloc(self, nbytes: int) -> int:
        length = max(PAGE, -(-nbytes // PAGE) * PAGE)
        for i, (off, run) in enumerate(self._free):
            if run >= length:
                if run == length:
                    del self._free[i]
                else:
                    self._free[i] = (off + length, run - length)
                self.used[off] = length
                return off
        raise GuestError(f"local guest RAM exhausted: {nbytes} bytes wanted, {self.available()} free "
                         f"of {self.size} (pass a larger ram_size to Device.local)")

    def free(self, off: int) -> int:
        """Give back the range at ``off``; its length. Raises GuestError for an unknown offset."""
        length = self.used.pop(off, None)
        if length is None:
            raise GuestError(f"DMA memory at offset {off:#x} was not allocated here (double free?)")
        i = bisect.bisect_left(self._free, (off, 0))
        self._free.insert(i, (off, length))
        if i + 1 < len(self._free) and off + length == self._free[i + 1][0]:
            self._free[i] = (off, length + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]
        return length

    def available(self) -> int:
        return sum(run for _, run in self._free)


class LocalTransport:
    """A :class:`~vxpu.guest.transport.Transport` over a ``vxpu serve`` child (create with
    :meth:`start`)."""

    name = "local"

    def __init__(self, proc: subprocess.Popen[bytes], client: VfioUserClient, ram: GuestMemory,
                 workdir: Path) -> None:
        self.proc, self.client, self.ram, self.workdir = proc, client, ram, workdir
        self.log_path = workdir / "serve.log"
        self.allocator = PageAllocator(ram.size)
        self._live: dict[int, DmaMemory] = {}
        self._closed = False

    @classmethod
    def start(cls, backend: str = "cpu", *, ram_size: int = 256 << 20, device: str | None = None,
              startup_timeout: float = 60.0, msg_timeout: float = 30.0,
              extra_args: tuple[str, ...] = ()) -> LocalTransport:
        """Start a server child and connect to it as QEMU would.

        Args:
            backend: ``vxpu serve --backend`` (``cpu``, ``cuda[:N]``, ``hip[:N]``, ``npu``).
            ram_size: bytes of memfd guest RAM (a multiple of 4 KiB).
            device: ``vxpu serve --device`` (default: the server's default, the accelerator).
            startup_timeout: seconds for the child to listen (a GPU backend initialises first).
            msg_timeout: seconds to wait for any vfio-user reply.
            extra_args: more ``vxpu serve`` options.

        Raises:
            GuestError: the child exited or did not listen in time (with its log's tail), or
                the handshake failed.
        """
        if ram_size <= 0 or ram_size % PAGE:
            raise GuestError(f"ram_size must be a positive multiple of {PAGE}, got {ram_size}")
        workdir = Path(tempfile.mkdtemp(prefix="vxpu-local-"))
        sock = workdir / "vxpu.sock"
        cmd = [sys.executable, "-m", "vxpu", "serve", "--socket", str(sock), "--backend", backend,
               *(("--device", device) if device else ()), *extra_args]
        with open(workdir / "serve.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    close_fds=True)
        client = ram = None
        try:
            client = _connect(proc, sock, workdir / "serve.log", startup_timeout, msg_timeout)
            ram = GuestMemory(ram_size, "vxpu-local-ram")
            transport = cls(proc, client, ram, workdir)
            transport._bring_up()
            return transport
        except BaseException as exc:
            if client is not None:
                client.close()
            if ram is not None:
                ram.close()
            _stop(proc)
            tail = _tail(workdir / "serve.log")
            shutil.rmtree(workdir, ignore_errors=True)
            if isinstance(exc, GuestError):
                raise
            if isinstance(exc, (OSError, Error)):
                raise GuestError(f"vxpu serve --backend {backend}: set-up failed: {exc}\n{tail}") from exc
            raise

    def _bring_up(self) -> None:
        c = self.client
        c.handshake()
        c.map_guest_ram(self.ram, LOCAL_RAM_BASE)
        cmd = _U16.unpack(c.region_read(CONFIG_REGION, PCI_COMMAND, 2))[0]
        c.region_write(CONFIG_REGION, PCI_COMMAND, _U16.pack(cmd | PCI_COMMAND_MEMORY_BUS_MASTER))

    # -- Transport -------------------------------------------------------------------------
    def _failed(self, what: str, exc: BaseException) -> GuestError:
        with contextlib.suppress(subprocess.TimeoutExpired):   # a dying server: let it finish
            self.proc.wait(0.5)
        state = "running" if self.proc.returncode is None else f"exited with status {self.proc.returncode}"
        return GuestError(f"{what}: {exc} (vxpu serve {state})\n{_tail(self.log_path)}")

    def read_reg(self, offset: int) -> int:
        """REGION_READ of BAR0 (one socket round trip).

        Raises:
            GuestError: the server refused or is gone (with its log's tail).
        """
        try:
            return _U32.unpack(self.client.region_read(0, offset, 4))[0]
        except (OSError, Error) as exc:
            raise self._failed(f"BAR0 read at {offset:#x}", exc) from None

    def write_reg(self, offset: int, value: int) -> None:
        """Posted REGION_WRITE of BAR0 (no reply awaited, as QEMU posts BAR writes).

        Raises:
            GuestError: the server is gone (with its log's tail).
        """
        try:
            self.client.region_write(0, offset, _U32.pack(value & 0xFFFF_FFFF), posted=True)
        except (OSError, Error) as exc:
            raise self._failed(f"BAR0 write at {offset:#x}", exc) from None

    def alloc_dma(self, size: int, *, contiguous: bool = False) -> DmaMemory:
        """Zeroed memfd guest RAM of at least ``size`` bytes, always one contiguous run.

        Raises:
            GuestError: guest RAM is exhausted (pass a larger ``ram_size``) or closed.
        """
        if self._closed:
            raise GuestError("the local transport is closed")
        off = self.allocator.alloc(size)
        length = self.allocator.used[off]
        view = self.ram.view[off:off + length]
        for pos in range(0, length, len(_ZEROS)):
            n = min(len(_ZEROS), length - pos)
            view[pos:pos + n] = _ZEROS[:n] if n < len(_ZEROS) else _ZEROS
        mem = DmaMemory(view, [(0, LOCAL_RAM_BASE + off, length)])
        self._live[off] = mem
        return mem

    def free_dma(self, mem: DmaMemory) -> None:
        """Give ``mem`` back to the allocator.

        Raises:
            GuestError: ``mem`` is not live memory of this transport.
        """
        if self._closed:
            return
        off = mem.runs[0][1] - LOCAL_RAM_BASE
        self.allocator.free(off)
        self._live.pop(off, None)
        with contextlib.suppress(BufferError):     # something still looks at it; the mapping outlives it
            mem.view.release()

    def close(self) -> None:
        """Disconnect, stop and reap the server, drop guest RAM, remove the work directory."""
        if self._closed:
            return
        self._closed = True
        try:
            self.client.close()
        finally:
            try:
                _stop(self.proc)
            finally:
                for mem in self._live.values():        # memory the SDK could not give back
                    with contextlib.suppress(BufferError):
                        mem.view.release()
                self._live.clear()
                try:
                    self.ram.close()
                except BufferError:     # a view is still exported: the fd goes with the mapping
                    os.close(self.ram.fd)
                    self.ram.fd = -1
                shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def server_pid(self) -> int:
        """The ``vxpu serve`` child's process id."""
        return self.proc.pid

    def server_log(self) -> str:
        """The server's log so far (the last 64 KiB)."""
        return _tail(self.log_path, lines=10_000, limit=1 << 16)


def _connect(proc: subprocess.Popen[bytes], sock: Path, log: Path, startup_timeout: float,
             msg_timeout: float) -> VfioUserClient:
    """Connect once the child listens (no probe connection: the server takes one at a time).

    Raises:
        GuestError: the child exited, or it did not listen within ``startup_timeout``.
    """
    deadline = time.monotonic() + startup_timeout
    pause = 0.005
    while True:
        if proc.poll() is not None:
            raise GuestError(f"vxpu serve exited with status {proc.returncode} before listening\n{_tail(log)}")
        if sock.exists():
            try:
                return VfioUserClient(sock, timeout=msg_timeout)
            except (ConnectionRefusedError, FileNotFoundError):
                pass
        if time.monotonic() > deadline:
            raise GuestError(f"vxpu serve did not listen on {sock} within {startup_timeout:g} s\n{_tail(log)}")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 25, limit: int = 8192) -> str:
    """The last ``lines`` lines (at most ``limit`` bytes) of the server log, for messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no server log)"
    return "--- vxpu serve log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])
