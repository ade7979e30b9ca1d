"""The CPU backend: the embedded default, running IR kernels as LLVM-compiled x86 code.

Memory, queues, events and fault recovery come from :class:`vxpu.accel.hostbase.HostBackend`
(device memory is a host arena; addresses are offsets into it). Kernels are IR modules compiled
by :mod:`vxpu.ir` through its compile cache; the generated code bounds-checks every access
against the arena and reports a violation (or a ``trap``) as a kernel fault.

**Execution.** A launch runs on its queue's worker thread. The grid's blocks, in linear order
``x + gx * (y + gy * z)``, are split into contiguous ranges that run on a pool of worker
threads (the native call releases the GIL).

**Reproducibility rule.** Results are bit-for-bit reproducible across runs and thread counts:

* a kernel that uses **global atomics** runs all its blocks on one thread in linear block order
  (so the order of, e.g., float atomic additions is fixed);
* any other kernel runs its blocks in parallel; blocks of a race-free kernel touch disjoint
  global memory, so the order does not matter. (Non-atomic races between blocks are undefined
  behaviour on every backend.)

Within a block, threads run in thread-index order between barriers (the compiler's
work-item-loop scheme), so shared-memory atomics are deterministic too.

Options (``cpu,arena=2G,threads=4``): ``arena`` (size of the arena, default 1G) and ``threads``
(block worker threads, default the number of CPUs).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import platform
import threading
from typing import Any

from vxpu.accel.backend import BackendError, DeviceProperties, KernelInfo, ModuleKind, Status
from vxpu.accel.hostbase import DEFAULT_ARENA_BYTES, HostBackend

log = logging.getLogger(__name__)

MAX_THREADS_PER_BLOCK = 1024
MAX_SHARED_PER_BLOCK = 48 * 1024
MAX_WORKER_THREADS = 256
#: Ranges per worker thread, for load balance when blocks take uneven time.
RANGES_PER_THREAD = 4
#: Loaded (MCJIT) modules kept for reuse when the same IR is loaded again.
LOADED_MODULES = 64


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuBackend(HostBackend):
    """Runs IR kernels on host CPU threads. See the module docstring for the execution rules.

    Args:
        index: device index (only 0).
        arena: arena size (bytes or a size string such as ``"2G"``).
        threads: block worker threads (default: the number of CPUs).
        cache: a ``vxpu.ir.cache.CompileCache`` (default: the process-wide memory + disk cache).
    """

    name = "cpu"

    def __init__(self, index: int = 0, *, arena: int | str = DEFAULT_ARENA_BYTES,
                 threads: int | str | None = None, cache: Any = None) -> None:
        super().__init__(index, arena=arena)
        try:
            n = int(threads) if threads is not None else (os.cpu_count() or 1)
        except ValueError:
            raise BackendError(Status.INVALID_ARGUMENT, f"threads={threads!r} is not a number") from None
        if not 1 <= n <= MAX_WORKER_THREADS:
            raise BackendError(Status.INVALID_ARGUMENT, f"threads={n} must be 1..{MAX_WORKER_THREADS}")
        self.threads = n
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._cache = cache
        self._compile_lock = threading.Lock()
        self._loaded: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._arch = platform.machine()

    def _open_hook(self) -> None:
        try:
            import llvmlite.binding as llvm

            self._arch = llvm.get_host_cpu_name() or self._arch
        except Exception as exc:  # noqa: BLE001 - llvmlite missing or broken: IR loads will say so
            log.debug("host CPU name unavailable: %s", exc)
        if self.threads > 1:
            self._executor = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="vxpu-cpu-block")

    def close(self) -> None:
        super().close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def properties(self) -> DeviceProperties:
        return DeviceProperties(
            backend="cpu", name=_cpu_model(), vendor="host", architecture=self._arch,
            memory_total=self.arena_size, compute_units=self.threads,
            max_threads_per_block=MAX_THREADS_PER_BLOCK, max_shared_memory_per_block=MAX_SHARED_PER_BLOCK,
            features=frozenset({"ir", "atomics-f32", "atomics-f64", "fp16", "deterministic-atomics"}),
        )

    # -- code -------------------------------------------------------------------------
    def _load(self, image: bytes, kind: ModuleKind) -> Any:
        if kind is not ModuleKind.IR:
            raise BackendError(Status.UNSUPPORTED, f"the CPU backend runs IR modules only, not {kind.value}")
        try:
            from vxpu.ir import compile as ir_compile
            from vxpu.ir import cpu_exec
            from vxpu.ir.errors import IRError
            from vxpu.ir.lower.errors import CompileError, ToolchainError
        except ImportError as exc:
            raise BackendError(Status.UNAVAILABLE, f"the IR compiler cannot be imported: {exc}") from exc
        store = self._cache if self._cache is not None else ir_compile.default_cache()
        try:
            with self._compile_lock:
                misses = store.stats.misses
                compiled = ir_compile.compile_module(image, "x86", cache=store)
                hit = store.stats.misses == misses
                module = self._loaded.get(id(compiled))
                if module is None or module.compiled is not compiled:
                    module = cpu_exec.CpuModule(compiled)
                    self._loaded[id(compiled)] = module
                    while len(self._loaded) > LOADED_MODULES:
                        self._loaded.popitem(last=False)
                else:
                    self._loaded.move_to_end(id(compiled))
        except IRError as exc:
            raise BackendError(Status.BAD_MODULE, f"IR module rejected: {exc}", log=str(exc)) from exc
        except ToolchainError as exc:
            raise BackendError(Status.UNAVAILABLE, f"the x86 toolchain failed: {exc}", log=exc.log) from exc
        except CompileError as exc:
            raise BackendError(Status.BAD_MODULE, f"IR module does not compile: {exc}", log=exc.log) from exc
        if hit:
            self.stats.compile_cache_hits += 1
        else:
            self.stats.compile_cache_misses += 1
        return module

    def _kernel(self, payload: Any, name: str) -> tuple[Any, KernelInfo]:
        try:
            kernel = payload.kernel(name)
        except KeyError as exc:
            raise BackendError(Status.NOT_FOUND, str(exc.args[0]) if exc.args else f"no kernel {name!r}") from None
        return kernel, kernel.info

    def _prepare(self, kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: bytes, shared_bytes: int) -> tuple[Any, ...]:
        threads = block[0] * block[1] * block[2]
        if threads > MAX_THREADS_PER_BLOCK:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"{threads} threads per block exceed {MAX_THREADS_PER_BLOCK}")
        if not 0 <= shared_bytes <= MAX_SHARED_PER_BLOCK - kernel.info.static_shared_bytes:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"dynamic shared memory {shared_bytes} + static {kernel.info.static_shared_bytes} "
                               f"exceeds {MAX_SHARED_PER_BLOCK} bytes")
        return grid, block, args, shared_bytes

    def _execute(self, kernel: Any, work: tuple[Any, ...]) -> None:
        grid, block, args, shared_bytes = work
        nblocks = grid[0] * grid[1] * grid[2]
        base, size = self.arena_base, self.arena_size
        if self._executor is None or nblocks == 1 or kernel.uses_global_atomics:
            kernel.run(grid, block, args, base, size, dynamic_shared=shared_bytes)
            return
        parts = min(nblocks, self.threads * RANGES_PER_THREAD)
        bounds = [nblocks * i // parts for i in range(parts + 1)]
        futures = [self._executor.submit(kernel.run, grid, block, args, base, size,
                                         dynamic_shared=shared_bytes, blocks=range(bounds[i], bounds[i + 1]))
                   for i in range(parts)]
        first: BaseException | None = None
        for fut in futures:           # wait for all; report the fault of the lowest block range
            exc = fut.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first

    def _map_fault(self, exc: BaseException) -> BackendError:
        from vxpu.ir.cpu_exec import KernelFault

        if isinstance(exc, KernelFault):
            return BackendError(Status.KERNEL_FAULT, str(exc))
        return super()._map_fault(exc)
