"""Compile-time benchmark of the IR lowering, without a GPU.

For every example kernel (``examples/kernels/*.vxir``) and target (x86, nvptx sm_90, amdgpu
gfx942) it reports the median time of each stage — decode+verify, lowering to LLVM IR,
parse+optimize (O3), emission (PTX / object), assembly (nvJitLink / ld.lld) — the whole cold
compile, and a warm compile-cache hit::

    python benchmarks/bench_compile.py [--reps N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import vxpu.ir.compile
except ImportError:
    sys.path.insert(0, str(ROOT))
    import vxpu

    vxpu.__path__.append(str(ROOT))

from vxpu.ir import binary
from vxpu.ir.cache import CompileCache
from vxpu.ir.compile import compile_module
from vxpu.ir.lower import amdgpu, nvptx, x86
from vxpu.ir.lower import toolchain as tc
from vxpu.ir.text import parse

TARGETS = (("x86", None), ("nvptx", "sm_90"), ("amdgpu", "gfx942"))


def _stages(data: bytes, kind: str, arch: str | None) -> dict[str, float]:
    spec = tc.resolve_target(kind, arch)
    t = [time.perf_counter()]
    mod = binary.decode(data)
    t.append(time.perf_counter())
    llvm_ir = str(nvptx.lower_module(mod) if kind == "nvptx" else amdgpu.lower_module(mod) if kind == "amdgpu"
                  else x86.lower_module(mod)[0])
    t.append(time.perf_counter())
    ref = tc.parse_and_optimize(llvm_ir, spec, 3)
    t.append(time.perf_counter())
    if kind == "nvptx":
        out = tc.emit_ptx(ref, spec)
        t.append(time.perf_counter())
        tc.ptx_to_cubin(out, spec.arch)
    elif kind == "amdgpu":
        obj = tc.emit_amdgpu_object(ref, spec)
        t.append(time.perf_counter())
        tc.link_hsaco(obj)
    else:
        tc.emit_x86_object(ref, spec)
        t.append(time.perf_counter())
    t.append(time.perf_counter())
    names = ("decode", "lower", "optimize", "emit", "assemble")
    return {n: (t[i + 1] - t[i]) * 1e3 for i, n in enumerate(names)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json")
    ns = ap.parse_args(argv)
    samples = {p.stem: binary.encode(parse(p.read_text())) for p in sorted((ROOT / "examples" / "kernels").glob("*.vxir"))}
    for kind, arch in TARGETS:  # warm up: LLVM targets, nvJitLink, lld
        compile_module(next(iter(samples.values())), kind, arch=arch, cache=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = CompileCache(tmp)
        for name, data in samples.items():
            for kind, arch in TARGETS:
                runs = [_stages(data, kind, arch) for _ in range(ns.reps)]
                stage = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                cold = []
                for _ in range(ns.reps):
                    t0 = time.perf_counter()
                    compile_module(data, kind, arch=arch, cache=False)
                    cold.append((time.perf_counter() - t0) * 1e3)
                compile_module(data, kind, arch=arch, cache=cache)
                warm = []
                for _ in range(200):
                    t0 = time.perf_counter()
                    compile_module(data, kind, arch=arch, cache=cache)
                    warm.append((time.perf_counter() - t0) * 1e6)
                rows.append({"kernel": name, "target": f"{kind} {arch or tc.resolve_target(kind).arch}",
                             **stage, "cold_ms": statistics.median(cold), "hit_us": statistics.median(warm)})
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1))
    print("| kernel | target | decode | lower | optimize | emit | assemble | cold total ms | cache hit µs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['target']} | {r['decode']:.1f} | {r['lower']:.1f} | {r['optimize']:.1f} | "
              f"{r['emit']:.1f} | {r['assemble']:.1f} | {r['cold_ms']:.1f} | {r['hit_us']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
