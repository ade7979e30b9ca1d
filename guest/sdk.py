"""The vxpu guest SDK: a CuPy-like API over the accelerator's rings.

::

    import numpy as np
    from vxpu.guest import Device

    with Device.local() as dev:                  # or Device.open() inside a VM
        x = dev.to_device(np.arange(1024, dtype=np.float32))
        y = dev.empty(1024, np.float32)
        y.fill_bytes(0)
        mod = dev.load_module(open("saxpy.vxir").read())
        mod.saxpy[4, 256](1024, 2.0, x, y)       # grid 4, block 256; asynchronous
        print(y.to_host())                       # waits, then copies back

The same code runs over either transport (:mod:`vxpu.guest.transport`): ``Device.open()``
finds the PCI device inside a Linux VM (:mod:`vxpu.guest.vmtransport`) and ``Device.local()``
starts a ``vxpu serve`` child on the host (:mod:`vxpu.guest.local`).

Commands run in submission order. Launches, MEM_SET, MEM_FREE and copies from pinned memory
are asynchronous: a failure among them raises :class:`~vxpu.guest.errors.DeviceError` at the
next :meth:`Device.synchronize` (or the next synchronous call). Allocation, module loading,
copies from ordinary buffers and ``to_host`` are synchronous. After :meth:`Device.reset` (or
a kernel fault that reset the device's state) older arrays, modules and events are stale:
using them raises :class:`~vxpu.guest.array.StaleHandle`.

For tests that must misbehave on purpose, :attr:`Device.raw` (:class:`Raw`) posts any
descriptor and returns the raw completion. A device and its objects belong to one thread at a
time (the ring takes no lock).
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Iterator
from typing import Any, Self

from vxpu.guest.array import DeviceAllocs, DeviceArray, HostArray, Shape, StaleHandle, as_bytes, normalize
from vxpu.guest.errors import DeviceError, GuestError
from vxpu.guest.module import INLINE_ARG_BYTES, Kernel, Module
from vxpu.guest.raw import Raw
from vxpu.guest.ring import Ring
from vxpu.guest.staging import StagingPool, post_copy, post_single
from vxpu.guest.transport import DmaMemory, Transport

from vxpu.abi import xpu
from vxpu.errors import StateError

__all__ = ["Device", "DeviceArray", "DeviceError", "Event", "HostArray", "Kernel", "Module", "StaleHandle"]

_LAUNCH = int(xpu.Opcode.LAUNCH)
_FENCE = int(xpu.Opcode.FENCE)
_HTOD = int(xpu.Opcode.MEM_COPY_HTOD)
_DTOH = int(xpu.Opcode.MEM_COPY_DTOH)


def _host_mem(host: HostArray) -> DmaMemory:
    """The DMA memory of a HostArray that is still allocated.

    Raises:
        GuestError: the HostArray was freed (its memory may belong to another buffer now).
    """
    if host.freed:
        raise GuestError("copy to or from a HostArray that was freed")
    return host.mem


def _post_pinned(ring: Ring, opcode: int, ptr: int, host: HostArray, n: int) -> None:
    """Post a copy of ``n`` bytes between device address ``ptr`` and ``host``: one inline
    segment when its memory is one contiguous run, else a scatter-gather list."""
    address = host.address
    if address is not None:
        ring.post(opcode, ptr, sg_addr=address, sg_len=n)
    else:
        post_copy(ring, opcode, ptr, _host_mem(host), 0, n, waited=False)


class Event:
    """A device timestamp (create with ``Device.event()``); ``record()`` it after some work."""

    def __init__(self, device: Device, handle: int) -> None:
        self.device, self.handle, self.epoch = device, handle, device.epoch
        self._finalizer = weakref.finalize(self, device.allocs.defer, self.epoch, int(xpu.Opcode.EVENT_DESTROY),
                                           handle)

    def _check(self) -> int:
        if not self._finalizer.alive or self.epoch != self.device.epoch:
            raise StaleHandle(f"event {self.handle:#x}")
        return self.handle

    def record(self) -> Event:
        """EVENT_RECORD: the timestamp is taken when all earlier work has finished (async)."""
        self.device.live_ring().post(xpu.Opcode.EVENT_RECORD, self._check())
        return self

    def query(self) -> bool:
        """True when the recorded point has been reached."""
        return bool(self.device.call(xpu.Opcode.EVENT_QUERY, self._check())[0])

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to ``end`` (both recorded; waits for the work first)."""
        self.device.synchronize()
        ns, _ = self.device.call(xpu.Opcode.EVENT_ELAPSED, self._check(), end._check())
        return ns / 1e6

    def destroy(self) -> None:
        """EVENT_DESTROY (idempotent; a garbage event is destroyed at the next command)."""
        if self._finalizer.detach() is not None and self.epoch == self.device.epoch:
            self.device.live_ring().post(xpu.Opcode.EVENT_DESTROY, self.handle)


