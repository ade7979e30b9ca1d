"""What per-buffer bounds checks cost on the x86 JIT: every sample kernel, checked vs unchecked.

Each sample (``vxpu.ir.samples.SAMPLES``, default sizes) is compiled twice for this host —
the checked build every guest gets, and ``checked=False`` (arena-wide checks only: the x86
sandbox never goes away) — and its launches run single-threaded (one ``CpuKernel.run`` per
launch, as the CPU backend runs one block range), alternating between the builds. Reported:
the minimum over ``--runs`` rounds of each build's total launch time, and the checked build's
extra time. The checked build's outputs are compared with the sample's reference first.

Usage: ``python benchmarks/bench_checked_cpu.py [--runs N] [--only saxpy,sgemm] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
from vxpu.ir.args import pack_args
from vxpu.ir.compile import compile_module
from vxpu.ir.cpu_exec import CpuModule
from vxpu.ir.interp import DEFAULT_GUARD, Memory
from vxpu.ir.samples import SAMPLES, Buf, compare


def _prepare(name: str) -> tuple[Any, Memory, dict[str, int], dict[bool, CpuModule]]:
    sample = SAMPLES[name]
    case = sample.case()
    module = sample.module()
    total = DEFAULT_GUARD + sum(-(-max(1, a.nbytes) // 256) * 256 for a in case.buffers.values()) + 4096
    mem = Memory(total)
    addrs = {b: mem.upload(a) for b, a in case.buffers.items()}
    mods = {checked: CpuModule(compile_module(module, "x86", cache=False, checked=checked))
            for checked in (True, False)}
    return case, mem, addrs, mods


def _run(case: Any, mem: Memory, addrs: dict[str, int], mod: CpuModule) -> float:
    base = int(mem.buf.ctypes.data)
    t0 = time.perf_counter()
    for launch in case.launches:
        args = [addrs[a.name] if isinstance(a, Buf) else a for a in launch.args]
        k = mod.kernel(launch.kernel)
        bounds = [mem.allocation_at(args[i]) or (0, 0) for i in k.layout.pointer_params]
        k.run(launch.grid, launch.block, pack_args(k.signature, args), base, mem.size, bounds=bounds)
    return time.perf_counter() - t0


def bench(name: str, runs: int) -> dict[str, Any]:
    case, mem, addrs, mods = _prepare(name)
    _run(case, mem, addrs, mods[True])
    got = {b: mem.read(addrs[b], case.buffers[b].dtype, case.buffers[b].size).reshape(case.buffers[b].shape)
           for b in case.outputs}
    problems = compare(case, got)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(runs):
        for checked in (True, False):
            for b, a in case.buffers.items():          # fresh inputs: some samples update in place
                mem.write(addrs[b], a)
            times[checked].append(_run(case, mem, addrs, mods[checked]))
    c, u = min(times[True]), min(times[False])
    return {"sample": name, "size": case.size, "checked_ms": c * 1e3, "unchecked_ms": u * 1e3,
            "cost": c / u - 1, "correct": not problems, "problems": problems[:3]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7, help="alternating rounds (minimum taken)")
    p.add_argument("--only", help="comma-separated sample names")
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    names = ns.only.split(",") if ns.only else list(SAMPLES)
    rows = [bench(n, ns.runs) for n in names]
    if ns.json:
        print(json.dumps(rows))
        return 0
    print("| sample | size | checked ms | unchecked ms | check cost | correct |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sample']} | {'×'.join(map(str, r['size']))} | {r['checked_ms']:.2f} | {r['unchecked_ms']:.2f} | "
              f"{r['cost'] * 100:+.1f} % | {'yes' if r['correct'] else 'NO'} |")
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
