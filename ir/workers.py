"""Compile workers: untrusted IR is compiled by LLVM in child processes under resource limits.

LLVM is not written for hostile input: a valid module of unlucky shape can make its optimiser
run for minutes, take gigabytes or crash the process (issue 7). So the serving process never
runs it; like a browser's GPU process compiling shaders, a small pool of **compile workers**
does, each one a child process::

    pool = CompilePool(size=2, limits=WorkerLimits(memory_bytes=2 << 30, cpu_seconds=10,
                                                      wall_seconds=20))
    compiled = pool.compile(wire_bytes, spec, opt_level=3, checked=True)   # a CompiledModule

* **Limits per job** (:class:`WorkerLimits`, all configurable): the address space a compile
  may add to the warm worker's is capped with ``RLIMIT_AS`` (set once the worker has loaded the
  compiler, to what it holds then plus ``memory_bytes``: that base is about 320 MiB here, and
  several GiB where a GPU driver is installed, because nvJitLink and the CUDA libraries reserve
  address space when they load; an allocation past the cap fails: a ``MemoryError``, or LLVM
  aborts);
  before each job its ``RLIMIT_CPU`` soft limit is set to the CPU time used so far plus the
  job's allowance (past it the kernel sends SIGXCPU, which ends the worker); the parent waits
  for the answer at most ``wall_seconds`` and then kills the worker's whole process group
  (the linker it may have started included). No core files are written.
* **Failure** of any kind (a crash, a limit, a deadline) fails that one compile with
  :class:`CompileLimitError`, whose message names the cause (the signal, the limit and its
  value), and the worker is replaced by a fresh one. An ordinary compile error (the module is
  valid but the target refuses it) comes back as :class:`~vxpu.ir.lower.errors.CompileError`,
  invalid IR as the decoder's or verifier's :class:`~vxpu.ir.errors.IRError`, each with its
  message; the worker stays.
* **Warm workers.** Workers start when the pool is created and import the compiler (llvmlite,
  the lowerings, the target machines, nvJitLink where it is installed) before their first job
  and before the memory limit is set, so a compile through a worker
  costs its transfer (the module in, the native code out) on top of the compile itself.
  A job waits for an idle worker; the pool never runs more than ``size`` at once.
* **Idle workers stop.** A warm worker holds the compiler's memory (about 160 MiB resident
  here, more with a GPU toolchain), and a server holds its pool for the life of its VM, which
  mostly loads its modules once, at start. A worker idle for ``idle_seconds`` (default 300)
  is stopped; the next compile that finds no idle worker starts one (paying the compiler's
  import once more, about a second). ``idle_seconds=0`` keeps workers warm for good.
* **Protocol.** The worker is ``python -m vxpu.ir.workers`` with pipes on stdin and stdout.
  It writes one ready byte, then serves frames: a request is ``u32 header length, header
  (JSON: target kind, arch, features, code-object version, opt level, checked, CPU seconds),
  u32 module length, module`` (the VXIR wire encoding, decoded and verified again in the
  worker); a reply is ``u8 outcome, u32 length, payload`` (a serialised
  :class:`~vxpu.ir.compile.CompiledModule`, or an error message).

The compile cache (:mod:`vxpu.ir.cache`) sits in front: :func:`vxpu.ir.compile.compile_module`
asks a pool only on a cache miss, so a hit never touches a worker. The process-wide pool is
:func:`sandbox_pool`, configured with :func:`configure` or the environment
(:func:`config_from_env`: ``VXPU_COMPILE_WORKERS``, ``VXPU_COMPILE_MEMORY_MB``,
``VXPU_COMPILE_CPU_S``, ``VXPU_COMPILE_WALL_S``, ``VXPU_COMPILE_IDLE_S``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Self

from vxpu.ir.lower.errors import CompileError, ToolchainError

from vxpu.log import LogBudget

__all__ = ["CompileLimitError", "CompilePool", "PoolStats", "WorkerLimits", "config_from_env", "configure",
           "sandbox_pool"]

log = logging.getLogger(__name__)

#: Worker processes in the default pool.
DEFAULT_WORKERS = 2
#: Address space one compile may add to the warm worker's (RLIMIT_AS = base + this).
DEFAULT_MEMORY_BYTES = 2 << 30
#: CPU seconds one compile may use (RLIMIT_CPU, set per job).
DEFAULT_CPU_SECONDS = 10
#: Seconds the serving process waits for one compile before it kills the worker.
DEFAULT_WALL_SECONDS = 20.0
#: Seconds a worker may sit idle before the pool stops it (0: never).
DEFAULT_IDLE_SECONDS = 300.0
#: Longest single wait of the idle reaper (it looks again then; any idle limit works).
_REAP_WAIT_MAX_S = 3600.0
#: Seconds a new worker may take to import the compiler and say it is ready.
STARTUP_SECONDS = 60.0
#: Largest reply accepted from a worker (a compiled module is far smaller).
MAX_REPLY_BYTES = 256 << 20

#: Worker failures a guest causes are logged at WARNING while this lasts, then at DEBUG.
_budget = LogBudget(32, 60.0, "further compile worker failures are logged at DEBUG for a while")
_READY = b"R"
_LEN = struct.Struct("<I")
_OK, _COMPILE_ERROR, _TOOLCHAIN_ERROR, _IR_ERROR, _OUT_OF_MEMORY = range(5)
_EXIT_OUT_OF_MEMORY = 3


class CompileLimitError(CompileError):
    """A compile worker crashed or ran past a limit; the worker was replaced.

    Attributes:
        reason: ``"deadline"``, ``"cpu"``, ``"memory"``, ``"crash"``, or ``"spawn"`` (no worker
            could be started: the host is out of processes, fds or memory; retrying may work).
    """

    def __init__(self, message: str, reason: str, *, log: str = "") -> None:
        super().__init__(message, log=log)
        self.reason = reason


@dataclass(frozen=True)
class WorkerLimits:
    """Resource limits of the compile workers. All values must be positive (``idle_seconds``
    may be 0).

    Attributes:
        memory_bytes: address space one compile may add to what the warm worker holds
            (its RLIMIT_AS is that base plus this).
        cpu_seconds: CPU time per job (RLIMIT_CPU soft limit, moved forward for each job).
        wall_seconds: wall-clock deadline per job, enforced by the parent.
        idle_seconds: a worker idle this long is stopped (0: workers stay warm for good).
    """

    memory_bytes: int = DEFAULT_MEMORY_BYTES
    cpu_seconds: int = DEFAULT_CPU_SECONDS
    wall_seconds: float = DEFAULT_WALL_SECONDS
    idle_seconds: float = DEFAULT_IDLE_SECONDS

    def __post_init__(self) -> None:
        for name, value, ok, setting in (
                ("memory_bytes", self.memory_bytes, self.memory_bytes > 0, "--compile-memory / VXPU_COMPILE_MEMORY_MB"),
                ("cpu_seconds", self.cpu_seconds, self.cpu_seconds > 0, "--compile-cpu / VXPU_COMPILE_CPU_S"),
                ("wall_seconds", self.wall_seconds, self.wall_seconds > 0, "--compile-timeout / VXPU_COMPILE_WALL_S"),
                ("idle_seconds", self.idle_seconds, self.idle_seconds >= 0, "--compile-idle / VXPU_COMPILE_IDLE_S")):
            if not ok:                      # NaN compares false: refused too
                rule = "0 or more" if name == "idle_seconds" else "positive"
                raise ValueError(f"{name} must be {rule}, got {value!r}: set {setting}")


@dataclass
class PoolStats:
    """Counters since the pool was created."""

    jobs: int = 0
    failures: int = 0               # jobs that ended in CompileLimitError
    started: int = 0                # worker processes started (replacements included)
    stopped_idle: int = 0           # workers stopped after idle_seconds without a job
    busy_seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


class _WorkerGone(Exception):
    """The worker died, overran or broke the protocol; ``reason`` says how."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Worker:
    """One child process and its pipes."""

    def __init__(self, limits: WorkerLimits) -> None:
        self.limits = limits
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vxpu.ir.workers", str(limits.memory_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                close_fds=True, start_new_session=True)
        except BaseException:
            self.stderr.close()             # no fd left behind by a failed start
            raise
        self.ready = False
        self.idle_since = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, request: bytes, wall_seconds: float) -> tuple[int, bytes]:
        """Send one job and wait for its reply.

        Raises:
            _WorkerGone: the worker died, broke the protocol or overran ``wall_seconds``.
        """
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if not self.ready:
            if self._read(1, time.monotonic() + STARTUP_SECONDS, "start") != _READY:
                raise self._gone("the compile worker did not start")
            self.ready = True
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._gone("the compile worker died before the job started") from None
        deadline = time.monotonic() + wall_seconds
        head = self._read(5, deadline)
        outcome, length = head[0], _LEN.unpack_from(head, 1)[0]
        if length > MAX_REPLY_BYTES:
            raise _WorkerGone(f"the compile worker sent a reply of {length} bytes", "crash")
        return outcome, self._read(length, deadline)

    def _read(self, n: int, deadline: float, stage: str = "compile") -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        poller = select.poll()          # not select(): the server may hold more than 1024 fds
        poller.register(fd, select.POLLIN)
        chunks: list[bytes] = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                self.kill()
                if stage == "start":
                    raise _WorkerGone(f"the compile worker did not start within {STARTUP_SECONDS:g} s; "
                                      "it was killed", "crash")
                raise _WorkerGone(f"compile ran past its wall-clock deadline of "
                                  f"{self.limits.wall_seconds:g} s; the worker was killed", "deadline")
            chunk = os.read(fd, min(n, 1 << 20))
            if not chunk:
                raise self._gone("the compile worker exited")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _gone(self, what: str) -> _WorkerGone:
        """Reap the dead (or dying) worker and say precisely how it ended."""
        try:
            code = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        if code == -signal.SIGXCPU:
            return _WorkerGone(f"compile used more than its {self.limits.cpu_seconds} s of CPU time "
                               "(SIGXCPU); the worker was replaced", "cpu")
        tail = self._stderr_tail()
        if code in (_EXIT_OUT_OF_MEMORY, -signal.SIGABRT) or "MemoryError" in tail or "bad_alloc" in tail:
            return _WorkerGone(f"compile ran out of memory: it needed more than the "
                               f"{self.limits.memory_bytes >> 20} MiB a compile may add ({_describe(code)}); "
                               "the worker was replaced", "memory")
        return _WorkerGone(f"{what}: {_describe(code)}; the worker was replaced{tail}", "crash")

    def _stderr_tail(self) -> str:
        try:
            self.stderr.seek(0, os.SEEK_END)
            size = self.stderr.tell()
            self.stderr.seek(max(0, size - 400))
            tail = self.stderr.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return f" (stderr: ...{tail.splitlines()[-1][-200:]})" if tail else ""

    def kill(self) -> None:
        """SIGKILL the worker's process group (the worker and any tool it started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self, timeout: float = 2.0) -> None:
        """Ask the worker to exit (EOF on its stdin), kill it if it does not, reap it."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self.stderr.close()


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class CompilePool:
    """A fixed number of warm compile worker processes.

    Args:
        size: number of workers (jobs beyond it wait for an idle one).
        limits: per-job resource limits, and how long a worker may sit idle.

    Thread-safe: any thread may call :meth:`compile`; the caller blocks (without the GIL)
    until its job is done. With ``limits.idle_seconds`` set, a daemon thread stops workers
    idle that long; a job that finds no idle worker starts one while fewer than ``size`` live.
    """

    def __init__(self, size: int = DEFAULT_WORKERS, limits: WorkerLimits | None = None) -> None:
        if size < 1:
            raise ValueError(f"a compile pool needs at least one worker, got {size}")
        self.size = size
        self.limits = limits or WorkerLimits()
        self.stats = PoolStats()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._running: dict[int, _Worker] = {}     # pid -> worker with a job
        self._busy = 0
        self._closed = False
        self._spawn_error = ""
        for _ in range(size):
            worker = self._try_spawn()
            if worker is not None:          # else the first job that needs one starts it
                self._idle.append(worker)
        if self.limits.idle_seconds > 0:
            threading.Thread(target=self._stop_idle_workers, name="vxpu-compile-idle", daemon=True).start()

    def _try_spawn(self) -> _Worker | None:
        """A new worker, or None when the host cannot start one now (logged, rate-limited)."""
        try:
            return self._spawn()
        except OSError as exc:
            self._spawn_error = f"{type(exc).__name__}: {exc}"
            _budget.log(log, logging.WARNING, "could not start a compile worker: %s", self._spawn_error)
            return None

    def _spawn(self) -> _Worker:
        worker = _Worker(self.limits)
        self.stats.started += 1
        log.debug("compile worker %d started", worker.pid)
        return worker

    def pids(self, *, busy: bool | None = None) -> list[int]:
        """Process ids of the workers: all, or only the busy (``True``) or idle (``False``) ones."""
        with self._cond:
            idle = [w.pid for w in self._idle] if busy is not True else []
            running = list(self._running) if busy is not False else []
            return running + idle

    def compile(self, data: bytes, spec: Any, opt_level: int = 3, checked: bool = True) -> Any:
        """Compile the VXIR wire module ``data`` for ``spec`` (a resolved
        :class:`~vxpu.ir.lower.toolchain.TargetSpec`) in a worker; returns a
        :class:`~vxpu.ir.compile.CompiledModule`.

        Raises:
            CompileLimitError: the worker crashed or ran past a limit (it was replaced).
            vxpu.ir.errors.IRError: the module does not decode or verify (message as in-process).
            ToolchainError, CompileError: the target refused the module (message as in-process).
        """
        from vxpu.ir.compile import CompiledModule

        header = json.dumps({"kind": spec.kind, "arch": spec.arch, "features": spec.features, "cov": spec.cov,
                             "opt": int(opt_level), "checked": bool(checked),
                             "cpu": self.limits.cpu_seconds}).encode()
        request = b"".join((_LEN.pack(len(header)), header, _LEN.pack(len(data)), bytes(data)))
        worker = self._acquire()
        t0 = time.monotonic()
        try:
            outcome, payload = worker.run(request, self.limits.wall_seconds)
        except _WorkerGone as exc:
            self._retire(worker, exc.reason)
            _budget.log(log, logging.WARNING, "compile worker %d: %s", worker.pid, exc)
            raise CompileLimitError(str(exc), exc.reason) from None
        except BaseException:
            self._retire(worker, "interrupted")
            raise
        finally:
            with self._cond:
                self.stats.jobs += 1
                self.stats.busy_seconds += time.monotonic() - t0
        if outcome == _OUT_OF_MEMORY:
            worker.proc.wait()
            self._retire(worker, "memory")
            raise CompileLimitError(f"compile ran out of memory: it needed more than the "
                                    f"{self.limits.memory_bytes >> 20} MiB a compile may add; the worker was "
                                    "replaced", "memory")
        if outcome == _OK:
            try:
                compiled = CompiledModule.from_bytes(payload)
            except (ValueError, KeyError, TypeError, IndexError) as exc:   # never trust the worker's bytes
                self._retire(worker, "crash")
                raise CompileLimitError(f"the compile worker sent a malformed result ({exc}); the worker was "
                                        "replaced", "crash") from None
            self._release(worker)
            return compiled
        self._release(worker)
        message = payload.decode("utf-8", "replace")
        if outcome == _IR_ERROR:
            from vxpu.ir.errors import IRError

            raise IRError(message)          # the worker's decoder or verifier refused the module
        if outcome == _TOOLCHAIN_ERROR:
            raise ToolchainError(message)
        raise CompileError(message)

    def _acquire(self) -> _Worker:
        with self._cond:
            while not self._idle and len(self._running) >= self.size:
                if self._closed:
                    raise CompileError("the compile pool is closed")
                self._cond.wait()
            if self._closed:
                raise CompileError("the compile pool is closed")
            started = self._idle.pop() if self._idle else self._try_spawn()   # idle ones were stopped
            if started is None:
                raise CompileLimitError(f"could not start a compile worker ({self._spawn_error}); the host is "
                                        "short of processes, file descriptors or memory: retry later", "spawn")
            self._busy += 1
            self._running[started.pid] = started
            return started

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            self._busy -= 1
            self._running.pop(worker.pid, None)
            if self._closed:
                worker.close()
                return
            worker.idle_since = time.monotonic()
            self._idle.append(worker)
            self._cond.notify_all()

    def _stop_idle_workers(self) -> None:
        """The idle reaper (a daemon thread): stop workers idle for ``limits.idle_seconds``."""
        idle_s = self.limits.idle_seconds
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                stale = [w for w in self._idle if now - w.idle_since >= idle_s]
                self._idle = [w for w in self._idle if now - w.idle_since < idle_s]
                self.stats.stopped_idle += len(stale)
                wake = min((w.idle_since + idle_s for w in self._idle), default=now + idle_s)
            for worker in stale:
                log.debug("compile worker %d stopped after %.0f s idle", worker.pid, idle_s)
                worker.close()
            with self._cond:
                if self._closed:
                    return
                # capped: an idle limit of inf (or 1e300) is "never", not an OverflowError
                self._cond.wait(min(_REAP_WAIT_MAX_S, max(0.05, wake - time.monotonic())))

    def _retire(self, worker: _Worker, reason: str) -> None:
        """Reap a failed worker and start its replacement."""
        worker.kill()
        worker.close(timeout=0)
        with self._cond:
            self._busy -= 1
            self._running.pop(worker.pid, None)
            self.stats.failures += 1
            self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
            if not self._closed:
                replacement = self._try_spawn()     # None: the next job starts one (or says why not)
                if replacement is not None:
                    self._idle.append(replacement)
                self._cond.notify_all()

    def close(self) -> None:
        """Stop every idle worker now (busy ones stop when their job ends)."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            worker.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: CompilePool | None = None
_default_config: tuple[int, WorkerLimits] | None = None
_default_lock = threading.Lock()


def config_from_env(env: dict[str, str] | None = None) -> tuple[int, WorkerLimits]:
    """Pool size and limits from ``VXPU_COMPILE_WORKERS`` (0: compile in-process, for trusted
    local use only), ``VXPU_COMPILE_MEMORY_MB``, ``VXPU_COMPILE_CPU_S`` and
    ``VXPU_COMPILE_WALL_S`` and ``VXPU_COMPILE_IDLE_S``; the defaults for those not set.

    Raises:
        ValueError: a value that is not a number, or not positive.
    """
    env = dict(os.environ) if env is None else env
    try:
        size = int(env.get("VXPU_COMPILE_WORKERS", DEFAULT_WORKERS))
        limits = WorkerLimits(int(env.get("VXPU_COMPILE_MEMORY_MB", DEFAULT_MEMORY_BYTES >> 20)) << 20,
                              int(env.get("VXPU_COMPILE_CPU_S", DEFAULT_CPU_SECONDS)),
                              float(env.get("VXPU_COMPILE_WALL_S", DEFAULT_WALL_SECONDS)),
                              float(env.get("VXPU_COMPILE_IDLE_S", DEFAULT_IDLE_SECONDS)))
    except ValueError as exc:
        raise ValueError(f"bad compile worker setting in the environment: {exc}") from None
    if size < 0:
        raise ValueError(f"VXPU_COMPILE_WORKERS must be 0 or more, got {size}")
    return size, limits


def configure(size: int = DEFAULT_WORKERS, limits: WorkerLimits | None = None) -> None:
    """Set the size and limits of the process-wide pool (replacing a running one); ``size`` 0
    turns the sandbox off (:func:`sandbox_pool` then returns None: in-process compiles).

    Raises:
        ValueError: ``size`` < 0 or a limit that is not positive.
    """
    global _default, _default_config
    if size < 0:
        raise ValueError(f"a compile pool size must be 0 or more, got {size}")
    with _default_lock:
        _default_config = (size, limits or WorkerLimits())
        old, _default = _default, None
    if old is not None:
        old.close()


def sandbox_pool() -> CompilePool | None:
    """The process-wide pool (started on first use, closed at exit; configured by
    :func:`configure`, else by :func:`config_from_env`), or None when it is configured off."""
    global _default, _default_config
    with _default_lock:
        if _default_config is None:
            _default_config = config_from_env()
        if _default is None and _default_config[0] > 0:
            _default = CompilePool(*_default_config)
        return _default


@atexit.register
def _close_default() -> None:
    pool = _default
    if pool is not None:
        pool.close()


# --- the worker process ---------------------------------------------------------------------

def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    data = stream.read(n)
    if data is None or len(data) < n:
        return None
    return data


def _reply(out: IO[bytes], outcome: int, payload: bytes) -> None:
    out.write(bytes([outcome]) + _LEN.pack(len(payload)) + payload)
    out.flush()


def _serve_job(header: dict[str, Any], data: bytes) -> tuple[int, bytes]:
    from vxpu.ir.binary import decode
    from vxpu.ir.compile import compile_verified
    from vxpu.ir.errors import IRError
    from vxpu.ir.lower.toolchain import TargetSpec

    try:
        module = decode(data)
        spec = TargetSpec(str(header["kind"]), str(header["arch"]), str(header["features"]), int(header["cov"]))
        compiled = compile_verified(module, spec, int(header["opt"]), bool(header["checked"]))
    except IRError as exc:
        return _IR_ERROR, str(exc).encode()
    except CompileError as exc:
        if isinstance(exc.__cause__, MemoryError):   # the compiler wraps whatever stopped it
            raise exc.__cause__ from None
        return (_TOOLCHAIN_ERROR if isinstance(exc, ToolchainError) else _COMPILE_ERROR), str(exc).encode()
    return _OK, compiled.to_bytes()


def _warm_nvptx() -> None:
    """Compile an empty kernel to a cubin before the memory limit is set, so nvJitLink (a
    library of a few hundred MiB of address space) is loaded then and not by the first job:
    under a tight limit that load itself fails ("failed to map segment"). Skipped quietly
    where nvJitLink is not installed."""
    from vxpu.ir.compile import compile_verified
    from vxpu.ir.lower.toolchain import resolve_target
    from vxpu.ir.text import parse

    try:
        compile_verified(parse("module @warm\nkernel @warm() {\n^entry:\n  ret\n}\n"), resolve_target("nvptx"), 3)
    except CompileError as exc:
        log.debug("nvptx warm-up skipped: %s", exc)


def _address_space() -> int:
    """This process's address space now (VmSize), in bytes."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmSize:"):
                return int(line.split()[1]) << 10
    raise OSError("no VmSize in /proc/self/status")


