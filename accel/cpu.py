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

**Time limit.** Guest kernels may never terminate (``^l: br ^l``). Every launch runs under a
watchdog: one thread per backend keeps the deadlines of the running launches and, when one
passes, sets that launch's cancel word (:class:`vxpu.ir.cpu_exec.CancelToken`); the generated
code polls it at every loop header and thread start and stops. The launch then fails with
:attr:`Status.TIMEOUT` and the context is reset like after a kernel fault; the backend keeps
serving. A reset or :meth:`CpuBackend.close` cancels running kernels the same way, so neither
hangs. ``kernel_timeout`` (seconds, ``None`` = no limit) may be changed at run time; it applies
to launches that start afterwards.

Options (``cpu,arena=2G,threads=4,timeout=10s``): ``arena`` (size of the arena, default 1G),
``threads`` (block worker threads, default the number of CPUs) and ``timeout`` (the time limit
per launch: ``500ms``, ``10s``, ``2m``, ``1h`` or plain seconds; ``off`` or ``0`` for none;
default :data:`DEFAULT_KERNEL_TIMEOUT`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
import platform
import re
import threading
import time
from typing import Any

from vxpu.accel.backend import (
    BackendError,
    DeviceProperties,
    FaultRecord,
    KernelFaultError,
    KernelInfo,
    ModuleKind,
    Status,
)
from vxpu.accel.hostbase import DEFAULT_ARENA_BYTES, HostBackend

log = logging.getLogger(__name__)

MAX_THREADS_PER_BLOCK = 1024
MAX_SHARED_PER_BLOCK = 48 * 1024
MAX_WORKER_THREADS = 256
#: Ranges per worker thread, for load balance when blocks take uneven time.
RANGES_PER_THREAD = 4
#: Loaded (MCJIT) modules kept for reuse when the same IR is loaded again.
LOADED_MODULES = 64
#: Seconds a launch may run before it is cancelled and reported as TIMEOUT (option ``timeout``).
DEFAULT_KERNEL_TIMEOUT = 30.0
#: Longest settable limit (a day); ``off`` disables the limit altogether.
MAX_KERNEL_TIMEOUT = 86400.0
_DURATION_RE = re.compile(r"^(\d{1,9}(?:\.\d{1,6})?)\s*(ms|s|m|h)?$")
_UNIT_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_timeout(value: float | str | None) -> float | None:
    """Parse the ``timeout`` option: seconds as a number or ``"500ms"``, ``"10s"``, ``"2m"``,
    ``"1h"``; ``None``, ``0``, ``"off"`` or ``"none"`` mean no limit.

    Raises:
        BackendError: INVALID_ARGUMENT for anything else or a limit above a day.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("off", "none", "0"):
            return None
        m = _DURATION_RE.match(text)
        if not m:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"timeout={value!r} is not a duration (use e.g. 500ms, 10s, 2m, or off)")
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2) or "s"]
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_KERNEL_TIMEOUT:
        raise BackendError(Status.INVALID_ARGUMENT,
                           f"timeout={value!r} must be 0 (off) to {MAX_KERNEL_TIMEOUT:g} seconds")
    return seconds or None


class _Launch:
    """The watchdog's record of a launch running on one thread (reused: one per thread)."""

    __slots__ = ("deadline", "timed_out", "token")

    def __init__(self, token: Any) -> None:
        self.token = token
        self.deadline = math.inf
        self.timed_out = False


class _Watchdog:
    """One thread that cancels launches running past their deadline.

    :meth:`arm`/:meth:`disarm` cost a lock and a set update; the thread sleeps until the
    earliest deadline (or indefinitely while no launch has one).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._cv = threading.Condition()
        self._running: set[_Launch] = set()
        self._wake = math.inf
        self._stopping = False
        self._thread: threading.Thread | None = None

    def arm(self, launch: _Launch, limit: float | None) -> None:
        """Clear ``launch``'s token and watch it (``limit`` seconds from now; None: no limit)."""
        with self._cv:
            launch.token.reset()
            launch.timed_out = False
            launch.deadline = math.inf if limit is None else time.monotonic() + limit
            self._running.add(launch)
            if launch.deadline == math.inf:
                return
            if self._thread is None:
                self._wake = launch.deadline
                self._thread = threading.Thread(target=self._run, name=f"vxpu-{self._name}-watchdog", daemon=True)
                self._thread.start()
            elif launch.deadline < self._wake:
                self._cv.notify()

    def disarm(self, launch: _Launch) -> None:
        with self._cv:
            self._running.discard(launch)

    def cancel_all(self) -> None:
        """Cancel every running launch (they are not marked as timed out)."""
        with self._cv:
            for launch in self._running:
                launch.token.cancel()

    def stop(self) -> None:
        """End the thread (idempotent); call after every launch has finished."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        with self._cv:
            self._stopping = False
            self._wake = math.inf

    def _run(self) -> None:
        with self._cv:
            while not self._stopping:
                now = time.monotonic()
                nearest = math.inf
                for launch in self._running:
                    if launch.timed_out:
                        continue
                    if launch.deadline <= now:
                        launch.timed_out = True
                        launch.token.cancel()
                    else:
                        nearest = min(nearest, launch.deadline)
                self._wake = nearest
                self._cv.wait(None if nearest == math.inf else nearest - now)


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
        timeout: time limit per launch (seconds or a duration string such as ``"10s"``;
            ``"off"`` for none); default :data:`DEFAULT_KERNEL_TIMEOUT`.
        cache: a ``vxpu.ir.cache.CompileCache`` (default: the process-wide memory + disk cache).
    """

    name = "cpu"

    def __init__(self, index: int = 0, *, arena: int | str = DEFAULT_ARENA_BYTES,
                 threads: int | str | None = None, timeout: float | str | None = DEFAULT_KERNEL_TIMEOUT,
                 cache: Any = None) -> None:
        super().__init__(index, arena=arena)
        try:
            n = int(threads) if threads is not None else (os.cpu_count() or 1)
        except ValueError:
            raise BackendError(Status.INVALID_ARGUMENT, f"threads={threads!r} is not a number") from None
        if not 1 <= n <= MAX_WORKER_THREADS:
            raise BackendError(Status.INVALID_ARGUMENT, f"threads={n} must be 1..{MAX_WORKER_THREADS}")
        self.threads = n
        #: Seconds a launch may run (None: no limit); read when each launch starts.
        self.kernel_timeout = parse_timeout(timeout)
        self._watchdog = _Watchdog(self.name)
        self._tls = threading.local()
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
        self._watchdog.stop()

    def _cancel_running(self) -> None:
        self._watchdog.cancel_all()

    def properties(self) -> DeviceProperties:
        return DeviceProperties(
            backend="cpu", name=_cpu_model(), vendor="host", architecture=self._arch,
            memory_total=self.arena_size, compute_units=self.threads,
            max_threads_per_block=MAX_THREADS_PER_BLOCK, max_shared_memory_per_block=MAX_SHARED_PER_BLOCK,
            features=frozenset({"ir", "atomics-f32", "atomics-f64", "fp16", "deterministic-atomics",
                                "kernel-timeout", "checked-ir"}),
        )

    # -- code -------------------------------------------------------------------------
    def _load(self, image: bytes, kind: ModuleKind) -> Any:
        if kind is not ModuleKind.IR:
            raise BackendError(Status.UNSUPPORTED, f"the CPU backend runs IR modules only, not {kind.value}")
        try:
            from vxpu.accel.compile_status import compile_error
            from vxpu.ir import compile as ir_compile
            from vxpu.ir import cpu_exec
            from vxpu.ir.errors import IRError
            from vxpu.ir.lower.errors import CompileError
            from vxpu.ir.workers import sandbox_pool
        except ImportError as exc:
            raise BackendError(Status.UNAVAILABLE, f"the IR compiler cannot be imported: {exc}") from exc
        store = self._cache if self._cache is not None else ir_compile.default_cache()
        try:
            # LLVM runs in a compile worker (never here), so loads of other clients and every
            # other call go on meanwhile; only loading the object into the JIT is serialised.
            misses = store.stats.misses
            compiled = ir_compile.compile_module(image, "x86", cache=store, workers=sandbox_pool())
            hit = store.stats.misses == misses
            with self._compile_lock:
                module = self._loaded.get(id(compiled))
                if module is None or module.compiled is not compiled:
                    module = cpu_exec.CpuModule(compiled)
                    self._loaded[id(compiled)] = module
                    while len(self._loaded) > LOADED_MODULES:
                        self._loaded.popitem(last=False)
                else:
                    self._loaded.move_to_end(id(compiled))
        except (IRError, CompileError) as exc:  # the one table, by type (CompileLimitError included)
            raise compile_error(exc, "x86") from exc
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
        return kernel, KernelInfo.from_signature(kernel.signature, checked=kernel.layout.checked)

    def _prepare(self, kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: bytes, shared_bytes: int, bounds: tuple[tuple[int, int], ...] | None = None
                 ) -> tuple[Any, ...]:
        threads = block[0] * block[1] * block[2]
        if threads > MAX_THREADS_PER_BLOCK:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"{threads} threads per block exceed {MAX_THREADS_PER_BLOCK}")
        static = kernel.signature.static_shared_bytes
        if not 0 <= shared_bytes <= MAX_SHARED_PER_BLOCK - static:
            raise BackendError(Status.INVALID_ARGUMENT,
                               f"dynamic shared memory {shared_bytes} + static {static} "
                               f"exceeds {MAX_SHARED_PER_BLOCK} bytes")
        return grid, block, args, shared_bytes, self._generation, bounds

    def _execute(self, kernel: Any, work: tuple[Any, ...]) -> None:
        """Run a launch under the watchdog; a cancel by the time limit becomes TIMEOUT."""
        from vxpu.ir.cpu_exec import FAULT_CANCELLED, KernelFault

        launch = self._launch_record()
        limit = self.kernel_timeout
        self._watchdog.arm(launch, limit)
        try:
            if work[4] != self._generation:
                return      # a reset or close dropped this launch's context as it was dequeued
            self._run(kernel, work, launch.token)
        except KernelFault as exc:
            if exc.code != FAULT_CANCELLED:
                raise
            if launch.timed_out:
                raise BackendError(Status.TIMEOUT, f"kernel {kernel.name!r} ran longer than the {limit:g} s time "
                                   "limit and was stopped; the context was reset. Raise the limit with the "
                                   "backend option timeout= (e.g. 'cpu,timeout=120s', or 'off')") from None
            # Cancelled by a reset or close: the generation has moved on, so the backend counts
            # this as a fault of the old context and raises nothing to anyone.
            raise BackendError(Status.KERNEL_FAULT, f"kernel {kernel.name!r} was cancelled: its context "
                               "was reset or the backend closed") from None
        finally:
            self._watchdog.disarm(launch)

    def _launch_record(self) -> _Launch:
        """This thread's reusable watchdog record (its cancel token serves one launch at a time)."""
        launch = getattr(self._tls, "launch", None)
        if launch is None:
            from vxpu.ir.cpu_exec import CancelToken

            launch = self._tls.launch = _Launch(CancelToken())
        return launch

    def _run(self, kernel: Any, work: tuple[Any, ...], token: Any) -> None:
        grid, block, args, shared_bytes, _, bounds = work
        nblocks = grid[0] * grid[1] * grid[2]
        base, size = self.arena_base, self.arena_size
        if self._executor is None or nblocks == 1 or kernel.uses_global_atomics:
            kernel.run(grid, block, args, base, size, dynamic_shared=shared_bytes, cancel=token, bounds=bounds)
            return
        parts = min(nblocks, self.threads * RANGES_PER_THREAD)
        cuts = [nblocks * i // parts for i in range(parts + 1)]
        futures = [self._executor.submit(kernel.run, grid, block, args, base, size, dynamic_shared=shared_bytes,
                                         blocks=range(cuts[i], cuts[i + 1]), cancel=token, bounds=bounds)
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
            # Checked (or arena-checked) code stopped before the bad access: contained.
            return KernelFaultError(FaultRecord(exc.kernel, exc.code, exc.param, exc.address, exc.block, exc.thread))
        return super()._map_fault(exc)
