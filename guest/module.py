"""Loaded modules and their kernels: ``mod.saxpy[grid, block](n, a, x, y)``.

A :class:`Module` is one MODULE_LOAD of an IR module. Its kernels are attributes (or items,
``mod["saxpy"]``); the first access asks the device for the kernel handle (KERNEL_GET), and
the argument layout comes from the IR itself (:func:`vxpu.ir.args.kernel_signature`), so the
guest packs arguments exactly as every backend unpacks them.

Launching reads like CUDA's triple chevrons: ``kernel[grid, block]`` or
``kernel[grid, block, shared_bytes]`` gives a launcher, and calling it with one value per
parameter posts one LAUNCH. Pointer parameters take a :class:`~vxpu.guest.array.DeviceArray`
(or a raw device address, an int); number parameters take numbers. The launch is asynchronous:
``Device.synchronize()`` waits for it and reports a kernel fault.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

from vxpu.guest.array import DeviceArray, StaleHandle
from vxpu.guest.errors import GuestError
from vxpu.guest.ring import SIDE_BYTES
from vxpu.ir.args import KernelSignature, kernel_signature, pack_args
from vxpu.ir.model import Module as IRModule

from vxpu.abi import xpu

if TYPE_CHECKING:
    from vxpu.guest.sdk import Device

Dims = int | Sequence[int]
#: Argument blobs larger than this use a DMA buffer of their own instead of the side area.
INLINE_ARG_BYTES = SIDE_BYTES
_LAUNCH = int(xpu.Opcode.LAUNCH)
#: Launch configurations a kernel remembers (``kernel[grid, block]`` then costs a dict lookup).
MAX_CACHED_LAUNCHERS = 64


def dims3(d: Dims, what: str) -> tuple[int, int, int]:
    """A grid or block given as an int or 1-3 ints, as three ints.

    Raises:
        GuestError: not 1-3 positive integers.
    """
    t = (d,) if isinstance(d, int) else tuple(d)
    if not 1 <= len(t) <= 3 or not all(isinstance(v, int) and v >= 1 for v in t):
        raise GuestError(f"{what} must be 1-3 positive integers, got {d!r}")
    return (t + (1, 1))[:3]  # type: ignore[return-value]


_INT_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}
_FLOAT_CODES = {"f16": "e", "f32": "f", "f64": "d"}


def layout_struct(sig: KernelSignature) -> struct.Struct | None:
    """A ``struct.Struct`` that packs ``sig``'s arguments exactly like
    :func:`vxpu.ir.args.pack_args` does for in-range values (pointers as u64, integers signed),
    or None for a parameter type it does not know. Out-of-range values make it raise
    ``struct.error``; callers then use ``pack_args``, which accepts unsigned values too and
    explains refusals."""
    fmt, pos = "<", 0
    for tname, size, off in zip(sig.param_types, sig.param_sizes, sig.param_offsets):
        code = "Q" if tname.startswith("ptr") else _FLOAT_CODES.get(tname) or (
            _INT_CODES.get(size) if tname.startswith("i") else None)
        if code is None or off < pos:
            return None
        fmt += "x" * (off - pos) + code
        pos = off + size
    fmt += "x" * (sig.args_size - pos)
    packer = struct.Struct(fmt)
    return packer if packer.size == sig.args_size else None


class Kernel:
    """One kernel of a loaded module; index it with ``[grid, block]`` or ``[grid, block, shared]``.

    Attributes:
        name: the kernel's name. handle: the device's kernel handle.
        signature: its argument layout (:class:`vxpu.ir.args.KernelSignature`).
    """

    def __init__(self, module: Module, name: str, handle: int, signature: KernelSignature) -> None:
        self.module, self.name, self.handle, self.signature = module, name, handle, signature
        self._ptr_params = tuple(t.startswith("ptr") for t in signature.param_types)
        self._ptr_index = tuple(i for i, p in enumerate(self._ptr_params) if p)
        self._struct = layout_struct(signature)
        self._launchers: dict[tuple[Any, ...], _Launcher] = {}

    def __getitem__(self, config: tuple[Any, ...]) -> _Launcher:
        try:
            launcher = self._launchers.get(config)
        except TypeError:              # an unhashable configuration (lists inside)
            launcher = None
        if launcher is not None:
            return launcher
        if not isinstance(config, tuple) or len(config) not in (2, 3):
            raise GuestError(f"launch as kernel[grid, block] or kernel[grid, block, shared_bytes], got {config!r}")
        shared = int(config[2]) if len(config) == 3 else 0
        launcher = _Launcher(self, dims3(config[0], "grid"), dims3(config[1], "block"), shared)
        if len(self._launchers) < MAX_CACHED_LAUNCHERS:
            try:
                self._launchers[config] = launcher
            except TypeError:          # an unhashable config (lists): not cached
                pass
        return launcher

    def launch(self, grid: Dims, block: Dims, *args: Any, shared: int = 0) -> None:
        """Post one LAUNCH (asynchronous); the same as ``kernel[grid, block, shared](*args)``.

        Raises:
            IRError: wrong argument count or a value that does not fit its parameter.
            StaleHandle: the module or an array is from before a reset.
            GuestError: a bad grid, block or argument kind. DeviceError: a fatal device error.
        """
        self[grid, block, shared](*args)

    def pack(self, args: Sequence[Any]) -> bytes:
        """The argument blob for ``args`` (arrays become their device addresses).

        Raises:
            IRError, StaleHandle, GuestError: as for :meth:`launch`.
        """
        values = list(args)
        if len(values) == len(self._ptr_params):
            for i in self._ptr_index:          # the common case: arrays where pointers go
                v = values[i]
                if isinstance(v, DeviceArray):
                    values[i] = v.ptr
            if self._struct is not None:
                try:
                    return self._struct.pack(*values)
                except (struct.error, OverflowError):   # e.g. an unsigned value for a signed
                    pass                       # parameter, an array where a number goes, a float
                    #                            too large for f32: the general path explains
        for i, v in enumerate(values):
            if isinstance(v, DeviceArray):
                if i < len(self._ptr_params) and not self._ptr_params[i]:
                    raise GuestError(f"@{self.name} parameter %{self.signature.param_names[i]} is "
                                     f"{self.signature.param_types[i]}, not a pointer; got an array")
                values[i] = v.ptr
        return pack_args(self.signature, values)

    def __repr__(self) -> str:
        params = ", ".join(f"{t} %{n}" for t, n in zip(self.signature.param_types, self.signature.param_names))
        return f"<Kernel @{self.name}({params})>"


class _Launcher:
    """``kernel[grid, block]``: call it with the kernel's arguments.

    Everything that does not change between calls is worked out here, once: the LAUNCH
    descriptor's arguments, the argument packer and whether the blob fits the side area. A call
    then makes the checks :meth:`Device.launch` makes (the device is open, a kernel fault that
    reset the device state has been noticed, the module is not stale, every array is live) and
    packs the values straight into the ring slot's side area (:meth:`Ring.post_packed`), with
    no intermediate bytes. Anything the packer refuses (an unsigned value for a signed
    parameter, an array where a number goes, a wrong count ...) goes the general way,
    :meth:`Kernel.pack` then :meth:`Device.launch`, which packs or explains exactly as before.
    """

    __slots__ = ("_a1", "_a2", "_a3", "_device", "_handle", "_module", "_nparams", "_pack_into", "_ptr_index",
                 "_size", "block", "dims", "grid", "kernel", "shared")

    def __init__(self, kernel: Kernel, grid: tuple[int, int, int], block: tuple[int, int, int],
                 shared: int) -> None:
        self.kernel, self.grid, self.block, self.shared = kernel, grid, block, shared
        self.dims = xpu.pack_launch_dims(grid, block, shared)
        self._a1, self._a2, self._a3 = self.dims
        self._module = kernel.module
        self._device = kernel.module.device
        self._handle = kernel.handle
        self._nparams = len(kernel._ptr_params)
        self._ptr_index = kernel._ptr_index
        packer = kernel._struct
        self._pack_into: Callable[..., None] | None = None     # None: the general path packs
        self._size = 0
        if packer is not None and 0 < packer.size <= INLINE_ARG_BYTES:
            self._pack_into, self._size = packer.pack_into, packer.size

    def __call__(self, *args: Any) -> None:
        dev, module = self._device, self._module
        if module._valid_epoch != dev.epoch:
            module.check()                     # raises StaleHandle (a closed device included)
        ring = dev.ring
        if ring is None or ring.faults != dev._faults_seen or dev.allocs.garbage:
            ring = dev.live_ring()             # may find the device state lost ...
            if module._valid_epoch != dev.epoch:
                module.check()                 # ... and the module with it
        if len(args) == self._nparams:
            if not args:
                ring.post(_LAUNCH, self._handle, self._a1, self._a2, self._a3)
                return
            pack_into = self._pack_into
            if pack_into is not None:
                values: Sequence[Any] = args
                if self._ptr_index:
                    values = list(args)
                    for i in self._ptr_index:
                        v = values[i]
                        if isinstance(v, DeviceArray):    # DeviceArray.ptr, inlined (it raises)
                            values[i] = v._ptr if v._valid_epoch == v.device.epoch else v.ptr
                try:
                    ring.post_packed(_LAUNCH, self._handle, self._a1, self._a2, self._a3, pack_into, self._size,
                                     values)
                    return
                except (struct.error, OverflowError):
                    pass                       # nothing was posted; the general path decides
        k = self.kernel
        dev.launch(k, self.dims, k.pack(args))


class Module:
    """A module loaded on the device (create with ``Device.load_module``).

    Attributes:
        device: the owning device. handle: the device's module handle.
        ir: the IR module (its kernels' signatures come from here).
    """

    def __init__(self, device: Device, handle: int, ir: IRModule) -> None:
        self.device, self.handle, self.ir = device, handle, ir
        self.epoch = device.epoch
        #: ``epoch`` until :meth:`unload` (then -1): ``_valid_epoch == device.epoch`` is the
        #: whole staleness check, one comparison on every launch.
        self._valid_epoch = self.epoch
        self._kernels: dict[str, Kernel] = {}
        self._finalizer = weakref.finalize(self, device.allocs.defer, self.epoch, int(xpu.Opcode.MODULE_UNLOAD),
                                           handle)
        self._finalizer.atexit = False         # only unload() or collection ends the module

    @property
    def kernel_names(self) -> list[str]:
        """The names of the module's kernels."""
        return [k.name for k in self.ir.kernels]

    def kernel(self, name: str) -> Kernel:
        """The kernel ``name`` (KERNEL_GET on first use).

        Raises:
            GuestError: the module has no such kernel. StaleHandle: unloaded or reset.
            DeviceError: the device refused (NOT_FOUND, INVALID_HANDLE ...).
        """
        k = self._kernels.get(name)
        if k is not None:
            if self._valid_epoch != self.device.epoch:
                self.check()                  # raises StaleHandle
            return k
        ir_kernel = next((k for k in self.ir.kernels if k.name == name), None)
        if ir_kernel is None:
            raise GuestError(f"module has no kernel @{name} (it has: {', '.join(self.kernel_names)})")
        self.check()
        sig = kernel_signature(ir_kernel)
        handle, args_size = self.device.kernel_get(self.handle, name)
        if args_size != sig.args_size:
            raise GuestError(f"@{name}: the device packs {args_size} argument bytes, the IR says {sig.args_size}")
        if sig.args_size > xpu.MAX_ARG_BYTES:
            raise GuestError(f"@{name} takes {sig.args_size} argument bytes (limit {xpu.MAX_ARG_BYTES})")
        k = self._kernels[name] = Kernel(self, name, handle, sig)
        return k

    def check(self) -> None:
        """Raise StaleHandle if the module was unloaded or the device reset since loading."""
        if self._valid_epoch != self.device.epoch:
            raise StaleHandle(f"module {self.handle:#x}")

    def __getattr__(self, name: str) -> Kernel:
        if name.startswith("_"):
            raise AttributeError(name)
        k = self._kernels.get(name)           # kernel(name) for a known kernel, without the calls
        if k is not None and self._valid_epoch == self.device.epoch:
            return k
        try:
            return self.kernel(name)
        except GuestError as exc:
            if "has no kernel" in str(exc):
                raise AttributeError(str(exc)) from None
            raise

    def __getitem__(self, name: str) -> Kernel:
        return self.kernel(name)

    def unload(self) -> None:
        """MODULE_UNLOAD (after the work already posted; idempotent). A module that becomes
        garbage is unloaded at the device's next command."""
        self._valid_epoch = -1
        if self._finalizer.detach() is not None and self.epoch == self.device.epoch:
            self.device.module_unload(self.handle)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()