class Device:
    """One vxpu accelerator, driven through a :class:`~vxpu.guest.transport.Transport`.

    Args:
        transport: the register and DMA-memory provider (owned: closed with the device).
        sq_entries: submission (and completion) ring slots; commands in flight at most.
        staging_chunk, staging_count: the bounce-buffer pool for ordinary buffers.
        timeout: seconds a wait may see no completion before it raises DeviceError(TIMEOUT).

    Raises:
        GuestError: the device is not a vxpu accelerator of a supported ABI version.
        DeviceError: the device refused the queue set-up.
    """

    def __init__(self, transport: Transport, *, sq_entries: int = 1024, staging_chunk: int = 1 << 20,
                 staging_count: int = 4, timeout: float = 120.0) -> None:
        self.transport = transport
        self.epoch = 0
        self._faults_seen = self._resets_seen = 0
        self._sentinel: int | None = None          # a 1-byte allocation that shows the state survived
        self.allocs = DeviceAllocs()
        self.ring: Ring | None = None
        self.staging: StagingPool | None = None
        try:
            magic, version = transport.read_reg(xpu.REG_MAGIC), transport.read_reg(xpu.REG_VERSION)
            if magic != xpu.MAGIC_VALUE or version >> 16 != xpu.ABI_MAJOR:
                raise GuestError(f"not a vxpu accelerator of ABI {xpu.ABI_MAJOR}.x "
                                 f"(magic {magic:#x}, version {version:#x})")
            self.features = xpu.Feature(transport.read_reg(xpu.REG_FEATURES_LO)
                                        | transport.read_reg(xpu.REG_FEATURES_HI) << 32)
            self.ring = Ring(transport, sq_entries, timeout=timeout)
            self.ring.start()
            self.staging = StagingPool(self.ring, transport, staging_chunk, staging_count)
            self._sentinel = self.alloc(1)
        except BaseException:
            self.close()
            raise
        self.raw = Raw(self)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, **kwargs: Any) -> Device:
        """The accelerator of this VM (``VXPU_PCI_BDF`` / ``VXPU_PCI_ID`` choose among several).

        Raises:
            DeviceNotFound: no such PCI device. GuestError: no DMA memory (run as root).
        """
        from vxpu.guest.vmtransport import VmTransport
        return cls(VmTransport.open(), **kwargs)

    @classmethod
    def local(cls, backend: str = "cpu", *, ram_size: int = 256 << 20, **kwargs: Any) -> Device:
        """A device served by a ``vxpu serve`` child process on this host (no VM).

        Args:
            backend: the server's ``--backend`` (``cpu``, ``cuda``, ``cuda:1``, ``hip``, ``npu``).
            ram_size: bytes of memfd "guest RAM" (rings, staging and pinned arrays live there).
            kwargs: passed to :class:`Device`.

        Raises:
            GuestError: the server did not start (the message carries its log's tail).
        """
        from vxpu.guest.local import LocalTransport
        return cls(LocalTransport.start(backend, ram_size=ram_size), **kwargs)

    def close(self) -> None:
        """Stop the queue and release everything (idempotent). Later use raises StateError."""
        ring, self.ring = self.ring, None
        try:
            stopped = False
            if ring is not None:
                with contextlib.suppress(GuestError):      # a dead server must not keep the memory
                    stopped = ring.stop()
            if ring is not None:                           # not stopped: the transport's close
                if self.staging is not None and stopped:   # (which ends bus mastering first)
                    self.staging.close()                   # frees the memory instead
                ring.close(free=stopped)
        finally:
            self.staging = None
            self.epoch += 1
            self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the synchronous command path -------------------------------------------------------
    def live_ring(self) -> Ring:
        """The ring, once a kernel fault that reset the device state has been noticed and the
        garbage queued by finalizers has been posted for release.

        It has work to do only when ``self.ring is None or ring.faults != self._faults_seen or
        self.allocs.garbage``; the hot paths (launchers, :meth:`launch`, pinned and staged
        copies, :meth:`synchronize`) test that condition inline and call this only when it
        holds, which saves the call on every command. A new condition here must be added there
        too (tests/sdk/test_fast_paths.py checks each path against each condition).

        Raises:
            StateError: the device is closed.
        """
        ring = self.ring
        if ring is None:
            raise StateError("device used after close", current="closed", required="open")
        if ring.faults != self._faults_seen:          # a kernel fault: did the state survive it?
            self._faults_seen = ring.faults
            if ring.state_resets != self._resets_seen or not self._state_survived(ring):
                self._resets_seen = ring.state_resets
                self._state_lost(ring)
        if self.allocs.garbage:
            self._free_garbage(ring)
        return ring

    def _state_survived(self, ring: Ring) -> bool:
        """Whether this guest's device state outlived a fault: a contained fault (checked IR)
        keeps it, a context reset drops it. A one-byte MEM_SET on the sentinel allocation
        made at open tells which."""
        if self._sentinel is None:
            return False
        return ring.wait(ring.post(xpu.Opcode.MEM_SET, self._sentinel, 0, 1, waited=True))[0] == 0

    def _state_lost(self, ring: Ring) -> None:
        """The device dropped this guest's allocations, modules and events: make every older
        object stale (so no stale address reaches memory that belongs to someone else now)."""
        self.epoch += 1
        self.allocs.garbage.clear()
        status, address, _ = ring.wait(ring.post(xpu.Opcode.MEM_ALLOC, 1, waited=True))
        self._sentinel = None if status else address

    def _free_garbage(self, ring: Ring) -> None:
        garbage, self.allocs.garbage = self.allocs.garbage, []
        for epoch, opcode, handle in garbage:
            if epoch == self.epoch:
                ring.post(opcode, handle)

    def call(self, opcode: int, a0: int = 0, a1: int = 0, a2: int = 0, a3: int = 0, *, sg_addr: int = 0,
             sg_len: int = 0) -> tuple[int, int]:
        """Post one command, wait for it, and return ``(result, result2)``.

        Raises:
            DeviceError: it failed (its status), the device stopped, or it timed out.
        """
        ring = self.live_ring()
        return ring.check(ring.post(opcode, a0, a1, a2, a3, sg_addr=sg_addr, sg_len=sg_len, waited=True))

    def _call_with_data(self, opcode: int, data: bytes, a0: int = 0) -> tuple[int, int]:
        """A synchronous command whose SG is ``data`` (a name, a module image): through staging
        slot 0 when it fits, else through DMA memory of its own."""
        ring, staging = self.live_ring(), self._staging()
        n = len(data)
        if n <= staging.chunk:
            staging.settle_all()
            mem = staging.slots[0]
            mem.view[:n] = data
            return ring.check(post_single(ring, opcode, mem.segments(0, n), a0, waited=True))
        mem = self.transport.alloc_dma(n)
        try:
            mem.view[:n] = data
            return ring.check(post_single(ring, opcode, mem.segments(0, n), a0, waited=True))
        finally:
            self.transport.free_dma(mem)

    def _staging(self) -> StagingPool:
        if self.staging is None:
            raise StateError("device used after close", current="closed", required="open")
        return self.staging

    def _reply_json(self, opcode: int, limit: int) -> dict[str, Any]:
        ring, staging = self.live_ring(), self._staging()
        staging.settle_all()
        mem = staging.slots[0]
        n = min(limit, mem.size)
        written, _ = ring.check(post_single(ring, opcode, mem.segments(0, n), waited=True))
        return json.loads(bytes(mem.view[:min(written, n)]).decode())

    def identify(self) -> dict[str, Any]:
        """The device's IDENTIFY JSON (backend, memory, limits ...)."""
        return self._reply_json(xpu.Opcode.IDENTIFY, xpu.MAX_IDENTIFY_BYTES)

    def stats(self) -> dict[str, Any]:
        """The device's STATS JSON (queue depth, commands, errors, bytes moved ...)."""
        return self._reply_json(xpu.Opcode.STATS, xpu.MAX_STATS_BYTES)

    # -- memory ----------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        """MEM_ALLOC ``nbytes`` (at least 1); the device address.

        Raises:
            DeviceError: OUT_OF_MEMORY, QUOTA_EXCEEDED, INVALID_ARGUMENT.
        """
        return self.call(xpu.Opcode.MEM_ALLOC, max(1, nbytes))[0]

    def free_address(self, address: int) -> None:
        """MEM_FREE ``address`` (asynchronous; errors come at the next synchronize)."""
        self.live_ring().post(xpu.Opcode.MEM_FREE, address)

    def empty(self, shape: Shape, dtype: Any = "float32") -> DeviceArray:
        """An uninitialised device array.

        Raises:
            DeviceError: the allocation failed. GuestError: bad shape or dtype.
        """
        dims, dt, itemsize = normalize(shape, dtype)
        nbytes = itemsize
        for d in dims:
            nbytes *= d
        return DeviceArray(self, self.alloc(nbytes), dims, dt, itemsize, max(1, nbytes))

    def zeros(self, shape: Shape, dtype: Any = "float32") -> DeviceArray:
        """A device array of zero bytes (MEM_SET)."""
        arr = self.empty(shape, dtype)
        arr.fill_bytes(0)
        return arr

    def to_device(self, data: Any) -> DeviceArray:
        """A new device array holding ``data`` (a numpy array, a buffer, or a HostArray).

        Raises:
            DeviceError: the allocation or the copy failed.
        """
        if isinstance(data, HostArray):
            arr = self.empty(data.shape, data.dtype)
            view = None
        else:
            view, shape, dtype = as_bytes(data)     # once: copy_to_device would convert again
            arr = self.empty(shape, dtype)
        try:
            if view is None:
                self.copy_to_device(arr, data)
            else:
                self._upload(arr, data, view)
        except BaseException:
            arr.free()
            raise
        return arr

    def pinned(self, shape: Shape, dtype: Any = "float32") -> HostArray:
        """Pinned DMA memory (zeroed) that copies to and from device arrays without staging.

        Raises:
            GuestError: the transport has no such memory.
        """
        dims, dt, itemsize = normalize(shape, dtype)
        nbytes = itemsize
        for d in dims:
            nbytes *= d
        return HostArray(self.transport.alloc_dma(max(1, nbytes)), dims, dt, itemsize, self.transport.free_dma)

    def _ring_for(self, arr: DeviceArray) -> tuple[Ring, int]:
        """The ring to post a copy of ``arr`` on, and ``arr``'s device address. A stale array
        is reported first, as always, and again after a device state loss that
        :meth:`live_ring` notices just now (only when it has work to do: one check otherwise).

        Raises:
            StaleHandle: ``arr`` is freed or from an earlier device state. DeviceError: the
                device stopped.
        """
        ring = self.ring
        if ring is None or ring.faults != self._faults_seen or self.allocs.garbage:
            _ = arr.ptr
            ring = self.live_ring()
        return ring, arr.ptr

    def copy_to_device(self, dst: DeviceArray, src: Any) -> None:
        """Copy ``src`` into ``dst``. From a HostArray the copy is only posted (the device may
        read the HostArray until the next :meth:`synchronize`; leave it unchanged till then);
        from anything else it goes through the staging pool and returns when ``src`` may change.

        Raises:
            GuestError: sizes differ. DeviceError: the copy failed.
        """
        if not isinstance(src, HostArray):
            self._upload(dst, src)
            return
        ring, ptr = self._ring_for(dst)
        n = src.nbytes
        if n != dst.nbytes:
            raise GuestError(f"copy of {n} bytes into a {dst.nbytes}-byte array")
        if n:
            _post_pinned(ring, _HTOD, ptr, src, n)

    def _upload(self, dst: DeviceArray, src: Any, view: memoryview | None = None) -> None:
        """The staged half of :meth:`copy_to_device`: ``src`` (or ``view``, its bytes when the
        caller converted it already) into ``dst`` through the staging pool; returns once the
        device has read it all.

        Raises:
            GuestError: sizes differ, or ``src`` is no buffer. StaleHandle: ``dst`` is stale.
            DeviceError: a copy failed.
        """
        _, ptr = self._ring_for(dst)
        if view is None:
            view = as_bytes(src)[0]
        if len(view) != dst.nbytes:
            raise GuestError(f"copy of {len(view)} bytes into a {dst.nbytes}-byte array")
        self._staging().upload(ptr, view)

    def copy_to_host(self, dst: Any, src: DeviceArray, *, blocking: bool = True) -> None:
        """Copy ``src`` into ``dst`` (a HostArray, numpy array or writable buffer of the same
        size) and wait until it is there. ``blocking=False`` (HostArray only) just posts the
        copy: the data is there after the next :meth:`synchronize`.

        Raises:
            GuestError: sizes differ or ``dst`` is not writable. DeviceError: the copy failed.
        """
        ring, ptr = self._ring_for(src)
        if isinstance(dst, HostArray):
            n = src.nbytes
            if dst.nbytes != n:
                raise GuestError(f"copy of {n} bytes into {dst.nbytes} bytes")
            if n:
                _post_pinned(ring, _DTOH, ptr, dst, n)
            if blocking:
                ring.drain()
            return
        view, _, _ = as_bytes(dst)
        if view.readonly or len(view) != src.nbytes:
            raise GuestError(f"copy of {src.nbytes} bytes into a {'read-only ' if view.readonly else ''}"
                             f"{len(view)}-byte buffer")
        self._staging().download(view, ptr)

    def memset(self, dst: DeviceArray, value: int) -> None:
        """MEM_SET every byte of ``dst`` to ``value`` (asynchronous)."""
        if dst.nbytes:
            self.live_ring().post(xpu.Opcode.MEM_SET, dst.ptr, value, dst.nbytes)

    # -- modules, kernels, launches --------------------------------------------------------
    def load_module(self, source: Any) -> Module:
        """Load an IR module: its text form (``str``) or a :class:`vxpu.ir.Module`.

        Raises:
            ParseError, VerifyError: the IR is invalid (checked here first).
            DeviceError: BAD_MODULE, COMPILE_LIMIT, QUOTA_EXCEEDED ... from the device.
        """
        from vxpu.ir import encode, parse, verify

        ir = parse(source) if isinstance(source, str) else source
        verify(ir)
        handle, _ = self._call_with_data(xpu.Opcode.MODULE_LOAD, encode(ir), int(xpu.ModuleKind.IR))
        return Module(self, handle, ir)

    def kernel_get(self, module: int, name: str) -> tuple[int, int]:
        """KERNEL_GET: ``(kernel handle, packed argument size)``."""
        return self._call_with_data(xpu.Opcode.KERNEL_GET, name.encode(), module)

    def module_unload(self, handle: int) -> None:
        """MODULE_UNLOAD (asynchronous)."""
        self.live_ring().post(xpu.Opcode.MODULE_UNLOAD, handle)

    def launch(self, kernel: Kernel, dims: tuple[int, int, int], blob: bytes) -> None:
        """Post a LAUNCH of ``kernel`` (asynchronous).

        Args:
            kernel: a kernel of a loaded module.
            dims: LAUNCH's ``args[1:4]`` (:func:`vxpu.abi.xpu.pack_launch_dims`).
            blob: the packed arguments (``kernel.pack(values)``).

        Raises:
            StaleHandle: the kernel's module is gone. DeviceError: a fatal device error while
                waiting for ring space.
        """
        module = kernel.module
        if module._valid_epoch != self.epoch:
            module.check()                    # raises StaleHandle (a closed device included)
        ring = self.ring
        if ring is None or ring.faults != self._faults_seen or self.allocs.garbage:
            ring = self.live_ring()           # may find the device state lost, the module with it
            module.check()
        a1, a2, a3 = dims
        n = len(blob)
        if n == 0:
            ring.post(_LAUNCH, kernel.handle, a1, a2, a3)
        elif n <= INLINE_ARG_BYTES:
            ring.post_inline(_LAUNCH, kernel.handle, a1, a2, a3, blob)
        else:
            mem = self.transport.alloc_dma(n, contiguous=True)
            mem.view[:n] = blob
            ring.post(_LAUNCH, kernel.handle, a1, a2, a3, sg_addr=mem.address(0), sg_len=n, hold=mem)

    def synchronize(self) -> None:
        """Wait for all posted work (a FENCE) and raise the first asynchronous error.

        Raises:
            DeviceError: a command or kernel failed since the last synchronize, or the device
                stopped. After a KERNEL_FAULT, DEVICE_LOST or TIMEOUT that dropped this guest's device
                state (its result2 says so, or a probe of a sentinel allocation shows it),
                older arrays, modules and events are stale.
        """
        ring = self.ring
        if ring is None or ring.faults != self._faults_seen or self.allocs.garbage:
            ring = self.live_ring()
        status, result, _ = ring.wait(ring.post(_FENCE, waited=True))
        if ring.faults != self._faults_seen or self.allocs.garbage:
            self.live_ring()              # notices a kernel fault that reset the device state
        if ring.async_error is not None:
            ring.raise_async()
        if status:
            raise DeviceError(status, "FENCE", result=result, detail="reported by synchronize")

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Post the commands issued inside as one batch: one ``sq_tail`` store (and at most one
        doorbell) at the end, or whenever the ring is full. Outside a batch every command is
        published at once, which costs a store in guest memory (no trap) while the device polls.
        """
        ring = self.live_ring()
        ring.batching += 1
        try:
            yield
        finally:
            ring.batching -= 1
            if not ring.batching:
                ring.publish()

    def event(self) -> Event:
        """A new event (EVENT_CREATE)."""
        return Event(self, self.call(xpu.Opcode.EVENT_CREATE)[0])

    def elapsed_ms(self, start: Event, end: Event) -> float:
        """Milliseconds between two recorded events (waits for the work first)."""
        return start.elapsed_ms(end)

    # -- recovery --------------------------------------------------------------------------
    def reset(self) -> None:
        """Reset the device (Control.RESET): every allocation, module and event is dropped,
        a fatal error is cleared, and the queue starts again. Older objects become stale.

        Raises:
            DeviceError: the device refused the queue set-up again.
        """
        ring = self.ring
        if ring is None:
            raise StateError("reset after close", current="closed", required="open")
        self.transport.write_reg(xpu.REG_CONTROL, int(xpu.Control.RESET))
        self.epoch += 1
        self.allocs.garbage.clear()
        if self.staging is not None:
            self.staging.forget()
        ring.start()
        self._sentinel = self.alloc(1)
