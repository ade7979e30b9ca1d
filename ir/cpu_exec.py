"""Run x86-compiled IR kernels in this process: the API the CPU backend builds on.

::

    cm = compile_module(ir_bytes, "x86")
    mod = CpuModule(cm)                       # loads the native code (MCJIT)
    k = mod.kernel("saxpy")
    k.info                                    # accel.backend.KernelInfo (packed-args layout)
    k.run(grid=(64, 1, 1), block=(256, 1, 1), args=packed, arena_base=addr, arena_size=n)

One :meth:`CpuKernel.run` is one native call (``ctypes``, so the GIL is released) that loops
over its range of blocks and their threads in generated code. Device pointers are offsets into
the caller's arena. In the checked build (the default) every access is checked against its own
buffer: ``run(..., bounds=[(base, length), ...])`` gives one pair per pointer parameter (the
allocation behind the address; checked here to lie inside the arena, so the arena can never be
left); without ``bounds`` each pointer may reach the whole arena. A hostile kernel raises
:class:`KernelFault` (with the parameter and the offset within its buffer) instead of touching
host memory. ``run`` keeps no
state between calls: several OS threads may run disjoint ``blocks`` ranges of the same launch
at once (each call allocates its own context and scratch memory).

**Cancellation.** ``run(..., cancel=token)`` takes a :class:`CancelToken`: another thread may
call ``token.cancel()`` at any time and the generated code stops at its next check (every loop
header and every thread start, see :mod:`vxpu.ir.lower.x86`), raising :class:`KernelFault`
with code :data:`FAULT_CANCELLED`. One token may be shared by the concurrent block ranges of a
launch; it stays set until :meth:`CancelToken.reset`.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from typing import Any

from vxpu.ir.args import KernelSignature
from vxpu.ir.compile import CompiledModule, compile_module
from vxpu.ir.lower import x86 as x86_lower
from vxpu.ir.lower.bounds import BASE_ALIGN, ORIGIN_NONE, describe_origin
from vxpu.ir.lower.errors import CompileError

from vxpu.errors import Error

log = logging.getLogger(__name__)

__all__ = [
    "FAULT_CANCELLED",
    "FAULT_MESSAGES",
    "MAX_SHARED_BYTES",
    "MAX_THREADS_PER_BLOCK",
    "CancelToken",
    "CpuKernel",
    "CpuModule",
    "KernelFault",
    "load",
]

MAX_THREADS_PER_BLOCK = 1024
#: Largest shared window (static + dynamic) per block.
MAX_SHARED_BYTES = 1 << 20
_MAX_DIM = 0x7FFFFFFF

FAULT_MESSAGES = {
    x86_lower.FAULT_GLOBAL: "global/constant memory access outside its buffer",
    x86_lower.FAULT_SHARED: "shared memory access outside its array",
    x86_lower.FAULT_LOCAL: "local memory access outside its array",
    x86_lower.FAULT_MISALIGNED: "misaligned memory access",
    x86_lower.FAULT_TRAP: "the kernel executed trap",
    x86_lower.FAULT_BARRIER: "barrier reached non-uniformly (threads of a block diverged at a barrier)",
    x86_lower.FAULT_CANCELLED: "cancelled by the host",
}
FAULT_CANCELLED = x86_lower.FAULT_CANCELLED
_CTX_LEN = len(x86_lower.CTX_FIELDS)
_CtxArray = ctypes.c_uint64 * _CTX_LEN
_F = {name: i for i, name in enumerate(x86_lower.CTX_FIELDS)}
_LAUNCH_TYPE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p)


class CancelToken:
    """The cancel word of a launch: an aligned u32 that generated code polls.

    ``cancel()`` and ``reset()`` are single aligned 4-byte stores, safe from any thread while
    kernels run; the kernels read the word with relaxed atomic loads, so a cancel is seen at
    their next check (microseconds later).
    """

    __slots__ = ("_word", "address")

    def __init__(self) -> None:
        self._word = ctypes.c_uint32(0)
        self.address = ctypes.addressof(self._word)

    def cancel(self) -> None:
        """Ask every kernel running with this token to stop."""
        self._word.value = 1

    def reset(self) -> None:
        """Clear the word, so the token can serve the next launch."""
        self._word.value = 0

    @property
    def cancelled(self) -> bool:
        return bool(self._word.value)


#: Passed to launches that have no token; never set.
_NEVER = CancelToken()


class KernelFault(Error):
    """A kernel faulted; the launch stopped. The faulting access was not performed, and
    nothing outside the buffers the launch was given (the arena, unchecked) was touched.

    Attributes:
        code: one of the ``FAULT_*`` codes of :mod:`vxpu.ir.lower.bounds`.
        block: the faulting block's (x, y, z).
        thread: the faulting thread's (x, y, z).
        address: the offending offset within the buffer (checked build; the arena / shared /
            local offset in an unchecked one), 0 for traps, barriers and cancels.
        param: the buffer's origin: the pointer parameter's index, ``0x100 + j`` for shared
            array ``j``, ``0x200 + j`` for local array ``j``, or ``ORIGIN_NONE``.
    """

    def __init__(self, kernel: str, code: int, block: tuple[int, int, int], thread: tuple[int, int, int],
                 address: int, param: int = ORIGIN_NONE) -> None:
        what = FAULT_MESSAGES.get(code, f"fault code {code}")
        where = "" if param == ORIGIN_NONE else f", {describe_origin(param)}"
        super().__init__(f"kernel {kernel!r} faulted: {what} (block {block}, thread {thread}{where}, "
                         f"offset {address:#x})")
        self.kernel = kernel
        self.code = code
        self.block = block
        self.thread = thread
        self.address = address
        self.param = param


class CpuKernel:
    """One loaded kernel. Get it from :meth:`CpuModule.kernel`."""

    def __init__(self, module: CpuModule, sig: KernelSignature, layout: x86_lower.X86KernelLayout,
                 address: int) -> None:
        self._module = module  # keeps the machine code alive
        self.name = sig.name
        self.signature = sig
        self.layout = layout
        self.uses_global_atomics = sig.uses_global_atomics
        self.has_barriers = layout.has_barriers
        self._fn = _LAUNCH_TYPE(address)

    def run(self, grid: Sequence[int], block: Sequence[int], args: bytes | bytearray | memoryview,
            arena_base: int, arena_size: int, dynamic_shared: int = 0, blocks: range | None = None,
            cancel: CancelToken | None = None, bounds: Sequence[tuple[int, int]] | None = None) -> None:
        """Run blocks of a launch to completion on the calling OS thread.

        Args:
            grid: blocks per grid (1-3 dims).
            block: threads per block (1-3 dims, at most :data:`MAX_THREADS_PER_BLOCK` in all).
            args: the packed parameters (``info.param_offsets``); at least ``info.args_size`` bytes.
            arena_base: host address of the client's arena (device address 0).
            arena_size: its size in bytes; every global/constant access is checked against it.
            dynamic_shared: extra shared bytes per block (beyond the static arrays).
            blocks: which linear block indices to run (x fastest); default all. Disjoint ranges may
                run concurrently from different threads.
            cancel: a token another thread may set to stop the launch (see :class:`CancelToken`).
            bounds: ``(base, length)`` arena offsets of each pointer parameter's buffer, in
                parameter order (checked build); a zero length makes every access through that
                parameter fault. Default: the whole arena for each.

        Raises:
            ValueError: malformed launch arguments (shape, sizes, ranges).
            KernelFault: the kernel faulted (or was cancelled: code :data:`FAULT_CANCELLED`);
                blocks after the faulting one were not run.
        """
        g, bl, rng = self._check_launch(grid, block, blocks)
        if len(rng) == 0:
            return
        data = bytes(args)
        if len(data) < self.signature.args_size:
            raise ValueError(f"kernel {self.name!r} needs {self.signature.args_size} bytes of arguments, "
                             f"got {len(data)}")
        if arena_size < 0 or arena_base < 0 or (arena_size and not arena_base) or arena_base + arena_size >= 1 << 64:
            raise ValueError("arena_base/arena_size do not describe a host memory range")
        if arena_base % BASE_ALIGN:     # the generated alignment checks test offsets
            raise ValueError(f"arena_base must be a multiple of {BASE_ALIGN}")
        table = self._bounds_table(bounds, arena_size)
        if not 0 <= dynamic_shared <= MAX_SHARED_BYTES - self.layout.static_shared:
            raise ValueError(f"dynamic shared memory must be 0..{MAX_SHARED_BYTES - self.layout.static_shared}")
        shared_size = self.layout.static_shared + dynamic_shared
        per = bl[0] * bl[1] * bl[2] if self.layout.has_barriers else 1
        spill_at = _align64(shared_size)
        local_at = spill_at + _align64(per * self.layout.spill_frame)
        scratch = ctypes.create_string_buffer(local_at + _align64(per * self.layout.local_size) + 64)
        base = _align64(ctypes.addressof(scratch))
        argbuf = ctypes.create_string_buffer(data, max(1, len(data)))
        ctx = _CtxArray()
        for name, value in (("arena_base", arena_base), ("arena_size", arena_size), ("args", ctypes.addressof(argbuf)),
                            ("shared", base), ("shared_size", shared_size), ("spill", base + spill_at),
                            ("local", base + local_at), ("block_begin", rng.start), ("block_end", rng.stop),
                            ("grid_x", g[0]), ("grid_y", g[1]), ("grid_z", g[2]),
                            ("block_x", bl[0]), ("block_y", bl[1]), ("block_z", bl[2]),
                            ("cancel", (cancel or _NEVER).address), ("bounds", ctypes.addressof(table))):
            ctx[_F[name]] = value
        rc = self._fn(ctypes.addressof(ctx))
        if rc != 0:
            self._raise(ctx, g, bl)

    def _bounds_table(self, bounds: Sequence[tuple[int, int]] | None, arena_size: int) -> Any:
        """The ``(base, length)`` u64 pairs the generated code reads, after checking that each
        range lies inside the arena (so a per-buffer check can never leave it)."""
        count = len(self.layout.pointer_params)
        pairs = [(0, arena_size)] * count if bounds is None else [(int(b), int(n)) for b, n in bounds]
        if len(pairs) != count:
            raise ValueError(f"kernel {self.name!r} has {count} pointer parameters, got {len(pairs)} bounds")
        table = (ctypes.c_uint64 * max(1, 2 * count))()
        for k, (base, length) in enumerate(pairs):
            if base < 0 or length < 0 or base + length > arena_size or base % BASE_ALIGN:
                raise ValueError(f"bounds {k} ({base:#x}, {length}) do not lie inside the {arena_size}-byte arena "
                                 f"at a multiple of {BASE_ALIGN}")
            table[2 * k], table[2 * k + 1] = base, length
        return table

    @staticmethod
    def _check_launch(grid: Sequence[int], block: Sequence[int], blocks: range | None
                      ) -> tuple[tuple[int, int, int], tuple[int, int, int], range]:
        g = _dims(grid, "grid")
        bl = _dims(block, "block")
        nthreads = bl[0] * bl[1] * bl[2]
        if nthreads > MAX_THREADS_PER_BLOCK:
            raise ValueError(f"block has {nthreads} threads; at most {MAX_THREADS_PER_BLOCK}")
        total = g[0] * g[1] * g[2]
        if total >= 1 << 63:
            raise ValueError(f"grid {g} has more than 2^63 blocks")
        rng = range(total) if blocks is None else blocks
        if rng.step != 1 or rng.start < 0 or rng.stop > total:
            raise ValueError(f"blocks must be a step-1 range within 0..{total}, got {rng}")
        return g, bl, rng

    def _raise(self, ctx: Any, g: tuple[int, int, int], bl: tuple[int, int, int]) -> None:
        lb, lt = ctx[_F["fault_block"]], ctx[_F["fault_thread"]]
        blk = (lb % g[0], lb // g[0] % g[1], lb // (g[0] * g[1]))
        thr = (lt % bl[0], lt // bl[0] % bl[1], lt // (bl[0] * bl[1]))
        fault = KernelFault(self.name, int(ctx[_F["fault_code"]]), blk, thr, int(ctx[_F["fault_addr"]]),
                            int(ctx[_F["fault_param"]]))
        log.debug("%s", fault)
        raise fault


def _align64(n: int) -> int:
    return (n + 63) & ~63


def _dims(dims: Sequence[int], what: str) -> tuple[int, int, int]:
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} needs 1-3 dimensions, got {len(dims)}")
    out = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if any(d < 1 or d > _MAX_DIM for d in out):
        raise ValueError(f"{what} dimensions must be in 1..2^31-1, got {out}")
    return out  # type: ignore[return-value]


class CpuModule:
    """x86 machine code of a compiled module, loaded into this process (MCJIT).

    Args:
        compiled: a :class:`CompiledModule` for target x86 (built on this host's CPU).

    Raises:
        CompileError: the module is for another target or its code cannot be loaded.
    """

    _lock = threading.Lock()

    def __init__(self, compiled: CompiledModule) -> None:
        if compiled.kind != "x86":
            raise CompileError(f"module {compiled.name!r} was compiled for {compiled.kind}, not x86")
        import llvmlite.binding as llvm
        from vxpu.ir.lower.toolchain import LLVM_LOCK, llvm_binding, resolve_target

        llvm_binding()
        self.compiled = compiled
        with LLVM_LOCK:
            try:
                spec = resolve_target("x86", compiled.arch)
                _resolve_imports(compiled)
                # MCJIT takes ownership of the TargetMachine and frees it with the engine, so
                # each engine needs its own: never hand it the cached ``target_machine()``.
                own_tm = llvm.Target.from_triple(spec.triple).create_target_machine(
                    cpu=spec.arch, features=spec.features, opt=0, codemodel="jitdefault")
                self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), own_tm)
                self._engine.add_object_file(llvm.ObjectFileRef.from_data(compiled.image))
                self._engine.finalize_object()
            except RuntimeError as exc:
                raise CompileError(f"cannot load x86 code of module {compiled.name!r}: {exc}") from exc
            layouts = {name: x86_lower.layout_from_json(d) for name, d in compiled.extra["layouts"].items()}
            self._kernels = {}
            for name, sig in compiled.kernels.items():
                lay = layouts[name]
                addr = self._engine.get_function_address(lay.symbol)
                if not addr:
                    raise CompileError(f"x86 code of module {compiled.name!r} lacks {lay.symbol}")
                self._kernels[name] = CpuKernel(self, sig, lay, addr)

    @property
    def kernels(self) -> dict[str, CpuKernel]:
        """All kernels by name."""
        return dict(self._kernels)

    def kernel(self, name: str) -> CpuKernel:
        """The kernel called ``name``.

        Raises:
            KeyError: no such kernel (the message lists the ones there are).
        """
        try:
            return self._kernels[name]
        except KeyError:
            raise KeyError(f"module {self.compiled.name!r} has no kernel {name!r}; it has "
                           f"{', '.join(self._kernels) or 'none'}") from None


_IMPORT_LIBS = (None, "libm.so.6", "libc.so.6")
_resolved: dict[str, int] = {}


def _resolve_imports(compiled: CompiledModule) -> None:
    """Check that every symbol the object imports (``memset``, ``fmaf`` on CPUs without FMA ...)
    exists in this process, and bind it explicitly: MCJIT would otherwise bind a missing one to
    address 0 and the first call would crash the server.

    Raises:
        CompileError: an import cannot be found in this process or the runtime libraries.
    """
    import llvmlite.binding as llvm
    from vxpu.ir.lower.toolchain import elf_undefined_symbols

    for name in elf_undefined_symbols(compiled.image):
        if name in _resolved:
            continue
        addr = 0
        for lib in _IMPORT_LIBS:
            try:
                fn = getattr(ctypes.CDLL(lib), name)
            except (OSError, AttributeError):
                continue
            addr = ctypes.cast(fn, ctypes.c_void_p).value or 0
            if addr:
                break
        if not addr:
            raise CompileError(f"x86 code of module {compiled.name!r} needs {name!r}, which this host lacks")
        llvm.add_symbol(name, addr)
        _resolved[name] = addr


def load(module_or_bytes: Any, *, opt_level: int = 3, cache: Any = None, checked: bool = True) -> CpuModule:
    """Compile (through the cache) for this host and load: ``compile_module`` + :class:`CpuModule`
    (``checked=False``: the unchecked build, for trusted modules only)."""
    return CpuModule(compile_module(module_or_bytes, "x86", opt_level=opt_level, cache=cache, checked=checked))
