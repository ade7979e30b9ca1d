"""f32 math ops on an NVIDIA GPU: error over all 2^32 inputs, against CUDA's own, and their length.

For each unary f32 op (``exp exp2 log log2 sin cos tanh``) the IR kernel ``y[i] = op(bits(base + i))``
(compiled by ``compile_module``, unchecked) and its CUDA C twin (``expf`` … through NVRTC with
default options: no fast math) fill one 2^30-element buffer each per chunk; four chunks cover
every f32 bit pattern. A CUDA C check kernel then compares both with the op in f64 (CUDA's
double functions, within 1-2 f64 ulp: exact for this purpose) and reduces, per version: the
largest error in f32 ulps of the reference (inf counts as 2^128, a subnormal's ulp is 2^-149)
with an input that reaches it, how many results are more than 1 and 2 ulp off, the special-value
mismatches (NaN where the reference is not or the reverse, a finite result for an infinite
reference, the wrong sign of zero), and how many IR results differ bitwise from CUDA's.

Where ``cuobjdump`` exists, the SASS instruction count of each kernel (address arithmetic
included, the same in both) and the SASS of the softmax sample and its twin are written too.

Run on a machine with an NVIDIA GPU::

    python benchmarks/bench_math_gpu.py [--ops exp,exp2] [--chunks 4] [--json out.json] [--sass-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_ir_gpu as big
from vxpu.ir.compile import compile_module
from vxpu.ir.text import parse

OPS = {"exp": ("expf", "exp"), "exp2": ("exp2f", "exp2"), "log": ("logf", "log"), "log2": ("log2f", "log2"),
       "sin": ("sinf", "sin"), "cos": ("cosf", "cos"), "tanh": ("tanhf", "tanh")}
CHUNK = 1 << 30
BLOCK = 256
CHECK_GRID = 132 * 16

IR_KERNEL = """
module @sweep
kernel @k(%base: i32, %y: ptr<global>) {
^entry:
  %t = thread_id.x
  %b = block_id.x
  %d = block_dim.x
  %bd = mul %b, %d : i32
  %i = add %bd, %t : i32
  %bits = add %base, %i : i32
  %x = bitcast %bits : f32
  %r = OP %x : f32
  %py = offset %y, %i : f32
  store %r, %py
  ret
}
"""

CUDA_GEN = """
extern "C" __global__ void gen_{op}(unsigned base, float* y) {{
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  y[i] = {cfn}(__uint_as_float(base + i));
}}
"""

CUDA_CHECK = r"""
// out[0]: max (f32 bits of the error << 32 | input bits); out[1]: #err > 1; out[2]: #err > 2;
// out[3]: #special mismatches; out[4]: one such input; out[5]: #bitwise differences from other
__device__ __forceinline__ float ulp_err(float got, double ref, bool* special) {
  if (isnan(ref) || isnan(got)) { *special = isnan(ref) != isnan(got); return 0.0f; }
  if (isinf(ref) && !isinf(got)) *special = true;
  if (ref == 0.0 && got == 0.0f && signbit(ref) != signbit(got)) *special = true;
  double g = isinf(got) ? copysign(0x1p128, (double)got) : (double)got;
  double r = fabs(ref) > 0x1p128 ? copysign(0x1p128, ref) : ref;
  int e = 0;
  frexp(r, &e);
  double ulp = r == 0.0 ? 0x1p-149 : ldexp(1.0, max(e - 1, -126) - 23);
  return (float)(fabs(g - r) / ulp);
}
"""

CUDA_CHECK_OP = """
extern "C" __global__ void check_{op}(const float* y, const float* other, unsigned base, unsigned n,
                                      unsigned long long* out) {{
  unsigned long long best = 0, c1 = 0, c2 = 0, cs = 0, cd = 0, sx = 0;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {{
    unsigned xb = base + i;
    float got = y[i], oth = other[i];
    bool special = false;
    float err = ulp_err(got, {ref}((double)__uint_as_float(xb)), &special);
    unsigned long long key = ((unsigned long long)__float_as_uint(err) << 32) | xb;
    best = key > best ? key : best;
    c1 += err > 1.0f; c2 += err > 2.0f;
    if (special) {{ cs++; sx = xb; }}
    cd += __float_as_uint(got) != __float_as_uint(oth) && !(isnan(got) && isnan(oth));
  }}
  for (int s = 16; s > 0; s >>= 1) {{
    best = max(best, __shfl_down_sync(0xffffffffu, best, s));
    c1 += __shfl_down_sync(0xffffffffu, c1, s); c2 += __shfl_down_sync(0xffffffffu, c2, s);
    cs += __shfl_down_sync(0xffffffffu, cs, s); cd += __shfl_down_sync(0xffffffffu, cd, s);
    sx = max(sx, __shfl_down_sync(0xffffffffu, sx, s));
  }}
  if ((threadIdx.x & 31) == 0) {{
    atomicMax(&out[0], best); atomicAdd(&out[1], c1); atomicAdd(&out[2], c2);
    atomicAdd(&out[3], cs); if (cs) out[4] = sx; atomicAdd(&out[5], cd);
  }}
}}
"""


def cuda_source(ops: list[str]) -> str:
    src = CUDA_CHECK
    for op in ops:
        cfn, ref = OPS[op]
        src += CUDA_GEN.format(op=op, cfn=cfn) + CUDA_CHECK_OP.format(op=op, ref=ref)
    return src


def sass_counts(image: bytes, cuobjdump: str) -> tuple[dict[str, int], str]:
    """Instructions (NOPs excluded) per function of a cubin, and the whole SASS listing."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(image)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = {}
    name = ""
    for line in sass.splitlines():
        if "Function :" in line:
            name = line.split("Function :")[1].strip()
            counts[name] = 0
        elif name and line.strip().startswith("/*") and "*/" in line and " NOP" not in line and ";" in line:
            counts[name] += 1
    return counts, sass


