"""Results must not depend on the host CPU (issue 10, item 5).

The x86 JIT compiles for the host's CPU and features by default; LLVM then picks different
instructions on different hosts (AVX512-FP16 turned f16 NaN → i16 into ``vcvttph2w``, which
gives -32768 instead of the specified 0). Every conversion and math op here runs compiled for
baseline CPUs (``x86-64``, ``x86-64-v3``) and for the host, and all must equal the reference interpreter
bit for bit (conversions) or each other bit for bit (math functions, whose own accuracy is
tested in test_lower_x86.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from vxpu.ir.compile import compile_module
from vxpu.ir.cpu_exec import CpuModule
from vxpu.ir.interp import Memory, run_kernel
from vxpu.ir.model import Module
from vxpu.ir.types import f16, f32, f64, i8, i16, i32, i64

from tests.ir.lowerhelpers import buffer_bounds, pack_args
from tests.ir.test_lower_x86 import _NP, _binop_kernel

# Baselines, and the host's CPU with all its features (None). f16 code needs F16C on x86 (every
# x86-64-v3 CPU): without it LLVM calls compiler-rt's __extendhfsf2/__truncsfhf2, which a
# Python process does not have, so the module fails to load (a CompileError, never wrong bits).
CPUS = ("x86-64", "x86-64-v3", None)
F16_CPUS = ("x86-64-v3", None)


def _cpus(*types) -> tuple[str | None, ...]:  # type: ignore[no-untyped-def]
    return F16_CPUS if f16 in types else CPUS

_FLOATS = np.array([0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 2.9, -2.9, 100.7, -100.7, 127.9, -128.9, 255.5, 65504.0,
                    -65504.0, 1e-5, 6e-8, 3e9, -3e9, 1e30, -1e30, 2.0 ** 63, -(2.0 ** 63), np.inf, -np.inf,
                    np.nan, -np.nan, 3.14159, -1e-300], np.float64)


_LOADED: dict[tuple[int, str | None], tuple[Module, CpuModule]] = {}


def _loaded(module: Module, cpu: str | None) -> CpuModule:
    key = (id(module), cpu)          # the module is kept alive with it, so ids are never reused
    if key not in _LOADED:
        _LOADED[key] = (module, CpuModule(compile_module(module, "x86", arch=cpu, cache=False)))
    return _LOADED[key][1]


def _run(module: Module, a: np.ndarray, out_dtype: type, cpu: str | None) -> np.ndarray:
    n = a.size
    mem = Memory(1 << 20)
    pa = mem.upload(a)
    po = mem.upload(np.zeros(n, out_dtype))
    args = [n, pa, pa, po]
    if cpu == "interp":
        run_kernel(module, "k", (n + 63) // 64, 64, args, mem)
    else:
        k = _loaded(module, cpu).kernel("k")
        k.run(((n + 63) // 64,), (64,), pack_args(module, "k", args), mem.buf.ctypes.data, mem.size,
              bounds=buffer_bounds(module, "k", args, mem))
    return mem.read(po, out_dtype, n)


_CONVERSIONS = [(op, s, d) for op in ("fptosi", "fptoui") for s in (f16, f32, f64) for d in (i8, i16, i32, i64)]
_CONVERSIONS += [(op, s, d) for op in ("sitofp", "uitofp") for s in (i16, i32, i64) for d in (f16, f32)]
_CONVERSIONS += [("fptrunc", f64, f16), ("fptrunc", f32, f16), ("fptrunc", f64, f32), ("fpext", f16, f64)]
_MODULES = {c: _binop_kernel(c[0], c[1], c[2]) for c in _CONVERSIONS}


@pytest.mark.parametrize("op,src,dst", _CONVERSIONS, ids=lambda v: getattr(v, "name", v))
def test_conversions_are_the_same_on_every_cpu(op: str, src, dst) -> None:  # type: ignore[no-untyped-def]
    if src.is_float:
        with np.errstate(over="ignore", invalid="ignore"):
            a = _FLOATS.astype(_NP[src])
    else:
        info = np.iinfo(_NP[src])
        a = np.array([0, 1, -1, 2047, 2049, 4097, 65504, 65519, 65520, 70000, info.max, info.min,
                      info.max // 3], np.int64).astype(_NP[src])
    module = _MODULES[(op, src, dst)]
    ref = _run(module, a, _NP[dst], "interp")
    for cpu in _cpus(src, dst):
        got = _run(module, a, _NP[dst], cpu)
        assert got.tobytes() == ref.tobytes(), (cpu, a, got, ref)


_MATH = ["exp", "exp2", "log", "log2", "sin", "cos", "tanh", "sqrt", "rsqrt", "floor", "ceil", "rint", "pow",
         "frem", "fdiv", "fmin"]


@pytest.mark.parametrize("t", [f16, f32, f64], ids=lambda t: t.name)
@pytest.mark.parametrize("op", _MATH)
def test_math_is_the_same_on_every_cpu(op: str, t) -> None:  # type: ignore[no-untyped-def]
    with np.errstate(over="ignore", invalid="ignore"):
        a = _FLOATS.astype(_NP[t])
    module = _binop_kernel(op, t)
    results = [_run(module, a, _NP[t], cpu) for cpu in _cpus(t)]
    host = results[-1]
    for base in results[:-1]:
        nan = np.isnan(base)
        assert (nan == np.isnan(host)).all(), (a, base, host)      # a NaN's sign and payload are unspecified
        assert base[~nan].tobytes() == host[~nan].tobytes(), (a, base, host)
