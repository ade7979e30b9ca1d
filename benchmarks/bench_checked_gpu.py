"""Checked IR kernels on an NVIDIA GPU: the cost of per-buffer bounds, and a contained fault.

Part 1 — each sample kernel (``examples/kernels/*.vxir``) three ways: the checked build every
guest gets (per-buffer bounds, hidden arguments filled as the backend fills them), the
unchecked build (``compile_module(..., checked=False)``, host-side only), and its hand-written
CUDA C twin (``bench_ir_gpu.SAMPLE_CUDA``, NVRTC). Same inputs, same timing as
``bench_ir_gpu.py`` (CUDA events, median of trials of back-to-back launches, versions
alternating), outputs checked against numpy.

Part 2 — an out-of-bounds launch through the real stack (``CudaBackend`` + ``Session``): the
status, the fault record, the neighbouring allocation byte-for-byte, and the next launch in the
same process; plus what the record read-back adds to a synchronize.

Run on a machine with an NVIDIA GPU::

    python benchmarks/bench_checked_gpu.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_ir_gpu as big
from vxpu.accel import gpu_checked
from vxpu.accel.backend import KernelInfo, launch_bounds
from vxpu.ir.compile import compile_module
from vxpu.ir.text import parse


class Checked:
    """A checked kernel's CUfunction plus what its launches need beside the guest arguments."""

    def __init__(self, fn: Any, info: KernelInfo) -> None:
        self.fn = fn
        self.info = info
        self.full = gpu_checked.launch_info(info)
        self.guard = gpu_checked.CheckedArgs(info, 0)