def sweep(gpu: big.Gpu, ops: list[str], chunks: int) -> list[dict[str, Any]]:
    cu = gpu.cu
    cmod = gpu.load(big.nvrtc_cubin(cuda_source(ops), big.ARCH), f"gen_{ops[0]}")[0]
    y_ir, y_cu, out = gpu.alloc(CHUNK * 4), gpu.alloc(CHUNK * 4), gpu.alloc(8 * 8)
    rows = []
    for op in ops:
        cm = compile_module(parse(IR_KERNEL.replace("OP", op)), "nvptx", arch=big.ARCH, cache=False, checked=False)
        sig = cm.kernels["k"]
        ir_fn = gpu.load(cm.image, "k")[1]
        cu_fn = big._check(cu.cuModuleGetFunction(cmod, f"gen_{op}".encode()))
        chk = big._check(cu.cuModuleGetFunction(cmod, f"check_{op}".encode()))
        acc = {"ir": np.zeros(6, np.uint64), "cuda": np.zeros(6, np.uint64)}
        ms = {"ir": 0.0, "cuda": 0.0}
        for c in range(chunks):
            base = c * CHUNK
            blob = bytearray(sig.args_size)
            struct.pack_into("<I", blob, sig.param_offsets[0], base)
            struct.pack_into("<Q", blob, sig.param_offsets[1], y_ir)
            grid = (CHUNK // BLOCK, 1, 1)
            ms["ir"] += gpu.time_ms(ir_fn, grid, (BLOCK, 1, 1), bytes(blob), 1)
            ms["cuda"] += gpu.time_ms(cu_fn, grid, (BLOCK, 1, 1), struct.pack("<I4xQ", base, y_cu), 1)
            for who, mine, other in (("ir", y_ir, y_cu), ("cuda", y_cu, y_ir)):
                gpu.htod(out, np.zeros(8, np.uint64))
                gpu.launch(chk, (CHECK_GRID, 1, 1), (BLOCK, 1, 1), struct.pack("<QQIIQ", mine, other, base, CHUNK, out))
                got = np.zeros(8, np.uint64)
                gpu.sync()
                gpu.dtoh(got, out)
                a = acc[who]
                a[0] = max(a[0], got[0])
                a[1:4] += got[1:4]
                a[4] = got[4] if got[3] else a[4]
                a[5] += got[5]
        row: dict[str, Any] = {"op": op, "inputs": chunks * CHUNK}
        for who, a in acc.items():
            err = float(np.uint32(int(a[0]) >> 32).view(np.float32))
            x = float(np.uint32(int(a[0]) & 0xFFFFFFFF).view(np.float32))
            row[who] = {"max_ulp": err, "at": x, "over_1": int(a[1]), "over_2": int(a[2]), "special": int(a[3]),
                        "special_at": float(np.uint32(int(a[4]) & 0xFFFFFFFF).view(np.float32)),
                        "ms": ms[who]}
        row["differ_bitwise"] = int(acc["ir"][5])
        row["_ir_image"] = cm.image
        rows.append(row)
        print(f"{op}: IR {row['ir']['max_ulp']:.3f} ulp, CUDA {row['cuda']['max_ulp']:.3f} ulp", flush=True)
    return rows


def sass_report(rows: list[dict[str, Any]], ops: list[str], sass_dir: Path | None) -> None:
    tool = shutil.which("cuobjdump")
    if tool is None:
        print("no cuobjdump: no SASS counts")
        return
    cuda_counts, _ = sass_counts(big.nvrtc_cubin(cuda_source(ops), big.ARCH), tool)
    for row in rows:
        row["sass_ir"] = sum(sass_counts(row["_ir_image"], tool)[0].values())
        row["sass_cuda"] = cuda_counts.get(f"gen_{row['op']}", -1)
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        mod = parse((big.ROOT / "examples" / "kernels" / "softmax.vxir").read_text())
        for checked in (False, True):
            cm = compile_module(mod, "nvptx", arch=big.ARCH, cache=False, checked=checked)
            counts, sass = sass_counts(cm.image, tool)
            (sass_dir / f"softmax_{'checked' if checked else 'unchecked'}.sass").write_text(sass)
            print(f"softmax IR {'checked' if checked else 'unchecked'}: {counts} SASS instructions")
        counts, sass = sass_counts(big.nvrtc_cubin(big.SAMPLE_CUDA, big.ARCH), tool)
        (sass_dir / "softmax_cuda.sass").write_text(sass)
        print(f"softmax CUDA C: {counts.get('s_softmax')} SASS instructions")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--chunks", type=int, default=4, help="2^30 inputs each; 4 = every f32")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--sass-dir", help="write the softmax SASS listings here")
    ns = ap.parse_args(argv)
    ops = ns.ops.split(",")
    t0 = time.perf_counter()
    gpu = big.Gpu()
    rows = sweep(gpu, ops, ns.chunks)
    sass_report(rows, ops, Path(ns.sass_dir) if ns.sass_dir else None)
    for row in rows:
        row.pop("_ir_image", None)
    if ns.json:
        Path(ns.json).write_text(json.dumps({"device": gpu.name, "rows": rows}, indent=1))
    print(f"\ndevice: {gpu.name}, {rows[0]['inputs'] if rows else 0} inputs per op, {time.perf_counter() - t0:.1f} s")
    print("| op | IR max ulp (at x) | CUDA max ulp (at x) | IR >1 / >2 ulp | CUDA >1 / >2 ulp | specials IR/CUDA "
          "| differ | ms IR/CUDA | SASS IR/CUDA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        i, c = r["ir"], r["cuda"]
        print(f"| {r['op']} | {i['max_ulp']:.3f} ({i['at']:.6g}) | {c['max_ulp']:.3f} ({c['at']:.6g}) | "
              f"{i['over_1']} / {i['over_2']} | {c['over_1']} / {c['over_2']} | {i['special']}/{c['special']} | "
              f"{r['differ_bitwise']} | {i['ms']:.2f}/{c['ms']:.2f} | {r.get('sass_ir', '-')}/{r.get('sass_cuda', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
