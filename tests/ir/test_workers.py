"""Compile workers (issue 7): LLVM runs in child processes under memory, CPU and time limits.

Each limit is driven past on purpose with a valid module that is slow to compile, and a
worker is killed from outside mid-compile; every time the one compile fails with
CompileLimitError naming the cause, the worker is replaced, and the next compile succeeds.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from vxpu.ir import samples
from vxpu.ir.binary import encode
from vxpu.ir.cache import CompileCache
from vxpu.ir.compile import compile_module
from vxpu.ir.errors import IRError
from vxpu.ir.workers import CompileLimitError, CompilePool, WorkerLimits, config_from_env

from . import hostile_shapes as hs

SAXPY = encode(samples.load_module("saxpy.vxir"))


def slow_module() -> bytes:
    """A valid module at the module op limit: several seconds of LLVM on one core."""
    return encode(hs.many_kernels(4, 8192))


def ok(pool: CompilePool) -> None:
    """The pool still compiles (with a fresh worker where one was replaced)."""
    compiled = compile_module(SAXPY, "x86", cache=False, workers=pool)
    assert "saxpy" in compiled.kernels and compiled.image


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_compiles_what_this_process_compiles():
    with CompilePool(1) as pool:
        here = compile_module(SAXPY, "x86", cache=False)
        there = compile_module(SAXPY, "x86", cache=False, workers=pool)
        assert there.kernels == here.kernels and there.target == here.target
        assert there.image == here.image
        assert pool.stats.jobs == 1 and pool.stats.failures == 0


def test_the_cache_answers_a_hit_without_a_worker(tmp_path):
    cache = CompileCache(tmp_path)
    with CompilePool(1) as pool:
        first = compile_module(SAXPY, "x86", cache=cache, workers=pool)
        again = compile_module(SAXPY, "x86", cache=cache, workers=pool)
        assert again is first and pool.stats.jobs == 1


def test_invalid_ir_and_compile_errors_come_back_with_their_message():
    with CompilePool(1) as pool:
        with pytest.raises(IRError, match="loops are nested 100 deep"):
            pool.compile(encode(hs.loop_nest(100)), _x86(), 3, True)     # the worker verifies again
        assert pool.stats.failures == 0
        ok(pool)


def test_wall_clock_deadline():
    with CompilePool(1, WorkerLimits(wall_seconds=0.5)) as pool:
        ok(pool)                                  # warm: the deadline covers the compile only
        old = pool.pids()
        slow = slow_module()                      # encoded outside the timed span (slow on a loaded box)
        start = time.monotonic()
        with pytest.raises(CompileLimitError, match="wall-clock deadline of 0.5 s") as info:
            compile_module(slow, "x86", cache=False, workers=pool)
        assert info.value.reason == "deadline"
        assert time.monotonic() - start < 3.0
        assert not any(alive(pid) for pid in old)
        ok(pool)
        assert pool.stats.started == 2


def test_cpu_limit():
    with CompilePool(1, WorkerLimits(cpu_seconds=1, wall_seconds=60)) as pool:
        ok(pool)
        with pytest.raises(CompileLimitError, match="more than its 1 s of CPU time") as info:
            compile_module(slow_module(), "x86", cache=False, workers=pool)
        assert info.value.reason == "cpu"
        ok(pool)


def test_memory_limit():
    """The limit bounds what a compile adds to the warm worker's address space: a few MiB is
    not enough for this module, so its allocations fail."""
    with CompilePool(1, WorkerLimits(memory_bytes=4 << 20)) as pool:
        with pytest.raises(CompileLimitError, match="out of memory") as info:
            compile_module(slow_module(), "x86", cache=False, workers=pool)
        assert info.value.reason == "memory"
    with CompilePool(1) as pool:
        ok(pool)


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmSize:")).split()[1]) << 10


def test_the_memory_limit_is_counted_from_the_warm_worker():
    """A worker whose libraries take more address space than ``memory_bytes`` still compiles
    (on a GPU host nvJitLink and the CUDA libraries reserve gigabytes when they load): the limit
    is set to half of what a warm worker holds here, whatever this host loads."""
    with CompilePool(1) as pool:
        ok(pool)
        warm = _vm_size(pool.pids()[0])
    with CompilePool(1, WorkerLimits(memory_bytes=warm // 2)) as pool:
        ok(pool)
        assert _vm_size(pool.pids()[0]) > warm // 2


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_killed_mid_compile_fails_that_compile_only(sig):
    with CompilePool(1, WorkerLimits(wall_seconds=60)) as pool:
        ok(pool)
        outcome: list[BaseException] = []

        def load() -> None:
            try:
                compile_module(slow_module(), "x86", cache=False, workers=pool)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                outcome.append(exc)

        thread = threading.Thread(target=load)
        thread.start()
        for _ in range(500):
            busy = pool.pids(busy=True)
            if busy:
                break
            time.sleep(0.01)
        time.sleep(0.2)                           # well inside LLVM
        os.kill(busy[0], sig)
        thread.join(30)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], CompileLimitError), outcome
        assert outcome[0].reason == "crash" and signal.Signals(sig).name in str(outcome[0])
        ok(pool)


def test_two_workers_compile_at_once():
    with CompilePool(2, WorkerLimits(wall_seconds=60)) as pool:
        ok(pool)
        ok(pool)
        errors: list[BaseException] = []
        threads = [threading.Thread(target=lambda: _catch(errors, lambda: ok(pool))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert len(set(pool.pids())) == 2


def test_configuration_from_the_environment():
    size, limits = config_from_env({"VXPU_COMPILE_WORKERS": "3", "VXPU_COMPILE_MEMORY_MB": "512",
                                    "VXPU_COMPILE_CPU_S": "4", "VXPU_COMPILE_WALL_S": "7.5"})
    assert size == 3 and limits == WorkerLimits(512 << 20, 4, 7.5)
    assert config_from_env({"VXPU_COMPILE_WORKERS": "0"})[0] == 0
    with pytest.raises(ValueError, match="compile worker"):
        config_from_env({"VXPU_COMPILE_CPU_S": "soon"})
    with pytest.raises(ValueError):
        config_from_env({"VXPU_COMPILE_WALL_S": "0"})


def test_close_stops_every_worker():
    pool = CompilePool(2)
    ok(pool)
    pids = pool.pids()
    pool.close()
    assert not any(alive(pid) for pid in pids)


def _catch(errors: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
        errors.append(exc)


def _x86():
    from vxpu.ir.lower.toolchain import resolve_target

    return resolve_target("x86")


def test_a_process_with_many_fds_still_waits_for_its_worker():
    """The parent may hold more than 1024 fds (select() could not wait on the worker's pipe)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the fd limit ({hard}) is too low to hold 1100 fds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY
                                                else min(max(soft, 1200), hard), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        with CompilePool(1) as pool:
            assert pool.pids() and max(held) > 1024
            ok(pool)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_malformed_result_is_a_worker_failure(monkeypatch):
    """The parent never trusts what a worker sends back (its LLVM ran on guest input)."""
    from vxpu.ir import workers as W

    with CompilePool(1) as pool:
        ok(pool)
        real = W._Worker.run

        def garbage(self, request: bytes, wall: float) -> tuple[int, bytes]:
            real(self, request, wall)
            return W._OK, b"VXCM\x01\x00\xff\xff\xff\x7f{"

        monkeypatch.setattr(W._Worker, "run", garbage)
        with pytest.raises(CompileLimitError, match="malformed result") as info:
            compile_module(SAXPY, "x86", cache=False, workers=pool)
        assert info.value.reason == "crash"
        monkeypatch.undo()
        ok(pool)
        assert pool.stats.started == 2


def test_idle_workers_stop_and_the_next_compile_starts_one():
    """A worker idle past ``idle_seconds`` exits (its process is reaped); a later compile
    starts a fresh one and succeeds; ``idle_seconds=0`` keeps workers for good."""
    with CompilePool(size=2, limits=WorkerLimits(idle_seconds=0.5)) as pool:
        first = pool.pids()           # both warm workers, before one compile keeps one of them busy
        assert len(first) == 2        # (on a loaded box the idle one may stop while it runs)
        ok(pool)
        deadline = time.monotonic() + 30
        while (pool.pids() or any(alive(pid) for pid in first)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool.pids() == [] and pool.stats.stopped_idle == 2
        assert not any(alive(pid) for pid in first)     # exited and reaped (no zombies)
        ok(pool)                                   # lazily started again
        assert len(pool.pids()) == 1 and pool.pids()[0] not in first
    with CompilePool(size=1, limits=WorkerLimits(idle_seconds=0)) as pool:
        ok(pool)
        pid = pool.pids()
        time.sleep(1.0)
        assert pool.pids() == pid and alive(pid[0]) and pool.stats.stopped_idle == 0


def test_idle_limit_from_the_environment_and_its_validation():
    assert config_from_env({"VXPU_COMPILE_IDLE_S": "7.5"})[1].idle_seconds == 7.5
    assert config_from_env({"VXPU_COMPILE_IDLE_S": "0"})[1].idle_seconds == 0
    with pytest.raises(ValueError):
        config_from_env({"VXPU_COMPILE_IDLE_S": "-1"})


@pytest.mark.parametrize("idle", [float("inf"), 1e300])
def test_an_idle_limit_too_long_for_a_timed_wait_keeps_the_reaper_running(idle):
    """``--compile-idle inf`` (or a huge number) means "practically never": the reaper must keep
    waiting, not die on a wait too long for the platform's clock (OverflowError)."""
    died: list[BaseException] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_value)  # type: ignore[assignment,return-value]
    try:
        with CompilePool(size=1, limits=WorkerLimits(idle_seconds=idle)) as pool:
            ok(pool)
            time.sleep(0.3)
            reapers = [t for t in threading.enumerate() if t.name == "vxpu-compile-idle"]
            assert reapers and all(t.is_alive() for t in reapers) and not died
            assert len(pool.pids()) == 1 and pool.stats.stopped_idle == 0
    finally:
        threading.excepthook = old_hook


def test_the_idle_limit_from_the_serve_flag_or_the_environment(monkeypatch):
    """``vxpu serve --compile-idle S`` overrides ``VXPU_COMPILE_IDLE_S``; a negative one is a
    configuration error (docs/ir-lowering.md's table of compile limits)."""
    from vxpu.vfio_server import cli

    from vxpu import cli as top

    def limits(*argv: str) -> WorkerLimits:
        return cli.compile_config(top.build_parser().parse_args(["serve", "--socket", "s", *argv]))[1]

    monkeypatch.delenv("VXPU_COMPILE_IDLE_S", raising=False)
    assert limits().idle_seconds == 300
    monkeypatch.setenv("VXPU_COMPILE_IDLE_S", "12")
    assert limits().idle_seconds == 12
    assert limits("--compile-idle", "0").idle_seconds == 0
    with pytest.raises(cli.ConfigError):
        limits("--compile-idle", "-1")


def test_a_worker_that_cannot_start_fails_that_compile_only(monkeypatch):
    """The host cannot start a process (EAGAIN): the compile fails with CompileLimitError
    reason "spawn" (the session's COMPILE_LIMIT, not a raw OSError = INTERNAL), no fd is left
    behind, and once starting works again the next compile succeeds."""
    import subprocess

    with CompilePool(size=1, limits=WorkerLimits(idle_seconds=0)) as pool:
        (pid,) = pool.pids()
        real_popen = subprocess.Popen

        def no_fork(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise BlockingIOError(11, "Resource temporarily unavailable")

        monkeypatch.setattr(subprocess, "Popen", no_fork)
        os.kill(pid, signal.SIGKILL)               # the worker dies; its replacement cannot start
        fds_before = len(os.listdir("/proc/self/fd"))
        for _ in range(2):
            with pytest.raises(CompileLimitError) as info:
                ok(pool)
        assert info.value.reason == "spawn" and "could not start a compile worker" in str(info.value)
        assert len(os.listdir("/proc/self/fd")) <= fds_before        # the failed starts leaked nothing
        assert pool.pids() == []
        monkeypatch.setattr(subprocess, "Popen", real_popen)
        ok(pool)
        assert len(pool.pids()) == 1