class CheckedGpu(big.Gpu):
    """``bench_ir_gpu.Gpu`` that knows its allocations and fills checked kernels' hidden
    arguments per launch exactly as ``GpuBackend.launch`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.record = self.alloc(gpu_checked.RECORD_SIZE)
        self.htod(self.record, np.zeros(gpu_checked.RECORD_SIZE, np.uint8))

    def alloc(self, nbytes: int) -> int:
        p = super().alloc(nbytes)
        self.sizes[p] = nbytes
        return p

    def _at(self, address: int) -> tuple[int, int] | None:
        for start, size in self.sizes.items():
            if 0 <= address - start < size:
                return start, size
        return None

    def launch(self, fn, grid, block, args: bytes) -> None:  # type: ignore[no-untyped-def]
        if isinstance(fn, Checked):
            buf = bytearray(fn.full.args_size)
            fn.guard.fill(memoryview(buf), args, launch_bounds(fn.info, args, self._at), self.record)
            super().launch(fn.fn, grid, block, bytes(buf))
            return
        super().launch(fn, grid, block, args)

    def fault_claimed(self) -> bool:
        raw = np.zeros(gpu_checked.RECORD_SIZE, np.uint8)
        self.dtoh(raw, self.record)
        return bool(raw[:4].any())


#: Earlier forms of the checked GPU lowering (``GpuHooks`` switches), timed beside the
#: current one with ``--variants``: what each step of the lowering bought.
VARIANTS: dict[str, dict[str, int | str]] = {
    "no_block_version": {"block_version": False},    # no small-block copy (tidrange.py)
    "param_dl": {"param_form": "dl"},                # gpucheck's byte-offset parameter form
    "no_groups": {"group_checks": False},            # a check (and branch) per access
    "no_range_copy": {"range_copy": False},          # no range copy (rangecopy.py): session 3's start
    "no_exit_free": {"exit_free": False},            # range copy only by its own rule, not exit-free
    "no_limits32": {"limits32": False},              # no host-filled element windows: 64-bit index checks
    # scanloop (session 3): shared offsets of non-wrapping sums split, guarded shared loads,
    # doubling barrier loops unrolled by 2
    "no_split_offsets": {"split_offsets": ""},       # offset p, a + b as one address (scan's start)
    "no_guarded_loads": {"guarded_loads": ""},       # select-only loads speculated (scan's start)
    "no_unroll": {"unroll_shift_loops": False},      # scan's level loop not unrolled
    "no_scanloop": {"split_offsets": "", "guarded_loads": "", "unroll_shift_loops": False},  # all three
    "no_scanloop_unchecked": {"split_offsets": "", "guarded_loads": "", "unroll_shift_loops": False,
                              "checked": 0},         # ... unchecked
    "guarded_loads_all": {"guarded_loads": "all"},   # global loads guarded too (sgemm: not unrolled then)
}


def _compile_variant(mod: Any, switches: dict[str, int | str]) -> Any:
    """``mod`` compiled with ``GpuHooks`` switches set (``"checked": 0``: the unchecked build)."""
    from vxpu.ir.lower.gpu import GpuHooks

    switches = dict(switches)
    checked = bool(switches.pop("checked", 1))
    saved = {k: getattr(GpuHooks, k) for k in switches}
    try:
        for k, v in switches.items():
            setattr(GpuHooks, k, v)
        return compile_module(mod, "nvptx", arch=big.ARCH, cache=False, checked=checked)
    finally:
        for k, v in saved.items():
            setattr(GpuHooks, k, v)


def samples(gpu: CheckedGpu, quick: bool, rng: np.random.Generator, only: list[str] | None = None,
            variants: list[str] | None = None) -> list[dict[str, Any]]:
    from vxpu.accel.backend import KernelInfo as KI

    twin = gpu.load(big.nvrtc_cubin(big.SAMPLE_CUDA, big.ARCH), "s_vector_add")[0]
    rows = []
    for stem, kname in big.SAMPLES.items():
        if only and stem not in only:
            continue
        mod = parse((big.ROOT / "examples" / "kernels" / f"{stem}.vxir").read_text())
        cm_c = compile_module(mod, "nvptx", arch=big.ARCH, cache=False)
        cm_u = compile_module(mod, "nvptx", arch=big.ARCH, cache=False, checked=False)
        info = KI.from_signature(cm_c.kernels[kname], checked=True)
        fns = {"ir": Checked(gpu.load(cm_c.image, kname)[1], info),
               "ir_unchecked": gpu.load(cm_u.image, kname)[1],
               "cuda": big._check(gpu.cu.cuModuleGetFunction(twin, f"s_{kname}".encode()))}
        for vname in variants or ():
            switches = VARIANTS[vname]
            cm_v = _compile_variant(mod, switches)
            fn_v = gpu.load(cm_v.image, kname)[1]
            fns[f"ir_{vname}"] = Checked(fn_v, info) if switches.get("checked", 1) else fn_v
        row = big.run_kernel(gpu, stem, fns, quick, rng, case=big._sample_case)
        gpu.sizes = {gpu.record: gpu_checked.RECORD_SIZE}     # run_kernel freed the sample's buffers
        row["ptxas_checked"] = str(cm_c.extra.get("ptxas_info", ""))[-300:]
        row["ptxas_unchecked"] = str(cm_u.extra.get("ptxas_info", ""))[-300:]
        row["fault_claimed"] = gpu.fault_claimed()
        rows.append(row)
        more = "".join(f", {k[6:]} {v:.3f}" for k, v in row.items() if k.startswith("ratio_ir_") and k != "ratio_ir_unchecked")
        print(f"sample {stem}: checked {row['ratio']:.3f}, unchecked {row['ratio_ir_unchecked']:.3f}{more} of CUDA C",
              flush=True)
    return rows


def out_of_bounds() -> dict[str, Any]:
    """saxpy with n past its 10-element buffers through CudaBackend + Session."""
    from vxpu.accel.backend import KernelFaultError
    from vxpu.accel.cuda import CudaBackend
    from vxpu.accel.session import Session
    from vxpu.ir import binary

    mod = parse((big.ROOT / "examples" / "kernels" / "saxpy.vxir").read_text())
    backend = CudaBackend(0)
    backend.open()
    out: dict[str, Any] = {}
    with Session(backend) as s:
        x, y, z = s.alloc(40), s.alloc(40), s.alloc(40)
        s.copy_htod(x, memoryview(np.arange(10, dtype=np.float32)))
        s.copy_htod(y, memoryview(np.ones(10, dtype=np.float32)))
        s.copy_htod(z, memoryview(np.full(10, 7.0, dtype=np.float32)))
        z_before = np.empty(10, np.float32)
        s.copy_dtoh(memoryview(z_before), z)
        k, _ = s.get_kernel(s.load_module(binary.encode(mod)), "saxpy")
        out["addresses"] = [hex(x), hex(y), hex(z)]
        try:
            s.launch(k, (4,), (256,), struct.pack("<ifQQ", 1000, 2.0, x, y))
            s.synchronize()
            out["status"] = "no fault (WRONG)"
        except KernelFaultError as exc:
            r = exc.record
            out.update(status=exc.status.name, context_kept=exc.context_kept, message=str(exc),
                       record={"kernel": r.kernel, "code": r.code, "param": r.param, "offset": r.offset,
                               "block": r.block, "thread": r.thread})
        z_after = np.empty(10, np.float32)
        s.copy_dtoh(memoryview(z_after), z)
        out["neighbour_unchanged"] = bool(z_before.tobytes() == z_after.tobytes())
        s.launch(k, (1,), (256,), struct.pack("<ifQQ", 10, 2.0, x, y))
        s.synchronize()
        got = np.empty(10, np.float32)
        s.copy_dtoh(memoryview(got), y)
        # threads 0-9 of the faulting launch did their work (y = 2x + 1), the next adds 2x again
        out["next_launch_ok"] = bool(np.array_equal(got, 4 * np.arange(10, dtype=np.float32) + 1))
        out["resets"] = backend.stats.resets
        # what the record read-back costs a synchronize (a tiny checked launch + sync, median)
        small = struct.pack("<ifQQ", 10, 2.0, x, y)
        times = []
        for _ in range(300):
            t0 = time.perf_counter()
            s.launch(k, (1,), (32,), small)
            s.synchronize()
            times.append(time.perf_counter() - t0)
        out["launch_sync_us"] = statistics.median(times) * 1e6
        rb = []
        for _ in range(300):
            backend._checked_pending = True
            t0 = time.perf_counter()
            backend._check_fault_record(True)
            rb.append(time.perf_counter() - t0)
        out["record_readback_us"] = statistics.median(rb) * 1e6
    backend.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--samples", help="comma-separated subset of the samples (default: all)")
    ap.add_argument("--variants", nargs="?", const=",".join(VARIANTS), default="",
                    help="also time these earlier lowering forms (comma-separated VARIANTS; all without a value)")
    ap.add_argument("--no-oob", action="store_true", help="skip the out-of-bounds launch (part 2)")
    ns = ap.parse_args(argv)
    rng = np.random.default_rng(20261202)
    gpu = CheckedGpu()
    rows = samples(gpu, ns.quick, rng, ns.samples.split(",") if ns.samples else None,
                   [v for v in ns.variants.split(",") if v])
    oob = {} if ns.no_oob else out_of_bounds()
    if ns.json:
        Path(ns.json).write_text(json.dumps({"device": gpu.name, "samples": rows, "oob": oob}, indent=1, default=str))
    print(f"\ndevice: {gpu.name}")
    print("| sample | checked ms | unchecked ms | CUDA C ms | checked/CUDA | unchecked/CUDA | check cost | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cost = r["ir"]["ms"] / r["ir_unchecked"]["ms"] - 1
        print(f"| {r['kernel']} | {r['ir']['ms']:.4f} | {r['ir_unchecked']['ms']:.4f} | {r['cuda']['ms']:.4f} | "
              f"{r['ratio']:.3f} | {r['ratio_ir_unchecked']:.3f} | {cost * 100:+.1f} % | "
              f"{r['ir']['rel_err']:.1e} |")
    print("\nout-of-bounds launch:", json.dumps(oob, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