def worker_main(memory_bytes: int) -> int:
    """The worker process: limit itself, import the compiler, say ready, serve jobs until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr                         # stray prints must not corrupt the protocol
    import vxpu.ir.compile  # noqa: F401 - warm: llvmlite, the lowerings, the target machines
    from vxpu.ir.lower import toolchain

    toolchain.resolve_target("x86")
    _warm_nvptx()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    out.write(_READY)
    out.flush()
    while True:
        head = _read_exact(inp, 4)
        if head is None:
            return 0
        header_raw = _read_exact(inp, _LEN.unpack(head)[0])
        size = _read_exact(inp, 4)
        data = _read_exact(inp, _LEN.unpack(size)[0]) if size is not None else None
        if header_raw is None or data is None:
            return 0
        header = json.loads(header_raw)
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = int(used.ru_utime + used.ru_stime) + 1
        _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (spent + int(header["cpu"]), cpu_hard))
        try:
            outcome, payload = _serve_job(header, data)
        except MemoryError:
            _reply(out, _OUT_OF_MEMORY, b"")
            return _EXIT_OUT_OF_MEMORY
        _reply(out, outcome, payload)


def _main() -> None:
    try:
        code = worker_main(int(sys.argv[1]))
    except MemoryError:
        os._exit(_EXIT_OUT_OF_MEMORY)       # no unwinding: the next allocation could fail too
    sys.exit(code)


if __name__ == "__main__":
    _main()
