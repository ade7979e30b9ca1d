"""The sample kernels (``vxpu/ir/sample_kernels/*.vxir``) as a registry: inputs, launches, references.

For every sample, :class:`Sample` knows its .vxir file and builds a :class:`Case` for a
problem size: the initial contents of every device buffer, the launches (kernel, grid, block,
arguments, where :class:`Buf` names a buffer), which buffers are outputs, the numpy reference
and the allowed error per output (zero: bit-exact). :func:`run_case` runs a case on the
reference interpreter or on the x86 JIT and :func:`compare` checks results against the
reference. Tests, the CPU backend and the GPU benchmarks share this::

    from vxpu.ir import samples
    s = samples.SAMPLES["sgemm"]
    case = s.case((100, 70, 33), seed=1)            # awkward sizes are fine
    out = samples.run_case(case, backend="x86")
    assert not samples.compare(case, out)

The .vxir files are package data of ``vxpu.ir`` (the ``ir/sample_kernels`` folder, which a
checkout's ``examples/kernels`` links to), read through :mod:`importlib.resources`, so a wheel
install has them too; ``$VXPU_KERNELS_DIR`` names another directory to read them from.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .args import kernel_signature, pack_args
from .errors import IRError
from .model import Module

__all__ = [
    "SAMPLES",
    "Buf",
    "Case",
    "Launch",
    "Sample",
    "compare",
    "kernels_dir",
    "load_module",
    "run_case",
    "run_launches",
]

BLOCK = 256
TILE = 16
#: The package-data folder of ``vxpu.ir`` that holds the sample kernels.
SAMPLE_KERNELS = "sample_kernels"


def kernels_dir() -> Path:
    """The directory holding the sample .vxir files (``$VXPU_KERNELS_DIR``, else the package data).

    Raises:
        IRError: it cannot be found (an install without its package data, or a wrong
            VXPU_KERNELS_DIR; point VXPU_KERNELS_DIR at examples/kernels of a checkout).
    """
    env = os.environ.get("VXPU_KERNELS_DIR")
    data = resources.files(__package__).joinpath(SAMPLE_KERNELS)
    path = Path(env) if env else Path(str(data))
    if not path.is_dir():
        raise IRError(f"sample kernels not found at {path}; set VXPU_KERNELS_DIR to the examples/kernels "
                      "folder of a vxpu checkout")
    return path


def load_module(file: str) -> Module:
    """Parse and verify the sample file ``file`` (e.g. ``"saxpy.vxir"``).

    Raises:
        IRError: the file is missing or invalid.
    """
    from .text import parse
    from .verify import verify

    module = parse((kernels_dir() / file).read_text())
    verify(module)
    return module


@dataclass(frozen=True)
class Buf:
    """A launch argument that is the device address of the named buffer."""

    name: str


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``args`` holds numbers and :class:`Buf` references."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[Any, ...]


@dataclass
class Case:
    """A sample at one problem size: buffers, launches and the reference results.

    ``tolerance[name]`` is the allowed absolute error per element (a number or an array the
    output's shape); 0 means the output must match bit for bit (NaNs match NaNs).
    """

    sample: str
    size: tuple[int, ...]
    buffers: dict[str, np.ndarray]
    launches: list[Launch]
    expected: dict[str, np.ndarray]
    tolerance: dict[str, Any] = field(default_factory=dict)

    @property
    def outputs(self) -> tuple[str, ...]:
        """Names of the output buffers."""
        return tuple(self.expected)


@dataclass(frozen=True)
class Sample:
    """One sample kernel file and how to exercise it.

    Attributes:
        name: registry key.
        file: the .vxir file name in :func:`kernels_dir`.
        description: one line.
        default_size: a typical problem size.
        test_sizes: awkward sizes the tests run (non-multiples of the block size).
        backend_exact: True if every backend must give the same bits (False when the kernel uses
            ops specified only to a few ulp, e.g. exp).
    """

    name: str
    file: str
    description: str
    default_size: tuple[int, ...]
    test_sizes: tuple[tuple[int, ...], ...]
    backend_exact: bool
    builder: Callable[[tuple[int, ...], np.random.Generator], Case]

    def module(self) -> Module:
        """The parsed, verified module (a fresh copy each call)."""
        return load_module(self.file)

    def case(self, size: int | Sequence[int] | None = None, seed: int = 0) -> Case:
        """A :class:`Case` for ``size`` (default :attr:`default_size`) with inputs from ``seed``.

        Raises:
            IRError: a size of the wrong shape or out of range.
        """
        dims = self.default_size if size is None else ((size,) if isinstance(size, int) else tuple(size))
        if len(dims) != len(self.default_size) or any(int(d) < 1 for d in dims):
            raise IRError(f"sample {self.name} takes a size of {len(self.default_size)} positive integers "
                          f"(like {self.default_size}), got {size!r}")
        return self.builder(tuple(int(d) for d in dims), np.random.default_rng(seed))


def _blocks(n: int, per: int = BLOCK) -> int:
    return max(1, -(-n // per))


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)


# --- the samples ------------------------------------------------------------------------------

def _saxpy(size: tuple[int, ...], rng: np.random.Generator) -> Case:
    (n,) = size
    a = np.float32(rng.uniform(-2, 2))
    x, y = _f32(rng, n), _f32(rng, n)
    launch = Launch("saxpy", (_blocks(n), 1, 1), (BLOCK, 1, 1), (n, float(a), Buf("x"), Buf("y")))
    return Case("saxpy", size, {"x": x, "y": y}, [launch], {"y": a * x + y}, {"y": 0})


def _vector_add(size: tuple[int, ...], rng: np.random.Generator) -> Case:
    (n,) = size
    a, b = _f32(rng, n), _f32(rng, n)
    c = np.zeros(n, np.float32)
    launch = Launch("vector_add", (_blocks(n), 1, 1), (BLOCK, 1, 1), (n, Buf("a"), Buf("b"), Buf("c")))
    return Case("vector_add", size, {"a": a, "b": b, "c": c}, [launch], {"c": a + b}, {"c": 0})


def _dot(size: tuple[int, ...], rng: np.random.Generator) -> Case:
    (n,) = size
    x, y = _f32(rng, n), _f32(rng, n)
    prod = x.astype(np.float64) * y.astype(np.float64)
    expect = np.array([prod.sum()], np.float32)
    tol = 4 * np.finfo(np.float32).eps * (math.log2(n) + 2) * np.abs(prod).sum() + 1e-30
    launch = Launch("dot", (_blocks(n), 1, 1), (BLOCK, 1, 1), (n, Buf("x"), Buf("y"), Buf("out")))
    return Case("dot", size, {"x": x, "y": y, "out": np.zeros(1, np.float32)}, [launch], {"out": expect},
                {"out": tol})


def _scan(size: tuple[int, ...], rng: np.random.Generator) -> Case:
    (n,) = size
    data = rng.integers(-1000, 1000, size=n, dtype=np.int32)
    buffers: dict[str, np.ndarray] = {"data": data, "out": np.zeros(n, np.int32)}
    launches: list[Launch] = []
    _scan_plan(n, "data", "out", 0, buffers, launches)
    expect = np.cumsum(data.astype(np.int64)).astype(np.int32)
    return Case("scan", size, buffers, launches, {"out": expect}, {"out": 0})


def _scan_plan(n: int, src: str, dst: str, level: int, buffers: dict[str, np.ndarray],
               launches: list[Launch]) -> None:
    """Block scans, then (recursively) a scan of the block totals, then the offsets."""
    g = _blocks(n)
    sums = f"sums{level}"
    buffers[sums] = np.zeros(g, np.int32)
    launches.append(Launch("scan_blocks", (g, 1, 1), (BLOCK, 1, 1), (n, Buf(src), Buf(dst), Buf(sums))))
    if g > 1:
        scanned = f"scanned{level}"
        buffers[scanned] = np.zeros(g, np.int32)
        _scan_plan(g, sums, scanned, level + 1, buffers, launches)
        launches.append(Launch("add_offsets", (g, 1, 1), (BLOCK, 1, 1), (n, Buf(dst), Buf(scanned))))


def _sgemm(size: tuple[int, ...], rng: np.random.Generator) -> Case:
    m, n, k = size
    a, b = _f32(rng, m, k), _f32(rng, k, n)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    tol = 2 * (k + 2) * np.finfo(np.float32).eps * bound + 1e-30
    launch = Launch("sgemm", (_blocks(n, TILE), _blocks(m, TILE), 1), (TILE, TILE, 1),
                    (m, n, k, Buf("a"), Buf("b"), Buf("c")))
    return Case("sgemm", size, {"a": a, "b": b, "c": np.zeros((m, n), np.float32)}, [launch],
                {"c": exact.astype(np.float32)}, {"c": tol})


def _histogram(size: tuple[int, ...], rng: np.random.Generator) -> Case:
    n, nbins = size
    if nbins > 256:
        raise IRError(f"histogram supports at most 256 bins, got {nbins}")
    data = rng.integers(0, 1 << 31, size=n, dtype=np.int64).astype(np.int32)
    expect = np.bincount(data.astype(np.int64) % nbins, minlength=nbins).astype(np.int32)
    launch = Launch("histogram", (min(_blocks(n), 64), 1, 1), (BLOCK, 1, 1),
                    (n, nbins, Buf("data"), Buf("hist")))
    return Case("histogram", size, {"data": data, "hist": np.zeros(nbins, np.int32)}, [launch],
                {"hist": expect}, {"hist": 0})


def _softmax(size: tuple[int, ...], rng: np.random.Generator) -> Case:
    rows, cols = size
    x = (_f32(rng, rows, cols) * 8).astype(np.float32)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    expect = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    tol = 1e-5 * np.abs(expect) + 1e-9
    launch = Launch("softmax", (rows, 1, 1), (BLOCK, 1, 1), (rows, cols, Buf("x"), Buf("y")))
    return Case("softmax", size, {"x": x, "y": np.zeros((rows, cols), np.float32)}, [launch], {"y": expect},
                {"y": tol})


def _stencil(size: tuple[int, ...], rng: np.random.Generator) -> Case:
    w, h = size
    src = _f32(rng, h, w)
    cc, cn = np.float32(0.5), np.float32(0.125)
    expect = src.copy()
    if w > 2 and h > 2:
        c = src[1:-1, 1:-1]
        nb = (src[1:-1, :-2] + src[1:-1, 2:]) + (src[:-2, 1:-1] + src[2:, 1:-1])
        expect[1:-1, 1:-1] = cc * c + cn * nb
    launch = Launch("stencil5", (_blocks(w, TILE), _blocks(h, TILE), 1), (TILE, TILE, 1),
                    (w, h, float(cc), float(cn), Buf("src"), Buf("dst")))
    return Case("stencil2d", size, {"src": src, "dst": np.zeros((h, w), np.float32)}, [launch],
                {"dst": expect}, {"dst": 0})


SAMPLES: dict[str, Sample] = {s.name: s for s in (
    Sample("saxpy", "saxpy.vxir", "y = a * x + y (f32)", (1 << 20,), ((1,), (1000,), (513,)), True, _saxpy),
    Sample("vector_add", "vector_add.vxir", "c = a + b (f32)", (1 << 20,), ((7,), (1000,)), True, _vector_add),
    Sample("dot", "dot.vxir", "dot product: shared-memory tree reduction + atomic_fadd", (1 << 20,),
           ((1,), (1000,), (3000,)), True, _dot),
    Sample("scan", "scan.vxir", "inclusive prefix sum (i32): block Hillis-Steele + block offsets", (1 << 20,),
           ((1,), (300,), (3000,)), True, _scan),
    Sample("sgemm", "sgemm.vxir", "C = A B (f32) with 16x16 shared-memory tiles", (512, 512, 512),
           ((1, 1, 1), (37, 21, 19), (17, 33, 20)), True, _sgemm),
    Sample("histogram", "histogram.vxir", "histogram: shared-memory privatized bins + global atomics",
           (1 << 20, 256), ((1, 1), (1000, 37), (5000, 256)), True, _histogram),
    Sample("softmax", "softmax.vxir", "row softmax: one block per row, shared max and sum reductions",
           (1024, 1024), ((1, 1), (3, 300), (5, 1000)), False, _softmax),
    Sample("stencil2d", "stencil2d.vxir", "5-point Jacobi stencil on a 2-D grid (f32)", (1024, 1024),
           ((1, 1), (37, 19), (50, 40)), True, _stencil),
)}


# --- running ----------------------------------------------------------------------------------

def run_launches(module: Module, launches: Sequence[Launch], buffers: dict[str, np.ndarray], *,
                 backend: str = "interp", opt_level: int = 3, cache: Any = None,
                 detect_races: bool = False, timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Upload ``buffers``, run ``launches`` in order on ``backend`` and return every buffer's
    final contents (same dtype and shape).

    Args:
        module: the IR module (not modified).
        launches: what to run; :class:`Buf` arguments become buffer addresses.
        buffers: initial contents by name.
        backend: ``"interp"`` (reference interpreter) or ``"x86"`` (the LLVM JIT of
            :mod:`vxpu.ir.cpu_exec`, running on the same arena layout).
        opt_level: LLVM optimization level for ``"x86"``.
        cache: compile cache for ``"x86"`` (see :func:`vxpu.ir.compile.compile_module`).
        detect_races: with ``"interp"``, fault on data races (see :func:`vxpu.ir.interp.run_kernel`).
        timings: if given, receives ``"compile"`` (compiling and loading the module, 0 for the
            interpreter) and ``"kernel"`` (the launches themselves), in seconds.

    Raises:
        IRError: unknown backend, buffer or argument problems; InterpFault from the interpreter.
        KernelFault: the x86 kernel faulted.
    """
    from .interp import DEFAULT_GUARD, Memory, run_kernel

    total = DEFAULT_GUARD + sum(-(-max(1, a.nbytes) // 256) * 256 for a in buffers.values()) + 4096
    mem = Memory(total)
    addrs = {name: mem.upload(arr) for name, arr in buffers.items()}
    run: Callable[[Launch, list[Any]], None]
    compile_seconds = 0.0
    if backend == "interp":
        def run(launch: Launch, args: list[Any]) -> None:
            run_kernel(module, launch.kernel, launch.grid, launch.block, args, mem, detect_races=detect_races)
    elif backend == "x86":
        from .compile import compile_module
        from .cpu_exec import CpuModule

        t0 = time.perf_counter()
        cpu = CpuModule(compile_module(module, "x86", opt_level=opt_level, cache=cache))
        compile_seconds = time.perf_counter() - t0
        base = int(mem.buf.ctypes.data)

        def run(launch: Launch, args: list[Any]) -> None:
            k = cpu.kernel(launch.kernel)
            packed = pack_args(k.signature, args)
            bounds = [mem.allocation_at(args[i]) or (0, 0) for i in k.layout.pointer_params]
            k.run(launch.grid, launch.block, packed, base, mem.size, bounds=bounds)
    else:
        raise IRError(f"unknown backend {backend!r}; use 'interp' or 'x86'")
    kernel_seconds = 0.0
    for launch in launches:
        args = []
        for a in launch.args:
            if isinstance(a, Buf):
                if a.name not in addrs:
                    raise IRError(f"launch of {launch.kernel} names unknown buffer {a.name!r}")
                args.append(addrs[a.name])
            else:
                args.append(a)
        t1 = time.perf_counter()
        run(launch, args)
        kernel_seconds += time.perf_counter() - t1
    if timings is not None:
        timings.update(compile=compile_seconds, kernel=kernel_seconds)
    return {name: mem.read(addrs[name], arr.dtype, arr.size).reshape(arr.shape) for name, arr in buffers.items()}


def run_on_device(module: Module, launches: Sequence[Launch], buffers: dict[str, np.ndarray],
                  device: Any) -> dict[str, np.ndarray]:
    """Like :func:`run_launches`, on an opened accelerator backend (the ``vxpu.accel`` Backend
    contract: alloc, copy_htod, load_module, get_kernel, launch, synchronize, copy_dtoh, free,
    unload_module). The ir layer does not import accel; the caller passes the backend.

    Raises:
        IRError: argument problems; whatever the backend raises (BackendError ...).
    """
    from .binary import encode

    addrs: dict[str, int] = {}
    loaded = device.load_module(encode(module))
    try:
        for name, arr in buffers.items():
            data = np.ascontiguousarray(arr)
            addrs[name] = device.alloc(max(1, data.nbytes))
            device.copy_htod(addrs[name], data.view(np.uint8).reshape(-1).data)
        for launch in launches:
            kernel, _ = device.get_kernel(loaded, launch.kernel)
            args = [addrs[a.name] if isinstance(a, Buf) else a for a in launch.args]
            packed = pack_args(kernel_signature(module.kernel(launch.kernel)), args)
            device.launch(kernel, launch.grid, launch.block, packed)
        device.synchronize()
        out = {}
        for name, arr in buffers.items():
            host = np.empty_like(np.ascontiguousarray(arr))
            device.copy_dtoh(host.view(np.uint8).reshape(-1).data, addrs[name])
            out[name] = host
        device.synchronize()
        return out
    finally:
        for addr in addrs.values():
            device.free(addr)
        device.unload_module(loaded)


def run_case(case: Case, module: Module | None = None, *, backend: str = "interp", opt_level: int = 3,
             cache: Any = None, detect_races: bool = False) -> dict[str, np.ndarray]:
    """Run a case (on ``module``, default the sample's own) and return its output buffers.

    Raises:
        the errors of :func:`run_launches`.
    """
    mod = module if module is not None else SAMPLES[case.sample].module()
    out = run_launches(mod, case.launches, case.buffers, backend=backend, opt_level=opt_level, cache=cache,
                       detect_races=detect_races)
    return {name: out[name] for name in case.outputs}


def compare(case: Case, results: dict[str, np.ndarray]) -> list[str]:
    """Every mismatch of ``results`` against the case's reference, one line each (empty: all good)."""
    problems = []
    for name, want in case.expected.items():
        got = results.get(name)
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            problems.append(f"{case.sample}: output {name} missing or of the wrong shape/dtype")
            continue
        tol = case.tolerance.get(name, 0)
        if np.isscalar(tol) and tol == 0:
            same = (got == want) | (np.isnan(got) & np.isnan(want)) if got.dtype.kind == "f" else got == want
        else:
            same = np.abs(got.astype(np.float64) - want.astype(np.float64)) <= tol
        bad = np.flatnonzero(~np.asarray(same))
        if bad.size:
            i = int(bad[0])
            problems.append(f"{case.sample} {case.size}: output {name} differs at {bad.size} of {want.size} "
                            f"elements; first at flat index {i}: got {got.flat[i]!r}, expected {want.flat[i]!r}")
    return problems
