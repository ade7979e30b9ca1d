"""f32 math ops on the x86 JIT over every f32 input (or every ``--step``-th), against numpy in f64.

The f32 ``log log2 sin cos tanh`` of :mod:`vxpu.ir.lower.math_f32` are plain IEEE f32 arithmetic
(fma, no approximate hardware unit; tanh takes the polynomial exp here), so their x86 results
are the results on every target, NVIDIA and AMD included, bit for bit; sin/cos beyond |x| =
105615 take the f64 path. ``exp``/``exp2`` are the x86/AMDGPU polynomial form (NVIDIA's use its
ex2 unit: ``bench_math_gpu.py``). Prints one row per op: the largest error in f32 ulps of the
f64 reference (inf counts as 2^128, a subnormal's ulp is 2^-149) and an input reaching it, how
many results are more than 1 ulp off, and special-value mismatches (NaN, infinity, sign of 0).

    python benchmarks/sweep_math_cpu.py [--ops log,log2] [--step 1]   # all 2^32: minutes per op
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from typing import Any

import numpy as np
from llvmlite import ir
from vxpu.ir.lower import math as vmath
from vxpu.ir.lower import toolchain

F32, I32 = ir.FloatType(), ir.IntType(32)
REFS = {"exp": np.exp, "exp2": np.exp2, "log": np.log, "log2": np.log2, "sin": np.sin, "cos": np.cos,
        "tanh": np.tanh}


def jit_op(op: str) -> Any:
    """``run(bits: uint32 array) -> float32 array``: the f32 ``op`` as the x86 lowering emits it."""
    llvm = toolchain.llvm_binding()
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    mod = ir.Module("sweep")
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I32.as_pointer(), F32.as_pointer(), I32]), "sweep")
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(I32)
    i.add_incoming(ir.Constant(I32, 0), entry)
    x = b.bitcast(b.load(b.gep(fn.args[0], [i])), F32)
    b.store(vmath.call_math(b, op, [x]), b.gep(fn.args[1], [i]))
    nxt = b.add(i, ir.Constant(I32, 1))
    i.add_incoming(nxt, loop)
    b.cbranch(b.icmp_signed("<", nxt, fn.args[2]), loop, done)
    b.position_at_end(done)
    b.ret_void()
    llmod = llvm.parse_assembly(str(mod))
    tm = llvm.Target.from_default_triple().create_target_machine(opt=2)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=2))
    pb.getModulePassManager().run(llmod, pb)
    engine = llvm.create_mcjit_compiler(llmod, tm)
    engine.finalize_object()
    cfn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(engine.get_function_address("sweep"))

    def run(bits: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(bits, np.uint32)
        out = np.empty(bits.size, np.float32)
        cfn(bits.ctypes.data, out.ctypes.data, bits.size)
        return out

    run.engine = engine  # type: ignore[attr-defined]  # keeps the code alive
    return run


def ulp_errors(got: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|got − ref| in f32 ulps of ref, special-value mismatch mask); ref in f64."""
    g = got.astype(np.float64)
    special = (np.isnan(g) != np.isnan(ref)) | (np.isinf(ref) & ~np.isinf(g))
    either_nan = np.isnan(g) | np.isnan(ref)
    g = np.where(np.isinf(g), np.copysign(2.0 ** 128, g), g)
    r = np.where(np.abs(ref) > 2.0 ** 128, np.copysign(2.0 ** 128, ref), ref)
    with np.errstate(all="ignore"):
        ulp = np.where(r == 0, 2.0 ** -149, np.exp2(np.clip(np.floor(np.log2(np.abs(r))), -126, 127) - 23))
        err = np.abs(g - r) / ulp
    err[either_nan] = 0.0
    special |= (r == 0) & (g == 0) & (np.signbit(r) != np.signbit(g))
    return err, special


def sweep(op: str, step: int, chunk: int = 1 << 24) -> dict[str, Any]:
    run, ref = jit_op(op), REFS[op]
    row: dict[str, Any] = {"op": op, "max_ulp": 0.0, "at": 0.0, "over_1": 0, "special": 0, "special_at": None,
                           "inputs": 0}
    t0 = time.perf_counter()
    for start in range(0, 1 << 32, chunk):
        bits = np.arange(start, start + chunk, step, dtype=np.uint64).astype(np.uint32)
        x = bits.view(np.float32)
        with np.errstate(all="ignore"):
            err, special = ulp_errors(run(bits), ref(x.astype(np.float64)))
        k = int(np.argmax(err))
        if err[k] > row["max_ulp"]:
            row["max_ulp"], row["at"] = float(err[k]), float(x[k])
        row["over_1"] += int((err > 1).sum())
        if special.any():
            row["special"] += int(special.sum())
            row["special_at"] = float(x[int(np.argmax(special))])
        row["inputs"] += bits.size
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="log,log2,sin,cos,tanh", help="comma-separated subset of " + ",".join(REFS))
    ap.add_argument("--step", type=int, default=1, help="test every step-th bit pattern (1 = all 2^32)")
    ns = ap.parse_args(argv)
    print("| op | inputs | max ulp | at x | > 1 ulp | specials | s |")
    print("|---|---|---|---|---|---|---|")
    for op in ns.ops.split(","):
        r = sweep(op, ns.step)
        print(f"| {op} | {r['inputs']} | {r['max_ulp']:.3f} | {r['at']!r} | {r['over_1']} | {r['special']}"
              f"{'' if r['special_at'] is None else ' (x = ' + repr(r['special_at']) + ')'} | {r['seconds']:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
