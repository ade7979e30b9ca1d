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
from collections.abc import Sequence
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
        dims = xpu.pack_launch_dims(dims3(grid, "grid"), dims3(block, "block"), shared)
        self.module.device.launch(self, dims, self.pack(args))

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
                except struct.error:           # e.g. an unsigned value for a signed parameter,
                    pass                       # an array where a number goes: the general path
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
    """``kernel[grid, block]``: call it with the kernel's arguments."""

    __slots__ = ("block", "dims", "grid", "kernel", "shared")

    def __init__(self, kernel: Kernel, grid: tuple[int, int, int], block: tuple[int, int, int],
                 shared: int) -> None:
        self.kernel, self.grid, self.block, self.shared = kernel, grid, block, shared
        self.dims = xpu.pack_launch_dims(grid, block, shared)

    def __call__(self, *args: Any) -> None:
        k = self.kernel
        k.module.device.launch(k, self.dims, k.pack(args))


class Module:
    """A module loaded on the device (create with ``Device.load_module``).

    Attributes:
        device: the owning device. handle: the device's module handle.
        ir: the IR module (its kernels' signatures come from here).
    """

    def __init__(self, device: Device, handle: int, ir: IRModule) -> None:
        self.device, self.handle, self.ir = device, handle, ir
        self.epoch = device.epoch
        self._kernels: dict[str, Kernel] = {}
        self._finalizer = weakref.finalize(self, device.allocs.defer, self.epoch, int(xpu.Opcode.MODULE_UNLOAD),
                                           handle)

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
            self.check()
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
        if not self._finalizer.alive or self.epoch != self.device.epoch:
            raise StaleHandle(f"module {self.handle:#x}")

    def __getattr__(self, name: str) -> Kernel:
        if name.startswith("_"):
            raise AttributeError(name)
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
        if self._finalizer.detach() is not None and self.epoch == self.device.epoch:
            self.device.module_unload(self.handle)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()


#: Argument blobs larger than this use a DMA buffer of their own instead of the side area.
INLINE_ARG_BYTES = SIDE_BYTES
