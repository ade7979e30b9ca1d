"""IR kernels on a real NVIDIA GPU: correctness against numpy and speed against hand-written CUDA C.

For each kernel the same algorithm exists twice: built with the vxpu IR builder (compiled by
``vxpu.ir.compile.compile_module`` → PTX 8.0 → nvJitLink cubin) and written by hand in CUDA C
(compiled with NVRTC to a cubin in the same run). Both are loaded through
``cuda.bindings.driver``, checked against numpy on fresh random inputs (outputs poisoned with
NaN first) and timed with CUDA events (median of trials, launches alternated). It also times
the compile path: cold (IR bytes → cubin → ``cuModuleLoadData`` → function, no cache) and warm
(``compile_module`` hit in a warm cache).

Run on a machine with a GPU::

    python benchmarks/bench_ir_gpu.py [--quick] [--json out.json]

Without a GPU it only compiles (``--compile-only``). Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import vxpu.ir.compile
except ImportError:  # running from a checkout that is not installed: map the layer folders
    sys.path.insert(0, str(ROOT))
    import vxpu

    vxpu.__path__.append(str(ROOT))

from vxpu.ir import binary
from vxpu.ir.builder import KernelBuilder
from vxpu.ir.cache import CompileCache
from vxpu.ir.compile import compile_module
from vxpu.ir.lower import toolchain
from vxpu.ir.model import Module
from vxpu.ir.types import f32, i32, ptr_global

ARCH = "sm_90"


# ------------------------------------------------------------------------------- IR kernels


def _gid(b: KernelBuilder):  # type: ignore[no-untyped-def]
    return b.add(b.mul(b.block_id("x"), b.block_dim("x")), b.thread_id("x"))


def ir_vadd() -> Module:
    b = KernelBuilder("vadd", [("n", i32), ("a", ptr_global), ("b", ptr_global), ("c", ptr_global)])
    n, pa, pb, pc = b.params
    entry, body, done = b.block("entry"), b.block("body"), b.block("done")
    b.set_block(entry)
    i = _gid(b)
    b.cbr(b.icmp("slt", i, n), body, done)
    b.set_block(body)
    b.store(b.fadd(b.load(b.offset(pa, i, f32), f32), b.load(b.offset(pb, i, f32), f32)), b.offset(pc, i, f32))
    b.br(done)
    b.set_block(done)
    b.ret()
    return Module("vadd", [b.finish()])


def ir_saxpy() -> Module:
    b = KernelBuilder("saxpy", [("n", i32), ("a", f32), ("x", ptr_global), ("y", ptr_global)])
    n, a, x, y = b.params
    entry, body, done = b.block("entry"), b.block("body"), b.block("done")
    b.set_block(entry)
    i = _gid(b)
    b.cbr(b.icmp("slt", i, n), body, done)
    b.set_block(body)
    py = b.offset(y, i, f32)
    b.store(b.fadd(b.fmul(a, b.load(b.offset(x, i, f32), f32)), b.load(py, f32)), py)
    b.br(done)
    b.set_block(done)
    b.ret()
    return Module("saxpy", [b.finish()])


def ir_stencil() -> Module:
    """5-point Jacobi step on a W×H grid; border cells are copied."""
    b = KernelBuilder("stencil", [("w", i32), ("h", i32), ("src", ptr_global), ("dst", ptr_global)])
    w, h, src, dst = b.params
    entry, inside, interior, border, done = (b.block(n) for n in ("entry", "inside", "interior", "border", "done"))
    b.set_block(entry)
    x = b.add(b.mul(b.block_id("x"), b.block_dim("x")), b.thread_id("x"))
    y = b.add(b.mul(b.block_id("y"), b.block_dim("y")), b.thread_id("y"))
    b.cbr(b.and_(b.icmp("slt", x, w), b.icmp("slt", y, h)), inside, done)
    b.set_block(inside)
    c = b.add(b.mul(y, w), x)
    is_int = b.and_(b.and_(b.icmp("sgt", x, 0), b.icmp("slt", x, b.sub(w, 1))),
                    b.and_(b.icmp("sgt", y, 0), b.icmp("slt", y, b.sub(h, 1))))
    b.cbr(is_int, interior, border)
    b.set_block(interior)
    pc = b.offset(src, c, f32)
    s = b.fadd(b.fadd(b.load(pc, f32), b.load(b.offset(pc, -1, f32), f32)), b.load(b.offset(pc, 1, f32), f32))
    s = b.fadd(b.fadd(s, b.load(b.offset(src, b.sub(c, w), f32), f32)), b.load(b.offset(src, b.add(c, w), f32), f32))
    b.store(b.fmul(s, b.const(0.2, f32)), b.offset(dst, c, f32))
    b.br(done)
    b.set_block(border)
    b.store(b.load(b.offset(src, c, f32), f32), b.offset(dst, c, f32))
    b.br(done)
    b.set_block(done)
    b.ret()
    return Module("stencil", [b.finish()])


def ir_reduce() -> Module:
    """Block tree reduction in shared memory (256 threads), one atomic add per block."""
    b = KernelBuilder("reduce", [("n", i32), ("x", ptr_global), ("out", ptr_global)])
    n, x, out = b.params
    buf = b.shared_array("buf", f32, 256)
    entry, loop, body, upd, after, fin, atom, done = (
        b.block(nm, [("s", i32)] if nm == "loop" else ())
        for nm in ("entry", "loop", "body", "upd", "after", "fin", "atom", "done"))
    b.set_block(entry)
    t = b.thread_id("x")
    i = _gid(b)
    inb = b.icmp("slt", i, n)
    v = b.select(inb, b.load(b.offset(x, b.select(inb, i, 0), f32), f32), b.const(0.0, f32))
    base = b.shared_addr(buf)
    b.store(v, b.offset(base, t, f32))
    b.barrier()
    b.br(loop, b.const(128, i32))
    b.set_block(loop)
    s = loop.params[0]
    b.cbr(b.icmp("sgt", s, 0), body, fin)
    b.set_block(body)
    b.cbr(b.icmp("slt", t, s), upd, after)
    b.set_block(upd)
    p = b.offset(base, t, f32)
    b.store(b.fadd(b.load(p, f32), b.load(b.offset(base, b.add(t, s), f32), f32)), p)
    b.br(after)
    b.set_block(after)
    b.barrier()
    b.br(loop, b.ashr(s, 1))
    b.set_block(fin)
    b.cbr(b.icmp("eq", t, 0), atom, done)
    b.set_block(atom)
    b.atomic_fadd(out, b.load(base, f32))
    b.br(done)
    b.set_block(done)
    b.ret()
    return Module("reduce", [b.finish()])


def ir_matmul() -> Module:
    """C = A·B for N×N floats (N a multiple of 16), 16×16 shared-memory tiles."""
    b = KernelBuilder("matmul", [("n", i32), ("a", ptr_global), ("b", ptr_global), ("c", ptr_global)])
    n, pa, pb, pc = b.params
    ta = b.shared_array("ta", f32, 256)
    tb = b.shared_array("tb", f32, 256)
    entry = b.block("entry")
    tile = b.block("tile", [("t", i32), ("acc", f32)])
    tbody = b.block("tbody")
    kloop = b.block("kloop", [("k", i32), ("acc2", f32)])
    kbody = b.block("kbody")
    tnext = b.block("tnext")
    done = b.block("done")
    b.set_block(entry)
    tx, ty = b.thread_id("x"), b.thread_id("y")
    col = b.add(b.mul(b.block_id("x"), 16), tx)
    row = b.add(b.mul(b.block_id("y"), 16), ty)
    sa, sb = b.shared_addr(ta), b.shared_addr(tb)
    lidx = b.add(b.mul(ty, 16), tx)
    b.br(tile, b.const(0, i32), b.const(0.0, f32))
    b.set_block(tile)
    t, acc = tile.params
    b.cbr(b.icmp("slt", t, n), tbody, done, (), ())
    b.set_block(tbody)
    b.store(b.load(b.offset(pa, b.add(b.mul(row, n), b.add(t, tx)), f32), f32), b.offset(sa, lidx, f32))
    b.store(b.load(b.offset(pb, b.add(b.mul(b.add(t, ty), n), col), f32), f32), b.offset(sb, lidx, f32))
    b.barrier()
    b.br(kloop, b.const(0, i32), acc)
    b.set_block(kloop)
    k, acc2 = kloop.params
    b.cbr(b.icmp("slt", k, 16), kbody, tnext)
    b.set_block(kbody)
    av = b.load(b.offset(sa, b.add(b.mul(ty, 16), k), f32), f32)
    bv = b.load(b.offset(sb, b.add(b.mul(k, 16), tx), f32), f32)
    b.br(kloop, b.add(k, 1), b.fadd(acc2, b.fmul(av, bv)))
    b.set_block(tnext)
    b.barrier()
    b.br(tile, b.add(t, 16), acc2)
    b.set_block(done)
    b.store(acc, b.offset(pc, b.add(b.mul(row, n), col), f32))
    b.ret()
    return Module("matmul", [b.finish()])


def ir_expk() -> Module:
    """y[i] = exp(x[i]) * s (transcendental throughput, memory-bound size)."""
    b = KernelBuilder("expk", [("n", i32), ("s", f32), ("x", ptr_global), ("y", ptr_global)])
    n, s, x, y = b.params
    entry, body, done = b.block("entry"), b.block("body"), b.block("done")
    b.set_block(entry)
    i = _gid(b)
    b.cbr(b.icmp("slt", i, n), body, done)
    b.set_block(body)
    b.store(b.fmul(b.exp(b.load(b.offset(x, i, f32), f32)), s), b.offset(y, i, f32))
    b.br(done)
    b.set_block(done)
    b.ret()
    return Module("expk", [b.finish()])


CUDA_SRC = r"""
extern "C" __global__ void vadd(int n, const float* a, const float* b, float* c) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) c[i] = a[i] + b[i];
}
extern "C" __global__ void saxpy(int n, float a, const float* x, float* y) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
extern "C" __global__ void stencil(int w, int h, const float* src, float* dst) {
  int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= w || y >= h) return;
  int c = y * w + x;
  if (x > 0 && x < w - 1 && y > 0 && y < h - 1)
    dst[c] = (src[c] + src[c - 1] + src[c + 1] + src[c - w] + src[c + w]) * 0.2f;
  else dst[c] = src[c];
}
extern "C" __global__ void reduce(int n, const float* x, float* out) {
  __shared__ float buf[256];
  int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) atomicAdd(out, buf[0]);
}
extern "C" __global__ void matmul(int n, const float* a, const float* b, float* c) {
  __shared__ float ta[256], tb[256];
  int tx = threadIdx.x, ty = threadIdx.y;
  int col = blockIdx.x * 16 + tx, row = blockIdx.y * 16 + ty;
  float acc = 0.0f;
  for (int t = 0; t < n; t += 16) {
    ta[ty * 16 + tx] = a[row * n + t + tx];
    tb[ty * 16 + tx] = b[(t + ty) * n + col];
    __syncthreads();
    for (int k = 0; k < 16; ++k) acc += ta[ty * 16 + k] * tb[k * 16 + tx];
    __syncthreads();
  }
  c[row * n + col] = acc;
}
extern "C" __global__ void expk(int n, float s, const float* x, float* y) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = expf(x[i]) * s;
}
"""

# ------------------------------------------------------------------------------- sample kernels
# examples/kernels/*.vxir and their hand-written CUDA C twins (the same algorithm, op for op).

SAMPLE_CUDA = r"""
#define NEG_INF __int_as_float(0xff800000)
extern "C" __global__ void s_vector_add(int n, const float* a, const float* b, float* c) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) c[i] = a[i] + b[i];
}
extern "C" __global__ void s_saxpy(int n, float a, const float* x, float* y) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
extern "C" __global__ void s_stencil5(int w, int h, float cc, float cn, const float* src, float* dst) {
  int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= w || y >= h) return;
  int idx = y * w + x;
  float center = src[idx];
  if (x > 0 && x < w - 1 && y > 0 && y < h - 1)
    dst[idx] = cc * center + cn * ((src[idx - 1] + src[idx + 1]) + (src[idx - w] + src[idx + w]));
  else dst[idx] = center;
}
extern "C" __global__ void s_dot(int n, const float* x, const float* y, float* out) {
  __shared__ float partial[256];
  int tid = threadIdx.x, i = blockIdx.x * blockDim.x + tid;
  partial[tid] = i < n ? x[i] * y[i] : 0.0f;
  __syncthreads();
  for (unsigned s = blockDim.x >> 1; s > 0; s >>= 1) {
    if (tid < s) partial[tid] += partial[tid + s];
    __syncthreads();
  }
  if (tid == 0) atomicAdd(out, partial[0]);
}
extern "C" __global__ void s_histogram(int n, int nbins, const int* data, int* hist) {
  __shared__ int bins[256];
  for (int j = threadIdx.x; j < nbins; j += blockDim.x) bins[j] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
    atomicAdd(&bins[(unsigned)data[i] % (unsigned)nbins], 1);
  __syncthreads();
  for (int m = threadIdx.x; m < nbins; m += blockDim.x)
    if (bins[m] != 0) atomicAdd(&hist[m], bins[m]);
}
extern "C" __global__ void s_scan_blocks(int n, const int* in, int* out, int* sums) {
  __shared__ int buf[512];
  int tid = threadIdx.x, i = blockIdx.x * blockDim.x + tid;
  buf[tid] = i < n ? in[i] : 0;
  __syncthreads();
  int src = 0;
  for (unsigned d = 1; d < blockDim.x; d <<= 1) {
    int dst = 256 - src;
    int x = buf[src + tid];
    int add = tid >= d ? buf[src + tid - d] : 0;
    buf[dst + tid] = x + add;
    __syncthreads();
    src = dst;
  }
  int r = buf[src + tid];
  if (i < n) out[i] = r;
  if (tid == blockDim.x - 1) sums[blockIdx.x] = r;
}
extern "C" __global__ void s_sgemm(int m, int n, int k, const float* a, const float* b, float* c) {
  __shared__ float ta[256], tb[256];
  int tx = threadIdx.x, ty = threadIdx.y, row = blockIdx.y * 16 + ty, col = blockIdx.x * 16 + tx;
  float acc = 0.0f;
  for (int t = 0; t < k; t += 16) {
    int acol = t + tx, brow = t + ty;
    ta[ty * 16 + tx] = (row < m && acol < k) ? a[row * k + acol] : 0.0f;
    tb[ty * 16 + tx] = (brow < k && col < n) ? b[brow * n + col] : 0.0f;
    __syncthreads();
    for (int kk = 0; kk < 16; ++kk) acc = fmaf(ta[ty * 16 + kk], tb[kk * 16 + tx], acc);
    __syncthreads();
  }
  if (row < m && col < n) c[row * n + col] = acc;
}
extern "C" __global__ void s_softmax(int rows, int cols, const float* x, float* y) {
  __shared__ float red[256];
  int tid = threadIdx.x, bdim = blockDim.x;
  const float* px = x + blockIdx.x * cols;
  float* py = y + blockIdx.x * cols;
  float m = NEG_INF;
  for (int j = tid; j < cols; j += bdim) m = fmaxf(m, px[j]);
  red[tid] = m;
  __syncthreads();
  for (unsigned s = bdim >> 1; s > 0; s >>= 1) {
    if (tid < s) red[tid] = fmaxf(red[tid], red[tid + s]);
    __syncthreads();
  }
  float rowmax = red[0];
  __syncthreads();
  float acc = 0.0f;
  for (int k = tid; k < cols; k += bdim) acc += expf(px[k] - rowmax);
  red[tid] = acc;
  __syncthreads();
  for (unsigned s = bdim >> 1; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  float total = red[0];
  for (int q = tid; q < cols; q += bdim) py[q] = expf(px[q] - rowmax) / total;
}
extern "C" __global__ void s_softmax_nounroll(int rows, int cols, const float* x, float* y) {
  __shared__ float red[256];
  int tid = threadIdx.x, bdim = blockDim.x;
  const float* px = x + blockIdx.x * cols;
  float* py = y + blockIdx.x * cols;
  float m = NEG_INF;
  #pragma unroll 1
  for (int j = tid; j < cols; j += bdim) m = fmaxf(m, px[j]);
  red[tid] = m;
  __syncthreads();
  for (unsigned s = bdim >> 1; s > 0; s >>= 1) {
    if (tid < s) red[tid] = fmaxf(red[tid], red[tid + s]);
    __syncthreads();
  }
  float rowmax = red[0];
  __syncthreads();
  float acc = 0.0f;
  #pragma unroll 1
  for (int k = tid; k < cols; k += bdim) acc += expf(px[k] - rowmax);
  red[tid] = acc;
  __syncthreads();
  for (unsigned s = bdim >> 1; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  float total = red[0];
  #pragma unroll 1
  for (int q = tid; q < cols; q += bdim) py[q] = expf(px[q] - rowmax) / total;
}
"""

#: sample file stem → kernel name in it.
SAMPLES = {"vector_add": "vector_add", "saxpy": "saxpy", "stencil2d": "stencil5", "dot": "dot",
           "histogram": "histogram", "scan": "scan_blocks", "sgemm": "sgemm", "softmax": "softmax"}
SAMPLE_MEMORY_BOUND = {"vector_add", "saxpy", "stencil2d"}


def _sample_case(name: str, quick: bool, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """Like :func:`_case`, for the sample kernels (launch shapes from the samples' headers)."""
    n = (1 << 22) if quick else (1 << 26)
    grid1 = ((n + 255) // 256, 1, 1)
    if name == "vector_add":
        return _case("vadd", quick, rng)
    if name == "saxpy":
        return _case("saxpy", quick, rng)
    if name == "stencil2d":
        w = h = 2048 if quick else 8192
        src = rng.standard_normal(w * h, dtype=np.float32)
        cc, cn = np.float32(0.5), np.float32(0.125)

        def ref(d):  # type: ignore[no-untyped-def]
            s2 = d["src"].reshape(h, w)
            out = s2.copy()
            out[1:-1, 1:-1] = cc * s2[1:-1, 1:-1] + cn * ((s2[1:-1, :-2] + s2[1:-1, 2:]) + (s2[:-2, 1:-1] + s2[2:, 1:-1]))
            return {"dst": out.ravel().astype(np.float64)}

        return {"src": src, "dst": np.full(w * h, np.nan, np.float32)}, ((w + 15) // 16, (h + 15) // 16, 1), \
            (16, 16, 1), lambda p: struct.pack("<iiffQQ", w, h, cc, cn, p["src"], p["dst"]), ["dst"], ref, 8 * w * h
    if name == "dot":
        x, y = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
        return {"x": x, "y": y, "out": np.zeros(1, np.float32)}, grid1, (256, 1, 1), \
            lambda p: struct.pack("<iiQQQ", n, 0, p["x"], p["y"], p["out"]), ["out"], \
            lambda d: {"out": np.array([np.dot(d["x"].astype(np.float64), d["y"])])}, 8 * n
    if name == "histogram":
        data = rng.integers(0, 1 << 31, n, dtype=np.int32)
        return {"data": data, "hist": np.zeros(256, np.int32)}, (132 * 8, 1, 1), (256, 1, 1), \
            lambda p: struct.pack("<iiQQ", n, 256, p["data"], p["hist"]), ["hist"], \
            lambda d: {"hist": np.bincount(d["data"] % 256, minlength=256).astype(np.float64)}, 4 * n
    if name == "scan":
        data = rng.integers(-1000, 1000, n, dtype=np.int32)
        g = (n + 255) // 256

        def ref(d):  # type: ignore[no-untyped-def]
            blocks = np.cumsum(d["in"].reshape(g, 256).astype(np.int64), axis=1).astype(np.int32)
            return {"out": blocks.ravel().astype(np.float64), "sums": blocks[:, -1].astype(np.float64)}

        return {"in": data, "out": np.zeros(n, np.int32), "sums": np.zeros(g, np.int32)}, grid1, (256, 1, 1), \
            lambda p: struct.pack("<iiQQQ", n, 0, p["in"], p["out"], p["sums"]), ["out", "sums"], ref, 8 * n
    if name == "sgemm":
        m = 1024 if quick else 2048
        a, bm = rng.standard_normal((m, m), dtype=np.float32), rng.standard_normal((m, m), dtype=np.float32)
        return {"a": a.ravel(), "b": bm.ravel(), "c": np.full(m * m, np.nan, np.float32)}, (m // 16, m // 16, 1), \
            (16, 16, 1), lambda p: struct.pack("<iiiiQQQ", m, m, m, 0, p["a"], p["b"], p["c"]), ["c"], \
            lambda d: {"c": (d["a"].reshape(m, m).astype(np.float64) @ d["b"].reshape(m, m)).ravel()}, 12 * m * m
    rows, cols = (4096, 1024) if quick else (16384, 4096)
    x = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)

    def ref_softmax(d):  # type: ignore[no-untyped-def]
        xx = d["x"].reshape(rows, cols).astype(np.float64)
        e = np.exp(xx - xx.max(axis=1, keepdims=True))
        return {"y": (e / e.sum(axis=1, keepdims=True)).ravel()}

    return {"x": x.ravel(), "y": np.full(rows * cols, np.nan, np.float32)}, (rows, 1, 1), (256, 1, 1), \
        lambda p: struct.pack("<iiQQ", rows, cols, p["x"], p["y"]), ["y"], ref_softmax, 8 * rows * cols


KERNELS = {"vadd": ir_vadd, "saxpy": ir_saxpy, "stencil": ir_stencil, "reduce": ir_reduce,
           "matmul": ir_matmul, "expk": ir_expk}
#: Kernels judged as memory-bound (target ratio 0.95; others 0.9).
MEMORY_BOUND = {"vadd", "saxpy", "stencil"}


# ------------------------------------------------------------------------------- CUDA plumbing


def _check(res):  # type: ignore[no-untyped-def]
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err!r}")
    if isinstance(res, tuple):
        return res[1] if len(res) == 2 else res[1:]
    return None


class Gpu:
    """Just enough of the driver API for this benchmark."""

    def __init__(self) -> None:
        from cuda.bindings import driver as cu

        self.cu = cu
        _check(cu.cuInit(0))
        self.dev = _check(cu.cuDeviceGet(0))
        self.ctx = _check(cu.cuDevicePrimaryCtxRetain(self.dev))
        _check(cu.cuCtxSetCurrent(self.ctx))
        self.name = _check(cu.cuDeviceGetName(100, self.dev)).split(b"\0")[0].decode()
        self.stream = _check(cu.cuStreamCreate(0))

    def load(self, image: bytes, name: str):  # type: ignore[no-untyped-def]
        mod = _check(self.cu.cuModuleLoadData(image))
        return mod, _check(self.cu.cuModuleGetFunction(mod, name.encode()))

    def alloc(self, nbytes: int) -> int:
        return int(_check(self.cu.cuMemAlloc(nbytes)))

    def htod(self, dst: int, arr: np.ndarray) -> None:
        _check(self.cu.cuMemcpyHtoD(dst, arr, arr.nbytes))

    def dtoh(self, arr: np.ndarray, src: int) -> None:
        _check(self.cu.cuMemcpyDtoH(arr, src, arr.nbytes))

    def launch(self, fn, grid, block, args: bytes) -> None:  # type: ignore[no-untyped-def]
        cu = self.cu
        buf = np.frombuffer(args, dtype=np.uint8).copy()
        size = np.array([len(args)], dtype=np.uint64)
        extra = np.array([1, buf.ctypes.data, 2, size.ctypes.data, 0], dtype=np.uint64)  # BUFFER_POINTER, SIZE, END
        self._keep = (buf, size, extra)
        _check(cu.cuLaunchKernel(fn, *grid, *block, 0, self.stream, None, extra.ctypes.data))

    def time_ms(self, fn, grid, block, args: bytes, reps: int) -> float:  # type: ignore[no-untyped-def]
        cu = self.cu
        e0, e1 = _check(cu.cuEventCreate(0)), _check(cu.cuEventCreate(0))
        _check(cu.cuEventRecord(e0, self.stream))
        for _ in range(reps):
            self.launch(fn, grid, block, args)
        _check(cu.cuEventRecord(e1, self.stream))
        _check(cu.cuEventSynchronize(e1))
        ms = float(_check(cu.cuEventElapsedTime(e0, e1)))
        cu.cuEventDestroy(e0)
        cu.cuEventDestroy(e1)
        return ms / reps

    def sync(self) -> None:
        _check(self.cu.cuStreamSynchronize(self.stream))


def nvrtc_cubin(src: str, arch: str) -> bytes:
    from cuda.bindings import nvrtc

    prog = _check(nvrtc.nvrtcCreateProgram(src.encode(), b"hand.cu", 0, [], []))
    opts = [f"--gpu-architecture={arch}".encode()]
    res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if int(res[0]) != 0:
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(log.decode())
    size = _check(nvrtc.nvrtcGetCUBINSize(prog))
    out = b" " * size
    _check(nvrtc.nvrtcGetCUBIN(prog, out))
    return out


# ------------------------------------------------------------------------------- cases


def _case(name: str, quick: bool, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """(inputs dict, grid, block, args-fn(ptrs), outputs, reference fn, bytes moved, flops)."""
    n = (1 << 22) if quick else (1 << 26)
    if name in ("vadd", "saxpy", "expk"):
        x = rng.standard_normal(n, dtype=np.float32)
        y = rng.standard_normal(n, dtype=np.float32)
        grid, block = ((n + 255) // 256, 1, 1), (256, 1, 1)
        if name == "vadd":
            return {"a": x, "b": y, "c": np.full(n, np.nan, np.float32)}, grid, block, \
                lambda p: struct.pack("<iiQQQ", n, 0, p["a"], p["b"], p["c"]), ["c"], \
                lambda d: {"c": d["a"] + d["b"]}, 12 * n
        if name == "saxpy":
            return {"x": x, "y": y}, grid, block, lambda p: struct.pack("<ifQQ", n, 2.5, p["x"], p["y"]), ["y"], \
                lambda d: {"y": np.float32(2.5) * d["x"] + d["y"]}, 12 * n
        x = (x * 3).astype(np.float32)
        return {"x": x, "y": np.full(n, np.nan, np.float32)}, grid, block, \
            lambda p: struct.pack("<ifQQ", n, 0.5, p["x"], p["y"]), ["y"], \
            lambda d: {"y": (np.exp(d["x"].astype(np.float64)) * 0.5).astype(np.float32)}, 8 * n
    if name == "stencil":
        w = h = 2048 if quick else 8192
        src = rng.standard_normal(w * h, dtype=np.float32)

        def ref(d):  # type: ignore[no-untyped-def]
            s = d["src"].reshape(h, w).astype(np.float64)
            out = s.copy()
            out[1:-1, 1:-1] = (s[1:-1, 1:-1] + s[1:-1, :-2] + s[1:-1, 2:] + s[:-2, 1:-1] + s[2:, 1:-1]) * np.float32(0.2)
            return {"dst": out.astype(np.float32).ravel()}

        return {"src": src, "dst": np.full(w * h, np.nan, np.float32)}, ((w + 31) // 32, (h + 7) // 8, 1), (32, 8, 1), \
            lambda p: struct.pack("<iiQQ", w, h, p["src"], p["dst"]), ["dst"], ref, 8 * w * h
    if name == "reduce":
        x = rng.random(n, dtype=np.float32)
        return {"x": x, "out": np.zeros(1, np.float32)}, ((n + 255) // 256, 1, 1), (256, 1, 1), \
            lambda p: struct.pack("<iiQQ", n, 0, p["x"], p["out"]), ["out"], \
            lambda d: {"out": np.array([d["x"].astype(np.float64).sum()])}, 4 * n
    nn = 1024 if quick else 2048
    a = rng.standard_normal((nn, nn), dtype=np.float32)
    bm = rng.standard_normal((nn, nn), dtype=np.float32)
    return {"a": a.ravel(), "b": bm.ravel(), "c": np.full(nn * nn, np.nan, np.float32)}, (nn // 16, nn // 16, 1), (16, 16, 1), \
        lambda p: struct.pack("<iiQQQ", nn, 0, p["a"], p["b"], p["c"]), ["c"], \
        lambda d: {"c": (d["a"].reshape(nn, nn).astype(np.float64) @ d["b"].reshape(nn, nn)).ravel()}, 12 * nn * nn


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def run_kernel(gpu: Gpu, name: str, fns: dict, quick: bool, rng: np.random.Generator,  # type: ignore[no-untyped-def]
               case=None) -> dict:
    """Check and time each variant in ``fns`` (label → CUfunction; "ir" and "cuda" required)."""
    results = {}
    trials, reps = (5, 10) if quick else (9, 20)
    for label, fn in fns.items():
        inputs, grid, block, pack, outs, ref, nbytes = (case or _case)(name, quick, rng)
        ptrs = {k: gpu.alloc(v.nbytes) for k, v in inputs.items()}
        for k, v in inputs.items():
            gpu.htod(ptrs[k], v)
        args = pack(ptrs)
        gpu.launch(fn, grid, block, args)
        gpu.sync()
        got = {k: np.empty_like(inputs[k]) for k in outs}
        for k in outs:
            gpu.dtoh(got[k], ptrs[k])
        want = ref(inputs)
        err = max(_rel_err(got[k], want[k]) for k in outs)
        results[label] = {"rel_err": err, "args": args, "grid": grid, "block": block, "nbytes": nbytes,
                          "ptrs": ptrs, "fn": fn}
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(trials):
        for label in fns:
            r = results[label]
            times[label].append(gpu.time_ms(r["fn"], r["grid"], r["block"], r["args"], reps))
    out = {"kernel": name}
    for label in fns:
        r = results[label]
        med = statistics.median(times[label])
        out[label] = {"ms": med, "spread": (max(times[label]) - min(times[label])) / med, "rel_err": r["rel_err"],
                      "gbps": r["nbytes"] / med / 1e6}
        for p in r["ptrs"].values():
            gpu.cu.cuMemFree(p)
    out["ratio"] = out["cuda"]["ms"] / out["ir"]["ms"]
    for label in fns:
        if label not in ("ir", "cuda"):
            out[f"ratio_{label}"] = out["cuda"]["ms"] / out[label]["ms"]
    return out


def _hand_source(name: str) -> str:
    """The hand-written CUDA C of one kernel (for NVRTC compile-time comparison)."""
    parts = CUDA_SRC.split('extern "C"')
    return 'extern "C"' + next(p for p in parts if f"void {name}(" in p)


def _experimental_softmax(mod, nsw: bool) -> bytes:  # type: ignore[no-untyped-def]
    """softmax with unroll-by-4 loop metadata on its three strided loops (and, for the
    experiment only, ``nsw`` on every i32 add, which the IR's wrapping semantics forbid)."""
    import re

    from vxpu.ir.lower import nvptx

    text = str(nvptx.lower_module(mod))
    if nsw:
        text = re.sub(r"= add i32", "= add nsw i32", text)
    for h in ("max_loop", "sum_loop", "out_loop"):
        text = re.sub('(br label %"b[.]' + h + '")\n', r"\1, !llvm.loop !900\n", text)
    text += '\n!900 = distinct !{!900, !901}\n!901 = !{!"llvm.loop.unroll.count", i32 4}\n'
    spec = toolchain.resolve_target("nvptx", ARCH)
    ptx = toolchain.emit_ptx(toolchain.parse_and_optimize(text, spec, 3), spec)
    return toolchain.ptx_to_cubin(ptx, ARCH)[0]


def exp_accuracy(gpu: Gpu, fn, n: int, rng: np.random.Generator) -> float:  # type: ignore[no-untyped-def]
    """Max ulp error of the IR ``expk`` kernel (s = 1) on the GPU over n inputs in [-104, 89]."""
    x = rng.uniform(-104.0, 89.0, n).astype(np.float32)
    px, py = gpu.alloc(x.nbytes), gpu.alloc(x.nbytes)
    gpu.htod(px, x)
    gpu.launch(fn, ((n + 255) // 256, 1, 1), (256, 1, 1), struct.pack("<ifQQ", n, 1.0, px, py))
    gpu.sync()
    y = np.empty_like(x)
    gpu.dtoh(y, py)
    gpu.cu.cuMemFree(px)
    gpu.cu.cuMemFree(py)
    want = np.exp(x.astype(np.float64))
    ok = (want > 1.2e-38) & (want < 3.4e38)
    spacing = np.spacing(want[ok].astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(y[ok].astype(np.float64) - want[ok]) / spacing))


def compile_timings(gpu: Gpu | None, reps: int, opt: int = 3) -> dict:
    """Cold compile (bytes → cubin → loaded function) and warm cache-hit medians per kernel."""
    out = {}
    compile_module(ir_vadd(), "nvptx", arch=ARCH, cache=False)  # load nvJitLink and LLVM once
    with tempfile.TemporaryDirectory() as tmp:
        cache = CompileCache(tmp)
        for name, mk in KERNELS.items():
            data = binary.encode(mk())
            cold, load, ptxas = [], [], []
            for rep in range(reps):
                # A fresh kernel name per repetition, so no layer (ours, nvJitLink's, the
                # driver's) can serve a cached result: every repetition is a true cold compile.
                variant = mk()
                uniq = f"{name}_r{rep}_{time.monotonic_ns() % 100000}"
                variant.kernels[0].name = uniq
                vdata = binary.encode(variant)
                t0 = time.perf_counter()
                cm = compile_module(vdata, "nvptx", arch=ARCH, opt_level=opt, cache=False)
                t1 = time.perf_counter()
                if gpu is not None:
                    mod, _fn = gpu.load(cm.image, uniq)
                cold.append(time.perf_counter() - t0)
                load.append(time.perf_counter() - t1)
                if gpu is not None:
                    gpu.cu.cuModuleUnload(mod)
                t2 = time.perf_counter()
                toolchain.ptx_to_cubin(cm.asm + f"\n// {uniq}\n", ARCH)
                ptxas.append(time.perf_counter() - t2)
            compile_module(data, "nvptx", arch=ARCH, cache=cache)
            warm = []
            for _ in range(max(reps, 50)):
                t0 = time.perf_counter()
                compile_module(data, "nvptx", arch=ARCH, cache=cache)
                warm.append(time.perf_counter() - t0)
            src = _hand_source(name)
            nv = []
            try:
                for rep in range(reps):
                    t0 = time.perf_counter()
                    nvrtc_cubin(src.replace(f"void {name}(", f"void {name}_r{rep}("), ARCH)
                    nv.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - NVRTC missing here: leave the column empty
                nv = []
            out[name] = {"cold_ms": statistics.median(cold) * 1e3, "warm_us": statistics.median(warm) * 1e6,
                         **({"nvrtc_ms": statistics.median(nv) * 1e3} if nv else {}),
                         "load_ms": statistics.median(load) * 1e3, "nvjitlink_ms": statistics.median(ptxas) * 1e3}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    ap.add_argument("--compile-only", action="store_true", help="no GPU: only compile and time compiles")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--no-samples", action="store_true", help="skip the examples/kernels samples")
    ap.add_argument("--experiments", action="store_true", help="also time experimental softmax builds")
    ap.add_argument("--opt", type=int, default=3, help="opt level of the IR kernels (default 3)")
    ap.add_argument("--also-opt", type=int, nargs="*", default=[], help="also time these opt levels")
    ns = ap.parse_args(argv)
    rng = np.random.default_rng(20261123)
    gpu = None if ns.compile_only else Gpu()
    rows = []
    if gpu is not None:
        hand_mod = gpu.load(nvrtc_cubin(CUDA_SRC, ARCH), "vadd")[0]
        for name, mk in KERNELS.items():
            fns = {}
            for label, opt in (("ir", ns.opt), *((f"ir_O{o}", o) for o in ns.also_opt)):
                cm = compile_module(mk(), "nvptx", arch=ARCH, opt_level=opt, cache=False)
                fns[label] = gpu.load(cm.image, name)[1]
            fns["cuda"] = _check(gpu.cu.cuModuleGetFunction(hand_mod, name.encode()))
            rows.append(run_kernel(gpu, name, fns, ns.quick, rng))
            print(f"{name}: done", flush=True)
    exp_ulp = None
    if gpu is not None:
        cm = compile_module(ir_expk(), "nvptx", arch=ARCH, opt_level=ns.opt, cache=False)
        exp_ulp = exp_accuracy(gpu, gpu.load(cm.image, "expk")[1], 1 << 24, rng)
    sample_rows = []
    if gpu is not None and not ns.no_samples:
        from vxpu.ir.text import parse

        twin_mod = gpu.load(nvrtc_cubin(SAMPLE_CUDA, ARCH), "s_vector_add")[0]
        for stem, kname in SAMPLES.items():
            mod = parse((ROOT / "examples" / "kernels" / f"{stem}.vxir").read_text())
            cm = compile_module(mod, "nvptx", arch=ARCH, opt_level=ns.opt, cache=False)
            fns = {"ir": gpu.load(cm.image, kname)[1],
                   "cuda": _check(gpu.cu.cuModuleGetFunction(twin_mod, f"s_{kname}".encode()))}
            if stem == "softmax":  # the same CUDA C without loop unrolling, to explain the gap
                fns["cuda_nounroll"] = _check(gpu.cu.cuModuleGetFunction(twin_mod, b"s_softmax_nounroll"))
                if ns.experiments:
                    for label, nsw in (("ir_unroll4", False), ("ir_nsw_unroll4", True)):
                        fns[label] = gpu.load(_experimental_softmax(mod, nsw), kname)[1]
            row = run_kernel(gpu, stem, fns, ns.quick, rng, case=_sample_case)
            sample_rows.append(row)
            print(f"sample {stem}: done", flush=True)
    ct = {o: compile_timings(gpu, 5 if ns.quick else 11, o) for o in (ns.opt, *ns.also_opt)}
    if ns.json:
        Path(ns.json).write_text(json.dumps({"device": gpu.name if gpu else None, "kernels": rows,
                                             "samples": sample_rows, "compile": ct},
                                            indent=1, default=str))
    print(f"\ndevice: {gpu.name if gpu else 'none (compile only)'}")
    if rows:
        print("| kernel | IR ms | CUDA C ms | ratio (CUDA/IR) | target | IR GB/s | rel err IR / CUDA |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            tgt = 0.95 if r["kernel"] in MEMORY_BOUND else 0.9
            ok = "ok" if r["ratio"] >= tgt else "MISS"
            print(f"| {r['kernel']} | {r['ir']['ms']:.4f} | {r['cuda']['ms']:.4f} | {r['ratio']:.3f} | ≥{tgt} {ok} | "
                  f"{r['ir']['gbps']:.0f} | {r['ir']['rel_err']:.1e} / {r['cuda']['rel_err']:.1e} |")
        for o in ns.also_opt:
            print(f"(O{o}: " + ", ".join(f"{r['kernel']} {r[f'ratio_ir_O{o}']:.3f}" for r in rows) + ")")
    if exp_ulp is not None:
        print(f"\nIR f32 exp on the GPU: max error {exp_ulp:.2f} ulp over 2^24 inputs in [-104, 89] (spec: 4)")
    if sample_rows:
        print("\nSample kernels (examples/kernels/*.vxir) vs hand-written CUDA C twins:")
        print("| sample | IR ms | CUDA C ms | ratio (CUDA/IR) | target | IR GB/s | rel err IR / CUDA |")
        print("|---|---|---|---|---|---|---|")
        for r in sample_rows:
            tgt = 0.95 if r["kernel"] in SAMPLE_MEMORY_BOUND else 0.9
            ok = "ok" if r["ratio"] >= tgt else "MISS"
            print(f"| {r['kernel']} | {r['ir']['ms']:.4f} | {r['cuda']['ms']:.4f} | {r['ratio']:.3f} | ≥{tgt} {ok} | "
                  f"{r['ir']['gbps']:.0f} | {r['ir']['rel_err']:.1e} / {r['cuda']['rel_err']:.1e} |")
            for extra in ("cuda_nounroll", "ir_unroll4", "ir_nsw_unroll4"):
                if extra in r:
                    print(f"  ({r['kernel']} variant {extra}: {r[extra]['ms']:.4f} ms, rel err {r[extra]['rel_err']:.1e})")
    print("\n| kernel | cold compile → loaded function (ms) | of which nvJitLink / cuModuleLoadData (ms) "
          "| warm cache hit (µs) | NVRTC CUDA C → cubin (ms) |")
    print("|---|---|---|---|---|")
    for o, per in ct.items():
        for name, c in per.items():
            nvrtc = f"{c['nvrtc_ms']:.1f}" if "nvrtc_ms" in c else "-"
            print(f"| {name} (O{o}) | {c['cold_ms']:.1f} | {c['nvjitlink_ms']:.1f} / {c['load_ms']:.1f} | "
                  f"{c['warm_us']:.1f} | {nvrtc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
